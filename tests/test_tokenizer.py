"""Our tokenizer and config reading (no transformers at run time) against transformers' AutoTokenizer and AutoConfig:
the real Qwen3 and SmolLM2 tokenizers, the tiny test tokenizer, and every architecture's config."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from sfi.default_model import default_model_dir
from sfi.errors import ModelError
from sfi.loader import read_config
from sfi.method.boundary import vocabulary
from sfi.model import ModelArgs
from sfi.qwen3_tokenizer import qwen3_tokenizer_dir
from sfi.tokenizer import Tokenizer
from sfi.tools.bench import hf_config

import tiny

TEXTS = [tiny.TEXT, "Hello world. It's 3.50, e.g. naïve café; 日本語の文。Ein Satz!", " leading space", "",
         "a\n\nb\t c  ", "<|im_start|>user\nHi<|im_end|>\n", "don 't , he 's ."]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é 日本"},
            {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nHello"}, {"role": "user", "content": "Again"}]


@pytest.fixture(scope="module", params=["qwen3", "smollm2", "tiny"])
def folder(request, tmp_path_factory):
    if request.param == "qwen3":
        return qwen3_tokenizer_dir()
    if request.param == "smollm2":
        return default_model_dir()
    out = tmp_path_factory.mktemp("tok")
    tiny.tokenizer().save_pretrained(out)
    return out


def test_same_ids_text_and_specials_as_transformers(folder):
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for special in (True, False):
        want = hf(TEXTS, add_special_tokens=special)["input_ids"]
        assert ours(TEXTS, add_special_tokens=special)["input_ids"] == want
        assert [ours(t, add_special_tokens=special)["input_ids"] for t in TEXTS] == want
    ids = hf(" ".join(TEXTS))["input_ids"] + [hf.eos_token_id] + hf("tail")["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert len(ours) == len(hf) and ours.vocab_size == hf.vocab_size
    assert sorted(ours.all_special_ids) == sorted(hf.all_special_ids)
    assert (ours.eos_token, ours.eos_token_id) == (hf.eos_token, hf.eos_token_id)
    assert vocabulary(ours) == vocabulary(hf)  # the boundary detector's token classes


def test_same_chat_template_rendering_as_transformers(folder):
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert bool(ours.chat_template) == bool(hf.chat_template)
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        for generation in (True, False):
            want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation, **kwargs)
            assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation,
                                            **kwargs) == want
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look up é",
                                               "parameters": {"type": "object", "properties": {}}}}]
    want = hf.apply_chat_template(MESSAGES[:2], tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES[:2], tools=tools, tokenize=False, add_generation_prompt=True) == want


def test_template_errors_raise_for_the_job():
    ours = Tokenizer(qwen3_tokenizer_dir())
    with pytest.raises(ValueError, match="tools must be a list"):
        ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, tools="not a list")
    with pytest.raises(ValueError, match="no chat template"):
        _without_template(ours).apply_chat_template([])


def _without_template(tok: Tokenizer) -> Tokenizer:
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama", "mistral"])
def test_config_read_as_transformers_reads_it(family, tmp_path):
    tiny.config(family).save_pretrained(tmp_path)
    ours, theirs = read_config(tmp_path), AutoConfig.from_pretrained(tmp_path)
    assert ModelArgs.from_hf_config(ours) == ModelArgs.from_hf_config(theirs)


@pytest.mark.parametrize("preset", ["qwen3-4b"])
def test_preset_and_default_model_configs_read_as_transformers_reads_them(preset, tmp_path):
    hf_config(preset, 131072).save_pretrained(tmp_path)  # YaRN rope parameters past 32k
    for folder in (tmp_path, default_model_dir()):
        assert ModelArgs.from_hf_config(read_config(folder)) == \
            ModelArgs.from_hf_config(AutoConfig.from_pretrained(folder))


def test_a_config_missing_a_field_names_it(tmp_path):
    tiny.config("llama").save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    del fields["rms_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ModelError, match="rms_norm_eps"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_config(tmp_path)


def test_a_folder_with_only_slow_tokenizer_files_still_loads(tmp_path):
    """No tokenizer.json, only vocab.json + merges.txt: transformers converts them (the one path that imports it)."""
    from sfi.loader import load_tokenizer

    tiny.tokenizer().backend_tokenizer.model.save(str(tmp_path))  # vocab.json, merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "eos_token": "<|im_end|>"}))
    tiny.config("qwen3").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert not isinstance(tok, Tokenizer)
    assert tok("Hello world. The fox.")["input_ids"] == tiny.tokenizer()("Hello world. The fox.")["input_ids"]
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(ModelError, match="tokenizer.json does not exist"):
        load_tokenizer(str(tmp_path))
