"""Decode benchmarks: our runtime against `transformers.generate`, same model shape, same call.

Library code; `sfi bench` renders it (a table, `--json`, `--csv`, `--plot`). Weight values do not change decode speed,
so presets build the architecture with seeded random weights (no download). Throughput counts decode
steps only, once every row is decoding (prefill excluded), as ../shared/bench-protocol.md says.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SfiConfig
from ..engine.decoder import Request, StepDone, generate
from ..loader import build_model
from ..method.boundary import BoundaryState, FixedPeriod
from ..method.runtime import SfiRuntime
from ..model import ModelArgs, Transformer
from ..sampling import RowSampler, SamplingParams
from ..stopping import StopChecker

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


def hf_model(preset: str, ctx: int, device: torch.device, dtype: torch.dtype):
    """transformers' model of the preset, initialised directly on `device` (a CPU init of 4B random
    parameters takes minutes)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(preset, ctx), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def hf_config(preset: str, ctx: int):
    from transformers import AutoConfig

    spec = dict(PRESETS[preset])
    model_type = spec.pop("model_type")
    if ctx > spec["max_position_embeddings"]:
        # Qwen3 documents YaRN, factor 4 over 32768, for contexts past its native length.
        spec["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
        spec["max_position_embeddings"] = 131072
    return AutoConfig.for_model(model_type, **spec)


def write_checkpoint(preset: str, folder: Path, tokenizer_dir: Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any) -> Path:
    """The preset's architecture with seeded random weights, written as a Hugging Face checkpoint folder (config,
    safetensors) with the tokenizer files of `tokenizer_dir`, so that `sfi run --model FOLDER` runs it exactly as a
    user's checkpoint. `overrides` change the preset's config (tests shrink it)."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[preset]) | overrides
    # Every id the tokenizer can produce needs an embedding row (the tiny preset's 1,024 would not do).
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    spec["vocab_size"] = max(spec["vocab_size"], vocab)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will be saved from: a CPU init of 4B parameters is slow
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


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
    """Bytes per second of a device-to-device copy (on a CPU, host memory to host memory), read plus write
    counted: the bandwidth a memory-bound decode step is held to."""
    if device.type != "cuda":
        a = torch.ones(int(gib * 2**30) // 16, dtype=torch.float32)  # gib / 4 per buffer: host RAM is smaller
        b = torch.empty_like(a)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
        return 2 * a.numel() * a.element_size() / statistics.median(times[1:])
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


def _requests(model: Transformer, ctx: int, batch: int, new_tokens: int, seed: int) -> list[Request]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompts = torch.randint(0, model.args.vocab_size, (batch, ctx), generator=gen)
    return [Request(p.tolist(), RowSampler(SamplingParams(), 0), StopChecker(None, (), (), new_tokens))
            for p in prompts]


@dataclass
class StaggeredPeriod:
    """The bench's boundary (random weights write no sentences): a slow step every `period` steps per row, the
    rows' phases spread evenly over the period, so a batch's slow rows fall on different steps as real text's do.
    A row's phase is set at its first decode step (admission resets its state), in the order rows first decide."""

    period: int
    rows: int
    started: int = 0

    def observe(self, state: BoundaryState, token: int) -> bool:
        if state.step == 0:
            state.last_slow = -(self.started * self.period // self.rows)
            self.started += 1
        return FixedPeriod(self.period).observe(state, token)

    def guess(self, state: BoundaryState) -> bool:
        """`observe`'s answer without setting a phase: a row not yet started gets the one its first `observe`
        will give it if it is the next row to start."""
        if state.step == 0:
            state.last_slow = -(self.started * self.period // self.rows)
        return FixedPeriod(self.period).guess(state)


def bench_ours(model: Transformer, ctx: int, batch: int, new_tokens: int, sfi: SfiConfig | None = None,
               period: int = 24, seed: int = 0, warmup_steps: int = 5, cuda_graphs: bool = True,
               pipeline: bool | None = None) -> dict[str, Any]:
    """Our decoder on random prompts; `sfi` None is the dense recipe. With SFI, random weights produce no
    sentences, so a slow step fires every `period` tokens per row, rows staggered (bench-protocol.md). `pipeline`:
    `Decoder.step`'s (default: with graphs, unless sfi.engine.decoder.PIPELINE is off, for an A/B)."""
    device = model.device
    requests = _requests(model, ctx, batch, new_tokens, seed)
    runtime = None
    if sfi is not None:
        sfi = sfi.for_context(model.args.max_position_embeddings)
        runtime = SfiRuntime(sfi, StaggeredPeriod(period, batch), batch, model.args.kv_bytes_per_token(model.dtype))
    _sync(device)
    t0 = time.perf_counter()
    steps, prefill_s, kinds, captures, previous_captured = [], 0.0, [], 0, False
    gpu, walls = [], []  # per timed step: the device's time for its forward; the time since the last step's event
    arrived = None
    for event in generate(model, requests, prefill_chunk=4096, runtime=runtime, cuda_graphs=cuda_graphs,
                          time_gpu=True, pipeline=pipeline):
        now = time.perf_counter()
        if isinstance(event, StepDone):  # its tokens are read: the device has done the step
            step_kinds = event.kinds or ["slow"] * len(event.rows)
            if event.captured_graph:  # one-time cost of a new step shape, not decode speed
                captures += 1
            else:
                steps.append((len(event.rows), event.seconds, "slow" in step_kinds))
                gpu.append(event.gpu_seconds)
                walls.append(now - arrived if arrived is not None and not previous_captured else None)
            previous_captured, arrived = event.captured_graph, now
            kinds += step_kinds
        else:
            prefill_s += event.seconds
    total_s = time.perf_counter() - t0
    timed = steps[warmup_steps:]  # the first steps compile kernels
    seconds = [t for _, t, _ in timed]
    median_ms = lambda ts: 1e3 * statistics.median(ts) if ts else None  # noqa: E731
    # Wall time from one step's event to the next, the host's bookkeeping between steps included (a step's own
    # `seconds` leave out what follows its tokens unless steps are pipelined).
    wall = [(n, w) for (n, _, _), w in zip(timed, walls[warmup_steps:], strict=True) if w is not None]
    result = {"tok_s": sum(n for n, _, _ in timed) / sum(seconds), "step_ms_p50": median_ms(seconds),
              "tok_s_wall": sum(n for n, _ in wall) / sum(w for _, w in wall) if wall else None,
              "step_ms_p90": 1e3 * sorted(seconds)[int(0.9 * (len(seconds) - 1))], "prefill_s": prefill_s,
              "end_to_end_s": total_s, "slow_fraction": kinds.count("slow") / max(len(kinds), 1),
              "graph_captures": captures, "timed_steps": len(timed),
              # Steps holding a slow row against steps of fast rows only (the step-time spread SFI pays).
              "steps_with_slow": sum(slow for _, _, slow in timed) / max(len(timed), 1),
              "step_ms_with_slow_p50": median_ms([t for _, t, slow in timed if slow]),
              "step_ms_fast_only_p50": median_ms([t for _, t, slow in timed if not slow])}
    if device.type == "cuda":
        # A step's wall time is the host's work before the forward (the runtime's decisions, staging), the forward
        # on the device, then sampling and reading the tokens back; the difference is what the host adds.
        forward = gpu[warmup_steps:]
        result["gpu_step_ms_p50"] = median_ms(forward)
        result["host_ms_p50"] = median_ms([t - f for t, f in zip(seconds, forward, strict=True)])
    if runtime is not None:
        reports = [runtime.report(r) for r in range(batch)]
        result["attended_fraction"] = statistics.mean(r["attended_fraction"] for r in reports)
        result["kv_bytes_per_token"] = sum(r["kv_bytes_read"] for r in reports) / sum(
            r["slow_steps"] + r["fast_steps"] for r in reports)
        result["mean_interval"] = statistics.mean(r["mean_interval"] or 0 for r in reports)
    return result


def bench_torch(model: Transformer, ctx: int, batch: int, new_tokens: int, seed: int = 0,
                warmup_steps: int = 5, cuda_graphs: bool = True) -> dict[str, Any]:
    """The plain-PyTorch dense decoder (sfi.tools.torch_baseline) on the same random prompts as `bench_ours`,
    decoding from a cache our prefill filled (prefill is not what it measures)."""
    from ..engine.decoder import prefill_row
    from .torch_baseline import decode_plain

    requests = _requests(model, ctx, batch, new_tokens, seed)
    cache = model.new_cache(batch, ctx + new_tokens)
    firsts = [int(prefill_row(model, cache, row, torch.tensor(r.prompt_ids, device=model.device), 4096).argmax())
              for row, r in enumerate(requests)]
    out = decode_plain(model, cache, firsts, [ctx] * batch, new_tokens - 1, warmup_steps, cuda_graphs)
    del cache
    return {"tok_s": out["tok_s"], "step_ms": out["step_ms"], "timed_steps": out["timed_steps"]}


def roofline(model: Transformer, kv_bytes_per_row_step: float, batch: int, bandwidth: float) -> float:
    """tok/s if a step only had to stream the weights once and each row's KV once, at `bandwidth` B/s."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return batch * bandwidth / (weights + batch * kv_bytes_per_row_step)


def bench_hf(preset: str, ctx: int, batch: int, new_tokens: int, device: torch.device, dtype: torch.dtype,
             model: Any | None = None) -> dict[str, float]:
    """`transformers.generate` (SDPA, greedy); decode time from per-step timestamps (a logits processor)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    if model is None:
        model = hf_model(preset, ctx, device, dtype)

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
    model = random_model(preset, 512, device, dtype, seed=1)
    hf = hf_model(preset, 512, device, dtype)
    ours = dict(model.named_parameters())
    hd = model.args.head_dim
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(_hf_view(name, ours, model.args, hd))
    result = compare_logits(model, hf)
    del hf, model
    return result


def compare_logits(model: Transformer, hf: Any, n: int = 256) -> dict[str, float]:
    """Relative error and argmax agreement of our prefill logits against a transformers model's."""
    from ..model import PrefillStep

    ids = torch.randint(0, model.args.vocab_size, (n,), device=model.device)
    got = model.prefill(ids, model.new_cache(1, n), PrefillStep(0, 0, n), all_logits=True)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    return {"rel_err": ((got - ref).norm() / ref.norm()).item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def _hf_view(name: str, ours: dict[str, torch.Tensor], args: ModelArgs, hd: int) -> torch.Tensor:
    """Our tensor (or fused slice) behind a Hugging Face parameter name (inverse of the loader's map)."""
    from ..loader import _target

    target = _target(name, args)
    if target is None:  # tied lm_head
        return ours["tok_embeddings.weight"]
    key, rows = target
    return ours[key] if rows is None else ours[key][rows]


def run_bench(preset: str, ctxs: Sequence[int], batches: Sequence[int], new_tokens: int, sfi: SfiConfig,
              hf: bool = True, progress=None, cuda_graphs: bool = True,
              model_spec: str | None = None, plain: bool = True) -> dict[str, Any]:
    """Every (context, batch): SFI, dense, (optionally) the plain-PyTorch decoder and transformers.generate,
    with the roofline. Ratios are quoted against the faster of our dense and the plain decoder. With
    `model_spec` a real checkpoint (any `--model` form) replaces the preset's random weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = measure_copy_bandwidth(device)
    lm = None
    if model_spec is not None:
        from ..loader import load_model

        lm = load_model(model_spec, device.type, str(dtype).removeprefix("torch."))
        preset = lm.name
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "preset": preset,
        "weights": "checkpoint" if lm is not None else "random",
        "dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens, "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9, "sfi": dataclasses.asdict(sfi),
        "cuda_graphs": cuda_graphs and device.type == "cuda", "runs": []}
    report["parity"] = check_parity(preset, device, dtype) if lm is None else None
    say = progress or (lambda text: None)
    parity = report["parity"]
    say(f"{report['device']}, copy bandwidth {bandwidth / 1e9:,.1f} GB/s" + (
        f"; logits vs transformers: relative error {parity['rel_err']:.2e}, argmax agreement "
        f"{parity['argmax_agreement']:.1%}" if parity else ""))
    for ctx in ctxs:
        if lm is not None and ctx + new_tokens > lm.max_context:
            for batch in batches:
                report["runs"].append({"ctx": ctx, "batch": batch,
                                       "error": f"past the model's {lm.max_context}-token context"})
            continue
        model = lm.model if lm is not None else random_model(preset, ctx, device, dtype)
        bpt = model.args.kv_bytes_per_token(dtype)
        for batch in batches:
            row: dict[str, Any] = {"ctx": ctx, "batch": batch}
            try:
                row["dense"] = bench_ours(model, ctx, batch, new_tokens, cuda_graphs=cuda_graphs)
                row["sfi"] = bench_ours(model, ctx, batch, new_tokens, sfi, cuda_graphs=cuda_graphs)
                if plain:
                    row["torch"] = bench_torch(model, ctx, batch, new_tokens, cuda_graphs=cuda_graphs)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                say(f"{ctx} x {batch}: out of memory")
                report["runs"].append(row)
                continue
            finally:
                gc.collect()  # the finished batch's cache and graphs, before the next batch allocates
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if bandwidth:
                mid = ctx + new_tokens / 2
                row["dense"]["roofline_tok_s"] = roofline(model, mid * bpt, batch, bandwidth)
                row["sfi"]["roofline_tok_s"] = roofline(model, row["sfi"]["kv_bytes_per_token"], batch, bandwidth)
                if "torch" in row:
                    row["torch"]["roofline_tok_s"] = row["dense"]["roofline_tok_s"]
                for kind in ("dense", "sfi", "torch"):
                    if kind in row:
                        row[kind]["pct_roofline"] = 100 * row[kind]["tok_s"] / row[kind]["roofline_tok_s"]
            row["sfi_over_dense"] = row["sfi"]["tok_s"] / row["dense"]["tok_s"]
            best = max(("dense", "torch"), key=lambda k: row[k]["tok_s"] if k in row else 0.0)
            row["best_dense"] = best
            row["sfi_over_best_dense"] = row["sfi"]["tok_s"] / row[best]["tok_s"]
            plain_text = f", plain PyTorch {row['torch']['tok_s']:,.1f}" if "torch" in row else ""
            sfi_row = row["sfi"]
            host = (f"; SFI step p50 {sfi_row['step_ms_p50']:.2f} ms, {sfi_row['host_ms_p50']:.2f} of it the host's"
                    if sfi_row.get("host_ms_p50") is not None else "")
            say(f"{ctx} x {batch}: SFI {row['sfi']['tok_s']:,.1f} tok/s, dense {row['dense']['tok_s']:,.1f} tok/s"
                f"{plain_text} ({row['sfi_over_best_dense']:.2f}x the faster dense){host}")
            report["runs"].append(row)
        del model
        if hf:
            rows = [r for r in report["runs"] if r["ctx"] == ctx and "error" not in r]
            _bench_hf_rows(preset, ctx, rows, new_tokens, device, dtype, say, lm)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _bench_hf_rows(preset, ctx, rows, new_tokens, device, dtype, say, lm=None) -> None:
    if not rows:
        return
    if lm is None:
        hf = hf_model(preset, ctx, device, dtype)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    for row in rows:
        try:
            row["hf_generate"] = bench_hf(preset, ctx, row["batch"], new_tokens, device, dtype, hf)
            row["sfi_over_hf"] = row["sfi"]["tok_s"] / row["hf_generate"]["tok_s"]
        except torch.OutOfMemoryError:
            row["hf_generate"] = {"error": "out of memory"}
        rate = row["hf_generate"].get("tok_s")
        say(f"{ctx} x {row['batch']}: transformers.generate " + (f"{rate:,.1f} tok/s" if rate else "out of memory"))
    del hf
