"""The decode step's weight streaming as a chain, in one CUDA graph: 36 layers of the Qwen3-4B projections (QKV,
output, gate|up, down), each product's output feeding the next one's input, so every kernel waits for the one
before it as in a decode step. cuBLAS (F.linear) against the skinny Triton GEMM without and with programmatic
dependent launch (kernels/pdl.py) and L2 prefetch budgets, at 1, 4 and 16 rows; for one row a few block shapes.
GB/s of weights streamed and the share of the copy bandwidth; outputs against cuBLAS's. JSON to argv[1]."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from gpu_micro import graph_ms  # bench/ on the path, as in bench/gpu_session.sh

import sfi  # noqa: F401  (makes kernels/ importable as sfi_kernels from a source tree)
from sfi_kernels import skinny_linear
from sfi_kernels.skinny_gemm import default_config

LAYERS = 36
HIDDEN, Q_OUT, QKV_OUT, INTER = 2560, 4096, 6144, 9728


def copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = graph_ms(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def main() -> None:
    out_path = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [[torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
               for n, k in ((QKV_OUT, HIDDEN), (HIDDEN, Q_OUT), (2 * INTER, HIDDEN), (HIDDEN, INTER))]
              for _ in range(LAYERS)]
    nbytes = sum(w.numel() * w.element_size() for ws in layers for w in ws)
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_gbps(), "weights_GB": nbytes / 1e9,
              "rows": []}
    print(f"copy {result['copy_GBps']:.0f} GB/s, weights {nbytes / 1e9:.2f} GB", flush=True)

    def chain(x, linear):
        for wqkv, wo, w13, w2 in layers:
            a = linear(x, wqkv)[:, :Q_OUT]
            h = linear(a, wo)
            g = linear(h, w13)[:, :INTER]
            x = linear(g, w2)
        return x

    for m in (1, 4, 16):
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        want = chain(x, F.linear).float()
        variants = {"cublas": F.linear,
                    "triton": lambda x, w: skinny_linear(x, w, pdl=False),
                    "pdl": lambda x, w: skinny_linear(x, w, pdl=True, prefetch=0)}
        for mb in (4, 8, 16, 32):
            variants[f"pdl_prefetch_{mb}MB"] = lambda x, w, mb=mb: skinny_linear(x, w, pdl=True, prefetch=mb << 20)
        if m == 1:
            for bn, bk in ((2, 1024), (8, 512), (4, 512)):
                def shaped(x, w, bn=bn, bk=bk):
                    cfg = (bn, bk, *default_config(1, *w.shape)[2:])
                    return skinny_linear(x, w, pdl=True, prefetch=16 << 20, config=cfg)
                variants[f"pdl_prefetch_16MB_{bn}x{bk}"] = shaped
            variants["pdl_prefetch_16MB_w2_split2"] = lambda x, w: skinny_linear(
                x, w, pdl=True, prefetch=16 << 20, config=(4, 1024, 2, 4, 3) if w.shape[1] == INTER else None)
        for name, linear in variants.items():
            row = {"m": m, "variant": name}
            try:
                got = chain(x, linear).float()
                row["rel_err"] = ((got - want).norm() / want.norm()).item()
                ms = graph_ms(lambda linear=linear, x=x: chain(x, linear))
                row.update(ms=ms, GBps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / result["copy_GBps"])
                print(f"m={m:2d} {name:32s} {ms:7.3f} ms {row['GBps']:6.0f} GB/s ({row['pct_copy']:4.1f}% of copy) "
                      f"err {row['rel_err']:.1e}", flush=True)
            except Exception as exc:  # a variant that does not compile or launch here
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"m={m:2d} {name:32s} failed: {row['error']}", flush=True)
            result["rows"].append(row)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
