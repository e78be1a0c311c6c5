"""`sfi bench --workload`: `sfi run` end to end on a job file, SFI against dense and continuous batching against
static batches, each configuration in a process of its own: jobs/hour, prompt and completion tokens/s, and where the
time went.

The built-in mix (`mix_jobs`, seeded, generated from CPython's `pydoc_data.topics`, no download) is a nightly
batch in miniature: jobs with prompt lengths log-uniform over 2k-32k tokens and `max_new_tokens` uniform over
64-1,024, of which some are documents of 16k-32k tokens asked several questions each (a shared prefix). Random
weights never stop at end-of-sequence, so the runs ignore it (`generation.ignore_eos`) and every job writes its
own `max_new_tokens`; the report says so.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..config import load_config
from ..engine import RunOptions, RunSummary, run
from .eval import haystack

QUESTIONS = ("What is the main subject of the text?", "Which terms does the text define?",
             "Give one example the text uses.", "What does the text warn about?", "Summarise the first part.",
             "Summarise the last part.", "Which statements does the text describe?", "What is left undefined?")


def mix_jobs(tokenizer: Any, n_jobs: int = 64, lengths: tuple[int, int] = (2048, 32768),
             new_tokens: tuple[int, int] = (64, 1024), documents: int = 4, questions: int = 8,
             document_lengths: tuple[int, int] = (16384, 32768), seed: int = 0) -> list[dict[str, Any]]:
    """The built-in workload: `documents` x `questions` jobs on shared documents, the rest single prompts."""
    rng = random.Random(seed)
    jobs = []
    for d in range(documents):
        doc = haystack(tokenizer, rng.randint(*document_lengths), rng, [])
        for q in range(questions):
            jobs.append({"id": f"doc{d}-q{q}", "prompt": f"{doc}\n\nQuestion: {QUESTIONS[q % len(QUESTIONS)]}\n"
                         "Answer:", "max_new_tokens": rng.randint(*new_tokens)})
    lo, hi = math.log(lengths[0]), math.log(lengths[1])
    for i in range(n_jobs - len(jobs)):
        text = haystack(tokenizer, int(math.exp(rng.uniform(lo, hi))), rng, [])
        jobs.append({"id": f"job{i}", "prompt": text + "\n\nContinue the text.", "max_new_tokens":
                     rng.randint(*new_tokens)})
    rng.shuffle(jobs)
    return jobs


def write_jobs(path: Path, jobs: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs), encoding="utf-8")


def _row(name: str, recipe: str, continuous: bool, s: RunSummary) -> dict[str, Any]:
    e = max(s.elapsed_s, 1e-9)
    return {"name": name, "recipe": recipe, "continuous": continuous, "jobs": s.succeeded, "failed": s.failed,
            "jobs_per_hour": round(s.jobs_per_hour, 1), "prompt_tok_s": round(s.prompt_tokens / e, 1),
            "completion_tok_s": round(s.completion_tokens / e, 1), "decode_tok_s": round(s.decode_tok_s, 1),
            "elapsed_s": round(s.elapsed_s, 2), "load_s": round(s.load_s, 2), "prefill_s": round(s.prefill_s, 2),
            "decode_s": round(s.decode_s, 2), "idle_s": round(s.idle_s, 2), "decode_steps": s.decode_steps,
            "graph_captures": s.graph_captures, "capture_s": round(s.capture_s, 2),
            "capture_warmup_s": round(s.capture_warmup_s, 2), "capture_record_s": round(s.capture_record_s, 2),
            "oom_retries": s.oom_retries,
            "mean_rows_per_step": round(s.completion_tokens / s.decode_steps, 2) if s.decode_steps else None,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens, "prefill_tokens_computed": s.prefill_tokens_computed,
            "prefill_tokens_reused": s.prefill_tokens_reused, "slow_steps": s.slow_steps, "fast_steps": s.fast_steps,
            "kv_read_fraction": round(s.kv_bytes_read / s.kv_bytes_dense, 4) if s.kv_bytes_dense else None}


def _isolated(opts: RunOptions) -> RunSummary:
    """`run(opts)` in a fresh process, as a user runs `sfi run`: each configuration starts with the whole device's
    memory and none of the previous run's caches, CUDA graphs or allocator state (Triton's disk cache of compiled
    kernels is shared, as it is between nightly runs)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run, opts).result()


def run_workload(jobs: str, model: str | None, recipes: Sequence[str] = ("default", "dense"),
                 modes: Sequence[bool] = (True, False), overrides: Sequence[str] = (),
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every recipe x batching mode (True: continuous) on the job file `jobs`, end to end, results discarded."""
    say = progress or (lambda text: None)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sfi-workload-") as tmp:
        for recipe in recipes:
            for continuous in modes:
                name = f"{recipe}, {'continuous' if continuous else 'static'} batches"
                config = load_config(recipe, [*overrides, "generation.ignore_eos=true",
                                              f"decode.continuous={str(continuous).lower()}"])
                out = str(Path(tmp) / f"{len(runs)}.jsonl")
                summary = _isolated(RunOptions(jobs=jobs, output=out, model=model, config=config, overwrite=True))
                runs.append(_row(name, recipe, continuous, summary))
                r = runs[-1]
                say(f"{name}: {r['jobs_per_hour']:,.0f} jobs/hour, {r['completion_tok_s']:,.1f} completion tok/s; "
                    f"load {r['load_s']:.1f}s, prefill {r['prefill_s']:.1f}s, decode {r['decode_s']:.1f}s, "
                    f"other {r['idle_s']:.1f}s")
                model_name = summary.model
                device = summary.device
    by = {(r["recipe"], r["continuous"]): r for r in runs}
    ratios = {}
    for recipe in recipes:
        if (recipe, True) in by and (recipe, False) in by and by[(recipe, False)]["jobs_per_hour"]:
            ratios[f"{recipe}: continuous / static jobs per hour"] = round(
                by[(recipe, True)]["jobs_per_hour"] / by[(recipe, False)]["jobs_per_hour"], 3)
    if ("dense", True) in by and len(recipes) > 1 and by[("dense", True)]["jobs_per_hour"]:
        for recipe in recipes:
            if recipe != "dense" and (recipe, True) in by:
                ratios[f"{recipe} / dense jobs per hour (continuous)"] = round(
                    by[(recipe, True)]["jobs_per_hour"] / by[("dense", True)]["jobs_per_hour"], 3)
    return {"workload": jobs, "model": model_name, "device": device, "ignore_eos": True,
            "note": "end-of-sequence ignored: every job writes its max_new_tokens", "runs": runs,
            "ratios": ratios, "config_overrides": list(overrides)}


def workload_file(spec: str, model: str | None, folder: Path) -> str:
    """A job file for `--workload`: a path as given, or `mix` generated with the model's tokenizer."""
    if spec != "mix":
        return spec
    from ..loader import load_tokenizer

    path = folder / "mix.jsonl"
    write_jobs(path, mix_jobs(load_tokenizer(model)))
    return str(path)

