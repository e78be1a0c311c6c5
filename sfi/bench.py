"""Decode benchmarks: our runtime against `transformers.generate`, same model shape, same call.

Library code; `python -m sfi.bench` runs it and prints JSON. Weight values do not change decode speed,
so presets build the architecture with seeded random weights (no download). Throughput counts decode
steps only, once every row is decoding (prefill excluded), as ../shared/bench-protocol.md says.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from typing import Any

import torch

from .decoder import prefill_row
from .loader import build_model
from .model import DecodeStep, ModelArgs, Transformer

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen3-4B's published config.json (architecture only).
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
                     rope_theta=1000000.0),
    "qwen3-tiny": dict(model_type="qwen3", vocab_size=1024, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=1000000.0),
}


def hf_config(preset: str, ctx: int):
    from transformers import AutoConfig

    spec = dict(PRESETS[preset])
    model_type = spec.pop("model_type")
    if ctx > spec["max_position_embeddings"]:
        # Qwen3 documents YaRN, factor 4 over 32768, for contexts past its native length.
        spec["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
        spec["max_position_embeddings"] = 131072
    return AutoConfig.for_model(model_type, **spec)


def random_model(preset: str, ctx: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    args = ModelArgs.from_hf_config(hf_config(preset, ctx))
    model = build_model(args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy, read plus write counted."""
    if device.type != "cuda":
        return 0.0
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def bench_ours(model: Transformer, ctx: int, batch: int, new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Dense decode in our runtime: per-step wall times after a synchronising prefill of every row."""
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompts = torch.randint(0, model.args.vocab_size, (batch, ctx), generator=gen).to(device)
    cache = model.new_cache(batch, ctx + new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    tokens = torch.stack([prefill_row(model, cache, row, prompts[row], 4096).argmax() for row in range(batch)])
    _sync(device)
    prefill_s = time.perf_counter() - t0
    rows = torch.arange(batch, device=device)
    steps = []
    for i in range(new_tokens):
        positions = torch.full((batch,), ctx + i, dtype=torch.long, device=device)
        step = DecodeStep(rows=rows, positions=positions, kv_len=ctx + i + 1, whole_cache=True)
        s = time.perf_counter()
        tokens = model.decode(tokens, cache, step).argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - s)
    steps = steps[3:]  # the first steps include one-time kernel selection
    return {"tok_s": batch * len(steps) / sum(steps), "step_ms_p50": 1e3 * statistics.median(steps),
            "step_ms_p90": 1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))], "prefill_s": prefill_s}


def bench_hf(preset: str, ctx: int, batch: int, new_tokens: int, device: torch.device, dtype: torch.dtype,
             model: Any | None = None) -> dict[str, float]:
    """`transformers.generate` (SDPA, greedy); decode time from per-step timestamps (a logits processor)."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    if model is None:
        model = AutoModelForCausalLM.from_config(hf_config(preset, ctx), dtype=dtype,
                                                 attn_implementation="sdpa").to(device).eval()

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
    _sync(device)
    steps = [b - a for a, b in itertools.pairwise(stamps)][3:]
    return {"tok_s": batch * len(steps) / sum(steps), "step_ms_p50": 1e3 * statistics.median(steps),
            "prefill_s": stamps[0] - t0}


def check_parity(preset: str, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Our logits against transformers' on the same random weights, on this device and dtype."""
    from transformers import AutoModelForCausalLM

    from .model import PrefillStep

    model = random_model(preset, 512, device, dtype, seed=1)
    hf = AutoModelForCausalLM.from_config(hf_config(preset, 512), dtype=dtype).to(device).eval()
    ours = dict(model.named_parameters())
    hd = model.args.head_dim
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(_hf_view(name, ours, model.args, hd))
    ids = torch.randint(0, model.args.vocab_size, (256,), device=device)
    got = model.prefill(ids, model.new_cache(1, 256), PrefillStep(0, 0, 256), all_logits=True)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    del hf, model
    return {"rel_err": rel, "argmax_agreement": agree}


def _hf_view(name: str, ours: dict[str, torch.Tensor], args: ModelArgs, hd: int) -> torch.Tensor:
    """Our tensor (or fused slice) behind a Hugging Face parameter name (inverse of the loader's map)."""
    from .loader import _target

    target = _target(name, args)
    if target is None:  # tied lm_head
        return ours["tok_embeddings.weight"]
    key, rows = target
    return ours[key] if rows is None else ours[key][rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="qwen3-4b", choices=sorted(PRESETS))
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf", action="store_true", help="also time transformers.generate")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "preset": a.preset, "dtype": str(dtype), "new_tokens": a.new_tokens,
                              "torch": torch.__version__, "copy_bw_GBps": measure_copy_bandwidth(device) / 1e9}
    report["parity"] = check_parity(a.preset, device, dtype)
    print(json.dumps(report), file=sys.stderr, flush=True)
    runs = []
    for ctx in a.ctx:
        model = random_model(a.preset, ctx, device, dtype)
        for batch in a.batch:
            row = {"ctx": ctx, "batch": batch, "sfi_dense": bench_ours(model, ctx, batch, a.new_tokens)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            runs.append(row)
        del model
        if a.hf:
            hf = None
            for row in (r for r in runs if r["ctx"] == ctx):
                if hf is None:
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_config(hf_config(a.preset, ctx), dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
                row["hf_generate"] = bench_hf(a.preset, ctx, row["batch"], a.new_tokens, device, dtype, hf)
                row["speedup_vs_hf"] = row["sfi_dense"]["tok_s"] / row["hf_generate"]["tok_s"]
                print(json.dumps(row), file=sys.stderr, flush=True)
            del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["runs"] = runs
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
