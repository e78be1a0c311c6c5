"""Attention kernels of `sfi`, imported as `sfi_kernels` (never as `kernels`: Hugging Face ships a
package of that name and transformers probes for it).

Each kernel comes as a pure-torch reference plus, where it pays, a Triton implementation with the
same signature. The references are the ground truth in tests and the CPU fallback at run time.
"""

from .decode_attention import decode_attention, decode_attention_ref
from .domain_logits import domain_logits, domain_logits_ref
from .fused import decode_qkv, decode_qkv_ref, rms_norm, rms_norm_ref
from .ranged_decode import default_split, ranged_decode_attention, ranged_decode_attention_ref

__all__ = ["decode_attention", "default_split", "decode_attention_ref", "decode_qkv", "decode_qkv_ref", "domain_logits",
           "domain_logits_ref", "ranged_decode_attention", "ranged_decode_attention_ref", "rms_norm", "rms_norm_ref"]
