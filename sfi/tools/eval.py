"""`sfi eval`: offline quality measurements of recipes side by side, from real prose, no download.

Tasks are generated from CPython's `pydoc_data.topics` (about 110k tokens of English), seeded:
- retrieval, scored by whether the answer appears in the greedy output: `passkey` (a 5-digit key at a random
  depth), `multikey` (four keyed numbers, one asked), `vartrack` (RULER's variable tracking), and `preamble`
  (a pass key whose answer comes after a preamble sentence fed through decode steps, so a slow step fires at
  the sentence boundary and the whole answer is decoded from a memory refreshed there);
- `nll`: the teacher-forced negative log-likelihood of the real continuation of a prose prefix, with the
  recall diagnostic: per layer and KV head, the share of the dense attention mass that each fast step's keys
  (sink, selected, recent span) hold;
- `fidelity`: 256 greedy tokens after a long document and a request for a summary: token agreement with the
  dense output, and the NLL and top-1 agreement of the dense output fed back (teacher forcing).
Each trial's prompt is prefilled once and shared by every recipe (prefill is dense whatever the recipe); only
decoding differs. Every cell keeps its per-trial values, so intervals and paired differences can be computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config, load_config
from ..engine.decoder import PrefillDone, Prefilled, Request, generate, prefill_capture
from ..errors import ConfigError
from ..loader import LoadedModel
from ..method.boundary import make_boundary
from ..method.runtime import SfiRuntime
from ..sampling import RowSampler, SamplingParams
from ..stopping import StopChecker

TASKS = ("passkey", "multikey", "vartrack", "preamble", "nll", "fidelity")
RETRIEVAL = ("passkey", "multikey", "vartrack", "preamble")
KEY_WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper")
ANSWER_TOKENS = 12  # free tokens for a retrieval answer (after any forced preamble)
NLL_TOKENS = 48
FIDELITY_TOKENS = 256
# Fed through decode steps before the answer: long enough (>= min_gap tokens) for its sentence end to fire a slow
# step, whose query then refreshes the memory the answer is decoded from.
PREAMBLE = "I read the whole text carefully, from its first line to its last one, and I found the pass key in it."
PREAMBLE_ANSWER = " The pass key is the number"


@dataclass(frozen=True)
class Trial:
    task: str
    length: int
    prompt_ids: list[int]
    answer: str | None = None  # retrieval tasks: the number the output must contain
    continuation: list[int] | None = None  # nll: the true next tokens
    chain: tuple[str, ...] = ()  # vartrack: the variables that hold the value
    forced: tuple[int, ...] = ()  # preamble: tokens fed through decode steps before the model answers

    def score(self, output: str) -> bool:
        """passkey, multikey, preamble: the number appears; vartrack: the first variable named is in the chain."""
        if self.task == "vartrack":
            named = re.search(r"X\d{3}", output)
            return bool(named) and named.group(0) in self.chain
        return self.answer is not None and self.answer in output


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of its normal-approximation 95% interval)."""
    m = statistics.fmean(values)
    return m, (z * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf)


@dataclass
class Cell:
    recipe: str
    task: str
    length: int
    values: list[float] = field(default_factory=list)  # per trial: 1/0 correct (retrieval) or NLL
    agreement: list[float] = field(default_factory=list)  # fidelity: share of dense's tokens before the first change
    top1: list[float] = field(default_factory=list)  # fidelity: dense's token is the argmax, teacher-forced
    attended: list[float] = field(default_factory=list)
    slow_fraction: list[float] = field(default_factory=list)
    recall_sum: torch.Tensor | None = None  # nll: [L, Hkv] summed attention mass held by fast steps
    recall_count: torch.Tensor | None = None  # [L] fast rows seen

    @property
    def trials(self) -> int:
        return len(self.values)

    def summary(self) -> dict[str, Any]:
        mean = lambda xs: round(statistics.fmean(xs), 4) if xs else None  # noqa: E731
        out: dict[str, Any] = {"recipe": self.recipe, "task": self.task, "length": self.length, "trials": self.trials}
        if self.task in RETRIEVAL:
            correct = int(sum(self.values))
            lo, hi = wilson(correct, self.trials)
            out |= {"correct": correct, "accuracy": round(correct / self.trials, 4) if self.trials else None,
                    "ci95": [round(lo, 4), round(hi, 4)]}
        else:
            out["nll"] = mean(self.values)
        if self.task == "fidelity":
            out |= {"agreement": mean(self.agreement), "top1": mean(self.top1)}
        if self.recall_sum is not None and self.recall_count is not None and int(self.recall_count.min()) > 0:
            per = self.recall_sum / self.recall_count[:, None]  # [L, Hkv]
            out |= {"recall": round(float(per.mean()), 4), "recall_by_layer": per.mean(1).round(decimals=4).tolist(),
                    "recall_by_head": per.round(decimals=4).tolist()}
        out |= {"attended_fraction": mean(self.attended), "slow_fraction": mean(self.slow_fraction),
                "values": [round(v, 5) for v in self.values]}
        return out


