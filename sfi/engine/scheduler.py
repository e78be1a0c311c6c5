"""Plan the work under a KV-memory budget, and find the prompts that share a prefix.

Continuous batching (`plan_pool`): every job goes to one `Decoder` over a pooled cache (sfi.cache), longest first;
a job takes a free slot and a segment of exactly its own length as soon as both exist, so jobs of 2k and 32k tokens
run side by side and a finished row's room goes to whatever fits next. Static batches (`plan_buckets`): length
buckets, each decoded to its longest job by a Decoder whose cache has `slots` rows of that job's length. Jobs whose
prompts share a long prefix (one document, several questions) stay next to each other, so a later one copies the
prefix from an earlier one still in its slot. The engine halves the slots of a plan that still runs out of memory;
this module only plans.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Sized(Generic[T]):
    item: T
    tokens: int  # prompt + max new tokens: the cache positions this row may need


def available_memory(device: torch.device) -> int:
    """Bytes free for caches now: on a GPU the device's free memory plus what PyTorch's allocator holds unused
    (a run's freed caches stay reserved by this process: a second run in it, such as `sfi bench --workload`'s
    next recipe, would otherwise plan with less and less); on a CPU the host's MemAvailable."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, unused)
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


@dataclass
class Bucket(Generic[T]):
    """Jobs decoded by one Decoder: `slots` rows of `max_tokens` cache positions each, or with `pool` > 0 `slots`
    rows sharing a pooled cache of that many positions (none longer than `max_tokens`)."""

    items: list[Sized[T]]
    slots: int
    max_tokens: int
    pool: int = 0


def _longest_first(items: Sequence[Sized[T]], groups: Sequence[int],
                   rank: Callable[[Sized[T]], int] | None = None) -> list[tuple[int, Sized[T]]]:
    """(what it ranks by, item), highest first: a group's members together, at its highest member's place (ranked
    by that member). `rank` defaults to the item's tokens."""
    rank = rank or (lambda it: it.tokens)
    group_rank: dict[int, int] = {}
    for it, g in zip(items, groups, strict=True):
        if g >= 0:
            group_rank[g] = max(group_rank.get(g, 0), rank(it))
    keyed = [(-(group_rank[g] if g >= 0 else rank(it)), g if g >= 0 else -1 - order, order, it)
             for order, (it, g) in enumerate(zip(items, groups, strict=True))]
    return [(-rank, it) for rank, _, _, it in sorted(keyed, key=lambda k: k[:3])]


def plan_pool(items: Sequence[Sized[T]], bytes_per_token: int, budget: int, max_batch_size: int,
              slot_tokens: int = 0, groups: Sequence[int] | None = None,
              rank: Callable[[Sized[T]], int] | None = None) -> tuple[Bucket[T] | None, list[Sized[T]]]:
    """(one pooled bucket of every item that fits, too_big): items' `tokens` are the cache positions they take in
    the pool; each slot also costs `slot_tokens` positions' worth outside it (SFI's compact memory). The pool is no
    larger than the items need all at once, and leaves room for at least the longest item; slots are as many as
    `max_batch_size` and the items allow while it does. The bucket's items are in admission order: highest `rank`
    first (default: tokens), a shared prefix's group together."""
    groups = list(groups) if groups is not None else [-1] * len(items)
    ordered = _longest_first(items, groups, rank)
    positions = budget // max(bytes_per_token, 1)
    slots = max(1, min(max_batch_size, len(items)))
    longest = max((it.tokens for it in items if it.tokens <= positions - slot_tokens), default=1)
    if slot_tokens:  # the most slots that still leave the longest item its room
        slots = max(1, min(slots, (positions - longest) // slot_tokens))
    pool = positions - slots * slot_tokens
    fit = [it for _, it in ordered if it.tokens <= pool]
    too_big = [it for it in items if it.tokens > pool]
    if not fit:
        return None, too_big
    pool = min(pool, sum(it.tokens for it in fit))
    return Bucket(fit, min(slots, len(fit)), max(it.tokens for it in fit), pool), too_big


def plan_buckets(items: Sequence[Sized[T]], bytes_per_token: int, budget: int, max_batch_size: int,
                 groups: Sequence[int] | None = None) -> tuple[list[Bucket[T]], list[Sized[T]]]:
    """(buckets, too_big) for static batches: longest bucket first; each bucket's rows fit `budget` bytes of KV
    together. Items sharing a `groups` id (a shared prefix; -1 = none) land in one bucket, consecutively. Items
    whose single-row cache exceeds the budget come back in `too_big`. Each batch is as wide as memory allows and
    decodes to its longest job."""
    groups = list(groups) if groups is not None else [-1] * len(items)
    too_big = [it for it in items if it.tokens * bytes_per_token > budget]
    by_bucket: dict[int, list[Sized[T]]] = {}
    for rank, it in _longest_first(items, groups):
        if it.tokens * bytes_per_token <= budget:
            by_bucket.setdefault(bucket_of(rank), []).append(it)  # a group's bucket is its longest member's

    def slots(n: int, longest: int) -> int:
        return max(1, min(max_batch_size, n, budget // (longest * bytes_per_token)))

    buckets: list[Bucket[T]] = []
    for key in sorted(by_bucket, reverse=True):
        members = by_bucket[key]
        longest = max(it.tokens for it in members)
        buckets.append(Bucket(members, slots(len(members), longest), longest))
    return buckets, too_big


def prefix_groups(prompts: Sequence[Sequence[int]], min_shared: int, keep: int) -> tuple[list[int], list[int]]:
    """(group id or -1 per prompt, prefix length each may copy): prompts whose first `min_shared` or more tokens
    agree with another's form a group; each member may copy the group's common prefix, short of its own last
    `keep` tokens (the bootstrap selection needs its own last queries). Sorting brings equal prefixes next to each
    other, so the longest common prefix of neighbours finds every group in O(n log n) comparisons."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    group, shared = [-1] * len(prompts), [0] * len(prompts)
    run: list[int] = []
    run_lcp = 0

    def close() -> None:
        if len(run) > 1:
            for i in run:
                group[i] = run[0]
                n = min(run_lcp, len(prompts[i]) - keep)
                shared[i] = n if n >= min_shared else 0
    for a, b in zip(order, order[1:] + [None], strict=True):
        if not run:
            run, run_lcp = [a], 1 << 62
        lcp = _common(prompts[a], prompts[b]) if b is not None else 0
        if b is not None and lcp >= min_shared:
            run.append(b)
            run_lcp = min(run_lcp, lcp)
        else:
            close()
            run = []
    return group, shared


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
