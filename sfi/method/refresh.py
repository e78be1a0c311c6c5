"""The slow rows' refresh inside a static decode step, a group of layers at a time, overlapped with the layers
after it.

A slow row's attention (the ranged kernel over its whole cache) also leaves the Selector's logits for its
domain (one read of K for both); the keys' norms are the cache's own (written with the keys, sfi.cache). After the last
attention of a group of layers, the refresh of the whole group (fused Selector scores, the top-k threshold,
kept positions, compaction writer: about ten launches for every layer and slow row of the group at once) is
queued on a side stream while the main stream goes on with the next layers; the step ends by joining the
two. Refreshing layer by layer would cost the same ten launches per layer, a chain of several hundred small
kernels that outlasts the step itself at short contexts; three groups keep the chain short and still overlap
two thirds of it. On a CPU the same work runs inline.

Ordering, not timing, decides every result: a group's refresh waits for its last attention (stream order);
the logits live in two group buffers, so group j's first attention waits for the refresh of group j - 2 to
finish reading the buffer it reuses; the next step starts after the join. The refresh writes only the slow
rows' compact memory of its layers, which no one reads in this step (slow rows read none of it, fast rows
read their own). Everything has static shapes and device-side metadata, so the whole step, refresh included,
is captured in one CUDA graph per (batch, key capacity, slow-row count).

Slots: slot s (0 <= s < S) is the s-th slow row of the step; `meta` holds per slot its cache row, the
first domain position lo, the domain length n, the number of picks kept, min(k_head, n), and where the row's
position 0 lies in the cache (its base: 0 but in a pooled cache, sfi.cache).
"""

from __future__ import annotations

import torch

from sfi_kernels import (
    LogitCapture,
    compact_write,
    compact_write_ref,
    selector_scores,
    selector_scores_ref,
)

from ..cache import KVCache
from .memory import SparseMemory
from .selector import SelectorParams, top_positions

GROUPS = 3  # refresh groups per step (fewer when the layer count has no divisor near n_layers / 3)


def group_size(n_layers: int, groups: int = GROUPS) -> int:
    """Layers refreshed together: the largest divisor of n_layers not above ceil(n_layers / groups)."""
    target = -(-n_layers // groups)
    return max(g for g in range(1, target + 1) if n_layers % g == 0)


class StepRefresh:
    """Buffers, streams and events for the in-step refresh of up to `slots` (default `batch`) slow rows of a batch
    of `batch` rows, with domains of up to `capacity` positions. `row_meta` [3, batch] int32 (slot or -1, lo, hi
    per batch row, lo and hi including the row's base) and `meta` [5, slots] int32 (per slot) are filled by the
    caller before each step."""

    def __init__(self, cache: KVCache, memory: SparseMemory, params: SelectorParams, batch: int, capacity: int,
                 n_heads: int, slots: int | None = None, z: torch.Tensor | None = None) -> None:
        self.cache, self.memory, self.params = cache, memory, params
        n_layers = cache.k.shape[0]
        self.group = g = group_size(n_layers)
        dev = cache.k.device
        # [2 group buffers, slot, layer of the group, heads, position]: a group's problems are contiguous.
        slots = batch if slots is None else slots
        # The logits `z` of another StepRefresh of the same slots and capacity may be shared: steps run one after
        # another and each step's refresh has finished before the next step starts (`finish`).
        self.z = z if z is not None else torch.zeros(2, slots, g, n_heads, capacity, dtype=torch.float32, device=dev)
        self.row_meta = torch.full((3, batch), -1, dtype=torch.int32, device=dev)
        self.meta = torch.zeros(5, slots, dtype=torch.int32, device=dev)
        # Rows of the flattened cache (KVCache.flat) and memory for (group, layer of the group), before adding
        # the cache row times its stride.
        self.flat_k, self.flat_v, self.layer_stride, self.slot_stride = cache.flat()
        self.flat_norms = cache.flat_norms()
        layers = torch.arange(n_layers, dtype=torch.int32, device=dev)
        self.layer_rows = (layers * self.layer_stride).view(-1, g)
        self.memory_rows = (layers * memory.k.shape[1]).view(-1, g)
        self.n_slots = 0
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device=dev)
            self.done = [torch.cuda.Event() for _ in range(n_layers // g)]

    def for_step(self, n_slots: int) -> StepRefresh | None:
        """This object set up for a step with `n_slots` slow rows, or None when there are none."""
        self.n_slots = n_slots
        return self if n_slots else None

    def capture(self, layer: int) -> LogitCapture:
        slot, lo, hi = self.row_meta.unbind(0)
        buf, j = (layer // self.group) % 2, layer % self.group
        return LogitCapture(slot, lo, hi, self.z[buf, :, j])

    def before_attention(self, layer: int) -> None:
        group = layer // self.group
        if self.cuda and layer % self.group == 0 and group >= 2:
            torch.cuda.current_stream().wait_event(self.done[group - 2])  # its buffer has been read

    def after_attention(self, layer: int) -> None:
        if (layer + 1) % self.group:
            return
        group = layer // self.group
        if not self.cuda:
            self._refresh(group)
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self._refresh(group)
            self.done[group].record()

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.side)

    def _refresh(self, group: int) -> None:
        s, g = self.n_slots, self.group
        rows, lo, n, count, base = self.meta[:, :s].unbind(0)
        hq, cap = self.z.shape[3], self.z.shape[4]
        hkv = self.flat_norms.shape[1]
        buf = group % 2
        # Problem p = slot * g + layer of the group; query heads h*G..h*G+G-1 share KV head h.
        z = self.z[buf, :s].view(s * g, hkv, hq // hkv, cap)
        per_problem = lambda t: t.repeat_interleave(g)  # noqa: E731  [S] -> [S * g]
        # The kernels on a GPU, their references on a CPU (the same step either way).
        scores_fn, write_fn = ((selector_scores, compact_write) if z.is_cuda else
                               (selector_scores_ref, compact_write_ref))
        # The compaction writer and the norms see the layers of the cache and memory as rows (KVCache.flat).
        cache_rows = (self.layer_rows[group][None, :] + rows[:, None] * self.slot_stride).view(-1)
        score = scores_fn(z, self.flat_norms, per_problem(n), self.params,
                          norm_at=(cache_rows, per_problem(base + lo)))
        # [S * g, Hkv, min(k_head, cap)], domain order; the -inf scores (past n) come last and are not written
        picks = top_positions(score, self.memory.k_head)
        memory_rows = (self.memory_rows[group][None, :] + rows[:, None]).view(-1)
        m = self.memory
        flat = lambda t: t.view(-1, *t.shape[2:])  # noqa: E731  [L, B, ...] -> [L * B, ...]
        write_fn(self.flat_k, self.flat_v, flat(m.k), flat(m.v), memory_rows, per_problem(lo), per_problem(count),
                 picks, m.sink, cache_rows, per_problem(base))
