"""SFI's per-row bookkeeping during a batch: which kind of step each row takes, when its memory is
refreshed, and what it cost. The model never sees this object, only the per-row key ranges it gives
the static decode step (sfi.engine.step) and the bootstrap refresh after a prefill.

Step kinds: "slow" (dense over the whole cache, then the Selector refreshes the row's memory), "fast"
(compact memory + recent span), "full" (the context still fits the budget sink + k_head + recent,
so the step attends to everything, exactly as dense; it counts as a fast step).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import SfiConfig
from .boundary import Boundary, BoundaryState
from .memory import SparseMemory
from .selector import SelectorParams, select, select_fused, select_topk

Refresh = Callable[[slice, int, torch.Tensor], None]  # (layers, cache row, logits [layers, Hq, R, N]) -> None


@dataclass
class Capture:
    """A refresh to perform while a row's dense attention runs: capture logits over [lo, hi), then select."""

    batch_index: int  # the row's index in the step's batch (decode) or query window size W (prefill)
    row: int  # cache row
    lo: int
    hi: int


@dataclass
class RowStats:
    slow: int = 0
    fast: int = 0
    slow_steps: list[int] = field(default_factory=list)  # step numbers of slow steps (0 = prefill)
    attended: float = 0  # KV positions read, summed over steps (averaged over layers)
    context: int = 0  # KV positions a dense step would have read
    fractions: list[float] = field(default_factory=list)
    slow_seconds: list[float] = field(default_factory=list)  # decode steps only
    all_seconds: float = 0.0
    sparse: int = 0  # fast steps that read less than the whole context
    longest: int = 0  # the largest context a step of the row saw


