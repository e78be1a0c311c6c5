"""The compact memory: per (layer, row, KV head) a contiguous run of K/V rows, sink first, then the
Selector's picks in position order. Allocated once per batch; rewritten in place at each refresh.

Fast steps read it as one contiguous range (no index gathers on the fast path) plus the recent span
of the main cache. Shapes: k, v [L, B, Hkv, sink + k_head, D].
"""

from __future__ import annotations

import torch

from ..cache import KVCache


class SparseMemory:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, sink: int, k_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_kv_heads, sink + k_head, head_dim)
        self.sink, self.k_head = sink, k_head
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, layers: int | slice, row: int, cache: KVCache, lo: int, picks: torch.Tensor) -> int:
        """Copy the sink rows and the picked rows (picks [Hkv, n] for one layer, [L', Hkv, n] for a slice of
        layers; positions relative to `lo`) of cache row `row`. Returns the compact length sink + n."""
        n, sink, base = picks.shape[-1], self.sink, cache.base[row]
        index = (picks + lo)[..., None].expand(*picks.shape, cache.k.shape[-1])  # [..., Hkv, n, D]
        for src, dst in ((cache.k, self.k), (cache.v, self.v)):
            own = src[layers, row, :, base:]  # the row's positions from its 0
            dst[layers, row, :, :sink] = own[..., :sink, :]
            dst[layers, row, :, sink:sink + n] = own.gather(-2, index)
        return sink + n
