"""Our decoder against transformers on tiny random checkpoints of each family, and its own invariants."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfi.loader import load_model
from sfi.model import DecodeStep, PrefillStep

import tiny

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
CASES = {
    "qwen3": ("qwen3", {}),
    "qwen2": ("qwen2", {}),
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "qwen3-rope-yarn": ("qwen3", {"rope_parameters": YARN}),
    "llama-untied-mha": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    folder = tiny.make_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    ours = load_model(str(folder), device="cpu", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def prompt_ids(n: int) -> torch.Tensor:
    ids = tiny.tokenizer()(tiny.TEXT * 4)["input_ids"]
    return torch.tensor(ids[:n])


def test_prefill_logits_match_transformers(checkpoint):
    ours, theirs = checkpoint
    ids = prompt_ids(300)
    with torch.no_grad():
        ref = theirs(ids[None]).logits[0]
    cache = ours.model.new_cache(1, 320)
    got = ours.model.prefill(ids, cache, PrefillStep(0, 0, len(ids)), all_logits=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_unchunked(checkpoint):
    ours, _ = checkpoint
    ids = prompt_ids(211)
    whole = ours.model.new_cache(1, 256)
    ref = ours.model.prefill(ids, whole, PrefillStep(0, 0, len(ids)), all_logits=True)
    chunked = ours.model.new_cache(1, 256)
    pieces = []
    for start in range(0, len(ids), 37):  # 37 does not divide 211: a partial last chunk
        piece = ids[start:start + 37]
        pieces.append(ours.model.prefill(piece, chunked, PrefillStep(0, start, len(piece)), all_logits=True))
    torch.testing.assert_close(torch.cat(pieces), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.k[:, 0, :, :211], whole.k[:, 0, :, :211], atol=1e-5, rtol=1e-5)


def test_ragged_batched_decode_matches_transformers(checkpoint):
    """Three rows of different lengths decoded in one batch: each row's logits equal a full forward."""
    ours, theirs = checkpoint
    lengths = [50, 123, 7]
    ids = prompt_ids(200)
    cache = ours.model.new_cache(3, 140)
    for row, n in enumerate(lengths):
        ours.model.prefill(ids[:n], cache, PrefillStep(row, 0, n))
    rows = torch.arange(3)
    positions = torch.tensor(lengths)
    step = DecodeStep.dense(rows, positions)
    logits = ours.model.decode(ids[positions], cache, step)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            ref = theirs(ids[: n + 1][None]).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
    # A subset of rows (as when others have finished) reads its own cache rows only.
    sub = DecodeStep.dense(torch.tensor([2, 0]), torch.tensor([8, 51]))
    cache2 = ours.model.new_cache(3, 140)
    for row, n in enumerate(lengths):
        ours.model.prefill(ids[: n + 1], cache2, PrefillStep(row, 0, n + 1))
    got = ours.model.decode(ids[[8, 51]], cache2, sub)
    for i, n in enumerate([8, 51]):
        with torch.no_grad():
            ref = theirs(ids[: n + 1][None]).logits[0, -1]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_close_to_float32(tmp_path):
    folder = tiny.make_checkpoint(tmp_path / "q3", "qwen3")
    f32 = load_model(str(folder), device="cpu", dtype="float32")
    bf16 = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    ids = prompt_ids(64)
    a = f32.model.prefill(ids, f32.model.new_cache(1, 64), PrefillStep(0, 0, 64))
    b = bf16.model.prefill(ids, bf16.model.new_cache(1, 64), PrefillStep(0, 0, 64))
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_layer_major_prefill_equals_chunked(tmp_path):
    """The GPU prefill (layer by layer, one causal attention call per layer) gives the chunked prefill's
    logits, cache and bootstrap captures."""
    from sfi.engine.decoder import prefill_row
    from sfi.loader import load_model
    from sfi.method.runtime import Capture

    lm = load_model(str(tiny.make_checkpoint(tmp_path, "qwen3", seed=4)), device="cpu")
    ids = torch.tensor(tiny.tokenizer()(tiny.TEXT * 2)["input_ids"][:150])
    results = []
    for layer_major in (False, True):
        cache = lm.model.new_cache(2, 160)
        captured = []
        capture = Capture(16, 1, 0, 150)
        refresh = lambda layer, row, z, out=captured: out.append((layer, row, z))  # noqa: E731
        if layer_major:
            logits = lm.model.prefill_layer_major(ids, cache, 1, 64, capture, refresh)
        else:
            logits = prefill_row(lm.model, cache, 1, ids, 64, capture, refresh)
        results.append((logits, cache.k[:, 1, :, :150], cache.v[:, 1, :, :150], captured))
    (l0, k0, v0, c0), (l1, k1, v1, c1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
    assert [(a, b) for a, b, _ in c1] == [(a, b) for a, b, _ in c0]
    # The bootstrap refreshes groups of layers; together they are every layer, once, in order.
    assert [i for a, _, _ in c0 for i in range(lm.args.n_layers)[a]] == list(range(lm.args.n_layers))
    for (_, _, z1), (_, _, z0) in zip(c1, c0, strict=True):
        torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-4)


