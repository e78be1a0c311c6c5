"""The fused Selector scores (Triton; interpreted on CPU) against the Selector's reference (sfi.method.selector)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sfi.method import selector as S
from sfi_kernels import selector_scores, selector_scores_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT = S.SPEC  # the spec's Selector; the ablations below add our stages to it
TOL = dict(rtol=1e-4, atol=1e-4)


def make_case(n, h, r, c, seed, scale=3.0, spikes=3):
    """z ~ N(0, scale) with a few spikes per row, norms ~ U(0.5, 3); NaN past each problem's n."""
    g = torch.Generator().manual_seed(seed)
    p = len(n)
    z = torch.randn(p, h, r, c, generator=g) * scale
    for _ in range(spikes):
        j = torch.randint(0, c, (p, h, r, 1), generator=g)
        z.scatter_add_(-1, j, torch.full(j.shape, 4 * scale))
    norms = torch.rand(p, h, c, generator=g) * 2.5 + 0.5
    for i, m in enumerate(n):
        z[i, :, :, m:] = float("nan")  # never to be read
        norms[i, :, m:] = float("nan")
    return z.to(DEVICE), norms.to(DEVICE), torch.tensor(n, dtype=torch.int32, device=DEVICE)


def expected(z, norms, n, params):
    """sfi.method.selector.scores on each problem's slice, -inf past its domain."""
    out = torch.full(norms.shape, -math.inf, device=z.device)
    for i, m in enumerate(n.tolist()):
        if m:
            out[i, :, :m] = S.scores(z[i, :, :, :m], norms[i, :, :m], params)
    return out


def assert_matches(got, want):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert not got.isnan().any()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert (got[~finite] == -math.inf).all()
    torch.testing.assert_close(got[finite], want[finite], **TOL)


