"""Numba kernels of the fit's streaming pass over a device chunk.

The pass is a few simple loops, each either compiled to SIMD code across (device, time) cells or
touching a device's numbers once, around vectorised numpy calls:

1. ``moments_kernel(R)`` reads each cell's R repeated reads once: repeat mean and unbiased
   variance (float32 out, relative rounding ~1e-7, far below any spread fitted), and a flag for
   NaN, inf or negative reads. It is compiled for the number of repeats R, so that LLVM unrolls
   the repeats and vectorises across cells (three times faster than a run-time R);
2. the caller fits each device's drift line with numpy (a log, a few products and one small
   matrix product over the chunk, all SIMD), see :mod:`._stats`;
3. ``sums_kernel`` adds the per-device results to per-level and per-read-noise-group sums, one
   run of devices with the same target at a time (no lookup per device when devices are stored
   level by level, any order works).

That fast path serves campaigns with R >= 2 reads at every (device, time) and one set of read
times. One read per time at read times shared by all devices (T <= MAX_PATTERN_TIMES) goes
through ``lines_kernel(T)``: SIMD passes in float32 over a block of devices (the logs of the
reads from their bits, each device's line from centred sums, g_P by a float32 exponential),
the per-level sums in float64, and the per-level-and-time sums as counts per pattern of reads
taken times the pattern's least-squares weights. Everything else (reads not taken with repeats,
per-device times) goes through ``cells_kernel`` (R >= 2: the moments of the reads taken in
each cell), a vectorised numpy log, and ``general_kernel``, which fits each device's line with
its own least-squares weights over the cells present; the paths give the same sums where they
overlap (tested).

Loops meant to be SIMD keep to what LLVM vectorises: every load unconditional (a ternary that
loads only on one side is a branch), selects on values, no array index that could be negative
(a slice indexed from 0 instead of ``range(a, b)``: Numba's wrap-around of negative indices
turns each load into a gather), reductions as sums or products with 0/1 flags.

The kernels release the GIL: the caller runs several device chunks at once in threads (no
barrier per parallel region, so a busy core does not stall the others), and adds the chunk sums
in chunk order, so results do not depend on the thread count. Devices are summed in blocks of
``BLOCK`` to limit rounding. The plain numpy references of the same sums live in
tests/test_fit.py and tests/test_campaign_v2.py; the kernels are compared with them.
"""
from __future__ import annotations

import functools
import math

import numba as nb
import numpy as np

__all__ = ["BLOCK", "N_LEVEL_SUMS", "N_LT_SUMS", "LN_XP_MAX", "MAX_PATTERN_TIMES",
           "moments_kernel", "sums_kernel", "cells_kernel", "general_kernel", "lines_kernel",
           "log_cells", "exp_cells", "rn_columns"]

#: Devices per partial sum (fixed, so that sums are the same on any number of threads).
BLOCK = 2048
#: Reassociation lets LLVM vectorise the repeat sums; no "nnan"/"ninf", the NaN checks stay.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@functools.lru_cache(maxsize=None)
def moments_kernel(r_n: int):
    """The moments kernel compiled for ``r_n`` repeats (cached in memory and on disk).

    The kernel ``moments(g, inv_gmax, m, s2, rel, x) -> int`` takes g: (cells * R,)
    reads [S] (float32 or float64, C order, the R reads of a cell adjacent) and fills, per cell,
    float32 arrays (cells,): the repeat mean m [S], the unbiased repeat variance s2 [S^2],
    rel = Var(ln m) = s2 / (R m^2) (delta method; dimensionless) and x = m / g_max
    (``inv_gmax`` = 1 / g_max [1/S]). Sums run in the precision of ``g``, shifted by each
    cell's first read (stable variance). It returns the number of cells with a NaN, inf or
    negative read.
    """
    if r_n < 2:
        raise ValueError(f"moments_kernel: r_n = {r_n}; the repeat variance needs >= 2 reads")
    inv = 1.0 / r_n
    inv_m1 = 1.0 / (r_n - 1)

    @nb.njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
    def moments(g, inv_gmax, m, s2, rel, x):
        bad = 0
        for c in range(m.size):
            b = r_n * c
            g0 = g[b]
            acc = g0 - g0
            acc2 = g0 - g0
            neg = g0 < 0.0
            for r in range(1, r_n):  # r_n is a compile-time constant: unrolled
                val = g[b + r]
                d = val - g0
                acc += d
                acc2 += d * d
                neg |= val < 0.0
            mean = np.float32(g0 + acc * inv)
            var = np.float32((acc2 - acc * acc * inv) * inv_m1)
            m[c] = mean
            s2[c] = var
            rel[c] = var / (mean * mean * np.float32(r_n))
            x[c] = mean * inv_gmax
            bad += np.int64(neg | (not abs(acc2) < np.inf))
        return bad

    return moments


def rn_columns(t_n: int) -> int:
    """Columns of the per-read-noise-group sums for T read times: n, sum x_ref, n_rss, sum rss,
    then T each of sum s2, sum (m^2 - s2/r), sum (r - 1), sum (1 - h), sum (1 - h) f2."""
    return 4 + 5 * t_n


#: Per-level sums: n_total, n, nu, nu^2, var(nu), g_P, g_P^2, g_P^2 var(ln g_P), unusable devices
#: (a read or repeat mean of 0 S, or fewer than two reads), excluded devices.
N_LEVEL_SUMS = 10
#: Per-level-and-time sums (general path): cells read, f2, w, w^2, v, v^2, reads not taken.
N_LT_SUMS = 7
#: A device's line is usable when its g_P lies within e^+-LN_XP_MAX of g_max (float32's range:
#: lines_kernel computes g_P / g_max in float32); beyond, a read of 0 S or a runaway line.
LN_XP_MAX = 87.0

