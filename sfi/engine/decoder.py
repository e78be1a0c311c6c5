"""The decode loop over a fixed set of cache rows ("slots"): requests are admitted into free slots at any step,
their prompts are prefilled a chunk at a time between decode steps, and every decode step advances all rows
that are decoding. `Decoder` is the state; `generate` runs one batch to its end (eval, bench, tests).

Each admitted row is independent of its neighbours: its SFI state is reset on admission, its sampler is its
own, and its cache row is its own. A row whose prompt shares a prefix with a row still in its slot copies that
prefix's K/V instead of computing it (`Request.reuse`). Events (`PrefillDone`, `StepDone`) report what each
call did, so progress, timing and reports need no hooks in the loop. With CUDA graphs the steps are pipelined: a
call launches the next step before it returns the last one's event (see `Decoder.step`), and the caller's work in
between (results, admissions) runs while the device decodes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVCache
from ..method.memory import SparseMemory
from ..method.runtime import Capture, SfiRuntime
from ..model import PrefillStep, Transformer
from ..sampling import RowSampler, sample
from ..stopping import StopChecker
from .step import Prepared, StaticDecoder

# Whether decoders pipeline their steps by default (with CUDA graphs); False: one step at a time, for an A/B.
PIPELINE = True


@dataclass
class Request:
    """One job as the loop sees it: its prompt, how to sample, when to stop."""

    prompt_ids: list[int]
    sampler: RowSampler
    stopper: StopChecker
    forced: Sequence[int] | None = None  # fed before its own samples (teacher forcing); log p reported
    reuse: tuple[int, int] | None = None  # (slot, n): copy the first n cache positions from that slot's row


@dataclass
class Prefilled:
    """A row already prefilled (by `prefill_capture`): its last logits and, per layer, the last W
    queries' logits over every prompt position, from which any recipe's bootstrap can be cut."""

    logits: torch.Tensor  # [V]
    window_logits: list[torch.Tensor]  # per layer [Hq, W, T], -inf where a query cannot see


@dataclass
class PrefillDone:
    row: int
    started: float  # perf_counter at the row's admission
    seconds: float  # time spent in the row's own prefill chunks
    finished: bool  # the first token already ended the row (eos, or max_new_tokens == 1)
    logprob: float | None = None  # with forced tokens: log p of the first token
    sampled: int | None = None  # with forced tokens: what the sampler picked instead
    computed: int = 0  # prompt tokens this row's prefill computed
    reused: int = 0  # prompt tokens copied from another row (a shared prefix)


@dataclass
class StepDone:
    step: int
    rows: list[int]  # rows that took this step
    tokens: list[int]  # the token each of them got
    finished: list[int]  # rows that stopped at this step
    seconds: float
    kinds: list[str] | None = None  # per row: "slow", "fast" or "full" (None: every row dense)
    logprobs: list[float] | None = None  # with forced tokens: log p of each row's token
    captured_graph: bool = False  # this step included capturing a CUDA graph (one-time cost)
    sampled: list[int] | None = None  # with forced tokens: what the sampler picked (greedy: the argmax)
    gpu_seconds: float | None = None  # with `time_gpu`: the device's time for the step's forward


def chunk_starts(length: int, chunk: int, last_at_least: int = 1, first: int = 0) -> list[int]:
    """Start positions of prefill chunks of [first, length); the last chunk holds at least `last_at_least` tokens
    (the bootstrap window must lie in one chunk). After a reused prefix (first not a multiple of `chunk`) the first
    chunk runs to the next multiple, so that the later ones start where every prompt's do: on a GPU their attention
    then has shapes cuDNN already has plans for (sfi.model.prefill_attention)."""
    starts = [first] + list(range(first // chunk * chunk + chunk, length, chunk))
    if len(starts) > 1 and length - starts[-1] < last_at_least:
        starts.pop()
    return starts


def prefill_row(model: Transformer, cache: KVCache, row: int, ids: torch.Tensor, chunk: int,
                bootstrap: Capture | None = None, refresh=None) -> torch.Tensor:
    """Fill cache row `row` with the prompt `ids` [T], `chunk` tokens at a time; return last logits [V].

    On a GPU the prompt goes layer by layer with one fused attention pass per layer (see
    `Transformer.prefill_layer_major`); on a CPU, chunk by chunk through all layers."""
    if ids.is_cuda and len(ids) > chunk:
        logits = _layer_major_prefill(model, cache, row, ids, chunk, bootstrap, refresh)
        if logits is not None:
            return logits
    logits = None
    for start, end, last in _chunks(len(ids), chunk, bootstrap):
        step = PrefillStep(row, start, end - start, bootstrap if last else None, refresh if last else None)
        logits = model.prefill(ids[start:end], cache, step)
    assert logits is not None, "empty prompt"
    return logits


def _chunks(length: int, chunk: int, bootstrap: Capture | None, first: int = 0) -> list[tuple[int, int, bool]]:
    starts = chunk_starts(length, chunk, bootstrap.batch_index if bootstrap else 1, first)
    ends = starts[1:] + [length]
    return [(s, e, e == length) for s, e in zip(starts, ends, strict=True)]


def _layer_major_prefill(model, cache, row, ids, chunk, bootstrap, refresh) -> torch.Tensor | None:
    """The layer-major prefill where a fused attention kernel serves it; None if none does (SDPA would fall
    back to materialising [T, T] scores), and the caller prefills chunk by chunk instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if getattr(model, "flash_prefill_failed", False):
        return None
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return model.prefill_layer_major(ids, cache, row, chunk, bootstrap, refresh)
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
        model.flash_prefill_failed = True  # fails at the first layer's attention, before any refresh
        return None


