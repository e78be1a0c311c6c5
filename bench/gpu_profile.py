"""Where a decode step's GPU time goes: kernel times by name over a few steps (static path, no graphs,
so the profiler sees every kernel), Qwen3-4B shape, random bf16. Table to stdout, JSON to argv[1].
With argv[2] == "slow": what one slow row's step costs over a fast step at 128k x 1 (kernel times of 24 steps
holding exactly one slow step, less 24 fast-only steps), next to a dense step."""

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


def kernel_stats(gen, steps: int) -> dict[str, list[float]]:
    """Kernel name (its first 90 characters) -> [GPU milliseconds, launches] over the next `steps` decode steps of
    `gen`."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        done = 0
        while done < steps:
            done += isinstance(next(gen), StepDone)
        torch.cuda.synchronize()
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = by[ev.name[:90]]
            entry[0] += ev.device_time_total / 1e3
            entry[1] += 1
    return dict(by)


def kernel_ms(gen, steps: int) -> dict[str, float]:
    """GPU milliseconds by kernel name over the next `steps` decode steps of `gen`."""
    return {name: ms for name, (ms, _) in kernel_stats(gen, steps).items()}


def slow_step(out_path: str, dev: str = "cuda", ctx: int = 131072) -> None:
    """One slow row's extra kernel time at 128k x 1, by kernel, and a dense step for scale."""
    dev, period = torch.device(dev), 24
    model = random_model("qwen3-4b", ctx, dev, torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(), "ctx": ctx}
    runs = {}
    for name, cfg, boundary in (("sfi_period24", SfiConfig(k_head=2048, recent=256), FixedPeriod(period)),
                                ("sfi_fast_only", SfiConfig(k_head=2048, recent=256), FixedPeriod(10**9)),
                                ("dense", None, None)):
        runtime = SfiRuntime(cfg, boundary, 1, 1) if cfg is not None else None
        gen = generate(model, _requests(model, ctx, 1, 200, 0), prefill_chunk=4096, runtime=runtime,
                       cuda_graphs=False)
        kernel_ms(gen, 30)  # past the prefill and the first period's slow step
        runs[name] = kernel_ms(gen, period)
        gen.close()
        torch.cuda.empty_cache()
    fast = {k: v / period for k, v in runs["sfi_fast_only"].items()}
    extra = {k: runs["sfi_period24"].get(k, 0.0) - period * fast.get(k, 0.0)
             for k in set(runs["sfi_period24"]) | set(fast)}
    result["fast_step_ms"] = sum(fast.values())
    result["slow_step_extra_ms"] = sum(extra.values())
    result["dense_step_ms"] = sum(runs["dense"].values()) / period
    for key, table in (("fast_top", fast), ("slow_extra_top", extra),
                       ("dense_top", {k: v / period for k, v in runs["dense"].items()})):
        result[key] = sorted(table.items(), key=lambda kv: -abs(kv[1]))[:20]
    print(f"== 128k x 1: fast step {result['fast_step_ms']:.2f} ms GPU, a slow row adds "
          f"{result['slow_step_extra_ms']:.2f} ms, dense step {result['dense_step_ms']:.2f} ms")
    for k, v in result["slow_extra_top"]:
        print(f"{v:8.3f}  {k}")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)


def main() -> None:
    if sys.argv[2:] == ["slow"]:
        return slow_step(sys.argv[1])
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
