"""A decode step's time and bytes by kernel (issue 13's per-kernel table), Qwen3-4B shape, random bf16, 8k.

For each point: the profiler's kernel durations over 20 steps launched op by op with programmatic dependent launch
off (SFI_PDL=0) but the kernels chosen as with it, so that no kernel's time includes a wait for its predecessor and
the durations add up; the bytes the matrix products and the attention must move (the weights; each row's keys and
values as the runtime counts them, plus the split partials the merge reads); and, for scale, the same point's device
time per step in CUDA graphs with PDL on (`sfi bench`'s `gpu_step_ms_p50`). SFI points are fast-only steps (no slow
step fires). JSON to argv[1]."""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from gpu_profile import kernel_stats  # bench/ is the script's folder

import sfi.model
from sfi.config import SfiConfig
from sfi.engine.decoder import StepDone, generate
from sfi.method.boundary import FixedPeriod
from sfi.method.runtime import SfiRuntime
from sfi.tools.bench import _requests, bench_ours, measure_copy_bandwidth, random_model
from sfi_kernels.ranged_decode import default_split

CTX, STEPS, NEVER = 8192, 20, 10**9
POINTS = [("sfi", 1), ("sfi", 4), ("sfi", 16), ("dense", 1), ("dense", 4)]
PRODUCTS, ATTENTION, MERGE = "_skinny_gemm_kernel", "_ranged_decode_kernel", "_merge_splits_kernel"


def profiled(gen, steps: int) -> dict[str, list[float]]:
    """Kernel name -> [milliseconds, launches] per step over the next `steps` decode steps of `gen`."""
    return {name: [ms / steps, n / steps] for name, (ms, n) in kernel_stats(gen, steps).items()}


def point(model, kind: str, batch: int, bandwidth: float) -> dict:
    args, dtype = model.args, model.dtype
    cfg = SfiConfig().for_context(args.max_position_embeddings) if kind == "sfi" else None
    runtime = SfiRuntime(cfg, FixedPeriod(NEVER), batch, args.kv_bytes_per_token(dtype)) if cfg else None
    gen = generate(model, _requests(model, CTX, batch, 200, 0), prefill_chunk=4096, runtime=runtime,
                   cuda_graphs=False)
    for _ in range(10):  # past the prefill and the kernels' compilation
        while not isinstance(next(gen), StepDone):
            pass
    before = sum(runtime.report(r)["kv_bytes_read"] for r in range(batch)) if runtime else 0
    kernels = profiled(gen, STEPS)
    if runtime:
        kv = (sum(runtime.report(r)["kv_bytes_read"] for r in range(batch)) - before) / STEPS
    else:
        kv = batch * (CTX + 20) * args.kv_bytes_per_token(dtype)
    gen.close()
    keys = kv / batch / args.kv_bytes_per_token(dtype)  # keys per row and layer
    n_split = math.ceil(keys / default_split(math.ceil(keys), batch * args.n_kv_heads))
    # Each split's partial output and log-sum-exp, float32, written by the attention and read by the merge.
    partials = args.n_layers * batch * args.n_heads * n_split * (args.head_dim + 1) * 4
    # The layers' projections and the lm head (which may be the embedding's tensor, tied: named once, by it).
    weights = model.output.weight.numel() * model.output.weight.element_size() + sum(
        p.numel() * p.element_size() for name, p in model.named_parameters()
        if p.dim() == 2 and name.startswith("layers."))
    moved = {PRODUCTS: weights, ATTENTION: kv + partials, MERGE: 2 * partials}
    rows = []
    for name, (ms, launches) in sorted(kernels.items(), key=lambda kv_: -kv_[1][0]):
        row = {"kernel": name, "ms": ms, "launches": launches, "us_per_launch": 1e3 * ms / max(launches, 1)}
        if name in moved:
            row["bytes"] = moved[name]
            row["GBps"] = moved[name] / ms / 1e6
            row["pct_copy"] = 100 * moved[name] / ms / 1e-3 / bandwidth
            row["ms_at_copy"] = 1e3 * moved[name] / bandwidth
        rows.append(row)
    torch.cuda.empty_cache()
    os.environ["SFI_PDL"] = "1"  # the real step: graphs, PDL on
    real = bench_ours(model, CTX, batch, 64, cfg, period=NEVER)
    os.environ["SFI_PDL"] = "0"
    torch.cuda.empty_cache()
    return {"kind": kind, "ctx": CTX, "batch": batch, "keys_per_row": keys, "n_split": n_split,
            "kernels": rows, "kernel_ms_sum": sum(r["ms"] for r in rows),
            "graph_pdl_gpu_step_ms_p50": real["gpu_step_ms_p50"], "graph_pdl_step_ms_p50": real["step_ms_p50"],
            "bytes_at_copy_ms": 1e3 * (weights + kv) / bandwidth}


def main() -> None:
    os.environ["SFI_PDL"] = "0"
    # The step's kernels as with PDL (without it, cuBLAS takes the shapes where our GEMM pays only with PDL):
    # the dispatch asks sfi.model's use_pdl, the launches sfi_kernels.pdl's, which reads SFI_PDL.
    sfi.model.use_pdl = lambda t: t.is_cuda
    dev = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(dev)
    model = random_model("qwen3-4b", CTX + 512, dev, torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bandwidth / 1e9, "points": []}
    for kind, batch in POINTS:
        p = point(model, kind, batch, bandwidth)
        out["points"].append(p)
        print(f"== {kind} {CTX} x {batch}: kernels {p['kernel_ms_sum']:.3f} ms op by op (PDL off), "
              f"{p['graph_pdl_gpu_step_ms_p50']:.3f} ms in graphs with PDL; its bytes at copy speed "
              f"{p['bytes_at_copy_ms']:.3f} ms; {p['keys_per_row']:.0f} keys per row, {p['n_split']} splits",
              flush=True)
        for r in p["kernels"]:
            extra = f"  {r['bytes'] / 1e6:9.1f} MB {r['GBps']:7.0f} GB/s {r['pct_copy']:5.1f}%" if "bytes" in r else ""
            print(f"  {r['ms']:7.3f} ms {r['launches']:6.0f} launches {r['us_per_launch']:6.2f} us  "
                  f"{r['kernel']}{extra}", flush=True)
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
