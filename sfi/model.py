"""Our decoder: a plain dense transformer (Llama / Mistral / Qwen2 / Qwen3 families) with a KV cache.

Hugging Face parameter names never appear here (the loader maps them). Two entry points, both with the
step's state as explicit arguments: `prefill` (one row, one chunk of its prompt) and `decode` (one new
token for each of several rows, every row at its own position, each reading its own key ranges).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sfi_kernels import (
    SplitPartials,
    add_rms_norm,
    add_rms_norm_ref,
    decode_qkv,
    decode_qkv_ref,
    rms_norm,
    rms_norm_ref,
    silu_mul,
    silu_mul_ref,
    skinny_linear,
    skinny_pays,
    use_pdl,
)

from . import attention
from .cache import KVCache
from .errors import ModelError
from .rope import inv_freq_for, rope_table

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArgs:
    """The architecture, read from a checkpoint's config; never restated by hand."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_embeddings: bool
    max_position_embeddings: int
    rope: dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * elem

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        """What a cached token holds: its K and V and its keys' float32 norms (sfi.cache)."""
        return self.kv_bytes_per_token(dtype) + 4 * self.n_layers * self.n_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        family = getattr(cfg, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise ModelError(
                f"architecture {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ModelError(f"activation {cfg.hidden_act!r} is not supported (only silu)")
        if family == "mistral" and getattr(cfg, "sliding_window", None):
            raise ModelError("sliding-window attention (Mistral v0.1) is not supported; use Mistral v0.2 or later")
        if getattr(cfg, "use_sliding_window", False):
            raise ModelError("sliding-window attention (use_sliding_window) is not supported")
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_eps=cfg.rms_norm_eps,
            # Qwen2 always has q/k/v biases; Llama-style configs say so with attention_bias.
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=cfg.max_position_embeddings,
            rope=rope,
        )


@dataclass
class PrefillStep:
    """One chunk of one row's prompt: tokens at positions [start, start + length) of cache row `row`.

    With `bootstrap` (a runtime.Capture whose batch_index is the window W) every layer keeps the chunk's last
    W queries; after the last layer their logits go to `refresh`, which builds the row's first compact memory.
    """

    row: int
    start: int
    length: int
    bootstrap: Any = None
    refresh: Any = None
    queries: list = field(default_factory=list)  # with bootstrap: each layer's last W queries [Hq, W, D]


@dataclass
class TokenIndex:
    """Per token of a prefill forward [N] (device tensors): its cache row, its position in the row, and where its
    key goes in the layer's cache view (position + the row's base: a pool's segment starts elsewhere)."""

    rows: torch.Tensor
    positions: torch.Tensor
    write_at: torch.Tensor

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int, int]], cache: KVCache, device: torch.device) -> TokenIndex:
        """(row, start, length) spans, one after the other."""
        pos = torch.cat([torch.arange(start, start + n) for _, start, n in spans])
        rows = torch.cat([torch.full((n,), row) for row, _, n in spans])
        base = torch.cat([torch.full((n,), cache.base[row]) for row, _, n in spans])
        rows, pos, at = torch.stack([rows, pos, pos + base]).to(device, non_blocking=True)
        return cls(rows, pos, at)


@dataclass
class PrefillChunks:
    """One prefill forward: the chunks `steps`, one after the other, and where each of their tokens goes."""

    steps: Sequence[PrefillStep]
    where: TokenIndex


