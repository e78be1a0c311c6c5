"""Ranged decode kernel configurations on dense rows (the whole cache, the bandwidth-heavy case):
GB/s of K/V read per (context, batch, split, block_n, warps, stages). JSON to argv[1]."""

from __future__ import annotations

import itertools
import json
import sys

import torch

import sfi  # noqa: F401  (makes kernels/ importable as sfi_kernels from a source tree)
from sfi_kernels import ranged_decode_attention


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = 32, 8, 128
    results = []
    for ctx, b in ((8192, 1), (8192, 4), (32768, 4), (131072, 1), (131072, 3)):
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        q = torch.randn(b, hq, d, device=dev, dtype=dt)
        rows = torch.arange(b, device=dev, dtype=torch.int32)
        zero = torch.zeros(b, device=dev, dtype=torch.int32)
        span = torch.full((b,), ctx, device=dev, dtype=torch.int32)
        ref, _ = ranged_decode_attention(q, kc, vc, kc, vc, rows, zero, zero, span, max_keys=ctx)
        best = None
        for split, bn, warps, stages in itertools.product((256, 512, 1024), (32, 64, 128), (2, 4, 8), (2, 3, 4)):
            if bn > split:
                continue
            kw = dict(max_keys=ctx, split=split, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                out, _ = ranged_decode_attention(q, kc, vc, kc, vc, rows, zero, zero, span, **kw)
                err = (out.float() - ref.float()).abs().max().item()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    ranged_decode_attention(q, kc, vc, kc, vc, rows, zero, zero, span, **kw)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / 20
            except Exception as exc:  # a configuration that does not compile (shared memory)
                results.append({"ctx": ctx, "batch": b, **kw, "error": str(exc)[:80]})
                continue
            gbs = 2 * kc.numel() * kc.element_size() / ms / 1e6
            row = {"ctx": ctx, "batch": b, "split": split, "block_n": bn, "warps": warps, "stages": stages,
                   "ms": ms, "GBps": gbs, "max_err": err}
            results.append(row)
            if best is None or gbs > best["GBps"]:
                best = row
        default = next(r for r in results if r.get("ctx") == ctx and r.get("batch") == b and r.get("split") == 256
                       and r.get("block_n") == 64 and r.get("warps") == 4 and r.get("stages") == 2)
        print(f"{ctx}x{b}: default {default['GBps']:.0f} GB/s ({default['ms']:.3f} ms); best {best}", flush=True)
        del kc, vc
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
