"""The static decode step (the only decode path; replayed from CUDA graphs on a GPU, launched op by op on a
CPU): its in-step refresh against the Selector's reference, and whole batches on a six-layer model whose
refresh runs in three layer groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sfi.cache import KVCache
from sfi.config import SfiConfig
from sfi.engine.decoder import Request, generate
from sfi.engine.step import _bucket
from sfi.method.boundary import FixedPeriod
from sfi.method.memory import SparseMemory
from sfi.method.refresh import StepRefresh, group_size
from sfi.method.runtime import SfiRuntime
from sfi.method.selector import SPEC, SelectorParams, select
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker

import tiny

SPAN = dict(span_successors=3, span_block=4)  # 3: the kernel's two-window path


def random_cache(g, layers, rows, hkv, length, d, sink, k_head, pooled=False) -> tuple[KVCache, SparseMemory]:
    """A float32 cache of random K/V and a compact memory (random too; the tests that check writes fill it). Pooled:
    the rows' segments lie in a shared pool in the order 1, 2, 0 after a gap, each `length` long."""
    if pooled:
        cache = KVCache.pooled(layers, rows, hkv, 7 + rows * length, d, torch.float32, "cpu")
        cache.place(1, 7)  # the gap, given back below
        for r in (1, 2, 0):
            cache.place(r, length) if r != 1 else None
        cache.release(1)
        cache.place(1, length)
        assert sorted(cache.base) == [7, 7 + length, 7 + 2 * length] and cache.base[1] == 7 + 2 * length
        pools = (cache.pool_k, cache.pool_v)
    else:
        cache = KVCache(layers, rows, hkv, length, d, torch.float32, "cpu")
        pools = (cache.k, cache.v)
    memory = SparseMemory(layers, rows, hkv, sink, k_head, d, torch.float32, "cpu")
    for t in (*pools, memory.k, memory.v):
        t.copy_(torch.randn(t.shape, generator=g))
    (cache.pool_kn if pooled else cache.kn).copy_((cache.pool_k if pooled else cache.k).norm(dim=-1))
    return cache, memory


def own(t: torch.Tensor, cache: KVCache, layer: int, row: int) -> torch.Tensor:
    """Row `row`'s positions of layer `layer` of `t` (cache.k or cache.v) from its own position 0: [Hkv, S', D]."""
    return t[layer, row, :, cache.base[row]:]


@pytest.mark.parametrize("pooled", [False, True], ids=["rows", "pool"])
@pytest.mark.parametrize("params", [SPEC, SelectorParams(), SelectorParams(**SPAN)], ids=["spec", "ours", "span"])
def test_step_refresh_writes_what_the_selector_picks(params, pooled):
    """Six layers in three groups of two (the third group reuses the first's buffers), two slow rows with
    different domains: the compact memory holds the sink and exactly the rows `select` picks; from a pool, the rows'
    own segments."""
    g = torch.Generator().manual_seed(0)
    layers, rows, hkv, hq, length, d, sink, k_head = 6, 3, 4, 8, 90, 8, 4, 20
    cache, memory = random_cache(g, layers, rows, hkv, length, d, sink, k_head, pooled)
    memory.k.fill_(float("nan"))
    refresh = StepRefresh(cache, memory, params, batch=rows, capacity=length, n_heads=hq)
    slots = [(2, sink, 70), (0, sink, 30)]  # (cache row, lo, hi): domains of 66 and 26 positions
    refresh.meta.copy_(torch.tensor([[r for r, _, _ in slots] + [0], [lo for _, lo, _ in slots] + [0],
                                     [hi - lo for _, lo, hi in slots] + [0],
                                     [min(k_head, hi - lo) for _, lo, hi in slots] + [0],
                                     [cache.base[r] for r, _, _ in slots] + [0]], dtype=torch.int32))
    step = refresh.for_step(len(slots))
    assert group_size(layers) == 2
    logits = {}
    for layer in range(layers):
        step.before_attention(layer)
        cap = step.capture(layer)  # what the attention kernel would write for each slot
        for s, (_, lo, hi) in enumerate(slots):
            z = torch.randn(hq, hi - lo, generator=g) * 3
            cap.z[s, :, : hi - lo] = z
            logits[layer, s] = z
        step.after_attention(layer)
    step.finish()
    for layer in range(layers):
        for s, (row, lo, hi) in enumerate(slots):
            z = logits[layer, s].reshape(hkv, hq // hkv, hi - lo)
            keys, values = own(cache.k, cache, layer, row), own(cache.v, cache, layer, row)
            picks = select(z, keys[:, lo:hi].norm(dim=-1), k_head, params)  # [Hkv, n]
            index = (picks + lo)[..., None].expand(-1, -1, d)
            n = picks.shape[1]
            torch.testing.assert_close(memory.k[layer, row, :, :sink], keys[:, :sink])
            torch.testing.assert_close(memory.k[layer, row, :, sink:sink + n], keys.gather(1, index))
            torch.testing.assert_close(memory.v[layer, row, :, sink:sink + n], values.gather(1, index))
    assert memory.k[:, 1].isnan().all()  # no slot names row 1: untouched


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    return tiny.load_for_sfi(tmp_path_factory.mktemp("six"), "qwen3", seed=5, num_hidden_layers=6)


def run(lm, prompts, new, cfg):
    reqs = [Request(p, RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), n))
            for p, n in zip(prompts, new, strict=True)]
    runtime = None
    if cfg is not None:
        runtime = SfiRuntime(cfg, FixedPeriod(6), len(reqs), lm.args.kv_bytes_per_token(lm.model.dtype))
    events = list(generate(lm.model, reqs, prefill_chunk=64, runtime=runtime))
    return [r.stopper.token_ids for r in reqs], events


