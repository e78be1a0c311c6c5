"""The Selector: which context tokens each KV head keeps in its compact memory, from captured logits.

Pure torch, one sequence at a time, all KV heads together (shapes [..., H, R, N], H = KV heads; leading
dimensions, such as every layer of one refresh, are independent problems solved in one pass).
Every stage of ../shared/sfi-spec.md is a function of the fused kernel's reference (sfi_kernels.selector_scores),
so tests can check it alone and the CPU and GPU paths share one definition; `select` chains them, and any stage
but the first can be switched off for ablations. `select_topk` is the plain baseline.
Positions are relative to the selection domain [lo, hi) of the caller.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from sfi_kernels import kept_positions, kept_positions_ref, selector_scores, selector_scores_ref
from sfi_kernels.selector_scores import (  # noqa: F401  (the stages, re-exported for callers and tests)
    exclusivity,
    fuse,
    mix_weight,
    power_mean,
    prior,
    row_log_dist,
    scores,
    soft_nms,
    span_pool,
    valid_rows,
)


@dataclass(frozen=True)
class SelectorParams:
    """The Selector's constants; the defaults are SfiConfig's (ours: successors 8, soft NMS off). `SPEC` below
    is the paper's Selector."""

    alpha: float = 0.5
    gamma: float = 0.5
    w_l2: float = 1.0
    w_pos: float = 0.7
    pos_p: float = 1.8
    pos_eta: float = 0.4
    pos_beta: float = -math.log(0.6) / 0.9
    lam_max_multi: float = 0.25
    lam_max_single: float = 0.35
    nms_radius: int = 16
    nms_strength: float = 1.0
    excl_temperature: float = 2.0
    excl_weight: float = 0.85
    use_power_mean: bool = True
    use_prior: bool = True
    use_nms: bool = False
    use_exclusivity: bool = True
    span_successors: int = 8
    span_block: int = 1

    @classmethod
    def from_config(cls, cfg: object) -> SelectorParams:
        """The Selector's constants from an SfiConfig (which holds them, with the spec's defaults, for recipes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


SPEC = SelectorParams(use_nms=True, span_successors=0)


def top_positions(score: torch.Tensor, k: int) -> torch.Tensor:
    """[..., H, min(k, N)] positions of the k best scores per head, ties to the lower position, sorted ascending.

    The k-th best value from a top-k (no full sort), then every position above it and the lowest tied
    positions at it: exactly k per head, the same set a stable sort would pick. Shapes are static and
    nothing is read back to the host, so it can run inside a CUDA graph; positions scored -inf (outside
    a row's domain) come last."""
    n = score.shape[-1]
    k = min(k, n)
    if k == n:
        return torch.arange(n, device=score.device).expand(*score.shape[:-1], n)
    if k == 0:
        return torch.empty(*score.shape[:-1], 0, dtype=torch.long, device=score.device)
    flat = score.reshape(-1, score.shape[-2], n).contiguous()  # [P, H, N]
    top = torch.topk(flat, k, dim=-1, sorted=False).values
    kth = top.amin(dim=-1)
    n_above = (top > kth[..., None]).sum(dim=-1, dtype=torch.int32)  # counted over k values, not N positions
    kept = kept_positions if flat.is_cuda else kept_positions_ref  # the kernel on a GPU, its reference elsewhere
    return kept(flat, kth, k, n_above).long().reshape(*score.shape[:-1], k)


def select(z: torch.Tensor, key_norms: torch.Tensor, k: int, p: SelectorParams) -> torch.Tensor:
    """SFI selection: [..., H, min(k, N)] domain positions per KV head."""
    return top_positions(scores(z, key_norms, p), k)


def select_fused(z: torch.Tensor, key_norms: torch.Tensor, k: int, p: SelectorParams) -> torch.Tensor:
    """`select` through the fused Selector kernel (the decode refresh's, sfi_kernels.selector_scores) for logits in
    which every row sees the whole domain (no -inf), as that kernel assumes; on a CPU, the kernel's reference.
    `select_topk` is this with the kernel parameters of SfiRuntime.score_params. Same picks as `select` up to
    rounding: the prefill's bootstrap uses it on a GPU, where the reference's dozens of passes over
    [Hq, W, N] float32 logits per layer cost more than the prefill's attention."""
    *lead, h, r, n = z.shape
    # The kernels see a capacity rounded up to 16 positions (the rest is never read): Triton compiles a kernel
    # again for every new divisibility of its integer arguments, and prompt lengths would otherwise stall
    # one job in several for a compilation.
    cap = -(-n // 16) * 16
    z4 = z.new_empty(math.prod(lead), h, r, cap, dtype=torch.float32)
    z4[..., :n] = z.reshape(-1, h, r, n)
    norms = z4.new_empty(z4.shape[0], h, cap)
    norms[..., :n] = key_norms.reshape(-1, h, n)
    count = torch.full((z4.shape[0],), n, dtype=torch.int32, device=z.device)
    block = min(512, max(16, 4096 // (1 << (r - 1).bit_length())))  # a [rows, block] tile lives in registers
    score = selector_scores(z4, norms, count, p, block=block) if z.is_cuda else selector_scores_ref(z4, norms, count, p)
    return top_positions(score, min(k, n)).reshape(*lead, h, -1)  # -inf past n: never among the min(k, n) best


def select_topk(z: torch.Tensor, key_norms: torch.Tensor, k: int, p: SelectorParams) -> torch.Tensor:
    """Baseline: top-k of the rows' attention averaged over the group (no prior, NMS or exclusivity)."""
    logp = row_log_dist(z.float())
    return top_positions(power_mean(logp, 1.0), k)
