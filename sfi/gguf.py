"""Convert a GGUF file (llama, qwen2, qwen3) into a Hugging Face style directory, once.

transformers parses the GGUF metadata into `config.json` and the tokenizer files; the tensors we
dequantise ourselves with the `gguf` package and stream into `model.safetensors` as float32 under
Hugging Face parameter names, undoing llama.cpp's Q/K row permutation for llama. transformers can
also dequantise a GGUF model, but only through a full model load; we use that only in tests as an
independent check. The result is built in a temporary sibling and renamed into place, so a killed
conversion never leaves a half directory. This is not a quantised runtime: every weight becomes float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .default_model import cache_root, exclusive_lock
from .errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Every layer of every supported architecture has these; a GGUF missing one would load with random weights.
_REQUIRED_LAYER = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                   "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# llama.cpp precomputes llama-3 rope scaling factors as a tensor; the Hugging Face config carries them instead.
_IGNORED = {"rope_freqs.weight"}
# Parsing failures of a bad file surface as these from numpy and the gguf package.
_READ_ERRORS = (ValueError, OSError, IndexError, KeyError, OverflowError)


@dataclass(frozen=True)
class _Plan:
    """One GGUF tensor's way into model.safetensors."""

    tensor: Any  # gguf.ReaderTensor
    hf_name: str
    shape: tuple[int, ...]  # Hugging Face order: [out, in] for a matrix
    permute_heads: int  # > 0: undo llama.cpp's Q/K row permutation with this many heads


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write config, tokenizer, generation config and float32 `model.safetensors` for `gguf_path` to `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _read(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"GGUF file {gguf_path} has architecture {arch!r}; sfi supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    plan = _plan(reader, arch, gguf_path)
    # The tensors are the ground truth for what transformers' metadata mapping may get wrong: it ignores
    # attention.key_length (a qwen3 GGUF would get Qwen3Config's default head_dim 128 whatever its weights).
    q_rows = next(p.shape[0] for p in plan if p.hf_name == "model.layers.0.self_attn.q_proj.weight")
    facts = {"head_dim": q_rows // _field(reader, f"{arch}.attention.head_count"),
             "tie_word_embeddings": all(p.hf_name != "lm_head.weight" for p in plan)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 is for secrets; a model directory should read like one made by mkdir
        _save_config_and_tokenizer(gguf_path, tmp, facts)
        _save_generation_config(reader, tmp)
        _write_safetensors(plan, tmp / "model.safetensors", gguf_path)
        _install(tmp, out_dir)
    except OSError as e:  # reading errors became ModelError above; these are writes: disk full, permissions
        raise ModelError(f"cannot write the converted model for {gguf_path} to {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def convert_weights(gguf_path: Path, out: Path) -> None:
    """Only the float32 weights of `gguf_path`, as safetensors at `out` (for a machine that has the converted
    config and tokenizer already and lacks what reads a GGUF tokenizer)."""
    reader = _read(Path(gguf_path))
    _write_safetensors(_plan(reader, _field(reader, "general.architecture"), Path(gguf_path)), Path(out),
                       Path(gguf_path))


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where `gguf_path` is converted to: keyed by resolved path, size and mtime, so an edited file converts anew."""
    path = Path(gguf_path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"GGUF file {gguf_path} cannot be read: {e}") from None
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def ensure_converted(gguf_path: Path) -> Path:
    """The converted directory for `gguf_path`, converting on first use; later runs reuse it."""
    out = gguf_cache_dir(gguf_path)
    # The directory only appears complete (convert_gguf renames it into place), so existence is enough.
    if out.is_dir():
        return out
    with exclusive_lock(out.parent / f".{out.name}.lock"):
        if not out.is_dir():
            # Holding the lock, any temporary sibling of this key is left by a killed conversion.
            for stale in out.parent.glob(f".{out.name}.*-*"):
                shutil.rmtree(stale, ignore_errors=True)
            convert_gguf(Path(gguf_path), out)
    return out


def _read(gguf_path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(gguf_path)
    except _READ_ERRORS as e:
        raise ModelError(f"{gguf_path} is not a readable GGUF file: {e}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar or string metadata value (own helper: ReaderField.contents() is missing in older gguf)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def _plan(reader: Any, arch: str, gguf_path: Path) -> list[_Plan]:
    n_layers = _field(reader, f"{arch}.block_count")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    n_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", n_heads)
    if not isinstance(n_layers, int) or not isinstance(n_heads, int) or n_layers < 1 or n_heads < 1:
        raise ModelError(f"GGUF file {gguf_path} lacks {arch}.block_count or {arch}.attention.head_count")
    # llama.cpp interleaves the rotary halves of Q and K rows for llama only; qwen2/qwen3 keep HF's layout.
    heads = {"attn_q": n_heads, "attn_k": n_kv_heads} if arch == "llama" else {}
    plan, seen = [], set()
    for t in reader.tensors:
        name = t.name
        if name in _IGNORED:
            continue
        hf_name, permute = _GLOBAL_NAMES.get(name), 0
        if hf_name is None:
            layer, _, rest = name.removeprefix("blk.").partition(".")
            if not name.startswith("blk.") or not layer.isdigit() or rest not in _LAYER_NAMES:
                raise ModelError(f"GGUF file {gguf_path} has tensor {name!r}, which sfi does not know for {arch}")
            hf_name = f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
            permute = heads.get(rest.partition(".")[0], 0)
            seen.add((int(layer), rest))
        plan.append(_Plan(t, hf_name, tuple(int(d) for d in reversed(t.shape.tolist())), permute))
    missing = [f"blk.{i}.{r}" for i in range(n_layers) for r in _REQUIRED_LAYER if (i, r) not in seen]
    missing += [g for g in ("token_embd.weight", "output_norm.weight") if all(p.tensor.name != g for p in plan)]
    if missing:
        raise ModelError(f"GGUF file {gguf_path} is incomplete: missing {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return plan


def _save_config_and_tokenizer(gguf_path: Path, out: Path, facts: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    # transformers mixes in tokenizer/config files lying beside the GGUF (a repo snapshot often has them,
    # and they silently drop the chat template), so it gets a directory holding nothing but a link to it.
    with tempfile.TemporaryDirectory(prefix="sfi-gguf-") as alone:
        name = gguf_path.name
        os.symlink(gguf_path.resolve(), Path(alone) / name)
        try:
            config = AutoConfig.from_pretrained(alone, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=name)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ModelError(f"transformers cannot read the metadata of GGUF file {gguf_path}: {e}") from None
    for key, value in facts.items():
        setattr(config, key, value)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _save_generation_config(reader: Any, out: Path) -> None:
    ids = {"bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}
    ids = {k: v for k, v in ids.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stores each head's rows as (half, 2) pairs; Hugging Face wants (2, half): swap them back.
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(p: _Plan, gguf_path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        w = dequantize(p.tensor.data, p.tensor.tensor_type)
    except NotImplementedError:
        raise ModelError(f"GGUF file {gguf_path}: tensor {p.tensor.name} uses quantisation "
                         f"{p.tensor.tensor_type.name}, which the installed gguf package cannot dequantise; "
                         f"try `pip install -U gguf`") from None
    except _READ_ERRORS as e:
        raise ModelError(f"{gguf_path} is not a readable GGUF file: tensor {p.tensor.name}: {e}") from None
    if w.size != int(np.prod(p.shape)):
        raise ModelError(f"{gguf_path} is not a readable GGUF file: tensor {p.tensor.name} holds {w.size} values, "
                         f"expected shape {list(p.shape)}")
    w = w.reshape(p.shape)
    if p.permute_heads:
        w = _unpermute(w, p.permute_heads)
    return np.ascontiguousarray(w, dtype="<f4")


def _write_safetensors(plan: list[_Plan], path: Path, gguf_path: Path) -> None:
    """Stream tensors into a safetensors file one at a time, so peak memory is one tensor, not the model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in plan:
        nbytes = 4 * int(np.prod(p.shape))
        header[p.hf_name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for p in plan:
            f.write(memoryview(_dequantize(p, gguf_path)).cast("B"))


def _install(tmp: Path, out_dir: Path) -> None:
    # os.replace cannot replace a non-empty directory, so an old conversion is moved aside first.
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
