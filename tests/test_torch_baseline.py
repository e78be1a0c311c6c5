"""The plain-PyTorch baseline of `sfi bench` decodes what our dense decoder decodes (same weights, same cache)."""

from __future__ import annotations

import pytest
import torch

from sfi.engine.decoder import Request, generate, prefill_row
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker
from sfi.tools.bench import random_model
from sfi.tools.torch_baseline import PlainDecoder, decode_plain


def _ours(model, prompts, new):
    """Our dense decoder's greedy tokens and every step's logits for `prompts`."""
    reqs = [Request(p, RowSampler(SamplingParams(), 0), StopChecker(None, (), (), new)) for p in prompts]
    logits = []
    decode = model.decode
    model.decode = lambda *a: logits.append(decode(*a).clone()) or logits[-1]
    try:
        events = list(generate(model, reqs))
    finally:
        del model.decode
    return [r.stopper.token_ids for r in reqs], logits, events


@pytest.mark.parametrize("qk_norm", [True, False])
def test_plain_decoder_matches_our_dense_decoder(qk_norm):
    torch.manual_seed(0)
    model = random_model("qwen3-tiny", 256, torch.device("cpu"), torch.float32, seed=3)
    if not qk_norm:  # a Llama-style model: no q/k norms
        for block in model.layers:
            block.attention.q_norm = block.attention.k_norm = None
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (40, 40, 40)]
    new = 12
    tokens, logits, _ = _ours(model, prompts, new)
    # The same prompts prefilled into a fresh cache by our prefill; the baseline decodes from there.
    cache = model.new_cache(len(prompts), 40 + new)
    # A fresh cache is uninitialised memory: positions not written yet may hold NaN (they did, once, in a test run).
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    firsts = [int(prefill_row(model, cache, r, torch.tensor(p), 64).argmax()) for r, p in enumerate(prompts)]
    assert firsts == [t[0] for t in tokens]
    dec = PlainDecoder(model, cache, firsts, [40] * 3)
    for step in range(new - 1):
        got = dec.step()
        torch.testing.assert_close(got, logits[step], rtol=1e-4, atol=1e-4)
    assert dec.tokens.tolist() == [t[-1] for t in tokens]


def test_decode_plain_reports_every_rows_tokens_and_a_rate():
    model = random_model("qwen3-tiny", 128, torch.device("cpu"), torch.float32, seed=4)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.args.vocab_size, (30,), generator=gen).tolist() for _ in range(2)]
    tokens, _, _ = _ours(model, prompts, 9)
    cache = model.new_cache(2, 40)
    firsts = [int(prefill_row(model, cache, r, torch.tensor(p), 64).argmax()) for r, p in enumerate(prompts)]
    out = decode_plain(model, cache, firsts, [30, 30], steps=8, warmup_steps=2, keep_tokens=True)
    assert out["tokens"] == tokens and out["timed_steps"] == 6 and out["tok_s"] > 0
