"""When a sequence takes a slow step: the sentence-boundary detector and its ablation alternatives.

The ender set is derived from any tokenizer's vocabulary (never hard-coded ids): a token is an ender
if its text, stripped of whitespace, is made only of sentence-ending marks, optionally followed by
closing quotes or brackets. Policies are small frozen dataclasses with one method; each sequence's
state is a separate `BoundaryState` the caller owns.

**ours**, beyond the spec: a token only starts a sentence if it begins with whitespace, follows a
whitespace-only token, or follows an ender that needs no space after it (CJK marks, or an ender token
whose text already ends in whitespace such as ".\n"). Byte-level vocabularies split "3.50" and "e.g."
into separate "." tokens, and without this rule the digit or letter after them would fire.

Step numbering: the prefill (with its bootstrap refresh) is step 0; decode step i feeds the token
sampled at step i - 1. `observe(state, token)` is called with the token sampled at step i - 1 and says
whether step i is slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from ..config import SfiConfig

ENDER_MARKS = frozenset(".?!。？！")
CJK_MARKS = frozenset("。？！")
CLOSERS = frozenset("\"')]}»”’」』】")


def is_ender_text(text: str) -> bool:
    body = text.strip()
    if not body:
        return False
    end = len(body)
    while end > 0 and body[end - 1] in CLOSERS:
        end -= 1
    marks = body[:end]
    return bool(marks) and all(ch in ENDER_MARKS for ch in marks)


@dataclass(frozen=True)
class Vocabulary:
    """Token classes the detector needs, computed once per tokenizer."""

    enders: frozenset[int]
    blanks: frozenset[int]  # whitespace-only tokens (newlines included): never a sentence start
    spaced: frozenset[int]  # tokens whose text begins with whitespace
    open_enders: frozenset[int]  # enders after which the next sentence needs no leading space
    word: int = -1  # a token that starts a sentence after an ender (the lowest spaced id that is no mark or blank)


def _decoded_vocab(tokenizer: Any) -> list[tuple[int, str]]:
    size = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0))
    special = set(getattr(tokenizer, "all_special_ids", []))
    return [(i, tokenizer.decode([i])) for i in range(size) if i not in special]


@lru_cache(maxsize=8)
def _vocabulary_for(tokenizer: Any) -> Vocabulary:
    enders, blanks, spaced, open_enders = set(), set(), set(), set()
    for token_id, text in _decoded_vocab(tokenizer):
        if is_ender_text(text):
            enders.add(token_id)
            if text[-1].isspace() or any(ch in CJK_MARKS for ch in text):
                open_enders.add(token_id)
        elif text and not text.strip():
            blanks.add(token_id)
        if text[:1].isspace():
            spaced.add(token_id)
    words = spaced - enders - blanks
    return Vocabulary(frozenset(enders), frozenset(blanks), frozenset(spaced), frozenset(open_enders),
                      min(words) if words else -1)


def vocabulary(tokenizer: Any) -> Vocabulary:
    return _vocabulary_for(tokenizer)


@dataclass
class BoundaryState:
    step: int = 0  # the step about to be decided (the prefill was step 0)
    last_slow: int = 0  # the last slow step (the bootstrap counts)
    armed: bool = False  # an ender was seen; waiting for the next sentence's first token
    open: bool = False  # armed, and the next token needs no leading whitespace to start a sentence
    cooldown: int = 0


class Boundary(Protocol):
    """A slow-step detector: `observe` takes each row's token in turn; `guess` is its likeliest answer for a token
    not yet known (the pipelined decoder plans a step before its inputs' tokens are read). `guess` may change the
    state it is given (callers pass a copy) but never the detector itself."""

    def observe(self, state: BoundaryState, token: int) -> bool: ...

    def guess(self, state: BoundaryState) -> bool: ...


def _advance(state: BoundaryState, slow: bool) -> bool:
    state.step += 1
    if slow:
        state.last_slow = state.step
    return slow


@dataclass(frozen=True)
class SentenceBoundary:
    """Slow step on the first token of a new sentence; min_gap apart; forced after max_interval."""

    vocab: Vocabulary
    cooldown: int = 2
    min_gap: int = 16
    max_interval: int = 64
    early_step: int = 0  # a slow step forced at this step as well (0: none); see SfiConfig.early_slow_step

    def observe(self, state: BoundaryState, token: int) -> bool:
        step = state.step + 1
        v = self.vocab
        is_ender, is_blank = token in v.enders, token in v.blanks
        fire = False
        if state.armed and is_blank:
            state.open = True
        elif state.armed and not is_ender:
            if state.open or token in v.spaced:
                fire = step - state.last_slow >= self.min_gap  # dropped when too close to the last one
            state.armed = False  # consumed whether it fired, was dropped, or was no sentence start ("3.5")
        if state.cooldown == 0 and is_ender:
            state.armed, state.open, state.cooldown = True, token in v.open_enders, self.cooldown
        elif state.cooldown > 0:
            state.cooldown -= 1
        return _advance(state, fire or step == self.early_step or step - state.last_slow >= self.max_interval)

    def guess(self, state: BoundaryState) -> bool:
        """After an ender, a word that starts a sentence; otherwise a token that neither ends nor starts one."""
        return self.observe(state, self.vocab.word if state.armed else -1)


@dataclass(frozen=True)
class FixedPeriod:
    """Ablation: a slow step every `period` steps, whatever the text."""

    period: int = 24

    def observe(self, state: BoundaryState, token: int) -> bool:
        return _advance(state, state.step + 1 - state.last_slow >= self.period)

    def guess(self, state: BoundaryState) -> bool:
        return self.observe(state, -1)  # exact: the tokens do not matter


@dataclass(frozen=True)
class NoBoundary:
    """Ablation: only the bootstrap selection after prefill; never refreshed."""

    def observe(self, state: BoundaryState, token: int) -> bool:
        return _advance(state, False)

    def guess(self, state: BoundaryState) -> bool:
        return _advance(state, False)


def make_boundary(cfg: SfiConfig, tokenizer: Any) -> Boundary:
    """The recipe's detector (sfi.method.boundary): sentence, fixed or none."""
    if cfg.boundary == "sentence":
        return SentenceBoundary(vocabulary(tokenizer), cfg.cooldown, cfg.min_gap, cfg.max_interval,
                                cfg.early_slow_step)
    if cfg.boundary == "fixed":
        return FixedPeriod(cfg.fixed_period)
    return NoBoundary()
