"""Layer-major flash prefill against the chunked prefill on the GPU (Qwen3-4B shape, random bf16):
last-position logits, cache agreement and time, at 32k and 128k. JSON to argv[1]."""

from __future__ import annotations

import json
import sys
import time

import torch

from sfi.engine.decoder import prefill_row
from sfi.model import PrefillStep
from sfi.tools.bench import random_model


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def one(ctx: int) -> dict:
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", ctx, dev, torch.bfloat16)
    ids = torch.randint(0, model.args.vocab_size, (ctx,), generator=torch.Generator().manual_seed(0)).to(dev)
    c1, c2 = model.new_cache(1, ctx), model.new_cache(1, ctx)
    lm, t_lm = timed(lambda: prefill_row(model, c1, 0, ids, 4096))

    def chunked():
        logits = None
        for s in range(0, ctx, 4096):
            logits = model.prefill(ids[s:s + 4096], c2, PrefillStep(0, s, min(4096, ctx - s)))
        return logits

    ch, t_ch = timed(chunked)
    kdiff = (c1.k[-1, 0, :, :ctx].float() - c2.k[-1, 0, :, :ctx].float()).abs().max().item()
    return {"layer_major_s": t_lm, "chunked_s": t_ch, "logits_rel_err": ((lm - ch).norm() / ch.norm()).item(),
            "argmax_equal": bool(lm.argmax() == ch.argmax()), "last_layer_k_maxdiff": kdiff,
            "flash_failed": getattr(model, "flash_prefill_failed", False)}


def main() -> None:
    out = {}
    one(8192)  # warm-up: kernel compilation and library initialisation are not prefill time
    for ctx in (32768, 131072):
        out[ctx] = one(ctx)
        print(ctx, out[ctx], flush=True)
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