@nb.njit(nogil=True, inline="always")
def _add_level(out_level, b, lev, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9):
    """Add one run's per-level sums (the N_LEVEL_SUMS columns, in order) to block b, level lev."""
    out_level[b, lev, 0] += c0
    out_level[b, lev, 1] += c1
    out_level[b, lev, 2] += c2
    out_level[b, lev, 3] += c3
    out_level[b, lev, 4] += c4
    out_level[b, lev, 5] += c5
    out_level[b, lev, 6] += c6
    out_level[b, lev, 7] += c7
    out_level[b, lev, 8] += c8
    out_level[b, lev, 9] += c9


_SUMS_SIG = [nb.void(nb.float32[:, ::1], nb.float32[:, ::1], nb.int64, gt[::1], gt[::1],
                     nb.float32[:, ::1], nb.float32[:, ::1], nb.float64[::1], nb.uint8[::1],
                     nb.boolean, nb.float64, nb.float64[::1], nb.float64[:, :, ::1],
                     nb.float64[:, :, ::1])
             for gt in (nb.float32, nb.float64)]


@nb.njit(_SUMS_SIG, cache=True, nogil=True)
def sums_kernel(m, s2, r_n, g_target, levels, line, var, gp, keep, by_programmed, g_max, edges,
                out_level, out_rn):
    """Add each device's drift-line results to per-level and per-read-noise-group sums (the fast
    path: R >= 2 reads at every cell, one set of read times).

    Parameters
    ----------
    m, s2 : (n, T) repeat mean [S] and variance [S^2]; r_n : repeats R;
    g_target : (n,) target conductance [S]; levels : (K,) sorted distinct targets [S] (each
    g_target is one of them);
    line : (2, n) slope (= -nu) and intercept (ln g_P / g_max) of each device's drift line;
    var : (2, n) their read-noise variances (all dimensionless);
    gp : (n,) g_P [S] (usable within e^+-LN_XP_MAX of g_max, so not NaN, 0 or inf);
    keep : (n,) uint8, 0 for a device kept, else its exclusion reason (not used);
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level;
    g_max [S]; out_level : (n_blocks, K, N_LEVEL_SUMS) zeroed; out_rn : (n_blocks, G,
    rn_columns(T)) zeroed.
    """
    n, t_n = m.shape
    n_blocks = out_level.shape[0]
    n_edges = edges.shape[0]
    inv_r = 1.0 / r_n
    dof = r_n - 1.0
    acc_rn = np.zeros(out_rn.shape[2])
    gp_lo = g_max * math.exp(-LN_XP_MAX)
    gp_hi = g_max * math.exp(LN_XP_MAX)
    for b in range(n_blocks):
        stop = min(n, (b + 1) * BLOCK)
        i = b * BLOCK
        while i < stop:  # one run of devices with the same target
            target = g_target[i]
            lev = np.searchsorted(levels, target)
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = 0.0
            while i < stop and g_target[i] == target:
                c0 += 1.0
                g = gp[i]
                if keep[i] != 0:
                    c9 += 1.0
                elif g > gp_lo and g < gp_hi:
                    nu = -np.float64(line[0, i])  # Eq. 8: ln g = ln g_P - nu L
                    var_i = np.float64(var[1, i])
                    c1 += 1.0
                    c2 += nu
                    c3 += nu * nu
                    c4 += var[0, i]
                    c5 += g
                    c6 += g * g
                    c7 += g * g * var_i
                    if by_programmed:  # (no array views in this loop: each costs a refcount)
                        xref = g / g_max
                        grp = np.searchsorted(edges, xref) - 1
                        grp = min(max(grp, 0), n_edges - 2)
                        out_rn[b, grp, 0] += 1.0
                        out_rn[b, grp, 1] += xref
                        for k in range(t_n):
                            sk = np.float64(s2[i, k])
                            mk = np.float64(m[i, k])
                            out_rn[b, grp, 4 + k] += sk
                            out_rn[b, grp, 4 + t_n + k] += mk * mk - sk * inv_r
                            out_rn[b, grp, 4 + 2 * t_n + k] += dof
                    else:  # x_ref: the caller uses the level's target
                        acc_rn[0] += 1.0
                        for k in range(t_n):
                            sk = np.float64(s2[i, k])
                            mk = np.float64(m[i, k])
                            acc_rn[4 + k] += sk
                            acc_rn[4 + t_n + k] += mk * mk - sk * inv_r
                else:
                    c8 += 1.0
                i += 1
            _add_level(out_level, b, lev, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9)
            if not by_programmed:
                for k in range(t_n):  # every device of the run has R - 1 at every time
                    acc_rn[4 + 2 * t_n + k] = acc_rn[0] * dof
                for q in range(acc_rn.size):
                    out_rn[b, lev, q] += acc_rn[q]
                    acc_rn[q] = 0.0


_CELLS_SIG = [nb.void(g[:, :, ::1], nb.float64, nb.float32[:, ::1], nb.float32[:, ::1],
                      nb.uint8[:, ::1], nb.float32[:, ::1]) for g in (nb.float32, nb.float64)]


