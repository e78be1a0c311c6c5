"""Tests for sfi.stopping on a small real byte-level BPE tokenizer: eos, length, stop strings, UTF-8 splits."""

from __future__ import annotations

from typing import Any

import pytest

from sfi.stopping import StopChecker

import tiny

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "It was the best of times, it was the worst of times. We met at the café near the river; the café was "
    "quiet, and the coffee was good. Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. \"Hello,\" she said. Done.\n\n"
    "Every morning the baker opens the shop, sweeps the floor and lights the oven before the sun rises. "
    "Customers arrive early, asking for bread, cakes and strong coffee, and they talk about the weather.\n"
)
@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer(TEXT)


@pytest.fixture(scope="module")
def eos(tok) -> set[int]:
    # Two eos ids, as Qwen3 has.
    return {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def run(checker: StopChecker, ids: list[int]) -> int:
    """Feed `ids` until the checker finishes; return how many were fed."""
    for n, token in enumerate(ids, start=1):
        if checker.feed(token):
            return n
    return len(ids)


def first_stop(tok, ids: list[int], stop: list[str]) -> int | None:
    """Brute force: the fewest tokens whose full decode contains a stop string."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        if any(s in text for s in stop):
            return n
    return None


def pieces(tok, ids: list[int]) -> list[str]:
    """Each token's own text (bytes of a split character show up as U+FFFD)."""
    return [tok.decode([i]) for i in ids]


class CountingTokenizer:
    """Wraps a tokenizer and records the ids passed to every decode call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[int]] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls.append(list(ids))
        return self.inner.decode(ids, **kwargs)


def test_stop_string_spanning_tokens(tok, eos) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = encode(tok, text)
    for stop in ["brown fox", "quick brown fox"]:
        spanned = [p for p in pieces(tok, ids) if p.strip() and p.strip() in stop]
        assert len(spanned) >= 2, f"{stop!r} should span several tokens, pieces {pieces(tok, ids)}"
        checker = StopChecker(tok, eos, [stop], max_new_tokens=100)
        n = run(checker, ids)
        assert n == first_stop(tok, ids, [stop]) < len(ids)
        assert checker.finish_reason == "stop" and checker.finished
        assert checker.text() == text[:text.index(stop)]
        assert checker.token_ids == ids[:n]


def test_stop_string_inside_one_token(tok, eos) -> None:
    text = "We met at the café near the river."
    ids = encode(tok, text)
    # A stop string strictly inside one multi-character token's text.
    token = next(p for p in pieces(tok, ids) if len(p.strip()) >= 4)
    stop = token.strip()[1:-1]
    checker = StopChecker(tok, eos, [stop], max_new_tokens=100)
    n = run(checker, ids)
    assert pieces(tok, ids)[n - 1] == token
    assert checker.finish_reason == "stop"
    assert checker.text() == text[:text.index(stop)]


def test_eos_stops_and_is_excluded(tok, eos) -> None:
    ids = encode(tok, "It was the best of times.")
    for eos_id in sorted(eos):
        checker = StopChecker(tok, eos, max_new_tokens=100)
        assert run(checker, [*ids, eos_id, *ids]) == len(ids) + 1
        assert checker.finish_reason == "stop"
        assert checker.token_ids == [*ids, eos_id]
        assert checker.text() == "It was the best of times."


def test_eos_id_that_is_not_special_is_still_excluded(tok) -> None:
    ids = encode(tok, "the coffee was good")
    checker = StopChecker(tok, {ids[-1]}, max_new_tokens=100)
    assert run(checker, ids) == len(ids)
    assert checker.text() == tok.decode(ids[:-1])


def test_length_limit(tok, eos) -> None:
    ids = encode(tok, "Every morning the baker opens the shop.")
    checker = StopChecker(tok, eos, ["zzz"], max_new_tokens=3)
    assert not checker.finished and checker.finish_reason is None
    assert run(checker, ids) == 3
    assert checker.finish_reason == "length"
    assert checker.text() == tok.decode(ids[:3])
    with pytest.raises(RuntimeError):
        checker.feed(ids[3])


def test_eos_on_last_allowed_token_is_stop(tok, eos) -> None:
    checker = StopChecker(tok, eos, max_new_tokens=2)
    checker.feed(encode(tok, "the")[0])
    assert checker.feed(min(eos))
    assert checker.finish_reason == "stop"


def test_earliest_stop_string_wins(tok, eos) -> None:
    text = "The quick brown fox jumps over the lazy dog. Done."
    ids = encode(tok, text)
    # Both end on the same character, so they complete on the same token, but "azy dog" starts
    # earlier; list order must not matter.
    for stop in (["dog", "azy dog"], ["azy dog", "dog"]):
        checker = StopChecker(tok, eos, stop, max_new_tokens=100)
        run(checker, ids)
        assert checker.text() == "The quick brown fox jumps over the l"
    # The one that completes first stops the row, whatever its place in the list.
    checker = StopChecker(tok, eos, ["Done", "jumps"], max_new_tokens=100)
    n = run(checker, ids)
    assert n == first_stop(tok, ids, ["jumps"])
    assert checker.text() == "The quick brown fox "


def test_multibyte_text_decodes_and_stop_after_it_matches(tok, eos) -> None:
    text = "Café 日本 and the river. The end."
    ids = encode(tok, text)
    # 日 and 本 are not in the training text, so each is spelled with several byte tokens.
    assert "\ufffd" in "".join(pieces(tok, ids))
    checker = StopChecker(tok, eos, max_new_tokens=100)
    run(checker, ids)
    assert checker.text() == text
    for stop in ["The", "本 and", "日本", "é 日"]:
        checker = StopChecker(tok, eos, [stop], max_new_tokens=100)
        n = run(checker, ids)
        assert n == first_stop(tok, ids, [stop]), stop
        assert checker.text() == text[:text.index(stop)], stop


def test_partial_character_does_not_fake_a_match(tok, eos) -> None:
    ids = encode(tok, "日本 café")
    # Decoded alone, the byte tokens of 日 end in U+FFFD; a stop string of that character must not match.
    assert pieces(tok, ids)[0] == "\ufffd"
    checker = StopChecker(tok, eos, ["\ufffd", "\ufffd\ufffd"], max_new_tokens=len(ids))
    assert run(checker, ids) == len(ids)
    assert checker.finish_reason == "length"
    assert checker.text() == "日本 café"


def test_stop_strings_match_brute_force_everywhere(tok, eos) -> None:
    """Every 1-4 character substring as a stop string stops exactly where a full re-decode would."""
    text = "Café 日本: the best of times, the café was quiet."
    ids = encode(tok, text)
    for size in range(1, 5):
        for start in range(len(text) - size + 1):
            stop = text[start:start + size]
            checker = StopChecker(tok, eos, [stop], max_new_tokens=len(ids))
            n = run(checker, ids)
            assert n == first_stop(tok, ids, [stop]), stop
            assert checker.finish_reason == "stop"
            assert checker.text() == text[:text.index(stop)], stop


def test_no_decode_without_stop_strings(tok, eos) -> None:
    counting = CountingTokenizer(tok)
    ids = encode(tok, TEXT)
    checker = StopChecker(counting, eos, max_new_tokens=len(ids))
    run(checker, ids)
    assert checker.finish_reason == "length"
    assert counting.calls == []
    assert checker.text() == TEXT
    assert len(counting.calls) == 1


def test_stop_check_decodes_short_windows(tok, eos) -> None:
    counting = CountingTokenizer(tok)
    ids = encode(tok, TEXT)
    assert len(ids) > 100
    checker = StopChecker(counting, eos, ["zebra crossing"], max_new_tokens=len(ids))
    run(checker, ids)
    assert checker.finish_reason == "length"
    # Never the whole completion: only the tokens since the last complete character, plus context.
    assert max(len(c) for c in counting.calls) <= 6
    assert len(counting.calls) <= 2 * len(ids)


def test_validation(tok, eos) -> None:
    with pytest.raises(ValueError):
        StopChecker(tok, eos, max_new_tokens=0)
    with pytest.raises(ValueError):
        StopChecker(tok, eos, ["ok", ""])
