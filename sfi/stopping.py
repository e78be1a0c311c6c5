"""Per-row stop conditions (eos ids, stop strings, a token budget) and the row's completion text.

Stop strings are found incrementally: each step decodes only the tokens since the last complete
character (a few tokens) and searches a short text tail, never the whole completion. The final text
is decoded once, at the end. This module knows nothing of sampling, batching or the model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

# What a decoder yields for bytes that do not (yet) form a complete UTF-8 character: byte-level BPE
# can split one character across tokens, so the newest token's text may end with it.
_REPLACEMENT = "\ufffd"


class StopChecker:
    """Feeds one row's sampled ids and says when the row is finished, and why."""

    def __init__(self, tokenizer: Any, eos_ids: Collection[int], stop: Sequence[str] = (),
                 max_new_tokens: int = 256) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)}")
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stop = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        self.max_new_tokens = max_new_tokens
        # A match ends inside the newest text, so only the last (longest - 1) checked characters can
        # hold its beginning.
        self._keep = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._reason: str | None = None
        self._ended_on_eos = False
        # Incremental text: ids[_prefix:_read] are the tokens whose text was committed last step (kept as
        # left context, since some decoders treat the first token of a sequence specially); ids[_read:]
        # are tokens whose text is not committed yet. _prefix always sits on a character boundary.
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = ""
        self._tail = ""  # the last _keep committed characters
        self._text: str | None = None  # the final text, once finished

    @property
    def finished(self) -> bool:
        return self._reason is not None

    @property
    def finish_reason(self) -> str | None:
        """"stop" (an eos id or a stop string), "length" (max_new_tokens reached), None while running."""
        return self._reason

    @property
    def token_ids(self) -> list[int]:
        """Completion ids fed so far, eos included if the row ended on it."""
        return list(self._ids)

    @property
    def last_token_next(self) -> bool:
        """Whether the next token fed is the last whatever it is (the token budget's)."""
        return len(self._ids) + 1 >= self.max_new_tokens

    def feed(self, token_id: int) -> bool:
        """Take the row's next sampled id; return True once the row is finished."""
        if self.finished:
            raise RuntimeError("feed() on a finished row")
        self._ids.append(token_id)
        if token_id in self.eos_ids:
            self._reason, self._ended_on_eos = "stop", True
        elif self.stop and self._stop_string_seen():
            self._reason = "stop"
        elif len(self._ids) >= self.max_new_tokens:
            self._reason = "length"
        return self.finished

    def text(self) -> str:
        """The completion's text: eos dropped, and cut before the earliest stop string (which is excluded)."""
        if self._text is not None:
            return self._text
        ids = self._ids[:-1] if self._ended_on_eos else self._ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if cuts:
            text = text[:min(cuts)]
        if self.finished:
            self._text = text
        return text

    def _stop_string_seen(self) -> bool:
        """Whether a stop string ends in the text the newest token completed."""
        decode = self.tokenizer.decode
        if self._prefix_text is None:
            self._prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self._ids[self._prefix:], skip_special_tokens=True)
        # Trailing replacement characters may be a character still being spelled out: leave them out so
        # they neither fake a match nor, once completed, get checked as the wrong character. The text
        # before them is complete and final, so it is checked now rather than a token later.
        partial = window.endswith(_REPLACEMENT)
        complete = window.rstrip(_REPLACEMENT) if partial else window
        new = complete[len(self._prefix_text):]
        recent = self._tail + new
        if any(s in recent for s in self.stop):
            return True
        if new and not partial:
            # Commit: the newest tokens become the left context of the next window.
            self._tail = recent[max(0, len(recent) - self._keep):]
            self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
        return False
