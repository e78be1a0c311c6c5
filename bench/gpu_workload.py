"""One device call's worth of `sfi run` throughput measurements (the continuous-batching issue), as JSON.

    python3 bench/gpu_workload.py OUT.json MODEL_DIR [--tiny]
        [--skip bootstrap,prefix,profile,mix,order,workers,determinism,oom]

0. The bootstrap Selector: the fused kernels (select_fused) against the torch reference on bootstrap-shaped
   logits: picks in common and milliseconds per layer.
1. Shared prefixes: one 32k-token document asked 1 question, then 8 questions (with and without prefix reuse),
   the default recipe: prefill seconds and tokens computed/reused, and a profile of the 8-question run.
2. The built-in mix (`sfi bench --workload mix`): default and dense, continuous and static batches, and continuous
   batches in the old admission order (`decode.order=length`).
3. `--gpus 1` against a plain run of the same 16 jobs of the mix (`sfi run` as a subprocess each, its --report).
4. Per-job determinism on this device: a few jobs decoded alone and inside a batch of others, token agreement.
5. Out of memory on purpose: 16 jobs of the mix with `decode.kv_memory_fraction=1` (the pool takes every free byte,
   so captures and activations run out): each job once in the output, none failed, the retries counted.

The JSON is rewritten after every run, so a call cut short still brings back what finished. `--tiny` shrinks
every size so the script can be tried on a CPU with a tiny checkpoint first.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
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

    if "bootstrap" not in skip:
        result["bootstrap_selector"] = bootstrap_selector(tiny)
        save()
    # 1. Shared prefixes.
    rng = random.Random(1)
    doc = haystack(tok, doc_tokens, rng, [])
    ask = [{"id": f"q{i}", "prompt": f"{doc}\n\nQuestion: {QUESTIONS[i]}\nAnswer:", "max_new_tokens": answer}
           for i in range(8)]
    # Compilation and autotuning, not timed: a leader and a follower, so both prefill paths have run once.
    once(ask[:2], "warmup")
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():  # what that run held, back to the device for the runs in processes of their own
        torch.cuda.empty_cache()

    from sfi import model as model_module
    if torch.cuda.is_available():
        result["chunk_attention"] = model_module._chunk_path(torch.device("cuda", 0), torch.bfloat16, 128)
    if "prefix" not in skip:
        result["shared_prefix"] = shared_prefix(once, ask, len(tok.encode(doc)), answer, "profile" not in skip)
        save()
    mix = mix_jobs(tok, n_jobs=mix_n, **({"documents": 1, "questions": 2, "lengths": (256, 1024),
                                          "document_lengths": (1024, 1500), "new_tokens": (4, 24)} if tiny else {}))
    if "mix" not in skip:
        result["mix"] = {"jobs": len(mix), "runs": []}
        workload(tmp, mix, model, result, save, "order" not in skip)
    if "workers" not in skip:
        result["workers"] = workers_vs_plain(tmp, mix[:6] if tiny else mix[:16], model)
        save()
    if "determinism" not in skip:
        result["determinism"] = determinism(once, mix)
        save()
    if "oom" not in skip:
        result["oom"] = out_of_memory(tmp, mix[:6] if tiny else mix[:16], model)
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


def workload(tmp: Path, mix: list[dict], model: str, result: dict, save, order_rows: bool = True) -> None:
    """The mix: default and dense, continuous and static batches."""
    path = tmp / "mix.jsonl"
    write_jobs(path, mix)
    # Untimed first: a fresh machine compiles the Triton kernels of every new shape, and later processes load them
    # from Triton's disk cache (as a nightly run does from the second night on). Measured without this, the first
    # configuration paid it alone: SFI continuous prefill 22.6 s against 15.7 s static, 0.50 s against 0.31 s per
    # graph capture (bench/results/2026-12-02-h200-workload-9-static-reuse-fixed.json).
    run_workload(str(path), model, ("default",), (True, False), progress=lambda t: print("warm-up", t, flush=True))
    # $WORKLOAD_RECIPES (default "default,dense") limits the rows, e.g. to SFI alone when device time is short.
    recipes = tuple(os.environ.get("WORKLOAD_RECIPES", "default,dense").split(","))
    for recipe in recipes:
        for continuous in (True, False):
            w = run_workload(str(path), model, (recipe,), (continuous,), progress=lambda t: print(t, flush=True))
            result["mix"]["runs"] += w["runs"]
            result["device"] = w["device"]
            save()
    # The admission order's ablation row: continuous batches in the old order (longest prompt + output first).
    for recipe in recipes if order_rows else ():
        w = run_workload(str(path), model, (recipe,), (True,), overrides=("decode.order=length",),
                         progress=lambda t: print("length order:", t, flush=True))
        result["mix"]["length_order"] = result["mix"].get("length_order", []) + w["runs"]
        save()
    by = {(r["recipe"], r["continuous"]): r["jobs_per_hour"] for r in result["mix"]["runs"]}
    pairs = {"default continuous / static": (("default", True), ("default", False)),
             "dense continuous / static": (("dense", True), ("dense", False)),
             "default / dense (continuous)": (("default", True), ("dense", True)),
             "default / dense (static)": (("default", False), ("dense", False))}
    result["mix"]["ratios"] = {name: round(by[a] / by[b], 3) for name, (a, b) in pairs.items() if a in by and b in by}
    save()
    print(json.dumps(result["mix"]["ratios"]), flush=True)


def bootstrap_selector(tiny: bool) -> dict:
    """select_fused (the decode refresh's kernels) against select (torch ops) on bootstrap-shaped logits:
    [layers, Hkv, G x W rows, N] with Qwen3-4B's 8 KV heads, group 4, window 16; ours and the paper's Selector."""
    import torch

    from sfi.method import selector as S

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layers, n, k = (2, 1500, 128) if tiny else (4, 31000, 1536)
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(layers, 8, 64, n, device=dev, generator=g) * 3
    z.scatter_add_(-1, torch.randint(0, n, (layers, 8, 64, 4), device=dev, generator=g),
                   torch.full((layers, 8, 64, 4), 12.0, device=dev))
    norms = torch.rand(layers, 8, n, device=dev, generator=g) * 2 + 0.5
    out = {"shape": [layers, 8, 64, n], "k": k}
    for name, params in (("ours", S.SelectorParams()), ("spec", S.SPEC)):
        timing = {}
        picks = {}
        for fn in (S.select, S.select_fused):
            fn(z, norms, k, params)  # compile
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                picks[fn.__name__] = fn(z, norms, k, params)
            if dev == "cuda":
                torch.cuda.synchronize()
            timing[fn.__name__] = round((time.perf_counter() - t) / 3 / layers * 1e3, 3)
        a, b = picks["select"], picks["select_fused"]
        common = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a.flatten(0, 1), b.flatten(0, 1),
                                                                             strict=True))
        out[name] = {"ms_per_layer": timing, "picks_in_common": round(common / a.numel(), 5)}
    print("bootstrap selector", out, flush=True)
    return out


def workers_vs_plain(tmp: Path, jobs: list[dict], model: str) -> dict:
    """The same jobs as a plain `sfi run` and with `--gpus 1` (one worker process): wall time and the report's
    jobs/hour; the worker path must cost nothing measurable. Each process compiles what Triton's disk cache does
    not hold yet, so an untimed run goes first, then the two in turn, three times; each keeps its fastest run, and
    every run's wall time is listed."""
    import torch

    path = tmp / "workers.jsonl"
    write_jobs(path, jobs)
    rows: dict = {}
    worker = ["--gpus", "1"] if torch.cuda.is_available() else ["--workers", "1"]  # a CPU try-out: one process
    runs = [("warm-up", [])] + [(name, extra) for _ in range(3) for name, extra in (("plain", []), ("worker", worker))]
    walls: dict[str, list[float]] = {"plain": [], "worker": []}
    for i, (name, extra) in enumerate(runs):
        report = tmp / f"workers-{i}.json"
        cmd = [sys.executable, "-m", "sfi_cli.main", "run", str(path), "-o", str(tmp / f"workers-{len(rows)}.jsonl"),
               "--model", model, "--set", "generation.ignore_eos=true", "--overwrite", "--quiet", "--report",
               str(report), *extra]
        t = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t
        r = json.loads(report.read_text())
        row = {"rc": rc, "wall_s": round(wall, 2), "jobs": r["jobs"], "timing": r["timing"],
               "command": " ".join(["sfi run JOBS -o OUT --model DIR --set generation.ignore_eos=true"] + extra)}
        print("workers", name, row, flush=True)
        if name != "warm-up":
            walls[name].append(row["wall_s"])
            if name not in rows or row["wall_s"] < rows[name]["wall_s"]:
                rows[name] = row
    rows["worker_over_plain_wall"] = round(rows["worker"]["wall_s"] / rows["plain"]["wall_s"], 3)
    rows["walls"] = walls
    return {"jobs": len(jobs), "runs": rows}


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



def out_of_memory(tmp: Path, jobs: list[dict], model: str) -> dict:
    """A run whose KV pool leaves nothing for captures and activations: it must split and retry, and lose nothing."""
    from sfi.tools.workload import _isolated, _row

    path, out = tmp / "oom.jsonl", tmp / "oom.out.jsonl"
    write_jobs(path, jobs)
    config = load_config("default", ["generation.ignore_eos=true", "decode.kv_memory_fraction=1"])
    s = _isolated(RunOptions(jobs=str(path), output=str(out), model=model, config=config, overwrite=True))
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    errors = [r.get("error") for r in map(json.loads, out.read_text().splitlines()) if r.get("error")]
    row = _row("kv_memory_fraction=1", "default", True, s) | {
        "each_job_once": sorted(ids) == sorted(j["id"] for j in jobs), "errors": errors[:5]}
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