def cache_positions(request: Request) -> int:
    """Cache positions a request needs: the last sampled token is never written back."""
    return len(request.prompt_ids) + request.stopper.max_new_tokens - 1


def cache_length(requests: Sequence[Request]) -> int:
    """Cache positions a batch of rows needs: its longest request's."""
    return max(cache_positions(r) for r in requests)


def prefill_capture(model: Transformer, cache: KVCache, row: int, ids: Sequence[int], chunk: int,
                    window: int) -> Prefilled:
    """Prefill one row and keep what every recipe's bootstrap needs (see `Prefilled`)."""
    captured: list[torch.Tensor] = []
    capture = Capture(min(window, len(ids)), row, 0, len(ids))
    logits = prefill_row(model, cache, row, torch.tensor(list(ids), device=model.device), chunk, capture,
                         lambda layers, r, z: captured.extend(z.unbind(0)))  # z [layers, Hq, W, T]
    return Prefilled(logits, captured)


@dataclass
class _Prefill:
    """A row's prompt still being prefilled: the chunks left, and where its bootstrap capture goes."""

    row: int
    ids: torch.Tensor  # [T] on the device
    chunks: deque[tuple[int, int, bool]]
    bootstrap: Capture | None
    started: float
    seconds: float = 0.0
    reused: int = 0
    waits_for: tuple[int, int, _Row] | None = None  # copy n positions from the row in that slot once it has them
    prefilled: Prefilled | None = None


@dataclass
class _Row:
    request: Request
    length: int = 0  # tokens in the cache row
    last: int = 0  # the token to feed next
    progress: int = 0  # prompt tokens in the cache so far (prefill)
    decoding: bool = False
    events: list = field(default_factory=list)


