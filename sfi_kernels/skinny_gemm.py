"""Skinny GEMM for decode steps: y [M, N] = x [M, K] @ w [N, K]^T (+ bias [N]) for a handful of rows (M <= 16).

A decode step multiplies a few activation rows by every weight matrix once, so it is bound by streaming the
weights: each program owns BLOCK_N output columns (BLOCK_N rows of w, read once, contiguous along K) and, with
SPLIT_K > 1, one of SPLIT_K slices of K, so that narrow matrices (N = hidden size) still put enough programs
on the GPU. Split partials go to a float32 buffer [SPLIT_K, M, N] and a second launch adds them in a fixed
order: no atomics, so results do not depend on timing; with `partial`, that sum is left to the consumer (a
`SplitPartials`, which `add_rms_norm` adds in the same order: one launch fewer). Rows go through the tensor
cores padded to 16 (M >= 2) or, for one row, as plain multiply-adds. With `gated`, x is the gated MLP's
gate | up and the product's input SiLU(gate) * up, computed in the loads for one row. On Hopper and later GPUs
both launches take programmatic dependent launch (sfi_kernels/pdl.py).

`w` is an nn.Linear weight (row-major [N, K]); x [..., K] with prod(...) = M. float32 accumulation.
"""

from __future__ import annotations

import torch

from .fused import silu_mul
from .partials import SplitPartials
from .pdl import interpreting, pdl_kwargs, use_pdl

try:
    import triton
    import triton.language as tl

    from .pdl import pdl_wait
except ImportError:  # CPU installs without triton use the reference
    triton = None

MAX_ROWS = 16
# Each program loads its first weight tile before waiting for the previous kernel (with PDL: while that kernel still
# runs); False: after the wait, for an A/B.
PREFETCH_FIRST_TILE = True


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      gated: bool = False) -> torch.Tensor:
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    return torch.nn.functional.linear(x, w, bias)


