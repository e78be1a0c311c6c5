"""A model folder's tokenizer and chat template without importing transformers.

`sfi run` needs four things from a tokenizer: encode texts (in batches), decode ids, the set of special ids, and
the chat template rendered as Hugging Face renders it. The `tokenizers` library (the fast tokenizers' own
backend, which reads `tokenizer.json`) and jinja2 do all four; transformers' Auto classes cost 2 s of every
run's start on a CPU and 6.2-6.5 s on the H200 machine (transformers 5.17 pulls torch.distributed and
scikit-learn in through them; bench/results/2026-12-02-h200-load-profile-e4.json).

What is kept from transformers' behaviour (tests compare both on the Qwen3 and SmolLM2 tokenizers):
- encoding: `tokenizer.json` as is (its post-processor adds any BOS/EOS when special tokens are asked for);
- decoding: special tokens skipped on request, and `clean_up_tokenization_spaces` from tokenizer_config.json;
- special ids: the named special tokens (bos, eos, unk, pad, sep, cls, mask, additional_special_tokens);
- chat templates: `chat_template` from tokenizer_config.json (a string, or named templates: "default"), or
  `chat_template.jinja` beside it, rendered in a sandboxed jinja2 environment with trim_blocks, lstrip_blocks and
  loop controls, a `tojson` filter that keeps non-ASCII text, `raise_exception` and `strftime_now`, the special
  tokens' texts (`bos_token`, `eos_token`, ...) and the caller's keyword arguments (e.g. `enable_thinking`;
  `tools` and `documents` must be lists of JSON objects).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """The folder's tokenizer files are missing or cannot be read."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode, decode and render chat templates for one model folder (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path} does not exist (sfi reads fast tokenizers: tokenizer.json)")
        try:
            self.backend = Backend.from_file(str(path))
            config = json.loads((folder / "tokenizer_config.json").read_text()) \
                if (folder / "tokenizer_config.json").is_file() else {}
        except Exception as e:
            raise TokenizerError(f"the tokenizer files in {folder} cannot be read: {e}") from None
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_tokens: dict[str, str] = {}
        for name in NAMED_SPECIAL:
            text = _token_text(config.get(name))
            if text is not None:
                self.special_tokens[name] = text
        extra = [t for t in (_token_text(v) for v in config.get("additional_special_tokens") or []) if t]
        named = [*self.special_tokens.values(), *extra]
        ids = (self.backend.token_to_id(t) for t in named)
        self.all_special_ids = sorted({i for i in ids if i is not None})
        self.chat_template = _chat_template(folder, config.get("chat_template"))
        for name, text in self.special_tokens.items():
            setattr(self, name, text)
            setattr(self, f"{name}_id", self.backend.token_to_id(text))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list]:
        """{"input_ids": ids of `text`, or a list of them for a list of texts}, as transformers returns them."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encoded = self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = True, add_generation_prompt: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """The chat template rendered over `messages` (a text; its ids with `tokenize`, no special tokens added:
        the template writes its own)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        for name in ("tools", "documents"):  # as transformers checks them: JSON objects, one per tool or document
            value = kwargs.get(name)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise TokenizerError(f"{name} must be a list of JSON objects, got {type(value).__name__}")
        text = _compiled(self.chat_template).render(messages=list(messages),
                                                    add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _chat_template(folder: Path, value: Any) -> str | None:
    """tokenizer_config.json's template (a string, or a list of named ones: "default"), else chat_template.jinja."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if isinstance(value, str) and value:
        return value
    path = folder / "chat_template.jinja"
    return path.read_text() if path.is_file() else None


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
