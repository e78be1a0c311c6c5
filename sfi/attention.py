"""Attention of one layer of a decode step, and the bootstrap capture at the end of a prefill.

Dense rows (the `dense` recipe, slow steps, contexts within budget) attend to their whole cache; fast rows to their
compact memory and their recent span: one ranged-kernel launch for all of them, and one more for the slow rows of a
step that has some (their whole-cache split would give the fast rows hundreds of empty blocks). Slow rows' refresh
(Selector + compaction) writes only their own memory, which no row reads in the same step.
"""

from __future__ import annotations

import torch

from sfi_kernels import LogitCapture, ranged_decode_attention, ranged_decode_attention_ref

from .cache import KVCache


def capture_logits(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., Hq, R, D], keys [..., Hkv, N, D] -> float32 scaled logits [..., Hq, R, N] (query head h reads KV head
    h // G); leading dimensions (layers) are independent."""
    *lead, hq, r, d = q.shape
    hkv, n = keys.shape[-3], keys.shape[-2]
    qg = q.float().reshape(-1, hq // hkv * r, d)  # [(...) * Hkv, G * R, D]
    kt = keys.float().reshape(-1, n, d).transpose(1, 2)
    return (torch.bmm(qg, kt) * scale).reshape(*lead, hq, r, n)


def decode(layer: int, q: torch.Tensor, cache: KVCache, step, scale: float) -> torch.Tensor:
    """q [B, Hq, D] for the rows of `step` (a model.DecodeStep) -> attention output [B, Hq, D].

    One ranged-kernel launch (the kernel's reference on a CPU) for the step's slow rows, which come first, and one
    for the others, each with a split for its own ranges; a step without slow rows (or of slow rows alone) is one
    launch. A slow row's pass also leaves its domain's logits for the in-step refresh, which runs after each
    group of layers."""
    kc, vc = cache.k[layer], cache.v[layer]  # [Bc, Hkv, S, D]
    memory, refresh = step.memory, step.refresh
    mem_k, mem_v = (memory.k[layer], memory.v[layer]) if memory is not None else (kc, vc)
    dense = layer < step.dense_layers
    rows, clen, start, span, max_keys = step.dense_ranges if dense else step.ranges
    split = step.dense_split if dense else step.split
    if refresh is not None:
        refresh.before_attention(layer)
    capture = refresh.capture(layer) if refresh is not None else None
    f = 0 if dense else step.n_slow
    if f == 0:  # one launch for every row
        out, lse = _ranged(q, kc, vc, mem_k, mem_v, (rows, clen, start, span), scale, max_keys, split, capture)
    else:  # the slow rows (first) with a split for their whole caches, then the others with one for their short
        # ranges (a slow row's split would give every fast row hundreds of empty blocks), each launch writing its
        # rows of one output (no concatenation: two launches fewer per layer)
        meta = (rows, clen, start, span)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        slow_capture = capture and LogitCapture(capture.slot[:f], capture.lo[:f], capture.hi[:f], capture.z)
        _ranged(q[:f], kc, vc, mem_k, mem_v, [t[:f] for t in meta], scale, step.slow_keys, step.slow_split,
                slow_capture, (out[:f], lse[:f]))
        _ranged(q[f:], kc, vc, mem_k, mem_v, [t[f:] for t in meta], scale, max_keys, split, None, (out[f:], lse[f:]))
    if refresh is not None:
        refresh.after_attention(layer)  # after a group of layers: its Selector and compaction, on a side stream
    if step.probe is not None:
        base = step.base if step.base is not None else torch.zeros_like(start)
        whole = (torch.zeros_like(clen), base, (step.positions + 1).to(torch.int32))
        _, dense_lse = (ranged_decode_attention if q.is_cuda else ranged_decode_attention_ref)(
            q, kc, vc, kc, vc, rows, *whole, scale)
        fast_rows = (step.ranges[1] > 0) | (step.ranges[2] > 0)  # rows whose step is fast in the other layers
        step.probe.record(layer, fast_rows, lse, dense_lse)
    return out


def _ranged(q, kc, vc, mem_k, mem_v, meta, scale, max_keys, split, capture, out=None):
    """One launch of the ranged kernel on a GPU (its reference on a CPU) for the rows of `meta`, into `out` (output,
    lse) if given."""
    rows, clen, start, span = meta
    if q.is_cuda:
        # A captured (slow) launch takes tiles of 64 keys: on an H200, one row, 36 layers, 170 against 209 us per
        # layer at 128k and 55 against 68 at 32k (bench/results/2026-12-03-h200-micro-cap-nonorm.json).
        return ranged_decode_attention(q, kc, vc, mem_k, mem_v, rows, clen, start, span, scale, max_keys=max_keys,
                                       split=split, capture=capture, block_n=64 if capture is not None else 32,
                                       out=out)
    return ranged_decode_attention_ref(q, kc, vc, mem_k, mem_v, rows, clen, start, span, scale, capture, out)


BOOTSTRAP_BYTES = 1 << 30  # float32 logits and keys of the layers one bootstrap pass selects for


def bootstrap(queries: list[torch.Tensor], cache: KVCache, end: int, capture, refresh, scale: float) -> None:
    """A prefill's last W queries of every layer (queries[layer] [Hq, W, D], positions end - W .. end - 1) -> their
    logits over the domain [lo, hi) of the row -> refresh, as many layers per pass as fit BOOTSTRAP_BYTES: the
    Selector's launches are paid once per group of layers, not per layer (a short prompt suffix is otherwise
    bound by the host's launches). Each query sees only keys before its own position (a causal staircase)."""
    hq, w, d = queries[0].shape
    n, hkv = capture.hi - capture.lo, cache.k.shape[2]
    group = max(1, min(len(queries), BOOTSTRAP_BYTES // max(1, 4 * n * (hq * w + hkv * d))))
    for first in range(0, len(queries), group):
        layers = slice(first, min(first + group, len(queries)))
        base = cache.base[capture.row]
        keys = cache.k[layers, capture.row, :, base + capture.lo:base + capture.hi]  # [g, Hkv, N, D]
        z = capture_logits(torch.stack(queries[layers]), keys, scale)  # [g, Hq, W, N]
        if capture.hi > end - w + 1:  # some key lies after the first query (a recent span shorter than W)
            qpos = torch.arange(end - w, end, device=z.device)[:, None]
            kpos = torch.arange(capture.lo, capture.hi, device=z.device)[None, :]
            z = z.masked_fill(kpos > qpos, float("-inf"))
        refresh(layers, capture.row, z)
