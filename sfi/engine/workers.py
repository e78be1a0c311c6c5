"""`sfi run --workers N` and `--gpus`: several worker processes, each a whole engine (its own model copy,
continuous batching, shared prefixes) on its share of the jobs; the driver alone reads the jobs, resumes, writes
the output, and sums up.

The driver splits the jobs largest work first (prompt characters plus `max_new_tokens`) over the workers, keeping
jobs that share a prompt prefix together so that the worker prefills it once. Each worker sends every result to
the driver through its own pipe as it finishes; the driver writes it, as a single-process run would. A worker
that dies (killed, out of host memory, a lost GPU) loses nothing: the jobs it had not sent back are decoded
again by a new worker, first all together, then each alone, so a job that kills every worker it touches fails by
itself after `max_retries` deaths with the reason, and the jobs beside it still finish.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import ConfigError, SfiError
from ..jobs import Job
from .run import Observer, Runner, RunOptions, RunSummary, Silent

PREFIX_CHARS = 2000  # jobs whose prompts agree on this many leading characters go to the same worker


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries for its workers: the entries of its own
    CUDA_VISIBLE_DEVICES (CUDA reads them up to the first invalid one), else one per GPU `nvidia-smi -L` lists.
    No torch import: the driver never touches a GPU, so it neither pays for CUDA nor holds GPU memory."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        visible = []
        for entry in (e.strip() for e in env.split(",")):
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            visible.append(entry)
        return visible
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no NVIDIA driver tools: ask CUDA itself
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    return [str(i) for i, _ in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def gpu_devices(spec: str, visible: list[str]) -> list[str]:
    """`--gpus`: "all", a count "N" (the first N) or indices "0,2" of the visible GPUs -> their CUDA_VISIBLE_DEVICES
    entries (so `CUDA_VISIBLE_DEVICES=2,3 sfi run --gpus 1` uses GPU 3)."""
    spec = spec.strip().lower()
    available = len(visible)
    if available == 0:
        raise ConfigError("--gpus: no GPU is visible here; use --workers N for CPU workers")
    if spec == "all":
        return list(visible)
    try:
        ids = [int(p) for p in spec.split(",") if p.strip()] if "," in spec else list(range(int(spec)))
    except ValueError:
        raise ConfigError(f"--gpus {spec!r}: use all, a count such as 2, or indices such as 0,1") from None
    bad = [i for i in ids if not 0 <= i < available]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {spec!r}: {available} GPU(s) visible (indices 0-{available - 1})")
    return [visible[i] for i in ids]


def _text(job: Job) -> str:
    if job.prompt is not None:
        return job.prompt
    return "".join(str(m.get("content", "")) for m in job.messages or [])


def split_jobs(jobs: list[Job], n: int, default_new_tokens: int) -> list[list[Job]]:
    """`n` shares of about equal work, largest first; jobs sharing a prompt prefix stay in one share."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        text = _text(job)
        key = text[:PREFIX_CHARS] if len(text) >= PREFIX_CHARS else f"\0{job.id}"
        groups.setdefault(key, []).append(job)

    def work(group: list[Job]) -> int:
        return sum(len(_text(j)) // 4 + (j.params.max_new_tokens or default_new_tokens) for j in group)

    shares: list[list[Job]] = [[] for _ in range(n)]
    load = [0] * n
    for group in sorted(groups.values(), key=work, reverse=True):
        i = load.index(min(load))
        shares[i] += group
        load[i] += work(group)
    return [s for s in shares if s]


class _Channel:
    """A worker's result sink: what the engine writes goes to the driver."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.finished_ids: set[str] = set()

    def write(self, result) -> None:
        self.conn.send(("result", result))


def _worker(slot: str, cpu: int, jobs: list[Job], opts: RunOptions, conn: Connection) -> None:
    """One worker process: decode `jobs` with the whole engine, send each result, then the summary. `cpu`: the
    number of CPU workers sharing this host's cores and memory (0 for a GPU worker)."""
    if not cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # this worker's GPU is its cuda:0
    import torch

    decode = dataclasses.replace(opts.config.decode, device="cuda")
    if cpu:  # a share of the cores and of the memory the KV budget may plan with
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu))
        decode = dataclasses.replace(decode, device="cpu", kv_memory_fraction=decode.kv_memory_fraction / cpu)
    config = dataclasses.replace(opts.config, decode=decode)
    runner = Runner(dataclasses.replace(opts, config=config), Silent())
    try:
        runner.decode_jobs(jobs, _Channel(conn))
    except KeyboardInterrupt:
        return
    except SfiError as e:  # the run's own problem (a model that will not load): no retry can help
        conn.send(("fatal", str(e)))
        return
    s = runner.summary
    conn.send(("done", {k: getattr(s, k) for k in ("model", "device", "load_s", "prefill_s", "decode_s", "compare_s",
                                                    "prefill_tokens_computed", "prefill_tokens_reused", "budget",
                                                    "config")}))
    conn.close()
    # Everything is sent: leave without tearing the model, caches and CUDA down piece by piece (seconds the
    # driver would wait in join); the operating system frees them at once.
    os._exit(0)


