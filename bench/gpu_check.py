"""GPU checks for the static/CUDA-graph decode path, run on the device machine: graph vs the same static steps
launched op by op, graph determinism, pipelined graph steps against the same steps one at a time (tokens and
kinds), the overlapped refresh against the same refresh inline on the main stream (ordering, not timing: identical
tokens), graphs on/off step time, refresh cost (timed alone). JSON to argv[1]."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from gpu_refresh_profile import refresh_case, refresh_ms  # bench/ is the script's folder

from sfi.config import SfiConfig
from sfi.engine.decoder import Request, generate
from sfi.method.boundary import FixedPeriod
from sfi.method.refresh import StepRefresh
from sfi.method.runtime import SfiRuntime
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker
from sfi.tools.bench import bench_ours, random_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import ThirdIds  # noqa: E402  (slow steps that follow the tokens)


def decode(model, prompts, new, cfg, boundary=None, **kw):
    reqs = [Request(p, RowSampler(SamplingParams(), 0), StopChecker(None, (), (), new)) for p in prompts]
    runtime = None
    if cfg is not None:
        runtime = SfiRuntime(cfg, boundary or FixedPeriod(9), len(reqs), model.args.kv_bytes_per_token(model.dtype))
        for row, state in enumerate(runtime.state):
            state.last_slow = -3 * row
    kinds = []
    for e in generate(model, reqs, prefill_chunk=1024, runtime=runtime, **kw):
        kinds += getattr(e, "kinds", None) or []
    return [r.stopper.token_ids for r in reqs], kinds


@contextlib.contextmanager
def inline_refresh():
    """The in-step refresh on the main stream, in order (no side stream, no events), as on a CPU."""
    init = StepRefresh.__init__

    def inline_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.cuda = False

    StepRefresh.__init__ = inline_init
    try:
        yield
    finally:
        StepRefresh.__init__ = init


def agreement(a, b):
    same = [x == y for ra, rb in zip(a, b, strict=False)
            for x, y in zip(ra, rb, strict=False)]
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), len(ra))
             for ra, rb in zip(a, b, strict=False)]
    return {"token_match": sum(same) / len(same), "first_divergence": first}


def main() -> None:
    out: dict = {"device": torch.cuda.get_device_name()}
    dev = torch.device("cuda")
    model = random_model("qwen3-4b", 8192, dev, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in (3000, 2500, 3400)]
    cfg = SfiConfig(k_head=256, recent=128)
    for name, c in (("dense", None), ("sfi", cfg)):
        graph, k2 = decode(model, prompts, 40, c, cuda_graphs=True)
        again, _ = decode(model, prompts, 40, c, cuda_graphs=True)
        nograph, k1 = decode(model, prompts, 40, c, cuda_graphs=False)
        with inline_refresh():
            inline, _ = decode(model, prompts, 40, c, cuda_graphs=True)
        # Graph steps pipelined (the default) against one at a time, with slow steps that follow the tokens.
        piped = decode(model, prompts, 40, c, ThirdIds(), cuda_graphs=True)
        one = decode(model, prompts, 40, c, ThirdIds(), cuda_graphs=True, pipeline=False)
        out[name] = {"graph_repeat_identical": graph == again,
                     "pipelined_vs_one_at_a_time_identical": piped == one,
                     "overlapped_vs_inline_refresh_identical": graph == inline,
                     "graph_vs_static_no_graph": agreement(graph, nograph), "kinds_equal": k1 == k2,
                     "slow": k2.count("slow"), "fast": k2.count("fast")}
        print(name, out[name], flush=True)
    # step time, graphs on and off
    for ctx, batch in ((8192, 1), (8192, 4)):
        for graphs in (False, True):
            for name, c in (("dense", None), ("sfi", SfiConfig(k_head=2048, recent=256))):
                r = bench_ours(model, ctx, batch, 64, c, cuda_graphs=graphs)
                key = f"{name}_{ctx}x{batch}_{'graphs' if graphs else 'nographs'}"
                out[key] = {k: r[k] for k in ("tok_s", "step_ms_p50", "step_ms_p90", "graph_captures", "timed_steps")}
                print(key, out[key], flush=True)
    # refresh cost: one slow row, one layer group (Selector scores, top-k, compaction), times the group count
    for ctx in (8192, 32768):
        r = refresh_case(model, ctx, SfiConfig(k_head=2048, recent=256))
        out[f"refresh_all_layers_ms_{ctx}"] = refresh_ms(r, reps=20) * (model.args.n_layers // r.group)
        print("refresh", ctx, out[f"refresh_all_layers_ms_{ctx}"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
