"""Fused small kernels of the decode step, where launches (not bytes) cost the time.

- `rms_norm`: x [M, N] -> RMSNorm(x) * weight, computed as the model does (float32 statistics, the
  normalised row cast to x's dtype, then scaled by the weight in x's dtype).
- `add_rms_norm`: the residual add and the next RMSNorm in one pass: (h = x + r, RMSNorm(h) * weight),
  h rounded to x's dtype before its statistics, as the two separate ops round; r may also be a skinny
  product's split-K partials, which it adds first (the product's own split-sum launch saved).
- `silu_mul`: the gated MLP's SiLU(gate) * up from the fused gate|up projection [M, 2I] -> [M, I], with
  the rounding of `F.silu(gate) * up`.
- `decode_qkv`: B tokens, each with its own cache row and position (one per row in a decode step; a prefill
  chunk's tokens of one or several rows): from the fused QKV projection [B, (Hq + 2 Hkv) D], apply the
  optional per-head q/k RMSNorm (Qwen3) and the rotary embedding at each token's position, write K and V
  into the cache at (rows[b], write_at[b]) (default: positions[b]; a pooled cache's row starts elsewhere), and
  with `key_norms` [Bc, Hkv, S] float32 each written key's L2 norm beside it, and return q [B, Hq, D]. One
  launch instead of about twenty small ones per layer.

Each has a pure-torch reference with the same signature: the CPU path and the tests' ground truth. The
Triton versions round where the reference rounds (products and sums cast to the model dtype), so the
rotary part is exact; the norms differ only by float32 summation order.
"""

from __future__ import annotations

import torch

from .partials import SplitPartials
from .pdl import interpreting, pdl_kwargs, use_pdl

try:
    import triton
    import triton.language as tl

    from .pdl import pdl_wait
except ImportError:
    triton = None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, r: torch.Tensor | SplitPartials, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + (r.sum() if isinstance(r, SplitPartials) else r)
    return h, rms_norm_ref(h, weight, eps)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def decode_qkv_ref(qkv, q_norm, k_norm, eps, cos_table, sin_table, k_cache, v_cache, rows, positions,
                   n_heads: int, n_kv_heads: int, write_at: torch.Tensor | None = None,
                   key_norms: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    b, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(b, n_heads + 2 * n_kv_heads, d).split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    if q_norm is not None:
        q, k = rms_norm_ref(q, q_norm, eps), rms_norm_ref(k, k_norm, eps)
    cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # [B, 1, D]
    q, k = _rope_ref(q, cos, sin), _rope_ref(k, cos, sin)
    at = positions if write_at is None else write_at
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32) if key_norms is not None else None  # [B, Hkv]
    if k_cache.stride(0) == 0:  # every row is one pool (sfi.cache): write into it once
        k_cache[0][:, at], v_cache[0][:, at] = k.transpose(0, 1), v.transpose(0, 1)
        if key_norms is not None:
            key_norms[0][:, at] = norms.transpose(0, 1)
    else:
        k_cache[rows, :, at] = k
        v_cache[rows, :, at] = v
        if key_norms is not None:
            key_norms[rows, :, at] = norms
    return q if out is None else out.copy_(q)


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or interpreting())


