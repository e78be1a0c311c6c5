"""Tests for sfi.sampling: greedy == argmax, reproducible and batch-independent draws, the filters."""

from __future__ import annotations

import pytest
import torch

from sfi.sampling import RowSampler, SamplingParams, _nucleus, sample

V = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=gen) * 3  # [B, V]


def _rows(*params: SamplingParams, fallback: int = 7) -> list[RowSampler]:
    return [RowSampler(p, fallback) for p in params]


def _run(row_logits: torch.Tensor, params: SamplingParams, steps: int, seed: int = 7) -> list[int]:
    """`steps` draws for one row alone, from a fresh sampler."""
    rows = _rows(params, fallback=seed)
    return [int(sample(row_logits[None], rows)[0]) for _ in range(steps)]


GREEDY = SamplingParams()
HOT = SamplingParams(temperature=1.5, seed=1234)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(6).to(dtype)
    out = sample(logits, _rows(*[GREEDY] * 6))
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, logits.float().argmax(dim=-1))


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.zeros(2, V)
    logits[0, [9, 3, 40]] = 5.0
    logits[1, [17, 30]] = 2.0
    assert sample(logits, _rows(GREEDY, GREEDY)).tolist() == [3, 17]


def test_seeded_sampling_is_reproducible() -> None:
    row = _logits(1)[0]
    first = _run(row, HOT, 40)
    assert first == _run(row, HOT, 40)
    assert len(set(first)) > 3  # the draws really are random, not a constant


def test_seed_none_uses_fallback_seed() -> None:
    row = _logits(1)[0]
    params = SamplingParams(temperature=1.5)
    assert _run(row, params, 30, seed=11) == _run(row, params, 30, seed=11)
    assert _run(row, params, 30, seed=11) != _run(row, params, 30, seed=12)
    # An explicit seed wins over the fallback.
    assert _run(row, HOT, 30, seed=11) == _run(row, HOT, 30, seed=12)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_row_draw_does_not_depend_on_batch(position: int) -> None:
    """A sampled row gives the same tokens alone or in a batch of 3 at any position, next to other kinds of rows."""
    steps = 30
    logits = _logits(3, seed=5)  # [3, V]
    target = logits[position]
    alone = _run(target, HOT, steps)

    others = [SamplingParams(temperature=0.7, top_k=5, seed=99), GREEDY]
    params = others[:position] + [HOT] + others[position:]
    rows = _rows(*params)
    batched = [int(sample(logits, rows)[position]) for _ in range(steps)]
    assert batched == alone


def test_top_k_1_is_greedy() -> None:
    logits = _logits(4, seed=2)
    rows = _rows(*[SamplingParams(temperature=2.0, top_k=1, seed=s) for s in range(4)])
    for _ in range(10):
        assert torch.equal(sample(logits, rows), logits.argmax(dim=-1))


def test_top_k_1_ties_match_greedy() -> None:
    logits = torch.zeros(1, V)
    logits[0, [31, 8, 20]] = 4.0
    assert _run(logits[0], SamplingParams(temperature=1.0, top_k=1, seed=3), 10) == [8] * 10


def test_top_k_ties_at_the_cut_go_to_lowest_ids() -> None:
    logits = torch.zeros(1, V)
    logits[0, [44, 6, 27, 13]] = 4.0
    assert set(_run(logits[0], SamplingParams(temperature=1.0, top_k=2, seed=3), 200)) == {6, 13}


def test_tiny_top_p_is_greedy() -> None:
    logits = _logits(4, seed=3)
    rows = _rows(*[SamplingParams(temperature=1.0, top_p=1e-6, seed=s) for s in range(4)])
    for _ in range(10):
        assert torch.equal(sample(logits, rows), logits.argmax(dim=-1))


def test_top_k_restricts_draws_to_k_best() -> None:
    row = _logits(1, seed=4)[0]
    k = 4
    best = set(torch.topk(row, k).indices.tolist())
    draws = _run(row, SamplingParams(temperature=5.0, top_k=k, seed=0), 400)
    # A high temperature flattens the distribution, so without the filter many more ids would show up.
    assert set(draws) == best


def test_top_p_keeps_smallest_nucleus() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1): top_p 0.75 needs exactly the first two,
    # 0.85 the first three.
    probs = torch.tensor([0.05, 0.3, 0.5, 0.15])
    row = probs.log()
    draws = _run(row, SamplingParams(temperature=1.0, top_p=0.75, seed=0), 400)
    assert set(draws) == {1, 2}
    draws = _run(row, SamplingParams(temperature=1.0, top_p=0.85, seed=0), 400)
    assert set(draws) == {1, 2, 3}


@pytest.mark.parametrize("vocab", [7, 300, 5000])
@pytest.mark.parametrize("tied", [False, True])
def test_nucleus_equals_full_sort(vocab: int, tied: bool) -> None:
    """The widening search keeps exactly what a full stable sort would, ties at the cut included."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randint(0, 4, (vocab,), generator=gen).float() if tied else torch.randn(vocab, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    ref_probs, ref_ids = torch.sort(probs, descending=True, stable=True)
    cdf = torch.cumsum(ref_probs, dim=0)
    for top_p in (0.01, 0.3, 0.9, 0.999):
        n = int((cdf < top_p).sum()) + 1
        kept, ids = _nucleus(probs, top_p)
        assert ids.tolist() == ref_ids[:n].tolist(), top_p
        assert torch.equal(kept, ref_probs[:n])


def test_draw_frequencies_follow_temperature() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = torch.tensor(_run(probs.log(), SamplingParams(temperature=1.0, seed=0), 3000))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_masked_tokens_are_never_drawn() -> None:
    row = torch.full((V,), float("-inf"))
    row[[2, 5]] = 0.0
    assert set(_run(row, SamplingParams(temperature=1.0, seed=0), 200)) == {2, 5}


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = _logits(3, seed=8)
    out = sample(logits, _rows(GREEDY, HOT, GREEDY))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1},
])
def test_params_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_logits_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="B=2"):
        sample(torch.zeros(3, V), _rows(GREEDY, GREEDY))
