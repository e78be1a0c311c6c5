"""Static decode steps: every step of a batch runs through the same buffers, so on a GPU it is replayed
from a CUDA graph instead of being launched op by op.

Only metadata changes between steps. Each row's attention is one range of the compact memory followed
by one span of its main cache (see sfi_kernels/ranged_decode.py): a fast row reads compact + recent, a slow
or dense row an empty compact range + its whole cache. So slow rows do not break the graph for the
others. Slow rows' refreshes run inside the step, a group of layers at a time on a side stream after the
group's last attention (see sfi.method.refresh), and are part of the graph.

One graph per (batch size, split size, split count, slow-row count): the split size follows the longest row and the rows
decoding (`default_split`), the split count is the number of splits of the longest row rounded up (`_bucket`), so a
growing batch keeps its graph for long stretches, and splits past a row's end cost an empty block each. With graphs, a
step's batch is padded to the next power of two (at most the cache's rows): rows that are not decoding (free, or still
prefilling) ride along as padding that reads and writes only the last position of their row of the cache view (in a
pool, the scratch position past every segment), which no real token has reached yet. Slow rows come first (the decoder
orders them so) and attend in a launch of their own with a split for their whole caches, the other rows with a split for
their short ranges: one split for all made the fast rows of a slow step run a 128k row's split count, mostly empty
blocks (p90 step 20.7 ms against p50 4.2 ms at 128k x 4 on an H200, before this). Under continuous batching the number
of decoding rows changes all the time; padded, the batch takes one of a few sizes, so graphs are not captured again for
every new count, and a batch's tail of a few rows does not pay for the rows that have left. (Padding to every slot was
measured on an H200: it made static batches' decode 1.5x slower, their tails running at full width.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sfi_kernels import default_split

from ..cache import KVCache
from ..method.memory import SparseMemory
from ..method.refresh import StepRefresh
from ..method.selector import SelectorParams
from ..model import DecodeStep, Transformer

log = logging.getLogger(__name__)



def _bucket(n_split: int) -> int:
    """Splits a graph is captured for: powers of two up to 64, then multiples of 32 (at 128k a power of two would
    launch 512 splits for 257, half of them empty, in every layer of every step)."""
    if n_split <= 64:
        return 1 << max(0, (n_split - 1).bit_length())
    return -(-n_split // 32) * 32


class _Buffers:
    def __init__(self, model: Transformer, batch: int) -> None:
        dev = model.device
        # A step's inputs are rows of two device tensors, each filled by one transfer from a pinned twin per step (no
        # copy kernels on the host's critical path): int64 tokens, rows, positions, write positions (base +
        # position, a pooled cache); int32 ranges (rows, compact_len, span_start, span_len), base, the same ranges
        # for a whole-cache read, a slow row's capture (slot or -1, lo, hi) and its slot's (row, lo, n, count, base).
        self.long = torch.zeros(4, batch, dtype=torch.long, device=dev)
        self.int = torch.zeros(17, batch, dtype=torch.int32, device=dev)
        self.tokens, self.rows, self.positions, self.write_at = self.long.unbind(0)
        self.meta, self.base, self.dense_meta = self.int[0:4], self.int[4], self.int[5:9]
        self.capture_meta, self.slot_meta = self.int[9:12], self.int[12:17]
        pinned = dev.type == "cuda"
        self.host_long = torch.zeros(self.long.shape, dtype=torch.long, pin_memory=pinned)
        self.host_int = torch.zeros(self.int.shape, dtype=torch.int32, pin_memory=pinned)
        # Filled through numpy views: assigning Python lists there takes a fifth of building tensors from them
        # (16 rows on the CI machine: 19 against 95 us per step), and on a GPU the host's time is the device's idle.
        self.np_long, self.np_int = self.host_long.numpy(), self.host_int.numpy()
        self.refresh: dict[tuple[int, int], StepRefresh] = {}  # by key capacity and slow-row slots
        self.copied: torch.cuda.Event | None = None

    def fill(self, rows, positions, compact_len, span_start, span, base, slow, k_head: int) -> None:
        """Fill the host twins with a step's inputs but its tokens (once the last step's transfers have read
        them): a step may be staged before its tokens are known, while the previous step runs."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        b = len(rows)
        capture = [[-1] * b, [0] * b, [0] * b]
        slot = [[0] * b for _ in range(5)]
        for s, (i, lo, hi) in enumerate(slow):
            capture[0][i], capture[1][i], capture[2][i] = s, base[i] + lo, base[i] + hi
            for r, v in enumerate((rows[i], lo, hi - lo, min(k_head, hi - lo), base[i])):
                slot[r][s] = v
        write_at = [a + p for a, p in zip(base, positions, strict=True)]
        starts = [a + s for a, s in zip(base, span_start, strict=True)]
        self.np_long[1:] = [rows, positions, write_at]
        self.np_int[:] = [rows, compact_len, starts, span, base, rows, [0] * b, base, [p + 1 for p in positions],
                          *capture, *slot]

    def send(self, tokens: Sequence[int]) -> None:
        """Write the tokens (padding rows feed 0) and start the transfers."""
        self.np_long[0, :len(tokens)] = tokens
        self.np_long[0, len(tokens):] = 0
        self.long.copy_(self.host_long, non_blocking=True)
        self.int.copy_(self.host_int, non_blocking=True)
        if self.long.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def step(self, memory: SparseMemory | None, shape: _Shape, refresh: StepRefresh | None, probe=None) -> DecodeStep:
        rows, clen, start, span = self.meta.unbind(0)
        dense = (*self.dense_meta.unbind(0), shape.dense_keys) if shape.dense_layers else None
        return DecodeStep(rows=self.rows, positions=self.positions, ranges=(rows, clen, start, span, shape.max_keys),
                          memory=memory, refresh=refresh, split=shape.split, probe=probe,
                          dense_layers=shape.dense_layers, dense_ranges=dense, dense_split=shape.dense_split,
                          n_slow=shape.n_slow if shape.slow_keys else 0, slow_keys=shape.slow_keys,
                          slow_split=shape.slow_split or None, base=self.base, write_at=self.write_at)