if triton is not None:

    @triton.jit
    def _store_normed(x, w_ptr, y_ptr, cols, mask, N, eps):
        """RMSNorm(x) * w for one row, rounded as the model rounds: float32 statistics, the normalised row
        cast to x's dtype, then scaled by the weight."""
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        normed = (xf * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, (w * normed).to(x.dtype), mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        _store_normed(x, w_ptr, y_ptr + row * stride_y, cols, mask, N, eps)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, rb_ptr, w_ptr, h_ptr, y_ptr, stride_x, stride_r, stride_rs, stride_h,
                             stride_y, N, eps, BLOCK: tl.constexpr, R_SPLIT: tl.constexpr, R_BIAS: tl.constexpr,
                             PDL: tl.constexpr):
        pdl_wait(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if R_SPLIT == 0:
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        else:  # a product's split-K partials (partials.SplitPartials), added as its split sum adds them
            acc = tl.zeros([BLOCK], tl.float32)
            for s in tl.static_range(R_SPLIT):
                acc += tl.load(r_ptr + s * stride_rs + row * stride_r + cols, mask=mask, other=0.0)
            if R_BIAS:
                acc += tl.load(rb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            r = acc.to(x.dtype).to(tl.float32)
        h = (x.to(tl.float32) + r).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        _store_normed(h, w_ptr, y_ptr + row * stride_y, cols, mask, N, eps)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, stride_gu, stride_y, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(gu_ptr + row * stride_gu + N + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)

    @triton.jit
    def _head(x_ptr, w_ptr, cos_ptr, sin_ptr, eps, HAS_NORM: tl.constexpr, D: tl.constexpr):
        """One head of D values: optional RMSNorm, then the rotary embedding, in x's dtype."""
        d = tl.arange(0, D)
        half: tl.constexpr = D // 2
        partner = tl.where(d < half, d + half, d - half)
        x = tl.load(x_ptr + d)
        xp = tl.load(x_ptr + partner)
        dt = x.dtype
        if HAS_NORM:
            xf = x.to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
            w = tl.load(w_ptr + d).to(tl.float32)
            wp = tl.load(w_ptr + partner).to(tl.float32)
            x = (w * (xf * inv).to(dt).to(tl.float32)).to(dt)
            xp = (wp * (xp.to(tl.float32) * inv).to(dt).to(tl.float32)).to(dt)
        rot = tl.where(d < half, -xp.to(tl.float32), xp.to(tl.float32)).to(dt)
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.load(sin_ptr + d).to(tl.float32)
        a = (x.to(tl.float32) * cos).to(dt).to(tl.float32)
        b = (rot.to(tl.float32) * sin).to(dt).to(tl.float32)
        return (a + b).to(dt)

    @triton.jit
    def _decode_qkv_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, rows_ptr, pos_ptr, at_ptr, q_ptr,
                           l2_ptr, stride_qkv, stride_cb, stride_ch, stride_cs, stride_q, stride_lb, stride_lh, eps,
                           HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr,
                           HAS_L2: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        d = tl.arange(0, D)
        src = qkv_ptr + b * stride_qkv + h * D
        if h < HQ:
            out = _head(src, qn_ptr, cos_ptr + pos * D, sin_ptr + pos * D, eps, HAS_NORM, D)
            tl.store(q_ptr + b * stride_q + h * D + d, out)
        else:
            kh = h - HQ
            out = _head(src, kn_ptr, cos_ptr + pos * D, sin_ptr + pos * D, eps, HAS_NORM, D)
            row = tl.load(rows_ptr + b).to(tl.int64)
            at = tl.load(at_ptr + b).to(tl.int64)
            dst = row * stride_cb + kh * stride_ch + at * stride_cs + d
            tl.store(kc_ptr + dst, out)
            v = tl.load(qkv_ptr + b * stride_qkv + (HQ + HKV + kh) * D + d)
            tl.store(vc_ptr + dst, v)
            if HAS_L2:
                kf = out.to(tl.float32)
                tl.store(l2_ptr + row * stride_lb + kh * stride_lh + at, tl.sqrt(tl.sum(kf * kf, axis=0)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (see the module docstring)."""
    if not _use_triton(x):
        return rms_norm_ref(x, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, eps,
                                     BLOCK=triton.next_power_of_2(n), num_warps=8 if n > 2048 else 4,
                                     **pdl_kwargs(use_pdl(x)))
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor | SplitPartials, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, RMSNorm(x + r) * weight) over the last dim (see the module docstring). `r` may be a product's
    unsummed split-K partials (`partials.SplitPartials`): added here, in the split-sum kernel's order."""
    split = isinstance(r, SplitPartials)
    if tuple(x.shape) != tuple(r.shape) or x.dtype != r.dtype:
        raise ValueError(f"x and r must match: {tuple(x.shape)} {x.dtype} vs {tuple(r.shape)} {r.dtype}")
    if not _use_triton(x):
        return add_rms_norm_ref(x, r, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    if split:  # part [S, M_PAD, N], contiguous
        r2, bias, split_stride, parts = r.part, r.bias, r.part.stride(0), r.part.shape[0]
    else:
        r2, bias, split_stride, parts = r.reshape(-1, n).contiguous(), None, 0, 0
    h, y = torch.empty_like(x2), torch.empty_like(x2)
    _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight if bias is None else bias, weight, h, y, x2.stride(0),
                                         r2.stride(-2), split_stride, h.stride(0), y.stride(0), n, eps,
                                         BLOCK=triton.next_power_of_2(n), R_SPLIT=parts, R_BIAS=bias is not None,
                                         num_warps=8 if n > 2048 else 4, **pdl_kwargs(use_pdl(x)))
    return h.view(x.shape), y.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> SiLU(gate) * up [..., I] (see the module docstring)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"expected gate | up with an even last dim, got {tuple(gate_up.shape)}")
    if not _use_triton(gate_up):
        return silu_mul_ref(gate_up)
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n).contiguous()
    y = torch.empty(gu.shape[0], n, dtype=gu.dtype, device=gu.device)
    block = min(2048, triton.next_power_of_2(n))
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, y, gu.stride(0), y.stride(0), n, BLOCK=block,
                                                          num_warps=4, **pdl_kwargs(use_pdl(gu)))
    return y.view(*gate_up.shape[:-1], n)


def decode_qkv(qkv, q_norm, k_norm, eps, cos_table, sin_table, k_cache, v_cache, rows, positions,
               n_heads: int, n_kv_heads: int, write_at: torch.Tensor | None = None,
               key_norms: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. qkv [B, (Hq + 2 Hkv) D]; cos/sin tables [S, D]; caches [Bc, Hkv, S, D]
    (one layer), key_norms [Bc, Hkv, S] (unit stride along S); rows, positions, write_at [B] -> q [B, Hq, D]
    (written into `out` if given: [B, Hq, D], unit stride within a row)."""
    d = k_cache.shape[-1]
    if not _use_triton(qkv) or d & (d - 1) or qkv.stride(-1) != 1:
        return decode_qkv_ref(qkv, q_norm, k_norm, eps, cos_table, sin_table, k_cache, v_cache, rows, positions,
                              n_heads, n_kv_heads, write_at, key_norms, out)
    if key_norms is not None and (key_norms.dtype != torch.float32 or key_norms.stride(-1) != 1):
        raise ValueError(f"key_norms must be float32 with unit stride along positions, got {key_norms.dtype} "
                         f"strides {key_norms.stride()}")
    b = qkv.shape[0]
    q = torch.empty(b, n_heads, d, dtype=qkv.dtype, device=qkv.device) if out is None else out
    if q.shape != (b, n_heads, d) or q.stride(2) != 1 or q.stride(1) != d:
        raise ValueError(f"out must be [{b}, {n_heads}, {d}] with unit stride within a row, got {tuple(q.shape)} "
                         f"strides {q.stride()}")
    has_norm = q_norm is not None
    _decode_qkv_kernel[(b, n_heads + n_kv_heads)](
        qkv, q_norm if has_norm else qkv, k_norm if has_norm else qkv, cos_table, sin_table, k_cache, v_cache,
        rows, positions, positions if write_at is None else write_at, q, q if key_norms is None else key_norms,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q.stride(0),
        *((0, 0) if key_norms is None else (key_norms.stride(0), key_norms.stride(1))),
        eps, HQ=n_heads, HKV=n_kv_heads, D=d, HAS_NORM=has_norm, HAS_L2=key_norms is not None, num_warps=1,
        **pdl_kwargs(use_pdl(qkv)))
    return q
