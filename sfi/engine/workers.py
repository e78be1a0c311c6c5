"""`sfi run --workers N`, `--gpus` and `--ray`: several workers, each a whole engine (its own model copy,
continuous batching, shared prefixes) on its share of the jobs; the driver alone reads the jobs, resumes, writes
the output, and sums up. A worker is a process of this machine (`--workers`, `--gpus`) or a Ray actor (`--ray`:
one per GPU of the cluster, or `--workers` CPU actors where it has none).

The driver splits the jobs largest work first (prompt characters plus `max_new_tokens`) over the workers, keeping
jobs that share a prompt prefix together so that the worker prefills it once. Each worker sends every result to
the driver as it finishes (a pipe per process; one Ray queue for the actors); the driver writes it, as a
single-process run would. A worker that dies (killed, out of host memory, a lost GPU or node) loses nothing: the
jobs it had not sent back are decoded again by a new worker, first all together, then each alone, so a job that
kills every worker it touches fails by itself after `max_retries` deaths with the reason, and the jobs beside it
still finish.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
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

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'sfi[ray]'"
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


class _PipeChannel:
    """A process worker's result sink: what the engine writes goes to the driver through the pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.finished_ids: set[str] = set()

    def write(self, result) -> None:
        self.conn.send(("result", result))


class _QueueChannel:
    """A Ray actor's result sink: the driver's queue, each result tagged with the actor's run."""

    def __init__(self, queue, tag: int) -> None:
        self.queue, self.tag = queue, tag
        self.finished_ids: set[str] = set()

    def write(self, result) -> None:
        self.queue.put((self.tag, "result", result))  # blocks until the queue holds it


def _decode_share(jobs: list[Job], opts: RunOptions, channel, device: str, threads: int = 0,
                  memory_share: int = 1) -> tuple[str, Any] | None:
    """A worker's whole job: decode `jobs` with the whole engine on `device`, each result through `channel`; the
    reply for the driver, ("done", summary fields) or ("fatal", message) (None: interrupted). A CPU worker uses
    `threads` threads and 1/`memory_share` of the memory the KV budget may plan with."""
    import torch

    decode = dataclasses.replace(opts.config.decode, device=device)
    if device == "cpu":
        torch.set_num_threads(max(1, threads))
        decode = dataclasses.replace(decode, kv_memory_fraction=decode.kv_memory_fraction / memory_share)
    runner = Runner(dataclasses.replace(opts, config=dataclasses.replace(opts.config, decode=decode)), Silent())
    try:
        runner.decode_jobs(jobs, channel)
    except KeyboardInterrupt:
        return None
    except SfiError as e:  # the run's own problem (a model that will not load): no retry can help
        return ("fatal", str(e))
    s = runner.summary
    keys = ("model", "device", "load_s", "prefill_s", "decode_s", "decode_steps", "graph_captures", "capture_s",
            "capture_warmup_s", "capture_record_s", "oom_retries", "compare_s", "prefill_tokens_computed",
            "prefill_tokens_reused", "budget", "config")
    return ("done", {k: getattr(s, k) for k in keys})