@dataclass
class DecodeStep:
    """One new token for each of the rows `rows` [B] (cache row indices), at `positions` [B].

    Every row's attention reads one range of the compact memory and then one span of its cache (see
    sfi_kernels/ranged_decode.py): `ranges` = (rows, compact_len, span_start, span_len) int32 [B] and the host
    max of compact_len + span_len. A fast row reads compact + recent span, a slow or dense row nothing of the
    memory and its whole cache, so every kind of row runs the same step (sfi.engine.step builds it)."""

    rows: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64, the new token's position (= tokens already cached)
    ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]
    memory: Any = None  # the compact memory (memory.SparseMemory) fast rows read, if any
    refresh: Any = None  # the slow rows' in-step refresh (refresh.StepRefresh), if any
    split: int | None = None  # keys per split of the ranged kernel (None: its default for the step's shape)
    probe: Any = None  # eval's recall diagnostic (eval.RecallProbe): sees each layer's attention, if any
    # The first `dense_layers` layers read every row's whole cache (SfiConfig.dense_layers): their own ranges.
    dense_layers: int = 0
    dense_ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
    dense_split: int | None = None
    # The first `n_slow` rows are slow: outside the dense layers the step attends in two launches, those rows with
    # their own capacity and split, the others with `split` over `ranges`' capacity (0: one launch for all).
    n_slow: int = 0
    slow_keys: int = 0
    slow_split: int | None = None
    # A pooled cache (sfi.cache): where each row's position 0 lies in its row of the cache view (int32 [B]; ranges'
    # span starts already include it) and where the new token is written, base + position (int64 [B]). None: 0.
    base: torch.Tensor | None = None
    write_at: torch.Tensor | None = None

    @classmethod
    def dense(cls, rows: torch.Tensor, positions: torch.Tensor) -> DecodeStep:
        """Every row attends to its whole cache (positions 0 .. its own)."""
        zeros = torch.zeros_like(rows, dtype=torch.int32)
        span = (positions + 1).to(torch.int32)
        return cls(rows, positions, (rows.to(torch.int32), zeros, zeros, span, int(span.max())))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a GPU one fused launch with the same rounding; on a CPU the kernel's reference.
        return (rms_norm if x.is_cuda else rms_norm_ref)(x, self.weight, self.eps)


