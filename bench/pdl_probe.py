"""The decode step's weight streaming as a chain, in one CUDA graph: 36 layers of the Qwen3-4B projections (QKV,
output, gate|up, down), each product's output feeding the next one's input, so every kernel waits for the one
before it as in a decode step. cuBLAS (F.linear) against the skinny Triton GEMM without and with programmatic
dependent launch (sfi_kernels/pdl.py), at 1, 4 and 16 rows, with a few block shapes; then the MLP alone with the
activation in the down projection's loads (`gated`) or in a launch of its own.
GB/s of weights streamed and the share of the copy bandwidth; outputs against cuBLAS's. JSON to argv[1]."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from gpu_micro import graph_ms, timed_variant  # bench/ on the path, as in bench/gpu_session.sh

from sfi.tools.bench import measure_copy_bandwidth
from sfi_kernels import silu_mul, skinny_linear
from sfi_kernels.skinny_gemm import default_config

LAYERS = 36
HIDDEN, Q_OUT, QKV_OUT, INTER = 2560, 4096, 6144, 9728


def main() -> None:
    out_path = sys.argv[1]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [[torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
               for n, k in ((QKV_OUT, HIDDEN), (HIDDEN, Q_OUT), (2 * INTER, HIDDEN), (HIDDEN, INTER))]
              for _ in range(LAYERS)]
    nbytes = sum(w.numel() * w.element_size() for ws in layers for w in ws)
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": measure_copy_bandwidth(dev) / 1e9,
              "weights_GB": nbytes / 1e9, "rows": []}
    print(f"copy {result['copy_GBps']:.0f} GB/s, weights {nbytes / 1e9:.2f} GB", flush=True)

    def chain(x, linear):
        for wqkv, wo, w13, w2 in layers:
            a = linear(x, wqkv)[:, :Q_OUT]
            h = linear(a, wo)
            g = linear(h, w13)[:, :INTER]
            x = linear(g, w2)
        return x

    def mlp_chain(x, gated, pdl):  # gate|up then down: SiLU(gate) * up in the down projection's loads, or apart
        for _, _, w13, w2 in layers:
            gu = skinny_linear(x, w13, pdl=pdl)
            x = skinny_linear(gu, w2, pdl=pdl, gated=True) if gated else skinny_linear(silu_mul(gu), w2, pdl=pdl)
        return x

    for m in (1, 4, 16):
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        want = chain(x, F.linear).float()
        variants = {"cublas": F.linear,
                    "triton": lambda x, w: skinny_linear(x, w, pdl=False),
                    "pdl": lambda x, w: skinny_linear(x, w, pdl=True)}
        shapes = ((1, 1024), (2, 1024), (2, 2048), (2, 512), (4, 1024), (8, 1024)) if m == 1 else (
            (16, 128), (32, 128), (32, 256), (64, 128))
        for bn, bk in shapes:
            for split2 in (False, True) if m == 1 and bn == 2 and bk == 1024 else (False,):
                def shaped(x, w, bn=bn, bk=bk, split2=split2, m=m):
                    split = 2 if split2 and w.shape[1] == INTER else default_config(m, *w.shape)[2]
                    return skinny_linear(x, w, pdl=True, config=(bn, bk, split, *default_config(m, *w.shape)[3:]))
                variants[f"pdl_{bn}x{bk}" + ("_w2_split2" if split2 else "")] = shaped
        for name, linear in variants.items():
            row = {"m": m, "variant": name}
            if timed_variant(row, lambda linear=linear, x=x: chain(x, linear), want, f"m={m:2d} {name:32s}"):
                ms = row["ms"]
                row.update(GBps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / result["copy_GBps"])
                print(f"m={m:2d} {name:32s} {ms:7.3f} ms {row['GBps']:6.0f} GB/s ({row['pct_copy']:4.1f}% of copy) "
                      f"err {row['rel_err']:.1e}", flush=True)
            result["rows"].append(row)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        # The MLP alone (gate|up, down: 36 x 149 MB), the activation fused into the down projection or not.
        mlp_bytes = sum(w.numel() * w.element_size() for ws in layers for w in ws[2:])
        ref = mlp_chain(x, False, False).float()
        for gated in (False, True):
            for pdl in (False, True):
                got = mlp_chain(x, gated, pdl).float()
                ms = graph_ms(lambda gated=gated, pdl=pdl, x=x: mlp_chain(x, gated, pdl))
                row = {"m": m, "variant": f"mlp_{'gated' if gated else 'silu_mul'}_{'pdl' if pdl else 'plain'}",
                       "ms": ms, "GBps": mlp_bytes / ms / 1e6, "rel_err": ((got - ref).norm() / ref.norm()).item()}
                print(f"m={m:2d} {row['variant']:32s} {ms:7.3f} ms {row['GBps']:6.0f} GB/s err {row['rel_err']:.1e}",
                      flush=True)
                result["rows"].append(row)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
