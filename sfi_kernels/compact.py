"""Compaction writer: copy the sink rows and the Selector's picked rows of the main KV cache into the compact
memory, for many slots and both K and V in one launch (the refresh's write into `SparseMemory`).

Shapes: k_cache, v_cache [Bc, Hkv, S, D] (one layer of the main cache, views allowed); mem_k, mem_v
[Bc, Hkv, Cm, D] (one layer of the compact memory); rows, lo, count [P] int32 device tensors; picks
[P, Hkv, K] int32/int64, positions relative to lo[p], ascending per head, only the first count[p] of each head
valid (the rest is never read); optional cache_rows, base [P] int32: where slot p's row starts in the cache (a
pooled cache, sfi.cache; default rows and 0). For each slot p and head h, with r = rows[p], c = cache_rows[p]:
  mem[r, h, i]        = cache[c, h, base[p] + i]                         for i < sink
  mem[r, h, sink + j] = cache[c, h, base[p] + lo[p] + picks[p, h, j]]    for j < count[p]
for K and V alike; nothing else in the memory is written.

The launch is CUDA-graph capturable: its grid, (P * Hkv, cdiv(sink + K, BLOCK_ROWS)), depends only on the
shapes and `sink`, and nothing is read back to the host; count, lo and rows act inside the kernel through masks.
Preconditions not checked on the host (that would need a sync): rows distinct and in [0, Bm), count[p] <= K,
0 <= base[p] + lo[p] + picks[p, h, j] < S for the valid picks.
"""

from __future__ import annotations

import torch

from .pdl import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the reference
    triton = None


def compact_write_ref(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink: int,
                      cache_rows=None, base=None) -> None:
    """Torch gathers, one slot at a time (reads count/lo/rows on the host)."""
    _check(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink, cache_rows, base)
    d = k_cache.shape[-1]
    for p in range(rows.shape[0]):
        r, start, n = int(rows[p]), int(lo[p]), min(max(0, int(count[p])), picks.shape[2])
        c = int(cache_rows[p]) if cache_rows is not None else r
        b = int(base[p]) if base is not None else 0
        index = (picks[p, :, :n].long() + b + start)[..., None].expand(-1, -1, d)  # [Hkv, n, D]
        for src, dst in ((k_cache, mem_k), (v_cache, mem_v)):
            dst[r, :, :sink] = src[c, :, b:b + sink]
            dst[r, :, sink:sink + n] = src[c].gather(1, index)


