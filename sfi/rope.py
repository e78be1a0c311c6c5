"""Rotary position embedding: inverse frequencies for the rope types we support, and their application.

Supported `rope_type`s: default, linear, llama3, yarn (Qwen3 at 128k uses yarn, factor 4). The layout is
the "rotate half" one Hugging Face checkpoints use (the two halves of each head are the pair).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import ModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


def _yarn_attention_factor(p: dict[str, Any], factor: float) -> float:
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        return mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    return mscale(factor)


def _yarn(theta: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    old_ctx = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / old_ctx
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = _base_inv_freq(theta, dim)
    interpolated = extrapolated / factor
    keep = 1 - ramp  # 1 where the frequency is high enough to keep unscaled
    return interpolated * (1 - keep) + extrapolated * keep, _yarn_attention_factor(p, factor)


def inv_freq_for(rope: dict[str, Any], head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the factor cos/sin are scaled by, from a rope_parameters dict."""
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(rope.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError("partial rotary embeddings are not supported")
    if kind == "default":
        return _base_inv_freq(theta, head_dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, head_dim) / rope["factor"], 1.0
    if kind == "llama3":
        return _llama3(_base_inv_freq(theta, head_dim), rope), 1.0
    if kind == "yarn":
        return _yarn(theta, head_dim, rope, max_position_embeddings)
    raise ModelError(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rope_table(inv_freq: torch.Tensor, scale: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] in float32 for positions 0..length-1."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] rotated by cos, sin broadcastable to it (already cast to x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
