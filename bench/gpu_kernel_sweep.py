"""Ranged decode kernel configurations on dense rows (the whole cache, the bandwidth-heavy case):
GB/s of K/V read per (context, batch, split, block_n, warps, stages), the kernel's defaults (bf16 tiles) otherwise.
JSON to argv[1], rewritten after every case; argv[2] == "long": the long rows only (32k and 128k, batch 1 and 4)."""

from __future__ import annotations

import itertools
import json
import sys

import torch

from sfi_kernels import ranged_decode_attention
from sfi_kernels.ranged_decode import default_split


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = 32, 8, 128
    results = []
    long = sys.argv[2:] == ["long"]
    cases = ((32768, 1), (32768, 4), (131072, 1), (131072, 4)) if long else \
        ((8192, 1), (8192, 4), (32768, 4), (131072, 1), (131072, 3))
    grid = list(itertools.product((512, 1024, 2048), (32, 64, 128), (4, 8), (2, 3, 4))) if long else \
        list(itertools.product((256, 512, 1024), (32, 64, 128), (2, 4, 8), (2, 3, 4)))
    for ctx, b in cases:
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        q = torch.randn(b, hq, d, device=dev, dtype=dt)
        rows = torch.arange(b, device=dev, dtype=torch.int32)
        zero = torch.zeros(b, device=dev, dtype=torch.int32)
        span = torch.full((b,), ctx, device=dev, dtype=torch.int32)
        ref, _ = ranged_decode_attention(q, kc, vc, kc, vc, rows, zero, zero, span, max_keys=ctx)
        best = None
        for split, bn, warps, stages in grid:
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
        # today's defaults: default_split's keys per split, 32-key tiles, 4 warps, 2 stages
        default = next((r for r in results if r.get("ctx") == ctx and r.get("batch") == b and "GBps" in r
                        and r["split"] == default_split(ctx, b * hkv) and r["block_n"] == 32 and r["warps"] == 4
                        and r["stages"] == 2), None)
        print(f"{ctx}x{b}: default {default}; best {best}", flush=True)
        del kc, vc
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