def _add_norm(h: torch.Tensor, r: torch.Tensor | SplitPartials, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + r, norm(h + r)): one fused launch on a GPU (r may be a product's split-K partials), the kernel's
    reference on a CPU."""
    return (add_rms_norm if h.is_cuda else add_rms_norm_ref)(h, r, norm.weight, norm.eps)


# The residual's projections (attention output, MLP down) hand their split-K partials to the add + RMSNorm after
# them instead of adding them in a launch of their own (sfi_kernels/partials.py); False: the split sum (for an A/B).
FOLD_SPLIT_SUMS = True


def _linear(layer: nn.Linear, x: torch.Tensor, gated: bool = False,
            partial: bool = False) -> torch.Tensor | SplitPartials:
    """A projection of a decode step: on a GPU, the skinny Triton GEMM where it streams the weights faster than
    cuBLAS (up to 16 rows: see `skinny_pays`; with programmatic dependent launch, every shape, so the step's chain
    of kernels overlaps launches throughout); otherwise nn.Linear. `gated`: x is gate | up and the product's input
    SiLU(gate) * up (`silu_mul`; for one row in the skinny GEMM's loads). `partial`: the product may come back as
    its split-K partials (for `_add_norm`)."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda and skinny_pays(rows, *layer.weight.shape, pdl=use_pdl(x)):
        return skinny_linear(x, layer.weight, layer.bias, gated=gated, partial=partial and FOLD_SPLIT_SUMS)
    if gated:
        x = (silu_mul if x.is_cuda else silu_mul_ref)(x)
    return layer(x)


def causal_lower_right(queries: int, keys: int):
    """SDPA's causal mask aligned to the bottom right, imported when first needed: its module imports
    torch._dynamo, 1.5 s of every run's start otherwise (a CPU's later prefill chunks and the expanded GPU fallback
    use it; a GPU's grouped flash path does not)."""
    from torch.nn.attention.bias import causal_lower_right as bias

    return bias(queries, keys)


def _expanded_chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA with K/V repeated per query head and a bottom-right causal mask (the fallback: one copy of the keys
    per query head)."""
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)


def _flash_grouped(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention(q, keys, values, 0.0, True, False, scale=scale)[0]


def _cudnn_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention (grouped K/V read in place; `causal` aligned to the top left, so for a square
    problem only) -> (out [B, Hq, T, D], log-sum-exp of each query's scaled scores [B, Hq, T, 1] float32)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, keys, values, None, True, 0.0, causal, False,
                                                                   scale=scale)[:2]
    return out, lse.reshape(*q.shape[:3], 1)


def _split_chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A chunk's bottom-right causal attention as two cuDNN passes, the keys before the chunk (no mask) and the
    chunk's own keys (causal, square), merged by their log-sum-exps: out = sum_i exp(lse_i - lse) out_i."""
    start = keys.shape[2] - q.shape[2]
    o1, l1 = _cudnn_with_lse(q, keys[:, :, :start], values[:, :, :start], False, scale)
    o2, l2 = _cudnn_with_lse(q, keys[:, :, start:], values[:, :, start:], True, scale)
    lse = torch.logaddexp(l1, l2)
    return (o1.float() * (l1 - lse).exp() + o2.float() * (l2 - lse).exp()).to(q.dtype)


@functools.cache
def _chunk_path(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which fused path serves a prefill chunk's grouped attention here ('split': cuDNN twice; 'flash': the flash
    op; 'expanded': neither agrees with the expanded form), checked once per device, dtype and head size on a small
    random problem laid out as the cache lays it out (keys a slice of a longer row)."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, 24, head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, 2, 120, head_dim, device=device, dtype=dtype, generator=g)[:, :, :80] for _ in range(2))
    scale = head_dim ** -0.5
    want = _expanded_chunk_attention(q, k, v, scale).float()
    for name, fn in (("split", _split_chunk_attention), ("flash", _flash_grouped)):
        try:
            if torch.allclose(fn(q, k, v, scale).float(), want, rtol=2e-2, atol=2e-2):
                return name
        except RuntimeError:
            pass
    return "expanded"


# cuDNN builds an execution plan for every new shape (69-71 ms each on an H200, paid again by every process), and
# prompts come in every length: only block multiples go to it, so a run builds a handful of plans (the 2,048-token
# chunks at their 2,048-aligned starts, whole prompts' leading squares) and reuses them. The remainder goes to the
# flash op, which needs no plan; so do chunks of fewer queries, whose split-KV kernel spreads them over the GPU.
CUDNN_BLOCK = 1024


def _gpu_prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A prefill chunk's attention on a GPU: q [1, Hq, T, D] over keys/values [1, Hkv, S, D] (S >= T, the chunk's
    keys last, K/V heads grouped), causal aligned to the bottom right. SDPA routes this mask to flash attention only
    with as many K/V heads as query heads (a copy of the row's cache per query head). cuDNN reads grouped K/V in
    place but aligns its causal mask to the top left: the chunk's first T0 queries (a multiple of CUDNN_BLOCK) go to
    it as the square over their own keys (causal) and, after a cached start, the keys before them (no mask), merged
    by log-sum-exp (`_split_chunk_attention`; H200, 2,048 queries over 32k keys: 1.78 ms against 3.02 for the flash
    op); the rest through the flash op, which reads grouped K/V in place with the bottom-right mask."""
    path = _chunk_path(q.device, q.dtype, q.shape[-1])
    t = q.shape[2]
    start = keys.shape[2] - t
    t0 = t // CUDNN_BLOCK * CUDNN_BLOCK if path == "split" and start % CUDNN_BLOCK == 0 else 0
    if t0 == 0:
        if path == "expanded":
            return _expanded_chunk_attention(q, keys, values, scale)
        return _flash_grouped(q, keys, values, scale)
    head_q, head_k, head_v = q[:, :, :t0], keys[:, :, :start + t0], values[:, :, :start + t0]
    if start == 0:
        head = _cudnn_with_lse(head_q, head_k, head_v, True, scale)[0]
    else:
        head = _split_chunk_attention(head_q, head_k, head_v, scale)
    if t0 == t:
        return head
    return torch.cat([head, _flash_grouped(q[:, :, t0:], keys, values, scale)], dim=2)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A prefill chunk's attention: q [1, Hq, T, D] over a row's keys/values [1, Hkv, S, D] up to the chunk's last
    key (S >= T), each query seeing the keys up to its own position (causal aligned to the bottom right). Fused
    kernels throughout, no [T, S] score matrix: a 128k prompt needs memory linear in its length."""
    if q.is_cuda:
        return _gpu_prefill_attention(q, keys, values, scale)
    t, s = q.shape[2], keys.shape[2]
    mask = dict(is_causal=True) if t == s else dict(attn_mask=causal_lower_right(t, s))
    return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True, **mask)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = 1.0 / math.sqrt(args.head_dim)
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_eps) if args.qk_norm else None

    def qkv_into_cache(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                       where: TokenIndex | DecodeStep, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens x [N, H] (any rows and positions): q/k norms and rotary at each token's position (cos, sin: the
        whole tables), K, V and each key's norm written into the cache; returns q [N, Hq, D] (into q_out if given).
        The decode step's fused kernel on a GPU, its reference on a CPU (the same ops as the model's)."""
        qn, kn = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        return (decode_qkv if x.is_cuda else decode_qkv_ref)(
            _linear(self.wqkv, x), qn, kn, eps, cos, sin, cache.k[self.layer], cache.v[self.layer], where.rows,
            where.positions, self.n_heads, self.n_kv_heads, where.write_at, cache.kn[self.layer], out=q_out)

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                chunks: PrefillChunks) -> torch.Tensor:
        """x [1, N, H]: the chunks of `chunks.steps`' rows one after the other (N their lengths summed), cos/sin the
        whole rotary tables. Projections over all N tokens at once; attention row by row, each over its own cache."""
        q = self.qkv_into_cache(x[0], cos, sin, cache, chunks.where)  # [N, Hq, D]
        outs, first = [], 0
        for step in chunks.steps:
            rows = slice(first, first + step.length)
            first += step.length
            outs.append(self._attend_chunk(q[rows].transpose(0, 1)[None], cache, step))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return self.wo(out.transpose(1, 2).reshape(1, first, -1))

    def _attend_chunk(self, q: torch.Tensor, cache: KVCache, step: PrefillStep) -> torch.Tensor:
        """One row's chunk, its keys already in the cache: attend (causal) over the row up to itself."""
        end = step.start + step.length
        base = cache.base[step.row]
        keys = cache.k[self.layer, step.row, None, :, base:base + end]  # [1, Hkv, end, D]
        values = cache.v[self.layer, step.row, None, :, base:base + end]
        out = prefill_attention(q, keys, values, self.scale)
        if step.bootstrap is not None:  # the last W queries, for the bootstrap after the last layer
            step.queries.append(q[0, :, -step.bootstrap.batch_index:].clone(memory_format=torch.contiguous_format))
        return out  # [1, Hq, T, D]

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
               step: DecodeStep, partial: bool = False) -> torch.Tensor | SplitPartials:
        """x [B, 1, H] -> [B, 1, H]; `partial`: perhaps as split-K partials (see `_linear`)."""
        b = x.shape[0]
        q = self.qkv_into_cache(x[:, 0], cos, sin, cache, step)  # [B, Hq, D]; cos, sin: the whole tables
        out = attention.decode(self.layer, q, cache, step, self.scale)  # [B, Hq, D]
        return _linear(self.wo, out.reshape(b, 1, -1), partial=partial)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.inter = args.intermediate_size
        self.w13 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate | up
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor | SplitPartials:
        """SiLU(gate) * up, then the down projection; `partial`: perhaps as split-K partials (see `_linear`)."""
        return _linear(self.w2, _linear(self.w13, x), gated=True, partial=partial)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                step: PrefillChunks | DecodeStep) -> torch.Tensor:
        attend = self.attention.decode if isinstance(step, DecodeStep) else self.attention.prefill
        h = x + attend(self.attention_norm(x), cos, sin, cache, step)
        return h + self.mlp(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Built on the meta device and loaded (sfi.loader.build_model). Meta tensors' random initialisation and arange
        # import torch._dynamo (1.6 s of every run's start): the embedding is given its (empty) weight, and the rotary
        # frequencies are computed on the CPU.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size,
                                           _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        with torch.device("cpu"):
            inv_freq, self.rope_scale = inv_freq_for(args.rope, args.head_dim, args.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` tokens; also sizes the rotary table."""
        self._ensure_rope(max_len)
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, max_len, a.head_dim, self.dtype, self.device)

    def new_pool(self, slots: int, positions: int, longest: int) -> KVCache:
        """A pooled KV cache: `slots` rows sharing `positions` positions, none longer than `longest`."""
        self._ensure_rope(longest)
        a = self.args
        return KVCache.pooled(a.n_layers, slots, a.n_kv_heads, positions, a.head_dim, self.dtype, self.device)

    def _ensure_rope(self, length: int) -> None:
        if self.rope_cos.shape[0] >= length and self.rope_cos.dtype == self.dtype:
            return
        cos, sin = rope_table(self.inv_freq.cpu(), self.rope_scale, length)
        # The table is computed in float32 and cast once, as Hugging Face casts it at every call.
        self.rope_cos = cos.to(self.device, self.dtype)
        self.rope_sin = sin.to(self.device, self.dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, step: PrefillStep,
                all_logits: bool = False) -> torch.Tensor:
        """tokens [T] of one row -> float32 logits [V] of the last position ([T, V] with all_logits)."""
        logits = self.prefill_rows([tokens], cache, [step], all_logits)
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def prefill_rows(self, tokens: Sequence[torch.Tensor], cache: KVCache, steps: Sequence[PrefillStep],
                     all_logits: bool = False) -> torch.Tensor:
        """A chunk of each of several rows' prompts in one forward (tokens[i] [T_i] for steps[i]): the projections
        and the MLP run once over all their tokens, attention row by row over each row's own cache, so rows that
        each have a short chunk left (questions after a shared document) cost about one row's launches. Returns
        float32 logits [rows, V] of each row's last position ([sum T_i, V] with all_logits); the same as `prefill`
        row by row."""
        chunks = PrefillChunks(steps, TokenIndex.of([(s.row, s.start, s.length) for s in steps], cache, self.device))
        h = self.tok_embeddings((tokens[0] if len(tokens) == 1 else torch.cat(list(tokens)))[None])  # [1, N, H]
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin, cache, chunks)
        for s in steps:
            if s.bootstrap is not None:
                attention.bootstrap(s.queries, cache, s.start + s.length, s.bootstrap, s.refresh,
                                    self.layers[0].attention.scale)
        if all_logits:
            return self._head(h[0])
        last = torch.tensor(list(itertools.accumulate(s.length for s in steps)), device=self.device) - 1
        return self._head(h[0, last])

    @torch.inference_mode()
    def prefill_layer_major(self, tokens: torch.Tensor, cache: KVCache, row: int, chunk: int,
                            bootstrap: Any = None, refresh: Any = None) -> torch.Tensor:
        """The whole prompt tokens [T] of one row, one layer at a time: projections and MLP `chunk` tokens
        at a time (bounded activations), attention over the whole prompt in one fused causal pass
        (`prefill_attention`: no [T, T] scores). Same result as chunked `prefill`; returns the last position's
        float32 logits [V]."""
        t = tokens.shape[0]
        a = self.args
        h = self.tok_embeddings(tokens[None])  # [1, T, H]
        q_all = torch.empty(t, a.n_heads, a.head_dim, dtype=h.dtype, device=h.device)
        bounds = [(s, min(t, s + chunk)) for s in range(0, t, chunk)]
        where = [TokenIndex.of([(row, s, e - s)], cache, self.device) for s, e in bounds]
        queries: list[torch.Tensor] = []
        base = cache.base[row]
        for block in self.layers:
            att = block.attention
            for (s, e), w in zip(bounds, where, strict=True):
                att.qkv_into_cache(block.attention_norm(h[0, s:e]), self.rope_cos, self.rope_sin, cache, w, q_all[s:e])
            q = q_all.transpose(0, 1)[None]  # [1, Hq, T, D]
            out = prefill_attention(q, cache.k[att.layer, row, None, :, base:base + t],
                                    cache.v[att.layer, row, None, :, base:base + t], att.scale)  # [1, Hq, T, D]
            if bootstrap is not None:  # q_all is rewritten by the next layer
                queries.append(q[0, :, -bootstrap.batch_index:].clone(memory_format=torch.contiguous_format))
            for s, e in bounds:
                x = h[:, s:e] + att.wo(out[:, :, s:e].transpose(1, 2).reshape(1, e - s, -1))
                h[:, s:e] = x + block.mlp(block.ffn_norm(x))
        if bootstrap is not None:
            attention.bootstrap(queries, cache, t, bootstrap, refresh, self.layers[0].attention.scale)
        return self._head(h[0, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, step: DecodeStep) -> torch.Tensor:
        """tokens [B] (one per row of `step`) -> float32 logits [B, V]."""
        cos, sin = self.rope_cos, self.rope_sin  # each row's position is read from the tables in attention
        h = self.tok_embeddings(tokens[:, None])  # [B, 1, H]
        # Block.forward unrolled so each residual add runs with the RMSNorm after it (one launch on a GPU).
        x = self.layers[0].attention_norm(h)
        for i, block in enumerate(self.layers):
            h, x = _add_norm(h, block.attention.decode(x, cos, sin, cache, step, partial=True), block.ffn_norm)
            after = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else self.norm
            h, x = _add_norm(h, block.mlp(x, partial=True), after)
        if step.refresh is not None:
            step.refresh.finish()  # the last layers' refreshes are done before the step is
        return _linear(self.output, x[:, 0]).float()
