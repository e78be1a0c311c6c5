"""Ranged decode attention: each row's keys are a compact range followed by a span of the main cache.

One kernel serves every kind of decode row, so only metadata changes between steps:
  fast row:   compact_len = sink + selected, span = [recent_start, length)
  dense row:  compact_len = 0,               span = [0, length)
Shapes: q [B, Hq, D]; k_cache, v_cache [Bc, Hkv, S, D]; compact_k, compact_v [Bc, Hkv, C, D];
rows, compact_len, span_start, span_len [B] int32 (rows index the cache batch). Returns
(out [B, Hq, D], lse [B, Hq]); lse is the natural-log log-sum-exp of the scaled logits.

With `capture` (a `LogitCapture`), rows given a slot also leave the Selector's logits from the same pass over
their keys: the scaled logits of their positions [lo, hi) of the main cache in z [S, Hq, C] (index = position -
lo), so a slow step reads K once. (The keys' norms are written with the keys, sfi.cache: computing them here,
even as the diagonal of K K^T on the tensor cores, cost a captured pass 2x an uncaptured one on an H200.)

The Triton kernel splits each row's keys into chunks (flash-decoding) so that a batch of one still fills
the GPU; partial results are merged with their log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .decode_attention import decode_attention_ref
from .pdl import interpreting, pdl_kwargs, use_pdl

try:
    import triton
    import triton.language as tl

    from .pdl import pdl_wait
except ImportError:  # CPU installs without triton use the reference
    triton = None


@dataclass(frozen=True)
class LogitCapture:
    """Per-row capture metadata for `ranged_decode_attention`: slot [B] int32 (-1: no capture), lo, hi [B]
    int32 (the row's domain in cache positions), and the output z [S, Hq, C] float32 (a view with unit stride
    along C; C >= hi - lo of every captured row)."""

    slot: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    z: torch.Tensor


def capture_ref(q: torch.Tensor, k_cache: torch.Tensor, rows: torch.Tensor, capture: LogitCapture,
                scale: float) -> None:
    """What the kernel writes for a capture, with torch (reads the metadata on the host)."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    for b, (slot, lo, hi) in enumerate(zip(*(t.tolist() for t in (capture.slot, capture.lo, capture.hi)),
                                           strict=True)):
        if slot < 0 or hi <= lo:
            continue
        keys = k_cache[int(rows[b]), :, lo:hi].float()  # [Hkv, N, D]
        qg = q[b].float().reshape(hkv, hq // hkv, -1)
        capture.z[slot, :, : hi - lo] = (torch.matmul(qg, keys.transpose(1, 2)) * scale).reshape(hq, hi - lo)


def _gather_keys(cache: torch.Tensor, compact: torch.Tensor, rows: torch.Tensor, compact_len: torch.Tensor,
                 span_start: torch.Tensor, span_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, L, D] keys (compact then span, zero-padded) and their count per row: the reference's input.
    Two slice copies per row (a CPU step's rows are few; an index gather over [B, L] costs far more)."""
    lengths = compact_len + span_len
    width = int(lengths.max()) if lengths.numel() else 0
    out = cache.new_zeros(len(rows), cache.shape[1], width, cache.shape[3])
    for b, (r, c, s, n) in enumerate(zip(*(t.tolist() for t in (rows, compact_len, span_start, span_len)),
                                         strict=True)):
        out[b, :, :c] = compact[r, :, :c]
        out[b, :, c:c + n] = cache[r, :, s:s + n]
    return out, lengths


def ranged_decode_attention_ref(q, k_cache, v_cache, compact_k, compact_v, rows, compact_len, span_start, span_len,
                                scale: float | None = None, capture: LogitCapture | None = None,
                                out: tuple[torch.Tensor, torch.Tensor] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, compact_len, span_start, span_len = (t.long() for t in (rows, compact_len, span_start, span_len))
    if capture is not None:
        capture_ref(q, k_cache, rows, capture, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    keys, lengths = _gather_keys(k_cache, compact_k, rows, compact_len, span_start, span_len)
    values, _ = _gather_keys(v_cache, compact_v, rows, compact_len, span_start, span_len)
    result = decode_attention_ref(q, keys, values, lengths, scale)
    if out is None:
        return result
    for dst, src in zip(out, result, strict=True):
        dst.copy_(src)
    return out


# Triton compiles a kernel again for every new combination of its integer arguments' "is 1" and "multiple of 16"
# properties. The split count and the capture buffers' capacity change with a step's shape, so each new CUDA-graph
# shape compiled new variants (0.3-3 s each on an H200, nearly all of a capture's cost); these arguments only
# offset addresses by whole rows, so they are left unspecialised and the variants stay few.
_VARYING = ["stride_pb", "stride_ph", "stride_zs", "stride_zh", "stride_ns", "stride_nh"]

if triton is not None:

    @triton.jit(do_not_specialize=_VARYING)
    def _ranged_decode_kernel(
        q_ptr, kc_ptr, vc_ptr, kk_ptr, vk_ptr, rows_ptr, clen_ptr, sstart_ptr, slen_ptr,
        part_o_ptr, part_lse_ptr,
        slot_ptr, cap_lo_ptr, cap_hi_ptr, z_ptr,
        stride_qb, stride_qh,
        stride_cb, stride_ch, stride_cs,
        stride_kb, stride_kh, stride_ks,
        stride_pb, stride_ph, stride_ps,
        stride_zs, stride_zh,
        scale, SPLIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, CAPTURE: tl.constexpr, NATIVE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        row = tl.load(rows_ptr + b)
        clen = tl.load(clen_ptr + b)
        sstart = tl.load(sstart_ptr + b)
        total = clen + tl.load(slen_ptr + b)
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, total)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        gmask = g < G
        # The group's query heads, padded to G_PAD >= 16 rows so both products run on tensor cores.
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=gmask[:, None],
                    other=0.0)  # [G_PAD, D]
        if not NATIVE:
            q = q.to(tl.float32)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        c_base = row.to(tl.int64) * stride_cb + h * stride_ch
        k_base = row.to(tl.int64) * stride_kb + h * stride_kh
        slot = -1
        cap_lo = 0
        cap_hi = 0
        if CAPTURE:
            slot = tl.load(slot_ptr + b)
            cap_lo = tl.load(cap_lo_ptr + b)
            cap_hi = tl.load(cap_hi_ptr + b)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            valid = j < hi
            in_c = valid & (j < clen)
            in_s = valid & (j >= clen)
            off_c = k_base + j.to(tl.int64)[:, None] * stride_ks + d[None, :]
            off_s = c_base + (sstart + j - clen).to(tl.int64)[:, None] * stride_cs + d[None, :]
            # Masked loads fetch nothing where masked, so each key is read once, from one of the two ranges.
            k = tl.load(kk_ptr + off_c, mask=in_c[:, None], other=0.0) + \
                tl.load(kc_ptr + off_s, mask=in_s[:, None], other=0.0)
            if NATIVE:  # bf16/fp16 tiles straight into the tensor cores, float32 accumulation
                s = tl.dot(q, tl.trans(k)) * scale  # [G_PAD, BLOCK_N]
            else:
                k = k.to(tl.float32)  # [BLOCK_N, D]
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if CAPTURE:  # noqa: SIM102 (a compile-time branch around a run-time one)
                if slot >= 0:
                    # The Selector's logits for this row's domain.
                    pos = sstart + j - clen
                    cmask = in_s & (pos >= cap_lo) & (pos < cap_hi)
                    rel = (pos - cap_lo).to(tl.int64)
                    z_off = slot.to(tl.int64) * stride_zs + (h * G + g).to(tl.int64)[:, None] * stride_zh + rel[None, :]
                    tl.store(z_ptr + z_off, s, mask=gmask[:, None] & cmask[None, :])
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(vk_ptr + off_c, mask=in_c[:, None], other=0.0) + \
                tl.load(vc_ptr + off_s, mask=in_s[:, None], other=0.0)
            if NATIVE:  # the probabilities rounded to the cache's type, as flash attention does
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        lse = tl.where(denom > 0, m + tl.log(tl.maximum(denom, 1e-30)), float("-inf"))
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        heads = h * G + g
        p_off = b * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_o_ptr + p_off[:, None] * D + d[None, :], out, mask=gmask[:, None])
        tl.store(part_lse_ptr + p_off, lse, mask=gmask)


    @triton.jit(do_not_specialize=["n_split"])
    def _merge_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, n_split, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        """One (row, head) and BLOCK_D of its D outputs: combine the splits' partial outputs by their log-sum-exp
        in one pass (a running maximum, earlier sums rescaled when it grows); empty splits carry -inf. Spreading
        D over programs and the single pass matter for one row's long launches: 32 programs each walking 256
        splits twice took 32 us per layer for a 128k slow row on an H200 (2026-12-03-h200-profile-slow-pdl.json)."""
        pdl_wait(PDL)
        bh = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = float("-inf")
        m_safe = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        denom = 0.0
        for start in range(0, n_split, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            smask = s < n_split
            lse = tl.load(part_lse_ptr + bh * n_split + s, mask=smask, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(lse, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # 0 while nothing has been seen (m = -inf)
            w = tl.exp(lse - m_safe)
            o = tl.load(part_o_ptr + (bh * n_split + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
            acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
            denom = denom * alpha + tl.sum(w, axis=0)
            m = m_new
        out = acc / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty))
        if tl.program_id(1) == 0:
            tl.store(lse_ptr + bh, tl.where(denom > 0, m_safe + tl.log(denom), float("-inf")))


def _check(q, k_cache, compact_k, rows) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or compact_k.dim() != 4:
        raise ValueError(f"expected q [B, Hq, D], caches [Bc, Hkv, S, D]; got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, compact {tuple(compact_k.shape)}")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not match k_cache {tuple(k_cache.shape)}")
    if rows.shape != (q.shape[0],):
        raise ValueError(f"expected rows [{q.shape[0]}], got {tuple(rows.shape)}")


def _check_capture(q: torch.Tensor, k_cache: torch.Tensor, c: LogitCapture) -> None:
    b, hq = q.shape[:2]
    for name in ("slot", "lo", "hi"):
        t = getattr(c, name)
        if t.shape != (b,) or t.dtype != torch.int32:
            raise ValueError(f"capture.{name}: expected int32 [{b}], got {t.dtype} {tuple(t.shape)}")
    if c.z.dim() != 3 or c.z.shape[1] != hq:
        raise ValueError(f"capture: expected z [S, {hq}, C] float32, got z {tuple(c.z.shape)}")
    if c.z.dtype != torch.float32 or c.z.stride(2) != 1:
        raise ValueError("capture: z must be float32 with unit stride along C")


def _check_out(q: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    o, lse = out
    b, hq, d = q.shape
    if o.shape != (b, hq, d) or o.dtype != q.dtype or not o.is_contiguous():
        raise ValueError(f"out: expected a contiguous {q.dtype} [{b}, {hq}, {d}], got {o.dtype} {tuple(o.shape)}")
    if lse.shape != (b, hq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 lse [{b}, {hq}], got {lse.dtype} {tuple(lse.shape)}")


def default_split(max_keys: int, row_heads: int = 8, cap: int = 512) -> int:
    """Keys per split for rows of up to `max_keys` keys and `row_heads` = rows x KV heads: the smallest power of
    two from 64 to `cap` that keeps the launch within about 640 programs. Short rows at small batches need short
    splits to fill the GPU (an SFI fast row of 2.4k keys at batch 1: 11 us per layer with 64, 18 us with 256);
    long or many rows, long splits. From a sweep in CUDA graphs on an H200 (bench/gpu_micro.py,
    bench/results/2026-12-01-h200-micro.json)."""
    split = 64
    while split < cap and -(-max_keys // split) * row_heads > 640:
        split *= 2
    return split


def ranged_decode_attention(q, k_cache, v_cache, compact_k, compact_v, rows, compact_len, span_start, span_len,
                            scale: float | None = None, max_keys: int | None = None,
                            split: int | None = None, block_n: int = 32, num_warps: int = 4,
                            num_stages: int | None = None, capture: LogitCapture | None = None,
                            native_tiles: bool = True, out: tuple[torch.Tensor, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. `max_keys` (host-side max of compact_len + span_len) avoids a device sync.
    `native_tiles` (bf16/fp16 on a GPU only): products on the cache's own type with float32 accumulation, the
    probabilities rounded to that type before the value product, instead of tiles upcast to float32; on an H200
    12-16% less time per layer at 8k-128k, batch 1-16, output 2.3e-3 apart
    (bench/results/2026-12-03-h200-micro.json). `num_stages` (the key tiles' software pipeline) by default 3 for a
    launch of several rows or of 1,024 programs and more, 2 for one row's shorter launches and for captures: in CUDA
    graphs on an H200 (bench/ab_stages.py, bench/results/2026-12-03-h200-ab-stages-2.json) 3 stages took 4-11% less
    time for dense rows at 8k x 16, 32k x 4, 128k x 1 and x 4 and fast rows at 32k x 4 and x 16, and 3-20% more for
    one row's launches at 8k and 32k and for a slow row's captured pass. `out`: (out [B, Hq, D], lse [B, Hq])
    tensors to write the results into (contiguous; e.g. rows of a larger batch's outputs), returned."""
    _check(q, k_cache, compact_k, rows)
    if out is not None:
        _check_out(q, out)
    if capture is not None:
        _check_capture(q, k_cache, capture)
    if triton is None or not (q.is_cuda or interpreting()):
        return ranged_decode_attention_ref(q, k_cache, v_cache, compact_k, compact_v, rows, compact_len,
                                           span_start, span_len, scale, capture, out)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if max_keys is None:
        max_keys = int((compact_len + span_len).max())
    split = split or default_split(max_keys, b * hkv)
    n_split = max(1, triton.cdiv(max_keys, split))
    if num_stages is None:
        num_stages = 3 if capture is None and (b > 1 or b * hkv * n_split >= 1024) else 2
    part_o = torch.empty(b, hq, n_split, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hq, n_split, dtype=torch.float32, device=q.device)
    for t in (k_cache, v_cache, compact_k, compact_v):
        if t.stride(3) != 1:
            raise ValueError("caches must be contiguous in the head dim")
    c = capture
    pdl = use_pdl(q)
    cap_args = (c.slot, c.lo, c.hi, c.z) if c is not None else (rows,) * 3 + (part_lse,)
    cap_strides = (c.z.stride(0), c.z.stride(1)) if c is not None else (0,) * 2
    _ranged_decode_kernel[(b, hkv, n_split)](
        q, k_cache, v_cache, compact_k, compact_v, rows, compact_len, span_start, span_len, part_o, part_lse,
        *cap_args,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        compact_k.stride(0), compact_k.stride(1), compact_k.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        *cap_strides,
        scale, SPLIT=split, G=g, G_PAD=max(triton.next_power_of_2(g), 16), D=d, BLOCK_N=block_n,
        CAPTURE=c is not None,
        # Triton's interpreter multiplies bf16 tiles wrongly (3.9: garbage), so native tiles are a GPU path.
        NATIVE=native_tiles and q.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
        # Tiles are upcast to float32: tf32 products are exact for bf16/fp16 values; float32 caches get
        # exact (ieee) products, since tf32 would round their mantissas.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
        **pdl_kwargs(pdl),
    )
    if out is None:
        out = (torch.empty(b, hq, d, dtype=q.dtype, device=q.device),
               torch.empty(b, hq, dtype=torch.float32, device=q.device))
    out, lse = out
    block_d = min(32, d)
    _merge_splits_kernel[(b * hq, triton.cdiv(d, block_d))](
        part_o, part_lse, out, lse, n_split, D=d, BLOCK_D=block_d, BLOCK_S=16 if n_split <= 16 else 64, num_warps=4,
        **pdl_kwargs(pdl))
    return out, lse
