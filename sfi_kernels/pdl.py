"""Programmatic dependent launch (PDL) for the decode step's chain of kernels (compute capability 9.0 and up).

A decode step of a 36-layer model is about 430 kernels of a few microseconds each, and each kernel boundary costs
the GPU a few microseconds: the next grid's launch, its programs' first loads, the last programs' tail. Measured
on an H200 (bench/results/2026-12-03-h200-micro.json, 36 copies of a matrix product back to back in a CUDA graph,
one row): 3-5.5 us per product over what its bytes take at the lm head's 4.3 TB/s, ~0.6 ms of a 3.6 ms step.

With PDL a kernel launches while its predecessor still runs: its programs are resident when the predecessor ends,
and `pdl_wait` returns once the predecessor has completed and its writes are visible; the successor may launch in
turn. (Prefetching a matrix product's weights into L2 before the wait, 4-32 MB per launch, made the chain slower
in proportion to the amount on an H200: bench/results/2026-12-03-h200-pdl-probe-1.json; each program loading its
own first weight tile before the wait is kept: skinny_gemm.PREFETCH_FIRST_TILE.) Since every kernel
launched with PDL waits before it completes, a kernel's completion implies all earlier kernels' (so a kernel may
read what any earlier kernel wrote).

The rule for a kernel taking PDL: call `pdl_wait(PDL)` before its first load of anything a kernel writes and
before its first store. Kernels launched without PDL (torch's, cuBLAS's) keep plain stream order and need nothing.
Off under Triton's interpreter and before Hopper; `SFI_PDL=0` turns it off (for A/B measurements). `interpreting()`,
which every kernel module asks, lives here because PDL asks it first.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one without grid dependency control (before 3.4): no PDL
    gdc_wait = gdc_launch_dependents = None


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1: on a CPU, in the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL."""
    return (gdc_wait is not None and t.is_cuda and not interpreting() and os.environ.get("SFI_PDL", "1") != "0"
            and _capable(t.device.index if t.device.index is not None else torch.cuda.current_device()))


def pdl_kwargs(pdl: bool) -> dict:
    """A launch's keywords for a kernel taking `PDL: tl.constexpr`: the constexpr, and with it the launch option."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait for the previous kernel (complete, writes visible), then let the next one launch."""
        if PDL:  # only ever True where gdc_wait exists (use_pdl)
            gdc_wait()
            gdc_launch_dependents()
