"""Logits of one row's slow-step queries over its selection domain, and the domain's key norms, for every
layer at once, reading each key once in the cache dtype (the refresh's only pass over the full keys).

q [L, Hq, D]; k_cache [L, Bc, Hkv, S, D]; the domain is positions [lo, hi) of cache row `row`. Returns
z [L, Hkv, G, N] float32 (scaled logits; query head h reads KV head h // G) and norms [L, Hkv, N]
float32 (L2 norm of each key), N = hi - lo.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def domain_logits_ref(q: torch.Tensor, k_cache: torch.Tensor, row: int, lo: int, hi: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_layers, hq, d = q.shape
    hkv = k_cache.shape[2]
    keys = k_cache[:, row, :, lo:hi].float()  # [L, Hkv, N, D]
    qg = q.float().reshape(n_layers, hkv, hq // hkv, d)
    return torch.matmul(qg, keys.transpose(-1, -2)) * scale, keys.norm(dim=-1)


if triton is not None:

    @triton.jit
    def _domain_logits_kernel(q_ptr, k_ptr, z_ptr, n_ptr, lo, N, scale,
                              stride_ql, stride_qh, stride_kl, stride_kh, stride_ks,
                              HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        lh = tl.program_id(0)  # layer * HKV + head
        blk = tl.program_id(1)
        layer = lh // HKV
        head = lh % HKV
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        gmask = g < G
        q = tl.load(q_ptr + layer * stride_ql + (head * G + g)[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None], other=0.0).to(tl.float32)  # [G_PAD, D]
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        jmask = j < N
        k = tl.load(k_ptr + layer.to(tl.int64) * stride_kl + head * stride_kh
                    + (lo + j).to(tl.int64)[:, None] * stride_ks + d[None, :],
                    mask=jmask[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, D]
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
        z_off = (lh.to(tl.int64) * G + g)[:, None] * N + j[None, :]
        tl.store(z_ptr + z_off, z, mask=gmask[:, None] & jmask[None, :])
        tl.store(n_ptr + lh.to(tl.int64) * N + j, tl.sqrt(tl.sum(k * k, axis=1)), mask=jmask)


def domain_logits(q: torch.Tensor, k_cache: torch.Tensor, row: int, lo: int, hi: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    import os

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (q.is_cuda or interpreting) or hi <= lo:
        return domain_logits_ref(q, k_cache, row, lo, hi, scale)
    n_layers, hq, d = q.shape
    hkv = k_cache.shape[2]
    g, n = hq // hkv, hi - lo
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and k_cache must be contiguous in the head dim")
    z = torch.empty(n_layers, hkv, g, n, dtype=torch.float32, device=q.device)
    norms = torch.empty(n_layers, hkv, n, dtype=torch.float32, device=q.device)
    kc = k_cache[:, row]  # [L, Hkv, S, D] view
    block_n = 64
    _domain_logits_kernel[(n_layers * hkv, triton.cdiv(n, block_n))](
        q, kc, z, norms, lo, n, scale, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        HKV=hkv, G=g, G_PAD=max(triton.next_power_of_2(g), 16), D=d, BLOCK_N=block_n,
        # bf16/fp16 values are exact in tf32, so their products are exact; float32 needs ieee.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return z, norms
