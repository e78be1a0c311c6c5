"""Where a run's start goes on a GPU machine: imports, config, tokenizer, the model's build, its weights (copied from
pageable memory, through pinned buffers, or by safetensors onto the device), and the jobs' prompt rendering, alone
and while the weights load in a thread.

Usage: PYTHONPATH=. python3 bench/gpu_load_profile.py OUT.json CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

t0 = time.perf_counter()
import torch  # noqa: E402

times: dict = {"import_torch_s": time.perf_counter() - t0}


def timed(name: str, fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times.setdefault(name, []).append(round(time.perf_counter() - start, 3))
    print(name, times[name][-1], flush=True)
    return out


def main() -> None:
    out, folder = Path(sys.argv[1]), Path(sys.argv[2])
    start = time.perf_counter()
    from transformers import AutoConfig, AutoTokenizer

    times["import_transformers_s"] = round(time.perf_counter() - start, 3)
    from sfi.jobs import read_jobs
    from sfi.loader import _read_tensors, _target, _weight_files, build_model, load_model, load_weights
    from sfi.model import ModelArgs
    from sfi.prompts import render, render_many
    from sfi.tools.workload import mix_jobs, write_jobs

    config = timed("config", lambda: AutoConfig.from_pretrained(folder))
    tokenizer = timed("tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
    args = ModelArgs.from_hf_config(config)
    gpu = torch.cuda.is_available()  # a CPU run only tries the script out
    dev = torch.device("cuda" if gpu else "cpu")
    model = timed("build", lambda: build_model(args, dev, torch.bfloat16))

    def on_device() -> None:
        from safetensors import safe_open

        params = dict(model.named_parameters())
        for path in _weight_files(folder):
            with safe_open(str(path), framework="pt", device=str(dev)) as f:
                for name in f.keys():  # noqa: SIM118
                    target = _target(name, args)
                    if target is not None:
                        ours, rows = target
                        (params[ours].data if rows is None else params[ours].data[rows]).copy_(f.get_tensor(name))

    for _ in range(2):
        timed("weights_pageable", lambda: load_weights(model, folder, staged=False))
        timed("weights_staged", lambda: load_weights(model, folder, staged=gpu))
        timed("weights_safetensors_device", on_device)
    timed("read_only", lambda: sum(t.numel()
                                   for p in _weight_files(folder) for _, t in _read_tensors(p)))
    jobs_path = out.parent / "load-profile-mix.jsonl"
    write_jobs(jobs_path, mix_jobs(tokenizer))
    jobs = read_jobs(str(jobs_path)).jobs
    timed("render_mix", lambda: sum(len(render(j, tokenizer)) for j in jobs))
    timed("render_mix_batched", lambda: sum(len(ids) for ids in render_many(jobs, tokenizer)))

    def both() -> None:
        thread = threading.Thread(target=load_weights, args=(model, folder, gpu))
        thread.start()
        render_many(jobs, tokenizer)
        thread.join()

    timed("weights_staged_while_rendering", both)
    torch.cuda.empty_cache()
    lm = timed("load_model", lambda: load_model(str(folder)))
    times["load_model_reported_s"] = round(lm.load_s, 3)
    out.write_text(json.dumps(times, indent=1))
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