def _process_main(slot: str, cpu: int, jobs: list[Job], opts: RunOptions, conn: Connection) -> None:
    """A worker process. `cpu`: the number of CPU workers sharing this host's cores and memory (0: GPU `slot`)."""
    if not cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # this worker's GPU is its cuda:0
    reply = _decode_share(jobs, opts, _PipeChannel(conn), "cpu" if cpu else "cuda",
                          (os.cpu_count() or 1) // max(cpu, 1), max(cpu, 1))
    if reply is None:
        return
    conn.send(reply)
    conn.close()
    # Everything is sent: leave without tearing the model, caches and CUDA down piece by piece (seconds the
    # driver would wait in join); the operating system frees them at once.
    os._exit(0)


@dataclass
class _Worker:
    """A running worker as the driver sees it: the jobs it was given and which of them came back."""

    slot: str
    jobs: dict[str, Job]
    sent: set[str] = field(default_factory=set)
    done: bool = False  # its summary arrived: it finished
    ended: bool = False  # it is gone (a dead process, a dead actor)
    reason: str = ""  # why it ended, for the message

    def receive(self) -> list[tuple[str, Any]]:
        """Every message it has sent since the last call, ("result" | "done" | "fatal", payload); marks `ended`."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


@dataclass
class _Process(_Worker):
    process: Any = None
    conn: Connection | None = None

    def receive(self) -> list[tuple[str, Any]]:
        out = []
        try:
            while not self.done and self.conn.poll():
                out.append(self.conn.recv())
                self.done = out[-1][0] == "done"
        except (EOFError, OSError, ValueError, RuntimeError, ImportError):  # ended, possibly mid-message
            self.ended = True
            self.process.join(timeout=5)
            self.reason = f"exit code {self.process.exitcode}"
        if self.done:
            self.process.join()
        return out

    def stop(self) -> None:
        self.process.terminate()


class _Processes:
    """Workers as processes of this machine: one per GPU of `gpus`, or `workers` CPU processes."""

    def __init__(self, workers: int, gpus: list[str] | None) -> None:
        self.slots = list(gpus) if gpus else [str(i) for i in range(workers)]
        self.cpu = not gpus
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
        self.label = f"{len(self.slots)} {'CPU worker' if self.cpu else 'GPU worker'}(s)"

    def start(self, slot: str, jobs: list[Job], opts: RunOptions) -> _Process:
        recv, send = self.ctx.Pipe(duplex=False)
        cpu = len(self.slots) if self.cpu else 0
        process = self.ctx.Process(target=_process_main, args=(slot, cpu, jobs, opts, send), daemon=True)
        process.start()
        send.close()  # the driver keeps only the reading end: a dead worker is then an EOF
        return _Process(slot, {j.id: j for j in jobs}, process=process, conn=recv)

    def wait(self, running: list[_Worker], timeout: float) -> None:
        wait([r.conn for r in running], timeout=timeout)

    def device(self, worker_device: str) -> str:
        return (f"{worker_device} x {len(self.slots)} workers" if self.cpu else
                f"cuda x {len(self.slots)} (GPUs {','.join(self.slots)})")

    def close(self) -> None:
        pass


class _RayWorker:
    """A Ray actor (`ray.remote` applied at run time: Ray is an optional extra)."""

    def decode(self, tag: int, jobs: list[Job], opts: RunOptions, queue, device: str, threads: int,
               memory_share: int):
        return _decode_share(jobs, opts, _QueueChannel(queue, tag), device, threads, memory_share)


@dataclass
class _Actor(_Worker):
    backend: Any = None
    actor: Any = None
    ref: Any = None
    tag: int = 0

    def receive(self) -> list[tuple[str, Any]]:
        ray = self.backend.ray
        out = self.backend.take(self.tag)
        if not ray.wait([self.ref], timeout=0)[0]:
            return out
        self.backend.drain()  # what it queued before it returned comes before its reply
        out += self.backend.take(self.tag)
        try:
            reply = ray.get(self.ref)
        except ray.exceptions.RayError as e:  # the actor died (killed, its node lost) or could not start
            self.ended, self.reason = True, str(e).strip().splitlines()[0][:200]
            return out
        if reply is None:  # interrupted inside the actor
            self.ended, self.reason = True, "interrupted"
            return out
        self.done = reply[0] == "done"
        self.backend.ray.kill(self.actor)  # its resources go back to the cluster now, not when garbage-collected
        return out + [reply]

    def stop(self) -> None:
        self.backend.ray.kill(self.actor)


class _Ray:
    """Workers as Ray actors: one per GPU of the cluster (Ray gives each its own), or `workers` CPU actors."""

    def __init__(self, address: str, workers: int) -> None:
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
        self.ray, self.empty = ray, Empty
        self.owned = not ray.is_initialized()  # inside a Ray driver already: use its connection
        if self.owned:
            local = address == "local"
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                ray.init(address=None if local else address, log_to_driver=False, logging_level=logging.ERROR,
                         **({"include_dashboard": False} if local else {}))
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = "start a local Ray instance" if local else f"connect to the Ray cluster at {address}"
                raise ConfigError(f"--ray: could not {where}: {str(e).strip().splitlines()[0]}") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        self.cpu = gpus == 0
        self.slots = [f"cpu{i}" for i in range(workers)] if self.cpu else [f"gpu{i}" for i in range(gpus)]
        self.threads = max(1, cpus // len(self.slots)) if self.cpu else 0
        where = "a local Ray instance" if address == "local" and self.owned else f"Ray at {address}"
        self.label = f"{where}: {len(self.slots)} {'CPU' if self.cpu else 'GPU'} actor(s)"
        self.queue = Queue()
        self.actor_class = ray.remote(_RayWorker)
        self.inbox: dict[int, list] = {}
        self.tags = 0

    def start(self, slot: str, jobs: list[Job], opts: RunOptions) -> _Actor:
        self.tags += 1
        resources = {"num_cpus": self.threads} if self.cpu else {"num_gpus": 1, "num_cpus": 1}
        actor = self.actor_class.options(max_restarts=0, max_task_retries=0, **resources).remote()
        ref = actor.decode.remote(self.tags, jobs, opts, self.queue, "cpu" if self.cpu else "cuda", self.threads,
                                  len(self.slots) if self.cpu else 1)
        return _Actor(slot, {j.id: j for j in jobs}, backend=self, actor=actor, ref=ref, tag=self.tags)

    def drain(self, timeout: float = 0.0) -> None:
        """Move what the queue holds into the actors' inboxes (waiting up to `timeout` for the first item)."""
        try:
            items = [self.queue.get(timeout=timeout)] if timeout else []
            items += self.queue.get_nowait_batch(self.queue.qsize())
        except self.empty:
            items = []
        for tag, kind, payload in items:
            self.inbox.setdefault(tag, []).append((kind, payload))

    def take(self, tag: int) -> list:
        return self.inbox.pop(tag, [])

    def wait(self, running: list[_Worker], timeout: float) -> None:
        if not self.ray.wait([r.ref for r in running], timeout=0)[0]:
            self.drain(timeout)

    def device(self, worker_device: str) -> str:
        return f"{worker_device} x {len(self.slots)} Ray actors"

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


class Driver(Runner):
    """`sfi run` over workers: processes (one per GPU of `gpus`, or `workers` CPU processes) or, with
    `ray_address`, Ray actors ("local": a Ray instance of its own)."""

    def __init__(self, opts: RunOptions, observer: Observer, workers: int = 1, gpus: list[str] | None = None,
                 max_retries: int = 2, ray_address: str | None = None) -> None:
        super().__init__(opts, observer)
        if ray_address and importlib.util.find_spec("ray") is None:  # before any job is read or written
            raise ConfigError(RAY_MISSING)
        self.workers, self.gpus, self.ray_address = workers, gpus, ray_address
        self.max_retries = max_retries
        self.deaths: dict[str, int] = {}
        self.merged = 0
        self.backend: _Processes | _Ray | None = None

    def decode_jobs(self, todo: list[Job], writer) -> None:
        self.backend = backend = (_Ray(self.ray_address, self.workers) if self.ray_address else
                                  _Processes(self.workers, self.gpus))
        self.summary.workers = len(backend.slots)
        # Each entry: the jobs one worker decodes together.
        pending = deque(split_jobs(todo, len(backend.slots), self.cfg.generation.max_new_tokens))
        free, running = list(backend.slots), []
        opts = dataclasses.replace(self.opts, config=self.cfg)
        self.obs.start(len(todo))
        self.obs.message(f"{backend.label}: " + ", ".join(f"{len(jobs)} jobs" for jobs in pending))
        try:
            while pending or running:
                while pending and free:
                    running.append(backend.start(free.pop(0), pending.popleft(), opts))
                backend.wait(running, 1.0)
                for r in list(running):
                    for kind, payload in r.receive():
                        if kind == "result":
                            r.sent.add(payload.id)
                            self._emit(writer, payload)
                        elif kind == "fatal":
                            raise SfiError(payload)
                        else:
                            self._merge(payload)
                    if r.done or r.ended:
                        running.remove(r)
                        free.append(r.slot)
                        if not r.done:
                            pending.extend(self._died(r, writer))
        except BaseException:  # interrupted, or a worker's fatal error: no worker outlives the driver
            for r in running:
                r.stop()
            raise
        finally:
            backend.close()

    def _died(self, r: _Worker, writer) -> list[list[Job]]:
        """The jobs a dead worker had not sent back: again (together the first time, then each alone), or failed
        after `max_retries` deaths."""
        left = [j for i, j in r.jobs.items() if i not in r.sent]
        self.obs.message(f"worker {r.slot} died ({r.reason}) with {len(left)} job(s) unfinished"
                         + ("; decoding them again" if left else ""))
        again, alone = [], []
        for job in left:
            n = self.deaths[job.id] = self.deaths.get(job.id, 0) + 1
            if n > self.max_retries:
                self._fail(writer, job.id, f"the worker decoding this job died {n} time(s) (last: {r.reason}); "
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
            s.device = self.backend.device(worker["device"])
        self.merged += 1
        for key in ("load_s", "prefill_s", "decode_s", "decode_steps", "graph_captures", "capture_s",
                    "capture_warmup_s", "capture_record_s", "oom_retries", "compare_s", "prefill_tokens_computed",
                    "prefill_tokens_reused"):
            setattr(s, key, getattr(s, key) + worker[key])


def run_workers(opts: RunOptions, observer: Observer | None = None, workers: int = 1, gpus: list[str] | None = None,
                max_retries: int = 2, ray_address: str | None = None) -> RunSummary:
    return Driver(opts, observer or Silent(), workers, gpus, max_retries, ray_address).run()