class SfiRuntime:
    def __init__(self, cfg: SfiConfig, boundary: Boundary, n_rows: int, kv_bytes_per_token: int) -> None:
        if not cfg.resolved:
            raise ValueError("the SFI budget must be resolved for the model first (SfiConfig.for_context)")
        self.cfg, self.boundary = cfg, boundary
        # Rows whose context fits this attend to everything; -1 sends every row through the memory.
        self.budget = cfg.sink + cfg.k_head + cfg.recent if cfg.dense_within_budget else -1
        self.kv_bytes_per_token = kv_bytes_per_token
        self.params = SelectorParams.from_config(cfg)
        self.selector = select if cfg.selector == "sfi" else select_topk
        # The same Selector as fused-kernel parameters (static decode steps): the top-k baseline is the
        # power mean of the rows' distributions at alpha 1 with every later stage off.
        self.score_params = self.params if cfg.selector == "sfi" else dataclasses.replace(
            self.params, use_power_mean=False, use_prior=False, use_nms=False, use_exclusivity=False,
            span_successors=0, span_block=1)
        # The bootstrap's last W prompt queries all see the whole domain [sink, T - recent) when recent >= W - 1:
        # then a GPU selects with the fused kernels (select_fused), which assume exactly that.
        self.rows_see_domain = cfg.recent + 1 >= cfg.bootstrap_window
        self.state = [BoundaryState() for _ in range(n_rows)]
        self.pending = [False] * n_rows
        self.has_memory = [False] * n_rows
        self.recent_start = [0] * n_rows
        self.compact_len = [0] * n_rows
        self.stats = [RowStats() for _ in range(n_rows)]
        self.memory: SparseMemory | None = None
        self.cache = None

    def needs_memory(self, max_tokens: Sequence[int]) -> bool:
        return any(n > self.budget for n in max_tokens)

    def reset(self, row: int) -> None:
        """Forget everything about `row`: a new sequence is admitted into its slot."""
        self.state[row] = BoundaryState()
        self.pending[row] = self.has_memory[row] = False
        self.recent_start[row] = self.compact_len[row] = 0
        self.stats[row] = RowStats()

    def attach(self, memory: SparseMemory | None, cache) -> None:
        self.memory, self.cache = memory, cache

    # -- refresh --------------------------------------------------------------------------------------
    def _domain(self, row: int, length: int) -> Capture:
        """The refresh domain of `row` whose cache holds `length` tokens (its recent span starts at hi)."""
        lo = min(self.cfg.sink, length)
        return Capture(0, row, lo, max(lo, length - self.cfg.recent))

    def _commit(self, capture: Capture) -> None:
        """Start the refresh `capture` names: fix the row's recent span and compact length."""
        row, lo, hi = capture.row, capture.lo, capture.hi
        self.recent_start[row] = hi
        self.compact_len[row] = lo + min(self.cfg.k_head, hi - lo)
        self.has_memory[row] = True

    def refresh(self, layer: int | slice, row: int, z: torch.Tensor) -> None:
        """Select from captured logits z [Hq, R, N] over the row's domain (or [L', Hq, R, N] for a slice of
        layers, selected in one pass) and rewrite its compact memory."""
        cache = self.cache
        hkv = cache.k.shape[2]
        hq, r, n = z.shape[-3:]
        lo = self.cfg.sink
        if n == 0:  # nothing between the sink and the recent span yet
            picks = torch.empty(*z.shape[:-3], hkv, 0, dtype=torch.long, device=z.device)
        else:
            zg = z.reshape(*z.shape[:-3], hkv, (hq // hkv) * r, n)  # query heads h*G..h*G+G-1 share KV head h
            at = cache.base[row] + lo
            norms = cache.kn[layer, row, :, at:at + n]  # [..., Hkv, N]
            if zg.is_cuda and self.rows_see_domain:
                picks = select_fused(zg, norms, self.cfg.k_head, self.score_params)
            else:
                picks = self.selector(zg, norms, self.cfg.k_head, self.params)
        self.memory.write(layer, row, cache, lo, picks)

    def bootstrap(self, row: int, prompt_len: int) -> Capture | None:
        """After prefill: refresh from the last W prompt queries if the prompt exceeds the budget."""
        self.stats[row].longest = prompt_len
        self.stats[row].slow += 1
        self.stats[row].slow_steps.append(0)
        self.stats[row].attended += prompt_len
        self.stats[row].context += prompt_len
        self.stats[row].fractions.append(1.0)
        if self.memory is None or prompt_len <= self.budget:
            return None
        capture = self._domain(row, prompt_len)
        self._commit(capture)
        capture.batch_index = min(self.cfg.bootstrap_window, prompt_len)
        return capture

    # -- per step -------------------------------------------------------------------------------------
    def plan(self, active: Sequence[int], lengths: Sequence[int],
             pending: Sequence[bool] | None = None) -> tuple[list[str], list[Capture]]:
        """Each active row's step kind, and a Capture (with its batch index) for every slow row, for rows whose
        cache holds lengths[row] tokens; nothing changes until `commit`. `pending` (per active row) stands in for
        what the rows' boundaries said (a step planned before its inputs are known)."""
        kinds, captures = [], []
        for i, row in enumerate(active):
            length = lengths[row] + 1  # this step's token is written before attention
            if length <= self.budget:
                kind = "full"
            elif (self.pending[row] if pending is None else pending[i]) or not self.has_memory[row]:
                kind = "slow"
                capture = self._domain(row, length)
                capture.batch_index = i
                captures.append(capture)
            else:
                kind = "fast"
            kinds.append(kind)
        return kinds, captures

    def commit(self, captures: Sequence[Capture]) -> None:
        """Start the planned slow rows' refreshes (their recent spans and compact lengths from this step on)."""
        for capture in captures:
            self._commit(capture)

    def guess_pending(self, row: int) -> bool:
        """What the row's boundary will most likely say of the token being sampled now (`Boundary.guess`, on a
        copy of the row's state)."""
        return self.boundary.guess(dataclasses.replace(self.state[row]))

    def ranges(self, active: Sequence[int], kinds: Sequence[str]) -> tuple[list[int], list[int]]:
        """Per row (compact length, first cache position read): fast rows read their memory and recent
        span, the others nothing of the memory and their whole cache."""
        fast = [kind == "fast" for kind in kinds]
        return ([self.compact_len[r] if f else 0 for r, f in zip(active, fast, strict=True)],
                [self.recent_start[r] if f else 0 for r, f in zip(active, fast, strict=True)])

    def record(self, active: Sequence[int], kinds: Sequence[str], lengths: Sequence[int], seconds: float,
               ranges: tuple[Sequence[int], Sequence[int]], numbers: Sequence[int]) -> None:
        """Account one finished step from its plan: lengths before it, its `ranges`, and the rows' step numbers
        (`state[row].step` before its token was observed). A pipelined decoder accounts a step after launching the
        next, whose refreshes and tokens have changed the rows' own state by then."""
        layers, dense = self.cache.k.shape[0], min(self.cfg.dense_layers, self.cache.k.shape[0])
        clen, start = ranges
        for i, (row, kind) in enumerate(zip(active, kinds, strict=True)):
            s, length = self.stats[row], lengths[row] + 1
            attended = length
            if kind == "fast":  # the memory and the recent span, but the whole cache in the dense layers
                sparse = clen[i] + length - start[i]
                attended = (dense * length + (layers - dense) * sparse) / layers
            s.attended += attended
            s.context += length
            s.longest = max(s.longest, length)
            s.sparse += kind == "fast"
            s.fractions.append(attended / length)
            s.all_seconds += seconds
            if kind == "slow":
                s.slow += 1
                s.slow_steps.append(numbers[i])
                s.slow_seconds.append(seconds)
            else:
                s.fast += 1

    def observe(self, row: int, token: int) -> None:
        self.pending[row] = self.boundary.observe(self.state[row], token)

    # -- reporting ------------------------------------------------------------------------------------
    def report(self, row: int) -> dict:
        s = self.stats[row]
        steps = s.slow + s.fast
        gaps = [b - a for a, b in zip(s.slow_steps, s.slow_steps[1:], strict=False)]
        decode_steps = steps - 1  # the first token came from the prefill
        estimate = None
        if s.slow_seconds and s.all_seconds > 0 and decode_steps > 0:
            # A slow step is a dense step plus a refresh, so its time prices (a little above) the dense
            # alternative; the row's measured decode time is the SFI side.
            estimate = round(decode_steps * statistics.median(s.slow_seconds) / s.all_seconds, 3)
        sparse = s.sparse > 0
        out = {"sparse": sparse} if sparse else {
            "sparse": False, "reason": f"context within budget ({s.longest:,} tokens <= sink + k_head + recent = "
                                       f"{self.budget:,}): every step attended to everything, as dense"}
        return out | {
            "slow_steps": s.slow, "fast_steps": s.fast,
            "mean_interval": round(statistics.mean(gaps), 2) if gaps else None,
            "attended_fraction": round(statistics.mean(s.fractions), 4) if s.fractions else None,
            "kv_bytes_read": round(s.attended * self.kv_bytes_per_token),
            "kv_bytes_dense": s.context * self.kv_bytes_per_token,
            "estimated_speedup": estimate if sparse else None,
        }
