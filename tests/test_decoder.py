"""The decode loop: greedy tokens equal transformers.generate; rows are independent of their batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfi.engine.decoder import Request, generate
from sfi.loader import load_model
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker

import tiny


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen2"])
def pair(request, tmp_path_factory):
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    return load_model(str(folder), device="cpu"), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def prompts():
    ids = tiny.tokenizer()(tiny.TEXT * 3)["input_ids"]
    return [ids[:n] for n in (17, 160, 64, 5)]


GREEDY = SamplingParams()


def request_for(lm, ids, n, params=GREEDY, seed=0):
    return Request(list(ids), RowSampler(params, seed), StopChecker(lm.tokenizer, (), (), n))


def run(lm, requests, chunk=2048):
    list(generate(lm.model, requests, prefill_chunk=chunk))
    return [r.stopper.token_ids for r in requests]


def test_greedy_tokens_match_transformers_generate(pair):
    lm, hf = pair
    for ids in prompts():
        ours = run(lm, [request_for(lm, ids, 24)])[0]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
        assert ours == ref


def test_ragged_batch_equals_one_by_one_with_chunked_prefill(pair):
    lm, _ = pair
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    make = lambda: [request_for(lm, ids, n, sampled if i % 2 else GREEDY, seed=i)  # noqa: E731
                    for i, (ids, n) in enumerate(zip(prompts(), (20, 7, 13, 30), strict=True))]
    batched = run(lm, make(), chunk=32)
    alone = [run(lm, [r], chunk=1000)[0] for r in make()]
    assert batched == alone
    assert [len(t) for t in batched] == [20, 7, 13, 30]  # rows stop at their own lengths


def test_records_account_for_every_token(pair):
    lm, _ = pair
    requests = [request_for(lm, ids, n) for ids, n in zip(prompts(), (1, 5, 9, 3), strict=True)]
    events = list(generate(lm.model, requests))
    prefills = [e for e in events if type(e).__name__ == "PrefillDone"]
    steps = [e for e in events if type(e).__name__ == "StepDone"]
    assert len(prefills) == 4 and prefills[0].finished  # max_new_tokens 1: done at prefill
    assert sum(len(s.rows) for s in steps) + len(prefills) == 1 + 5 + 9 + 3
    assert sorted(r for s in steps for r in s.finished) == [1, 2, 3]


@pytest.mark.parametrize("length,first,want", [
    (10000, 0, [0, 2048, 4096, 6144, 8192]),
    (10000, 3000, [3000, 4096, 6144, 8192]),  # after a reused prefix: the next chunk starts at a multiple
    (10000, 4096, [4096, 6144, 8192]),
    (8200, 3000, [3000, 4096, 6144]),  # the last chunk would hold 8 < 16 tokens: it joins the one before
    (3100, 3000, [3000]),
])
def test_chunk_starts_align_after_a_reused_prefix(length, first, want):
    from sfi.engine.decoder import chunk_starts

    starts = chunk_starts(length, 2048, 16, first)
    assert starts == want
    ends = starts[1:] + [length]
    assert all(e - s <= 2048 + 15 for s, e in zip(starts, ends, strict=True))  # never much over one chunk
    assert length - starts[-1] >= min(16, length - first)
