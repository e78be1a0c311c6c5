"""The ranged decode kernel (Triton; interpreted on CPU) against its reference and a float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from sfi_kernels import ranged_decode_attention, ranged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive(q, kc, vc, kk, vk, rows, clen, sstart, slen, scale):
    b, hq, d = q.shape
    g = hq // kc.shape[1]
    out, lse = torch.empty(b, hq, d, dtype=torch.float64), torch.empty(b, hq, dtype=torch.float64)
    for i in range(b):
        r, c, s0, n = int(rows[i]), int(clen[i]), int(sstart[i]), int(slen[i])
        for h in range(hq):
            keys = torch.cat([kk[r, h // g, :c], kc[r, h // g, s0:s0 + n]]).double().cpu()
            vals = torch.cat([vk[r, h // g, :c], vc[r, h // g, s0:s0 + n]]).double().cpu()
            logits = keys @ q[i, h].double().cpu() * scale
            lse[i, h] = torch.logsumexp(logits, 0)
            out[i, h] = torch.softmax(logits, 0) @ vals
    return out, lse


CASES = [  # (per row: compact_len, span_start, span_len), hq, hkv, d
    ([(0, 0, 1)], 4, 4, 64),
    ([(27, 100, 63), (0, 0, 1110), (5, 3, 0)], 12, 3, 128),
    ([(64, 900, 140), (1, 0, 27)], 8, 2, 64),
    ([(0, 0, 600), (36, 500, 100), (12, 0, 1)], 3, 1, 128),
]


# Native bf16 tiles run only on a GPU: Triton's interpreter multiplies bf16 tiles wrongly, so there the kernel upcasts.
NATIVE = pytest.param(torch.bfloat16, True, marks=pytest.mark.skipif(DEVICE == "cpu", reason="GPU-only tile type"))


@pytest.mark.parametrize("split", [256, 16])  # 16: up to 70 splits, so the merge loops over split blocks
@pytest.mark.parametrize("dtype,native", [(torch.float32, False), (torch.bfloat16, False), NATIVE])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference_on_awkward_shapes(case, dtype, native, split):
    meta, hq, hkv, d = CASES[case]
    torch.manual_seed(case)
    b = len(meta)
    bc, s, c = b + 1, 1200, 64
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    kc, vc = (torch.randn(bc, hkv, s, d, device=DEVICE).to(dtype) for _ in range(2))
    kk, vk = (torch.randn(bc, hkv, c, d, device=DEVICE).to(dtype) for _ in range(2))
    rows = torch.tensor(list(range(b))[::-1], dtype=torch.int32, device=DEVICE)  # not the identity
    clen, sstart, slen = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in zip(*meta, strict=True))
    # Poison everything outside each row's ranges: an out-of-range read would show as NaN.
    for i, (cl, s0, n) in enumerate(meta):
        r = int(rows[i])
        kc[r, :, :s0] = float("nan")
        kc[r, :, s0 + n:] = float("nan")
        kk[r, :, cl:] = float("nan")
    scale = 1 / math.sqrt(d)
    out, lse = ranged_decode_attention(q, kc, vc, kk, vk, rows, clen, sstart, slen, scale, split=split,
                                       block_n=min(32, split), native_tiles=native)
    ref_out, ref_lse = naive(q, kc, vc, kk, vk, rows, clen, sstart, slen, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    rel = (out.double().cpu() - ref_out).norm() / ref_out.norm()
    assert torch.isfinite(out).all() and rel < tol
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=tol, rtol=tol)
    ref2, _ = ranged_decode_attention_ref(q, kc, vc, kk, vk, rows, clen, sstart, slen, scale)
    assert ((ref2.double().cpu() - ref_out).norm() / ref_out.norm()) < tol


def test_rejects_bad_shapes():
    q = torch.randn(2, 6, 64)
    kc = torch.randn(2, 4, 10, 64)
    with pytest.raises(ValueError, match="does not match"):
        ones = torch.ones(2, dtype=torch.int32)
        ranged_decode_attention(q, kc, kc, kc, kc, torch.zeros(2, dtype=torch.int32), ones, ones, ones)


# bf16 on a GPU only: the interpreter upcasts bf16 tiles to float32, the float32 case's path (40 s of CI time).
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter upcasts bf16 tiles: the float32 case"))])
@pytest.mark.parametrize("hq,hkv,d", [(12, 3, 128), (4, 4, 64), (8, 2, 64)])
def test_capture_writes_domain_logits(hq, hkv, d, dtype):
    """Slow rows leave their domain's logits and key norms from the attention pass; nothing else is written."""
    from sfi_kernels import LogitCapture

    torch.manual_seed(hq + d)
    # rows: a slow row (whole cache, domain [4, 1110 - 63)), a fast row (no capture), a slow row of 27 keys
    # with domain [1, 27), a slow row whose domain is empty
    meta = [(0, 0, 1110), (27, 100, 63), (0, 0, 27), (0, 0, 5)]
    doms = [(4, 1110 - 63), (0, 0), (1, 27), (3, 3)]
    slots = [1, -1, 0, 2]
    b, bc, s, c, cap = len(meta), 5, 1200, 64, 1110
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    kc, vc = (torch.randn(bc, hkv, s, d, device=DEVICE).to(dtype) for _ in range(2))
    kk, vk = (torch.randn(bc, hkv, c, d, device=DEVICE).to(dtype) for _ in range(2))
    rows = torch.tensor([4, 0, 2, 1], dtype=torch.int32, device=DEVICE)
    as32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    clen, sstart, slen = (as32(x) for x in zip(*meta, strict=True))
    outs = []
    for fn in (ranged_decode_attention, ranged_decode_attention_ref):
        z = torch.full((3, hq, cap), float("nan"), device=DEVICE)
        cap_meta = LogitCapture(as32(slots), as32([lo for lo, _ in doms]), as32([hi for _, hi in doms]), z)
        out, _ = fn(q, kc, vc, kk, vk, rows, clen, sstart, slen, 1 / math.sqrt(d), capture=cap_meta)
        outs.append((out, z))
        plain, _ = fn(q, kc, vc, kk, vk, rows, clen, sstart, slen, 1 / math.sqrt(d))
        torch.testing.assert_close(out, plain, atol=0, rtol=0)  # capturing does not change the attention
        for i, slot in enumerate(slots):
            if slot < 0:
                continue
            lo, hi = doms[i]
            keys = kc[int(rows[i]), :, lo:hi].double()  # [Hkv, N, D]
            want = torch.einsum("hgd,hnd->hgn", q[i].double().reshape(hkv, hq // hkv, d), keys) / math.sqrt(d)
            torch.testing.assert_close(z[slot, :, : hi - lo].double(), want.reshape(hq, hi - lo),
                                       atol=1e-4, rtol=1e-4)
            assert z[slot, :, hi - lo:].isnan().all()
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pooled_cache_reads_each_rows_own_segment(dtype):
    """A pooled cache (sfi.cache): every row of the view is the same pool (slot stride 0) and a row's spans and
    capture domain are shifted by its base. Same outputs and logits as the rows layout holding the same
    K/V at each row's own positions."""
    from sfi_kernels import LogitCapture

    torch.manual_seed(5)
    hq, hkv, d, s, c, cap = 8, 2, 64, 300, 16, 300
    meta = [(0, 0, 300), (12, 250, 40), (0, 0, 77)]  # slow (captured), fast, slow (captured)
    doms, slots = [(4, 260), (0, 0), (4, 60)], [0, -1, 1]
    bases = [650, 3, 320]  # disjoint segments, out of order, with gaps
    b = len(meta)
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    kc, vc = (torch.randn(b, hkv, s, d, device=DEVICE).to(dtype) for _ in range(2))
    kk, vk = (torch.randn(b, hkv, c, d, device=DEVICE).to(dtype) for _ in range(2))
    pool_k, pool_v = (torch.full((hkv, 1000, d), float("nan"), device=DEVICE).to(dtype) for _ in range(2))
    for r, base in enumerate(bases):
        pool_k[:, base:base + s] = kc[r]
        pool_v[:, base:base + s] = vc[r]
    as32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    rows = as32([0, 1, 2])
    clen, sstart, slen = (as32(x) for x in zip(*meta, strict=True))
    results = []
    for fn in (ranged_decode_attention, ranged_decode_attention_ref):
        for pooled in (False, True):
            z = torch.full((2, hq, cap), float("nan"), device=DEVICE)
            shift = as32(bases) if pooled else as32([0] * b)
            lo, hi = as32([a for a, _ in doms]) + shift, as32([e for _, e in doms]) + shift
            keys, values = (kc, vc) if not pooled else (t[None].expand(b, *t.shape) for t in (pool_k, pool_v))
            out, lse = fn(q, keys, values, kk, vk, rows, clen, sstart + shift, slen, 1 / math.sqrt(d),
                          capture=LogitCapture(as32(slots), lo, hi, z))
            results.append((out, lse, z))
    for got in results[1:]:
        for a, b_ in zip(got, results[0], strict=True):
            torch.testing.assert_close(a.float(), b_.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, equal_nan=True)
    assert torch.isfinite(results[1][0]).all()  # the NaNs around the segments were never read


def test_default_split_fills_the_gpu_without_too_many_programs():
    from sfi_kernels import default_split

    for keys in (1, 27, 2352, 8192, 32768, 131072):
        for row_heads in (8, 32, 128):
            split = default_split(keys, row_heads)
            assert split in (64, 128, 256, 512)
            programs = -(-keys // split) * row_heads
            assert programs <= 640 or split == 512  # within the budget unless splits are already the longest
            if split > 64:  # a shorter split would have gone over the budget
                assert -(-keys // (split // 2)) * row_heads > 640
    assert default_split(2352, 8) == 64 and default_split(2352, 32) == 128 and default_split(8192, 32) == 512


def test_out_writes_rows_of_a_larger_batch_and_nothing_else():
    """Two launches writing the halves of one output (the step's slow and fast rows) give what one launch returns,
    and leave the other rows' entries as they were."""
    meta, hq, hkv, d = CASES[1]
    torch.manual_seed(5)
    b = len(meta)
    q = torch.randn(b, hq, d, device=DEVICE)
    kc, vc = (torch.randn(b, hkv, 1200, d, device=DEVICE) for _ in range(2))
    kk, vk = (torch.randn(b, hkv, 64, d, device=DEVICE) for _ in range(2))
    rows = torch.arange(b, dtype=torch.int32, device=DEVICE)
    clen, sstart, slen = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in zip(*meta, strict=True))
    args = (kc, vc, kk, vk)
    want_out, want_lse = ranged_decode_attention(q, *args, rows, clen, sstart, slen, split=64)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq), float("nan"), device=DEVICE)
    first = ranged_decode_attention(q[:1], *args, rows[:1], clen[:1], sstart[:1], slen[:1], split=64,
                                    out=(out[:1], lse[:1]))
    assert first[0].data_ptr() == out.data_ptr()
    assert torch.isnan(out[1:]).all() and torch.isnan(lse[1:]).all()  # the other rows untouched
    ranged_decode_attention(q[1:], *args, rows[1:], clen[1:], sstart[1:], slen[1:], split=64, out=(out[1:], lse[1:]))
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    ref = (torch.full_like(q, float("nan")), torch.full((b, hq), float("nan"), device=DEVICE))
    for part in (slice(0, 1), slice(1, b)):  # the reference (the CPU's step) writes the same rows
        ranged_decode_attention_ref(q[part], *args, rows[part], clen[part], sstart[part], slen[part],
                                    out=(ref[0][part], ref[1][part]))
    torch.testing.assert_close(ref[0], want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref[1], want_lse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="out: expected a contiguous float32 lse"):
        ranged_decode_attention(q, *args, rows, clen, sstart, slen, out=(out, lse.double()))
