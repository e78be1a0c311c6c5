"""The plain-PyTorch dense decoder that `sfi bench` measures beside ours (baseline (b) of
../shared/bench-protocol.md): what a careful engineer gets from stock PyTorch, and the bar our `dense` must clear.

It decodes with our model's own weights (it reads the `Transformer`'s parameters, so "same weights" holds by
construction) from a cache our prefill filled, and uses nothing of ours beyond them: per layer stock
`F.rms_norm`, `F.linear`, rotary in torch ops, an indexed write into a static KV cache, and attention over the
whole cache as two matrix products around a masked float32 softmax (a row's query heads of one KV head are that
head's queries, so grouped-query attention needs no K/V expansion); greedy sampling on the device. Not
`F.scaled_dot_product_attention`: with a mask it runs the memory-efficient kernel, which gives a decode step one
block per (row, KV head) and streamed an 8k cache at a third of our dense's rate on an H200 (93 vs 240 tok/s at
8k x 1); cuBLAS spreads the same two products over the whole GPU. Each step advances the tokens and positions
on the device too, so on a GPU the whole step is one CUDA graph and the host only replays it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..model import Transformer
from ..rope import apply_rope


class PlainDecoder:
    """Greedy dense decoding of every row of `cache` (filled by a prefill) in plain PyTorch."""

    def __init__(self, model: Transformer, cache: KVCache, first_tokens: Sequence[int], lengths: Sequence[int],
                 cuda_graph: bool = True) -> None:
        self.model, self.cache = model, cache
        dev = model.device
        self.tokens = torch.tensor(list(first_tokens), dtype=torch.long, device=dev)
        self.positions = torch.tensor(list(lengths), dtype=torch.long, device=dev)  # where each token goes
        self.rows = torch.arange(len(self.tokens), device=dev)
        # Attention multiplies the whole cache's V by the probabilities, zero past each row's tokens: positions not
        # written yet must hold finite values (a fresh cache is uninitialised memory, where 0 * NaN is NaN).
        for r, n in enumerate(lengths):
            cache.v[:, r, :, n:] = 0
        self.keys = torch.arange(cache.max_len, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.logits: torch.Tensor | None = None

    def step(self) -> torch.Tensor:
        """One step for every row: float32 logits [B, V] of the token fed; the next tokens (their argmax) and
        positions are updated in place. On a GPU the first call warms up and captures, the rest replay."""
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a real step, which also compiles and initialises everything
                logits = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records without running: the rows stay where the warm-up left them
                self.logits = self._step()
            return logits
        self.graph.replay()
        return self.logits

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        m, a = self.model, self.model.args
        b, hq, hkv, d = len(self.tokens), a.n_heads, a.n_kv_heads, a.head_dim
        h = F.embedding(self.tokens, m.tok_embeddings.weight)  # [B, H]
        cos, sin = m.rope_cos[self.positions][:, None], m.rope_sin[self.positions][:, None]  # [B, 1, D]
        visible = (self.keys[None, :] <= self.positions[:, None])[:, None, None]  # [B, 1, 1, S]
        for i, block in enumerate(m.layers):
            att, mlp = block.attention, block.mlp
            x = F.rms_norm(h, (a.hidden_size,), block.attention_norm.weight, a.rms_eps)
            q, k, v = F.linear(x, att.wqkv.weight, att.wqkv.bias).view(b, hq + 2 * hkv, d).split([hq, hkv, hkv], 1)
            if att.q_norm is not None:
                q = F.rms_norm(q, (d,), att.q_norm.weight, a.rms_eps)
                k = F.rms_norm(k, (d,), att.k_norm.weight, a.rms_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = self.cache.k[i], self.cache.v[i]  # [B, Hkv, S, D]
            kc[self.rows, :, self.positions] = k
            vc[self.rows, :, self.positions] = v
            scores = torch.matmul(q.view(b, hkv, hq // hkv, d), kc.transpose(-1, -2))  # [B, Hkv, G, S]
            p = torch.softmax(scores.float().mul_(att.scale).masked_fill_(~visible, float("-inf")), dim=-1)
            out = torch.matmul(p.to(vc.dtype), vc)  # [B, Hkv, G, D]
            h = h + F.linear(out.reshape(b, hq * d), att.wo.weight, att.wo.bias)
            x = F.rms_norm(h, (a.hidden_size,), block.ffn_norm.weight, a.rms_eps)
            gate, up = F.linear(x, mlp.w13.weight, mlp.w13.bias).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, mlp.w2.weight, mlp.w2.bias)
        logits = F.linear(F.rms_norm(h, (a.hidden_size,), m.norm.weight, a.rms_eps), m.output.weight).float()
        self.tokens.copy_(logits.argmax(-1))
        self.positions.add_(1)
        return logits


def decode_plain(model: Transformer, cache: KVCache, first_tokens: Sequence[int], lengths: Sequence[int],
                 steps: int, warmup_steps: int = 5, cuda_graph: bool = True, keep_tokens: bool = False) -> dict:
    """`steps` greedy steps after the prompts in `cache`: the decode rate of the steps after the first
    `warmup_steps` (the first compiles, and on a GPU captures the graph), and with `keep_tokens` every row's
    tokens (read back after each step: for checking, not for timing)."""
    dec = PlainDecoder(model, cache, first_tokens, lengths, cuda_graph)
    dev = model.device
    tokens = [list(first_tokens)]
    start = None
    for i in range(steps):
        if i == warmup_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
        dec.step()
        if keep_tokens:
            tokens.append(dec.tokens.tolist())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timed = steps - warmup_steps
    seconds = time.perf_counter() - start if start is not None else 0.0
    out = {"tok_s": len(first_tokens) * timed / seconds if seconds else 0.0,
           "step_ms": 1e3 * seconds / timed if timed > 0 else 0.0, "timed_steps": max(timed, 0)}
    if keep_tokens:
        out["tokens"] = [[t[r] for t in tokens] for r in range(len(first_tokens))]
    return out
