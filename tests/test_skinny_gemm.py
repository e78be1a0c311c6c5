"""The skinny decode GEMM (Triton; interpreted on CPU) against a float64 product, on awkward shapes."""

from __future__ import annotations

import pytest
import torch

import sfi_kernels.skinny_gemm as skinny_gemm
from sfi_kernels import (
    SplitPartials,
    add_rms_norm,
    add_rms_norm_ref,
    silu_mul,
    silu_mul_ref,
    skinny_linear,
    skinny_linear_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,bias", [(1, 27, 63, False), (3, 100, 1110, True), (16, 64, 256, False),
                                        (1, 130, 2100, True), (5, 33, 4096, False)])
@pytest.mark.parametrize("config", [None, (16, 64, 1, 4, 2), (32, 128, 4, 4, 3)])
def test_matches_a_float64_product(m, n, k, bias, dtype, config):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, 1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    y = skinny_linear(x, w, b, config=config)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (m, 1, n) and y.dtype == dtype and not y.isnan().any()
    rel = ((y.double() - want).norm() / want.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("m,n,k", [(1, 27, 64), (3, 100, 1112), (16, 40, 256)])
def test_gated_input_is_the_gated_mlp_activation(m, n, k):
    """x = gate | up: the product of SiLU(gate) * up (as silu_mul rounds it) with w, in one launch."""
    g = torch.Generator().manual_seed(n + k)
    gate_up = torch.randn(m, 2 * k, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    y = skinny_linear(gate_up, w, gated=True)
    want = torch.nn.functional.linear(silu_mul_ref(gate_up).double(), w.double())
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert ((y.double() - want).norm() / want.norm()).item() < 2e-2  # the interpreter rounds bf16 by truncation
    assert torch.equal(y, skinny_linear(silu_mul(gate_up), w))  # the same roundings as the two launches
    torch.testing.assert_close(skinny_linear_ref(gate_up, w, gated=True), skinny_linear_ref(silu_mul_ref(gate_up), w))
    with pytest.raises(ValueError, match=r"gate \| up"):
        skinny_linear(gate_up[:, :-2], w, gated=True)


def test_falls_back_past_sixteen_rows_and_checks_shapes():
    x, w = torch.randn(17, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    torch.testing.assert_close(skinny_linear(x, w), skinny_linear_ref(x, w))
    with pytest.raises(ValueError, match="expected x"):
        skinny_linear(x[:, :-1], w)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x[:2], w, torch.zeros(23, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,bias", [(3, True), (16, False)])
def test_partials_added_by_add_rms_norm_equal_the_split_sum(m, bias, dtype):
    """A split product handed to add_rms_norm unsummed gives bit for bit what its own split-sum launch and then
    add_rms_norm give; the reference adds them the same way; an unsplit product comes back as a tensor."""
    n, k = 96, 1024
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, 1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    h = torch.randn(m, 1, n, generator=g).to(DEVICE, dtype)
    weight = torch.rand(n, generator=g).to(DEVICE, dtype) + 0.5
    config = (32, 128, 4, 4, 2)  # four slices of K
    parts = skinny_linear(x, w, b, config=config, partial=True)
    assert isinstance(parts, SplitPartials) and parts.part.shape[0] == 4 and parts.shape == (m, 1, n)
    y = skinny_linear(x, w, b, config=config)
    for got, want in zip(add_rms_norm(h, parts, weight, 1e-6), add_rms_norm(h, y, weight, 1e-6), strict=True):
        assert torch.equal(got, want)
    # The reference's sum rounds to nearest; Triton's interpreter rounds bf16 by truncation, a GPU as torch does.
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(parts.sum(), y)
    else:
        torch.testing.assert_close(parts.sum(), y, atol=2e-2, rtol=2e-2)
    for got, want in zip(add_rms_norm_ref(h, parts, weight, 1e-6), add_rms_norm_ref(h, parts.sum(), weight, 1e-6),
                         strict=True):
        assert torch.equal(got, want)
    whole = skinny_linear(x, w, b, config=(32, 128, 1, 4, 2), partial=True)
    assert isinstance(whole, torch.Tensor) and torch.equal(whole, skinny_linear(x, w, b, config=(32, 128, 1, 4, 2)))
    with pytest.raises(ValueError, match="x and r must match"):
        add_rms_norm(h[:1], parts, weight, 1e-6)


@pytest.mark.parametrize("m,n,k,config", [(1, 27, 2100, None), (3, 100, 1110, (32, 128, 4, 4, 3)),
                                          (2, 40, 100, (16, 128, 1, 4, 2)), (5, 70, 700, (16, 64, 3, 4, 2))])
def test_first_weight_tile_before_the_wait_gives_the_same_product(m, n, k, config, monkeypatch):
    """Each program's first weight tile loaded before the PDL wait (the default) or in the loop: the same sums, bit
    for bit, and the product's."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, torch.bfloat16)
    assert skinny_gemm.PREFETCH_FIRST_TILE
    first = skinny_linear(x, w, config=config)
    torch.testing.assert_close(first, skinny_linear_ref(x, w), atol=3e-2, rtol=3e-2)
    monkeypatch.setattr(skinny_gemm, "PREFETCH_FIRST_TILE", False)
    assert torch.equal(first, skinny_linear(x, w, config=config))