class Decoder:
    """Continuous decoding over `slots` rows of one KV cache, allocated once: `max_len` positions per row, or a
    `cache` given (a pool whose segments the admitted rows take and give back, sfi.cache)."""

    def __init__(self, model: Transformer, slots: int, max_len: int, runtime: SfiRuntime | None = None,
                 prefill_chunk: int = 2048, cuda_graphs: bool = True, probe=None, cache: KVCache | None = None,
                 pipeline: bool | None = None) -> None:
        self.model, self.runtime, self.chunk, self.probe = model, runtime, prefill_chunk, probe
        self.cache = cache or model.new_cache(slots, max_len)
        if not self.cache.is_pool:
            max_len = self.cache.max_len
        memory = None
        if runtime is not None:
            if runtime.needs_memory([max_len]):
                a, cfg = model.args, runtime.cfg
                memory = SparseMemory(a.n_layers, self.cache.batch, a.n_kv_heads, cfg.sink, cfg.k_head, a.head_dim,
                                      model.dtype, model.device)
            runtime.attach(memory, self.cache)
        self.static = StaticDecoder(model, self.cache, memory, cuda_graphs and probe is None,
                                    runtime.score_params if runtime else None,
                                    runtime.cfg.dense_layers if runtime else 0, longest=max_len)
        self.rows: dict[int, _Row] = {}
        self.prefills: deque[_Prefill] = deque()
        self.steps = 0
        # Launch each step before the last one's bookkeeping (see `step`); by default where steps are graphs.
        self.pipeline = self.static.graphs and PIPELINE if pipeline is None else pipeline
        self._flight: _Flight | None = None  # the step launched and not yet read
        self._error: Exception | None = None  # a launch's failure, raised by the next step()
        self.planned_ahead = self.replanned = 0  # pipelined launches from their guess, and planned again

    # -- admission ------------------------------------------------------------------------------------
    @property
    def free(self) -> list[int]:
        return [s for s in range(self.cache.batch) if s not in self.rows]

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    @property
    def decoding(self) -> bool:
        """Whether some row is past its prefill (a long prefill now would stall it)."""
        return any(r.decoding for r in self.rows.values())

    def _leave(self, slot: int) -> None:
        del self.rows[slot]
        self.cache.release(slot)

    def progress(self, slot: int) -> int:
        """Prompt positions of `slot`'s row already in the cache (for a follower waiting on its prefix)."""
        row = self.rows.get(slot)
        return row.progress if row is not None else 0

    def admit(self, slot: int, request: Request, prefilled: Prefilled | None = None) -> None:
        """Start `request` in free slot `slot`: reset its SFI state and queue its prefill."""
        if slot in self.rows:
            raise ValueError(f"slot {slot} is busy")
        n = len(request.prompt_ids)
        if request.reuse is not None and request.reuse[1] > n - 1:
            raise ValueError(f"a request cannot copy {request.reuse[1]} of its {n} prompt tokens (its last one is "
                             "its own)")
        if not self.cache.fits(cache_positions(request)):
            room = f"a pool of {self.cache.max_len - 1}" if self.cache.is_pool else f"rows of {self.cache.max_len}"
            raise ValueError(f"a request of {n} + {request.stopper.max_new_tokens} tokens does not fit the cache "
                             f"({room} positions)")
        self.cache.place(slot, cache_positions(request))
        self.rows[slot] = _Row(request)
        if self.runtime is not None:
            self.runtime.reset(slot)
        boot = self.runtime.bootstrap(slot, n) if self.runtime is not None else None
        reused = request.reuse[1] if request.reuse is not None else 0
        ids = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.model.device)
        # The source is remembered by its row, not its slot: a slot freed meanwhile may hold another prompt.
        source = (*request.reuse, self.rows.get(request.reuse[0])) if request.reuse is not None else None
        self.prefills.append(_Prefill(slot, ids, deque(_chunks(n, self.chunk, boot, reused)), boot,
                                      time.perf_counter(), reused=reused, waits_for=source, prefilled=prefilled))

    # -- prefill --------------------------------------------------------------------------------------
    def prefill(self, budget: int | None = None) -> list[PrefillDone]:
        """Prefill queued prompts in admission order, up to `budget` tokens (None: all of them). A long prompt
        prefilled whole in one call goes through `prefill_row` (layer by layer on a GPU); the others a chunk per
        forward, prompts whose last chunks fit one chunk's tokens together in the same forward."""
        done: list[PrefillDone] = []
        spent = 0
        waiting: list[_Prefill] = []  # followers whose prefix is not in their source row yet
        if self.prefills:
            self._land()
        while self.prefills and (budget is None or spent < budget):
            p = self.prefills.popleft()
            if p.waits_for is not None and not self._copy_prefix(p):
                waiting.append(p)
                continue
            started = time.perf_counter()
            if p.prefilled is not None or (budget is None and p.reused == 0 and len(p.ids) > self.chunk):
                if p.prefilled is not None:
                    logits = self._from_prefilled(p)
                else:  # a long prompt alone, nothing else running: layer by layer on a GPU
                    logits = prefill_row(self.model, self.cache, p.row, p.ids, self.chunk, p.bootstrap,
                                         self._refresh())
                    spent += len(p.ids)
                p.chunks.clear()
                self.rows[p.row].progress = len(p.ids)  # its followers may copy their prefix now
                _settle(logits)
                p.seconds += time.perf_counter() - started
                done.append(self._first_token(p, logits))
                continue
            # The next chunk of this prompt, and with its last chunk the last (or only) chunks of the prompts queued
            # behind it, as many as fit one chunk's tokens: one forward for all of them (sfi.model.prefill_rows).
            n = p.chunks[0][1] - p.chunks[0][0]
            room = self.chunk if budget is None else min(self.chunk, budget - spent)
            batch = [p] + (self._companions(room - n) if len(p.chunks) == 1 else [])
            spans = [q.chunks.popleft() for q in batch]
            steps = [PrefillStep(q.row, a, b - a, q.bootstrap if last else None, self._refresh() if last else None)
                     for q, (a, b, last) in zip(batch, spans, strict=True)]
            logits = self.model.prefill_rows([q.ids[a:b] for q, (a, b, _) in zip(batch, spans, strict=True)],
                                             self.cache, steps)
            _settle(logits)
            elapsed, tokens = time.perf_counter() - started, sum(b - a for a, b, _ in spans)
            spent += tokens
            for q, (a, b, _), last_logits in zip(batch, spans, logits, strict=True):
                q.seconds += elapsed * (b - a) / tokens  # the forward's time, shared by tokens
                self.rows[q.row].progress = b
                if q.chunks:  # first come, first finished: the same prompt goes on while the budget lasts
                    self.prefills.appendleft(q)
                else:
                    done.append(self._first_token(q, last_logits))
        self.prefills.extendleft(reversed(waiting))
        return done

    def _companions(self, room: int) -> list[_Prefill]:
        """Queued prompts, in queue order, whose one remaining chunk fits `room` tokens together (a follower
        whose prefix is not ready yet stays queued): taken out of the queue to share the forward at hand."""
        taken: list[_Prefill] = []
        for q in list(self.prefills):
            if room <= 0:
                break
            if q.prefilled is not None or len(q.chunks) != 1 or q.chunks[0][1] - q.chunks[0][0] > room:
                continue
            if q.waits_for is not None and not self._copy_prefix(q):
                continue
            n = sum(b - a for a, b, _ in q.chunks)  # again: a follower whose source left computes it all
            if len(q.chunks) != 1 or n > room:
                continue
            self.prefills.remove(q)
            taken.append(q)
            room -= n
        return taken

    def _refresh(self):
        return self.runtime.refresh if self.runtime is not None else None

    def _copy_prefix(self, p: _Prefill) -> bool:
        src, n, source = p.waits_for
        if source is None or self.rows.get(src) is not source:  # the source has gone: compute the prefix after all
            p.waits_for, p.reused = None, 0
            p.chunks = deque(_chunks(len(p.ids), self.chunk, p.bootstrap))
            return True
        if self.progress(src) < n:
            return False
        c = self.cache
        a, b = c.base[p.row], c.base[src]
        c.k[:, p.row, :, a:a + n] = c.k[:, src, :, b:b + n]
        c.v[:, p.row, :, a:a + n] = c.v[:, src, :, b:b + n]
        c.kn[:, p.row, :, a:a + n] = c.kn[:, src, :, b:b + n]
        self.rows[p.row].progress = n
        p.waits_for = None
        return True

    def _from_prefilled(self, p: _Prefill) -> torch.Tensor:
        """A row prefilled outside the loop (eval's shared prefill): only the bootstrap selection remains."""
        boot = p.bootstrap
        if boot is not None:  # every layer's bootstrap selection in one pass
            z = torch.stack(p.prefilled.window_logits)[:, :, -boot.batch_index:, boot.lo:boot.hi]
            self.runtime.refresh(slice(None), p.row, z)
        return p.prefilled.logits

    def _first_token(self, p: _Prefill, logits: torch.Tensor) -> PrefillDone:
        row = self.rows[p.row]
        req = row.request
        (token,), (sampled,), logprob = _choose(logits[None], [req])
        row.length, row.last, row.decoding = len(req.prompt_ids), token, True
        finished = req.stopper.feed(token)
        if self.runtime is not None:
            self.runtime.observe(p.row, token)
        if finished:
            self._leave(p.row)
        return PrefillDone(p.row, p.started, p.seconds, finished, logprob[0] if logprob else None,
                           sampled if req.forced else None, len(p.ids) - p.reused, p.reused)

    # -- decode ---------------------------------------------------------------------------------------
    def step(self) -> StepDone | None:
        """One decode step for every row that is decoding (None when none is).

        Pipelined (`pipeline`), the next step is launched before this one's bookkeeping and before this returns,
        and its inputs are planned and staged while this one runs on the device, from a guess of what this step's
        tokens will decide (which rows turn slow or stop). Once the tokens are read, the staged plan is used only if
        what it assumed holds (`_Plan.holds`); otherwise the step is planned again. So the device is not left
        waiting on the host, and every row's steps, kinds and tokens are what they are without it. Rows admitted
        meanwhile join at the step after the one in flight."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        flight = self._flight
        self._flight = None
        if flight is None:
            started = time.perf_counter()
            plan = self._plan()
            if plan is None:
                return None
            flight = self._launch(plan, started)
        rt = self.runtime
        requests = [self.rows[s].request for s in flight.plan.active]
        chosen = _sample(flight.logits, requests)
        guess = self._guess(flight) if self.pipeline else None  # while the device runs the step
        tokens, sampled, logprobs = _choose(flight.logits, requests, chosen)
        synced = time.perf_counter()
        seconds = (flight.landed or synced) - flight.started
        gpu_seconds = self.static.gpu_seconds()
        plan = flight.plan
        active, kinds, lengths = plan.active, plan.kinds, plan.lengths
        # Accounted once the next step is launched, from the step's own ranges and step numbers (which the next
        # step's refreshes and this step's tokens change).
        numbers = [rt.state[s].step for s in active] if rt is not None else None
        finished = []
        for slot, token in zip(active, tokens, strict=True):
            row = self.rows[slot]
            row.length += 1
            row.last = token
            if row.request.stopper.feed(token):
                finished.append(slot)
                self._leave(slot)
            elif rt is not None:
                rt.observe(slot, token)
        if self.pipeline:
            try:
                after = guess if guess is not None and guess.holds(self) else self._plan()
                if after is not None and after is guess:
                    self.planned_ahead += 1
                elif after is not None:
                    after.prepared = self._prepare(after)
                    self.replanned += 1
                # A step that captures a graph waits for the next call: its time is then its own, not this one's.
                if after is not None and not self.static.needs_capture(after.prepared):
                    self._flight = self._launch(after, synced)
            except Exception as exc:  # reported by the next call, after this step's tokens are out
                self._error = exc
        if rt is not None:
            rt.record(active, kinds, lengths, seconds, (plan.clen, plan.start), numbers)
        event = StepDone(self.steps, active, tokens, finished, seconds, kinds, logprobs, flight.captured,
                         sampled if any(r.forced for r in requests) else None, gpu_seconds)
        self.steps += 1
        return event

    def _land(self) -> None:
        """Wait for the step in flight (before other work on the device: a prefill), so that its time and the
        other work's are each their own."""
        flight = self._flight
        if flight is not None and flight.landed is None:
            _settle(flight.logits)
            flight.landed = time.perf_counter()

    def _plan(self, after: _Flight | None = None) -> _Plan | None:
        """The next step's rows (slow ones first), kinds and ranges, from the rows as they are; with `after`, the
        step after that flight, planned from what its tokens will most likely decide."""
        rt = self.runtime
        if after is None:
            lengths = {s: r.length for s, r in self.rows.items() if r.decoding}
            pending = None
        else:  # the flight's rows one token on, less those its tokens finish for sure (their token budget)
            ahead = set(after.plan.active)
            lengths = {s: r.length + (s in ahead) for s, r in self.rows.items()
                       if r.decoding and not (s in ahead and r.request.stopper.last_token_next)}
            pending = [rt.guess_pending(s) if s in ahead else rt.pending[s] for s in lengths] if rt else None
        active = list(lengths)
        if not active:
            return None
        assumed = (list(lengths), pending)
        kinds, captures = rt.plan(active, lengths, pending) if rt is not None else (None, [])
        if captures:  # slow rows first: the step attends to them in a launch of their own (sfi.engine.step)
            order = sorted(range(len(active)), key=lambda i: kinds[i] != "slow")
            active, kinds = [active[i] for i in order], [kinds[i] for i in order]
            for c in captures:
                c.batch_index = order.index(c.batch_index)
        clen, start = rt.ranges(active, kinds) if rt is not None else ([0] * len(active),) * 2
        slow = [(c.batch_index, c.lo, c.hi) for c in captures]
        return _Plan(active, kinds, captures, lengths, clen, start, slow, assumed)

    def _guess(self, flight: _Flight) -> _Plan | None:
        """The step after `flight`, planned and staged from a guess of what its tokens decide (see `step`)."""
        plan = self._plan(flight)
        if plan is not None:
            plan.prepared = self._prepare(plan)
        return plan

    def _prepare(self, plan: _Plan) -> Prepared:
        return self.static.prepare(plan.active, [plan.lengths[s] for s in plan.active], plan.clen, plan.start,
                                   plan.slow, probe=self.probe)

    def _launch(self, plan: _Plan, started: float) -> _Flight:
        prepared = plan.prepared if plan.prepared is not None else self._prepare(plan)
        if self.runtime is not None:
            self.runtime.commit(plan.captures)
        logits = self.static.launch(prepared, [self.rows[s].last for s in plan.active])
        return _Flight(plan, logits, started, self.static.captured)