if triton is not None:

    @triton.jit
    def _tile_product(acc, w, x_ptr, k, kmask, m, mmask, stride_xm, K, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                      GATED: tl.constexpr):
        """acc + the product of the rows' x at keys k with the weight tile w [BLOCK_N, BLOCK_K]."""
        x_at = x_ptr + m[:, None] * stride_xm + k[None, :]
        x = tl.load(x_at, mask=mmask[:, None] & kmask[None, :], other=0.0)  # [M_PAD, BLOCK_K]
        if GATED:  # x holds gate | up: SiLU(gate) * up, rounded as fused.silu_mul rounds
            up = tl.load(x_at + K, mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            g = x.to(tl.float32)
            x = ((g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32) * up).to(x.dtype)
        if USE_DOT and UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif USE_DOT:
            acc += tl.dot(x, tl.trans(w))
        else:  # M_PAD == 1
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                            K_SPLIT, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                            M_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                            PDL: tl.constexpr, GATED: tl.constexpr, PREFETCH: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, M_PAD)
        nmask = n < N
        mmask = m < M
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        w_at = w_ptr + n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
        if PREFETCH:
            # No kernel writes the weights: the first tile is loaded before the wait, while the previous kernel
            # still runs (sfi_kernels/pdl.py), and multiplied once x may be read.
            k = k_lo + tl.arange(0, BLOCK_K)
            kmask = k < k_hi
            w = tl.load(w_at + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            pdl_wait(PDL)
            acc = _tile_product(acc, w, x_ptr, k, kmask, m, mmask, stride_xm, K, USE_DOT, UPCAST, GATED)
            first = k_lo + BLOCK_K
        else:
            pdl_wait(PDL)
            first = k_lo
        for k0 in range(first, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_hi
            w = tl.load(w_at + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            acc = _tile_product(acc, w, x_ptr, k, kmask, m, mmask, stride_xm, K, USE_DOT, UPCAST, GATED)
        out_mask = mmask[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(part_ptr + (pid_k * M_PAD + m[:, None]) * N + n[None, :], acc, mask=out_mask)

    @triton.jit(do_not_specialize=["M"])
    def _split_sum_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        nmask = n < N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLIT_K):  # a fixed order: the same sum on every run
            acc += tl.load(part_ptr + (s * M_PAD + m) * N + n, mask=nmask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def default_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for a shape. From a sweep in CUDA graphs on an H200
    (bench/gpu_micro.py, bench/results/2026-12-01-h200-micro.json): 32 columns by 128 keys per step for several
    rows; narrow matrices with a long K (4096 and up) split it until there are about two programs per multiprocessor
    (a split K of 2560 measured slower than none). One row: 2 columns by 1024 keys, from the chain of a step's
    projections with PDL (bench/pdl_probe.py, 2026-12-03-h200-pdl-probe-2.json: 2.11 ms for 36 layers against
    2.70 with 4 columns and 2.40 for cuBLAS)."""
    block_n, block_k = (2, 1024) if m == 1 else (32, 128)
    programs = -(-n // block_n)
    split = 1
    while k >= 4096 and programs * split < 264 and k // (split * 2) >= 1024:
        split *= 2
    return block_n, block_k, split, 4, 3


def skinny_pays(m: int, n: int, k: int, pdl: bool = False) -> bool:
    """Whether the skinny kernel beats cuBLAS for this shape on an H200. Without PDL
    (bench/results/2026-12-01-h200-micro*.json): from 2 to 16 rows, when its default configuration puts at least
    two programs on each multiprocessor (so not for one row, nor for [6144, 2560] with its 192 programs). With PDL
    (sfi_kernels/pdl.py), for every shape up to 16 rows: a decode step's chain of kernels then overlaps each launch with
    the one before (bench/pdl_probe.py)."""
    if not 1 <= m <= MAX_ROWS or triton is None:
        return False
    if pdl:
        return True
    block_n, _, split, _, _ = default_config(m, n, k)
    return m >= 2 and -(-n // block_n) * split >= 264


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int, int, int] | None = None, pdl: bool | None = None,
                  gated: bool = False, partial: bool = False) -> torch.Tensor | SplitPartials:
    """x [..., K], w [N, K], bias [N] or None -> [..., N] in x's dtype; falls back to torch past 16 rows or off
    a GPU (see the module docstring). `config` = (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages). `pdl`
    (default: where the device has it, sfi_kernels/pdl.py): launched with programmatic dependent launch. `gated`: x is
    [..., 2K], gate | up, and the product is SiLU(gate) * up @ w^T (the gated MLP's down projection with the
    activation in its loads, rounded as `silu_mul` rounds). `partial`: where K is split, return the partials
    unsummed (`SplitPartials`) for a consumer that adds them (`add_rms_norm`); otherwise the product as usual."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1] * (2 if gated else 1):
        want = "[..., 2K] (gate | up)" if gated else "[..., K]"
        raise ValueError(f"expected x {want} and w [N, K], got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"expected bias [{w.shape[0]}], got {tuple(bias.shape)}")
    n, k = w.shape
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if triton is None or m > MAX_ROWS or m == 0 or not (x.is_cuda or interpreting()):
        return skinny_linear_ref(x, w, bias, gated)
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if w.stride(1) != 1:
        raise ValueError(f"w must be contiguous along K, got strides {w.stride()}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    block_n, block_k, split, warps, stages = config or default_config(m, n, k)
    m_pad = 1 if m == 1 else MAX_ROWS
    if gated and m_pad > 1:
        # On the tensor-core path the activation in the loads took 2x the time of its own launch (the x tiles then
        # feed arithmetic, not the product, and their loads are not pipelined: 3.51 against 1.64 ms for 36 MLPs at
        # 4 rows, bench/results/2026-12-03-h200-pdl-probe-2.json); one row's multiply-adds take it at no cost.
        x2, gated = silu_mul(x2), False
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)
    pdl = use_pdl(x) if pdl is None else pdl and use_pdl(x)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, m_pad, n, dtype=torch.float32, device=x.device) if split > 1 else y
    b = bias if bias is not None else w
    _skinny_gemm_kernel[(triton.cdiv(n, block_n), split)](
        x2, w, b, y, part, m, n, k, x2.stride(0), w.stride(0), y.stride(0), k_split,
        # The interpreter's bf16/fp16 products are wrong (Triton 3.9); it multiplies float32 tiles exactly.
        HAS_BIAS=bias is not None, USE_DOT=m_pad > 1, UPCAST=interpreting() or x.dtype == torch.float32,
        M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, GATED=gated,
        PREFETCH=PREFETCH_FIRST_TILE,
        num_warps=warps, num_stages=stages, **pdl_kwargs(pdl))
    if split > 1 and partial:
        return SplitPartials(part, bias, m, (*x.shape[:-1], n), x.dtype)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _split_sum_kernel[(m, triton.cdiv(n, block))](part, b, y, m, n, y.stride(0), HAS_BIAS=bias is not None,
                                                      M_PAD=m_pad, SPLIT_K=split, BLOCK=block, num_warps=4,
                                                      **pdl_kwargs(pdl))
    return y.view(*x.shape[:-1], n)
