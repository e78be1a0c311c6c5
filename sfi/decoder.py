"""The decode loop: prefill each row, then one batched step at a time until every row has stopped.

`generate` is a generator of per-step records, so progress, timing and reports need no hooks in the
loop. With an `SfiRuntime` each row's prefill ends with the bootstrap selection and each step carries a
per-row slow/fast plan; without one every step is dense (the `dense` recipe).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .graphs import StaticDecoder
from .method.memory import SparseMemory
from .method.runtime import Capture, SfiRuntime
from .model import PrefillStep, Transformer
from .sampling import RowSampler, sample
from .stopping import StopChecker


@dataclass
class Request:
    """One row of a batch: its prompt, how to sample, when to stop."""

    prompt_ids: list[int]
    sampler: RowSampler
    stopper: StopChecker


@dataclass
class Prefilled:
    """A row already prefilled (by `prefill_capture`): its last logits and, per layer, the last W
    queries' logits over every prompt position, from which any recipe's bootstrap can be cut."""

    logits: torch.Tensor  # [V]
    window_logits: list[torch.Tensor]  # per layer [Hq, W, T], -inf where a query cannot see


@dataclass
class PrefillDone:
    row: int
    started: float  # perf_counter at the row's prefill start
    seconds: float
    finished: bool  # the first token already ended the row (eos, or max_new_tokens == 1)
    logprob: float | None = None  # with forced tokens: log p of the first token
    sampled: int | None = None  # with forced tokens: what the sampler picked instead


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


def chunk_starts(length: int, chunk: int, last_at_least: int = 1) -> list[int]:
    """Start positions of prefill chunks; the last chunk holds at least `last_at_least` tokens (the
    bootstrap window must lie in one chunk)."""
    starts = list(range(0, length, chunk))
    if len(starts) > 1 and length - starts[-1] < last_at_least:
        starts.pop()
    return starts


def prefill_row(model: Transformer, cache: KVCache, row: int, ids: torch.Tensor, chunk: int,
                bootstrap: Capture | None = None, refresh=None) -> torch.Tensor:
    """Fill cache row `row` with the prompt `ids` [T], `chunk` tokens at a time; return last logits [V].

    On a GPU the prompt goes layer by layer with one flash attention call per layer (see
    `Transformer.prefill_layer_major`); on a CPU, chunk by chunk through all layers."""
    if ids.is_cuda and len(ids) > chunk:
        logits = _layer_major_prefill(model, cache, row, ids, chunk, bootstrap, refresh)
        if logits is not None:
            return logits
    starts = chunk_starts(len(ids), chunk, bootstrap.batch_index if bootstrap else 1)
    bounds = list(zip(starts, starts[1:] + [len(ids)], strict=True))
    logits = None
    for i, (start, end) in enumerate(bounds):
        last = i == len(bounds) - 1
        step = PrefillStep(row, start, end - start, bootstrap if last else None, refresh if last else None)
        logits = model.prefill(ids[start:end], cache, step)
    assert logits is not None, "empty prompt"
    return logits


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


def cache_length(requests: Sequence[Request]) -> int:
    """Cache positions a batch needs: the last sampled token of a row is never written back."""
    return max(len(r.prompt_ids) + r.stopper.max_new_tokens - 1 for r in requests)


def prefill_capture(model: Transformer, cache: KVCache, row: int, ids: Sequence[int], chunk: int,
                    window: int) -> Prefilled:
    """Prefill one row and keep what every recipe's bootstrap needs (see `Prefilled`)."""
    captured: list[torch.Tensor] = []
    capture = Capture(min(window, len(ids)), row, 0, len(ids))
    logits = prefill_row(model, cache, row, torch.tensor(list(ids), device=model.device), chunk, capture,
                         lambda layer, r, z: captured.append(z))
    return Prefilled(logits, captured)


def _choose(logits: torch.Tensor, requests: Sequence[Request], rows: Sequence[int],
            forced: Sequence[Sequence[int]] | None) -> tuple[list[int], list[int], list[float] | None]:
    """(tokens fed next, tokens sampled, log p of the fed tokens or None): a row's forced tokens are fed while
    it has any left, then its own samples."""
    sampled = sample(logits, [requests[r].sampler for r in rows]).tolist()
    if not forced:
        return sampled, sampled, None
    done = [len(requests[r].stopper.token_ids) for r in rows]
    tokens = [forced[r][i] if i < len(forced[r]) else t for r, i, t in zip(rows, done, sampled, strict=True)]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(rows)), tokens].tolist()
    return tokens, sampled, logprobs


