"""`sfi run` as a library call: validate jobs, resume, load the model, batch, decode, write results.

The CLI renders; this module decides. Data flows one way: jobs -> prompts -> batches -> decoder ->
results. A bad job, a too-long prompt or a batch that runs out of memory costs that job only.

torch and the model code are imported only once there is something to decode (`_run` onwards): reading and
validating the jobs, `--strict`, and a refused output lock answer in well under a second.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Config
from ..errors import JobInputError
from ..jobs import Job, JobProblem, read_jobs
from ..prompts import Prompt, PromptError, fit, render_many
from ..results import JobResult, ResultWriter

if TYPE_CHECKING:
    from ..loader import LoadedModel
    from ..method.runtime import SfiRuntime
    from ..model import ModelArgs
    from ..sampling import SamplingParams
    from .decoder import PrefillDone
    from .scheduler import Bucket, Sized


@dataclass
class RunOptions:
    jobs: str  # a path, or "-" for stdin
    output: str | None = None  # None or "-" = stdout
    output_format: str = "sfi"
    model: str | None = None  # None = the default test model
    config: Config = field(default_factory=Config)
    strict: bool = False
    truncate: str | None = None  # None | "left" | "middle"
    overwrite: bool = False
    compare_dense: bool = False  # also decode every job with the dense recipe and compare


@dataclass
class RunSummary:
    model: str = ""
    device: str = ""
    jobs_total: int = 0  # lines that parsed or had an id
    skipped: int = 0  # already finished in the output (resume)
    succeeded: int = 0
    failed: int = 0  # error results written, plus bad lines without an id
    invalid_lines: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_s: float = 0.0
    elapsed_s: float = 0.0
    prefill_s: float = 0.0  # summed over jobs: time in their own prefill chunks
    decode_s: float = 0.0  # summed over decode steps
    decode_steps: int = 0  # decode steps taken (completion tokens / steps: the mean batch width)
    graph_captures: int = 0  # decode steps that captured a new CUDA graph (a one-time cost each)
    capture_s: float = 0.0  # the time of those steps (part of decode_s)
    capture_warmup_s: float = 0.0  # of which: the captures' warm-up steps (Triton compilation included)
    capture_record_s: float = 0.0  # and recording and instantiating the graphs
    oom_retries: int = 0  # batches that ran out of memory and went on with half the rows
    compare_s: float = 0.0  # --compare dense: the dense pass (prefill and decode), kept out of the run's own
    prefill_tokens_computed: int = 0
    prefill_tokens_reused: int = 0  # prompt tokens copied from another job's shared prefix
    interrupted: bool = False
    sparse_jobs: int = 0  # jobs where SFI engaged (some step read less than the whole context)
    slow_steps: int = 0
    fast_steps: int = 0
    kv_bytes_read: int = 0
    kv_bytes_dense: int = 0
    budget: str = ""  # the SFI budget used, and why (derived from the model's context, or set by the recipe)
    workers: int = 1  # processes that decoded (--workers, --gpus): load, prefill and decode are summed over them
    compared: list[dict] = field(default_factory=list)  # each job's compare_dense object (--compare dense)
    config: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)  # short per-job lines for the report

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def idle_s(self) -> float:
        """Wall time in neither loading, prefill, decode steps nor the --compare pass: reading jobs, tokenising,
        writing, waiting (with several workers: worker-seconds, of elapsed x workers)."""
        busy = self.load_s + self.prefill_s + self.decode_s + self.compare_s
        return max(0.0, self.elapsed_s * self.workers - busy)

    @property
    def end_to_end_tok_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def jobs_per_hour(self) -> float:
        return 3600 * self.succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 2 if self.failed else 0


class Observer(Protocol):
    """What the engine tells its caller while it works; the CLI renders it."""

    def message(self, text: str) -> None: ...
    def problem(self, problem: JobProblem) -> None: ...
    def start(self, jobs: int) -> None: ...
    def tokens(self, n: int) -> None: ...
    def job_done(self, result: JobResult) -> None: ...


class Silent:
    def message(self, text: str) -> None: ...
    def problem(self, problem: JobProblem) -> None: ...
    def start(self, jobs: int) -> None: ...
    def tokens(self, n: int) -> None: ...
    def job_done(self, result: JobResult) -> None: ...


@dataclass
class Decoded:
    prepared: Prepared
    token_ids: list[int]
    result: JobResult


def dense_report(prompt_len: int, n: int, lm: LoadedModel, cfg) -> dict:
    """The `sfi` report of a job decoded densely: every step reads the whole context."""
    context = n * prompt_len + (n - 1) * n // 2  # the prefill step, then one more token per step
    bpt = lm.args.kv_bytes_per_token(lm.model.dtype)
    return {"sparse": False, "reason": "dense recipe", "slow_steps": n, "fast_steps": 0,
            "mean_interval": 1.0 if n > 1 else None,
            "attended_fraction": 1.0, "kv_bytes_read": context * bpt, "kv_bytes_dense": context * bpt,
            "estimated_speedup": 1.0}


def compare(ours: Decoded, dense: Decoded) -> dict:
    """Measured speedup of the decode phase and token agreement against the dense decode of the same job. A job
    whose every step fit the budget decoded exactly as dense: its timing difference is noise, so no speedup."""
    a, b = ours.token_ids, dense.token_ids
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    ours_rate, dense_rate = ours.result.decode_tok_s, dense.result.decode_tok_s
    engaged = ours.result.extra.get("sfi", {}).get("sparse", False)
    return {"speedup": round(ours_rate / dense_rate, 3) if engaged and ours_rate and dense_rate else None,
            "sfi_decode_tok_s": round(ours_rate, 2), "dense_decode_tok_s": round(dense_rate, 2),
            "token_agreement": round(same / max(len(b), 1), 4), "identical": a == b}


@dataclass
class Prepared:
    job: Job
    prompt: Prompt
    params: SamplingParams
    stop: tuple[str, ...]
    seed: int
    group: int = -1  # shared-prefix group (scheduler.prefix_groups), -1 for none
    shared: int = 0  # prompt tokens it may copy from another member of its group

    @property
    def positions(self) -> int:
        """Cache positions its row takes (decoder.cache_positions of its request)."""
        return len(self.prompt.ids) + self.prompt.max_new_tokens - 1


@dataclass
class _Flight:
    """A job in a slot: what it is, and its timings so far."""

    prepared: Prepared
    request: Any
    admitted: float
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_start: float = 0.0
    computed: int = 0
    reused: int = 0


def _row_seed(run_seed: int, job_id: str) -> int:
    """A job without its own seed still samples reproducibly, and independently of its batch."""
    digest = hashlib.sha256(f"{run_seed}:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def activation_bytes(args: ModelArgs, chunk: int, max_tokens: int, batch: int, on_cpu: bool,
                     window: int = 0) -> int:
    """Headroom for one prefill chunk's activations and the logits, kept out of the KV budget; with SFI's
    bootstrap `window`, also its float32 logits and keys of one pass over a group of layers (and the Selector's
    padded copy of the logits)."""
    width = 3 * args.hidden_size + 2 * args.intermediate_size + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    total = 2 * chunk * width * 4 + 2 * batch * args.vocab_size * 4
    if window:
        from ..attention import BOOTSTRAP_BYTES

        per_layer = 4 * max_tokens * (args.n_heads * window + args.n_kv_heads * args.head_dim)
        total += 2 * max(per_layer, min(BOOTSTRAP_BYTES, args.n_layers * per_layer))
    if on_cpu:  # the CPU attention path materialises the chunk's score matrix
        total += chunk * max_tokens * args.n_heads * 4
    return total


class Runner:
    """One `sfi run`: owns the writer, the model and the counters."""

    def __init__(self, opts: RunOptions, observer: Observer) -> None:
        self.opts, self.obs = opts, observer
        self.cfg = opts.config
        self.summary = RunSummary(config=self.cfg.to_dict())
        self.t0 = time.perf_counter()

    # -- results --------------------------------------------------------------------------------------
    def _emit(self, writer: ResultWriter, result: JobResult) -> None:
        writer.write(result)
        s = self.summary
        if result.finish_reason == "error":
            s.failed += 1
        else:
            s.succeeded += 1
            s.prompt_tokens += result.prompt_tokens
            s.completion_tokens += result.completion_tokens
            report = result.extra.get("sfi", {})
            s.sparse_jobs += bool(report.get("sparse"))
            s.slow_steps += report.get("slow_steps", 0)
            s.fast_steps += report.get("fast_steps", 0)
            s.kv_bytes_read += report.get("kv_bytes_read", 0)
            s.kv_bytes_dense += report.get("kv_bytes_dense", 0)
            if "compare_dense" in result.extra:
                s.compared.append(result.extra["compare_dense"])
        s.results.append({"id": result.id, "finish_reason": result.finish_reason, "error": result.error,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "decode_tok_s": round(result.decode_tok_s, 2)})
        self.obs.job_done(result)

    def _error(self, job_id: str, message: str, api: str = "sfi") -> JobResult:
        return JobResult(id=job_id, text="", finish_reason="error", error=message, api=api, model=self.summary.model)

    def _fail(self, writer: ResultWriter, job_id: str, message: str, api: str = "sfi") -> None:
        self._emit(writer, self._error(job_id, message, api))

    # -- preparation ----------------------------------------------------------------------------------
    def _prepare(self, job: Job, ids: list[int], lm: LoadedModel) -> Prepared:
        from ..sampling import SamplingParams

        g, p = self.cfg.generation, job.params
        pick = lambda own, default: default if own is None else own  # noqa: E731 - a job's own field wins
        new = pick(p.max_new_tokens, g.max_new_tokens)
        if g.max_new_tokens_cap:
            new = min(new, g.max_new_tokens_cap)
        prompt = fit(ids, new, lm.max_context, self.opts.truncate)
        params = SamplingParams(temperature=pick(p.temperature, g.temperature), top_p=pick(p.top_p, g.top_p),
                                top_k=pick(p.top_k, g.top_k), seed=p.seed)
        stop = tuple(pick(p.stop, tuple(g.stop)))
        return Prepared(job, prompt, params, stop, _row_seed(g.seed, job.id))

    # -- decoding -------------------------------------------------------------------------------------
    def _runtime(self, lm: LoadedModel, n_rows: int, sfi: bool) -> SfiRuntime | None:
        from ..method.boundary import make_boundary
        from ..method.runtime import SfiRuntime

        cfg = self.cfg.sfi
        if not sfi or cfg.mode == "dense":
            return None
        boundary = make_boundary(cfg, lm.tokenizer)
        return SfiRuntime(cfg, boundary, n_rows, lm.args.kv_bytes_per_token(lm.model.dtype))

    def _request(self, lm: LoadedModel, p: Prepared, reuse: tuple[int, int] | None = None):
        from ..sampling import RowSampler
        from ..stopping import StopChecker
        from .decoder import Request

        eos = () if self.cfg.generation.ignore_eos else lm.eos_ids
        return Request(p.prompt.ids, RowSampler(p.params, p.seed),
                       StopChecker(lm.tokenizer, eos, p.stop, p.prompt.max_new_tokens), reuse=reuse)

    def _decode(self, lm: LoadedModel, bucket: Bucket[Prepared], sfi: bool) -> Iterator[Decoded]:
        """Decode a bucket, yielding each job as it finishes. Continuous: a finished row's slot (and, in a pool,
        its room) goes to the first queued job that fits, whose prompt is prefilled a chunk per step between the
        running rows' decode steps; static: the next jobs start when the batch has finished. Out of memory, the
        jobs in flight go back to the queue and the bucket goes on with half the slots (and half the pool)."""
        import torch

        from .decoder import Decoder

        d = self.cfg.decode
        queue = deque(it.item for it in bucket.items)
        slots, pool = bucket.slots, bucket.pool
        while queue:
            flights: dict[int, _Flight] = {}
            decoder = None
            stuck = -1  # the largest free run at this decoder's last admission that found no queued job fitting
            try:
                runtime = self._runtime(lm, slots, sfi)
                cache = lm.model.new_pool(slots, pool, bucket.max_tokens) if pool else None
                decoder = Decoder(lm.model, slots, bucket.max_tokens, runtime, d.prefill_chunk, d.cuda_graphs,
                                  cache=cache, pipeline=None if d.pipeline else False)
                while queue or decoder.busy:
                    if d.continuous or not decoder.busy:
                        for slot in decoder.free:
                            # Room only grows when a row leaves and the queue only shrinks: what found nothing
                            # that fits finds nothing until the room is larger (no scan of the queue per step).
                            room = decoder.cache.largest_free
                            p = self._next(queue, room) if room > stuck else None
                            if p is None:
                                stuck = room
                                break
                            request = self._request(lm, p, self._reuse(p, flights))
                            flights[slot] = _Flight(p, request, time.perf_counter())
                            decoder.admit(slot, request)
                    if queue and not decoder.busy:  # not even an empty cache holds the next job (a plan never
                        lost = queue.popleft()     # leaves one so): its error, not a loop that waits forever
                        yield Decoded(lost, [], self._error(
                            lost.job.id, f"needs {lost.positions:,} KV cache positions; an empty cache here holds "
                                         f"{decoder.cache.largest_free:,}", lost.job.api))
                        continue
                    # While no row decodes (the first wave) nothing can stall: prompts go whole (layer by layer
                    # on a GPU, one attention call per layer); after that a chunk per decode step.
                    for e in decoder.prefill(d.prefill_chunk if d.continuous and decoder.decoding else None):
                        self._prefilled(flights[e.row], e, sfi)
                        if e.finished:
                            yield self._finish(lm, flights.pop(e.row), runtime, e.row)
                    step = decoder.step()
                    if step is None:
                        continue
                    if sfi:  # the --compare pass is not part of the run's own throughput
                        self.summary.decode_s += step.seconds
                        self.summary.decode_steps += 1
                        self.summary.graph_captures += step.captured_graph
                        self.summary.capture_s += step.seconds if step.captured_graph else 0.0
                    self.obs.tokens(len(step.rows))
                    for row in step.finished:
                        yield self._finish(lm, flights.pop(row), runtime, row)
                self._captures(decoder, sfi)
            except (torch.OutOfMemoryError, MemoryError):
                self._captures(decoder, sfi)
                left = [f.prepared for _, f in sorted(flights.items(), key=lambda kv: kv[1].admitted)]
            else:
                continue  # the queue is done
            # Out of memory. This attempt's pool, decoder and graphs go before the next attempt allocates its own
            # (outside the except block, whose traceback holds the failed step's frames); a retry that allocated
            # next to them would run out again, down to single jobs failing one by one.
            runtime = decoder = cache = step = e = None
            gc.collect()
            if lm.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if slots == 1:  # the oldest job in flight, or (nothing admitted yet) the one that could not start
                lost = left.pop(0) if left else queue.popleft()
                yield Decoded(lost, [], self._error(lost.job.id, "out of memory decoding this job alone",
                                                    lost.job.api))
            queue.extendleft(reversed(left))
            half = max(1, slots // 2)
            self.summary.oom_retries += 1
            if slots > 1:
                self.obs.message(f"out of memory with {slots} rows; retrying with {half} at a time")
            if pool:  # half the pool, still room for the longest job
                pool = max(bucket.max_tokens, pool * half // slots)
            slots = half

    def _captures(self, decoder, sfi: bool) -> None:
        """Account where a decoder's graph captures spent their time (the run's own pass only)."""
        if decoder is not None and sfi:
            self.summary.capture_warmup_s += decoder.static.capture_warmup_s
            self.summary.capture_record_s += decoder.static.capture_record_s

    @staticmethod
    def _next(queue: deque[Prepared], room: int) -> Prepared | None:
        """Take the first queued job that fits `room` cache positions (a pool may not have room for the queue's head
        until a longer row leaves: shorter jobs behind it fill the gap meanwhile)."""
        for i, p in enumerate(queue):
            if p.positions <= room:
                del queue[i]
                return p
        return None

    def _reuse(self, p: Prepared, flights: dict[int, _Flight]) -> tuple[int, int] | None:
        """(slot, n) of a job in flight whose prompt starts with this job's shared prefix, if any."""
        if p.group < 0 or p.shared == 0:
            return None
        return next(((slot, p.shared) for slot, f in flights.items() if f.prepared.group == p.group), None)

    def _prefilled(self, flight: _Flight, event: PrefillDone, sfi: bool) -> None:
        flight.queue_s = event.started - self.t0
        flight.prefill_s = event.seconds
        flight.decode_start = time.perf_counter()
        flight.computed, flight.reused = event.computed, event.reused
        if sfi:
            s = self.summary
            s.prefill_s += event.seconds
            s.prefill_tokens_computed += event.computed
            s.prefill_tokens_reused += event.reused
        self.obs.tokens(1)

    def _finish(self, lm: LoadedModel, f: _Flight, runtime: SfiRuntime | None, row: int) -> Decoded:
        p, req = f.prepared, f.request
        n = len(req.stopper.token_ids)
        report = runtime.report(row) if runtime else dense_report(len(p.prompt.ids), n, lm, self.cfg.sfi)
        extra = {"truncated_from": p.prompt.truncated_from} if p.prompt.truncated_from else {}
        extra |= {"prefill_tokens_computed": f.computed, "prefill_tokens_reused": f.reused, "sfi": report}
        return Decoded(p, req.stopper.token_ids, JobResult(
            id=p.job.id, text=req.stopper.text(), finish_reason=req.stopper.finish_reason or "length",
            prompt_tokens=len(p.prompt.ids), completion_tokens=n, queue_s=f.queue_s, prefill_s=f.prefill_s,
            decode_s=time.perf_counter() - f.decode_start, api=p.job.api, model=self.summary.model,
            metadata=p.job.metadata, extra=extra))

    def _decode_bucket(self, lm: LoadedModel, bucket: Bucket[Prepared], writer: ResultWriter) -> None:
        if not self.opts.compare_dense:
            for d in self._decode(lm, bucket, sfi=True):
                self._emit(writer, d.result)
            return
        ours = {d.prepared.job.id: d for d in self._decode(lm, bucket, sfi=True)}
        started = time.perf_counter()
        for dense in self._decode(lm, bucket, sfi=False):
            d = ours[dense.prepared.job.id]
            if d.result.finish_reason != "error" and dense.result.finish_reason != "error":
                d.result.extra["compare_dense"] = compare(d, dense)
            self.summary.compare_s += time.perf_counter() - started
            self._emit(writer, d.result)
            started = time.perf_counter()

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        opts, s = self.opts, self.summary
        jobset = read_jobs(opts.jobs)
        if opts.strict and jobset.problems:
            listing = "\n".join(f"  {p}" for p in jobset.problems[:20])
            more = f"\n  ... and {len(jobset.problems) - 20} more" if len(jobset.problems) > 20 else ""
            raise JobInputError(f"{len(jobset.problems)} bad line(s) in {opts.jobs} (--strict):\n{listing}{more}")
        with ResultWriter(opts.output, opts.output_format, opts.overwrite) as writer:
            try:
                self._run(jobset.jobs, jobset.problems, writer)
            except KeyboardInterrupt:
                s.interrupted = True
        s.elapsed_s = time.perf_counter() - self.t0
        return s

    def _run(self, jobs: list[Job], problems: list[JobProblem], writer: ResultWriter) -> None:
        todo = self._triage(jobs, problems, writer)
        if todo:
            self.decode_jobs(todo, writer)

    def _triage(self, jobs: list[Job], problems: list[JobProblem], writer: ResultWriter) -> list[Job]:
        """Skip what the output already holds, write the bad lines' errors; the jobs left to decode."""
        s = self.summary
        done = writer.finished_ids
        s.jobs_total = len(jobs) + sum(1 for p in problems if p.job_id is not None)
        todo = [j for j in jobs if j.id not in done]
        s.skipped = len(jobs) - len(todo) + sum(1 for p in problems if p.job_id in done)
        if s.skipped:
            self.obs.message(f"resuming: {s.skipped} job(s) already finished in {self.opts.output}")
        for problem in problems:
            s.invalid_lines += 1
            if problem.job_id is None:  # no id, so no result line: stderr is the only place it shows
                self.obs.problem(problem)
                s.failed += 1
            elif problem.job_id not in done:
                self._fail(writer, problem.job_id, str(problem))
        return todo

    def decode_jobs(self, todo: list[Job], writer) -> None:
        """Load the model and decode `todo`, each result through `writer.write` (a ResultWriter, or a worker's
        channel to its driver)."""
        s = self.summary
        from ..loader import load_model
        from .scheduler import Sized

        # The weights load in a thread while the prompts are rendered and tokenized (both take seconds on a
        # long batch); a prompt's error is written once the model is in, so a checkpoint that fails to load
        # leaves the output as it was.
        lm = load_model(self.opts.model, self.cfg.decode.device, self.cfg.decode.dtype, progress=self.obs.message,
                        wait=False)
        if self.cfg.sfi.mode == "sfi":
            s.budget = self.cfg.sfi.budget_note(lm.max_context)
        self.cfg = dataclasses.replace(self.cfg, sfi=self.cfg.sfi.for_context(lm.max_context))
        s.config = self.cfg.to_dict()
        sized: list[Sized[Prepared]] = []
        bad: list[tuple[Job, PromptError]] = []
        try:
            for job, ids in zip(todo, render_many(todo, lm.tokenizer), strict=True):
                try:
                    if isinstance(ids, PromptError):
                        raise ids
                    p = self._prepare(job, ids, lm)
                except PromptError as e:
                    bad.append((job, e))
                    continue
                tokens = p.positions + 1
                sized.append(Sized(p, tokens + self._memory_tokens(tokens)))
        finally:
            lm.wait()
        s.model, s.load_s, s.device = lm.name, lm.load_s, str(lm.model.device)
        self.obs.message(f"model {lm.name} ({lm.args.family}, {lm.args.n_layers} layers) on {lm.model.device}, "
                         f"{str(lm.model.dtype).removeprefix('torch.')}, loaded in {lm.load_s:.1f}s")
        for job, e in bad:
            self._fail(writer, job.id, f"{job.source}:{job.line}: {e}", job.api)
        self.obs.start(len(sized))
        if not sized:
            return
        self._decode_all(lm, sized, writer)

    def _memory_tokens(self, tokens: int) -> int:
        """KV positions' worth of a row's compact memory: sink + k_head when SFI will need one for `tokens`."""
        cfg = self.cfg.sfi
        budget = cfg.sink + cfg.k_head + cfg.recent
        needs_memory = cfg.mode == "sfi" and (not cfg.dense_within_budget or tokens > budget)
        return cfg.sink + cfg.k_head if needs_memory else 0

    def _decode_all(self, lm: LoadedModel, sized: list[Sized[Prepared]], writer: ResultWriter) -> None:
        from .scheduler import Sized, available_memory, plan_buckets, plan_pool, prefix_groups

        d = self.cfg.decode
        device = lm.model.device
        longest = max(it.tokens for it in sized)
        bpt = lm.args.cache_bytes_per_token(lm.model.dtype)
        window = self.cfg.sfi.bootstrap_window if self.cfg.sfi.mode == "sfi" else 0
        headroom = activation_bytes(lm.args, d.prefill_chunk, longest, d.max_batch_size, device.type == "cpu", window)
        budget = int(available_memory(device) * d.kv_memory_fraction) - headroom
        groups = [-1] * len(sized)
        if d.prefix_min_tokens:
            keep = self.cfg.sfi.bootstrap_window  # each job prefills its own last queries
            groups, shared = prefix_groups([it.item.prompt.ids for it in sized], d.prefix_min_tokens, keep)
            for it, g, n in zip(sized, groups, shared, strict=True):
                it.item.group, it.item.shared = g, n
        if d.continuous:  # one pool: every job at its own length (see sfi.engine.scheduler)
            own = [Sized(it.item, it.item.positions) for it in sized]
            memory = max(self._memory_tokens(it.tokens + 1) for it in own)  # a slot's compact memory
            # Ties in output length go to the longer prompt (the plain length order within them).
            by_output = (lambda it: (it.item.prompt.max_new_tokens << 32) + it.tokens) if d.order == "output" else None
            pool, too_big = plan_pool(own, bpt, budget, d.max_batch_size, memory, groups, by_output)
            buckets = [pool] if pool is not None else []
        else:
            buckets, too_big = plan_buckets(sized, bpt, budget, d.max_batch_size, groups)
        for it in too_big:
            need = it.tokens * bpt / 2**30
            self._fail(writer, it.item.job.id, f"needs {need:.2f} GiB of KV cache for {it.tokens} tokens; "
                       f"only {max(budget, 0) / 2**30:.2f} GiB is free for caches", it.item.job.api)
        for bucket in buckets:
            self._decode_bucket(lm, bucket, writer)


def run(opts: RunOptions, observer: Observer | None = None) -> RunSummary:
    return Runner(opts, observer or Silent()).run()
