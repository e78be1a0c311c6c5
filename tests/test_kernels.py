"""Attention kernels against a per-row float64 loop, on awkward shapes, with poisoned cache tails."""

from __future__ import annotations

import math

import pytest
import torch

from sfi_kernels import decode_attention


def naive(q, k, v, lengths, scale):
    """float64, one row and one head at a time: the slowest, most obviously right version."""
    b, hq, d = q.shape
    g = hq // k.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    lse = torch.empty(b, hq, dtype=torch.float64)
    for row in range(b):
        n = int(lengths[row])
        for h in range(hq):
            keys, vals = k[row, h // g, :n].double(), v[row, h // g, :n].double()
            logits = keys @ q[row, h].double() * scale
            lse[row, h] = torch.logsumexp(logits, 0)
            out[row, h] = torch.softmax(logits, 0) @ vals
    return out, lse


@pytest.mark.parametrize("lengths", [[1], [27, 63, 1], [1110, 5, 300]])
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (3, 1, 64), (12, 3, 128), (8, 2, 128)])
def test_decode_attention_matches_naive_and_ignores_unwritten_positions(lengths, hq, hkv, d):
    torch.manual_seed(len(lengths) * 1000 + hq * 10 + d)
    b, s = len(lengths), max(lengths) + 7
    q = torch.randn(b, hq, d)
    k, v = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    lens = torch.tensor(lengths)
    for row, n in enumerate(lengths):  # what an empty cache may hold past each row's length
        k[row, :, n:] = float("nan")
        v[row, :, n:] = float("inf")
    scale = 1 / math.sqrt(d)
    out, lse = decode_attention(q, k, v, lens, scale)
    ref_out, ref_lse = naive(q, k, v, lens, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_lse_merges_partial_attentions_exactly():
    """Attention over keys [0, n) equals the lse-weighted merge of attention over two halves of it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 64), torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)
    whole, lse = decode_attention(q, k, v, torch.tensor([100, 100]))
    a, lse_a = decode_attention(q, k[:, :, :40], v[:, :, :40], torch.tensor([40, 40]))
    b, lse_b = decode_attention(q, k[:, :, 40:], v[:, :, 40:], torch.tensor([60, 60]))
    merged_lse = torch.logaddexp(lse_a, lse_b)
    merged = a * (lse_a - merged_lse).exp()[..., None] + b * (lse_b - merged_lse).exp()[..., None]
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)


def test_bad_shapes_name_expected_and_actual():
    q, k = torch.randn(2, 6, 64), torch.randn(2, 4, 10, 64)
    with pytest.raises(ValueError, match="not a multiple of KV heads 4"):
        decode_attention(q, k, k, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"expected lengths \[2\]"):
        decode_attention(torch.randn(2, 8, 64), k, k, torch.tensor([3]))
