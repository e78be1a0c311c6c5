"""`sfi eval`: offline quality measurements of recipes side by side, from real prose, no download.

Tasks are generated from CPython's `pydoc_data.topics` (about 110k tokens of English), seeded:
passkey retrieval, multi-key retrieval (several needles, one asked), variable tracking (a chain of
assignments spread through the haystack), and a fidelity measure: the teacher-forced negative
log-likelihood of the real continuation of a prose prefix. Each trial's prompt is prefilled once and
shared by every recipe (prefill is dense whatever the recipe); only decoding differs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .boundary import make_boundary
from .config import Config, load_config
from .decoder import Request, generate, prefill_capture
from .errors import ConfigError
from .loader import LoadedModel
from .runtime import SfiRuntime
from .sampling import RowSampler, SamplingParams
from .stopping import StopChecker

TASKS = ("passkey", "multikey", "vartrack", "nll")
KEY_WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper")
NLL_TOKENS = 48


@dataclass(frozen=True)
class Trial:
    task: str
    length: int
    prompt_ids: list[int]
    answer: str | None = None  # retrieval tasks: the number the output must contain
    continuation: list[int] | None = None  # nll: the true next tokens
    chain: tuple[str, ...] = ()  # vartrack: the variables that hold the value

    def score(self, output: str) -> bool:
        """passkey, multikey: the number appears; vartrack: the first variable named is in the chain."""
        if self.task == "vartrack":
            named = re.search(r"X\d{3}", output)
            return bool(named) and named.group(0) in self.chain
        return self.answer is not None and self.answer in output


@dataclass
class Cell:
    recipe: str
    task: str
    length: int
    trials: int = 0
    correct: int = 0
    nll: list[float] = field(default_factory=list)
    attended: list[float] = field(default_factory=list)
    slow_fraction: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        mean = lambda xs: round(statistics.mean(xs), 4) if xs else None  # noqa: E731
        return {"recipe": self.recipe, "task": self.task, "length": self.length, "trials": self.trials,
                "correct": self.correct if self.task != "nll" else None,
                "accuracy": round(self.correct / self.trials, 4) if self.trials and self.task != "nll" else None,
                "nll": mean(self.nll), "attended_fraction": mean(self.attended),
                "slow_fraction": mean(self.slow_fraction)}


# -- task generation ------------------------------------------------------------------------------------
def _prose_sentences(seed: int) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    text = " ".join(topics[n] for n in names)
    text = re.sub(r"\s+", " ", text)
    return [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]


def _haystack(tokenizer: Any, n_tokens: int, rng: random.Random, needles: Sequence[tuple[float, str]]) -> str:
    """About n_tokens of prose with each needle inserted between sentences at its depth (0..1)."""
    sentences = _prose_sentences(rng.randrange(1 << 30))
    start = rng.randrange(len(sentences) // 2)
    picked, count = [], 0
    count = sum(len(tokenizer(n, add_special_tokens=False)["input_ids"]) + 1 for _, n in needles)
    for s in sentences[start:] + sentences[:start]:
        size = len(tokenizer(s, add_special_tokens=False)["input_ids"])
        if count + size > n_tokens:
            if count >= 0.9 * n_tokens:
                break
            continue  # a long sentence would overshoot: try the next, shorter ones
        picked.append(s)
        count += size
    for depth, needle in sorted(needles, reverse=True):
        picked.insert(round(depth * len(picked)), needle + " ")
    return "".join(picked)


def _chat(tokenizer: Any, content: str, answer_prefix: str = "") -> list[int]:
    """The user turn, the generation prompt, then the start of the answer (as RULER does), so that the
    answer itself fits in a few tokens and a small model does not spend them restating the question."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"])


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def build_trial(task: str, tokenizer: Any, length: int, seed: int) -> Trial:
    """One seeded trial whose prompt is about `length` tokens."""
    rng = random.Random(f"{task}:{length}:{seed}")
    chain: tuple[str, ...] = ()
    if task == "passkey":
        answer = _number(rng)
        needles = [(rng.uniform(0.1, 0.9), f"The pass key is {answer}. Remember it. {answer} is the pass key.")]
        question, prefix = "\n\nWhat is the pass key? Answer with the number only.", "The pass key is the number"
    elif task == "multikey":
        words = rng.sample(KEY_WORDS, 4)
        values = [_number(rng) for _ in words]
        needles = [(rng.uniform(0.05, 0.95), f"The special magic number for {w} is {v}.")
                   for w, v in zip(words, values, strict=True)]
        asked = rng.randrange(4)
        answer = values[asked]
        question = f"\n\nWhat is the special magic number for {words[asked]}? Answer with the number only."
        prefix = f"The special magic number for {words[asked]} is"
    elif task == "vartrack":
        # RULER's formulation: a chain VAR A = value, VAR B = VAR A, VAR C = VAR B spread through the text,
        # and the question asks which variables hold the value.
        chain = tuple(f"X{n}" for n in rng.sample(range(100, 1000), 3))
        answer = _number(rng)
        depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)
        lines = [f"VAR {chain[0]} = {answer}."]
        lines += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
        needles = list(zip(depths, lines, strict=True))
        question = (f"\n\nFind all variables that are assigned the value {answer} in the text above, "
                    "directly or through other variables.")
        prefix = f"The variables assigned the value {answer} are: VAR"
    elif task != "nll":
        raise ConfigError(f"unknown eval task {task!r}; choose from {', '.join(TASKS)}")
    if task != "nll":
        room = length - len(_chat(tokenizer, question, prefix)) - 4
        hay = _haystack(tokenizer, room, rng, needles)
        return Trial(task, length, _chat(tokenizer, hay + question, prefix), answer, chain=chain)
    # nll: a prose prefix and its true continuation.
    # Sentence-by-sentence counts overestimate the joined text by about a token per sentence: ask for more.
    want = int(1.15 * (length + NLL_TOKENS)) + 200
    ids = tokenizer(_haystack(tokenizer, want, rng, []), add_special_tokens=False)["input_ids"]
    if len(ids) < length + NLL_TOKENS:
        raise ConfigError(f"not enough prose for a {length}-token nll trial")
    return Trial(task, length, list(ids[:length]), continuation=list(ids[length:length + NLL_TOKENS]))