def prompt(n, offset=0):
    return tiny.tokenizer()(tiny.TEXT * 4)["input_ids"][offset:offset + n]


def test_six_layers_covering_budget_equals_dense(six):
    """Slow steps refresh in three layer groups; with a budget that covers every position the memory holds
    the whole domain, so fast steps read everything and the tokens are dense's, while rows shrink the batch."""
    prompts, new = [prompt(30), prompt(90, 3), prompt(61, 7)], [30, 18, 25]
    cfg = SfiConfig(sink=4, k_head=1000, recent=16, dense_within_budget=False)
    dense, _ = run(six, prompts, new, None)
    ours, events = run(six, prompts, new, cfg)
    assert ours == dense
    kinds = [k for e in events if hasattr(e, "kinds") for k in e.kinds]
    assert kinds.count("slow") >= 6 and kinds.count("fast") >= 20
    small, events = run(six, prompts, new, dataclasses.replace(cfg, k_head=24, dense_within_budget=True))
    kinds = [k for e in events if hasattr(e, "kinds") for k in e.kinds]
    assert {"slow", "fast", "full"} <= set(kinds) and [len(t) for t in small] == new


def test_split_buckets():
    assert [_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 200, 257)] == [1, 2, 4, 8, 8, 16, 64, 96, 224, 288]


def test_refresh_groups_divide_the_layers():
    assert [group_size(n) for n in (1, 2, 6, 28, 30, 36, 31)] == [1, 1, 2, 7, 10, 12, 1]


def test_slow_rows_in_a_launch_of_their_own_change_nothing():
    """A step with slow rows attends in two launches (the slow rows, first, with a split for their whole caches, the
    others with a short one): the same outputs, and the same logits captured for the refresh, as one launch."""
    from sfi import attention
    from sfi.model import DecodeStep

    g = torch.Generator().manual_seed(1)
    hq, length, sink = 4, 80, 4
    cache, memory = random_cache(g, 2, 5, 2, length, 8, sink, 12)
    # Batch rows: two slow rows (whole cache) first, then two fast rows (compact + recent span) and an idle padding row.
    rows = torch.tensor([1, 2, 3, 0, 4])
    positions = torch.tensor([70, 55, 60, 41, length - 1])
    clen = torch.tensor([0, 0, sink + 12, sink + 7, 0], dtype=torch.int32)
    start = torch.tensor([0, 0, 52, 35, length - 1], dtype=torch.int32)
    span = (positions + 1 - start).to(torch.int32)
    q = torch.randn(5, hq, 8, generator=g)
    outs = []
    for n_slow in (0, 2):
        refresh = StepRefresh(cache, memory, SelectorParams(), batch=5, capacity=length, n_heads=hq)
        refresh.row_meta.copy_(torch.tensor([[0, 1, -1, -1, -1], [sink, sink, 0, 0, 0], [63, 48, 0, 0, 0]],
                                            dtype=torch.int32))
        step = DecodeStep(rows, positions, (rows.to(torch.int32), clen, start, span, 71), memory=memory,
                          refresh=refresh, n_slow=n_slow, slow_keys=71)
        out = attention.decode(0, q, cache, step, 0.3)
        outs.append((out, refresh.z[0, :2, 0].clone()))
    (one, z_one), (two, z_two) = outs
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    torch.testing.assert_close(z_two, z_one, rtol=0, atol=0)
    assert torch.isfinite(z_one[0, :, :63 - sink]).all()  # the slow rows' logits were captured
