"""Configuration: dataclasses with the defaults, layered as defaults -> recipe YAML -> `--set` -> CLI flags.

YAML appears only here, at the edge. Every SFI constant of ../shared/sfi-spec.md lives in `SfiConfig`
with the spec's value as its default, except where our measurements depart from it (the budget derived from
the model's context, span-preserving selection, soft NMS off; the `spec` recipe restores the paper's
Selector); a recipe names only what it changes.
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
    # None ("auto" in YAML): derived from the model's context length by `for_context` (see `derived_budget`).
    k_head: int | None = None
    recent: int | None = None
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
    use_nms: bool = False  # the spec's soft NMS; off by our ablation (with span_successors it costs NLL)
    use_exclusivity: bool = True
    # Span-preserving selection (ours; 0 and 1 give the spec's Selector): each position scores at least as the
    # best of the `span_successors` positions before it, then as the best of its aligned block of `span_block`.
    # 8 and 1 from the ablation (bench/results/2026-12-02-h200-eval-grid.json, README "sfi eval").
    span_successors: int = 8
    span_block: int = 1
    # A slow step forced at this decode step (1 = the step after the prompt's first token); 0 = none.
    early_slow_step: int = 0
    # The first `dense_layers` layers attend to the whole context on every step (ours; 0 = the spec).
    dense_layers: int = 0

    def __post_init__(self) -> None:
        _choice("sfi.mode", self.mode, ("sfi", "dense"))
        _choice("sfi.boundary", self.boundary, ("sentence", "fixed", "none"))
        _choice("sfi.selector", self.selector, ("sfi", "topk"))
        for name in ("sink", "min_gap", "cooldown", "nms_radius", "span_successors", "early_slow_step",
                     "dense_layers"):
            _at_least(f"sfi.{name}", getattr(self, name), 0)
        for name in ("k_head", "recent"):
            if getattr(self, name) is not None:
                _at_least(f"sfi.{name}", getattr(self, name), 0)
        if self.span_block < 1 or self.span_block & (self.span_block - 1):
            raise ConfigError(f"sfi.span_block must be a power of two (1 = off), got {self.span_block}")
        for name in ("max_interval", "bootstrap_window", "fixed_period"):
            _at_least(f"sfi.{name}", getattr(self, name), 1)
        if self.alpha <= 0:
            raise ConfigError(f"sfi.alpha must be > 0, got {self.alpha}")
        if not (0 <= self.lam_max_multi <= 1 and 0 <= self.lam_max_single <= 1):
            raise ConfigError("sfi.lam_max_multi and sfi.lam_max_single must be in [0, 1]")

    @property
    def resolved(self) -> bool:
        return self.k_head is not None and self.recent is not None

    def for_context(self, max_context: int) -> SfiConfig:
        """This config with k_head and recent fixed: the recipe's values where it pins them, else derived
        from the model's context length."""
        k_head, recent = derived_budget(max_context)
        return dataclasses.replace(self, k_head=k_head if self.k_head is None else self.k_head,
                                   recent=recent if self.recent is None else self.recent)

    def budget_note(self, max_context: int) -> str:
        """Which budget a run uses, and why: 'k_head 768, recent 128 (derived from the 8,192-token context)'."""
        r = self.for_context(max_context)
        pinned = [name for name in ("k_head", "recent") if getattr(self, name) is not None]
        why = ("set by the recipe" if len(pinned) == 2 else
               f"derived from the model's {max_context:,}-token context" + (f"; {pinned[0]} set by the recipe"
                                                                             if pinned else ""))
        return f"sink {r.sink}, k_head {r.k_head}, recent {r.recent} ({why})"


def derived_budget(max_context: int) -> tuple[int, int]:
    """(k_head, recent) for a model whose context is `max_context` tokens: 3/32 of the context in selected
    tokens (768 at 8k, rounded to 64) and 1/64 as the recent span (128 at 8k), capped at the paper's
    2048 / 256, its budget for 32k-128k models. A fast step then reads at most about 11% of a full context
    plus the tokens generated since the last refresh."""
    k_head = min(2048, max(64, round(max_context * 3 / 32 / 64) * 64))
    recent = min(256, max(32, max_context // 64))
    return k_head, recent


@dataclass
class DecodeConfig:
    """How the runtime decodes: device, precision, batching."""

    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    prefill_chunk: int = 2048  # prompt tokens per prefill forward: bounds prefill memory
    max_batch_size: int = 32
    kv_memory_fraction: float = 0.85  # of the memory free after loading, for KV caches and activations
    cuda_graphs: bool = True  # on a GPU, replay decode steps from CUDA graphs (false: launch op by op)
    # With CUDA graphs, plan and stage each decode step while the last one runs and launch it before the last one's
    # bookkeeping (sfi.engine.decoder: the same steps and tokens); false: one step at a time.
    pipeline: bool = True
    # A finished row's slot takes the next job at once, its prompt prefilled prefill_chunk tokens per decode
    # step; false: static batches, each decoded to its last row before the next starts.
    continuous: bool = True
    # Prompts sharing at least this many leading tokens prefill the shared part once (0: never).
    prefix_min_tokens: int = 256
    # Continuous batching's queue: "output" admits the jobs with the most new tokens first (their long decodes start
    # early instead of trailing alone at the end), "length" the longest prompt + output first.
    order: str = "output"

    def __post_init__(self) -> None:
        if self.order not in ("output", "length"):
            raise ConfigError(f"decode.order must be output or length, got {self.order!r}")
        _at_least("decode.prefill_chunk", self.prefill_chunk, 16)
        _at_least("decode.max_batch_size", self.max_batch_size, 1)
        _at_least("decode.prefix_min_tokens", self.prefix_min_tokens, 0)
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"decode.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class GenerationConfig:
    """Defaults for jobs that do not set their own."""

    max_new_tokens: int = 256
    max_new_tokens_cap: int = 0  # an upper bound for every job, its own max_new_tokens included; 0 = none
    ignore_eos: bool = False  # decode past end-of-sequence (benchmarks with random weights)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _at_least("generation.max_new_tokens", self.max_new_tokens, 1)
        _at_least("generation.max_new_tokens_cap", self.max_new_tokens_cap, 0)
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
    if default is None:  # an optional int whose None means "derived" (k_head, recent)
        if value is None or value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be an integer or auto, got {value!r}")
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
