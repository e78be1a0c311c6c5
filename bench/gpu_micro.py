"""Decode-step building blocks timed the way a step runs them: each case is 36 launches (one per layer, each
on its own weights or cache, so nothing is served from L2) captured in a CUDA graph and replayed.

- GEMM: cuBLAS (F.linear) against the skinny Triton GEMM over a grid of configurations, for every weight
  matrix of the Qwen3-4B shape at 1, 4 and 16 rows; achieved GB/s of weights read.
- Ranged decode attention: dense rows at 8k and SFI fast rows (compact 2052 + recent 300) at batch 1, 4, 16,
  over split sizes and tiles.
JSON to argv[1]; a short table to stdout. With argv[2] == "quick", only cuBLAS and the defaults (no sweeps).
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from sfi_kernels import LogitCapture, ranged_decode_attention, skinny_linear

LAYERS = 36
QUICK = len(sys.argv) > 2 and sys.argv[2] == "quick"
DEV, DT = torch.device("cuda"), torch.bfloat16
SHAPES = {"wqkv": (6144, 2560), "wo": (2560, 4096), "w13": (19456, 2560), "w2": (2560, 9728)}
LM_HEAD = (151936, 2560)


def graph_ms(fn, reps: int = 10, rounds: int = 5) -> float:
    """Median milliseconds of one replay of a graph of `fn` (after warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    del g
    return statistics.median(times)


def timed_variant(row: dict, run, want: torch.Tensor, label: str) -> bool:
    """A variant's relative error against `want` and its graph time into `row` (rel_err, ms); where it does not
    compile or launch here, the error it raised instead (printed after `label`), and False."""
    try:
        got = run().float()
        row["rel_err"] = ((got - want).norm() / want.norm()).item()
        row["ms"] = graph_ms(run)
    except Exception as exc:  # a variant that does not compile or launch here
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"{label} failed: {row['error']}", flush=True)
        return False
    return True


def _gemms(x, ws, cfg=None, torch_linear=False):
    return [F.linear(x, w) if torch_linear else skinny_linear(x, w, config=cfg) for w in ws]


def _attns(q, kc, vc, mk, mv, ranges, **kw):
    return [ranged_decode_attention(q, kc[i], vc[i], mk[i], mv[i], *ranges, **kw) for i in range(LAYERS)]


def gemm_configs(m: int, n: int):
    if QUICK:
        return
        grid = itertools.product((4, 8, 16), (512, 1024), (1, 2, 4), ((4, 3), (8, 4)))
    else:
        grid = itertools.product((16, 32, 64), (128, 256), (1, 2, 4), ((4, 3), (4, 4)))
    for bn, bk, split, (warps, stages) in grid:
        programs = -(-n // bn) * split
        if split > 1 and programs > 2048:
            continue
        yield bn, bk, split, warps, stages


def bench_gemm(out: dict) -> None:
    copy_gbps = out["copy_GBps"]
    for name, (n, k) in {**SHAPES, "lm_head": LM_HEAD}.items():
        copies = 1 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device=DEV, dtype=DT) / k**0.5 for _ in range(copies)]
        nbytes = copies * n * k * 2
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=DEV, dtype=DT)
            ref = F.linear(x, ws[0])
            cublas = graph_ms(functools.partial(_gemms, x, ws, torch_linear=True))
            best = None
            tried = 0
            for cfg in gemm_configs(m, n):
                try:
                    y = skinny_linear(x, ws[0], config=cfg)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 1e-2:
                        raise RuntimeError(f"rel err {err}")
                    ms = graph_ms(functools.partial(_gemms, x, ws, cfg), reps=5, rounds=3)
                except Exception as exc:  # a configuration that does not compile, or a wrong one
                    out.setdefault("gemm_errors", []).append([name, m, cfg, str(exc)[:100]])
                    continue
                tried += 1
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            default_ms = graph_ms(functools.partial(_gemms, x, ws))
            row = {"name": name, "m": m, "n": n, "k": k, "copies": copies,
                   "cublas_ms": cublas, "cublas_GBps": nbytes / cublas / 1e6,
                   "default_ms": default_ms, "default_GBps": nbytes / default_ms / 1e6,
                   "best_ms": best[0] if best else None, "best_cfg": best[1] if best else None,
                   "best_GBps": nbytes / best[0] / 1e6 if best else None, "configs_tried": tried}
            out["gemm"].append(row)
            pct = 100 * row["cublas_GBps"] / copy_gbps
            print(f"{name:8s} m={m:2d}: cublas {row['cublas_GBps']:6.0f} GB/s ({pct:3.0f}% of copy), "
                  f"triton default {row['default_GBps']:6.0f}, best {row['best_GBps'] or 0:6.0f} "
                  f"{row['best_cfg']}", flush=True)
        del ws
        torch.cuda.empty_cache()


