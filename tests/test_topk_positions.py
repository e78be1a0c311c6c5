"""Kept positions from a threshold (Triton; interpreted on CPU) against a stable sort, ties and -inf tails included."""

from __future__ import annotations

import pytest
import torch

from sfi_kernels import kept_positions, kept_positions_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def stable_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the first k of a stable descending sort, in ascending position order."""
    return torch.sort(torch.sort(-score, dim=-1, stable=True).indices[..., :k], dim=-1).values.to(torch.int32)


@pytest.mark.parametrize("p,h,c,k", [(1, 1, 1, 1), (2, 3, 27, 5), (3, 8, 63, 63), (2, 4, 1110, 100),
                                     (1, 2, 3000, 1), (2, 1, 2049, 2048)])
@pytest.mark.parametrize("kind", ["ties", "distinct", "short_domains"])
def test_matches_a_stable_sort(p, h, c, k, kind):
    g = torch.Generator().manual_seed(p * c + k)
    if kind == "ties":
        score = torch.randint(-3, 3, (p, h, c), generator=g).float()  # a handful of values: many ties at kth
    else:
        score = torch.randn(p, h, c, generator=g)
    if kind == "short_domains":  # problems whose domain ends early: -inf past it, fewer than k finite scores
        for i in range(p):
            score[i, :, (i + 1) * c // (p + 1):] = float("-inf")
    score = score.to(DEVICE)
    kth = torch.topk(score, k, dim=-1).values.amin(dim=-1)
    want = stable_top(score, k)
    got = kept_positions(score, kth, k, block=64)  # several blocks: the prefix counts carry over
    assert got.shape == (p, h, k) and got.dtype == torch.int32
    assert torch.equal(got, want)
    assert torch.equal(kept_positions_ref(score, kth, k), want)
    assert torch.equal(kept_positions(score, kth, k), want)  # default block
    n_above = (torch.topk(score, k, dim=-1).values > kth[..., None]).sum(-1, dtype=torch.int32)
    assert torch.equal(kept_positions(score, kth, k, n_above, block=64), want)  # the count given, one pass


def test_strided_scores_and_bad_arguments():
    score = torch.randn(2, 6, 40, device=DEVICE)[:, ::2]  # H stride 80
    kth = torch.topk(score, 7, dim=-1).values.amin(dim=-1)
    assert torch.equal(kept_positions(score, kth, 7), stable_top(score, 7))
    assert kept_positions(score, kth, 0).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="k <= C"):
        kept_positions(score, kth, 41)
    with pytest.raises(ValueError, match="kth"):
        kept_positions(score, kth[:, :2], 7)
    with pytest.raises(ValueError, match="float32"):
        kept_positions(score.double(), kth.double(), 7)
