"""The Selector's scores for many independent problems at once: the torch reference, stage by stage, and fused.

z [P, H, R, C] float32 scaled logits (P problems such as layers or batch slots, H KV heads, R query rows per
head, C capacity); norms [P, H, C] key L2 norms, or with `norm_at` = (rows, start) [P] int32 any [N, H, S] of
them, problem p's at norms[rows[p], :, start[p]:] (a KV cache's norms, read in place); n [P] int32 on the
device, the domain length of each problem (0 <= n[p] <= C). Positions j >= n[p] are never read (they may hold
NaN). Returns s'' [P, H, C] float32: the reference's scores on the first n[p] positions, -inf after. Every row
sees the whole domain (decode refreshes), so lam_max is lam_max_multi when R > 1, lam_max_single when R == 1.
`params` is any object with the fields of sfi.selector.SelectorParams (this package does not import sfi).

The Triton path never reads n on the host and allocates by shape only, so it can be captured in a CUDA graph.
Each (problem, head) is cut into NS chunks of positions (NS from P, H and C alone), so short batches still fill
the GPU; chunk partials are merged in a fixed order, so results are deterministic. Four launches:
  1. _row_lse_kernel    (P*H, NS): per chunk and row, the max and the sum of exp of the logits.
  2. _mix_stats_kernel  (P*H, NS): merges 1's partials into each row's log-sum-exp; writes log f (power mean over
                        rows) and log r (prior), both unnormalised, to scratch [P, H, C]; per chunk, sums of f, r,
                        f*f, f*r, r*r relative to running maxes (per lane: no cross-lane traffic in the loop).
  3. _fuse_kernel       (P*H, NS): merges 2's partials into the normalisers and lam; s = log((1-lam) f + lam r)
                        over the chunk, -inf past n (in place of log f). A mixture of two normalised distributions
                        is normalised, so the reference's last renormalisation (a rounding-level shift) is left out.
  4. _nms_excl_kernel   (P, C / BLOCK_B): soft NMS (the windowed max from segmented prefix and suffix maxima:
                        four loads per position whatever the radius), exclusivity across the H heads, then the
                        span pooling (successor window, blocks); skipped when none applies (3 then writes).

The torch reference is one function per stage (the spec's order; `span_pool` is ours); sfi.selector runs it on a
CPU, so the CPU path and this kernel share one definition of the Selector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pdl import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the reference
    triton = None

EPS = 1e-12
_PARAMS = ("alpha", "gamma", "w_l2", "w_pos", "pos_p", "pos_eta", "pos_beta", "lam_max_multi", "lam_max_single",
           "nms_radius", "nms_strength", "excl_temperature", "excl_weight", "use_power_mean", "use_prior",
           "use_nms", "use_exclusivity", "span_successors", "span_block")


# -- the reference: one function per stage of ../shared/sfi-spec.md, shapes [..., H, R, N] (H KV heads, R rows,
# N domain positions; leading dimensions are independent problems). sfi.selector uses these on a CPU.
def row_log_dist(z: torch.Tensor) -> torch.Tensor:
    """z [..., H, R, N] logits (-inf where a row cannot see) -> log p_r(k), each row normalised over its domain."""
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def valid_rows(logp: torch.Tensor) -> torch.Tensor:
    """[..., H, R] bool: rows with a non-empty domain."""
    return torch.isfinite(logp).any(dim=-1)


def power_mean(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log f [..., H, N]: normalised alpha-power mean of the rows' distributions (rows with no domain dropped)."""
    ok = valid_rows(logp)  # [..., H, R]
    n_rows = ok.sum(-1).clamp(min=1).to(logp.dtype)  # [..., H]
    scaled = torch.where(ok[..., None], alpha * logp, torch.full_like(logp, -math.inf))
    log_f = (torch.logsumexp(scaled, dim=-2) - n_rows.log()[..., None]) / alpha
    return log_f - torch.logsumexp(log_f, dim=-1, keepdim=True)


