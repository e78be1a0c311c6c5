"""Where a slow row's refresh time goes (Qwen3-4B shape, bf16, random cache and logits): one layer group's
in-step refresh (fused Selector scores, top-k threshold, kept positions, compaction writer) for `slots` slow
rows, timed alone and by kernel name. JSON to argv[1]."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sfi.config import SfiConfig
from sfi.method.memory import SparseMemory
from sfi.method.refresh import StepRefresh
from sfi.method.selector import SelectorParams
from sfi.tools.bench import random_model


def refresh_case(model, ctx: int, cfg: SfiConfig, slots: int = 1) -> StepRefresh:
    """`slots` rows of `ctx` random cached tokens, each refreshing its whole domain, logits filled in."""
    dev, a = model.device, model.args
    cache = model.new_cache(slots, ctx)
    cache.k.normal_()
    cache.v.normal_()
    memory = SparseMemory(a.n_layers, slots, a.n_kv_heads, cfg.sink, cfg.k_head, a.head_dim, model.dtype, dev)
    r = StepRefresh(cache, memory, SelectorParams.from_config(cfg), slots, ctx, a.n_heads)
    r.z.normal_(0, 3)
    cache.kn.uniform_(0.5, 3)
    lo, hi = cfg.sink, ctx - cfg.recent
    r.meta.copy_(torch.tensor([list(range(slots)), [lo] * slots, [hi - lo] * slots,
                               [min(cfg.k_head, hi - lo)] * slots, [0] * slots], dtype=torch.int32))
    return r.for_step(slots)


def refresh_ms(r: StepRefresh, reps: int) -> float:
    """Wall milliseconds of one layer group's refresh, on the current stream, after two warm-ups."""
    for _ in range(2):
        r._refresh(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(reps):
        r._refresh(i % (r.cache.k.shape[0] // r.group))
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / reps


def main() -> None:
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", 8192, dev, torch.bfloat16)
    cfg, out = SfiConfig(k_head=2048, recent=256), {"device": torch.cuda.get_device_name()}
    for ctx, slots in ((8192, 1), (32768, 1), (131072, 1), (131072, 3)):
        r = refresh_case(model, ctx, cfg, slots)
        wall = refresh_ms(r, 20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r._refresh(0)
            torch.cuda.synchronize()
        by = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                by[ev.name[:100]] += ev.device_time_total / 1e3
        top = sorted(by.items(), key=lambda kv: -kv[1])[:12]
        groups = model.args.n_layers // r.group
        out[f"{ctx}x{slots}"] = {"group_wall_ms": wall, "all_layers_ms": wall * groups,
                                 "group_gpu_ms": sum(by.values()), "layers_per_group": r.group, "top": top}
        print(ctx, slots, out[f"{ctx}x{slots}"], flush=True)
        del r
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
