"""Static decode steps (the CUDA-graph path, run eagerly on CPU): the same tokens and the same
selections as the op-by-op path, for dense and SFI batches whose rows fire at different steps."""

from __future__ import annotations

import pytest
import torch

from sfi.boundary import FixedPeriod
from sfi.config import SfiConfig
from sfi.decoder import Request, generate
from sfi.graphs import _bucket
from sfi.runtime import SfiRuntime
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker

import tiny


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen3-6-layers"])
def lm(request, tmp_path_factory):
    # Six layers: the in-step refresh runs in three groups of two, and the third reuses the first's buffer.
    family, layers = (request.param.split("-")[0], {"num_hidden_layers": 6}) if "layers" in request.param else \
        (request.param, {})
    return tiny.load_for_sfi(tmp_path_factory.mktemp(request.param), family, seed=5, **layers)


def prompt(n, offset=0):
    return tiny.tokenizer()(tiny.TEXT * 4)["input_ids"][offset:offset + n]


def run(lm, prompts, new, cfg, static):
    reqs = [Request(p, RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), n))
            for p, n in zip(prompts, new, strict=True)]
    runtime = None
    if cfg is not None:
        runtime = SfiRuntime(cfg, FixedPeriod(6), len(reqs), lm.args.kv_bytes_per_token(lm.model.dtype))
    events = list(generate(lm.model, reqs, prefill_chunk=64, runtime=runtime, static=static))
    memory = runtime.memory if runtime is not None else None
    return [r.stopper.token_ids for r in reqs], runtime, events, memory


@pytest.mark.parametrize("recipe", ["dense", "sfi"])
def test_static_steps_match_op_by_op(lm, recipe):
    if recipe == "dense" and lm.args.n_layers > 2:
        pytest.skip("the six-layer model is for the refresh's layer groups; dense steps refresh nothing")
    cfg = SfiConfig(sink=4, k_head=24, recent=16) if recipe == "sfi" else None  # budget 44
    prompts = [prompt(30), prompt(90, 3), prompt(61, 7)]
    new = [30, 18, 25]  # rows finish at different steps: the static batch shrinks
    eager, rt_eager, ev_eager, mem_eager = run(lm, prompts, new, cfg, static=False)
    fixed, rt_fixed, ev_fixed, mem_fixed = run(lm, prompts, new, cfg, static=True)
    assert fixed == eager
    if cfg is not None:
        kinds = [k for e in ev_fixed if hasattr(e, "kinds") for k in e.kinds]
        assert kinds.count("slow") >= 6 and kinds.count("fast") >= 20 and "full" in kinds
        assert [k for e in ev_eager if hasattr(e, "kinds") for k in e.kinds] == kinds
        for row in range(3):
            assert rt_fixed.stats[row].slow_steps == rt_eager.stats[row].slow_steps
            n = rt_fixed.compact_len[row]
            # the static step's fused refresh picked the same rows as the op-by-op Selector (the values
            # differ only by the rounding of the two attention paths; a different pick would be a different key)
            torch.testing.assert_close(mem_fixed.k[:, row, :, :n], mem_eager.k[:, row, :, :n], rtol=1e-4, atol=1e-5)


def test_split_buckets():
    assert [_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 200, 257)] == [1, 2, 4, 8, 8, 16, 64, 96, 224, 288]


def test_refresh_groups_divide_the_layers():
    from sfi.refresh import group_size

    assert [group_size(n) for n in (1, 2, 6, 28, 30, 36, 31)] == [1, 1, 2, 7, 10, 12, 1]