def prior(key_norms: torch.Tensor, p) -> torch.Tensor:
    """log r [..., H, N]: small-norm keys and older positions favoured, normalised over the domain."""
    n = key_norms.shape[-1]
    u = (torch.arange(n, dtype=torch.float32, device=key_norms.device) / max(n - 1, 1)).clamp(0, 1)
    log_pi = -p.gamma * key_norms.float().clamp(min=EPS).log()
    log_delta = -p.pos_beta * u.pow(max(p.pos_p, 1.0)) + p.pos_eta * (1 - u).clamp(min=EPS).log()
    log_r = p.w_l2 * log_pi + p.w_pos * log_delta
    return log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)


def mix_weight(log_f: torch.Tensor, log_r: torch.Tensor, lam_max: float) -> torch.Tensor:
    """lam [..., H]: the mixture (1 - lam) f + lam r of smallest squared norm, clamped to [0, lam_max]."""
    f, r = log_f.exp(), log_r.exp()
    ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
    lam = (ff - fr) / (ff - 2 * fr + rr).clamp(min=EPS)
    return lam.clamp(0.0, lam_max).clamp(max=1 - EPS)


def fuse(log_f: torch.Tensor, log_r: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """s = log((1 - lam) f + lam r), renormalised; computed in log space."""
    lam = lam[..., None]
    a = torch.log1p(-lam) + log_f
    b = torch.where(lam > 0, lam.clamp(min=EPS).log() + log_r, torch.full_like(log_r, -math.inf))
    s = torch.logaddexp(a, b)
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def _window_max(s: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """max of s over positions [k - before, k + after] (clipped to the domain), along the last dimension."""
    flat = F.pad(s.reshape(-1, 1, s.shape[-1]), (before, after), value=-math.inf)
    return F.max_pool1d(flat, kernel_size=before + after + 1, stride=1).reshape(s.shape)


def soft_nms(s: torch.Tensor, radius: int, strength: float) -> torch.Tensor:
    """s' = s - strength * max(m - s, 0), m the max of s within +-radius positions: never raises a score."""
    return s - strength * (_window_max(s, radius, radius) - s).clamp(min=0)


def exclusivity(s: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """Down-weight tokens several KV heads want: s + weight * log softmax_h(s / T). Skipped for H <= 2."""
    if s.shape[-2] <= 2:
        return s
    rho = torch.softmax(s / temperature, dim=-2)
    return s + weight * rho.clamp(min=EPS).log()


def span_pool(s: torch.Tensor, successors: int, block: int) -> torch.Tensor:
    """Span-preserving selection (ours, not the paper's): each position scores at least as the best of the
    `successors` positions before it, so a kept peak keeps the tokens that follow it (copying a number reads
    the key after the one just copied); then, with `block` > 1, every position of an aligned block of `block`
    positions scores as the block's best, so whole blocks are kept. Never lowers a score."""
    if successors:
        s = _window_max(s, successors, 0)
    if block > 1:
        n = s.shape[-1]
        padded = F.pad(s, (0, -n % block), value=-math.inf)
        best = padded.unflatten(-1, (-1, block)).amax(dim=-1, keepdim=True)
        s = best.expand(*best.shape[:-1], block).flatten(-2)[..., :n]
    return s


def scores(z: torch.Tensor, key_norms: torch.Tensor, p) -> torch.Tensor:
    """The final per-position score [..., H, N] from logits z [..., H, R, N] and key norms [..., H, N]."""
    z = z.float()
    logp = row_log_dist(z)
    log_f = power_mean(logp, p.alpha if p.use_power_mean else 1.0)
    s = log_f
    if p.use_prior:
        n_rows = int(valid_rows(logp).sum(-1).max())
        log_r = prior(key_norms, p)
        s = fuse(log_f, log_r, mix_weight(log_f, log_r, p.lam_max_multi if n_rows > 1 else p.lam_max_single))
    if p.use_nms:
        s = soft_nms(s, p.nms_radius, p.nms_strength)
    if p.use_exclusivity:
        s = exclusivity(s, p.excl_temperature, p.excl_weight)
    return span_pool(s, p.span_successors, p.span_block)


def selector_scores_ref(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor, params,
                        norm_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pure torch, one problem at a time (reads n on the host)."""
    _check(z, norms, n, norm_at)
    p_count, h, _, c = z.shape
    out = torch.full((p_count, h, c), -math.inf, dtype=torch.float32, device=z.device)
    rows, start = (t.tolist() for t in norm_at) if norm_at is not None else (range(p_count), [0] * p_count)
    for p, m in enumerate(n.tolist()):
        if m > 0:
            out[p, :, :m] = scores(z[p, :, :, :m], norms[rows[p], :, start[p]:start[p] + m], params)
    return out


if triton is not None:

    @triton.jit
    def _merged_row_lse(part_m_ptr, part_d_ptr, ph, NS, R: tl.constexpr, R_PAD: tl.constexpr,
                        NS_PAD: tl.constexpr):
        """[R_PAD] log-sum-exp of each row over the whole domain from the chunks' partials (0 on padded rows)."""
        sp = tl.arange(0, NS_PAD)
        r = tl.arange(0, R_PAD)
        off = (ph * NS + sp)[:, None] * R_PAD + r[None, :]
        smask = (sp < NS)[:, None]
        pm = tl.load(part_m_ptr + off, mask=smask, other=float("-inf"))
        pd = tl.load(part_d_ptr + off, mask=smask, other=0.0)
        big = tl.max(pm, axis=0)
        big = tl.where(big == float("-inf"), 0.0, big)
        tot = tl.sum(pd * tl.exp(pm - big[None, :]), axis=0)
        return tl.where((r < R) & (tot > 0), big + tl.log(tl.where(tot > 0, tot, 1.0)), 0.0)

    @triton.jit
    def _block_logs(z_base, nrm_base, j, jmask, rmask, row_lse, m, alpha, log_rows, gamma, w_l2, w_pos,
                    pos_pow, pos_eta, pos_beta, USE_PRIOR: tl.constexpr):
        """log f and log r [BLOCK] (both unnormalised) at positions j; finite everywhere, meaningful where jmask."""
        x = tl.load(z_base + j[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
        a = tl.where(rmask[:, None], alpha * (x - row_lse[:, None]), float("-inf"))  # [R_PAD, BLOCK]
        amax = tl.max(a, axis=0)
        log_f = (amax + tl.log(tl.sum(tl.exp(a - amax[None, :]), axis=0)) - log_rows) * (1.0 / alpha)
        if USE_PRIOR:
            nv = tl.load(nrm_base + j, mask=jmask, other=1.0).to(tl.float32)
            # divided with IEEE rounding as torch does: log(1 - u) near the end of the domain depends on it
            u = tl.math.div_rn(j.to(tl.float32), tl.maximum(m - 1, 1).to(tl.float32))
            u = tl.minimum(tl.maximum(u, 0.0), 1.0)
            u_pow = tl.where(u > 0, tl.exp(pos_pow * tl.log(tl.maximum(u, 1e-30))), 0.0)
            log_pi = -gamma * tl.log(tl.maximum(nv, 1e-12))
            log_delta = -pos_beta * u_pow + pos_eta * tl.log(tl.maximum(1.0 - u, 1e-12))
            log_r = w_l2 * log_pi + w_pos * log_delta
        else:
            log_r = log_f
        return log_f, log_r

    @triton.jit(do_not_specialize=["CHUNK", "NS"])
    def _row_lse_kernel(z_ptr, n_ptr, part_m_ptr, part_d_ptr, stride_zp, stride_zh, stride_zr, CHUNK, NS,
                        H: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
        ph = tl.program_id(0)
        sp = tl.program_id(1)
        p = ph // H
        h = ph % H
        m = tl.load(n_ptr + p)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, m)
        r = tl.arange(0, R_PAD)
        rmask = r < R
        z_base = z_ptr + p.to(tl.int64) * stride_zp + h.to(tl.int64) * stride_zh + r.to(tl.int64)[:, None] * stride_zr
        # One reduction per step (the running max per row); the sums stay per lane until the end.
        run_m = tl.full([R_PAD], float("-inf"), tl.float32)
        run_d = tl.zeros([R_PAD, BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK):
            j = start + tl.arange(0, BLOCK)
            x = tl.load(z_base + j[None, :], mask=rmask[:, None] & (j < hi)[None, :],
                        other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(run_m, tl.max(x, axis=1))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            run_d = run_d * tl.exp(run_m - safe)[:, None] + tl.exp(x - safe[:, None])
            run_m = new_m
        off = (ph * NS + sp) * R_PAD + r
        tl.store(part_m_ptr + off, run_m)
        tl.store(part_d_ptr + off, tl.sum(run_d, axis=1))

    @triton.jit(do_not_specialize=["C", "CHUNK", "NS"])
    def _mix_stats_kernel(z_ptr, nrm_ptr, nrow_ptr, nstart_ptr, n_ptr, part_m_ptr, part_d_ptr, stats_ptr, lf_ptr,
                          lr_ptr,
                          stride_zp, stride_zh, stride_zr, stride_np, stride_nh, C, CHUNK, NS,
                          alpha, log_rows, gamma, w_l2, w_pos, pos_pow, pos_eta, pos_beta,
                          H: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, NS_PAD: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PRIOR: tl.constexpr, HAS_AT: tl.constexpr):
        """log f, log r to scratch; per chunk: max of log f (mf) and log r (mr), and sums of ef = exp(log f - mf),
        er, ef^2, ef*er, er^2 (stats [P*H, NS, 8]; slot 7 unused)."""
        ph = tl.program_id(0)
        sp = tl.program_id(1)
        p = ph // H
        h = ph % H
        m = tl.load(n_ptr + p)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, m)
        r = tl.arange(0, R_PAD)
        rmask = r < R
        row_lse = _merged_row_lse(part_m_ptr, part_d_ptr, ph, NS, R, R_PAD, NS_PAD)
        z_base = z_ptr + p.to(tl.int64) * stride_zp + h.to(tl.int64) * stride_zh + r.to(tl.int64)[:, None] * stride_zr
        if HAS_AT:  # a cache's norms: the problem's own row and start
            nrm_base = nrm_ptr + tl.load(nrow_ptr + p).to(tl.int64) * stride_np + h.to(tl.int64) * stride_nh + \
                tl.load(nstart_ptr + p).to(tl.int64)
        else:
            nrm_base = nrm_ptr + p.to(tl.int64) * stride_np + h.to(tl.int64) * stride_nh
        # Per-lane running maxes and sums: no communication between lanes until the end.
        mf = tl.full([BLOCK], float("-inf"), tl.float32)
        mr = tl.full([BLOCK], float("-inf"), tl.float32)
        sf = tl.zeros([BLOCK], tl.float32)
        sr = tl.zeros([BLOCK], tl.float32)
        sff = tl.zeros([BLOCK], tl.float32)
        sfr = tl.zeros([BLOCK], tl.float32)
        srr = tl.zeros([BLOCK], tl.float32)
        row_base = ph.to(tl.int64) * C
        for start in range(lo, hi, BLOCK):
            j = start + tl.arange(0, BLOCK)
            jmask = j < hi
            log_f, log_r = _block_logs(z_base, nrm_base, j, jmask, rmask, row_lse, m, alpha, log_rows, gamma,
                                       w_l2, w_pos, pos_pow, pos_eta, pos_beta, USE_PRIOR)
            tl.store(lf_ptr + row_base + j, log_f, mask=jmask)
            log_f = tl.where(jmask, log_f, float("-inf"))
            new_mf = tl.maximum(mf, log_f)
            safe_f = tl.where(new_mf == float("-inf"), 0.0, new_mf)
            cf = tl.exp(mf - safe_f)
            ef = tl.exp(log_f - safe_f)
            sf = sf * cf + ef
            if USE_PRIOR:
                tl.store(lr_ptr + row_base + j, log_r, mask=jmask)
                log_r = tl.where(jmask, log_r, float("-inf"))
                new_mr = tl.maximum(mr, log_r)
                safe_r = tl.where(new_mr == float("-inf"), 0.0, new_mr)
                cr = tl.exp(mr - safe_r)
                er = tl.exp(log_r - safe_r)
                sr = sr * cr + er
                sff = sff * (cf * cf) + ef * ef
                sfr = sfr * (cf * cr) + ef * er
                srr = srr * (cr * cr) + er * er
                mr = new_mr
            mf = new_mf
        big_f = tl.max(mf, axis=0)
        big_fs = tl.where(big_f == float("-inf"), 0.0, big_f)
        wf = tl.exp(mf - big_fs)
        base = stats_ptr + (ph * NS + sp) * 8
        tl.store(base + 0, big_f)
        tl.store(base + 2, tl.sum(sf * wf, axis=0))
        if USE_PRIOR:
            big_r = tl.max(mr, axis=0)
            big_rs = tl.where(big_r == float("-inf"), 0.0, big_r)
            wr = tl.exp(mr - big_rs)
            tl.store(base + 1, big_r)
            tl.store(base + 3, tl.sum(sr * wr, axis=0))
            tl.store(base + 4, tl.sum(sff * (wf * wf), axis=0))
            tl.store(base + 5, tl.sum(sfr * (wf * wr), axis=0))
            tl.store(base + 6, tl.sum(srr * (wr * wr), axis=0))
        else:
            tl.store(base + 1, big_f)

    @triton.jit(do_not_specialize=["C", "CHUNK", "NS"])
    def _fuse_kernel(lf_ptr, lr_ptr, n_ptr, stats_ptr, s_ptr, C, CHUNK, NS, lam_max,
                     H: tl.constexpr, NS_PAD: tl.constexpr, BLOCK: tl.constexpr, USE_PRIOR: tl.constexpr):
        """s [P, H, C] (contiguous; may be lf itself): log((1 - lam) f + lam r) over this chunk, -inf past n."""
        ph = tl.program_id(0)
        sp = tl.program_id(1)
        m = tl.load(n_ptr + ph // H)
        lo = sp * CHUNK
        end = tl.minimum(lo + CHUNK, C)
        hi = tl.minimum(end, m)
        # The chunks' statistics, merged into the normalisers and the mixing weight.
        k = tl.arange(0, NS_PAD)
        kmask = k < NS
        st = stats_ptr + (ph * NS + k) * 8
        pmf = tl.load(st + 0, mask=kmask, other=float("-inf"))
        big_f = tl.max(pmf, axis=0)
        big_f = tl.where(big_f == float("-inf"), 0.0, big_f)
        wf = tl.exp(pmf - big_f)
        tot_f = tl.sum(tl.load(st + 2, mask=kmask, other=0.0) * wf, axis=0)
        lse_f = big_f + tl.log(tl.where(tot_f > 0, tot_f, 1.0))
        if USE_PRIOR:
            pmr = tl.load(st + 1, mask=kmask, other=float("-inf"))
            big_r = tl.max(pmr, axis=0)
            big_r = tl.where(big_r == float("-inf"), 0.0, big_r)
            wr = tl.exp(pmr - big_r)
            tot_r = tl.sum(tl.load(st + 3, mask=kmask, other=0.0) * wr, axis=0)
            lse_r = big_r + tl.log(tl.where(tot_r > 0, tot_r, 1.0))
            sff = tl.sum(tl.load(st + 4, mask=kmask, other=0.0) * (wf * wf), axis=0)
            sfr = tl.sum(tl.load(st + 5, mask=kmask, other=0.0) * (wf * wr), axis=0)
            srr = tl.sum(tl.load(st + 6, mask=kmask, other=0.0) * (wr * wr), axis=0)
            tf = tl.where(tot_f > 0, tot_f, 1.0)
            tr = tl.where(tot_r > 0, tot_r, 1.0)
            ff = sff / (tf * tf)
            fr = sfr / (tf * tr)
            rr = srr / (tr * tr)
            lam = (ff - fr) / tl.maximum(ff - 2 * fr + rr, 1e-12)
            lam = tl.minimum(tl.minimum(tl.maximum(lam, 0.0), lam_max), 1.0 - 1e-12)
            log_a = tl.log(1.0 - lam)
            log_b = tl.where(lam > 0, tl.log(tl.maximum(lam, 1e-12)), float("-inf"))
        s_base = s_ptr + ph.to(tl.int64) * C
        for start in range(lo, hi, BLOCK):
            j = start + tl.arange(0, BLOCK)
            jmask = j < hi
            log_f = tl.load(lf_ptr + ph.to(tl.int64) * C + j, mask=jmask, other=0.0)
            s = log_f - lse_f
            if USE_PRIOR:
                a = log_a + s
                log_r = tl.load(lr_ptr + ph.to(tl.int64) * C + j, mask=jmask, other=0.0)
                b = log_b + (log_r - lse_r)
                top = tl.maximum(a, b)  # finite: a is
                s = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
            tl.store(s_base + j, tl.where(jmask, s, float("-inf")), mask=j < end)
        for start in range(tl.maximum(lo, m), end, BLOCK):
            j = start + tl.arange(0, BLOCK)
            tl.store(s_base + j, tl.full([BLOCK], float("-inf"), tl.float32), mask=j < end)

    @triton.jit
    def _max2(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _seg_max(lo, hi, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, SEG: tl.constexpr):
        """[H_PAD, BLOCK_B] max over positions [a, a + SEG] from the tiles lo (at positions a) and hi (at a + SEG).

        Within segments of SEG lanes, a suffix max of lo and a prefix max of hi meet: together they cover
        [a, a + SEG] exactly (van Herk / Gil-Werman), two tiles instead of SEG + 1."""
        suf = tl.associative_scan(tl.reshape(lo, (H_PAD, BLOCK_B // SEG, SEG)), 2, _max2, reverse=True)
        pre = tl.associative_scan(tl.reshape(hi, (H_PAD, BLOCK_B // SEG, SEG)), 2, _max2)
        return tl.reshape(tl.maximum(suf, pre), (H_PAD, BLOCK_B))

    @triton.jit
    def _tile(s_ptr, rows, hmask, a, m):
        """s at positions a [BLOCK_B] for every head: -inf outside the domain [0, m) and on padded heads."""
        return tl.load(s_ptr + rows + a[None, :], mask=hmask[:, None] & ((a >= 0) & (a < m))[None, :],
                       other=float("-inf"))

    @triton.jit
    def _suppressed(s_ptr, rows, hmask, a, m, strength, temperature, weight, H_PAD: tl.constexpr,
                    BLOCK_B: tl.constexpr, RADIUS: tl.constexpr, SEG: tl.constexpr, USE_NMS: tl.constexpr,
                    USE_EXCL: tl.constexpr):
        """Soft NMS then exclusivity across the heads, at positions a [BLOCK_B]; -inf outside the domain."""
        valid = hmask[:, None] & ((a >= 0) & (a < m))[None, :]
        s = _tile(s_ptr, rows, hmask, a, m)
        if USE_NMS and RADIUS > 0:
            # [a - RADIUS, a + RADIUS] as two windows of SEG + 1 positions (RADIUS <= SEG <= 2 * RADIUS)
            b = a - RADIUS
            c = a + RADIUS - SEG
            win = tl.maximum(_seg_max(_tile(s_ptr, rows, hmask, b, m), _tile(s_ptr, rows, hmask, b + SEG, m),
                                      H_PAD, BLOCK_B, SEG),
                             _seg_max(_tile(s_ptr, rows, hmask, c, m), _tile(s_ptr, rows, hmask, c + SEG, m),
                                      H_PAD, BLOCK_B, SEG))
            gap = tl.where(valid, win, 0.0) - tl.where(valid, s, 0.0)  # no -inf - -inf off the domain
            s = s - strength * tl.maximum(gap, 0.0)
        if USE_EXCL:
            x = tl.where(hmask[:, None], s / temperature, float("-inf"))
            top = tl.max(x, axis=0)
            top = tl.where(top == float("-inf"), 0.0, top)
            e = tl.exp(x - top[None, :])
            tot = tl.sum(e, axis=0)
            rho = e / tl.where(tot > 0, tot, 1.0)[None, :]
            s = s + weight * tl.log(tl.maximum(rho, 1e-12))
        return tl.where(valid, s, float("-inf"))

    @triton.jit(do_not_specialize=["C"])
    def _nms_excl_kernel(s_ptr, out_ptr, n_ptr, C, strength, temperature, weight,
                         H: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, RADIUS: tl.constexpr,
                         SEG: tl.constexpr, USE_NMS: tl.constexpr, USE_EXCL: tl.constexpr,
                         SUCC: tl.constexpr, SEG_S: tl.constexpr, SPAN_BLOCK: tl.constexpr):
        """out [P, H, C] from s [P, H, C] (both contiguous): soft NMS, exclusivity across the H heads, then the
        span pooling: the max over the SUCC positions before (SEG_S, a power of two, SUCC / 2 < SEG_S <= SUCC),
        then over aligned blocks of SPAN_BLOCK positions. The pooled window reaches before this program's
        positions, so the suppressed scores are recomputed on shifted tiles rather than read back."""
        p = tl.program_id(0)
        blk = tl.program_id(1)
        m = tl.load(n_ptr + p)
        hh = tl.arange(0, H_PAD)
        hmask = hh < H
        j = blk * BLOCK_B + tl.arange(0, BLOCK_B)
        rows = (p.to(tl.int64) * H + hh)[:, None] * C
        s = _suppressed(s_ptr, rows, hmask, j, m, strength, temperature, weight, H_PAD, BLOCK_B, RADIUS, SEG,
                        USE_NMS, USE_EXCL)
        if SUCC > 0:
            # [j - SUCC, j] as [j - SUCC, j - SUCC + SEG_S] and [j - SEG_S, j]: one window when SUCC is a power of 2
            first = _suppressed(s_ptr, rows, hmask, j - SUCC, m, strength, temperature, weight, H_PAD, BLOCK_B,
                                RADIUS, SEG, USE_NMS, USE_EXCL)
            if SEG_S == SUCC:
                s = _seg_max(first, s, H_PAD, BLOCK_B, SEG_S)
            else:
                mid = _suppressed(s_ptr, rows, hmask, j - SUCC + SEG_S, m, strength, temperature, weight, H_PAD,
                                  BLOCK_B, RADIUS, SEG, USE_NMS, USE_EXCL)
                last = _suppressed(s_ptr, rows, hmask, j - SEG_S, m, strength, temperature, weight, H_PAD,
                                   BLOCK_B, RADIUS, SEG, USE_NMS, USE_EXCL)
                s = tl.maximum(_seg_max(first, mid, H_PAD, BLOCK_B, SEG_S), _seg_max(last, s, H_PAD, BLOCK_B, SEG_S))
        if SPAN_BLOCK > 1:
            best = tl.max(tl.reshape(s, (H_PAD, BLOCK_B // SPAN_BLOCK, SPAN_BLOCK)), axis=2)
            s = tl.reshape(tl.broadcast_to(best[:, :, None], (H_PAD, BLOCK_B // SPAN_BLOCK, SPAN_BLOCK)),
                           (H_PAD, BLOCK_B))
        s = tl.where((j < m)[None, :], s, float("-inf"))
        tl.store(out_ptr + rows + j[None, :], s, mask=hmask[:, None] & (j < C)[None, :])


def _check(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor,
           norm_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    if z.dim() != 4:
        raise ValueError(f"expected z [P, H, R, C], got {tuple(z.shape)}")
    p, h, r, c = z.shape
    if r < 1:
        raise ValueError(f"expected z [P, H, R, C] with R >= 1, got {tuple(z.shape)}")
    if norm_at is not None:
        if norms.dim() != 3 or norms.shape[1] != h:
            raise ValueError(f"expected norms [N, {h}, S] with norm_at, got {tuple(norms.shape)}")
        if any(tuple(t.shape) != (p,) or t.dtype != torch.int32 for t in norm_at):
            raise ValueError(f"expected norm_at rows and start int32 [{p}]")
    elif tuple(norms.shape) != (p, h, c):
        raise ValueError(f"expected norms [P, H, C] = {(p, h, c)}, got {tuple(norms.shape)}")
    if tuple(n.shape) != (p,):
        raise ValueError(f"expected n [P] = {(p,)}, got {tuple(n.shape)}")
    if n.dtype.is_floating_point or n.dtype == torch.bool:
        raise ValueError(f"expected an integer n, got {n.dtype}")


def _chunking(p: int, h: int, c: int, block: int, programs: int) -> tuple[int, int]:
    """(positions per chunk, a multiple of block; chunks NS): about `programs` programs over the P*H problems."""
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    chunk = cdiv(cdiv(c, max(1, cdiv(programs, p * h))), block) * block
    return chunk, cdiv(c, chunk)


def selector_scores(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor, params, *, block: int | None = None,
                    block_b: int | None = None, chunk: int | None = None, programs: int | None = None,
                    num_warps: int = 4, norm_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """See the module docstring. block/block_b: positions per step of kernels 1-3 / per program of kernel 4;
    chunk: positions per program of kernels 1-3 (a multiple of block), by default such that kernels 1-3 run
    about `programs` programs (P*H*NS)."""
    _check(z, norms, n, norm_at)
    if triton is None or not (z.is_cuda or interpreting()):
        return selector_scores_ref(z, norms, n, params, norm_at)
    if z.stride(-1) != 1 or norms.stride(-1) != 1:
        raise ValueError(f"z and norms must be contiguous along positions; strides {z.stride()}, {norms.stride()}")
    if n.device != z.device or norms.device != z.device:
        raise ValueError(f"z, norms and n must share a device; got {z.device}, {norms.device}, {n.device}")
    prm = {k: getattr(params, k) for k in _PARAMS}
    p_count, h, r, c = z.shape
    out = torch.empty(p_count, h, c, dtype=torch.float32, device=z.device)
    if out.numel() == 0:
        return out
    interp = interpreting()
    # The interpreter runs programs one by one: few, wide ones.
    block = block or (min(256, max(16, triton.next_power_of_2(c))) if interp else 512)
    block_b = block_b or (min(256, max(16, triton.next_power_of_2(c))) if interp else 512)
    if chunk is None:
        chunk, ns = _chunking(p_count, h, c, block, programs or (2 * p_count * h if interp else 2048))
    else:
        if chunk % block:
            raise ValueError(f"chunk {chunk} must be a multiple of block {block}")
        ns = -(-c // chunk)
    r_pad = max(2, triton.next_power_of_2(r))
    ns_pad = max(2, triton.next_power_of_2(ns))
    use_prior = bool(prm["use_prior"])
    use_nms = bool(prm["use_nms"])
    use_excl = bool(prm["use_exclusivity"]) and h > 2
    alpha = float(prm["alpha"]) if prm["use_power_mean"] else 1.0
    lam_max = float(prm["lam_max_multi"] if r > 1 else prm["lam_max_single"])
    part_m = torch.empty(p_count * h, ns, r_pad, dtype=torch.float32, device=z.device)
    part_d = torch.empty_like(part_m)
    stats = torch.empty(p_count * h, ns, 8, dtype=torch.float32, device=z.device)
    lf = torch.empty_like(out)
    lr = torch.empty_like(out) if use_prior else lf
    succ, span_block = int(prm["span_successors"]), int(prm["span_block"])
    if span_block < 1 or span_block & (span_block - 1):
        raise ValueError(f"expected span_block a power of two, got {span_block}")
    last_pass = use_nms or use_excl or succ > 0 or span_block > 1
    s = lf if last_pass else out
    grid = (p_count * h, ns)
    zs, ns_ = (z.stride(0), z.stride(1), z.stride(2)), (norms.stride(0), norms.stride(1))
    consts = (alpha, math.log(r), float(prm["gamma"]), float(prm["w_l2"]), float(prm["w_pos"]),
              max(float(prm["pos_p"]), 1.0), float(prm["pos_eta"]), float(prm["pos_beta"]))
    _row_lse_kernel[grid](z, n, part_m, part_d, *zs, chunk, ns, H=h, R=r, R_PAD=r_pad, BLOCK=block,
                          num_warps=num_warps)
    _mix_stats_kernel[grid](z, norms, *(norm_at or (n, n)), n, part_m, part_d, stats, lf, lr, *zs, *ns_, c, chunk,
                            ns, *consts, H=h, R=r, R_PAD=r_pad, NS_PAD=ns_pad, BLOCK=block, USE_PRIOR=use_prior,
                            HAS_AT=norm_at is not None, num_warps=num_warps)
    _fuse_kernel[grid](lf, lr, n, stats, s, c, chunk, ns, lam_max,
                       H=h, NS_PAD=ns_pad, BLOCK=block, USE_PRIOR=use_prior, num_warps=num_warps)
    if last_pass:
        radius = int(prm["nms_radius"])
        seg = triton.next_power_of_2(max(radius, 1))
        seg_s = 1 << (max(succ, 1).bit_length() - 1)  # the largest power of two <= succ
        block_b = max(block_b, seg, seg_s, span_block)
        _nms_excl_kernel[(p_count, triton.cdiv(c, block_b))](
            s, out, n, c, float(prm["nms_strength"]), float(prm["excl_temperature"]), float(prm["excl_weight"]),
            H=h, H_PAD=max(2, triton.next_power_of_2(h)), BLOCK_B=block_b, RADIUS=radius, SEG=seg,
            USE_NMS=use_nms, USE_EXCL=use_excl, SUCC=succ, SEG_S=seg_s, SPAN_BLOCK=span_block, num_warps=4)
    return out