@nb.njit(_CELLS_SIG, cache=True, nogil=True, error_model="numpy")
def cells_kernel(g, inv_gmax, m, s2, cnt, rel):
    """Per (device, time) cell of R >= 2 reads, some of them NaN (not taken): the count r of
    reads taken, their mean m [S] (NaN when r = 0), unbiased variance s2 [S^2] (0 when r < 2) and
    rel = s2 / (r m^2) = Var(ln m) (delta method; 0 when r < 2). Sums run in float64, shifted
    by the cell's first read taken (stable variance). ``inv_gmax`` [1/S] is unused but keeps the
    signature of the caller's scaling explicit."""
    n, t_n, r_n = g.shape
    for i in range(n):
        for k in range(t_n):
            c = 0
            g0 = 0.0
            acc = 0.0
            acc2 = 0.0
            for r in range(r_n):
                val = np.float64(g[i, k, r])
                if val != val:
                    continue
                if c == 0:
                    g0 = val
                d = val - g0
                acc += d
                acc2 += d * d
                c += 1
            cnt[i, k] = c
            if c == 0:
                m[i, k] = np.nan
                s2[i, k] = 0.0
                rel[i, k] = 0.0
                continue
            mean = g0 + acc / c
            var = (acc2 - acc * acc / c) / (c - 1) if c >= 2 else 0.0
            m[i, k] = mean
            s2[i, k] = var
            rel[i, k] = var / (c * mean * mean) if c >= 2 and mean > 0.0 else 0.0


_GENERAL_SIG = nb.void(nb.float32[:, ::1], nb.float32[:, ::1], nb.float32[:, ::1],
                       nb.float32[:, ::1], nb.uint8[:, ::1], nb.int64, nb.float64[:, ::1],
                       nb.float64[:, ::1], nb.uint8[::1], nb.float64[::1], nb.float64[::1],
                       nb.boolean, nb.boolean, nb.float64, nb.float64[::1],
                       nb.float64[:, :, ::1], nb.float64[:, :, :, ::1], nb.float64[:, :, ::1])


@nb.njit(_GENERAL_SIG, cache=True, nogil=True, error_model="numpy")
def general_kernel(y, rel, m, s2, cnt, r_n, L, f2, keep, g_target, levels, repeats_mode,
                   by_programmed, g_max, edges, out_level, out_lt, out_rn):
    """Per-device drift lines over the cells that exist, and their per-level, per-level-and-time
    and per-read-noise-group sums (the general path: missing reads, per-device times, R >= 1).

    Per device: an ordinary least-squares line of y_k against L_k over the cells present (y not
    NaN): slope = sum w_k y_k, intercept = sum v_k y_k with w_k = (n L_k - S1) / D,
    v_k = (S2 - S1 L_k) / D (S1 = sum L, S2 = sum L^2, D = n S2 - S1^2, n cells); the read-noise
    variances of slope and intercept from the repeats, sum w_k^2 rel_k and sum v_k^2 rel_k; the
    hat values h_k = v_k + w_k L_k and the residual sum of squares (devices with >= 3 cells) for
    the read noise without repeats. A device with a cell of -inf (a mean read of 0 S) or fewer
    than two cells has no usable line.

    Parameters
    ----------
    y : (n, T) float32, ln(m_k / g_max) (+ rel_k / 2 with repeats: the bias of the log of a noisy
        mean), NaN for a cell without reads
    rel : (n, T) float32, Var(ln m_k) from the repeats, or (0, 0) without repeats
    m, s2 : (n, T) float32, repeat mean [S] and variance [S^2], or (0, 0) without repeats
    cnt : (n, T) uint8, reads taken per cell, or (0, 0) without repeats (then a NaN y is one
        read not taken)
    r_n : int, reads per cell R
    L, f2 : (1 or n, T) float64, ln((t_eq + t0) / t0) and the read-noise time term
        ln((t_eff + T_read) / (2 T_read)) (both dimensionless); one row for all devices or one
        per device
    keep : (n,) uint8, 0 for a device kept, else its exclusion reason
    g_target : (n,) float64 target [S]; levels : (K,) float64 sorted distinct targets [S]
    repeats_mode : bool, R >= 2 (read noise from the repeats)
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level
    g_max : float [S]
    out_level : (n_blocks, K, N_LEVEL_SUMS) zeroed
    out_lt : (n_blocks, K, T, N_LT_SUMS) zeroed
    out_rn : (n_blocks, G, rn_columns(T)) zeroed
    """
    n, t_n = y.shape
    shared = L.shape[0] == 1
    n_blocks = out_level.shape[0]
    n_edges = edges.shape[0]
    inv_gmax = 1.0 / g_max
    n_lt = out_lt.shape[3]
    ws = np.empty(t_n)
    vs = np.empty(t_n)
    acc_lv = np.zeros(out_level.shape[2])
    acc_lt = np.zeros((t_n, n_lt))
    acc_rn = np.zeros(out_rn.shape[2])
    for b in range(n_blocks):
        stop = min(n, (b + 1) * BLOCK)
        i = b * BLOCK
        while i < stop:  # one run of devices with the same target
            target = g_target[i]
            lev = np.searchsorted(levels, target)
            while i < stop and g_target[i] == target:
                row = 0 if shared else i
                acc_lv[0] += 1.0
                if keep[i] != 0:
                    acc_lv[9] += 1.0
                    i += 1
                    continue
                n_c = 0
                s1 = 0.0
                s2_ = 0.0
                usable = True
                for k in range(t_n):
                    yk = y[i, k]
                    if repeats_mode:
                        acc_lt[k, 6] += r_n - cnt[i, k]
                    if yk != yk:
                        if not repeats_mode:
                            acc_lt[k, 6] += 1.0
                        continue
                    if yk == -np.inf:
                        usable = False
                    lk = L[row, k]
                    n_c += 1
                    s1 += lk
                    s2_ += lk * lk
                den = n_c * s2_ - s1 * s1
                if not usable or n_c < 2 or not den > 1e-12 * n_c * s2_:
                    acc_lv[8] += 1.0  # a read of 0 S, or fewer than two times
                    i += 1
                    continue
                slope = 0.0
                inter = 0.0
                var_s = 0.0
                var_i = 0.0
                inv_den = 1.0 / den
                for k in range(t_n):
                    yk = np.float64(y[i, k])
                    if yk != yk:
                        continue
                    lk = L[row, k]
                    wk = (n_c * lk - s1) * inv_den
                    vk = (s2_ - s1 * lk) * inv_den
                    ws[k] = wk
                    vs[k] = vk
                    slope += wk * yk
                    inter += vk * yk
                    if repeats_mode:
                        rk = np.float64(rel[i, k])
                        var_s += wk * wk * rk
                        var_i += vk * vk * rk
                ln_xp = inter - 0.5 * var_i
                gp = g_max * np.exp(ln_xp)
                if not abs(ln_xp) < LN_XP_MAX:
                    acc_lv[8] += 1.0
                    i += 1
                    continue
                nu = -slope  # Eq. 8: ln g = ln g_P - nu L
                acc_lv[1] += 1.0
                acc_lv[2] += nu
                acc_lv[3] += nu * nu
                acc_lv[4] += var_s
                acc_lv[5] += gp
                acc_lv[6] += gp * gp
                acc_lv[7] += gp * gp * var_i
                acc_rn[0] += 1.0
                rss = 0.0
                for k in range(t_n):
                    yk = np.float64(y[i, k])
                    if yk != yk:
                        continue
                    lk = L[row, k]
                    wk = ws[k]
                    vk = vs[k]
                    fk = f2[row, k]
                    e = yk - inter - slope * lk
                    rss += e * e
                    acc_lt[k, 0] += 1.0
                    acc_lt[k, 1] += fk
                    acc_lt[k, 2] += wk
                    acc_lt[k, 3] += wk * wk
                    acc_lt[k, 4] += vk
                    acc_lt[k, 5] += vk * vk
                    if repeats_mode and cnt[i, k] >= 2:
                        sk = np.float64(s2[i, k])
                        mk = np.float64(m[i, k])
                        acc_rn[4 + k] += sk
                        acc_rn[4 + t_n + k] += mk * mk - sk / cnt[i, k]
                        acc_rn[4 + 2 * t_n + k] += cnt[i, k] - 1.0
                    if n_c >= 3:
                        h = vk + wk * lk
                        acc_rn[4 + 3 * t_n + k] += 1.0 - h
                        acc_rn[4 + 4 * t_n + k] += (1.0 - h) * fk
                if n_c >= 3:
                    acc_rn[2] += 1.0
                    acc_rn[3] += rss
                if by_programmed:  # group: the bin of x_P = g_P / g_max
                    xref = gp * inv_gmax
                    grp = min(max(np.searchsorted(edges, xref) - 1, 0), n_edges - 2)
                    acc_rn[1] += xref
                    for q in range(acc_rn.size):
                        out_rn[b, grp, q] += acc_rn[q]
                        acc_rn[q] = 0.0
                i += 1
            for q in range(acc_lv.size):
                out_level[b, lev, q] += acc_lv[q]
                acc_lv[q] = 0.0
            for k in range(t_n):
                for q in range(n_lt):
                    out_lt[b, lev, k, q] += acc_lt[k, q]
                    acc_lt[k, q] = 0.0
            if not by_programmed:
                for q in range(acc_rn.size):
                    out_rn[b, lev, q] += acc_rn[q]
                    acc_rn[q] = 0.0