def compare_to_dense(rows: list[dict[str, Any]], dense: str = "dense") -> None:
    """Adds, where the `dense` recipe ran the same task and length: for retrieval `within_dense_ci` (the
    count lies in dense's Wilson interval); for nll and fidelity `nll_vs_dense` (relative change of the mean)
    and `nll_vs_dense_ci` (half-width of its 95% interval, from the paired per-trial differences)."""
    ref = {(r["task"], r["length"]): r for r in rows if r["recipe"] == dense}
    for r in rows:
        d = ref.get((r["task"], r["length"]))
        if d is None or r["recipe"] == dense or len(d["values"]) != len(r["values"]):
            continue
        if "ci95" in r:
            lo, hi = d["ci95"]
            r["within_dense_ci"] = lo <= r["accuracy"] <= hi
        elif r.get("nll") is not None:
            diff = [a - b for a, b in zip(r["values"], d["values"], strict=True)]
            m, half = mean_ci(diff)
            base = statistics.fmean(d["values"])
            r["nll_vs_dense"] = round(m / base, 4)
            r["nll_vs_dense_ci"] = round(half / base, 4) if math.isfinite(half) else None


# -- task generation ------------------------------------------------------------------------------------
def corpus_id() -> str:
    """Which prose the trials come from: `pydoc_data.topics` differs between Python versions, so two machines
    build the same trial i from the same seed only when this string is the same on both."""
    import hashlib
    import sys
    from pydoc_data.topics import topics

    digest = hashlib.sha256("\0".join(f"{k}\0{topics[k]}" for k in sorted(topics)).encode()).hexdigest()
    return f"pydoc_data.topics of Python {sys.version.split()[0]}, sha256 {digest[:16]}"


def _prose_sentences(seed: int) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    text = " ".join(topics[n] for n in names)
    text = re.sub(r"\s+", " ", text)
    return [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]


