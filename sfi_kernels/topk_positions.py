"""The k kept positions of each head from its scores and its k-th largest score: the Selector's last step.

score [P, H, C] float32 (no NaN); kth [P, H] float32, the k-th largest value of each head's scores (from a
top-k, which finds values without sorting); k <= C; optionally n_above [P, H] int32, how many scores exceed
kth (cheap to count among the top-k values; saves the kernel a pass over C). Returns [P, H, k] int32: every
position scored above kth, then the lowest positions scored exactly kth until there are k, in ascending order.
That is the set a stable descending sort would put first, so ties (-inf past a short domain included) are
broken by position and the result is deterministic.

One Triton program per (p, h): a pass counts the positions above kth (unless given), a second writes each
kept position at its rank (running prefix counts across blocks). No host reads, static shapes: capturable in
a CUDA graph.
The torch reference takes about ten launches over [P, H, C] index tensors for the same result.
"""

from __future__ import annotations

import torch

from .pdl import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the reference
    triton = None


def kept_positions_ref(score: torch.Tensor, kth: torch.Tensor, k: int,
                       n_above: torch.Tensor | None = None) -> torch.Tensor:
    _check(score, kth, k, n_above)
    above = score > kth[..., None]
    tied = score == kth[..., None]
    room = k - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= room))
    # Kept positions go to slots 0..k-1 in position order; the rest to a spare slot k, dropped.
    slot = torch.where(keep, torch.cumsum(keep.to(torch.int32), dim=-1) - 1, k).long()
    positions = torch.arange(score.shape[-1], device=score.device, dtype=torch.int32)
    out = torch.zeros(*score.shape[:-1], k + 1, dtype=torch.int32, device=score.device)
    out.scatter_(-1, slot, positions.expand_as(slot))
    return out[..., :k]


if triton is not None:

    @triton.jit(do_not_specialize=["C", "K"])
    def _kept_positions_kernel(score_ptr, kth_ptr, above_ptr, out_ptr, C, K, stride_sp, stride_sh, stride_op,
                               stride_oh, H: tl.constexpr, BLOCK: tl.constexpr, HAS_ABOVE: tl.constexpr):
        ph = tl.program_id(0)
        p = ph // H
        h = ph % H
        base = score_ptr + p.to(tl.int64) * stride_sp + h.to(tl.int64) * stride_sh
        out = out_ptr + p.to(tl.int64) * stride_op + h.to(tl.int64) * stride_oh
        kth = tl.load(kth_ptr + ph)
        if HAS_ABOVE:
            n_above = tl.load(above_ptr + ph)
        else:
            n_above = 0
            for start in range(0, C, BLOCK):
                j = start + tl.arange(0, BLOCK)
                s = tl.load(base + j, mask=j < C, other=float("-inf"))
                n_above += tl.sum((s > kth).to(tl.int32), axis=0)
        room = K - n_above
        kept_before = 0
        tied_before = 0
        for start in range(0, C, BLOCK):
            j = start + tl.arange(0, BLOCK)
            valid = j < C
            s = tl.load(base + j, mask=valid, other=float("-inf"))
            above = (valid & (s > kth)).to(tl.int32)
            tied = (valid & (s == kth)).to(tl.int32)
            tie_rank = tied_before + tl.cumsum(tied, axis=0) - tied  # ties before j
            keep = above | (tied & (tie_rank < room).to(tl.int32))
            dest = kept_before + tl.cumsum(keep, axis=0) - keep  # kept positions before j
            tl.store(out + dest, j, mask=(keep > 0) & (dest < K))
            kept_before += tl.sum(keep, axis=0)
            tied_before += tl.sum(tied, axis=0)


def _check(score: torch.Tensor, kth: torch.Tensor, k: int, n_above: torch.Tensor | None = None) -> None:
    if score.dim() != 3 or kth.shape != score.shape[:2]:
        raise ValueError(f"expected score [P, H, C] and kth [P, H], got {tuple(score.shape)} and {tuple(kth.shape)}")
    if not 0 <= k <= score.shape[2]:
        raise ValueError(f"expected 0 <= k <= C = {score.shape[2]}, got k {k}")
    if score.dtype != torch.float32 or kth.dtype != torch.float32:
        raise ValueError(f"expected float32 score and kth, got {score.dtype} and {kth.dtype}")
    if n_above is not None and (n_above.shape != kth.shape or n_above.dtype != torch.int32):
        raise ValueError(f"expected n_above int32 {tuple(kth.shape)}, got {n_above.dtype} {tuple(n_above.shape)}")


def kept_positions(score: torch.Tensor, kth: torch.Tensor, k: int, n_above: torch.Tensor | None = None,
                   block: int = 4096) -> torch.Tensor:
    """See the module docstring."""
    if triton is None or not (score.is_cuda or interpreting()):
        return kept_positions_ref(score, kth, k, n_above)
    _check(score, kth, k, n_above)
    p, h, c = score.shape
    out = torch.empty(p, h, k, dtype=torch.int32, device=score.device)
    if out.numel() == 0:
        return out
    if score.stride(2) != 1:
        raise ValueError(f"score must be contiguous along C, got strides {score.stride()}")
    kth = kth.contiguous()
    above = n_above.contiguous() if n_above is not None else kth
    block = min(block, triton.next_power_of_2(c))
    _kept_positions_kernel[(p * h,)](score, kth, above, out, c, k, score.stride(0), score.stride(1), out.stride(0),
                                     out.stride(1), H=h, BLOCK=block, HAS_ABOVE=n_above is not None,
                                     num_warps=8 if block >= 2048 else 4)
    return out
