"""Tiny random checkpoints (Qwen3, Qwen2, Llama, Mistral) with a real byte-level BPE tokenizer, for tests.

Written to disk exactly as a Hugging Face checkpoint would be (config.json, model.safetensors,
tokenizer files, chat template), so the tests exercise the real loader.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "It was the best of times, it was the worst of times. Call me Ishmael. Mr. Smith paid 3.50 dollars! "
    "Is it raining? Yes, it is. The secret passkey is 48213; remember it. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Quotes: \"Hello,\" she said. (Brackets.) [More.] Done.\n\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=4)
def tokenizer(text: str = TEXT):
    """A byte-level BPE tokenizer (vocabulary 400) trained on `text`, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    vocab = len(tokenizer())
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, eos_token_id=tokenizer().eos_token_id, pad_token_id=0, bos_token_id=None)
    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[family]
    if family == "qwen3":
        common.update(head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        common.update(sliding_window=None)
    common.update(overrides)
    return cls(**common)


def make_checkpoint(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Write a random `family` checkpoint to `folder` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **overrides), torch_dtype=torch.float32)
    with torch.no_grad():
        # Random init leaves q/k biases at zero and norms at one; perturb them so they are really tested.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    return folder


def load_for_sfi(tmp_root: Path, family: str, seed: int, **overrides):
    """A tiny checkpoint loaded on CPU for SFI tests: Qwen3 gets 4 KV heads so the Selector's cross-head
    exclusivity runs; Llama keeps 2 (exclusivity skipped)."""
    from sfi.loader import load_model

    overrides = ({"num_key_value_heads": 4} if family == "qwen3" else {}) | overrides
    return load_model(str(make_checkpoint(tmp_root, family, seed=seed, **overrides)), device="cpu")


class ThirdIds:
    """A boundary policy whose slow steps follow the tokens: any id divisible by 3, and at least every 9th step. Its
    `guess` is a token that is none, so a pipelined decoder's guesses miss a third of them."""

    def observe(self, state, token: int) -> bool:
        state.step += 1
        slow = token % 3 == 0 or state.step - state.last_slow >= 9
        if slow:
            state.last_slow = state.step
        return slow

    def guess(self, state) -> bool:
        return self.observe(state, 1)