@dataclass
class _Plan:
    """A decode step's rows (slow first), their kinds and the ranges they read; `prepared` once staged."""

    active: list[int]
    kinds: list[str] | None
    captures: list[Capture]
    lengths: dict[int, int]  # per slot: tokens in its cache before the step
    clen: list[int]
    start: list[int]
    slow: list[tuple[int, int, int]]
    assumed: tuple[list[int], list[bool] | None]  # the decoding rows and the pending slow steps it was planned for
    prepared: Prepared | None = None

    def holds(self, decoder: Decoder) -> bool:
        """Whether this plan, made from guesses, is the plan the decoder's rows now make: it is a function of the
        decoding rows, their lengths and pending slow steps (and of the runtime's memory state, which only a launch
        changes), so it holds if those are what it assumed."""
        rows, pending = self.assumed
        now = [s for s, r in decoder.rows.items() if r.decoding]
        if now != rows or any(decoder.rows[s].length != self.lengths[s] for s in rows):
            return False
        rt = decoder.runtime
        return rt is None or all(rt.pending[s] == p for s, p in zip(rows, pending, strict=True))


@dataclass
class _Flight:
    """A launched step: its plan, its logits (valid until the next launch), when its time started and ended."""

    plan: _Plan
    logits: torch.Tensor
    started: float
    captured: bool
    landed: float | None = None  # when the host saw it done, if it waited for it before reading its tokens