def bench_attention(out: dict) -> None:
    hq, hkv, d = 32, 8, 128
    for label, batch, clen, span in (("dense8k", 1, 0, 8192), ("dense8k", 4, 0, 8192), ("fast", 1, 2052, 300),
                                     ("fast", 4, 2052, 300), ("fast", 16, 2052, 300), ("dense32k", 1, 0, 32768),
                                     ("dense32k", 4, 0, 32768), ("dense128k", 1, 0, 131072)):
        s = max(span, 512)
        kc = [torch.randn(batch, hkv, s, d, device=DEV, dtype=DT) for _ in range(LAYERS)]
        vc = [torch.randn_like(t) for t in kc]
        mk = [torch.randn(batch, hkv, max(clen, 1), d, device=DEV, dtype=DT) for _ in range(LAYERS)]
        mv = [torch.randn_like(t) for t in mk]
        q = torch.randn(batch, hq, d, device=DEV, dtype=DT)
        rows = torch.arange(batch, device=DEV, dtype=torch.int32)
        ranges = [rows] + [torch.full((batch,), v, device=DEV, dtype=torch.int32) for v in (clen, 0, span)]
        attns = functools.partial(_attns, q, kc, vc, mk, mv, ranges, max_keys=clen + span)
        nbytes = LAYERS * batch * hkv * (clen + span) * d * 2 * 2
        results = []
        grid = itertools.product((64, 128, 256, 512), (32, 64), (4, 8), (2, 3, 4)) if not QUICK else ()
        for split, bn, warps, stages in grid:
            if bn > split:
                continue
            kw = dict(split=split, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                ms = graph_ms(functools.partial(attns, **kw), reps=5, rounds=3)
            except Exception as exc:
                out.setdefault("attn_errors", []).append([label, batch, kw, str(exc)[:100]])
                continue
            results.append({"split": split, "block_n": bn, "warps": warps, "stages": stages, "ms": ms,
                            "GBps": nbytes / ms / 1e6})
        # Tiles upcast to float32 ("default" until 2026-12-03) against bf16 tiles into the tensor cores
        # (native_tiles, the default since), and how far apart their outputs are.
        default = graph_ms(functools.partial(attns, native_tiles=False))
        native = graph_ms(functools.partial(attns, native_tiles=True))
        a, b = (ranged_decode_attention(q, kc[0], vc[0], mk[0], mv[0], *ranges, max_keys=clen + span,
                                        native_tiles=n)[0].float() for n in (False, True))
        native_rel = float((a - b).norm() / a.norm())
        results.sort(key=lambda r: r["ms"])
        results = results or [{"ms": default, "split": None, "block_n": None, "warps": None, "stages": None}]
        row = {"case": label, "batch": batch, "keys": clen + span, "default_ms": default,
               "default_GBps": nbytes / default / 1e6, "native_ms": native, "native_GBps": nbytes / native / 1e6,
               "native_rel_diff": native_rel, "best": results[:5]}
        out["attention"].append(row)
        print(f"attn {label:8s} b={batch:2d}: default {default * 1e3 / LAYERS:6.1f} us/layer "
              f"({row['default_GBps']:5.0f} GB/s), native tiles {native * 1e3 / LAYERS:6.1f} us/layer "
              f"({row['native_GBps']:5.0f} GB/s, rel diff {native_rel:.1e}), "
              f"best {results[0]['ms'] * 1e3 / LAYERS:6.1f} us/layer "
              f"{ {k: results[0][k] for k in ('split', 'block_n', 'warps', 'stages')} }", flush=True)
        del kc, vc, mk, mv
        torch.cuda.empty_cache()


def bench_capture(out: dict) -> None:
    """A slow row's pass (capture of its domain's logits for the Selector) against the same pass without capture,
    one row, every layer's cache, in a CUDA graph."""
    hq, hkv, d = 32, 8, 128
    for ctx in (32768, 131072):
        kc = [torch.randn(1, hkv, ctx, d, device=DEV, dtype=DT) for _ in range(LAYERS)]
        vc = [torch.randn_like(t) for t in kc]
        mk = [torch.randn(1, hkv, 1, d, device=DEV, dtype=DT) for _ in range(LAYERS)]
        q = torch.randn(1, hq, d, device=DEV, dtype=DT)
        ranges = [torch.zeros(1, device=DEV, dtype=torch.int32)] + [
            torch.full((1,), v, device=DEV, dtype=torch.int32) for v in (0, 0, ctx)]
        lo, hi = 4, ctx - 256
        cap = LogitCapture(*(torch.full((1,), v, device=DEV, dtype=torch.int32) for v in (0, lo, hi)),
                           torch.empty(1, hq, hi - lo, device=DEV))
        attns = functools.partial(_attns, q, kc, vc, mk, mk, ranges, max_keys=ctx)
        plain, captured = graph_ms(attns), graph_ms(functools.partial(attns, capture=cap))
        row = {"ctx": ctx, "plain_ms": plain, "capture_ms": captured, "ratio": captured / plain, "tiles": []}
        for bn, warps in ((32, 8), (64, 4), (64, 8), (16, 4)):
            ms = graph_ms(functools.partial(attns, capture=cap, block_n=bn, num_warps=warps))
            row["tiles"].append({"block_n": bn, "warps": warps, "capture_ms": ms})
            print(f"  capture block_n {bn} warps {warps}: {ms * 1e3 / LAYERS:6.1f} us/layer", flush=True)
        out.setdefault("capture", []).append(row)
        print(f"capture {ctx:6d} x 1: plain {plain * 1e3 / LAYERS:6.1f} us/layer, with capture "
              f"{captured * 1e3 / LAYERS:6.1f} us/layer ({captured / plain:.2f}x)", flush=True)
        del kc, vc, mk
        torch.cuda.empty_cache()


def main() -> None:
    from sfi.tools.bench import measure_copy_bandwidth

    out = {"device": torch.cuda.get_device_name(), "copy_GBps": measure_copy_bandwidth(DEV) / 1e9, "gemm": [],
           "attention": []}
    print("copy GB/s", out["copy_GBps"], flush=True)
    try:
        if sys.argv[2:] == ["capture"]:
            return bench_capture(out)
        bench_attention(out)
        bench_gemm(out)
    finally:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
