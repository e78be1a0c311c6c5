"""The L2 prefetch (kernels/l2_prefetch.py): a hint that changes no value, on its own and inside a decode step."""

from __future__ import annotations

import pytest
import torch

import sfi.model
from sfi.loader import load_model
from sfi.model import DecodeStep, PrefillStep
from sfi_kernels import l2_prefetch

import tiny

GPU = torch.cuda.is_available()


def test_prefetch_changes_nothing_and_launches_only_on_a_gpu():
    device = "cuda" if GPU else "cpu"
    w = torch.randn(1000, 129, device=device, dtype=torch.bfloat16)  # not a whole number of 128-byte lines
    before = w.clone()
    assert l2_prefetch(w) is GPU
    assert torch.equal(w, before)
    assert l2_prefetch(w[:0]) is False
    if GPU:
        with pytest.raises(ValueError, match="contiguous"):
            l2_prefetch(w[:, :64])


@pytest.mark.skipif(not GPU, reason="the prefetch runs on a GPU only")
def test_decode_step_with_the_prefetch_equals_without(tmp_path, monkeypatch):
    ours = load_model(str(tiny.make_checkpoint(tmp_path / "q3", "qwen3")), device="cuda", dtype="bfloat16")
    ids = torch.arange(3, 90, device="cuda")
    cache = ours.model.new_cache(2, 128)
    for row, n in enumerate((40, 77)):
        ours.model.prefill(ids[:n], cache, PrefillStep(row, 0, n))
    step = DecodeStep.dense(torch.arange(2, device="cuda"), torch.tensor([40, 77], device="cuda"))
    tokens = ids[[40, 77]]
    want = ours.model.decode(tokens, cache, step)
    monkeypatch.setattr(sfi.model, "L2_PREFETCH", True)
    got = ours.model.decode(tokens, cache, step)
    assert torch.equal(got, want)