#: Most read times for :func:`lines_kernel` (one table entry per pattern of reads taken: 2^T).
MAX_PATTERN_TIMES = 16
#: Most distinct patterns of reads taken in one chunk for :func:`lines_kernel`.
MAX_PATTERNS = 1024
_LN2 = 0.6931471805599453
_FLT_MIN = 1.1754943508222875e-38  # smallest normal float32
_FLT_MAX = 3.4028234663852886e+38
_F = np.float32
#: Fused multiply-add only: no reassociation, so a loop's result does not depend on how LLVM
#: vectorises it.
_CONTRACT = {"contract"}
#: Sums over devices may be reassociated (vectorised reductions; the order is fixed by the
#: compiled code, so results are the same on any thread count); no "nnan"/"ninf".
_SUMS = {"reassoc", "contract", "nsz"}

#: Bits of float32 sqrt(1/2) (0x3F3504F3).
_SQRT_HALF_BITS = np.int32(np.float32(math.sqrt(0.5)).view(np.int32))
_MANT = np.int32(0x7FFFFF)
#: ln 2 in two float32 parts: e * _LN2_HI_F is exact for |e| < 256 (16 significant bits).
_LN2_HI_F = _F(0.693145751953125)
_LN2_LO_F = _F(1.428606765330187e-06)


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def _log_f32(x, e_gmax, ln_m_gmax):
    """ln(x / g_max) as float32 for a normal, finite float32 x > 0, without a call into libm and
    all in float32 and int32 (so that LLVM vectorises a loop of it, 8 reads at once with AVX2).

    x = m 2^e, m in [sqrt(1/2), sqrt(2)): the bits of x minus the bits of sqrt(1/2) hold e in
    their exponent field (arithmetic shift) and, added back to the bits of sqrt(1/2), the
    mantissa field gives m. With g_max = m_g 2^e_g (``e_gmax``, ``ln_m_gmax`` = ln m_g in
    float32): ln(x / g_max) = (e - e_g) ln 2 + ln m - ln m_g, (e - e_g) ln 2 from ln 2 in two
    parts (the first product exact), ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by
    its series to s^9 (truncation < 2 |s|^11 / 11 < 6e-10). Within about one float32 rounding of
    the exact ln(x / g_max) (tested against np.log over the whole float32 range).
    """
    bits = np.float32(x).view(np.int32)
    t = np.int32(bits - _SQRT_HALF_BITS)  # int32 throughout: 8 lanes of AVX2
    e = np.int32(t >> 23)
    m_bits = np.int32((t & _MANT) + _SQRT_HALF_BITS)
    m = m_bits.view(np.float32)
    s = (m - _F(1.0)) / (m + _F(1.0))
    z = s * s
    ln_m = _F(2.0) * s * (_F(1.0) + z * (_F(1.0 / 3.0) + z * (_F(1.0 / 5.0) + z * (
        _F(1.0 / 7.0) + z * _F(1.0 / 9.0)))))
    ef = _F(np.int32(e - e_gmax))  # exact
    return ef * _LN2_HI_F + (ef * _LN2_LO_F + (ln_m - ln_m_gmax))


