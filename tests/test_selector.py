"""The Selector's stages and their properties (../shared/sfi-spec.md, "The Selector")."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sfi.method import selector as S

P = S.SPEC  # the spec's Selector; our defaults add span pooling and drop soft NMS


def random_case(h=4, r=8, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(h, r, n, generator=g) * 3
    norms = torch.rand(h, n, generator=g) * 10 + 0.5
    return z, norms


def test_row_distributions_are_normalised_over_each_rows_own_domain():
    z, _ = random_case()
    z[:, 0, 200:] = float("-inf")  # a row of the bootstrap staircase sees less
    logp = S.row_log_dist(z)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 8))
    assert torch.isinf(logp[:, 0, 200:]).all()


def test_power_mean_matches_its_formula_and_drops_empty_rows():
    z, _ = random_case(h=2, r=3, n=50)
    z[1, 2] = float("-inf")  # a row with no domain
    logp = S.row_log_dist(z)
    got = S.power_mean(logp, 0.5).exp()
    for h, rows in ((0, [0, 1, 2]), (1, [0, 1])):
        p = logp[h, rows].exp().double()
        f = (p.pow(0.5).mean(0)).pow(2)
        torch.testing.assert_close(got[h].double(), f / f.sum(), atol=1e-6, rtol=1e-5)


def test_prior_favours_small_norms_and_old_positions():
    n = 100
    flat = torch.ones(1, n)
    log_r = S.prior(flat, P)[0]
    assert torch.all(log_r[1:] <= log_r[:-1] + 1e-6)  # older (smaller u) is never worse
    norms = torch.ones(1, n)
    norms[0, 50] = 0.1
    assert S.prior(norms, P)[0, 50] > S.prior(flat, P)[0, 50]
    torch.testing.assert_close(S.prior(norms, P).exp().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("seed", range(6))
def test_mix_weight_is_the_minimiser_clamped_to_lam_max(seed):
    z, norms = random_case(seed=seed)
    log_f = S.power_mean(S.row_log_dist(z), 0.5)
    log_r = S.prior(norms, P)
    for lam_max in (0.25, 0.35):
        lam = S.mix_weight(log_f, log_r, lam_max)
        assert torch.all(lam >= 0) and torch.all(lam <= lam_max)
        f, r = log_f.exp().double(), log_r.exp().double()
        grid = torch.linspace(0, lam_max, 2001, dtype=torch.double)
        norms2 = (((1 - grid)[:, None, None] * f + grid[:, None, None] * r) ** 2).sum(-1)  # [grid, H]
        torch.testing.assert_close(lam.double(), grid[norms2.argmin(0)], atol=lam_max / 1000, rtol=0)


def test_fuse_is_a_normalised_log_mixture():
    z, norms = random_case(h=2)
    log_f, log_r = S.power_mean(S.row_log_dist(z), 0.5), S.prior(norms, P)
    lam = torch.tensor([0.0, 0.2])
    s = S.fuse(log_f, log_r, lam)
    torch.testing.assert_close(s.exp(), (1 - lam)[:, None] * log_f.exp() + lam[:, None] * log_r.exp())


def test_soft_nms_never_raises_a_score_and_keeps_local_maxima():
    z, norms = random_case()
    s = S.power_mean(S.row_log_dist(z), 0.5)
    out = S.soft_nms(s, 16, 1.0)
    assert torch.all(out <= s)
    window_max = torch.nn.functional.max_pool1d(s[:, None], 33, 1, 16)[:, 0]
    is_peak = s == window_max
    torch.testing.assert_close(out[is_peak], s[is_peak])
    torch.testing.assert_close(out[~is_peak], (2 * s - window_max)[~is_peak])


def test_exclusivity_is_skipped_for_two_or_fewer_kv_heads():
    s = torch.randn(2, 40)
    assert torch.equal(S.exclusivity(s, 2.0, 0.85), s)
    s3 = torch.randn(3, 40)
    out = S.exclusivity(s3, 2.0, 0.85)
    rho = torch.softmax(s3 / 2.0, dim=0)
    torch.testing.assert_close(out, s3 + 0.85 * rho.log())


def test_span_pool_keeps_a_peaks_successors_and_whole_blocks():
    s = torch.full((2, 40), -5.0)
    s[:, 10] = 1.0
    s[1, 30] = 0.5
    pooled = S.span_pool(s, 3, 1)
    assert torch.all(pooled >= s)  # never lowers a score
    assert (pooled[0, 10:14] == 1.0).all() and pooled[0, 14] == -5.0 and pooled[0, 9] == -5.0
    blocks = S.span_pool(s, 0, 8)  # positions 8..15 score as position 10
    assert (blocks[0, 8:16] == 1.0).all() and (blocks[0, :8] == -5.0).all() and (blocks[1, 24:32] == 0.5).all()
    both = S.span_pool(s, 3, 8)  # 10..13 stay in their block; 30..33 reach the block 32..39
    assert torch.equal(both[0], blocks[0]) and (both[1, 24:40] == 0.5).all() and (both[1, 16:24] == -5.0).all()
    s[0, 15] = 2.0
    assert (S.span_pool(s, 3, 8)[0, 16:24] == 2.0).all()
    short = S.span_pool(torch.tensor([[0.0, 3.0, 1.0]]), 0, 4)  # a partial last block
    assert short.tolist() == [[3.0, 3.0, 3.0]]
    assert torch.equal(S.span_pool(s, 0, 1), s)  # off: the spec's Selector


def test_span_selection_keeps_the_tokens_after_a_peak():
    """The induction failure of the spec's Selector: attention on the first digit of a number only. With
    successors the next tokens are kept at the same budget."""
    h, r, n = 4, 4, 400
    g = torch.Generator().manual_seed(1)
    z = torch.randn(h, r, n, generator=g) * 0.3
    z[:, :, 200] += 8.0  # the number starts here; its next four tokens get no attention of their own
    norms = torch.ones(h, n)
    plain = S.select(z, norms, 16, P)
    span = S.select(z, norms, 16, S.SelectorParams(span_successors=4))
    assert all(200 in row for row in plain.tolist())
    assert not all({201, 202, 203, 204} <= set(row) for row in plain.tolist())  # soft NMS pushed them out
    assert all({200, 201, 202, 203, 204} <= set(row) for row in span.tolist())


def test_selection_is_deterministic_sorted_and_within_budget():
    z, norms = random_case(seed=3)
    a = S.select(z, norms, 64, P)
    b = S.select(z.clone(), norms.clone(), 64, P)
    assert torch.equal(a, b)
    assert a.shape == (4, 64)
    assert torch.all(a[:, 1:] > a[:, :-1])  # ascending, no duplicates
    assert S.select(z, norms, 1000, P).shape == (4, 300)  # a budget past the domain keeps everything


def test_ties_go_to_the_lower_position():
    score = torch.zeros(1, 10)
    score[0, [2, 5, 7]] = 1.0
    assert S.top_positions(score, 2).tolist() == [[2, 5]]
    assert S.top_positions(torch.zeros(1, 6), 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("use", ["sfi", "topk"])
def test_planted_peaks_are_picked(use):
    """Attention mass planted on a few positions per head, far apart: every plant is selected."""
    h, r, n = 4, 4, 400
    z = torch.randn(h, r, n) * 0.1
    norms = torch.ones(h, n)
    planted = {0: [10, 150, 390], 1: [40, 41, 300], 2: [5, 200, 201], 3: [77, 260, 333]}
    for head, positions in planted.items():
        z[head, :, positions] += 9.0
    fn = S.select if use == "sfi" else S.select_topk
    picks = fn(z, norms, 8, P)
    for head, positions in planted.items():
        assert set(positions) <= set(picks[head].tolist())


def test_stage_switches_change_the_scores():
    z, norms = random_case(seed=5)
    base = S.scores(z, norms, P)
    for switch in ("use_power_mean", "use_prior", "use_nms", "use_exclusivity", "span_successors", "span_block"):
        value = {"span_successors": 4, "span_block": 4}.get(switch, False)
        other = S.scores(z, norms, dataclasses.replace(P, **{switch: value}))
        assert not torch.allclose(base, other), switch


def test_lam_max_single_row_is_used_for_one_row():
    z, norms = random_case(r=1)
    log_f = S.power_mean(S.row_log_dist(z), 0.5)
    lam = S.mix_weight(log_f, S.prior(norms, P), 0.35)
    assert torch.all(lam <= 0.35) and math.isclose(P.lam_max_single, 0.35)


def test_params_follow_the_recipe_config():
    from sfi.config import SfiConfig, load_config

    assert S.SelectorParams.from_config(SfiConfig()) == S.SelectorParams()  # same defaults in both places
    assert S.SelectorParams.from_config(load_config("spec").sfi) == S.SPEC  # the recipe that restores the paper's
    assert S.SelectorParams.from_config(SfiConfig(alpha=0.25, use_nms=False)).alpha == 0.25


def test_leading_dimensions_are_independent_problems():
    """A refresh selects for every layer at once: the same picks as one layer at a time."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, 6, 200, generator=g) * 3  # [L, H, R, N]
    norms = torch.rand(5, 4, 200, generator=g) + 0.5
    params = S.SelectorParams()
    batched = S.select(z, norms, 32, params)
    assert batched.shape == (5, 4, 32)
    for layer in range(5):
        assert torch.equal(batched[layer], S.select(z[layer], norms[layer], 32, params))


def test_top_positions_equals_a_stable_sort():
    """The top-k threshold path picks exactly the set a stable descending sort would, ties included."""
    g = torch.Generator().manual_seed(7)
    for k in (1, 5, 37, 64):
        score = torch.randint(-4, 4, (3, 4, 64), generator=g).float()  # many ties
        score[0, 0, :10] = float("-inf")
        want = torch.sort(torch.sort(-score, dim=-1, stable=True).indices[..., :k], dim=-1).values
        assert torch.equal(S.top_positions(score, k), want)
    assert S.top_positions(torch.ones(2, 3), 0).shape == (2, 0)
