"""The decode loop: prefill each row, then one batched step at a time until every row has stopped.

`generate` is a generator of per-step records, so progress, timing and reports need no hooks in the
loop. Every step here is dense; the SFI issue adds a per-row slow/fast plan to `DecodeStep`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .model import DecodeStep, PrefillStep, Transformer
from .sampling import RowSampler, sample
from .stopping import StopChecker


@dataclass
class Request:
    """One row of a batch: its prompt, how to sample, when to stop."""

    prompt_ids: list[int]
    sampler: RowSampler
    stopper: StopChecker


@dataclass
class PrefillDone:
    row: int
    started: float  # perf_counter at the row's prefill start
    seconds: float
    finished: bool  # the first token already ended the row (eos, or max_new_tokens == 1)


@dataclass
class StepDone:
    step: int
    rows: list[int]  # rows that took this step
    tokens: list[int]  # the token each of them got
    finished: list[int]  # rows that stopped at this step
    seconds: float


def prefill_row(model: Transformer, cache: KVCache, row: int, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Fill cache row `row` with the prompt `ids` [T], `chunk` tokens at a time; return last logits [V]."""
    logits = None
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        logits = model.prefill(piece, cache, PrefillStep(row, start, len(piece)))
    assert logits is not None, "empty prompt"
    return logits


def cache_length(requests: Sequence[Request]) -> int:
    """Cache positions a batch needs: the last sampled token of a row is never written back."""
    return max(len(r.prompt_ids) + r.stopper.max_new_tokens - 1 for r in requests)


def generate(model: Transformer, requests: Sequence[Request], prefill_chunk: int = 2048,
             cache: KVCache | None = None) -> Iterator[PrefillDone | StepDone]:
    """Decode `requests` as one batch; each row's tokens accumulate in its StopChecker."""
    device = model.device
    cache = cache or model.new_cache(len(requests), cache_length(requests))
    lengths = [0] * len(requests)
    last = [0] * len(requests)
    for row, req in enumerate(requests):
        started = time.perf_counter()
        ids = torch.tensor(req.prompt_ids, dtype=torch.long, device=device)
        logits = prefill_row(model, cache, row, ids, prefill_chunk)
        token = int(sample(logits[None], [req.sampler])[0])
        lengths[row], last[row] = len(req.prompt_ids), token
        done = req.stopper.feed(token)
        yield PrefillDone(row, started, time.perf_counter() - started, done)

    step = 0
    active = [row for row, req in enumerate(requests) if not req.stopper.finished]
    while active:
        started = time.perf_counter()
        rows = torch.tensor(active, dtype=torch.long, device=device)
        positions = torch.tensor([lengths[r] for r in active], dtype=torch.long, device=device)
        plan = DecodeStep(rows=rows, positions=positions, kv_len=max(lengths[r] for r in active) + 1,
                          whole_cache=len(active) == cache.batch)
        tokens_in = torch.tensor([last[r] for r in active], dtype=torch.long, device=device)
        logits = model.decode(tokens_in, cache, plan)
        tokens = sample(logits, [requests[r].sampler for r in active]).tolist()
        finished = []
        for row, token in zip(active, tokens, strict=True):
            lengths[row] += 1
            last[row] = token
            if requests[row].stopper.feed(token):
                finished.append(row)
        yield StepDone(step, list(active), tokens, finished, time.perf_counter() - started)
        step += 1
        active = [r for r in active if not requests[r].stopper.finished]