@nb.njit(nogil=True)
def _split_gmax(ln_gmax):
    """(e_g int32, ln m_g float32) of g_max = m_g 2^e_g, m_g in [sqrt(1/2), sqrt(2))."""
    m_g, e_g = math.frexp(math.exp(ln_gmax))  # m_g in [1/2, 1)
    if m_g < math.sqrt(0.5):
        e_g -= 1
    return np.int32(e_g), _F(ln_gmax - e_g * _LN2)


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def _log_read(x, e_gmax, ln_m_gmax):
    """(ln(x / g_max) as float32, odd) of one read x [S] (float32 or float64) by
    :func:`_log_f32` of float32(x), branch-free (so that a loop of it stays SIMD): NaN for a
    read not taken (NaN), -inf for 0 S; odd is True when x is neither NaN, 0 nor a normal
    float32 > 0 (subnormal, beyond float32's range, +inf or negative), and then
    :func:`_log_odd` sets that read's log."""
    x32 = np.float32(x)
    normal = (x32 >= _F(_FLT_MIN)) & (x32 <= _F(_FLT_MAX))
    y = _log_f32(x32, e_gmax, ln_m_gmax)
    special = _F(-np.inf) if x32 == _F(0.0) else _F(np.nan)
    return (y if normal else special), (~normal & (x != 0.0) & (x == x))


@nb.njit(nogil=True, error_model="numpy")
def _log_odd(g, rows, ln_gmax, out, stride):
    """Finish :func:`_log_read` for reads g (n devices x ``rows`` reads, device-major) whose
    logs are at out[k * stride + j] (read k of device j): ln(g) - ln_gmax by np.log in float64
    for the reads > 0 outside float32's normal range, NaN for a negative read. Returns True
    when a read is negative or +inf."""
    bad = False
    for i in range(g.shape[0]):
        x = np.float64(g[i])
        x32 = np.float32(x)
        j, k = divmod(i, rows)
        if x > 0.0 and not (x32 >= _F(_FLT_MIN) and x32 <= _F(_FLT_MAX)):
            out[k * stride + j] = np.log(x) - ln_gmax
        elif x < 0.0:
            out[k * stride + j] = np.nan
        bad |= x < 0.0 or x == np.inf
    return bad


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def log_cells(g, ln_gmax, out):
    """out[j] = ln(g[j]) - ln_gmax: ln(g / g_max) of reads g [S] (float32 or float64, >= 0 or
    NaN), ``ln_gmax`` = ln(g_max / 1 S), into float32 ``out`` (the fits need ln g to ~1e-7):
    NaN for a read not taken (or negative), -inf for a read of 0 S.

    By :func:`_log_read` (SIMD across reads), as in :func:`lines_kernel`: within about one
    float32 rounding of the exact value (for float64 reads, one more for the rounding of g to
    float32); reads outside float32's normal range from np.log. Returns True when a read is
    negative or +inf (the caller raises, naming it).
    """
    e_gmax, ln_m_gmax = _split_gmax(ln_gmax)
    odd = False
    for j in range(g.shape[0]):
        y, o = _log_read(g[j], e_gmax, ln_m_gmax)
        out[j] = y
        odd |= o
    return _log_odd(g, 1, ln_gmax, out, 0) if odd else False


#: exp in float32 (:func:`_exp_f32`) for arguments in (-_EXP_F32_MAX, _EXP_F32_MAX): 2^n normal.
_EXP_F32_MAX = _F(87.0)
#: 1.5 * 2^23: x + _ROUND_F rounds float32 x to an integer held in the low bits of the result.
_ROUND_F = _F(12582912.0)
_LOG2E_F = _F(1.4426950408889634)
_EXP_TAYLOR_F = tuple(_F(1.0 / math.factorial(q)) for q in range(8))


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def _exp_f32(x):
    """exp(x) in float32 for |x| < 87 (float32 x), without a call into libm and all in float32
    and int32 (SIMD in a loop): exp(x) = 2^n exp(r), n = round(x / ln 2) (read from the low bits
    of x / ln 2 + 1.5 2^23), r = x - n ln 2 with ln 2 in two parts (|r| <= ln(2) / 2), exp(r) by
    its Taylor series to r^7 (truncation < 0.35^8 / 8! < 2e-9); 2^n built from its bits.
    Within about one float32 rounding of the exact value (tested)."""
    kd = np.float32(x * _LOG2E_F + _ROUND_F)
    n_bits = kd.view(np.int32)  # low bits: n
    nf = kd - _ROUND_F
    r = (x - nf * _LN2_HI_F) - nf * _LN2_LO_F
    p = _EXP_TAYLOR_F[7]
    p = p * r + _EXP_TAYLOR_F[6]
    p = p * r + _EXP_TAYLOR_F[5]
    p = p * r + _EXP_TAYLOR_F[4]
    p = p * r + _EXP_TAYLOR_F[3]
    p = p * r + _EXP_TAYLOR_F[2]
    p = p * r + _F(1.0)
    p = p * r + _F(1.0)
    scale = np.int32((n_bits + 127) << 23)  # 2^n, |n| <= 126
    return p * scale.view(np.float32)


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def exp_cells(x, out):
    """out[j] = exp(x[j]) for float32 x: :func:`_exp_f32` (SIMD across j) for |x| < 87, as in
    :func:`lines_kernel`, else np.exp in float64 (out float64)."""
    rare = False
    for j in range(x.shape[0]):
        xj = x[j]
        ok = (xj > -_EXP_F32_MAX) & (xj < _EXP_F32_MAX)
        out[j] = _exp_f32(xj if ok else _F(0.0))
        rare |= not ok
    if rare:
        for j in range(x.shape[0]):
            if not (x[j] > -_EXP_F32_MAX and x[j] < _EXP_F32_MAX):
                out[j] = np.exp(np.float64(x[j]))


