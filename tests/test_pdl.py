"""Programmatic dependent launch (sfi_kernels/pdl.py): off where it cannot apply, and on a GPU the same results as plain
stream order, op by op and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from sfi_kernels import add_rms_norm, skinny_linear, use_pdl
from sfi_kernels.pdl import pdl_kwargs

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_off_on_a_cpu_and_its_launch_keywords():
    assert not use_pdl(torch.zeros(1))
    assert pdl_kwargs(False) == {"PDL": False} and pdl_kwargs(True) == {"PDL": True, "launch_pdl": True}


@pytest.mark.skipif(not GPU, reason="programmatic dependent launch needs a Hopper or later GPU")
def test_switched_off_by_the_environment(monkeypatch):
    x = torch.zeros(1, device="cuda")
    assert use_pdl(x)
    monkeypatch.setenv("SFI_PDL", "0")
    assert not use_pdl(x)


@pytest.mark.skipif(not GPU, reason="programmatic dependent launch needs a Hopper or later GPU")
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_a_chain_gives_the_same_bits_with_and_without_it(rows, monkeypatch):
    """Products and fused norms feeding each other, as a decode step chains them: with PDL each kernel waits for
    the one before in-kernel; the results must be the plain stream order's, bit for bit, also replayed from a
    graph."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    # [N, K] weights of a chain 256 -> 512 -> 256 -> 4096 -> 256: the last K of 4096 is split at 2-16 rows, its
    # partials added by add_rms_norm (partials.SplitPartials), as a decode step's residual projections are.
    dims = [(512, 256), (256, 512), (4096, 256), (256, 4096)]
    ws = [torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5 for n, k in dims * 3]
    norm = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(rows, 256, device="cuda", generator=g, dtype=torch.bfloat16)

    def chain() -> torch.Tensor:  # every kernel with PDL unless SFI_PDL=0
        h = x0
        for i in range(0, len(ws), 4):
            a = skinny_linear(h, ws[i])
            b = skinny_linear(a, ws[i + 1])
            c = skinny_linear(b, ws[i + 2])
            h, _ = add_rms_norm(h, skinny_linear(c, ws[i + 3], partial=True), norm, 1e-6)
        return h

    monkeypatch.setenv("SFI_PDL", "0")
    plain = chain()
    monkeypatch.delenv("SFI_PDL")
    assert torch.equal(chain(), plain)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
