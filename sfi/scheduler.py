"""Group prepared jobs into batches: by length bucket, under a KV-memory budget.

A batch's cost is its KV cache (rows x the longest row's prompt + completion x bytes per token) plus
activation headroom; rows in a bucket have similar lengths so little cache is wasted. The engine splits
a batch that still runs out of memory; this module only plans.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Sized(Generic[T]):
    item: T
    tokens: int  # prompt + max new tokens: the cache positions this row may need


def available_memory(device: torch.device) -> int:
    """Bytes free for caches now: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def bucket_of(tokens: int) -> int:
    """Length bucket: powers of two from 256 up, so a batch's rows differ in length by at most 2x."""
    return max(8, math.ceil(math.log2(max(tokens, 1))))


def plan_batches(items: Sequence[Sized[T]], bytes_per_token: int, budget: int,
                 max_batch_size: int) -> tuple[list[list[Sized[T]]], list[Sized[T]]]:
    """(batches, too_big): longest bucket first, each batch within `budget` bytes of KV.

    Items whose single-row cache exceeds the budget come back in `too_big`.
    """
    too_big = [it for it in items if it.tokens * bytes_per_token > budget]
    fits = sorted((it for it in items if it.tokens * bytes_per_token <= budget),
                  key=lambda it: (-bucket_of(it.tokens), -it.tokens))
    batches: list[list[Sized[T]]] = []
    current: list[Sized[T]] = []
    for it in fits:
        # Items are in descending length, so the first row of a batch is its longest.
        longest = current[0].tokens if current else it.tokens
        same_bucket = not current or bucket_of(current[0].tokens) == bucket_of(it.tokens)
        if current and (not same_bucket or len(current) >= max_batch_size
                        or (len(current) + 1) * longest * bytes_per_token > budget):
            batches.append(current)
            current = []
        current.append(it)
    if current:
        batches.append(current)
    return batches, too_big