def generate(model: Transformer, requests: Sequence[Request], prefill_chunk: int = 2048,
             cache: KVCache | None = None, runtime: SfiRuntime | None = None,
             prefilled: Sequence[Prefilled] | None = None,
             forced: Sequence[Sequence[int]] | None = None,
             cuda_graphs: bool = True, probe=None) -> Iterator[PrefillDone | StepDone]:
    """Decode `requests` as one batch; each row's tokens accumulate in its StopChecker.

    `prefilled` (with `cache`) skips the prompt forward passes; `forced` feeds each row's given tokens before
    its own samples (teacher forcing) and reports the log-probabilities of the tokens fed. Every decode step
    is a static step (sfi.graphs), replayed from a CUDA graph on a GPU when `cuda_graphs`; `probe` (eval's
    recall diagnostic) sees every layer's attention, which needs the steps launched op by op.
    """
    device = model.device
    cache = cache or model.new_cache(len(requests), cache_length(requests))
    if runtime is not None:
        memory = None
        if runtime.needs_memory([len(r.prompt_ids) + r.stopper.max_new_tokens for r in requests]):
            a, cfg = model.args, runtime.cfg
            memory = SparseMemory(a.n_layers, len(requests), a.n_kv_heads, cfg.sink, cfg.k_head, a.head_dim,
                                  model.dtype, device)
        runtime.attach(memory, cache)
    lengths = [0] * len(requests)
    last = [0] * len(requests)
    for row, req in enumerate(requests):
        started = time.perf_counter()
        boot = runtime.bootstrap(row, len(req.prompt_ids)) if runtime is not None else None
        if prefilled is not None:
            logits = prefilled[row].logits
            if boot:  # every layer's bootstrap selection in one pass
                z = torch.stack(prefilled[row].window_logits)[:, :, -boot.batch_index:, boot.lo:boot.hi]
                runtime.refresh(slice(None), row, z)
        else:
            ids = torch.tensor(req.prompt_ids, dtype=torch.long, device=device)
            logits = prefill_row(model, cache, row, ids, prefill_chunk, boot, runtime.refresh if runtime else None)
        (token,), (sampled,), logprob = _choose(logits[None], requests, [row], forced)
        lengths[row], last[row] = len(req.prompt_ids), token
        done = req.stopper.feed(token)
        if runtime is not None:
            runtime.observe(row, token)
        yield PrefillDone(row, started, time.perf_counter() - started, done, logprob[0] if logprob else None,
                          sampled if forced else None)

    step = 0
    active = [row for row, req in enumerate(requests) if not req.stopper.finished]
    decoder = StaticDecoder(model, cache, runtime.memory if runtime else None, cuda_graphs and probe is None,
                            runtime.score_params if runtime else None, runtime.cfg.dense_layers if runtime else 0)
    while active:
        started = time.perf_counter()
        kinds, captures = runtime.kinds(active, lengths) if runtime is not None else (None, [])
        clen, start = runtime.ranges(active, kinds) if runtime is not None else ([0] * len(active),) * 2
        slow = [(c.batch_index, c.lo, c.hi) for c in captures]
        logits = decoder.decode([last[r] for r in active], active, [lengths[r] for r in active], clen, start, slow,
                                probe=probe)
        tokens, sampled, logprobs = _choose(logits, requests, active, forced)
        seconds = time.perf_counter() - started
        if runtime is not None:
            runtime.record(active, kinds, lengths, seconds)
        finished = []
        for row, token in zip(active, tokens, strict=True):
            lengths[row] += 1
            last[row] = token
            if requests[row].stopper.feed(token):
                finished.append(row)
            elif runtime is not None:
                runtime.observe(row, token)
        yield StepDone(step, list(active), tokens, finished, seconds, kinds, logprobs, decoder.captured,
                       sampled if forced else None)
        step += 1
        active = [r for r in active if not requests[r].stopper.finished]