if triton is not None:

    @triton.jit
    def _compact_write_kernel(
        kc_ptr, vc_ptr, mk_ptr, mv_ptr, rows_ptr, crows_ptr, base_ptr, lo_ptr, count_ptr, picks_ptr,
        stride_kcb, stride_kch, stride_kcs,
        stride_vcb, stride_vch, stride_vcs,
        stride_mkb, stride_mkh, stride_mks,
        stride_mvb, stride_mvh, stride_mvs,
        stride_pp, stride_ph, SINK, K,
        HKV: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        ph = tl.program_id(0)  # slot * HKV + head
        blk = tl.program_id(1)
        p = ph // HKV
        h = ph % HKV
        row = tl.load(rows_ptr + p).to(tl.int64)
        crow = tl.load(crows_ptr + p).to(tl.int64)
        first = tl.load(base_ptr + p).to(tl.int64)
        start = tl.load(lo_ptr + p).to(tl.int64)
        cnt = tl.load(count_ptr + p)

        i = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # destination rows of the compact run
        is_sink = i < SINK
        j = i - SINK  # pick index (negative in the sink)
        is_pick = (i >= SINK) & (j < K) & (j < cnt)
        # Only the valid picks are read: garbage past count never reaches an address.
        pick = tl.load(picks_ptr + p.to(tl.int64) * stride_pp + h.to(tl.int64) * stride_ph + j,
                       mask=is_pick, other=0).to(tl.int64)
        src = first + tl.where(is_sink, i.to(tl.int64), start + pick)  # source position in the cache
        live = is_sink | is_pick

        d = tl.arange(0, D_PAD)
        mask = live[:, None] & (d < D)[None, :]
        h64 = h.to(tl.int64)
        dst = i.to(tl.int64)
        k = tl.load(kc_ptr + (crow * stride_kcb + h64 * stride_kch + src * stride_kcs)[:, None] + d[None, :],
                    mask=mask)
        tl.store(mk_ptr + (row * stride_mkb + h64 * stride_mkh + dst * stride_mks)[:, None] + d[None, :], k,
                 mask=mask)
        v = tl.load(vc_ptr + (crow * stride_vcb + h64 * stride_vch + src * stride_vcs)[:, None] + d[None, :],
                    mask=mask)
        tl.store(mv_ptr + (row * stride_mvb + h64 * stride_mvh + dst * stride_mvs)[:, None] + d[None, :], v,
                 mask=mask)


_INDEX_DTYPES = (torch.int32, torch.int64)


def _check(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink: int, cache_rows=None, base=None) -> None:
    if k_cache.dim() != 4 or mem_k.dim() != 4:
        raise ValueError(f"expected caches [Bc, Hkv, S, D] and memories [Bc, Hkv, Cm, D]; got k_cache "
                         f"{tuple(k_cache.shape)}, mem_k {tuple(mem_k.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"expected v_cache {tuple(k_cache.shape)} (as k_cache), got {tuple(v_cache.shape)}")
    if mem_v.shape != mem_k.shape:
        raise ValueError(f"expected mem_v {tuple(mem_k.shape)} (as mem_k), got {tuple(mem_v.shape)}")
    bc, hkv, s, d = k_cache.shape
    if cache_rows is None and mem_k.shape[0] != bc:
        raise ValueError(f"expected memories [{bc}, {hkv}, Cm, {d}] (as the cache), got {tuple(mem_k.shape)}")
    if (mem_k.shape[1], mem_k.shape[3]) != (hkv, d):
        raise ValueError(f"expected memories [Bm, {hkv}, Cm, {d}] (as the cache), got {tuple(mem_k.shape)}")
    if len({k_cache.dtype, v_cache.dtype, mem_k.dtype, mem_v.dtype}) != 1:
        raise ValueError(f"expected one dtype for caches and memories, got {k_cache.dtype}, {v_cache.dtype}, "
                         f"{mem_k.dtype}, {mem_v.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"expected rows [P], got {tuple(rows.shape)}")
    n_slots = rows.shape[0]
    for name, t in (("lo", lo), ("count", count), ("cache_rows", cache_rows), ("base", base)):
        if t is not None and t.shape != (n_slots,):
            raise ValueError(f"expected {name} [{n_slots}], got {tuple(t.shape)}")
    if picks.dim() != 3 or picks.shape[:2] != (n_slots, hkv):
        raise ValueError(f"expected picks [{n_slots}, {hkv}, K], got {tuple(picks.shape)}")
    for name, t in (("rows", rows), ("lo", lo), ("count", count), ("picks", picks), ("cache_rows", cache_rows),
                    ("base", base)):
        if t is not None and t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"expected {name} int32 or int64, got {t.dtype}")
    if not 0 <= sink <= s:
        raise ValueError(f"expected 0 <= sink <= S = {s}, got sink {sink}")
    if sink + picks.shape[2] > mem_k.shape[2]:
        raise ValueError(f"expected sink + K <= Cm, got sink {sink} + K {picks.shape[2]} > Cm {mem_k.shape[2]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("mem_k", mem_k), ("mem_v", mem_v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dim, got strides {t.stride()}")


def compact_write(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink: int, cache_rows=None, base=None,
                  block_rows: int = 32, num_warps: int = 4) -> None:
    """See the module docstring. Writes mem_k and mem_v in place; one launch, no host reads."""
    if triton is None or not (k_cache.is_cuda or interpreting()):
        compact_write_ref(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink, cache_rows, base)
        return
    _check(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink, cache_rows, base)
    n_slots, hkv, k = picks.shape
    d = k_cache.shape[-1]
    if n_slots == 0 or sink + k == 0:
        return
    # Rare strided index tensors: a device copy, which keeps the launch capturable.
    cache_rows = rows if cache_rows is None else cache_rows
    base = torch.zeros_like(lo) if base is None else base
    rows, cache_rows, base, lo, count, picks = (t if t.stride(-1) == 1 else t.contiguous()
                                                for t in (rows, cache_rows, base, lo, count, picks))
    _compact_write_kernel[(n_slots * hkv, triton.cdiv(sink + k, block_rows))](
        k_cache, v_cache, mem_k, mem_v, rows, cache_rows, base, lo, count, picks,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        mem_k.stride(0), mem_k.stride(1), mem_k.stride(2),
        mem_v.stride(0), mem_v.stride(1), mem_v.stride(2),
        picks.stride(0), picks.stride(1), sink, k,
        HKV=hkv, D=d, D_PAD=triton.next_power_of_2(d), BLOCK_ROWS=block_rows,
        num_warps=num_warps,
    )