def haystack(tokenizer: Any, n_tokens: int, rng: random.Random, needles: Sequence[tuple[float, str]]) -> str:
    """About n_tokens of prose with each needle inserted between sentences at its depth (0..1)."""
    sentences = _prose_sentences(rng.randrange(1 << 30))
    start = rng.randrange(len(sentences) // 2)
    picked = []
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


def _passkey_needle(rng: random.Random) -> tuple[str, list[tuple[float, str]]]:
    answer = _number(rng)
    return answer, [(rng.uniform(0.1, 0.9), f"The pass key is {answer}. Remember it. {answer} is the pass key.")]


def build_trial(task: str, tokenizer: Any, length: int, seed: int) -> Trial:
    """One seeded trial whose prompt is about `length` tokens."""
    rng = random.Random(f"{task}:{length}:{seed}")
    chain: tuple[str, ...] = ()
    forced: tuple[int, ...] = ()
    if task in ("passkey", "preamble"):
        answer, needles = _passkey_needle(rng)
        question, prefix = "\n\nWhat is the pass key? Answer with the number only.", "The pass key is the number"
        if task == "preamble":
            question = "\n\nWhat is the pass key? Say how you found it, then give the number."
            prefix = ""
            forced = tuple(tokenizer(PREAMBLE + PREAMBLE_ANSWER, add_special_tokens=False)["input_ids"])
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
    elif task == "fidelity":
        question = "\n\nWrite a detailed summary of the text above."
        room = length - len(_chat(tokenizer, question)) - 4
        return Trial(task, length, _chat(tokenizer, haystack(tokenizer, room, rng, []) + question))
    elif task != "nll":
        raise ConfigError(f"unknown eval task {task!r}; choose from {', '.join(TASKS)}")
    if task != "nll":
        room = length - len(_chat(tokenizer, question, prefix)) - 4
        hay = haystack(tokenizer, room, rng, needles)
        return Trial(task, length, _chat(tokenizer, hay + question, prefix), answer, chain=chain, forced=forced)
    # nll: a prose prefix and its true continuation.
    # Sentence-by-sentence counts overestimate the joined text by about a token per sentence: ask for more.
    want = int(1.15 * (length + NLL_TOKENS)) + 200
    ids = tokenizer(haystack(tokenizer, want, rng, []), add_special_tokens=False)["input_ids"]
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
    if config.sfi.mode == "dense":
        return None
    cfg = config.sfi.for_context(lm.max_context)
    return SfiRuntime(cfg, make_boundary(cfg, lm.tokenizer), n_rows, lm.args.kv_bytes_per_token(lm.model.dtype))


class RecallProbe:
    """The recall diagnostic, fed by every layer of every decode step (see DecodeStep.probe): for each fast
    row, exp(lse over the keys it read - lse over its whole cache) is the share of the dense attention mass
    those keys hold (both from the same scaled logits), averaged over each KV head's query heads."""

    def __init__(self, n_layers: int, n_kv_heads: int) -> None:
        self.total = torch.zeros(n_layers, n_kv_heads, dtype=torch.float64)
        self.count = torch.zeros(n_layers, dtype=torch.float64)

    def record(self, layer: int, fast: torch.Tensor, lse: torch.Tensor, dense_lse: torch.Tensor) -> None:
        """fast [B] bool; lse, dense_lse [B, Hq] over the keys read and over the whole cache."""
        held = (lse[fast].float() - dense_lse[fast].float()).exp().clamp(max=1.0)  # [n, Hq]
        if held.numel():
            hkv = self.total.shape[1]
            self.total[layer] += held.view(held.shape[0], hkv, -1).mean(-1).sum(0).double().cpu()
            self.count[layer] += held.shape[0]


# -- running --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One recipe's decode of a group of trials."""

    tokens: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]]
    sampled: list[list[int]]
    runtime: SfiRuntime | None


def _decode(lm: LoadedModel, config: Config, *, group: Sequence[Trial], cache, prefilled: Sequence[Prefilled],
            new: Sequence[int], forced: Sequence[Sequence[int]] | None = None, probe: RecallProbe | None = None,
            cuda_graphs: bool = False) -> _Run:
    requests = [Request(t.prompt_ids, RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, lm.eos_ids, (), n),
                        forced=forced[i] if forced is not None else None)
                for i, (t, n) in enumerate(zip(group, new, strict=True))]
    runtime = _runtime(config, lm, len(group))
    logprobs: list[list[float]] = [[] for _ in group]
    sampled: list[list[int]] = [[] for _ in group]
    for event in generate(lm.model, requests, cache=cache, runtime=runtime, prefilled=prefilled,
                          cuda_graphs=cuda_graphs, probe=probe):
        if forced is None:
            continue
        if isinstance(event, PrefillDone):
            logprobs[event.row].append(event.logprob)
            sampled[event.row].append(event.sampled)
        else:
            for i, row in enumerate(event.rows):
                logprobs[row].append(event.logprobs[i])
                sampled[row].append(event.sampled[i])
    return _Run([r.stopper.token_ids for r in requests], [r.stopper.text() for r in requests], logprobs, sampled,
                runtime)


def _costs(cell: Cell, run: _Run, row: int) -> None:
    """What the row's decode steps read (the prefill step is dense and the same for every recipe)."""
    decode_steps = len(run.tokens[row]) - 1
    if decode_steps <= 0:
        return
    if run.runtime is None:
        cell.attended.append(1.0)
        cell.slow_fraction.append(1.0)
        return
    s = run.runtime.stats[row]
    cell.attended.append(statistics.fmean(s.fractions[1:]))
    cell.slow_fraction.append((s.slow - 1) / decode_steps)


def _prefix_agreement(ours: Sequence[int], ref: Sequence[int]) -> float:
    same = 0
    while same < min(len(ours), len(ref)) and ours[same] == ref[same]:
        same += 1
    return same / max(len(ref), 1)