def test_bootstrap_layer_groups_do_not_change_captures(tmp_path, monkeypatch):
    """However many layers one bootstrap pass takes (bounded by BOOTSTRAP_BYTES), the logits are the same."""
    from sfi import attention
    from sfi.engine.decoder import prefill_row
    from sfi.loader import load_model
    from sfi.method.runtime import Capture

    lm = load_model(str(tiny.make_checkpoint(tmp_path, "qwen3", seed=5)), device="cpu")
    ids = torch.tensor(tiny.tokenizer()(tiny.TEXT * 2)["input_ids"][:120])
    runs = []
    for budget in (attention.BOOTSTRAP_BYTES, 1):  # every layer in one pass; one layer per pass
        monkeypatch.setattr(attention, "BOOTSTRAP_BYTES", budget)
        captured = []
        prefill_row(lm.model, lm.model.new_cache(1, 128), 0, ids, 48, Capture(16, 0, 4, 100),
                    lambda layers, row, z, out=captured: out.append((layers, z)))
        runs.append(captured)
    whole, single = runs
    assert len(whole) == 1 and len(single) == lm.args.n_layers
    torch.testing.assert_close(torch.cat([z for _, z in single]), whole[0][1], rtol=0, atol=0)


def _attention_with_lse(q, keys, values, causal, scale):
    """Reference for cuDNN's op: grouped heads expanded, scores in float32, causal aligned to the top left."""
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1).float(), values.repeat_interleave(g, 1).float()
    scores = q.float() @ k.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return ((scores - lse).exp() @ v).to(q.dtype), lse


@pytest.mark.parametrize("t,start", [(7, 43), (32, 1), (40, 200)])
def test_split_chunk_attention_merges_two_passes_into_the_bottom_right_mask(monkeypatch, t, start):
    """The chunk's attention as the keys before it (no mask) plus its own keys (causal, square), merged by
    log-sum-exp: equal to one bottom-right causal pass. cuDNN stood in for by a reference with the op's contract
    (a GPU test checks cuDNN itself)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from sfi import model as model_module

    monkeypatch.setattr(model_module, "_cudnn_with_lse", _attention_with_lse)
    g = torch.Generator().manual_seed(t)
    q = torch.randn(1, 8, t, 16, generator=g)
    k, v = (torch.randn(1, 2, start + t + 5, 16, generator=g)[:, :, :start + t] for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, start + t), scale=0.25,
                                          enable_gqa=True)
    torch.testing.assert_close(model_module._split_chunk_attention(q, k, v, 0.25), want, rtol=1e-5, atol=1e-5)


def _bottom_right(q, keys, values, scale):
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), scale=scale, enable_gqa=True,
                                          attn_mask=causal_lower_right(q.shape[2], keys.shape[2])).to(q.dtype)


@pytest.mark.parametrize("t,start", [(16, 0), (21, 0), (5, 0), (16, 32), (37, 16), (40, 13), (3, 200), (8, 8)])
def test_gpu_prefill_attention_puts_block_multiples_on_cudnn_and_the_rest_on_flash(monkeypatch, t, start):
    """The GPU's split of a chunk (here CUDNN_BLOCK 8, both ops stood in for by references with their contracts):
    the same as one bottom-right causal pass for every length and start, and cuDNN sees only block-multiple shapes
    (a plan per shape is built once and reused)."""
    from sfi import model as model_module

    shapes = []

    def cudnn(q, keys, values, causal, scale):
        shapes.append((q.shape[2], keys.shape[2], causal))
        return _attention_with_lse(q, keys, values, causal, scale)

    monkeypatch.setattr(model_module, "_cudnn_with_lse", cudnn)
    monkeypatch.setattr(model_module, "_flash_grouped", _bottom_right)
    monkeypatch.setattr(model_module, "_chunk_path", lambda *a: "split")
    monkeypatch.setattr(model_module, "CUDNN_BLOCK", 8)
    g = torch.Generator().manual_seed(t * 1000 + start)
    q = torch.randn(1, 6, t, 16, generator=g)
    k, v = (torch.randn(1, 2, start + t + 3, 16, generator=g)[:, :, :start + t] for _ in range(2))
    got = model_module._gpu_prefill_attention(q, k, v, 0.25)
    torch.testing.assert_close(got, _bottom_right(q, k, v, 0.25), rtol=1e-5, atol=1e-5)
    assert all(a % 8 == 0 and b % 8 == 0 for a, b, _ in shapes)
    assert bool(shapes) == (t >= 8 and start % 8 == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention is the GPU's")
@pytest.mark.parametrize("t,start", [(600, 1337), (2048, 30720), (2500, 0), (3000, 1024), (512, 8)])
def test_gpu_prefill_attention_with_cudnn_and_flash(t, start):
    """The GPU's prefill attention (cuDNN's block multiples, merged where a start precedes them, the rest through
    the flash op) against the expanded bottom-right causal SDPA in float32; bf16, head size 128, keys a slice of a
    longer cache row; and this GPU takes the cuDNN path."""
    from sfi import model as model_module

    dev = torch.device("cuda")
    assert model_module._chunk_path(dev, torch.bfloat16, 128) == "split"
    g = torch.Generator(device=dev).manual_seed(t)
    q = torch.randn(1, 32, t, 128, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 8, start + t + 64, 128, device=dev, dtype=torch.bfloat16, generator=g)[:, :, :start + t]
            for _ in range(2))
    want = _bottom_right(q.float(), k.float(), v.float(), 128 ** -0.5)
    got = model_module.prefill_attention(q, k, v, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