CASES = [  # n per problem, H, R, C
    ([0, 1], 1, 1, 1),
    ([27, 1, 0, 13], 2, 3, 27),
    ([63, 17, 1], 4, 4, 63),
    ([40, 0, 63], 8, 3, 63),
    ([63, 50], 4, 1, 63),  # one row per head: lam_max_single
    ([1110, 1000, 1], 8, 4, 1110),  # 1000: a partly filled last block
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_selector_on_awkward_shapes(case):
    n, h, r, c = CASES[case]
    z, norms, nt = make_case(n, h, r, c, seed=case)
    want = expected(z, norms, nt, DEFAULT)
    assert_matches(selector_scores(z, norms, nt, DEFAULT), want)
    assert_matches(selector_scores_ref(z, norms, nt, DEFAULT), want)


def test_norms_read_in_place_from_a_cache():
    """With norm_at, each problem's norms come from its own row and start of a larger [N, H, S] tensor (a cache's
    norms): the same scores as the norms copied out into [P, H, C]."""
    n, h, r, c = [40, 0, 63, 17], 4, 3, 63
    z, norms, nt = make_case(n, h, r, c, seed=11)
    cache = torch.full((7, h, 200), float("nan"), device=norms.device)  # poisoned outside each problem's range
    rows, start = [5, 2, 0, 5], [3, 150, 100, 120]
    for p, (row, at) in enumerate(zip(rows, start, strict=True)):
        cache[row, :, at:at + n[p]] = norms[p, :, :n[p]]
    at = tuple(torch.tensor(x, dtype=torch.int32, device=norms.device) for x in (rows, start))
    want = expected(z, norms, nt, DEFAULT)
    assert_matches(selector_scores(z, cache, nt, DEFAULT, norm_at=at), want)
    assert_matches(selector_scores_ref(z, cache, nt, DEFAULT, norm_at=at), want)


ABLATIONS = {
    "all_on": {},
    "ours": dataclasses.asdict(S.SelectorParams()),  # sfi's defaults
    "no_power_mean": dict(use_power_mean=False),
    "no_prior": dict(use_prior=False),
    "no_nms": dict(use_nms=False),
    "no_exclusivity": dict(use_exclusivity=False),
    "all_off": dict(use_power_mean=False, use_prior=False, use_nms=False, use_exclusivity=False),
    # other constants: lam inside (0, lam_max), radius 0, pos_p below 1 (the reference raises it to 1)
    "constants": dict(alpha=0.3, lam_max_multi=1.0, nms_radius=0, pos_p=0.5, gamma=1.5, excl_temperature=0.7),
    "wide_nms": dict(nms_radius=5, nms_strength=0.4, excl_weight=2.0),
    "radius_1": dict(nms_radius=1),
    "radius_40": dict(nms_radius=40, nms_strength=2.0),  # windows wider than most domains
    # span pooling (ours: successors 8, a power of two, is one pair of tiles): other windows take two pairs;
    # blocks, both, and pooling alone
    "successors_5": dict(span_successors=5),
    "successors_3_block_16": dict(span_successors=3, span_block=16),
    "span_only": dict(use_prior=False, use_nms=False, use_exclusivity=False, span_successors=70, span_block=64),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablations(name):
    params = dataclasses.replace(DEFAULT, **ABLATIONS[name])
    z, norms, nt = make_case([63, 30, 1, 0], 8, 4, 63, seed=7)
    want = expected(z, norms, nt, params)
    got = selector_scores(z, norms, nt, params)
    assert_matches(got, want)
    assert torch.equal(got, selector_scores(z, norms, nt, params))  # deterministic
    assert_matches(selector_scores_ref(z, norms, nt, params), want)


def test_span_pooling_across_program_blocks():
    """Windows and blocks that straddle the kernel's position blocks (block_b 16 < successors + block)."""
    params = dataclasses.replace(DEFAULT, span_successors=12, span_block=8)
    z, norms, nt = make_case([200, 77, 1], 4, 3, 200, seed=9)
    assert_matches(selector_scores(z, norms, nt, params, block_b=16), expected(z, norms, nt, params))


def test_lam_takes_every_branch():
    """Flat logits with lam_max = 1: heads whose lam is 0, inside (0, 1), at the cap; the kernel follows each."""
    params = dataclasses.replace(DEFAULT, lam_max_multi=1.0)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 8, 4, 40, generator=g) * torch.tensor([0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 5])[:, None, None]
    norms = torch.rand(1, 8, 40, generator=g) * 2.5 + 0.5
    z, norms, nt = z.to(DEVICE), norms.to(DEVICE), torch.tensor([40], dtype=torch.int32, device=DEVICE)
    lam = S.mix_weight(S.power_mean(S.row_log_dist(z[0]), params.alpha), S.prior(norms[0], params), 1.0)
    assert (lam == 0).any() and ((lam > 0) & (lam < 1)).any(), lam
    assert_matches(selector_scores(z, norms, nt, params), expected(z, norms, nt, params))


@pytest.mark.long
def test_many_chunks_and_strided_views():
    """Chunks of 128 positions, two blocks each (9 per problem: every merge path), over non-contiguous views."""
    n, h, r, c = [1110, 700, 65], 3, 3, 1110
    z_full, norms_full, _ = make_case([c + 9] * len(n), h, r + 1, c + 9, seed=11)
    z_full = z_full.transpose(0, 1).contiguous().transpose(0, 1)  # P and H strides swapped
    z, norms = z_full[:, :, 1:, 5:5 + c], norms_full[:, :, 3:3 + c]  # R and C offset
    for i, m in enumerate(n):
        z[i, :, :, m:] = float("nan")
        norms[i, :, m:] = float("nan")
    nt = torch.tensor(n, dtype=torch.int32, device=DEVICE)
    z_ref, norms_ref = z.contiguous(), norms.contiguous()
    assert z.stride(-1) == 1 and not z.is_contiguous()
    want = expected(z_ref, norms_ref, nt, DEFAULT)
    assert_matches(selector_scores(z, norms, nt, DEFAULT, block=64, chunk=128, block_b=128), want)
    assert_matches(selector_scores(z, norms, nt.long(), DEFAULT), want)  # int64 n, default chunking


def test_top_k_positions_agree():
    z, norms, nt = make_case([300, 257], 4, 4, 300, seed=5, spikes=6)
    want = expected(z, norms, nt, DEFAULT)
    got = selector_scores(z, norms, nt, DEFAULT)
    top = torch.topk(want, 61).values  # [P, H, 61]
    gaps = (top[..., :-1] - top[..., 1:]).amin(dim=(0, 1))  # smallest gap below each rank, over all heads
    k = int(torch.argmax(gaps[20:]).item()) + 21  # a k in 21..60 well separated from the (k+1)-th in every head
    assert gaps[k - 1] > 1e-3
    for i, m in enumerate(nt.tolist()):
        assert torch.equal(torch.topk(got[i], k).indices.sort().values, torch.topk(want[i], k).indices.sort().values)
        assert torch.equal(S.top_positions(got[i], k), S.top_positions(want[i, :, :m], k))


def test_wrong_shapes_raise():
    z, norms, nt = make_case([10, 5], 4, 2, 10, seed=0)
    bad = [
        (z[0], norms, nt),  # z not 4-d
        (z, norms[:, :3], nt),  # H differs
        (z, norms[:, :, :9], nt),  # C differs
        (z, norms, nt[:1]),  # P differs
        (z, norms, nt.float()),  # n not integer
        (z[:, :, :0], norms, nt),  # no rows
    ]
    for args in bad:
        with pytest.raises(ValueError):
            selector_scores(*args, DEFAULT)
        with pytest.raises(ValueError):
            selector_scores_ref(*args, DEFAULT)
    with pytest.raises(ValueError):  # positions must be contiguous
        selector_scores(z.transpose(2, 3).contiguous().transpose(2, 3), norms, nt, DEFAULT)


def test_bootstrap_shape_many_rows_small_block():
    """The prefill's bootstrap: R = group size x window (here 4 x 16) rows per KV head, every row over the whole
    domain, with the small position block select_fused picks for so many rows; our Selector's defaults."""
    ours = S.SelectorParams()
    z, norms, nt = make_case([300, 299], 2, 64, 300, seed=7)
    assert_matches(selector_scores(z, norms, nt, ours, block=64), expected(z, norms, nt, ours))


def test_select_fused_picks_what_select_picks():
    """select_fused (the kernel on a GPU, the reference here) = select for logits with no -inf, for our Selector
    and for the top-k baseline written as kernel parameters."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 2, 8, 257, generator=g) * 3  # 3 layers, 2 KV heads, 8 rows, 257 positions
    norms = torch.rand(3, 2, 257, generator=g) + 0.5
    ours = S.SelectorParams()
    assert torch.equal(S.select_fused(z, norms, 40, ours), S.select(z, norms, 40, ours))
    topk = dataclasses.replace(ours, use_power_mean=False, use_prior=False, use_nms=False, use_exclusivity=False,
                               span_successors=0, span_block=1)
    assert torch.equal(S.select_fused(z, norms, 40, topk), S.select_topk(z, norms, 40, ours))
