"""The skinny decode GEMM (Triton; interpreted on CPU) against a float64 product, on awkward shapes."""

from __future__ import annotations

import pytest
import torch

from sfi_kernels import skinny_linear, skinny_linear_ref

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


def test_falls_back_past_sixteen_rows_and_checks_shapes():
    x, w = torch.randn(17, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    torch.testing.assert_close(skinny_linear(x, w), skinny_linear_ref(x, w))
    with pytest.raises(ValueError, match="expected x"):
        skinny_linear(x[:, :-1], w)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x[:2], w, torch.zeros(23, device=DEVICE))
