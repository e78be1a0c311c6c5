"""SFI decoding invariants on tiny random checkpoints: a covering budget equals dense, rows are
independent of their batch, reports add up."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sfi.config import SfiConfig
from sfi.engine.decoder import Request, generate
from sfi.method.boundary import FixedPeriod, NoBoundary
from sfi.method.runtime import SfiRuntime
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker

import tiny


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def lm(request, tmp_path_factory):
    return tiny.load_for_sfi(tmp_path_factory.mktemp(request.param), request.param, seed=11)


def prompt(n, offset=0):
    ids = tiny.tokenizer()(tiny.TEXT * 4)["input_ids"]
    return ids[offset:offset + n]


def decode(lm, prompts, new, cfg: SfiConfig | None, boundary=None, chunk=64):
    reqs = [Request(p, RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), n))
            for p, n in zip(prompts, new, strict=True)]
    runtime = None
    if cfg is not None:
        runtime = SfiRuntime(cfg, boundary or FixedPeriod(5), len(reqs), lm.args.kv_bytes_per_token(lm.model.dtype))
    events = list(generate(lm.model, reqs, prefill_chunk=chunk, runtime=runtime))
    return [r.stopper.token_ids for r in reqs], runtime, events


def test_covering_budget_through_the_sparse_path_equals_dense(lm):
    """k_head covers every candidate, so fast steps attend to everything via memory + recent span."""
    cfg = SfiConfig(sink=4, k_head=1000, recent=16, dense_within_budget=False)
    prompts = [prompt(150), prompt(97, 5)]
    dense, _, _ = decode(lm, prompts, [40, 40], None)
    ours, runtime, _ = decode(lm, prompts, [40, 40], cfg)
    assert ours == dense
    for row in range(2):
        report = runtime.report(row)
        assert report["fast_steps"] > 20 and report["slow_steps"] >= 5  # the sparse path really ran
        assert report["attended_fraction"] == 1.0


def test_dense_layers(lm):
    """Every layer dense on fast steps too: the tokens are dense's whatever the budget. One dense layer of two:
    the attended fraction is halfway between the sparse one and 1."""
    prompts = [prompt(120), prompt(97, 5)]
    dense, _, _ = decode(lm, prompts, [16, 16], None)
    base = SfiConfig(sink=4, k_head=16, recent=8)
    ours, runtime, _ = decode(lm, prompts, [16, 16], dataclasses.replace(base, dense_layers=lm.args.n_layers))
    assert ours == dense and runtime.report(0)["fast_steps"] > 10
    _, sparse, _ = decode(lm, prompts, [16, 16], base)
    _, half, _ = decode(lm, prompts, [16, 16], dataclasses.replace(base, dense_layers=1))
    assert lm.args.n_layers == 2
    for row in range(2):
        s, h = sparse.stats[row].fractions[1:], half.stats[row].fractions[1:]
        assert h == pytest.approx([(1 + f) / 2 if f < 1 else 1.0 for f in s])


def test_small_budget_attends_less_and_stays_close(lm):
    cfg = SfiConfig(sink=4, k_head=24, recent=16)
    prompts = [prompt(300)]
    ours, runtime, _ = decode(lm, prompts, [30], cfg)
    report = runtime.report(0)
    assert report["attended_fraction"] < 0.5
    assert report["kv_bytes_read"] < report["kv_bytes_dense"]
    assert len(ours[0]) == 30


def test_rows_firing_at_different_steps_match_decoding_alone(lm):
    """Rows cross the budget (and so take their first slow step) at different steps; each row's
    tokens equal its tokens decoded alone."""
    cfg = SfiConfig(sink=4, k_head=40, recent=16)  # budget 60
    prompts = [prompt(30), prompt(55, 3), prompt(120, 7), prompt(8, 1)]
    new = [40, 25, 33, 60]
    batched, runtime, _ = decode(lm, prompts, new, cfg, FixedPeriod(7))
    slow_steps = [runtime.stats[r].slow_steps for r in range(4)]
    assert len({tuple(s) for s in slow_steps}) == 4  # four different refresh schedules
    for row in range(4):
        alone, _, _ = decode(lm, [prompts[row]], [new[row]], cfg, FixedPeriod(7))
        assert alone[0] == batched[row], row


def test_reports_add_up(lm):
    cfg = SfiConfig(sink=4, k_head=24, recent=16)
    prompts = [prompt(200), prompt(40)]
    new = [37, 20]
    tokens, runtime, events = decode(lm, prompts, new, cfg, FixedPeriod(6))
    bpt = lm.args.kv_bytes_per_token(lm.model.dtype)
    for row in range(2):
        r, s = runtime.report(row), runtime.stats[row]
        assert r["slow_steps"] + r["fast_steps"] == len(tokens[row])
        plen, n = len(prompts[row]), len(tokens[row])
        assert r["kv_bytes_dense"] == bpt * (n * plen + n * (n - 1) // 2)
        assert r["kv_bytes_read"] == bpt * s.attended
        gaps = [b - a for a, b in zip(s.slow_steps, s.slow_steps[1:], strict=False)]
        assert r["mean_interval"] == pytest.approx(sum(gaps) / len(gaps), abs=0.01)
    kinds = [k for e in events if type(e).__name__ == "StepDone" for k in e.kinds]
    assert {"slow", "fast"} <= set(kinds)


def test_long_prompt_bootstrap_selects_within_budget(lm):
    cfg = SfiConfig(sink=4, k_head=32, recent=16)
    _, runtime, _ = decode(lm, [prompt(250)], [3], cfg, NoBoundary())
    assert runtime.compact_len[0] == 4 + 32 and runtime.recent_start[0] == 250 - 16
    s = runtime.stats[0]
    assert s.slow == 1 and s.fast == 2  # the prefill (bootstrap) then fast steps only


def test_topk_selector_and_ablations_run(lm):
    base = SfiConfig(sink=4, k_head=24, recent=16)
    for change in ({"selector": "topk"}, {"use_prior": False}, {"use_nms": False}, {"use_exclusivity": False},
                   {"use_power_mean": False}):
        tokens, runtime, _ = decode(lm, [prompt(200)], [12], dataclasses.replace(base, **change))
        assert len(tokens[0]) == 12 and runtime.report(0)["attended_fraction"] < 1


def test_memory_holds_the_selected_rows(lm):
    """After a refresh, the compact memory holds exactly cache rows (sink first), per layer and head."""
    cfg = SfiConfig(sink=4, k_head=16, recent=8)
    reqs = [Request(prompt(120), RowSampler(SamplingParams(), 0), StopChecker(lm.tokenizer, (), (), 2))]
    runtime = SfiRuntime(cfg, NoBoundary(), 1, 1)
    cache = lm.model.new_cache(1, 130)
    list(generate(lm.model, reqs, prefill_chunk=50, cache=cache, runtime=runtime))
    mem = runtime.memory
    n = runtime.compact_len[0]
    for layer in range(lm.args.n_layers):
        torch.testing.assert_close(mem.k[layer, 0, :, :4], cache.k[layer, 0, :, :4])
        for h in range(lm.args.n_kv_heads):
            keys = cache.k[layer, 0, h, :112]  # the domain is [4, 120 - 8)
            for row in mem.k[layer, 0, h, 4:n]:
                assert (keys == row).all(-1).any()
