"""Choosing the next token for each row of a batch: greedy, or temperature / top-k / top-p sampling.

Each row carries its own `RowSampler` (params plus a CPU `torch.Generator`), so a job's draws depend
only on its own logits and seed, never on which other rows share its batch or where it sits.
This module does not touch the logits' producer, stop conditions or the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# torch.Generator.manual_seed accepts seeds in [-2**63, 2**64); job seeds may be any Python int.
_SEED_SPACE = 1 << 64
# How many of the largest probabilities `_nucleus` sorts first; most nuclei fit, and a miss costs one widening.
_NUCLEUS_FIRST = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        # top_k == 1 keeps only the argmax, so it is greedy whatever the temperature; routing it to the
        # batched argmax spares a CPU copy of the row's logits.
        return self.temperature == 0 or self.top_k == 1


class RowSampler:
    """One row's sampling state: its params and its own torch.Generator (CPU), seeded from params.seed
    (or from a run-level seed mixed with the job id when seed is None, so reruns are reproducible)."""

    def __init__(self, params: SamplingParams, fallback_seed: int) -> None:
        self.params = params
        seed = fallback_seed if params.seed is None else params.seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed % _SEED_SPACE)

    @property
    def greedy(self) -> bool:
        return self.params.greedy


def sample(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Next token per row: logits [B, V] (any float dtype, any device) -> ids [B] int64 on logits.device."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [B={len(rows)}, V], got {list(logits.shape)}")
    # One argmax for the whole batch, in the logits' own dtype and device: the common all-greedy batch
    # allocates nothing else. torch.argmax returns the first maximal index, so ties go to the lowest id.
    tokens = logits.argmax(dim=-1)  # [B]
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if not sampled:
        return tokens
    # Sampled rows go to the CPU once, as float32; from here each row is handled on its own so its
    # distribution and draw cannot depend on its neighbours.
    picked = logits[sampled].float().cpu()  # [S, V]
    draws = [_draw(picked[j], rows[i].params, rows[i].generator) for j, i in enumerate(sampled)]
    index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    tokens[index] = torch.tensor(draws, dtype=tokens.dtype, device=logits.device)
    return tokens


def _draw(row: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row's logits [V] (float32, CPU): temperature, then top-k, then top-p, then a draw."""
    scaled = row / params.temperature  # [V]
    ids = None  # candidate ids into the vocabulary; None while every token is a candidate
    if 0 < params.top_k < scaled.numel():
        ids = _largest(scaled, params.top_k)  # [K]
    probs = torch.softmax(scaled if ids is None else scaled[ids], dim=-1)  # [K]
    if params.top_p < 1:
        probs, order = _nucleus(probs, params.top_p)  # [N]
        ids = order if ids is None else ids[order]
    # Inverse-CDF draw: exactly one uniform per step from the row's generator, and tokens with zero
    # probability (masked by -inf logits) can never be chosen since their cumulative mass does not grow.
    cdf = torch.cumsum(probs, dim=0)  # [N]
    u = torch.rand((), generator=generator, dtype=torch.float64).item() * cdf[-1].item()
    pos = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return pos if ids is None else int(ids[pos])


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of the largest probs [K] whose mass reaches top_p: (kept probs [N] descending, positions [N]).

    Sorting a whole vocabulary costs ~10 ms on a CPU, and a nucleus is usually far smaller, so this sorts only
    the `m` largest and widens `m` until their mass reaches top_p. Since `_largest` breaks ties by lowest id
    and the sort is stable, the result is what a full stable sort would give, whatever `m` it ends at.
    """
    m = min(_NUCLEUS_FIRST, probs.numel())
    while True:
        top = _largest(probs, m)  # [m] ascending
        kept, order = torch.sort(probs[top], descending=True, stable=True)  # [m]
        cdf = torch.cumsum(kept, dim=0)  # [m]
        if cdf[-1] >= top_p or m == probs.numel():
            break
        # Widen fast, and sort everything once a quarter of the vocabulary is in play: a flat distribution
        # should cost one full sort, not several near-full passes.
        m = m * 8 if m * 32 < probs.numel() else probs.numel()
    # Clamping keeps at least one token even when float rounding leaves the total just under top_p.
    n = min(int(torch.searchsorted(cdf, top_p)) + 1, m)
    return kept[:n], top[order[:n]]


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [k] (ascending) of the k largest values [V], ties at the cut going to the lowest positions."""
    if k >= values.numel():
        return torch.arange(values.numel())
    kth = torch.topk(values, k).values[-1]
    # torch.topk does not specify which of several equal values it keeps; choosing them ourselves makes
    # the candidate set (and so top_k=1 == greedy) deterministic.
    above = torch.nonzero(values > kth).flatten()
    tied = torch.nonzero(values == kth).flatten()[:k - len(above)]
    return torch.sort(torch.cat([above, tied])).values
