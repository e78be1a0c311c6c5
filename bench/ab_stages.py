"""The ranged decode kernel's pipeline stages (and split size) A/B inside CUDA graphs, as a decode step runs it:
microseconds per launch (kernel + merge) for dense rows (the whole cache), fast rows (a compact range plus a
recent span) and a slow row (the whole cache with the Selector's logits captured, 64-key tiles as a step launches
it), Qwen3-4B heads, bf16, random data; outputs compared with the default's. JSON to argv[1]."""

from __future__ import annotations

import functools
import json
import sys

import torch
from gpu_micro import graph_ms  # bench/ on the path, as in bench/gpu_session.sh

from sfi_kernels import LogitCapture, ranged_decode_attention
from sfi_kernels.ranged_decode import default_split


def per_call_us(fn, calls: int = 36) -> float:
    """Microseconds per call of `fn`, `calls` of them captured in one CUDA graph (a step's layers)."""
    return 1e3 * graph_ms(lambda: [fn() for _ in range(calls)]) / calls


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = 32, 8, 128
    results = []
    cases = [("dense", ctx, b) for ctx, b in ((8192, 1), (8192, 16), (32768, 1), (32768, 4), (131072, 1),
                                             (131072, 4))] + [("fast", 32768, b) for b in (1, 4, 16)] + [
        ("slow", ctx, 1) for ctx in (32768, 131072)]
    for kind, ctx, b in cases:
        kc = torch.randn(b, hkv, ctx, d, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        ck, cv = (torch.randn(b, hkv, 2304, d, device=dev, dtype=dt) for _ in range(2))
        q = torch.randn(b, hq, d, device=dev, dtype=dt)
        rows = torch.arange(b, device=dev, dtype=torch.int32)
        extra = {}
        if kind == "slow":  # the domain [sink, length - recent) captured, as a slow step's launch does
            lo, hi = 4, ctx - 256
            extra = dict(block_n=64, capture=LogitCapture(
                *(torch.full((1,), v, device=dev, dtype=torch.int32) for v in (0, lo, hi)),
                torch.empty(1, hq, hi - lo, device=dev)))
        if kind in ("dense", "slow"):
            clen = torch.zeros(b, device=dev, dtype=torch.int32)
            sstart = torch.zeros(b, device=dev, dtype=torch.int32)
            slen = torch.full((b,), ctx, device=dev, dtype=torch.int32)
        else:  # sink + selected in the compact range, the recent 256 positions of the cache
            clen = torch.full((b,), 2048 + 4, device=dev, dtype=torch.int32)
            sstart = torch.full((b,), ctx - 256, device=dev, dtype=torch.int32)
            slen = torch.full((b,), 256, device=dev, dtype=torch.int32)
        max_keys = int((clen + slen).max())
        ref = None
        long_split = default_split(max_keys, b * hkv, cap=2048)
        for name, kw in (("stages2", dict(num_stages=2)), ("stages3", dict(num_stages=3)),
                         ("stages3_split_to_2048", dict(num_stages=3, split=long_split))):
            call = functools.partial(ranged_decode_attention, q, kc, vc, ck, cv, rows, clen, sstart, slen,
                                     max_keys=max_keys, **kw, **extra)
            out = call()[0]
            ref = out if ref is None else ref
            row = {"kind": kind, "ctx": ctx, "batch": b, "config": name,
                   "split": kw.get("split", default_split(max_keys, b * hkv)), "us": per_call_us(call),
                   "max_diff": (out.float() - ref.float()).abs().max().item()}
            row["GBps"] = 2 * b * hkv * max_keys * d * 2 / row["us"] / 1e3
            results.append(row)
            print(row, flush=True)
        del kc, vc, ck, cv
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
