"""Configuration: dataclasses with the defaults, layered as defaults -> recipe YAML -> `--set` -> CLI flags.

YAML appears only here, at the edge. Every SFI constant of ../shared/sfi-spec.md lives in `SfiConfig`
with the spec's value as its default; a recipe names only what it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class SfiConfig:
    """The SFI algorithm's knobs (spec defaults). mode "dense" makes every step a full-attention step."""

    mode: str = "sfi"  # "sfi" | "dense"
    sink: int = 4
    k_head: int = 2048
    recent: int = 256
    min_gap: int = 16
    max_interval: int = 64
    cooldown: int = 2
    bootstrap_window: int = 16
    boundary: str = "sentence"  # "sentence" | "fixed" | "none" (bootstrap only)
    fixed_period: int = 24  # for boundary "fixed"
    selector: str = "sfi"  # "sfi" | "topk" (plain top-k of the group-averaged attention)
    # A context within sink + k_head + recent is attended whole (exactly dense). Off: such rows still take
    # slow/fast steps through the compact memory (used to test that a covering budget equals dense).
    dense_within_budget: bool = True
    alpha: float = 0.5  # power-mean exponent over the rows of a KV group
    gamma: float = 0.5  # key-norm prior exponent
    w_l2: float = 1.0
    w_pos: float = 0.7
    pos_p: float = 1.8
    pos_eta: float = 0.4
    pos_beta: float = -math.log(0.6) / 0.9
    lam_max_multi: float = 0.25  # mixing-weight cap when R > 1
    lam_max_single: float = 0.35  # ... and when R == 1
    nms_radius: int = 16
    nms_strength: float = 1.0
    excl_temperature: float = 2.0
    excl_weight: float = 0.85
    use_power_mean: bool = True  # ablation switches for the Selector's stages (off: arithmetic mean)
    use_prior: bool = True
    use_nms: bool = True
    use_exclusivity: bool = True

    def __post_init__(self) -> None:
        _choice("sfi.mode", self.mode, ("sfi", "dense"))
        _choice("sfi.boundary", self.boundary, ("sentence", "fixed", "none"))
        _choice("sfi.selector", self.selector, ("sfi", "topk"))
        for name in ("sink", "k_head", "recent", "min_gap", "cooldown", "nms_radius"):
            _at_least(f"sfi.{name}", getattr(self, name), 0)
        for name in ("max_interval", "bootstrap_window", "fixed_period"):
            _at_least(f"sfi.{name}", getattr(self, name), 1)
        if self.alpha <= 0:
            raise ConfigError(f"sfi.alpha must be > 0, got {self.alpha}")
        if not (0 <= self.lam_max_multi <= 1 and 0 <= self.lam_max_single <= 1):
            raise ConfigError("sfi.lam_max_multi and sfi.lam_max_single must be in [0, 1]")


@dataclass
class DecodeConfig:
    """How the runtime decodes: device, precision, batching."""

    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    prefill_chunk: int = 2048  # prompt tokens per prefill forward: bounds prefill memory
    max_batch_size: int = 32
    kv_memory_fraction: float = 0.85  # of the memory free after loading, for KV caches and activations
    cuda_graphs: bool = True  # on a GPU, replay decode steps from CUDA graphs (false: launch op by op)

    def __post_init__(self) -> None:
        _at_least("decode.prefill_chunk", self.prefill_chunk, 16)
        _at_least("decode.max_batch_size", self.max_batch_size, 1)
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"decode.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class GenerationConfig:
    """Defaults for jobs that do not set their own."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _at_least("generation.max_new_tokens", self.max_new_tokens, 1)
        _at_least("generation.top_k", self.top_k, 0)
        if self.temperature < 0:
            raise ConfigError(f"generation.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Config:
    recipe: str = "default"
    description: str = ""
    sfi: SfiConfig = field(default_factory=SfiConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"sfi": SfiConfig, "decode": DecodeConfig, "generation": GenerationConfig}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def recipes_dir() -> Path:
    """The shipped recipes: the repo's recipes/ (source checkout, editable install) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the recipes folder is missing from this installation of sfi")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        return path
    path = recipes_dir() / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())} "
                          "(or a path to a .yaml file)")
    return path


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(options)}"


def _check_type(where: str, key: str, value: Any, default: Any) -> Any:
    """Coerce a YAML value to the field's type (the type of its default), or explain the mismatch."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise ConfigError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")


def _merge(raw: dict[str, Any], into: dict[str, dict[str, Any]], where: str) -> None:
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}{_suggest(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        defaults = SECTIONS[section]()
        names = [f.name for f in dataclasses.fields(defaults)]
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{where}: unknown key {section}.{key}{_suggest(key, names)}")
            into[section][key] = _check_type(where, f"{section}.{key}", value, getattr(defaults, key))


def parse_set(item: str) -> tuple[str, str, Any]:
    """'sfi.k_head=1024' -> ('sfi', 'k_head', 1024)."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. sfi.k_head=1024")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return section, name, value


def load_config(recipe: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the recipe's YAML, then each `--set` override, validated as a whole."""
    path = _recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    description = str(raw.pop("description", ""))
    raw.pop("name", None)
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    _merge(raw, values, str(path))
    for item in overrides:
        section, name, value = parse_set(item)
        _merge({section: {name: value}}, values, f"--set {item}")
    return Config(
        recipe=path.stem if path.parent == recipes_dir() else str(path),
        description=description,
        **{s: cls(**values[s]) for s, cls in SECTIONS.items()},
    )


def with_generation(config: Config, **changes: Any) -> Config:
    """A copy with CLI generation flags applied (None means "not given")."""
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(config, generation=dataclasses.replace(config.generation, **given))
