"""Where a decode step's GPU time goes: kernel times by name over a few steps (static path, no graphs,
so the profiler sees every kernel), Qwen3-4B shape, random bf16. Table to stdout, JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sfi.config import SfiConfig
from sfi.engine.decoder import StepDone, generate
from sfi.method.boundary import FixedPeriod
from sfi.method.runtime import SfiRuntime
from sfi.tools.bench import _requests, random_model


def main() -> None:
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", 8192, dev, torch.bfloat16)
    result = {}
    for name, ctx, batch, cfg in (("dense", 8192, 1, None), ("sfi", 32768, 4, SfiConfig(k_head=2048, recent=256))):
        reqs = _requests(model, ctx, batch, 40, 0)
        runtime = None
        if cfg is not None:
            runtime = SfiRuntime(cfg, FixedPeriod(24), batch, 1)
            for row, state in enumerate(runtime.state):
                state.last_slow = -(row * 24 // batch)
        gen = generate(model, reqs, prefill_chunk=4096, runtime=runtime, cuda_graphs=False)
        steps = 0
        for e in gen:
            if isinstance(e, StepDone):
                steps += 1
                if steps == 10:
                    break
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                next(gen)
            torch.cuda.synchronize()
        by = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                by[ev.name[:90]] += ev.device_time_total / 20 / 1e3  # ms per step
        top = sorted(by.items(), key=lambda kv: -kv[1])[:25]
        total = sum(by.values())
        result[f"{name}_{ctx}x{batch}"] = {"gpu_ms_per_step": total, "top": top}
        print(f"== {name} {ctx}x{batch}: {total:.2f} ms GPU per step")
        for k, v in top:
            print(f"{v:8.3f}  {k}")
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
