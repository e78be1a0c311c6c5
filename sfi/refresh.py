"""The slow rows' refresh inside a static decode step, layer by layer, overlapped with the layers after it.

A slow row's attention (the ranged kernel over its whole cache) also leaves the Selector's inputs for its
domain: the scaled logits of its queries and the norms of its keys (one read of K for both). Right after
layer l's attention, the refresh of layer l (fused Selector scores, top-k, compaction writer) is queued
on a side stream while the main stream goes on with layer l + 1; the step ends by joining the two. On a
CPU the same work runs inline.

Ordering, not timing, decides every result: layer l's refresh waits for layer l's attention (an event);
the logits live in a ring of `RING` layer buffers, so layer l's attention first waits for the refresh of
layer l - RING to finish reading the slot it reuses; the next step starts after the join. The refresh
writes only the slow rows' compact memory of layer l, which no one reads in this step (slow rows read
none of it, fast rows read their own). Everything has static shapes and device-side metadata, so the
whole step, refresh included, is captured in one CUDA graph per (batch, key capacity, slow-row count).

Slots: slot s (0 <= s < S) is the s-th slow row of the step; `meta` holds per slot its cache row, the
first domain position lo, the domain length n and the number of picks kept, min(k_head, n).
"""

from __future__ import annotations

import torch

from sfi_kernels import LogitCapture, compact_write, selector_scores

from .cache import KVCache
from .memory import SparseMemory
from .selector import SelectorParams, top_positions

RING = 4  # layers of logits in flight: bounds the buffers (128k x batch 3: ~0.3 GB) without stalling


class StepRefresh:
    """Buffers, streams and events for the in-step refresh of up to `batch` slow rows with domains of
    up to `capacity` positions. `row_meta` [3, B] int32 (slot or -1, lo, hi per batch row) and `meta`
    [4, B] int32 (per slot) are filled by the caller before each step."""

    def __init__(self, cache: KVCache, memory: SparseMemory, params: SelectorParams, batch: int, capacity: int,
                 n_heads: int) -> None:
        self.cache, self.memory, self.params = cache, memory, params
        n_layers, _, hkv, _, _ = cache.k.shape
        self.ring = min(RING, n_layers)
        dev = cache.k.device
        self.z = torch.zeros(self.ring, batch, n_heads, capacity, dtype=torch.float32, device=dev)
        self.norms = torch.zeros(self.ring, batch, hkv, capacity, dtype=torch.float32, device=dev)
        self.row_meta = torch.full((3, batch), -1, dtype=torch.int32, device=dev)
        self.meta = torch.zeros(4, batch, dtype=torch.int32, device=dev)
        self.n_slots = 0
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device=dev)
            self.done = [torch.cuda.Event() for _ in range(n_layers)]

    def for_step(self, n_slots: int) -> StepRefresh | None:
        """This object set up for a step with `n_slots` slow rows, or None when there are none."""
        self.n_slots = n_slots
        return self if n_slots else None

    def capture(self, layer: int) -> LogitCapture:
        slot, lo, hi = self.row_meta.unbind(0)
        buf = layer % self.ring
        return LogitCapture(slot, lo, hi, self.z[buf], self.norms[buf])

    def before_attention(self, layer: int) -> None:
        if self.cuda and layer >= self.ring:
            torch.cuda.current_stream().wait_event(self.done[layer - self.ring])  # its ring slot is free

    def after_attention(self, layer: int) -> None:
        if not self.cuda:
            self._refresh(layer)
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self._refresh(layer)
            self.done[layer].record()

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.side)

    def _refresh(self, layer: int) -> None:
        s, buf = self.n_slots, layer % self.ring
        rows, lo, n, count = self.meta[:, :s].unbind(0)
        hq, cap = self.z.shape[2], self.z.shape[3]
        hkv = self.norms.shape[2]
        z = self.z[buf, :s].view(s, hkv, hq // hkv, cap)  # query heads h*G..h*G+G-1 share KV head h
        score = selector_scores(z, self.norms[buf, :s], n, self.params)  # [S, Hkv, C], -inf past n
        picks = top_positions(score, self.memory.k_head)  # [S, Hkv, min(k_head, C)], domain order
        c, m = self.cache, self.memory
        compact_write(c.k[layer], c.v[layer], m.k[layer], m.v[layer], rows, lo, count, picks, m.sink)
