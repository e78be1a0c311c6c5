"""L2 prefetch of a tensor's bytes: one `prefetch.global.L2` per 128-byte line, nothing loaded into registers.

A decode step streams each weight matrix once; between the QKV product and the output projection it runs
latency-bound kernels (q/k norms and rotary, attention over a few thousand keys, the split merge) during which
HBM mostly idles. Issued on a side stream there, a prefetch of the output projection's weights lets that product
read them from L2 (sfi.model.L2_PREFETCH). A hint only: nothing is written, so no result depends on it. A GPU
with compute capability 8.0 or later; a no-op elsewhere (and under Triton's interpreter, which runs no PTX).
"""

from __future__ import annotations

import torch

from .pdl import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton
    triton = None

LINE = 128  # bytes per prefetch (an L2 line)
LINES_PER_PROGRAM = 1024

if triton is not None:

    @triton.jit
    def _l2_prefetch_kernel(ptr, n_lines, LINE: tl.constexpr, LINES: tl.constexpr):
        i = tl.minimum(tl.program_id(0) * LINES + tl.arange(0, LINES), n_lines - 1)  # past the end: the last line
        # Not pure: the prefetch is the instruction's whole point, and its dummy result is never read.
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptr + i.to(tl.int64) * LINE],
                                  dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor) -> bool:
    """Ask the GPU to bring a contiguous tensor's bytes into L2; True if a prefetch was launched."""
    if triton is None or not t.is_cuda or interpreting() or t.numel() == 0:
        return False
    if not t.is_contiguous():
        raise ValueError(f"l2_prefetch: expected a contiguous tensor, got strides {t.stride()}")
    n_lines = -(-t.numel() * t.element_size() // LINE)
    _l2_prefetch_kernel[(triton.cdiv(n_lines, LINES_PER_PROGRAM),)](
        t.view(-1).view(torch.uint8), n_lines, LINE=LINE, LINES=LINES_PER_PROGRAM, num_warps=4)
    return True
