"""Plan the work: length buckets under a KV-memory budget, and the prompts that share a prefix.

Each bucket is decoded continuously by one `Decoder` whose cache has `slots` rows of the bucket's longest job
(prompt + completion); a row that finishes takes the bucket's next job. Rows in a bucket have similar lengths,
so little cache is wasted. Jobs whose prompts share a long prefix (one document, several questions) go to one
bucket, next to each other, so a later one copies the prefix from an earlier one still in its slot. The engine
halves the slots of a bucket that still runs out of memory; this module only plans.
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
    """Jobs decoded by one continuous batch: `slots` rows of `max_tokens` cache positions each."""

    items: list[Sized[T]]
    slots: int
    max_tokens: int


def plan_buckets(items: Sequence[Sized[T]], bytes_per_token: int, budget: int, max_batch_size: int,
                 groups: Sequence[int] | None = None,
                 continuous: bool = False) -> tuple[list[Bucket[T]], list[Sized[T]]]:
    """(buckets, too_big): longest bucket first; each bucket's rows fit `budget` bytes of KV together. Items
    sharing a `groups` id (a shared prefix; -1 = none) land in one bucket, consecutively. Items whose single-row
    cache exceeds the budget come back in `too_big`.

    With `continuous` (a finished row's slot takes the bucket's next job), a shorter length class joins the
    bucket before it while that bucket's rows are at least half as many as the class could run alone: its jobs
    then fill slots that would otherwise idle while the longer jobs finish, instead of waiting for a batch of
    their own. Length classes alone (static batches) keep every batch as wide as memory allows but decode
    each to its longest job."""
    groups = list(groups) if groups is not None else [-1] * len(items)
    too_big = [it for it in items if it.tokens * bytes_per_token > budget]
    # A group's bucket is its longest member's.
    group_tokens: dict[int, int] = {}
    for it, g in zip(items, groups, strict=True):
        if g >= 0:
            group_tokens[g] = max(group_tokens.get(g, 0), it.tokens)
    by_bucket: dict[int, list[tuple[int, int, Sized[T]]]] = {}
    for order, (it, g) in enumerate(zip(items, groups, strict=True)):
        if it.tokens * bytes_per_token > budget:
            continue
        key = bucket_of(group_tokens[g] if g >= 0 else it.tokens)
        # Longest first within a bucket; a group's members together, at its longest member's place.
        rank = -(group_tokens[g] if g >= 0 else it.tokens)
        by_bucket.setdefault(key, []).append((rank, g if g >= 0 else -1 - order, it))
    def slots(n: int, longest: int) -> int:
        return max(1, min(max_batch_size, n, budget // (longest * bytes_per_token)))

    buckets: list[Bucket[T]] = []
    for key in sorted(by_bucket, reverse=True):
        members = [it for _, _, it in sorted(by_bucket[key], key=lambda m: (m[0], m[1]))]
        longest = max(it.tokens for it in members)
        last = buckets[-1] if buckets else None
        if continuous and last is not None and 2 * slots(len(last.items) + len(members), last.max_tokens) >= \
                slots(len(members), longest):
            last.items += members
            last.slots = slots(len(last.items), last.max_tokens)
            continue
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
