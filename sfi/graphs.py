"""Static decode steps: every step of a batch runs through the same buffers, so on a GPU it is replayed
from a CUDA graph instead of being launched op by op.

Only metadata changes between steps. Each row's attention is one range of the compact memory followed
by one span of its main cache (see kernels/ranged_decode.py): a fast row reads compact + recent, a slow
or dense row an empty compact range + its whole cache. So slow rows do not break the graph for the
others. The graph also leaves every layer's queries in a buffer; after the replay, each slow row's
refresh (logits over its domain, Selector, compaction) runs for all layers at once. No row reads a
refreshed memory before the next step, so this gives the same selections as refreshing layer by layer
inside the step.

One graph per (batch size, key-split count): the split count is the number of 256-key (512 past 16k)
chunks of the longest row, rounded up to a power of two, so a batch growing from 8k to 8k + 256 tokens
keeps its graph, and splits past a row's end cost an empty block each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sfi_kernels import default_split

from .cache import KVCache
from .memory import SparseMemory
from .model import DecodeStep, Transformer


def _bucket(n_split: int) -> int:
    return 1 << max(0, (n_split - 1).bit_length())


class _Buffers:
    def __init__(self, model: Transformer, batch: int, keep_queries: bool) -> None:
        dev, a = model.device, model.args
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.rows = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.meta = torch.zeros(4, batch, dtype=torch.int32, device=dev)  # rows, compact_len, span_start, span_len
        self.q_out = (torch.zeros(a.n_layers, batch, a.n_heads, a.head_dim, dtype=model.dtype, device=dev)
                      if keep_queries else None)
        # Host staging, copied in one transfer per step.
        self.host = torch.zeros(7, batch, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.copied: torch.cuda.Event | None = None

    def step(self, cache: KVCache, memory: SparseMemory | None, max_keys: int) -> DecodeStep:
        rows, clen, start, span = self.meta.unbind(0)
        return DecodeStep(rows=self.rows, positions=self.positions, kv_len=max_keys, whole_cache=False,
                          fixed_ranges=(rows, clen, start, span, max_keys), memory=memory, q_out=self.q_out)


class StaticDecoder:
    """`model.decode` through static buffers; with `graphs` (CUDA only) each step shape is captured once
    and replayed."""

    def __init__(self, model: Transformer, cache: KVCache, memory: SparseMemory | None, graphs: bool) -> None:
        self.model, self.cache, self.memory = model, cache, memory
        self.graphs = graphs and model.device.type == "cuda"
        self.keep_queries = memory is not None
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.captures = 0
        self.captured = False  # the last step captured a new graph (a one-time cost)

    def queries(self, batch: int) -> torch.Tensor | None:
        """[L, B, Hq, D]: the last step's queries of each layer (with a compact memory only)."""
        return self._buffers[batch].q_out

    def decode(self, tokens: Sequence[int], rows: Sequence[int], positions: Sequence[int],
               compact_len: Sequence[int], span_start: Sequence[int]) -> torch.Tensor:
        """One step; float32 logits [B, V], valid until the next call. Row b reads compact_len[b] rows of
        its compact memory, then its cache from span_start[b] to positions[b] (inclusive)."""
        b = len(rows)
        buf = self._buffers.get(b)
        if buf is None:
            buf = self._buffers[b] = _Buffers(self.model, b, self.keep_queries)
        span = [p + 1 - s for p, s in zip(positions, span_start, strict=True)]
        host = buf.host
        if buf.copied is not None:
            buf.copied.synchronize()  # the last step's asynchronous copy has read the pinned buffer
        for i, values in enumerate((tokens, rows, positions, rows, compact_len, span_start, span)):
            host[i] = torch.as_tensor(values, dtype=torch.long)
        dev = host.to(self.model.device, non_blocking=True)
        if self.model.device.type == "cuda":
            buf.copied = torch.cuda.Event()
            buf.copied.record()
        buf.tokens.copy_(dev[0])
        buf.rows.copy_(dev[1])
        buf.positions.copy_(dev[2])
        buf.meta.copy_(dev[3:])
        longest = max(c + s for c, s in zip(compact_len, span, strict=True))
        split = default_split(longest)
        n_split = _bucket(-(-longest // split))
        max_keys = n_split * split  # the kernel's own split for max_keys is `split` again
        if not self.graphs:
            return self.model.decode(buf.tokens, self.cache, buf.step(self.cache, self.memory, max_keys))
        key = (b, max_keys)
        self.captured = key not in self._graphs
        if self.captured:
            self._graphs[key] = self._capture(buf, max_keys)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, buf: _Buffers, max_keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        step = buf.step(self.cache, self.memory, max_keys)
        # Warm up on a side stream (lazy initialisation, Triton compilation), as capture requires. The
        # warm-up writes the same cache positions the real step will write, with the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(buf.tokens, self.cache, step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.decode(buf.tokens, self.cache, step)
        self.captures += 1
        return graph, logits