@dataclass(frozen=True)
class _Shape:
    """What a step's graph is captured for: batch, the ranged kernel's key capacity and split, the slow-row count,
    the slow rows' own capacity and split (they attend in a launch of their own), and the capacity and split for
    the first `dense_layers` layers (which read every row's whole cache)."""

    batch: int
    max_keys: int
    split: int
    n_slow: int
    dense_layers: int = 0
    dense_keys: int = 0
    dense_split: int = 0
    slow_keys: int = 0  # with rows besides the slow ones (the first n_slow): the slow rows' own capacity and split
    slow_split: int = 0


def _capacity(longest: int, batch_heads: int) -> tuple[int, int]:
    """(key capacity, split) for a step whose longest row reads `longest` keys."""
    split = default_split(longest, batch_heads)
    return _bucket(-(-longest // split)) * split, split


@dataclass(frozen=True, eq=False)
class Prepared:
    """A step staged by `StaticDecoder.prepare`: its rows (padding left out), buffers and graph shape."""

    rows: int
    buffers: _Buffers
    shape: _Shape
    n_slow: int
    probe: object = None


class StaticDecoder:
    """`model.decode` through static buffers; with `graphs` (CUDA only) each step shape is captured once
    and replayed."""

    def __init__(self, model: Transformer, cache: KVCache, memory: SparseMemory | None, graphs: bool,
                 params: SelectorParams | None = None, dense_layers: int = 0, pad: bool | None = None,
                 longest: int | None = None) -> None:
        self.model, self.cache, self.memory, self.params = model, cache, memory, params
        # Keys of the longest row this cache will hold: slow rows attend with the capacity for it (see decode).
        self.longest = min(longest or cache.max_len, cache.max_len)
        self.dense_layers = min(dense_layers, model.args.n_layers) if memory is not None else 0
        self.graphs = graphs and model.device.type == "cuda"
        self.pad = self.graphs if pad is None else pad  # run every cache row (see the module's docstring)
        self._buffers: dict[int, _Buffers] = {}
        self._refresh_logits: dict[tuple[int, int], torch.Tensor] = {}
        self._graphs: dict[_Shape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._side: torch.cuda.Stream | None = None  # warm-up and capture
        self.captures = 0
        self.captured = False  # the last step captured a new graph (a one-time cost)
        self.capture_warmup_s = 0.0  # captures' warm-up steps (compilation included)
        self.capture_record_s = 0.0  # recording and instantiating the graphs
        # With `time_gpu` (CUDA; the bench): events around each step's forward, for `gpu_seconds`.
        self.time_gpu = False
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._staged: Prepared | None = None  # the step whose inputs the host buffers hold

    def prepare(self, rows: Sequence[int], positions: Sequence[int], compact_len: Sequence[int],
                span_start: Sequence[int], slow: Sequence[tuple[int, int, int]] = (), probe=None) -> Prepared:
        """A step's shape and staged inputs, all but its tokens; run by `launch`. Row b reads compact_len[b] rows of
        its compact memory, then its cache from span_start[b] to positions[b] (inclusive), positions of its own (the
        cache adds the row's base). Each (batch index, lo, hi) of `slow` names a slow row (which must read its whole
        cache): its memory is refreshed from its domain [lo, hi) during the step. A `probe` (eval's recall
        diagnostic) sees every layer's attention; such steps are launched op by op. Preparing another step before
        launching this one discards it (both stage into the same host buffers)."""
        n, n_slow = len(rows), len(slow)
        if any(i >= n_slow for i, _, _ in slow):
            raise ValueError("slow rows must come first in a step's batch")
        width = min(self.cache.batch, 1 << max(0, n - 1).bit_length())
        base = [self.cache.base[r] for r in rows]
        if self.pad and n < width and probe is None:
            # A padding row is a free slot at position 0 whose row starts at the view's last position (its own
            # row's last, or a pool's scratch position): it writes and reads that position only, in every layer.
            busy = set(rows)
            idle = [r for r in range(self.cache.batch) if r not in busy][:width - n]
            zeros = [0] * len(idle)
            rows, positions = [*rows, *idle], [*positions, *zeros]
            span_start, compact_len = [*span_start, *zeros], [*compact_len, *zeros]
            base = [*base, *[self.cache.max_len - 1] * len(idle)]
        b = len(rows)
        buf = self._buffers.get(b)
        if buf is None:
            buf = self._buffers[b] = _Buffers(self.model, b)
        span = [p + 1 - s for p, s in zip(positions, span_start, strict=True)]
        keys = [c + s for c, s in zip(compact_len, span, strict=True)]
        hkv = self.cache.k.shape[2]
        heads = n * hkv  # the split fits the rows that decode, not the padding
        dense_keys, dense_split = _capacity(max(positions) + 1, heads) if self.dense_layers else (0, 0)
        # Slow rows attend with the capacity of the longest row the cache holds, whatever their own length: their
        # blocks past a row's end exit at once (slow steps are a few percent of steps), and a step's graph and
        # refresh buffers then do not depend on which row is slow. Keyed by the slow row's own length, a
        # continuous batch of 2k-32k jobs captured a graph (and allocated refresh buffers) for every combination
        # of batch width, slow-row count and length class.
        if 0 < n_slow < b:  # two launches: the slow rows, then the others (padding included) with their own split
            slow_keys, slow_split = _capacity(self.longest, n_slow * hkv)
            max_keys, split = _capacity(max(keys[n_slow:]), max(n - n_slow, 1) * hkv)
            shape = _Shape(b, max_keys, split, n_slow, self.dense_layers, dense_keys, dense_split, slow_keys,
                           slow_split)
        else:
            max_keys, split = _capacity(self.longest if n_slow else max(keys), heads)
            shape = _Shape(b, max_keys, split, n_slow, self.dense_layers, dense_keys, dense_split)
        buf.fill(rows, positions, compact_len, span_start, span, base, slow,
                 self.memory.k_head if self.memory is not None else 0)
        self._staged = Prepared(n, buf, shape, n_slow, probe)
        return self._staged

    def launch(self, prepared: Prepared, tokens: Sequence[int]) -> torch.Tensor:
        """Run a prepared step on `tokens` (one per row of `prepare`'s rows): float32 logits [rows, V], valid until
        the next launch."""
        if prepared is not self._staged:
            raise ValueError("that step's staged inputs were replaced by another prepare()")
        self._staged = None
        n, buf, shape, probe = prepared.rows, prepared.buffers, prepared.shape, prepared.probe
        if len(tokens) != n:
            raise ValueError(f"expected {n} tokens, got {len(tokens)}")
        buf.send(tokens)
        refresh = None
        if prepared.n_slow:
            refresh = self._refresh(buf, shape.batch, shape.slow_keys or shape.max_keys, prepared.n_slow)
            refresh.row_meta.copy_(buf.capture_meta)
            refresh.meta.copy_(buf.slot_meta[:, :refresh.meta.shape[1]])
            refresh = refresh.for_step(prepared.n_slow)
        self.captured = self.graphs and probe is None and shape not in self._graphs
        if self.captured:
            self._graphs[shape] = self._capture(buf, shape, refresh)
        timed = self.time_gpu and self.model.device.type == "cuda"
        if timed:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        if not self.graphs or probe is not None:
            logits = self.model.decode(buf.tokens, self.cache, buf.step(self.memory, shape, refresh, probe))
        else:
            graph, logits = self._graphs[shape]
            graph.replay()
        if timed:
            self._events[1].record()
        return logits[:n]

    def needs_capture(self, prepared: Prepared) -> bool:
        """Whether launching `prepared` captures a new graph (a warm-up step, compilation, recording)."""
        return self.graphs and prepared.probe is None and prepared.shape not in self._graphs

    def gpu_seconds(self) -> float | None:
        """The device's time for the last step's forward (with `time_gpu`, once the step is done): against the
        step's wall time, what the host adds to it."""
        if self._events is None:
            return None
        start, end = self._events
        self._events = None
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _refresh(self, buf: _Buffers, batch: int, max_keys: int, n_slow: int) -> StepRefresh:
        """The refresh buffers for `n_slow` slow rows (sized for the next power of two: a step rarely has more
        than one or two, and [slots, layers of a group, heads, capacity] float32 logits of every batch row would
        be gigabytes at 32k)."""
        if self.memory is None or self.params is None:
            raise ValueError("slow rows need a compact memory and Selector parameters")
        capacity = min(max_keys, self.cache.max_len)  # a domain never extends past the cache
        slots = min(batch, 1 << max(0, n_slow - 1).bit_length())
        if (capacity, slots) not in buf.refresh:
            shared = self._refresh_logits.get((capacity, slots))  # the same logits buffers for every batch width
            refresh = StepRefresh(self.cache, self.memory, self.params, batch, capacity, self.model.args.n_heads,
                                  slots, shared)
            self._refresh_logits[capacity, slots] = refresh.z
            buf.refresh[capacity, slots] = refresh
        return buf.refresh[capacity, slots]

    def _capture(self, buf: _Buffers, shape: _Shape,
                 refresh: StepRefresh | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        step = buf.step(self.memory, shape, refresh)
        # Warm up on a side stream (lazy initialisation, Triton compilation), as capture requires. The
        # warm-up writes the same cache positions the real step will write, with the same values.
        if self._side is None:
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        started = time.perf_counter()
        with torch.cuda.stream(side):
            self.model.decode(buf.tokens, self.cache, step)
            side.synchronize()  # the warm-up's own time (Triton compilation, lazy initialisation), for the report
            recorded = time.perf_counter()
            # Captured on the same side stream, without `torch.cuda.graph`'s preamble (a device sync and emptying
            # PyTorch's cache of free blocks at every capture). That did not make captures cheap: 0.31-0.50 s each
            # on an H200 in a 64-job mix either way; `capture_warmup_s` and `capture_record_s` say where it goes.
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(self._pool)
            try:
                logits = self.model.decode(buf.tokens, self.cache, step)
            except BaseException:
                # Out of memory mid-capture (the run retries with fewer rows): end the capture without letting its
                # own error ("capturing stream has unjoined work") replace the one the caller handles.
                with contextlib.suppress(Exception):
                    graph.capture_end()
                raise
            graph.capture_end()  # and instantiation
        torch.cuda.current_stream().wait_stream(side)
        warmup, record = recorded - started, time.perf_counter() - recorded
        self.capture_warmup_s += warmup
        self.capture_record_s += record
        self.captures += 1
        log.debug("captured %s: warm-up %.3f s, record %.3f s", shape, warmup, record)
        return graph, logits