@dataclass
class _Running:
    slot: str
    process: Any
    conn: Connection
    jobs: dict[str, Job]
    sent: set[str] = field(default_factory=set)
    done: bool = False
    eof: bool = False  # the pipe is closed: the worker has ended


class Driver(Runner):
    """`sfi run` over worker processes: one per GPU of `gpus`, or `workers` CPU processes."""

    def __init__(self, opts: RunOptions, observer: Observer, workers: int = 1, gpus: list[str] | None = None,
                 max_retries: int = 2) -> None:
        super().__init__(opts, observer)
        self.slots = list(gpus) if gpus else [str(i) for i in range(workers)]
        self.cpu = not gpus
        self.max_retries = max_retries
        self.summary.workers = len(self.slots)
        self.deaths: dict[str, int] = {}
        self.merged = 0

    def decode_jobs(self, todo: list[Job], writer) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
        # Each entry: the jobs one worker process decodes together.
        pending = deque(split_jobs(todo, len(self.slots), self.cfg.generation.max_new_tokens))
        free, running = list(self.slots), []
        self.obs.start(len(todo))
        self.obs.message(f"{len(self.slots)} {'CPU worker' if self.cpu else 'GPU worker'}(s): "
                         + ", ".join(f"{len(jobs)} jobs" for jobs in pending))
        try:
            while pending or running:
                while pending and free:
                    running.append(self._start(ctx, free.pop(0), pending.popleft()))
                ready = wait([r.conn for r in running], timeout=1.0)
                for r in list(running):
                    if r.conn in ready or not r.process.is_alive():  # read all it sent before it ended
                        self._receive(r, writer)
                    if r.done or r.eof:
                        r.process.join()
                        running.remove(r)
                        free.append(r.slot)
                        if not r.done:
                            pending.extend(self._died(r, writer))
        except BaseException:  # interrupted, or a worker's fatal error: no worker outlives the driver
            for r in running:
                r.process.terminate()
            raise

    def _start(self, ctx, slot: str, jobs: list[Job]) -> _Running:
        recv, send = ctx.Pipe(duplex=False)
        opts = dataclasses.replace(self.opts, config=self.cfg)
        cpu = len(self.slots) if self.cpu else 0
        process = ctx.Process(target=_worker, args=(slot, cpu, jobs, opts, send), daemon=True)
        process.start()
        send.close()  # the driver keeps only the reading end: a dead worker is then an EOF
        return _Running(slot, process, recv, {j.id: j for j in jobs})

    def _receive(self, r: _Running, writer) -> None:
        try:
            while not r.done and r.conn.poll():
                kind, payload = r.conn.recv()
                if kind == "result":
                    r.sent.add(payload.id)
                    self._emit(writer, payload)
                elif kind == "fatal":
                    raise SfiError(payload)
                else:
                    r.done = True
                    self._merge(payload)
        except (EOFError, OSError, ValueError, RuntimeError, ImportError):  # ended, possibly mid-message
            r.eof = True
            r.process.join(timeout=5)

    def _died(self, r: _Running, writer) -> list[list[Job]]:
        """The jobs a dead worker had not sent back: again (together the first time, then each alone), or failed
        after `max_retries` deaths."""
        code = r.process.exitcode
        left = [j for i, j in r.jobs.items() if i not in r.sent]
        self.obs.message(f"worker {r.slot} died (exit code {code}) with {len(left)} job(s) unfinished"
                         + ("; decoding them again" if left else ""))
        again, alone = [], []
        for job in left:
            n = self.deaths[job.id] = self.deaths.get(job.id, 0) + 1
            if n > self.max_retries:
                self._fail(writer, job.id, f"the worker decoding this job died {n} time(s) (last exit code {code}); "
                           f"not retried past --max-retries {self.max_retries}", job.api)
            elif n == 1:
                again.append(job)
            else:
                alone.append(job)
        return ([again] if again else []) + [[job] for job in alone]

    def _merge(self, worker: dict) -> None:
        s = self.summary
        if not self.merged:  # every worker runs the same model and config
            s.model, s.budget, s.config = worker["model"], worker["budget"], worker["config"]
            s.device = (f"{worker['device']} x {len(self.slots)} workers" if self.cpu else
                        f"cuda x {len(self.slots)} (GPUs {','.join(self.slots)})")
        self.merged += 1
        for key in ("load_s", "prefill_s", "decode_s", "compare_s", "prefill_tokens_computed",
                    "prefill_tokens_reused"):
            setattr(s, key, getattr(s, key) + worker[key])


def run_workers(opts: RunOptions, observer: Observer | None = None, workers: int = 1, gpus: list[str] | None = None,
                max_retries: int = 2) -> RunSummary:
    return Driver(opts, observer or Silent(), workers, gpus, max_retries).run()
