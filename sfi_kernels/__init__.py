"""Attention kernels of `sfi`, as `sfi_kernels` (never `kernels`: Hugging Face ships a package of that name,
which transformers imports).

Each kernel comes as a pure-torch reference plus, where it pays, a Triton implementation with the
same signature. The references are the ground truth in tests and the CPU fallback at run time.
"""

from .compact import compact_write, compact_write_ref
from .decode_attention import decode_attention, decode_attention_ref
from .fused import (
    add_rms_norm,
    add_rms_norm_ref,
    decode_qkv,
    decode_qkv_ref,
    rms_norm,
    rms_norm_ref,
    silu_mul,
    silu_mul_ref,
)
from .partials import SplitPartials
from .pdl import use_pdl
from .ranged_decode import LogitCapture, default_split, ranged_decode_attention, ranged_decode_attention_ref
from .selector_scores import selector_scores, selector_scores_ref
from .skinny_gemm import skinny_linear, skinny_linear_ref, skinny_pays
from .topk_positions import kept_positions, kept_positions_ref

__all__ = ["LogitCapture", "SplitPartials", "add_rms_norm", "add_rms_norm_ref", "compact_write", "compact_write_ref",
           "decode_attention", "decode_attention_ref", "decode_qkv", "decode_qkv_ref", "default_split",
           "kept_positions", "kept_positions_ref", "ranged_decode_attention", "ranged_decode_attention_ref",
           "rms_norm", "rms_norm_ref", "selector_scores", "selector_scores_ref", "silu_mul", "silu_mul_ref",
           "skinny_linear", "skinny_linear_ref", "skinny_pays", "use_pdl"]