@nb.njit(nogil=True, error_model="numpy")
def _pattern_weights(mask, L, w, v, one_minus_h):
    """Least-squares weights of slope (w) and intercept (v) of a line through the times with a
    bit set in ``mask`` (0 elsewhere), and 1 - h_k, h_k = v_k + w_k L_k the hat values (all 0
    when there is no line: fewer than two times, or times too close, as in general_kernel)."""
    t_n = L.shape[0]
    n_c = 0
    s1 = 0.0
    s2 = 0.0
    for k in range(t_n):
        if (mask >> k) & 1:
            n_c += 1
            s1 += L[k]
            s2 += L[k] * L[k]
    den = n_c * s2 - s1 * s1
    for k in range(t_n):
        w[k] = 0.0
        v[k] = 0.0
        one_minus_h[k] = 0.0
    if n_c < 2 or not den > 1e-12 * n_c * s2:
        return
    inv_den = 1.0 / den
    for k in range(t_n):
        if (mask >> k) & 1:
            w[k] = (n_c * L[k] - s1) * inv_den
            v[k] = (s2 - s1 * L[k]) * inv_den
            one_minus_h[k] = 1.0 - (v[k] + w[k] * L[k])


@nb.njit(nogil=True, inline="always", error_model="numpy")
def _centred(y, lk, ml, my):
    """(L_k - mean L, y_k - mean y) of a read taken (y not NaN), else (0, 0), in float32:
    loads done by the caller, selects on values (so that the loop stays SIMD)."""
    pk = y == y
    return (lk - ml if pk else _F(0.0)), (y - my if pk else _F(0.0))


@nb.njit(nogil=True, fastmath=_SUMS, error_model="numpy")
def _run_sums(keep, used, slope, xp, rss, three):
    """Sums over the devices of a run (one level; SIMD, in float64): (devices kept, used, sum
    nu, sum nu^2, sum x_P, sum x_P^2, used with >= 3 reads, their sum of RSS); nu = -slope
    (Eq. 8: ln g = ln g_P - nu L), x_P = g_P / g_max. ``used`` and ``three`` are 0 or 1, the
    values 0 for the devices they do not count. (Arrays of the run, indexed from 0: an index
    LLVM knows to be >= 0 needs no wrap-around, so the loads stay SIMD loads.)"""
    ck = c1 = c2 = c3 = c5 = c6 = r2 = r3 = 0.0
    for j in range(keep.shape[0]):
        sl = np.float64(slope[j])
        x = np.float64(xp[j])
        ck += 1.0 if keep[j] == 0 else 0.0
        c1 += np.float64(used[j])
        c2 -= sl
        c3 += sl * sl
        c5 += x
        c6 += x * x
        r2 += np.float64(three[j])
        r3 += np.float64(rss[j])
    return ck, c1, c2, c3, c5, c6, r2, r3


@nb.njit(nogil=True, error_model="numpy")
def _run_length(values):
    """The length of the run of values equal to values[0] (a SIMD check that all of them are
    first: devices are usually stored level by level)."""
    v = values[0]
    other = 0
    for j in range(values.shape[0]):
        other += values[j] != v
    if other == 0:
        return values.shape[0]
    e = 1
    while e < values.shape[0] and values[e] == v:
        e += 1
    return e


@nb.njit(nogil=True, error_model="numpy")
def _count_patterns(listed, mask, used, lev, slot_of, masks, n_slots, counts, slots):
    """Count the devices j with listed[j] != 0 (a run of one level) per (pattern of reads
    taken, used or not) in counts[slot, lev, used] (a new pattern takes the next slot, its mask
    in ``masks``), and note each one's slot in ``slots``. Returns (slots in use, or -1 when a
    pattern does not fit in ``masks``; devices counted; of them used)."""
    cap = masks.shape[0]
    idx = np.empty(listed.shape[0], np.int64)
    n_idx = 0
    for j in range(listed.shape[0]):  # branch-free list of the devices to count
        idx[n_idx] = j
        n_idx += listed[j]
    n_used = 0.0
    for q in range(n_idx):
        j = idx[q]
        m = mask[j]
        s = slot_of[m]
        if s < 0:
            if n_slots == cap:
                return -1, 0, 0.0
            s = n_slots
            n_slots += 1
            slot_of[m] = s
            masks[s] = m
        slots[j] = s
        u = used[j] != 0.0
        counts[s, lev, np.int64(u)] += 1.0
        n_used += u
    return n_slots, n_idx, n_used


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def _log_pass(g, n_b, e_gmax, ln_m_gmax, y, L32):
    """y[k * BLOCK + j] = ln(g / g_max) of read k of device j (time-major); T = len(L32)
    (a tuple: its length is known to the compiler, which unrolls the loop over the reads)."""
    t_n = len(L32)
    odd = False
    for j in range(n_b):
        for k in range(t_n):
            yk, o = _log_read(g[j * t_n + k], e_gmax, ln_m_gmax)
            y[k * BLOCK + j] = yk
            odd |= o
    return odd


