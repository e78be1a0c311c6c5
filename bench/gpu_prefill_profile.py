"""Where a prefill's GPU time goes (Qwen3-4B shape, random bf16, the default SFI recipe's bootstrap): a 32k prompt
prefilled whole (layer by layer, as a run's first wave) and in 2,048-token chunks (as a prompt admitted while rows
decode), each timed and then profiled by kernel class; next to it the attention backends on the same shapes and the
layer's matrix products alone, as TFLOP/s. JSON to argv[1], a table to stdout."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sfi import model as model_module
from sfi.config import SfiConfig
from sfi.engine.decoder import Decoder
from sfi.method.boundary import FixedPeriod
from sfi.method.runtime import SfiRuntime
from sfi.tools.bench import _requests, random_model

SMOKE = os.environ.get("SMOKE") == "1"  # a CPU run of the script itself on a tiny model
CTX, CHUNK = (1024, 128) if SMOKE else (32768, 2048)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn, reps: int = 1) -> float:
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t) / reps


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90")):
        return "gemm"
    if "triton" in n or "_kernel" in n:
        return "triton: " + name[:60]
    if "copy" in n or "cat" in n or "index" in n:
        return "copies"
    return "elementwise and reductions"


def prefill(model, runtime_for, ctx: int, budget: int | None) -> None:
    runtime = runtime_for()
    req = _requests(model, ctx, 1, 1, 0)[0]
    dec = Decoder(model, 1, ctx + 8, runtime, CHUNK, cuda_graphs=False)
    dec.admit(0, req)
    while dec.prefills:
        dec.prefill(budget)


def profiled(fn) -> dict[str, float]:
    _sync()
    with profile(activities=[ProfilerActivity.CPU if SMOKE else ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    by: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if SMOKE or ev.device_type == torch.autograd.DeviceType.CUDA:
            by[kind(ev.name)] += ev.device_time_total / 1e3
            top[ev.name[:100]] += ev.device_time_total / 1e3
    return {"by_kind_ms": dict(sorted(by.items(), key=lambda kv: -kv[1])),
            "top_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:25])}


def attention_case(q, k, v, variants: dict, flops: float) -> dict:
    res, ref = {}, None
    for vname, fn in variants.items():
        try:
            o = fn(q, k, v)
            s = sync_time(functools.partial(fn, q, k, v), 5)
            ref = o if ref is None else ref
            res[vname] = {"ms": 1e3 * s, "tflops": flops / s / 1e12,
                          "max_diff_vs_first": (o.float() - ref.float()).abs().max().item()}
        except Exception as e:  # noqa: BLE001 - a backend that does not take these shapes is a result too
            res[vname] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return res


def attention_backends(a, dev) -> dict:
    """One layer's attention at the prefill's shapes, seconds and TFLOP/s (causal FLOPs): a whole prompt through
    SDPA, and chunks of T queries at the end of a 32k row through the flash op and the two cuDNN passes."""
    hq, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    scale = d ** -0.5
    out = {"chunk_path": model_module._chunk_path(dev, torch.bfloat16, d)}
    cases = [("whole", CTX, CTX)] + [(f"chunk_{t}", t, CTX) for t in (64, 256, 512, 1024, CHUNK)]
    for name, t_q, t_k in cases:
        q = torch.randn(1, hq, t_q, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, t_k, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * hq * d * (t_q * (t_k - t_q) + t_q * t_q / 2)
        if t_q == t_k:
            variants = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                              enable_gqa=True)}
        else:
            variants = {"flash_op": lambda q, k, v: model_module._flash_grouped(q, k, v, scale),
                        "cudnn_split": lambda q, k, v: model_module._split_chunk_attention(q, k, v, scale)}
        out[name] = attention_case(q, k, v, variants, flops)
        print(name, json.dumps(out[name]), flush=True)
    return out


def gemms(model, dev) -> dict:
    blk = model.layers[0]
    out = {}
    for m in (CHUNK, 4 * CHUNK):
        x = torch.randn(m, model.args.hidden_size, device=dev, dtype=torch.bfloat16)
        for name, lin in (("wqkv", blk.attention.wqkv), ("wo", blk.attention.wo), ("w13", blk.mlp.w13),
                          ("w2", blk.mlp.w2)):
            xi = x if lin.in_features == x.shape[1] else torch.randn(m, lin.in_features, device=dev,
                                                                      dtype=torch.bfloat16)
            s = sync_time(lambda lin=lin, xi=xi: lin(xi), 10)
            out[f"{name}_m{m}"] = {"ms": 1e3 * s, "tflops": 2 * m * lin.in_features * lin.out_features / s / 1e12}
    print("gemms", json.dumps(out), flush=True)
    return out


def plan_cost(a, dev) -> list[dict]:
    """cuDNN's first call at a shape new to the process (it builds an execution plan) against the second."""
    out = []
    for t_q, t_k in ((1000, 9000), (3000, 3000), (1024, 8192), (5120, 5120)):
        q = torch.randn(1, a.n_heads, t_q, a.head_dim, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, a.n_kv_heads, t_k, a.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
        run = functools.partial(model_module._cudnn_with_lse, q, k, v, t_q == t_k, a.head_dim ** -0.5)
        first, second = sync_time(run), sync_time(run)
        out.append({"queries": t_q, "keys": t_k, "first_ms": 1e3 * first, "second_ms": 1e3 * second})
        print("cudnn plan", out[-1], flush=True)
    return out


def main() -> None:
    dev = torch.device("cpu" if SMOKE else "cuda")
    model = random_model("qwen3-tiny" if SMOKE else "qwen3-4b", CTX + 64, dev, torch.bfloat16)
    a = model.args
    cfg = SfiConfig().for_context(a.max_position_embeddings)
    kvb = a.kv_bytes_per_token(model.dtype)

    def rt():
        return SfiRuntime(cfg, FixedPeriod(24), 1, kvb)

    def dense():
        return None
    result = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(), "ctx": CTX, "chunk": CHUNK}
    matmul_flops = 2 * CTX * sum(p.numel() for n, p in model.layers.named_parameters() if p.dim() == 2)
    attn_flops = 4 * a.n_heads * a.head_dim * CTX * CTX / 2 * a.n_layers
    result["model_flops_32k"] = {"matmul": matmul_flops, "attention": attn_flops}
    prefill(model, rt, CTX // 8, None)  # compile and warm
    prefill(model, rt, CTX // 8, CHUNK)
    block = model_module.CUDNN_BLOCK
    for name, runtime_for, budget in (("whole_sfi", rt, None), ("chunked_sfi", rt, CHUNK),
                                      ("chunked_sfi_flash_op", rt, CHUNK),
                                      ("whole_dense", dense, None), ("chunked_dense", dense, CHUNK)):
        # every attention pass through the flash op instead of cuDNN: the A/B of the change
        model_module.CUDNN_BLOCK = 10**9 if name.endswith("flash_op") else block
        run = functools.partial(prefill, model, runtime_for, CTX, budget)
        s, s2 = sync_time(run), sync_time(run)
        prof = profiled(run)
        gpu_ms = sum(prof["by_kind_ms"].values())
        result[name] = {"s": [s, s2], "tok_s": CTX / min(s, s2), "gpu_ms": gpu_ms,
                        "tflops": (matmul_flops + attn_flops) / min(s, s2) / 1e12, **prof}
        print(f"== {name}: {min(s, s2):.3f} s ({CTX / min(s, s2):,.0f} tok/s), GPU {gpu_ms:.0f} ms", flush=True)
        for k, v in prof["by_kind_ms"].items():
            print(f"   {v:9.1f}  {k}", flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()
    model_module.CUDNN_BLOCK = block
    if not SMOKE:
        result["cudnn_plan_cost"] = plan_cost(a, dev)
    result["attention"] = attention_backends(a, dev)
    result["gemm"] = gemms(model, dev)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