# -- recipes --------------------------------------------------------------------------------------------
def parse_recipe_spec(spec: str) -> Config:
    """'NAME' or 'NAME:section.key=value,section.key=value' (an ablation of a recipe)."""
    name, _, rest = spec.partition(":")
    overrides = [item.strip() for item in rest.split(",") if item.strip()]
    return dataclasses.replace(load_config(name, overrides), recipe=spec)


def _runtime(config: Config, lm: LoadedModel, n_rows: int) -> SfiRuntime | None:
    cfg = config.sfi
    if cfg.mode == "dense":
        return None
    boundary = make_boundary(cfg.boundary, lm.tokenizer, cooldown=cfg.cooldown, min_gap=cfg.min_gap,
                             max_interval=cfg.max_interval, fixed_period=cfg.fixed_period)
    return SfiRuntime(cfg, boundary, n_rows, lm.args.kv_bytes_per_token(lm.model.dtype))


# -- running --------------------------------------------------------------------------------------------
def evaluate(lm: LoadedModel, recipes: Sequence[str], tasks: Sequence[str], lengths: Sequence[int], trials: int,
             seed: int = 0, max_new_tokens: int = 12, batch: int = 4, prefill_chunk: int = 1024,
             progress: Callable[[str], None] | None = None,
             checkpoint: Callable[[list[Cell]], None] | None = None) -> list[Cell]:
    """Every recipe on every (task, length); `checkpoint` gets the cells finished so far after each
    (task, length), so a long evaluation that is stopped keeps what it measured."""
    configs = [parse_recipe_spec(r) for r in recipes]
    window = max(c.sfi.bootstrap_window for c in configs)
    cells = {(c.recipe, t, n): Cell(c.recipe, t, n) for c in configs for t in tasks for n in lengths}
    for task in tasks:
        for length in lengths:
            if length + max_new_tokens + NLL_TOKENS > lm.max_context:
                raise ConfigError(f"length {length} leaves no room for the answer in the model's "
                                  f"{lm.max_context}-token context")
            all_trials = [build_trial(task, lm.tokenizer, length, seed * 100003 + i) for i in range(trials)]
            for start in range(0, trials, batch):
                group = all_trials[start:start + batch]
                _run_group(lm, configs, group, cells, window, max_new_tokens, prefill_chunk)
                if progress:
                    progress(f"{task} @ {length}: {min(start + batch, trials)}/{trials} trials")
            if checkpoint:
                checkpoint([c for c in cells.values() if c.trials])
    return list(cells.values())


def _run_group(lm: LoadedModel, configs: Sequence[Config], group: Sequence[Trial], cells: dict, window: int,
               max_new_tokens: int, prefill_chunk: int) -> None:
    model, task = lm.model, group[0].task
    new = NLL_TOKENS if task == "nll" else max_new_tokens
    cache = model.new_cache(len(group), max(len(t.prompt_ids) for t in group) + new)
    prefilled = [prefill_capture(model, cache, row, t.prompt_ids, prefill_chunk, window)
                 for row, t in enumerate(group)]
    for config in configs:
        eos = () if task == "nll" else lm.eos_ids
        requests = [Request(t.prompt_ids, RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, eos, (), new))
                    for t in group]
        runtime = _runtime(config, lm, len(group))
        forced = [t.continuation for t in group] if task == "nll" else None
        logprobs: list[list[float]] = [[] for _ in group]
        for event in generate(model, requests, cache=cache, runtime=runtime, prefilled=prefilled, forced=forced):
            if forced is None:
                continue
            if hasattr(event, "logprob"):
                logprobs[event.row].append(event.logprob)
            else:
                for row, lp in zip(event.rows, event.logprobs, strict=True):
                    logprobs[row].append(lp)
        for row, trial in enumerate(group):
            cell = cells[(config.recipe, task, trial.length)]
            cell.trials += 1
            if task == "nll":
                cell.nll.append(-statistics.mean(logprobs[row]))
            else:
                cell.correct += int(trial.score(requests[row].stopper.text()))
            report = runtime.report(row) if runtime else None
            decode_steps = len(requests[row].stopper.token_ids) - 1
            if report and decode_steps > 0:
                # over decode steps: the prefill step (always dense) is the same for every recipe
                s = runtime.stats[row]
                cell.attended.append(statistics.mean(s.fractions[1:]))
                cell.slow_fraction.append((s.slow - 1) / decode_steps)
            elif decode_steps > 0:
                cell.attended.append(1.0)
                cell.slow_fraction.append(1.0)


def parse_lengths(text: str) -> list[int]:
    """'2k,4k,7k' -> [2048, 4096, 7168]; plain integers are token counts."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            value = float(part.rstrip("k")) * scale
        except ValueError:
            raise ConfigError(f"bad length {part!r}: use token counts like 2000 or 2k (= 2048)") from None
        if value < 64 or not math.isfinite(value):
            raise ConfigError(f"length {part!r} is too short for a haystack (at least 64 tokens)")
        out.append(int(value))
    if not out:
        raise ConfigError("no lengths given")
    return out
