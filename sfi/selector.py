"""The Selector: which context tokens each KV head keeps in its compact memory, from captured logits.

Pure torch, one sequence at a time, all KV heads together (shapes [..., H, R, N], H = KV heads; leading
dimensions, such as every layer of one refresh, are independent problems solved in one pass).
Every stage of ../shared/sfi-spec.md is a function so tests can check it alone; `select` chains them
and any stage but the first can be switched off for ablations. `select_topk` is the plain baseline.
Positions are relative to the selection domain [lo, hi) of the caller.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfi_kernels import kept_positions_ref

EPS = 1e-12
LOG_EPS = math.log(EPS)


@dataclass(frozen=True)
class SelectorParams:
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
    use_nms: bool = True
    use_exclusivity: bool = True

    @classmethod
    def from_config(cls, cfg: object) -> SelectorParams:
        """The Selector's constants from an SfiConfig (which holds them, with the spec's defaults, for recipes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def row_log_dist(z: torch.Tensor) -> torch.Tensor:
    """z [..., H, R, N] logits (-inf where a row cannot see) -> log p_r(k), each row normalised over its domain."""
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def valid_rows(logp: torch.Tensor) -> torch.Tensor:
    """[..., H, R] bool: rows with a non-empty domain."""
    return torch.isfinite(logp).any(dim=-1)


def power_mean(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log f [..., H, N]: normalised alpha-power mean of the rows' distributions (rows with no domain dropped)."""
    ok = valid_rows(logp)  # [..., H, R]
    n_rows = ok.sum(-1).clamp(min=1).to(logp.dtype)  # [..., H]
    scaled = torch.where(ok[..., None], alpha * logp, torch.full_like(logp, float("-inf")))
    log_f = (torch.logsumexp(scaled, dim=-2) - n_rows.log()[..., None]) / alpha
    return log_f - torch.logsumexp(log_f, dim=-1, keepdim=True)


def prior(key_norms: torch.Tensor, p: SelectorParams) -> torch.Tensor:
    """log r [..., H, N]: small-norm keys and older positions favoured, normalised over the domain."""
    n = key_norms.shape[-1]
    u = (torch.arange(n, dtype=torch.float32, device=key_norms.device) / max(n - 1, 1)).clamp(0, 1)
    log_pi = -p.gamma * key_norms.float().clamp(min=EPS).log()
    log_delta = -p.pos_beta * u.pow(max(p.pos_p, 1.0)) + p.pos_eta * (1 - u).clamp(min=EPS).log()
    log_r = p.w_l2 * log_pi + p.w_pos * log_delta
    return log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)


def mix_weight(log_f: torch.Tensor, log_r: torch.Tensor, lam_max: float) -> torch.Tensor:
    """lam [..., H]: the mixture (1 - lam) f + lam r of smallest squared norm, clamped to [0, lam_max]."""
    f, r = log_f.exp(), log_r.exp()
    ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
    lam = (ff - fr) / (ff - 2 * fr + rr).clamp(min=EPS)
    return lam.clamp(0.0, lam_max).clamp(max=1 - EPS)


def fuse(log_f: torch.Tensor, log_r: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """s = log((1 - lam) f + lam r), renormalised; computed in log space."""
    lam = lam[..., None]
    a = torch.log1p(-lam) + log_f
    b = torch.where(lam > 0, lam.clamp(min=EPS).log() + log_r, torch.full_like(log_r, -math.inf))
    s = torch.logaddexp(a, b)
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def soft_nms(s: torch.Tensor, radius: int, strength: float) -> torch.Tensor:
    """s' = s - strength * max(m - s, 0), m the max of s within +-radius positions: never raises a score."""
    flat = s.reshape(-1, 1, s.shape[-1])
    m = F.max_pool1d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius).reshape(s.shape)
    return s - strength * (m - s).clamp(min=0)


def exclusivity(s: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """Down-weight tokens several KV heads want: s + weight * log softmax_h(s / T). Skipped for H <= 2."""
    if s.shape[-2] <= 2:
        return s
    rho = torch.softmax(s / temperature, dim=-2)
    return s + weight * rho.clamp(min=EPS).log()


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
    flat = score.reshape(-1, score.shape[-2], n)  # [P, H, N]
    kth = torch.topk(flat, k, dim=-1, sorted=False).values.amin(dim=-1)
    return kept_positions_ref(flat, kth, k).long().reshape(*score.shape[:-1], k)


def scores(z: torch.Tensor, key_norms: torch.Tensor, p: SelectorParams) -> torch.Tensor:
    """The final per-position score s'' [..., H, N] from logits z [..., H, R, N] and key norms [..., H, N]."""
    z = z.float()
    logp = row_log_dist(z)
    log_f = power_mean(logp, p.alpha if p.use_power_mean else 1.0)
    s = log_f
    if p.use_prior:
        n_rows = int(valid_rows(logp).sum(-1).max())
        log_r = prior(key_norms, p)
        lam = mix_weight(log_f, log_r, p.lam_max_multi if n_rows > 1 else p.lam_max_single)
        s = fuse(log_f, log_r, lam)
    if p.use_nms:
        s = soft_nms(s, p.nms_radius, p.nms_strength)
    if p.use_exclusivity:
        s = exclusivity(s, p.excl_temperature, p.excl_weight)
    return s


def select(z: torch.Tensor, key_norms: torch.Tensor, k: int, p: SelectorParams) -> torch.Tensor:
    """SFI selection: [..., H, min(k, N)] domain positions per KV head."""
    return top_positions(scores(z, key_norms, p), k)


def select_topk(z: torch.Tensor, key_norms: torch.Tensor, k: int, p: SelectorParams) -> torch.Tensor:
    """Baseline: top-k of the rows' attention averaged over the group (no prior, NMS or exclusivity)."""
    logp = row_log_dist(z.float())
    return top_positions(power_mean(logp, 1.0), k)
