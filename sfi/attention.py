"""Attention dispatch for one layer of a decode step: dense rows, fast (sparse) rows, and captures.

Dense rows (the `dense` recipe, slow steps, contexts within budget) attend to their whole cache. Fast
rows attend to their compact memory and their recent span, two partial attentions merged exactly by
log-sum-exp. Slow rows also capture their query's logits over the selection domain and hand them to
the refresh (Selector + compaction) before the next layer runs; no other row reads that memory in
this step, so the write cannot race with a reader.
"""

from __future__ import annotations

import torch

from sfi_kernels import decode_attention, ranged_decode_attention

from .cache import KVCache


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Combine attentions over two disjoint key sets from their outputs [B, H, D] and lse [B, H]."""
    lse = torch.logaddexp(l1, l2)
    return (o1.float() * (l1 - lse).exp()[..., None] + o2.float() * (l2 - lse).exp()[..., None]).to(o1.dtype)


def _span(cache: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """cache [Bc, Hkv, S, D] -> [B, Hkv, width, D]: positions start[b] .. start[b] + width - 1 of each row."""
    pos = (start[:, None] + torch.arange(width, device=start.device)).clamp(max=cache.shape[2] - 1)  # [B, W]
    picked = cache[rows[:, None], :, pos]  # [B, W, Hkv, D]
    return picked.transpose(1, 2)


def capture_logits(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, R, D], keys [Hkv, N, D] -> scaled logits [Hq, R, N] (query head h reads KV head h // G)."""
    hq, hkv = q.shape[0], keys.shape[0]
    qg = q.float().reshape(hkv, hq // hkv * q.shape[1], q.shape[2])
    return (torch.bmm(qg, keys.float().transpose(1, 2)) * scale).reshape(hq, q.shape[1], keys.shape[1])


def decode(layer: int, q: torch.Tensor, cache: KVCache, step, scale: float) -> torch.Tensor:
    """q [B, Hq, D] for the rows of `step` (a model.DecodeStep) -> attention output [B, Hq, D]."""
    kc, vc = cache.k[layer], cache.v[layer]  # [Bc, Hkv, S, D]
    plan = step.sparse
    if q.is_cuda or step.fixed_ranges is not None:
        return _decode_ranged(layer, q, cache, step, scale)
    if plan is None:
        keys, values = kc[:, :, : step.kv_len], vc[:, :, : step.kv_len]
        if not step.whole_cache:
            keys, values = keys[step.rows], values[step.rows]
        return decode_attention(q, keys, values, step.positions + 1, scale)[0]

    out = torch.empty_like(q)
    if plan.dense_idx.numel():
        rows = step.rows[plan.dense_idx]
        keys, values = kc[rows, :, : step.kv_len], vc[rows, :, : step.kv_len]
        out[plan.dense_idx] = decode_attention(q[plan.dense_idx], keys, values, step.positions[plan.dense_idx] + 1,
                                               scale)[0]
    if plan.fast_idx.numel():
        rows, mem = step.rows[plan.fast_idx], plan.memory
        qf = q[plan.fast_idx]
        o1, l1 = decode_attention(qf, mem.k[layer, rows], mem.v[layer, rows], plan.compact_len, scale)
        span_len = step.positions[plan.fast_idx] + 1 - plan.recent_start
        o2, l2 = decode_attention(qf, _span(kc, rows, plan.recent_start, plan.span),
                                  _span(vc, rows, plan.recent_start, plan.span), span_len, scale)
        out[plan.fast_idx] = merge(o1, l1, o2, l2)
    for c in plan.captures:
        z = capture_logits(q[c.batch_index][:, None], kc[c.row, :, c.lo:c.hi], scale)  # [Hq, 1, N]
        plan.refresh(layer, c.row, z)
    return out


def _decode_ranged(layer: int, q: torch.Tensor, cache: KVCache, step, scale: float) -> torch.Tensor:
    """GPU path: every row in one ranged-kernel launch (dense rows read an empty compact range and their
    whole cache), then the slow rows' captures (in a static step: the in-step refresh, fed by the kernel)."""
    kc, vc = cache.k[layer], cache.v[layer]
    plan = step.sparse
    memory = step.memory if step.memory is not None else (plan.memory if plan is not None else None)
    mem_k, mem_v = (memory.k[layer], memory.v[layer]) if memory is not None else (kc, vc)
    rows, clen, start, span, max_keys = step.ranges
    refresh = step.refresh
    if refresh is not None:
        refresh.before_attention(layer)
    out, _ = ranged_decode_attention(q, kc, vc, mem_k, mem_v, rows, clen, start, span, scale, max_keys=max_keys,
                                     split=step.split, capture=refresh.capture(layer) if refresh is not None else None)
    if refresh is not None:
        refresh.after_attention(layer)  # after a group of layers: its Selector and compaction, on a side stream
    for c in plan.captures if plan is not None else ():
        z = capture_logits(q[c.batch_index][:, None], kc[c.row, :, c.lo:c.hi], scale)
        plan.refresh(layer, c.row, z)
    return out


def bootstrap(layer: int, q: torch.Tensor, cache: KVCache, end: int, capture, refresh, scale: float) -> None:
    """Prefill's last W queries (q [Hq, W, D], positions end - W .. end - 1) -> logits -> refresh.

    Each query sees only keys before its own position (a causal staircase over the domain).
    """
    w = q.shape[1]
    z = capture_logits(q, cache.k[layer, capture.row, :, capture.lo:capture.hi], scale)  # [Hq, W, N]
    qpos = torch.arange(end - w, end, device=q.device)[:, None]
    kpos = torch.arange(capture.lo, capture.hi, device=q.device)[None, :]
    refresh(layer, capture.row, z.masked_fill((kpos > qpos)[None], float("-inf")))
