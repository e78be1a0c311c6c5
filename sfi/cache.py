"""The KV cache: K and V for every layer and slot, allocated once per decoder, filled in place.

Two layouts behind one view, k, v [L, B, Hkv, S, D] (slot b, position p of its row at k[:, b, :, base[b] + p]),
with each key's float32 L2 norm beside it in kn [L, B, Hkv, S], written with the key (the Selector's key-norm
prior reads it; a slow step then need not recompute the norms of its whole domain):

- rows (`KVCache`): every slot owns a row of S = max_len positions; base is 0. A batch of similar lengths
  (eval, bench, static batches).
- pool (`KVCache.pooled`): one run of positions per layer and KV head, [L, Hkv, P + 1, D], shared by every slot; a
  slot admitted with n tokens gets a segment [base, base + n) of its own (first fit) and gives it back when its
  row finishes. The view's slot stride is 0, so the kernels that index k[row, h, position] with a physical
  position (base + p) need no other change. Jobs of 2k and 32k tokens then share one continuous batch, each
  holding only what it needs, instead of rows sized for the longest. Position P is scratch: the padding rows of a
  CUDA-graph step write and read only there.

A row's length lives with the decoder (host side), so no step needs a device-to-host copy to know how far to read.
"""

from __future__ import annotations

import bisect

import torch

_INT32 = 2**31 - 1


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.kn = torch.empty(shape[:-1], dtype=torch.float32, device=device)
        self.base = [0] * batch  # per slot: where its position 0 lies in its row of the view
        self.pool_k = self.pool_v = self.pool_kn = None
        self._size = [0] * batch  # pool: the slot's segment length (0: none)
        self._free: list[tuple[int, int]] = []  # pool: free (start, length), by start

    @classmethod
    def pooled(cls, n_layers: int, slots: int, n_kv_heads: int, positions: int, head_dim: int,
               dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """`slots` slots sharing `positions` positions (see the module docstring). The kernels index one layer's
        pool with 32-bit offsets below a head's start: positions are capped so that a layer's pool stays within
        them (2M positions at 8 KV heads of 128; far beyond one GPU's memory for such a model)."""
        positions = max(1, min(positions, _INT32 // (n_kv_heads * head_dim) - 1))
        self = cls.__new__(cls)
        self.pool_k, self.pool_v = (torch.empty(n_layers, n_kv_heads, positions + 1, head_dim, dtype=dtype,
                                                device=device) for _ in range(2))
        self.pool_kn = torch.empty(n_layers, n_kv_heads, positions + 1, dtype=torch.float32, device=device)
        self.k, self.v, self.kn = (p[:, None].expand(n_layers, slots, *p.shape[1:])
                                   for p in (self.pool_k, self.pool_v, self.pool_kn))
        self.base = [0] * slots
        self._size = [0] * slots
        self._free = [(0, positions)]
        return self

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """Positions of a row of the view (a pool's, scratch included)."""
        return self.k.shape[3]

    @property
    def is_pool(self) -> bool:
        return self.pool_k is not None

    @property
    def nbytes(self) -> int:
        k, kn = (self.pool_k, self.pool_kn) if self.is_pool else (self.k, self.kn)
        return k.numel() * k.element_size() * 2 + kn.numel() * kn.element_size()

    # -- segments (a pool; rows accept whatever fits their length) ------------------------------------------
    @property
    def largest_free(self) -> int:
        """The most positions a slot could be given now."""
        if not self.is_pool:
            return self.max_len
        return max((length for _, length in self._free), default=0)

    def fits(self, n: int) -> bool:
        """Whether a slot could be given `n` positions now."""
        return max(n, 1) <= self.largest_free

    @property
    def free_positions(self) -> int:
        return sum(length for _, length in self._free) if self.is_pool else 0

    def place(self, slot: int, n: int) -> None:
        """Give `slot` room for `n` positions (first fit in a pool); ValueError when there is none."""
        if not self.is_pool:
            if n > self.max_len:
                raise ValueError(f"{n} positions do not fit rows of {self.max_len}")
            return
        if self._size[slot]:
            raise ValueError(f"slot {slot} already holds a segment")
        n = max(n, 1)  # an empty request still holds a position, so that release finds it
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                self.base[slot], self._size[slot] = start, n
                return
        raise ValueError(f"no free run of {n} positions in the pool ({self.free_positions} free in all)")

    def release(self, slot: int) -> None:
        """Give `slot`'s segment back (a pool; nothing for rows), merging it with free neighbours."""
        if not self.is_pool or not self._size[slot]:
            return
        start, n = self.base[slot], self._size[slot]
        self._size[slot] = 0
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and start + n == self._free[i][0]:  # merge with the next free run
            n += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and the previous one
            start, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            self._free.pop(i)
        self._free.insert(i, (start, n))

    # -- flat views for kernels that address every layer at once -------------------------------------------
    def flat(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(k, v [R, Hkv, S, D], layer stride, slot stride): layer l, slot b is row l * layer stride + b * slot
        stride."""
        if self.is_pool:
            return self.pool_k, self.pool_v, 1, 0
        n_layers, b = self.k.shape[:2]
        return self.k.view(n_layers * b, *self.k.shape[2:]), self.v.view(n_layers * b, *self.v.shape[2:]), b, 1

    def flat_norms(self) -> torch.Tensor:
        """The key norms [R, Hkv, S] with the rows of `flat`."""
        if self.is_pool:
            return self.pool_kn
        return self.kn.view(-1, *self.kn.shape[2:])