def _settle(t: torch.Tensor) -> None:
    """Wait for the device to finish `t` (a GPU runs ahead of the host): a prefill chunk's time is then its own,
    not charged to the decode step or job that happens to wait for it next."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


def _sample(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """The sampled token per row, on the logits' device (greedy rows: no wait for the device)."""
    return sample(logits, [r.sampler for r in requests])


def _choose(logits: torch.Tensor, requests: Sequence[Request],
            chosen: torch.Tensor | None = None) -> tuple[list[int], list[int], list[float] | None]:
    """(tokens fed next, tokens sampled, log p of the fed tokens or None): a row's forced tokens are fed while
    it has any left, then its own samples. `chosen`: `_sample`'s result, if already launched."""
    sampled = (chosen if chosen is not None else _sample(logits, requests)).tolist()
    if not any(r.forced for r in requests):
        return sampled, sampled, None
    done = [len(r.stopper.token_ids) for r in requests]
    tokens = [r.forced[i] if r.forced and i < len(r.forced) else t
              for r, i, t in zip(requests, done, sampled, strict=True)]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(requests)), tokens].tolist()
    return tokens, sampled, logprobs


def generate(model: Transformer, requests: Sequence[Request], prefill_chunk: int = 2048,
             cache: KVCache | None = None, runtime: SfiRuntime | None = None,
             prefilled: Sequence[Prefilled] | None = None, cuda_graphs: bool = True,
             probe=None, time_gpu: bool = False, pipeline: bool | None = None) -> Iterator[PrefillDone | StepDone]:
    """Decode `requests` as one batch, row i in slot i: every prompt prefilled, then one step at a time until
    every row has stopped; each row's tokens accumulate in its StopChecker.

    `prefilled` (with `cache`) skips the prompt forward passes; a request's `forced` tokens are fed before its
    own samples (teacher forcing) with their log-probabilities reported. Every decode step is a static step
    (sfi.engine.step), replayed from a CUDA graph on a GPU when `cuda_graphs`; `probe` (eval's recall diagnostic)
    sees every layer's attention, which needs the steps launched op by op. `time_gpu`: each StepDone carries the
    device's time for its forward (CUDA events; the bench). `pipeline`: see `Decoder.step` (default: with graphs)."""
    decoder = Decoder(model, len(requests), cache_length(requests), runtime, prefill_chunk, cuda_graphs, probe,
                      cache, pipeline)
    decoder.static.time_gpu = time_gpu
    for slot, req in enumerate(requests):
        decoder.admit(slot, req, prefilled[slot] if prefilled is not None else None)
        yield from decoder.prefill()
    while (event := decoder.step()) is not None:
        yield event
