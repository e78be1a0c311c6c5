"""Where a slow row's refresh time goes (Qwen3-4B shape, bf16, random cache): kernel times by name
for one refresh of one row at 32k and 128k. JSON to argv[1]."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sfi.bench import random_model
from sfi.boundary import FixedPeriod
from sfi.config import SfiConfig
from sfi.memory import SparseMemory
from sfi.runtime import SfiRuntime


def refresh_case(model, ctx: int, cfg: SfiConfig):
    """One row of `ctx` random cached tokens with its compact memory: (runtime, queries q [L, Hq, D], domain)."""
    dev, a = model.device, model.args
    cache = model.new_cache(1, ctx)
    cache.k.normal_()
    cache.v.normal_()
    rt = SfiRuntime(cfg, FixedPeriod(9), 1, 1)
    rt.attach(SparseMemory(a.n_layers, 1, a.n_kv_heads, cfg.sink, cfg.k_head, a.head_dim, model.dtype, dev), cache)
    q = torch.randn(a.n_layers, a.n_heads, a.head_dim, device=dev, dtype=model.dtype)
    return rt, q, rt._domain(0, ctx)


def refresh_ms(rt, q, domain, reps: int) -> float:
    """Wall milliseconds of one refresh of every layer, after two warm-up refreshes."""
    for _ in range(2):
        rt.refresh_layers(0, q, domain.lo, domain.hi, 0.088)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        rt.refresh_layers(0, q, domain.lo, domain.hi, 0.088)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / reps


def main() -> None:
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", 8192, dev, torch.bfloat16)
    cfg, out = SfiConfig(), {}
    for ctx in (32768, 131072):
        rt, q, cap = refresh_case(model, ctx, cfg)
        wall = refresh_ms(rt, q, cap, 3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            rt.refresh_layers(0, q, cap.lo, cap.hi, 0.088)
            torch.cuda.synchronize()
        by = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                by[ev.name[:100]] += ev.device_time_total / 1e3
        top = sorted(by.items(), key=lambda kv: -kv[1])[:20]
        out[ctx] = {"wall_ms": wall, "gpu_ms": sum(by.values()), "top": top}
        print(f"== {ctx}: wall {wall:.2f} ms, GPU {sum(by.values()):.2f} ms")
        for k, v in top:
            print(f"{v:8.3f}  {k}")
        del rt
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