@nb.njit(nogil=True, fastmath=_CONTRACT, error_model="numpy")
def _line_pass(y, n_b, L, keep, everyone, slope_a, rss_a, three_a, xp_a, used_a, mask_a,
               listed_a):
    """Each device's line through its reads taken (y not NaN), SIMD across devices (the
    loops over the T reads unrolled; every load unconditional, selects on values; all in
    float32 and int32, so 8 devices at once). listed = 1 for a kept device to count in the
    scalar loop: one with a read not taken, or any (``everyone``). ``L`` is a tuple of the T
    float32 log-times (its length known to the compiler, which unrolls the loops over reads).
    """
    t_n = len(L)
    zero, one = _F(0.0), _F(1.0)
    full = (1 << t_n) - 1  # all reads taken
    for j in range(n_b):
        nc = zero
        sl = zero
        sy = zero
        mask = 0
        for k in range(t_n):
            yk = y[k * BLOCK + j]
            lk = L[k]
            pk = yk == yk
            nc += one if pk else zero
            sl += lk if pk else zero
            sy += yk if pk else zero
            mask |= np.int32(pk) << k
        inv_n = one / (nc if nc > zero else one)
        ml = sl * inv_n
        my = sy * inv_n
        sxx = zero
        sxy = zero
        for k in range(t_n):
            dl, dy = _centred(y[k * BLOCK + j], L[k], ml, my)
            sxx += dl * dl
            sxy += dl * dy
        ok = (nc >= _F(2.0)) & (sxx > _F(1e-10) * (sxx + nc * ml * ml))
        slope = sxy / (sxx if ok else one)
        inter = my - slope * ml
        rss = zero
        for k in range(t_n):
            dl, dy = _centred(y[k * BLOCK + j], L[k], ml, my)
            e = dy - slope * dl
            rss += e * e
        # a line, no read of 0 S (-inf), x_P within e^+-87
        ok &= (abs(slope) < _F(np.inf)) & (abs(inter) < _F(LN_XP_MAX))
        xp = _exp_f32(inter if ok else zero)
        kept = keep[j] == 0
        used = kept & ok
        three = used & (nc >= _F(3.0))
        slope_a[j] = slope if used else zero
        rss_a[j] = rss if three else zero
        three_a[j] = one if three else zero
        xp_a[j] = xp if used else zero
        used_a[j] = one if used else zero
        mask_a[j] = mask
        listed_a[j] = kept & (everyone | (mask != full))


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _lines(g, L, L32, f2, keep, g_target, levels, by_programmed, g_max, edges, out_level,
           out_lt, out_rn):
    """:func:`lines_kernel`'s kernel; L32 the float32 log-times as a tuple (T = its length)."""
    t_n = len(L32)
    full = (1 << t_n) - 1  # all reads taken
    n = keep.shape[0]
    n_blocks = out_level.shape[0]
    n_lev = levels.shape[0]
    n_grp = out_rn.shape[1]
    n_edges = edges.shape[0]
    ln_gmax = np.log(g_max)
    e_gmax, ln_m_gmax = _split_gmax(ln_gmax)
    slot_of = np.full(1 << t_n, -1, np.int64)
    cap = min(1 << t_n, MAX_PATTERNS)
    masks = np.zeros(cap, np.int64)
    slot_of[full] = 0  # slot 0: all reads taken
    masks[0] = full
    n_slots = 1
    counts = np.zeros((cap, n_lev, 2))  # devices kept without / with a usable line
    used_grp = np.zeros((cap, n_grp)) if by_programmed else np.zeros((0, 0))
    y = np.empty(BLOCK * t_n, np.float32)
    slope_a = np.empty(BLOCK, np.float32)
    rss_a = np.empty(BLOCK, np.float32)
    three_a = np.empty(BLOCK, np.float32)
    used_a = np.empty(BLOCK, np.float32)
    xp_a = np.empty(BLOCK, np.float32)
    mask_a = np.empty(BLOCK, np.int32)
    listed_a = np.empty(BLOCK, np.uint8)
    slots = np.empty(BLOCK, np.int64)
    bad = False
    for b in range(n_blocks):
        first = b * BLOCK
        stop = min(n, first + BLOCK)
        n_b = stop - first
        gb = g[first * t_n:stop * t_n]
        kb = keep[first:stop]
        if _log_pass(gb, n_b, e_gmax, ln_m_gmax, y, L32):
            bad |= _log_odd(gb, t_n, ln_gmax, y, BLOCK)
        _line_pass(y, n_b, L32, kb, by_programmed, slope_a, rss_a, three_a, xp_a, used_a,
                   mask_a, listed_a)
        a = 0
        while a < n_b:  # one run of devices with the same target
            lev = np.searchsorted(levels, g_target[first + a])
            e = a + _run_length(g_target[first + a:stop])
            ck, c1, c2, c3, c5, c6, r2, r3 = _run_sums(kb[a:e], used_a[a:e], slope_a[a:e],
                                                       xp_a[a:e], rss_a[a:e], three_a[a:e])
            _add_level(out_level, b, lev, e - a, c1, c2, c3, 0.0, c5 * g_max,
                       c6 * (g_max * g_max), 0.0, ck - c1, (e - a) - ck)
            # devices per (pattern, level): those listed (a read not taken; every kept
            # one for "programmed") counted one by one, the others (all reads taken) are
            # the rest of the sums
            n_slots, n_listed, n_used = _count_patterns(listed_a[a:e], mask_a[a:e],
                                                        used_a[a:e], lev, slot_of, masks,
                                                        n_slots, counts, slots[a:e])
            if n_slots < 0:
                return -1
            if by_programmed:
                for j in range(a, e):
                    if used_a[j] == 0.0:
                        continue
                    xref = xp_a[j]  # group: the bin of x_P = g_P / g_max
                    grp = min(max(np.searchsorted(edges, xref) - 1, 0), n_edges - 2)
                    out_rn[b, grp, 0] += 1.0
                    out_rn[b, grp, 1] += xref
                    if three_a[j] != 0.0:
                        out_rn[b, grp, 2] += 1.0
                        out_rn[b, grp, 3] += rss_a[j]
                        used_grp[slots[j], grp] += 1.0
            else:
                counts[0, lev, 0] += (ck - n_listed) - (c1 - n_used)
                counts[0, lev, 1] += c1 - n_used
                out_rn[b, lev, 0] += c1
                out_rn[b, lev, 2] += r2
                out_rn[b, lev, 3] += r3
            a = e
    # per (level or group, time): counts per pattern times the pattern's values
    w = np.zeros(t_n)
    v = np.zeros(t_n)
    h1 = np.zeros(t_n)  # 1 - h_k for a read taken, else 0
    for s in range(n_slots):
        mask = masks[s]
        _pattern_weights(mask, L, w, v, h1)
        nc = 0
        for k in range(t_n):
            nc += (mask >> k) & 1
        for lev in range(n_lev):
            cu = counts[s, lev, 1]
            ck = counts[s, lev, 0] + cu
            for k in range(t_n):
                if not (mask >> k) & 1:
                    out_lt[lev, k, 6] += ck
                elif cu > 0.0:
                    out_lt[lev, k, 0] += cu
                    out_lt[lev, k, 1] += cu * f2[k]
                    out_lt[lev, k, 2] += cu * w[k]
                    out_lt[lev, k, 3] += cu * (w[k] * w[k])
                    out_lt[lev, k, 4] += cu * v[k]
                    out_lt[lev, k, 5] += cu * (v[k] * v[k])
        if nc < 3:
            continue
        for grp in range(n_grp):
            c = used_grp[s, grp] if by_programmed else counts[s, grp, 1]
            if c > 0.0:
                for k in range(t_n):
                    if (mask >> k) & 1:
                        out_rn[0, grp, 4 + 3 * t_n + k] += c * h1[k]
                        out_rn[0, grp, 4 + 4 * t_n + k] += c * (h1[k] * f2[k])
    return 1 if bad else 0


