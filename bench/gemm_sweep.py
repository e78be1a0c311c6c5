"""The skinny GEMM's configuration per projection, tuned where it counts: in the decode step's chain of products
(bench/pdl_probe.py's 36 layers of the Qwen3-4B projections, each output feeding the next input, one CUDA graph,
programmatic dependent launch). For 1, 4 and 16 rows and each of the four projections, the chain's time with that
projection's configuration changed and the others at their defaults: the difference is that projection's own gain
or loss in context (a product measured alone misses the overlap with its neighbours). Each variant's output is
checked against the default chain's. A split K adds a launch to sum its partials here, which the step
folds into add + RMSNorm for the output and down projections (so their splits' gains are underestimated).
JSON to argv[1]: every row, and per (rows, projection) the best configuration with its gain over the default."""

from __future__ import annotations

import json
import sys

import torch
from gpu_micro import SHAPES, graph_ms, timed_variant  # bench/ on the path, as in bench/gpu_session.sh

from sfi.tools.bench import measure_copy_bandwidth
from sfi_kernels import skinny_linear
from sfi_kernels.skinny_gemm import default_config

LAYERS = 36
HIDDEN, Q_OUT, INTER = 2560, 4096, 9728


def candidates(m: int, n: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """Configurations (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) around the default for this shape."""
    split = default_config(m, n, k)[2]
    splits = sorted({split, max(1, split // 2), split * 2, 1})
    if m == 1:
        out = {(2, 1024, s, 4, 3) for s in splits}
        out |= {(2, 1024, split, 4, 4), (2, 1024, split, 2, 3), (2, 2048, split, 8, 3), (4, 512, split, 4, 3)}
    else:
        out = {(32, 128, s, 4, 3) for s in splits}
        out |= {(32, 128, split, 4, 4), (16, 128, split, 4, 4), (32, 128, split, 8, 3), (64, 128, split, 8, 3),
                (32, 64, split, 4, 6)}
    return sorted(c for c in out if k // c[2] >= c[1])


def main() -> None:
    out_path = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [{name: torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for name, (n, k) in SHAPES.items()}
              for _ in range(LAYERS)]
    nbytes = sum(w.numel() * w.element_size() for ws in layers for w in ws.values())
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": measure_copy_bandwidth(dev) / 1e9,
              "weights_GB": nbytes / 1e9, "rows": [], "best": []}
    print(f"copy {result['copy_GBps']:.0f} GB/s, weights {nbytes / 1e9:.2f} GB", flush=True)

    def chain(x, configs):
        for ws in layers:
            def lin(v, name, ws=ws):
                return skinny_linear(v, ws[name], pdl=True, config=configs.get(name))
            a = lin(x, "wqkv")[:, :Q_OUT]
            h = lin(a, "wo")
            g = lin(h, "w13")[:, :INTER]
            x = lin(g, "w2")
        return x

    for m in (1, 4, 16):
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        want = chain(x, {}).float()
        base = graph_ms(lambda x=x: chain(x, {}))
        print(f"m={m:2d} default chain {base:.3f} ms ({100 * nbytes / base / 1e6 / result['copy_GBps']:.1f}% of copy)",
              flush=True)
        result["rows"].append({"m": m, "shape": None, "config": None, "ms": base})
        for name, (n, k) in SHAPES.items():
            best = (base, default_config(m, n, k))
            for cfg in candidates(m, n, k):
                if cfg == default_config(m, n, k):
                    continue
                row = {"m": m, "shape": name, "config": cfg}
                run = lambda x=x, cfg=cfg, name=name: chain(x, {name: cfg})  # noqa: E731
                if timed_variant(row, run, want, f"m={m:2d} {name:5s} {cfg}"):
                    row["gain_ms"] = base - row["ms"]
                    if row["rel_err"] < 1e-2 and row["ms"] < best[0]:
                        best = (row["ms"], cfg)
                    print(f"m={m:2d} {name:5s} {cfg} {row['ms']:.3f} ms ({row['gain_ms']:+.3f}) "
                          f"err {row['rel_err']:.1e}", flush=True)
                result["rows"].append(row)
            result["best"].append({"m": m, "shape": name, "default": default_config(m, n, k), "config": best[1],
                                   "gain_ms": base - best[0]})
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        # All four best configurations at once: do the gains add up?
        tuned = {b["shape"]: b["config"] for b in result["best"] if b["m"] == m}
        got = chain(x, tuned).float()
        ms = graph_ms(lambda x=x, tuned=tuned: chain(x, tuned))
        result["rows"].append({"m": m, "shape": "all-best", "config": tuned, "ms": ms, "gain_ms": base - ms,
                               "rel_err": ((got - want).norm() / want.norm()).item()})
        print(f"m={m:2d} all best {ms:.3f} ms ({base - ms:+.3f})", flush=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
