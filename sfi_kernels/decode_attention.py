"""Dense decode attention over a ragged batch: one new query per row against that row's cached keys.

Shapes: q [B, Hq, D]; k, v [B, Hkv, S, D] (a cache, only the first `lengths[b]` positions of row b are
valid); lengths [B] int. Returns (out [B, Hq, D], lse [B, Hq]) so that partial attentions over
disjoint key sets can be merged exactly (the log-sum-exp is of the scaled logits, natural log).
"""

from __future__ import annotations

import math

import torch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Hq, D] and k, v [B, Hkv, S, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {k.shape[1]}")
    if lengths.shape != (b,):
        raise ValueError(f"expected lengths [{b}], got {tuple(lengths.shape)}")


def decode_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float32 softmax attention with keys at positions >= lengths[b] masked out."""
    _check(q, k, v, lengths)
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scale  # [B, Hkv, G, S]
    valid = torch.arange(s, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, S]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    probs = torch.exp(logits - lse[..., None])
    # Positions past a row's length were never written (the cache is allocated empty): zero them, since a
    # zero probability times a garbage NaN or Inf would still be NaN.
    values = v.float().masked_fill(~valid[:, None, :, None], 0.0)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values)
    return out.reshape(b, hq, d).to(q.dtype), lse.reshape(b, hq)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention; see the module docstring for shapes. Dispatches to the reference for now."""
    return decode_attention_ref(q, k, v, lengths, scale)
