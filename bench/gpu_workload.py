"""One device call's worth of `sfi run` throughput measurements (the continuous-batching issue), as JSON.

    python3 bench/gpu_workload.py OUT.json MODEL_DIR [--tiny] [--skip prefix,profile,mix,determinism]

1. Shared prefixes: one 32k-token document asked 1 question, then 8 questions (with and without prefix reuse),
   the default recipe: prefill seconds and tokens computed/reused, and a profile of the 8-question run.
2. The built-in mix (`sfi bench --workload mix`): default and dense, continuous and static batches.
3. Per-job determinism on this device: a few jobs decoded alone and inside a batch of others, token agreement.

The JSON is rewritten after every run, so a call cut short still brings back what finished. `--tiny` shrinks
every size so the script can be tried on a CPU with a tiny checkpoint first.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from sfi.config import load_config
from sfi.engine import RunOptions, run
from sfi.loader import load_tokenizer
from sfi.tools.eval import haystack
from sfi.tools.workload import QUESTIONS, mix_jobs, run_workload, write_jobs


def main() -> None:
    out, model = Path(sys.argv[1]), sys.argv[2]
    tiny = "--tiny" in sys.argv[3:]
    skip = set(sys.argv[sys.argv.index("--skip") + 1].split(",")) if "--skip" in sys.argv else set()
    doc_tokens, answer, mix_n = (1500, 4, 6) if tiny else (32768, 16, 64)
    result: dict = {"model": model, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    tok = load_tokenizer(model)
    tmp = Path(tempfile.mkdtemp(prefix="sfi-gpu-workload-"))

    def once(jobs: list[dict], name: str, *overrides: str) -> dict:
        path = tmp / f"{name}.jsonl"
        write_jobs(path, jobs)
        config = load_config("default", ["generation.ignore_eos=true", *overrides])
        t = time.perf_counter()
        s = run(RunOptions(jobs=str(path), output=str(tmp / f"{name}.out.jsonl"), model=model, config=config,
                           overwrite=True))
        wall = time.perf_counter() - t
        texts = [json.loads(line) for line in (tmp / f"{name}.out.jsonl").read_text().splitlines()]
        row = {"jobs": s.succeeded, "failed": s.failed, "wall_s": round(wall, 3), "load_s": round(s.load_s, 3),
               "prefill_s": round(s.prefill_s, 3), "decode_s": round(s.decode_s, 3),
               "prefill_tokens_computed": s.prefill_tokens_computed, "prefill_tokens_reused": s.prefill_tokens_reused,
               "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}
        row["per_job_prefill_s"] = {r["id"]: r["timing"]["prefill_s"] for r in texts if "timing" in r}
        print(name, row, flush=True)
        return row | {"_texts": {r["id"]: r.get("text") for r in texts}}

    # 1. Shared prefixes.
    rng = random.Random(1)
    doc = haystack(tok, doc_tokens, rng, [])
    ask = [{"id": f"q{i}", "prompt": f"{doc}\n\nQuestion: {QUESTIONS[i]}\nAnswer:", "max_new_tokens": answer}
           for i in range(8)]
    once(ask[:1], "warmup")  # compilation and autotuning, not timed
    if "prefix" not in skip:
        result["shared_prefix"] = shared_prefix(once, ask, len(tok.encode(doc)), answer, "profile" not in skip)
        save()
    mix = mix_jobs(tok, n_jobs=mix_n, **({"documents": 1, "questions": 2, "lengths": (256, 1024),
                                          "document_lengths": (1024, 1500), "new_tokens": (4, 24)} if tiny else {}))
    if "mix" not in skip:
        result["mix"] = {"jobs": len(mix), "runs": []}
        workload(tmp, mix, model, result, save)
    if "determinism" not in skip:
        result["determinism"] = determinism(once, mix)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()


def shared_prefix(once, ask: list[dict], document_tokens: int, answer: int, profiled: bool) -> dict:
    """One document asked one question, then 8 (with and without reuse): prefill seconds and tokens."""
    prefix = {"document_tokens": document_tokens, "max_new_tokens": answer}
    for name, jobs, overrides in (("one question", ask[:1], ()), ("8 questions", ask, ()),
                                  ("8 questions, no prefix reuse", ask, ("decode.prefix_min_tokens=0",))):
        row = once(jobs, name.replace(" ", "-").replace(",", ""), *overrides)
        row.pop("_texts")
        prefix[name] = row
    one, eight = prefix["one question"], prefix["8 questions"]
    question_tokens = eight["prefill_tokens_computed"] - one["prefill_tokens_computed"]
    per_token = one["prefill_s"] / max(one["prefill_tokens_computed"], 1)
    floor = one["prefill_s"] + question_tokens * per_token  # one document's prefill plus the questions' tokens
    prefix["target_s"] = round(1.3 * floor, 3)
    prefix["ratio_to_one_plus_questions"] = round(eight["prefill_s"] / floor, 3)
    if not profiled:
        return prefix
    try:  # where the followers' prefill time goes: the 8-question run once more, under the profiler
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            once(ask, "profiled")
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        prefix["profile"] = prof.key_averages().table(sort_by=key, row_limit=30)
        prefix["profile_cpu"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    except Exception as exc:  # the profile is a diagnostic: its failure must not cost the measurements
        prefix["profile"] = f"failed: {exc!r}"
    return prefix


def workload(tmp: Path, mix: list[dict], model: str, result: dict, save) -> None:
    """The mix: default and dense, continuous and static batches."""
    path = tmp / "mix.jsonl"
    write_jobs(path, mix)
    for recipe in ("default", "dense"):
        for continuous in (True, False):
            w = run_workload(str(path), model, (recipe,), (continuous,), progress=lambda t: print(t, flush=True))
            result["mix"]["runs"] += w["runs"]
            result["device"] = w["device"]
            save()
    by = {(r["recipe"], r["continuous"]): r["jobs_per_hour"] for r in result["mix"]["runs"]}
    result["mix"]["ratios"] = {
        "default continuous / static": round(by[("default", True)] / by[("default", False)], 3),
        "dense continuous / static": round(by[("dense", True)] / by[("dense", False)], 3),
        "default / dense (continuous)": round(by[("default", True)] / by[("dense", True)], 3),
        "default / dense (static)": round(by[("default", False)] / by[("dense", False)], 3)}
    save()
    print(json.dumps(result["mix"]["ratios"]), flush=True)


def determinism(once, mix: list[dict]) -> dict:
    """4 jobs alone, then the same 4 inside the first 16 of the mix (greedy, short answers): identical texts."""
    probe = [dict(j, max_new_tokens=32) for j in mix[:4]]
    alone = {}
    for j in probe:
        alone |= once([j], f"alone-{j['id']}")["_texts"]
    batch = [dict(j, max_new_tokens=32) for j in mix[:16]]
    together = once(batch, "together")["_texts"]
    verdict = {"jobs": [j["id"] for j in probe], "batch": len(batch),
               "identical": sum(alone[k] == together[k] for k in alone)}
    print("determinism", verdict, flush=True)
    return verdict


if __name__ == "__main__":
    main()
