"""Compaction writer (Triton; interpreted on CPU) against its torch reference and a plain Python loop: bit-exact."""

from __future__ import annotations

import pytest
import torch

from sfi_kernels import compact_write, compact_write_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, BC = 2, 5  # a layer view of a 5-D cache, as the runtime passes cache.k[layer]
ROWS = [3, 0, 4]  # distinct cache rows; rows 1 and 2 are never written


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _loop(k_cache, v_cache, mem_k, mem_v, rows, lo, count, picks, sink) -> torch.Tensor:
    """The definition, row vector by row vector; returns the written mask [Bc, Hkv, Cm]."""
    written = torch.zeros(mem_k.shape[:3], dtype=torch.bool)
    for p in range(len(rows)):
        r, start, n = int(rows[p]), int(lo[p]), int(count[p])
        for h in range(k_cache.shape[1]):
            for i in range(sink):
                mem_k[r, h, i], mem_v[r, h, i] = k_cache[r, h, i], v_cache[r, h, i]
                written[r, h, i] = True
            for j in range(n):
                pos = start + int(picks[p, h, j])
                mem_k[r, h, sink + j], mem_v[r, h, sink + j] = k_cache[r, h, pos], v_cache[r, h, pos]
                written[r, h, sink + j] = True
    return written


def _problem(s, k, sink, hkv, d, dtype, pick_dtype, v_transposed, seed):
    g = torch.Generator().manual_seed(seed)
    kc5 = torch.randn(LAYERS, BC, hkv, s, d, generator=g).to(dtype)
    if v_transposed:  # V stored [L, Bc, S, Hkv, D]: other strides than K, still contiguous in D
        vc5 = torch.randn(LAYERS, BC, s, hkv, d, generator=g).to(dtype).transpose(2, 3)
    else:
        vc5 = torch.randn(LAYERS, BC, hkv, s, d, generator=g).to(dtype)
    cm = sink + k + 5  # a tail past sink + K that must stay untouched
    mem5 = [torch.full((LAYERS, BC, hkv, cm, d), float("nan"), dtype=dtype) for _ in range(2)]
    n_slots = len(ROWS)
    counts = [0, max(1, k // 2) if k > 1 else 1, k][:n_slots]  # empty, partial, full
    lo, picks = [], torch.empty(n_slots, hkv, k, dtype=torch.int64)
    for p in range(n_slots):
        start = int(torch.randint(sink, s - k + 1, (1,), generator=g)) if s - k >= sink else 0
        lo.append(start)
        for h in range(hkv):
            chosen = torch.randperm(s - start, generator=g)[:counts[p]].sort().values
            picks[p, h, :counts[p]] = chosen
            tail = k - counts[p]
            picks[p, h, counts[p]:] = torch.tensor([-1, 10**9] * tail)[:tail]  # garbage: never read
    idx = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return kc5, vc5, mem5, idx(ROWS), idx(lo), idx(counts), picks.to(pick_dtype)


CASES = [  # s, k, sink, hkv, d
    (27, 1, 0, 1, 64),
    (27, 27, 0, 3, 128),
    (27, 1, 4, 8, 64),
    (63, 27, 4, 3, 64),
    (63, 63, 0, 8, 128),
    (63, 27, 0, 1, 128),
    (1110, 63, 4, 8, 64),
    (1110, 27, 4, 3, 128),
    (1110, 1, 4, 1, 128),
    (63, 27, 4, 3, 80),  # D not a power of two: masked padding
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,k,sink,hkv,d", CASES)
def test_compact_write(s, k, sink, hkv, d, dtype):
    pick_dtype = torch.int32 if (s + k) % 2 else torch.int64
    kc5, vc5, (mem_a, mem_b), rows, lo, count, picks = _problem(s, k, sink, hkv, d, dtype, pick_dtype,
                                                                v_transposed=hkv == 3, seed=s * k + hkv)
    mem_c = mem_a.clone()
    layer = 1
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    kc, vc, mk, mv = dev(kc5[layer]), dev(vc5[layer]), dev(mem_a), dev(mem_a.clone())
    compact_write(kc, vc, mk[layer], mv[layer], dev(rows), dev(lo), dev(count), dev(picks), sink)
    compact_write_ref(kc5[layer], vc5[layer], mem_b[layer], mem_c[layer], rows, lo, count, picks, sink)
    loop_k, loop_v = mem_a.clone(), mem_a.clone()
    written = _loop(kc5[layer], vc5[layer], loop_k[layer], loop_v[layer], rows, lo, count, picks, sink)

    assert int(written.sum()) == hkv * (len(ROWS) * sink + int(count.sum()))
    for got, ref, want in ((mk.cpu(), mem_b, loop_k), (mv.cpu(), mem_c, loop_v)):
        assert torch.equal(_bits(ref), _bits(want))  # reference == definition, bit for bit (NaNs included)
        assert torch.equal(_bits(got), _bits(want))  # kernel == definition
        assert not got[layer][written].isnan().any()
        assert got[layer][~written].isnan().all()  # other rows, the tail past sink + count: untouched
        assert got[1 - layer].isnan().all()  # the other layer: untouched


def test_compact_write_empty():
    kc5, vc5, (mem, _), rows, lo, count, picks = _problem(27, 4, 4, 2, 64, torch.float32, torch.int64, False, 1)
    compact_write(kc5[0], vc5[0], mem[0], mem[1], rows[:0], lo[:0], count[:0], picks[:0], 4)  # no slots
    assert mem.isnan().all()
    compact_write(kc5[0], vc5[0], mem[0], mem[1], rows, lo, count, picks[:, :, :0], 0)  # nothing to copy
    assert mem.isnan().all()


def _valid():
    kc5, vc5, (mem, _), rows, lo, count, picks = _problem(63, 8, 4, 2, 64, torch.float32, torch.int64, False, 2)
    return dict(k_cache=kc5[0], v_cache=vc5[0], mem_k=mem[0], mem_v=mem[1], rows=rows, lo=lo, count=count,
                picks=picks, sink=4)


BAD = [  # (changes to a valid call, a word of the expected message)
    (lambda a: dict(k_cache=a["k_cache"][0]), "k_cache"),
    (lambda a: dict(v_cache=a["v_cache"][:, :, :10]), "v_cache"),
    (lambda a: dict(mem_v=a["mem_v"][:, :, :5]), "mem_v"),
    (lambda a: dict(mem_k=a["mem_k"][:2], mem_v=a["mem_v"][:2]), "memories"),  # Bc
    (lambda a: dict(mem_k=a["mem_k"][:, :1], mem_v=a["mem_v"][:, :1]), "memories"),  # Hkv
    (lambda a: dict(mem_k=a["mem_k"][..., :32], mem_v=a["mem_v"][..., :32]), "memories"),  # D
    (lambda a: dict(mem_v=a["mem_v"].double()), "dtype"),
    (lambda a: dict(lo=a["lo"][:2]), "lo"),
    (lambda a: dict(count=a["count"][:, None]), "count"),
    (lambda a: dict(rows=a["rows"][:, None]), "rows"),
    (lambda a: dict(picks=a["picks"][:, :1]), "picks"),
    (lambda a: dict(picks=a["picks"][0]), "picks"),
    (lambda a: dict(picks=a["picks"].float()), "picks"),
    (lambda a: dict(sink=10), "Cm"),  # sink + K = 18 > Cm = 4 + 8 + 5
    (lambda a: dict(picks=torch.zeros(3, 2, 14, dtype=torch.int64)), "Cm"),  # 4 + 14 > 17
    (lambda a: dict(sink=64), "sink"),  # past S
    (lambda a: dict(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)), "contiguous"),
]


@pytest.mark.parametrize("fn", [compact_write, compact_write_ref])
@pytest.mark.parametrize("make,match", BAD)
def test_compact_write_bad_shapes(fn, make, match):
    args = _valid()
    args.update(make(args))
    with pytest.raises(ValueError, match=match):
        fn(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_write_from_a_pool(dtype):
    """A pooled cache (sfi.cache): memory rows and cache rows differ, each slot's positions start at its base. The
    kernel writes what the reference writes, and that is the rows-layout result of the same K/V moved to those
    bases."""
    s, k, sink, hkv, d = 63, 27, 4, 3, 64
    kc5, vc5, (mem_a, _), rows, lo, count, picks = _problem(s, k, sink, hkv, d, dtype, torch.int64, False, 9)
    layer = 1
    bases = [2 * s + 5, 3, s + 4]  # per slot, out of order, with gaps
    pool_k = torch.full((2, hkv, 3 * s + 10, d), float("nan"), dtype=dtype)
    pool_v = pool_k.clone()
    for p, r in enumerate(rows.tolist()):
        pool_k[0, :, bases[p]:bases[p] + s] = kc5[layer, r]
        pool_v[0, :, bases[p]:bases[p] + s] = vc5[layer, r]
    cache_rows, base = torch.zeros(3, dtype=torch.int32), torch.tensor(bases, dtype=torch.int32)
    want_k, want_v = mem_a.clone(), mem_a.clone()
    compact_write_ref(kc5[layer], vc5[layer], want_k[layer], want_v[layer], rows, lo, count, picks, sink)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got_k, got_v = dev(mem_a.clone()), dev(mem_a.clone())
    compact_write(dev(pool_k), dev(pool_v), got_k[layer], got_v[layer], dev(rows), dev(lo), dev(count), dev(picks),
                  sink, dev(cache_rows), dev(base))
    ref_k, ref_v = mem_a.clone(), mem_a.clone()
    compact_write_ref(pool_k, pool_v, ref_k[layer], ref_v[layer], rows, lo, count, picks, sink, cache_rows, base)
    for got, ref, want in ((got_k.cpu(), ref_k, want_k), (got_v.cpu(), ref_v, want_v)):
        assert torch.equal(_bits(ref), _bits(want))
        assert torch.equal(_bits(got), _bits(want))
