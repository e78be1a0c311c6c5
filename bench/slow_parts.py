"""What a step holding a slow row costs over a fast-only step, part by part, in CUDA graphs (Qwen3-4B shape, random
bf16, the default recipe, a slow step every 24 tokens per row, rows staggered: `sfi bench`'s protocol). Each
variant leaves out a part of the slow step and reports the p50 step time with and without a slow row:
  default         as committed
  inline_refresh  the refresh on the main stream, in order (no overlap with the next layers)
  no_refresh      the slow row's pass and logit capture, no Selector or compaction (its memory goes stale)
  no_capture      the slow row's pass alone
JSON to argv[1]; argv[2:] as CTXxBATCH (default 8192x16 32768x4)."""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from gpu_check import inline_refresh  # bench/ is the script's folder

from sfi.config import SfiConfig
from sfi.method.refresh import StepRefresh
from sfi.tools.bench import bench_ours, random_model


@contextlib.contextmanager
def patched(**attrs):
    old = {k: getattr(StepRefresh, k) for k in attrs}
    for k, v in attrs.items():
        setattr(StepRefresh, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(StepRefresh, k, v)


VARIANTS = {
    "default": contextlib.nullcontext,
    "inline_refresh": inline_refresh,
    "no_refresh": lambda: patched(_refresh=lambda self, group: None),
    "no_capture": lambda: patched(_refresh=lambda self, group: None, capture=lambda self, layer: None),
}


def main() -> None:
    points = [tuple(map(int, p.split("x"))) for p in sys.argv[2:]] or [(8192, 16), (32768, 4)]
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", max(c for c, _ in points) + 512, dev, torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "runs": []}
    for ctx, batch in points:
        for name, variant in VARIANTS.items():
            with variant():
                r = bench_ours(model, ctx, batch, 256, SfiConfig())
            row = {"ctx": ctx, "batch": batch, "variant": name, **{k: r[k] for k in (
                "tok_s", "step_ms_p50", "step_ms_p90", "steps_with_slow", "step_ms_with_slow_p50",
                "step_ms_fast_only_p50")}}
            row["slow_extra_ms"] = row["step_ms_with_slow_p50"] - row["step_ms_fast_only_p50"]
            out["runs"].append(row)
            print(f"{ctx}x{batch} {name:15s} {row['tok_s']:8.1f} tok/s  slow-step p50 "
                  f"{row['step_ms_with_slow_p50']:.2f}  fast-only p50 {row['step_ms_fast_only_p50']:.2f}  "
                  f"extra {row['slow_extra_ms']:.2f} ms", flush=True)
            torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
