"""A skinny product's split-K partial sums, handed unsummed to the kernel that consumes the product."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitPartials:
    """A product whose split-K partials are not added yet: part [S, M_PAD, N] float32 (rows < `rows` hold the
    product's rows), bias [N] or None. The product is (part[0] + ... + part[S-1] + bias) rounded to `dtype`, in
    that order, viewed as `shape`; `add_rms_norm` takes one in place of its residual input."""

    part: torch.Tensor
    bias: torch.Tensor | None
    rows: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def sum(self) -> torch.Tensor:
        """The product, added as the split-sum kernel adds it."""
        acc = torch.zeros_like(self.part[0, :self.rows])
        for s in range(self.part.shape[0]):
            acc += self.part[s, :self.rows]
        if self.bias is not None:
            acc += self.bias.float()
        return acc.to(self.dtype).view(self.shape)