def lines_kernel(t_n: int):
    """The kernel for one read per time (R = 1) at read times shared by all devices, compiled
    for ``t_n`` read times (cached on disk; LLVM unrolls the loops over times, whose number it
    takes from the length of a tuple of the log-times).

    ``lines(g, L, L32, f2, keep, g_target, levels, by_programmed, g_max, edges, out_level,
    out_lt, out_rn) -> int`` adds the sums of :func:`general_kernel` (without repeats) of one
    chunk; ``L32`` is ``tuple(L.astype(np.float32))``.

    Per BLOCK of devices, in passes that are plain SIMD loops (no branch on a read taken or
    not: masks and selects, 8 devices at once in float32 with AVX2):

    1. the logs of the reads y_k = ln(g_k / g_max) (:func:`_log_read`), stored time-major so
       that the next pass reads them with unit stride;
    2. each device's least-squares line of y_k against the log-times L_k over its reads taken,
       in float32 from the centred sums (no cancellation): n, mean L, mean y, S_xx = sum
       (L_k - mean L)^2, S_xy = sum (L_k - mean L)(y_k - mean y); slope = S_xy / S_xx,
       intercept = mean y - slope mean L (ln(g_P / g_max)); no usable line when n < 2 or
       S_xx <= 1e-10 sum L_k^2 (times float32 cannot tell apart; general_kernel, in float64,
       uses 1e-12), with a read of 0 S, or when g_P is not within e^+-87 of g_max (as in
       general_kernel); the residual sum of squares (lines through >= 3 reads); x_P = g_P /
       g_max (:func:`_exp_f32`); the pattern of reads taken (a bit mask). Rounding: ~1e-6
       relative on slope and intercept, far below the spreads fitted (tested against the
       float64 reference);
    3. per run of equal targets, the per-level sums (:func:`_run_sums`, accumulated in float64)
       and a count per (pattern, level) of the devices kept and used: devices with all reads
       taken are counted in the sums, the others in a short scalar loop
       (:func:`_count_patterns`).

    The sums per level and time (cells, f2, w, w^2, v, v^2, reads not taken) and per group and
    time (1 - h, (1 - h) f2) are these counts times each pattern's least-squares weights w_k, v_k
    and hat values h_k = v_k + w_k L_k (:func:`_pattern_weights`, in float64), added at the end
    (exact counts: no rounding grows with the devices). For the "programmed" read-noise groups
    every used device's group is looked up in the scalar loop.

    Parameters
    ----------
    g : (n * T,) reads [S] (float32 or float64; device-major), NaN for a read not taken
    L, f2 : (T,) float64, ln((t_eq + t0) / t0) and the read-noise time term (dimensionless)
    keep : (n,) uint8, 0 for a device kept, else its exclusion reason
    g_target : (n,) target [S] (float32 or float64); levels : (K,) float64 sorted distinct
        targets [S]
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level
    g_max : float [S]
    out_level : (n_blocks, K, N_LEVEL_SUMS) zeroed
    out_lt : (K, T, N_LT_SUMS) zeroed
    out_rn : (n_blocks, G, rn_columns(T)) zeroed

    Returns
    -------
    int
        -1 when the chunk holds more than MAX_PATTERNS patterns (the sums are incomplete: the
        caller runs general_kernel instead); else 1 when a read is negative or +inf (the sums
        are not valid: the caller raises, naming it), 0 when all went well.
    """
    if not 2 <= t_n <= MAX_PATTERN_TIMES:
        raise ValueError(f"lines_kernel: t_n = {t_n}; 2 to {MAX_PATTERN_TIMES} read times")
    return _lines