def evaluate(lm: LoadedModel, recipes: Sequence[str], tasks: Sequence[str], lengths: Sequence[int], trials: int,
             seed: int = 0, batch: int = 4, prefill_chunk: int = 1024,
             progress: Callable[[str], None] | None = None,
             checkpoint: Callable[[list[Cell]], None] | None = None, cuda_graphs: bool = False) -> list[Cell]:
    """Every recipe on every (task, length); `checkpoint` gets the cells finished so far after each
    (task, length), so a long evaluation that is stopped keeps what it measured. On a GPU the static steps
    are launched op by op unless `cuda_graphs` (the same kernels; each recipe's decoder would capture its own
    graphs for every step shape, which costs more than it saves over a few hundred steps)."""
    configs = [parse_recipe_spec(r) for r in recipes]
    window = max(c.sfi.bootstrap_window for c in configs)
    cells = {(c.recipe, t, n): Cell(c.recipe, t, n) for c in configs for t in tasks for n in lengths}
    for task in tasks:
        room = {"nll": NLL_TOKENS, "fidelity": FIDELITY_TOKENS}.get(task, ANSWER_TOKENS + 40)
        for length in lengths:
            if length + room > lm.max_context:
                raise ConfigError(f"{task} at length {length} leaves no room for its {room} new tokens in the "
                                  f"model's {lm.max_context}-token context")
            all_trials = [build_trial(task, lm.tokenizer, length, seed * 100003 + i) for i in range(trials)]
            for start in range(0, trials, batch):
                group = all_trials[start:start + batch]
                _run_group(lm, configs, group, cells, window, prefill_chunk, cuda_graphs)
                if progress:
                    progress(f"{task} @ {length}: {min(start + batch, trials)}/{trials} trials")
            if checkpoint:
                checkpoint([c for c in cells.values() if c.trials])
    return list(cells.values())


def _run_group(lm: LoadedModel, configs: Sequence[Config], group: Sequence[Trial], cells: dict, window: int,
               prefill_chunk: int, cuda_graphs: bool) -> None:
    model, task = lm.model, group[0].task
    new = {"nll": NLL_TOKENS, "fidelity": FIDELITY_TOKENS}.get(task, ANSWER_TOKENS + len(group[0].forced))
    cache = model.new_cache(len(group), max(len(t.prompt_ids) for t in group) + new)
    prefilled = [prefill_capture(model, cache, row, t.prompt_ids, prefill_chunk, window)
                 for row, t in enumerate(group)]
    news = [new] * len(group)
    decode = functools.partial(_decode, lm, group=group, cache=cache, prefilled=prefilled, cuda_graphs=cuda_graphs)
    reference = None
    if task == "fidelity":  # the dense output every recipe is compared with
        reference = decode(load_config("dense"), new=news).tokens
    for config in configs:
        here = [cells[(config.recipe, task, t.length)] for t in group]
        if task in RETRIEVAL:
            run = decode(config, new=news, forced=[t.forced for t in group] if task == "preamble" else None)
            for row, (cell, trial) in enumerate(zip(here, group, strict=True)):
                cell.values.append(float(trial.score(run.texts[row])))
                _costs(cell, run, row)
        elif task == "nll":
            probe = RecallProbe(model.args.n_layers, model.args.n_kv_heads)
            run = decode(config, new=news, forced=[t.continuation for t in group], probe=probe)
            for row, cell in enumerate(here):
                cell.values.append(-statistics.fmean(run.logprobs[row]))
                _costs(cell, run, row)
            if int(probe.count.min()) > 0:
                cell = here[0]  # one probe per group: every row's cell is the same (recipe, task, length) cell
                cell.recall_sum = probe.total if cell.recall_sum is None else cell.recall_sum + probe.total
                cell.recall_count = probe.count if cell.recall_count is None else cell.recall_count + probe.count
        else:  # fidelity
            free = decode(config, new=news)
            fed = decode(config, new=[len(r) for r in reference], forced=reference)
            for row, cell in enumerate(here):
                cell.values.append(-statistics.fmean(fed.logprobs[row]))
                cell.agreement.append(_prefix_agreement(free.tokens[row], reference[row]))
                cell.top1.append(statistics.fmean(float(a == b) for a, b in zip(fed.sampled[row], reference[row],
                                                                                  strict=True)))
                _costs(cell, free, row)


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
