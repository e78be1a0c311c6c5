"""The Selector's scores s'' for many independent problems at once, fused (see sfi/selector.py `scores`).

z [P, H, R, C] float32 scaled logits (P problems such as layers or batch slots, H KV heads, R query rows per
head, C capacity); norms [P, H, C] key L2 norms; n [P] int32 on the device, the domain length of each problem
(0 <= n[p] <= C). Positions j >= n[p] are never read (they may hold NaN). Returns s'' [P, H, C] float32: the
reference's scores on the first n[p] positions, -inf after. Every row sees the whole domain (decode refreshes),
so lam_max is lam_max_multi when R > 1, lam_max_single when R == 1. `params` is any object with the fields of
sfi.selector.SelectorParams (this package does not import sfi).

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
                        four loads per position whatever the radius) and exclusivity across the H heads; skipped
                        when neither applies (3 then writes the result).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the reference
    triton = None

EPS = 1e-12
_PARAMS = ("alpha", "gamma", "w_l2", "w_pos", "pos_p", "pos_eta", "pos_beta", "lam_max_multi", "lam_max_single",
           "nms_radius", "nms_strength", "excl_temperature", "excl_weight", "use_power_mean", "use_prior",
           "use_nms", "use_exclusivity")


def _scores_one(z: torch.Tensor, norms: torch.Tensor, prm) -> torch.Tensor:
    """sfi.selector.scores restated for one problem: z [H, R, m], norms [H, m] -> s'' [H, m]."""
    z = z.float()
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    ok = torch.isfinite(logp).any(dim=-1)  # [H, R] rows with a domain
    alpha = prm.alpha if prm.use_power_mean else 1.0
    scaled = torch.where(ok[..., None], alpha * logp, torch.full_like(logp, -math.inf))
    log_f = (torch.logsumexp(scaled, dim=-2) - ok.sum(-1).clamp(min=1).float().log()[..., None]) / alpha
    s = log_f = log_f - torch.logsumexp(log_f, dim=-1, keepdim=True)
    if prm.use_prior:
        m = z.shape[-1]
        u = (torch.arange(m, dtype=torch.float32, device=z.device) / max(m - 1, 1)).clamp(0, 1)
        log_r = prm.w_l2 * (-prm.gamma * norms.float().clamp(min=EPS).log()) + prm.w_pos * (
            -prm.pos_beta * u.pow(max(prm.pos_p, 1.0)) + prm.pos_eta * (1 - u).clamp(min=EPS).log())
        log_r = log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)
        f, r = log_f.exp(), log_r.exp()
        ff, fr, rr = (f * f).sum(-1), (f * r).sum(-1), (r * r).sum(-1)
        lam_max = prm.lam_max_multi if int(ok.sum(-1).max()) > 1 else prm.lam_max_single
        lam = ((ff - fr) / (ff - 2 * fr + rr).clamp(min=EPS)).clamp(0.0, lam_max).clamp(max=1 - EPS)[..., None]
        b = torch.where(lam > 0, lam.clamp(min=EPS).log() + log_r, torch.full_like(log_r, -math.inf))
        s = torch.logaddexp(torch.log1p(-lam) + log_f, b)
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    if prm.use_nms:
        rad = prm.nms_radius
        win = torch.nn.functional.max_pool1d(s[:, None], 2 * rad + 1, stride=1, padding=rad)[:, 0]
        s = s - prm.nms_strength * (win - s).clamp(min=0)
    if prm.use_exclusivity and s.shape[0] > 2:
        s = s + prm.excl_weight * torch.softmax(s / prm.excl_temperature, dim=0).clamp(min=EPS).log()
    return s


def selector_scores_ref(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor, params) -> torch.Tensor:
    """Pure torch, one problem at a time (reads n on the host)."""
    _check(z, norms, n)
    p_count, h, _, c = z.shape
    out = torch.full((p_count, h, c), -math.inf, dtype=torch.float32, device=z.device)
    for p, m in enumerate(n.tolist()):
        if m > 0:
            out[p, :, :m] = _scores_one(z[p, :, :, :m], norms[p, :, :m], params)
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

    @triton.jit
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

    @triton.jit
    def _mix_stats_kernel(z_ptr, nrm_ptr, n_ptr, part_m_ptr, part_d_ptr, stats_ptr, lf_ptr, lr_ptr,
                          stride_zp, stride_zh, stride_zr, stride_np, stride_nh, C, CHUNK, NS,
                          alpha, log_rows, gamma, w_l2, w_pos, pos_pow, pos_eta, pos_beta,
                          H: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, NS_PAD: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PRIOR: tl.constexpr):
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

    @triton.jit
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
    def _window_max(s_ptr, rows, hmask, a, m, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, SEG: tl.constexpr):
        """[H_PAD, BLOCK_B] max of s over positions [a, a + SEG] (out of the domain: -inf), a = start + arange.

        Within segments of SEG lanes, a suffix max of the tile at a and a prefix max of the tile at a + SEG
        meet: together they cover [a, a + SEG] exactly (van Herk / Gil-Werman), two loads instead of SEG + 1."""
        lo = tl.load(s_ptr + rows + a[None, :], mask=hmask[:, None] & ((a >= 0) & (a < m))[None, :],
                     other=float("-inf"))
        b = a + SEG
        hi = tl.load(s_ptr + rows + b[None, :], mask=hmask[:, None] & ((b >= 0) & (b < m))[None, :],
                     other=float("-inf"))
        suf = tl.associative_scan(tl.reshape(lo, (H_PAD, BLOCK_B // SEG, SEG)), 2, _max2, reverse=True)
        pre = tl.associative_scan(tl.reshape(hi, (H_PAD, BLOCK_B // SEG, SEG)), 2, _max2)
        return tl.reshape(tl.maximum(suf, pre), (H_PAD, BLOCK_B))

    @triton.jit
    def _nms_excl_kernel(s_ptr, out_ptr, n_ptr, C, strength, temperature, weight,
                         H: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, RADIUS: tl.constexpr,
                         SEG: tl.constexpr, USE_NMS: tl.constexpr, USE_EXCL: tl.constexpr):
        """out [P, H, C] from s [P, H, C] (both contiguous): soft NMS, then exclusivity across the H heads."""
        p = tl.program_id(0)
        blk = tl.program_id(1)
        m = tl.load(n_ptr + p)
        hh = tl.arange(0, H_PAD)
        hmask = hh < H
        j = blk * BLOCK_B + tl.arange(0, BLOCK_B)
        jmask = j < m
        valid = hmask[:, None] & jmask[None, :]
        rows = (p.to(tl.int64) * H + hh)[:, None] * C
        s = tl.load(s_ptr + rows + j[None, :], mask=valid, other=float("-inf"))
        if USE_NMS and RADIUS > 0:
            # [j - RADIUS, j + RADIUS] as two windows of SEG + 1 positions (RADIUS <= SEG <= 2 * RADIUS)
            win = tl.maximum(_window_max(s_ptr, rows, hmask, j - RADIUS, m, H_PAD, BLOCK_B, SEG),
                             _window_max(s_ptr, rows, hmask, j + RADIUS - SEG, m, H_PAD, BLOCK_B, SEG))
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
        s = tl.where(jmask[None, :], s, float("-inf"))
        tl.store(out_ptr + rows + j[None, :], s, mask=hmask[:, None] & (j < C)[None, :])


def _check(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor) -> None:
    if z.dim() != 4:
        raise ValueError(f"expected z [P, H, R, C], got {tuple(z.shape)}")
    p, h, r, c = z.shape
    if r < 1:
        raise ValueError(f"expected z [P, H, R, C] with R >= 1, got {tuple(z.shape)}")
    if tuple(norms.shape) != (p, h, c):
        raise ValueError(f"expected norms [P, H, C] = {(p, h, c)}, got {tuple(norms.shape)}")
    if tuple(n.shape) != (p,):
        raise ValueError(f"expected n [P] = {(p,)}, got {tuple(n.shape)}")
    if n.dtype.is_floating_point or n.dtype == torch.bool:
        raise ValueError(f"expected an integer n, got {n.dtype}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _chunking(p: int, h: int, c: int, block: int, programs: int) -> tuple[int, int]:
    """(positions per chunk, a multiple of block; chunks NS): about `programs` programs over the P*H problems."""
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    chunk = cdiv(cdiv(c, max(1, cdiv(programs, p * h))), block) * block
    return chunk, cdiv(c, chunk)


def selector_scores(z: torch.Tensor, norms: torch.Tensor, n: torch.Tensor, params, *, block: int | None = None,
                    block_b: int | None = None, chunk: int | None = None, programs: int | None = None,
                    num_warps: int = 4) -> torch.Tensor:
    """See the module docstring. block/block_b: positions per step of kernels 1-3 / per program of kernel 4;
    chunk: positions per program of kernels 1-3 (a multiple of block), by default such that kernels 1-3 run
    about `programs` programs (P*H*NS)."""
    _check(z, norms, n)
    if triton is None or not (z.is_cuda or _interpreting()):
        return selector_scores_ref(z, norms, n, params)
    if z.stride(-1) != 1 or norms.stride(-1) != 1:
        raise ValueError(f"z and norms must be contiguous along positions; strides {z.stride()}, {norms.stride()}")
    if n.device != z.device or norms.device != z.device:
        raise ValueError(f"z, norms and n must share a device; got {z.device}, {norms.device}, {n.device}")
    prm = {k: getattr(params, k) for k in _PARAMS}
    p_count, h, r, c = z.shape
    out = torch.empty(p_count, h, c, dtype=torch.float32, device=z.device)
    if out.numel() == 0:
        return out
    interp = _interpreting()
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
    s = lf if (use_nms or use_excl) else out
    grid = (p_count * h, ns)
    zs, ns_ = (z.stride(0), z.stride(1), z.stride(2)), (norms.stride(0), norms.stride(1))
    consts = (alpha, math.log(r), float(prm["gamma"]), float(prm["w_l2"]), float(prm["w_pos"]),
              max(float(prm["pos_p"]), 1.0), float(prm["pos_eta"]), float(prm["pos_beta"]))
    _row_lse_kernel[grid](z, n, part_m, part_d, *zs, chunk, ns, H=h, R=r, R_PAD=r_pad, BLOCK=block,
                          num_warps=num_warps)
    _mix_stats_kernel[grid](z, norms, n, part_m, part_d, stats, lf, lr, *zs, *ns_, c, chunk, ns, *consts,
                            H=h, R=r, R_PAD=r_pad, NS_PAD=ns_pad, BLOCK=block, USE_PRIOR=use_prior,
                            num_warps=num_warps)
    _fuse_kernel[grid](lf, lr, n, stats, s, c, chunk, ns, lam_max,
                       H=h, NS_PAD=ns_pad, BLOCK=block, USE_PRIOR=use_prior, num_warps=num_warps)
    if use_nms or use_excl:
        radius = int(prm["nms_radius"])
        seg = triton.next_power_of_2(max(radius, 1))
        block_b = max(block_b, seg)
        _nms_excl_kernel[(p_count, triton.cdiv(c, block_b))](
            s, out, n, c, float(prm["nms_strength"]), float(prm["excl_temperature"]), float(prm["excl_weight"]),
            H=h, H_PAD=max(2, triton.next_power_of_2(h)), BLOCK_B=block_b, RADIUS=radius, SEG=seg,
            USE_NMS=use_nms, USE_EXCL=use_excl, num_warps=4)
    return out
