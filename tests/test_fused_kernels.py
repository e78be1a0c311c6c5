"""Fused decode kernels (Triton; interpreted on CPU) against their torch references."""

from __future__ import annotations

import pytest
import torch

from sfi_kernels import decode_qkv, decode_qkv_ref, rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter casts float32 to bfloat16 by truncation, the GPU (and torch) round to nearest even:
# on CPU, bfloat16 results may differ by one unit in the last place.
BF16_ULP = dict(rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 576, 2560])
def test_rms_norm(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(7, n, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    got, ref = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # float32 statistics summed in another order: at most one rounding step of the output dtype apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(got, ref, **tol)
    if dtype == torch.bfloat16 and DEVICE == "cuda":
        assert (got == ref).float().mean() > 0.95  # mostly bit-identical; the rest one rounding apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,norm,shifted", [(12, 3, 128, True, False), (8, 8, 64, False, True),
                                                   (4, 1, 64, True, True), (9, 3, 64, False, False)])
def test_decode_qkv(hq, hkv, d, norm, shifted, dtype):
    """Shifted: rows written at positions of their own (a pooled cache's base + position), rotated at theirs."""
    g = torch.Generator().manual_seed(hq * d)
    b, bc, s = 3, 4, 40
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    qn = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype) if norm else None
    kn = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype) if norm else None
    angles = torch.arange(s)[:, None] * torch.rand(d // 2, generator=g)[None]
    cos = torch.cat([angles.cos()] * 2, -1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(DEVICE, dtype)
    rows = torch.tensor([2, 0, 3], device=DEVICE)
    positions = torch.tensor([5, 39, 0], device=DEVICE)
    caches, key_norms = [], []
    for _ in range(2):
        kc = torch.full((bc, hkv, s, d), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
        caches.append((kc, kc.clone()))
        key_norms.append(torch.full((bc, hkv, s), float("nan"), device=DEVICE))
    at = torch.tensor([30, 7, 21], device=DEVICE) if shifted else None
    q = decode_qkv(qkv, qn, kn, 1e-6, cos, sin, *caches[0], rows, positions, hq, hkv, at, key_norms[0])
    q_ref = decode_qkv_ref(qkv, qn, kn, 1e-6, cos, sin, *caches[1], rows, positions, hq, hkv, at, key_norms[1])
    if shifted:  # the same rotation as unshifted, and the same K, V, only elsewhere
        plain = [torch.full_like(kc, float("nan")) for kc in caches[1]]
        torch.testing.assert_close(q_ref, decode_qkv_ref(qkv, qn, kn, 1e-6, cos, sin, *plain, rows, positions, hq, hkv),
                                   rtol=0, atol=0)
        for a, b in zip(caches[1], plain, strict=True):
            torch.testing.assert_close(a[rows, :, at], b[rows, :, positions], rtol=0, atol=0)
        positions = at
    # bf16: one rounding apart at most (a norm's summation order, the interpreter's casts)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    for got, ref in zip(caches[0], caches[1], strict=True):
        written = torch.zeros(bc, s, dtype=torch.bool)
        written[rows.cpu(), positions.cpu()] = True
        torch.testing.assert_close(got.transpose(1, 2)[written.to(DEVICE)], ref.transpose(1, 2)[written.to(DEVICE)],
                                   **tol)
        assert got.transpose(1, 2)[~written.to(DEVICE)].isnan().all()  # nothing else touched
    # each written key's float32 norm beside it, and nothing else
    for got in key_norms:
        torch.testing.assert_close(got.transpose(1, 2)[written.to(DEVICE)],
                                   caches[0][0].transpose(1, 2)[written.to(DEVICE)].float().norm(dim=-1), **tol)
        assert got.transpose(1, 2)[~written.to(DEVICE)].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(1, 64), (3, 576), (4, 2560)])
def test_add_rms_norm(m, n, dtype):
    from sfi_kernels import add_rms_norm, add_rms_norm_ref

    g = torch.Generator().manual_seed(m * n)
    x, r = ((torch.randn(m, 1, n, generator=g) * 3).to(DEVICE, dtype) for _ in range(2))
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    (h, y), (h_ref, y_ref) = add_rms_norm(x, r, w, 1e-6), add_rms_norm_ref(x, r, w, 1e-6)
    assert h.shape == y.shape == x.shape and h.dtype == y.dtype == dtype
    # the sum is one rounding of exact float32 operands: identical on a GPU, one unit apart when interpreted
    torch.testing.assert_close(h, h_ref, **(dict(rtol=0, atol=0) if DEVICE == "cuda" or dtype == torch.float32
                                            else BF16_ULP))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(y, y_ref, **tol)
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(x, r[:, :, :-1], w, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(1, 27), (3, 576), (2, 9728)])
def test_silu_mul(m, n, dtype):
    from sfi_kernels import silu_mul, silu_mul_ref

    g = torch.Generator().manual_seed(n)
    gu = (torch.randn(m, 1, 2 * n, generator=g) * 4).to(DEVICE, dtype)
    y, y_ref = silu_mul(gu), silu_mul_ref(gu)
    assert y.shape == (m, 1, n) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **(dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else BF16_ULP))
    with pytest.raises(ValueError, match="even"):
        silu_mul(gu[..., :-1])


def test_decode_qkv_into_out_and_for_a_prefill_chunk():
    """A prefill chunk's tokens (one row, consecutive positions) through the decode kernel: q lands in a slice of a
    larger buffer (the layer-major prefill's), the same as the reference's; an out of the wrong shape is refused."""
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, t, s = 4, 2, 64, 9, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEVICE)
    angles = torch.arange(s)[:, None] * torch.rand(d // 2, generator=g)[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE) for f in (torch.cos, torch.sin))
    rows = torch.full((t,), 1, device=DEVICE)
    positions = torch.arange(10, 10 + t, device=DEVICE)
    kc = [torch.full((2, hkv, s, d), float("nan"), device=DEVICE) for _ in range(4)]
    buf = torch.full((20, hq, d), float("nan"), device=DEVICE)
    got = decode_qkv(qkv, None, None, 0.0, cos, sin, kc[0], kc[1], rows, positions, hq, hkv, out=buf[5:5 + t])
    want = decode_qkv_ref(qkv, None, None, 0.0, cos, sin, kc[2], kc[3], rows, positions, hq, hkv)
    assert got.data_ptr() == buf[5].data_ptr()
    torch.testing.assert_close(buf[5:5 + t], want, rtol=1e-5, atol=1e-5)
    assert buf[:5].isnan().all() and buf[5 + t:].isnan().all()
    torch.testing.assert_close(kc[0][1, :, 10:10 + t], kc[2][1, :, 10:10 + t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out must be"):  # rows of q not contiguous
        decode_qkv(qkv, None, None, 0.0, cos, sin, kc[0], kc[1], rows, positions, hq, hkv,
                   out=torch.empty(t, hq, 2 * d, device=DEVICE)[..., :d])
