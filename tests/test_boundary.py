"""The boundary detector on hand-written token streams: abbreviations, decimals, newlines, quotes, CJK."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoTokenizer

from sfi.config import SfiConfig
from sfi.method.boundary import BoundaryState, FixedPeriod, NoBoundary, SentenceBoundary, is_ender_text, vocabulary
from sfi.method.runtime import SfiRuntime


class QwenStyleVocab:
    """A stand-in for Qwen's byte-level vocabulary (not downloadable here): punctuation merged with
    newlines ('.\\n', '.\\n\\n'), full-width CJK marks, and merged abbreviation/number tokens."""

    pieces = ["Hello", " world", ".", ".\n", ".\n\n", "\n", "\n\n", " ", " Next", "Next", " Mr.", " Smith", " 3.",
              "5", " dollars", "?", "!", "。", "？", "你好", "世界", ' "', 'Stop', '."', " She", " did", "...", " and",
              "<|im_end|>"]
    all_special_ids = [len(pieces) - 1]

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def ids(self, *pieces):
        return [self.pieces.index(p) for p in pieces]


def fires(detector, ids):
    """Indices i such that the step feeding ids[i] is slow."""
    state = BoundaryState()
    return [i for i, t in enumerate(ids) if detector.observe(state, t)]


def test_ender_text_rule():
    for text in (".", "?", "!", "。", "？", "...", '."', ".)", " .", ".\n", "!”"):
        assert is_ender_text(text), text
    for text in ("Mr.", "3.", "\n", " ", "a.", ",", ";", ":", ""):
        assert not is_ender_text(text), text


@pytest.fixture(scope="module")
def qwen():
    v = QwenStyleVocab()
    return v, SentenceBoundary(vocabulary(v), cooldown=2, min_gap=0, max_interval=10**6)


def test_qwen_style_streams(qwen):
    v, det = qwen
    assert fires(det, v.ids("Hello", " world", ".", " Next")) == [3]
    assert fires(det, v.ids("Hello", ".\n", "Next")) == [2]  # the merged ender opens the next sentence
    assert fires(det, v.ids("Hello", ".\n\n", "\n", "Next")) == [3]  # newline tokens are never a start
    assert fires(det, v.ids(" Mr.", " Smith", " world")) == []  # "Mr." is not an ender
    assert fires(det, v.ids(" 3.", "5", " dollars")) == []
    assert fires(det, v.ids("你好", "。", "世界")) == [2]  # CJK sentences take no space
    assert fires(det, v.ids("你好", "？", "世界")) == [2]
    assert fires(det, v.ids(' "', "Stop", '."', " She", " did")) == [3]
    assert fires(det, v.ids("Hello", "?", "!", " Next")) == [3]  # "?!" is one boundary


def test_special_tokens_are_not_enders(qwen):
    v, _ = qwen
    assert v.pieces.index("<|im_end|>") not in vocabulary(v).enders


def test_cooldown_ignores_an_ender_right_after_another(qwen):
    v, det = qwen
    # "." "Next" fires; the "." one token later is inside the cooldown, so " world" does not fire.
    assert fires(det, v.ids("Hello", ".", " Next", ".", " world")) == [2]


def test_min_gap_drops_a_fire_and_consumes_it(qwen):
    v, _ = qwen
    det = SentenceBoundary(vocabulary(v), cooldown=2, min_gap=4, max_interval=10**6)
    # steps 1.. : the fire at index 1 is step 2 < 4 after the bootstrap: dropped, and not retried later
    assert fires(det, v.ids(".", " Next", " world", " world", " world", " world")) == []
    assert fires(det, v.ids("Hello", " world", " world", ".", " Next")) == [4]


def test_max_interval_forces_a_slow_step(qwen):
    v, _ = qwen
    det = SentenceBoundary(vocabulary(v), cooldown=2, min_gap=0, max_interval=5)
    assert fires(det, v.ids(*([" world"] * 12))) == [4, 9]
    # a sentence fire resets the interval
    assert fires(det, v.ids("Hello", ".", " Next", *([" world"] * 6))) == [2, 7]


def test_early_slow_step_fires_once_and_resets_the_interval(qwen):
    v, _ = qwen
    det = SentenceBoundary(vocabulary(v), cooldown=2, min_gap=0, max_interval=5, early_step=1)
    assert fires(det, v.ids(*([" world"] * 12))) == [0, 5, 10]  # index 0 feeds step 1


def test_fixed_period_and_disabled():
    assert fires(FixedPeriod(3), list(range(10))) == [2, 5, 8]
    assert fires(NoBoundary(), list(range(50))) == []


@pytest.mark.slow
def test_llama_tokenizer_streams(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    det = SentenceBoundary(vocabulary(tok), cooldown=2, min_gap=0, max_interval=10**6)

    def starts(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [tok.decode(ids[i:]) for i in fires(det, ids)]

    assert starts("It rained. The end") == [" The end"]
    assert starts("He paid 3.50 dollars for it") == []  # "3" "." "5": no space, no sentence
    assert starts("Use e.g. this one") == []  # the second "." falls in the cooldown
    assert starts("Done.\n\nNext part") == ["Next part"]
    assert starts('He said "Stop." She did') == [" She did"]
    assert starts("Really?! Yes") == [" Yes"]
    assert starts("Wait... and then") == [" and then"]  # an ellipsis is an ender: a known false start


def test_guess_is_the_likeliest_answer_and_changes_nothing(qwen):
    """`guess` (the pipelined decoder plans a step before its token is known): after an ender, the next token is
    taken to start a sentence; otherwise to neither end nor start one. The runtime guesses on a copy."""
    v, det = qwen
    rt = SfiRuntime(SfiConfig(sink=4, k_head=16, recent=8).for_context(512),
                    SentenceBoundary(det.vocab, cooldown=2, min_gap=2, max_interval=8), 1, 64)
    assert v.pieces[det.vocab.word][0].isspace() and det.vocab.word not in det.vocab.enders
    tokens = [" world", ".", " Next", " and", ".", "5", " dollars", " did", " She", " Smith", " world"]
    guesses, answers = [], []
    for token in tokens:
        before = dataclasses.replace(rt.state[0])
        guesses.append(rt.guess_pending(0))
        assert rt.state[0] == before
        rt.observe(0, v.ids(token)[0])
        answers.append(rt.pending[0])
    # " Next" starts a sentence as guessed; "5" after "." does not ("3.5"); the last one is forced (max_interval).
    assert guesses == [False, False, True, False, False, True, False, False, False, False, True]
    assert answers == [False, False, True, False, False, False, False, False, False, False, True]
