"""Model resolution and loading: formats, errors that say what to do, nothing executed from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sfi.errors import ModelError
from sfi.loader import load_model, resolve_model_dir
from sfi.model import PrefillStep

import tiny


def _logits(lm, n=40):
    ids = torch.tensor(tiny.tokenizer()(tiny.TEXT)["input_ids"][:n])
    return lm.model.prefill(ids, lm.model.new_cache(1, n), PrefillStep(0, 0, n))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


def test_sharded_and_bin_checkpoints_load_the_same_weights(qwen2_dir, tmp_path):
    ref = _logits(load_model(str(qwen2_dir), device="cpu"))
    state = load_file(qwen2_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    from safetensors.torch import save_file

    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((qwen2_dir / f).read_bytes())
    torch.testing.assert_close(_logits(load_model(str(sharded), device="cpu")), ref)

    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(state, binary / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (binary / f).write_bytes((qwen2_dir / f).read_bytes())
    torch.testing.assert_close(_logits(load_model(str(binary), device="cpu")), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging is the GPU's copy path")
def test_staged_copies_to_a_gpu_load_the_same_weights(qwen2_dir, monkeypatch):
    from sfi import loader

    plain = load_model(str(qwen2_dir), device="cuda", dtype="float32")
    monkeypatch.setattr(loader, "STAGING_BYTES", 1000)  # pieces that split tensors, and elements, across buffers
    staged = load_model(str(qwen2_dir), device="cuda", dtype="float32")
    loader.load_weights(plain.model, qwen2_dir, staged=False)
    for (name, a), b in zip(plain.model.named_parameters(), staged.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_pickle_with_code_is_refused(qwen2_dir, tmp_path):
    """A .bin whose pickle would run code is rejected by weights_only loading, with the file named."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((qwen2_dir / f).read_bytes())
    with pytest.raises(ModelError, match="pytorch_model.bin refused: this file would run code") as err:
        load_model(str(folder), device="cpu")
    assert "weights_only=False" not in str(err.value)  # torch's hint to turn the check off is not passed on
    (folder / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes()[:100])
    with pytest.raises(ModelError, match="pytorch_model.bin is corrupt or truncated"):
        load_model(str(folder), device="cpu")


def _truncated_copy(src, folder):
    """The checkpoint's config and tokenizer, and the first half of its weights file."""
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def test_truncated_safetensors_names_the_file(qwen2_dir, tmp_path):
    folder = _truncated_copy(qwen2_dir, tmp_path / "broken")
    with pytest.raises(ModelError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_model(str(folder), device="cpu")


def test_unsupported_architecture_lists_supported(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="supported: llama, mistral, qwen2, qwen3"):
        load_model(str(folder), device="cpu")


def test_missing_weights_are_reported(qwen2_dir, tmp_path):
    from safetensors.torch import save_file

    state = load_file(qwen2_dir / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    folder = tmp_path / "partial"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((qwen2_dir / f).read_bytes())
    with pytest.raises(ModelError, match="layers.1.mlp.w13"):
        load_model(str(folder), device="cpu")


def test_repo_id_not_in_cache_fails_fast_with_instructions(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="hf download Qwen/Qwen3-4B"):
        resolve_model_dir("Qwen/Qwen3-4B")


def test_nonexistent_path_is_not_mistaken_for_a_repo_id(tmp_path):
    for spec in ("./no/such/model", str(tmp_path / "missing"), "~/no-such-model-dir"):
        with pytest.raises(ModelError, match=f"model path {spec} does not exist"):
            resolve_model_dir(spec)
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))  # it exists: what it lacks is said


def test_repo_id_resolves_from_a_populated_hf_cache(qwen2_dir, tmp_path, monkeypatch):
    """A repo id found in the local Hugging Face cache layout loads without any network."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-qwen2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in qwen2_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny-qwen2" / "refs").mkdir()
    (cache / "models--acme--tiny-qwen2" / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, not per call
    name, folder = resolve_model_dir("acme/tiny-qwen2")
    assert name == "acme/tiny-qwen2" and folder == snapshot
    torch.testing.assert_close(_logits(load_model("acme/tiny-qwen2", device="cpu")),
                               _logits(load_model(str(qwen2_dir), device="cpu")))


def test_a_run_whose_weights_fail_writes_nothing(qwen2_dir, tmp_path, capsys):
    """The weights load in a thread while prompts are tokenized: a checkpoint that fails to load still fails the
    run before any result (a too-long prompt's error included) reaches the output, and names the file."""
    from sfi_cli.main import main

    folder = _truncated_copy(qwen2_dir, tmp_path / "broken")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "hello there", "max_new_tokens": 2}) + "\n"
                    + json.dumps({"id": "b", "prompt": tiny.TEXT * 20, "max_new_tokens": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", str(jobs), "-m", str(folder), "-o", str(out), "-q"]) != 0
    assert not out.exists() or out.read_text() == ""
    assert "model.safetensors" in capsys.readouterr().err


def test_weights_loaded_in_a_thread_equal_weights_loaded_inline(qwen2_dir):
    inline = load_model(str(qwen2_dir), device="cpu")
    threaded = load_model(str(qwen2_dir), device="cpu", wait=False).wait()
    assert threaded.loading is None and threaded.load_s > 0
    for (name, a), b in zip(inline.model.named_parameters(), threaded.model.parameters(), strict=True):
        assert torch.equal(a, b), name
