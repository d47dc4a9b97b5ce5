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
through ``lines_kernel(T)``: SIMD logs of the reads (``log_cells``), each device's line from
the least-squares weights of its pattern of reads taken (computed once per pattern), SIMD
exponentials (``exp_cells``), residual sums, and the per-level-and-time sums as counts per
pattern times the pattern's weights. Everything else (reads not taken with repeats, per-device
times) goes through ``cells_kernel`` (R >= 2: the moments of the reads taken in each cell), a
vectorised numpy log, and ``general_kernel``, which fits each device's line with its own least-
squares weights over the cells present; the paths give the same sums where they overlap
(tested).

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

__all__ = ["BLOCK", "N_LEVEL_SUMS", "N_LT_SUMS", "MAX_PATTERN_TIMES", "moments_kernel",
           "sums_kernel", "cells_kernel", "general_kernel", "lines_kernel", "log_cells",
           "exp_cells", "rn_columns", "distinct_values"]

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
    gp : (n,) g_P [S] (NaN, 0 or inf: device not usable);
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
                elif g > 0.0 and g < np.inf:
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
                gp = g_max * np.exp(inter - 0.5 * var_i)
                if not (gp > 0.0 and gp < np.inf):
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
_SQRT2 = 1.4142135623730951
_FLT_MIN = 1.1754943508222875e-38  # smallest normal float32
_FLT_MAX = 3.4028234663852886e+38


_I1, _I23, _I127, _MANT = np.int32(1), np.int32(23), np.int32(127), np.int32(0x7FFFFF)
_F = np.float32


#: ln 2 in two float32 parts: e * _LN2_HI_F is exact for |e| < 256 (16 significant bits).
_LN2_HI_F = _F(0.693145751953125)
_LN2_LO_F = _F(1.428606765330187e-06)


@nb.njit(nogil=True, error_model="numpy")
def _log_normal_f32(bits, e_gmax, ln_m_gmax):
    """ln(x / g_max) as float32 for a normal, finite float32 x > 0 whose bits are ``bits``
    (int32), without a call into libm and all in float32 and int32 (so that LLVM vectorises a
    loop of it, 8 reads at once with AVX2).

    x = m 2^e, m in [sqrt(1/2), sqrt(2)), and g_max = m_g 2^e_g (``e_gmax``, ``ln_m_gmax`` =
    ln m_g in float32): ln(x / g_max) = (e - e_g) ln 2 + ln m - ln m_g, with (e - e_g) ln 2 from
    ln 2 in two parts (the first product exact) and ln m = 2 atanh(s), s = (m - 1) / (m + 1),
    |s| <= 0.172, by its series to s^9 (truncation < 2 |s|^11 / 11 < 6e-10). The result is
    within about one float32 rounding of the exact ln(x / g_max) (tested).
    """
    e = (bits >> _I23) - _I127
    m = _F(1.0) + _F(bits & _MANT) * _F(1.1920928955078125e-07)  # exact
    big = m > _F(_SQRT2)
    m = m * _F(0.5) if big else m
    e = e + _I1 if big else e
    s = (m - _F(1.0)) / (m + _F(1.0))
    z = s * s
    ln_m = _F(2.0) * s * (_F(1.0) + z * (_F(1.0 / 3.0) + z * (_F(1.0 / 5.0) + z * (
        _F(1.0 / 7.0) + z * _F(1.0 / 9.0)))))
    ef = _F(e - e_gmax)  # exact
    return ef * _LN2_HI_F + (ef * _LN2_LO_F + (ln_m - ln_m_gmax))


@nb.njit(nogil=True, error_model="numpy")
def _log_rare(g, start, count, ln_gmax, out):
    """out[j] = ln(g[start + j]) - ln_gmax where g[start + j] is subnormal or infinite."""
    for j in range(count):
        x = np.float64(g[start + j])
        if x > 0.0 and x < _FLT_MIN or x > _FLT_MAX:
            out[j] = np.log(x) - ln_gmax


_LN2_HI = 0.6931471803691238  # ln 2 in two parts: n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.9082149292705877e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(q) for q in range(13))


@nb.njit(nogil=True, error_model="numpy")
def exp_cells(x, out, scale_bits):
    """out[j] = exp(x[j]) for all j, SIMD across j (no call into libm but for the rare x outside
    [-700, 700], NaN included, which take np.exp).

    exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to
    r^12 (truncation < 0.35^13 / 13! < 2e-16 relative); 2^n is built from its bits in
    ``scale_bits`` (int64, at least x.size; overwritten). Relative error a few 1e-16.
    """
    n_x = x.shape[0]
    rare = np.int32(0)
    for j in range(n_x):
        xj = x[j]
        ok = xj > -700.0 and xj < 700.0
        xj = xj if ok else 0.0
        nf = np.floor(xj * 1.4426950408889634 + 0.5)
        r = (xj - nf * _LN2_HI) - nf * _LN2_LO
        p = _EXP_TAYLOR[12]
        p = p * r + _EXP_TAYLOR[11]
        p = p * r + _EXP_TAYLOR[10]
        p = p * r + _EXP_TAYLOR[9]
        p = p * r + _EXP_TAYLOR[8]
        p = p * r + _EXP_TAYLOR[7]
        p = p * r + _EXP_TAYLOR[6]
        p = p * r + _EXP_TAYLOR[5]
        p = p * r + _EXP_TAYLOR[4]
        p = p * r + _EXP_TAYLOR[3]
        p = p * r + _EXP_TAYLOR[2]
        p = p * r + 1.0
        p = p * r + 1.0
        out[j] = p
        scale_bits[j] = np.int64(np.int32(nf) + np.int32(1023)) << 52
        rare += np.int32(not ok)
    scale = scale_bits.view(np.float64)
    for j in range(n_x):
        out[j] *= scale[j]
    if rare:
        for j in range(n_x):
            xj = x[j]
            if not (xj > -700.0 and xj < 700.0):
                out[j] = np.exp(xj)


@nb.njit(nogil=True)
def _split_gmax(ln_gmax):
    """(e_g int32, ln m_g float32) of g_max = m_g 2^e_g, m_g in [1, 2)."""
    m_g, e_g = math.frexp(math.exp(ln_gmax))
    return np.int32(e_g - 1), _F(ln_gmax - (e_g - 1) * _LN2)


@nb.njit(nogil=True, error_model="numpy")
def _log_block(g, bits, start, count, e_gmax, ln_m_gmax, out):
    """out[j] = ln(g[start + j] / g_max) of float32 reads by :func:`_log_normal_f32` (SIMD
    across reads): NaN for a read not taken (or negative), -inf for 0 S, and +inf marking a
    subnormal or infinite read, which the caller recomputes with :func:`_log_rare` (no
    bookkeeping here, so that the loop stays a plain SIMD loop)."""
    for j in range(count):
        x = g[start + j]
        y = _log_normal_f32(bits[start + j], e_gmax, ln_m_gmax)
        normal = (x >= _F(_FLT_MIN)) & (x <= _F(_FLT_MAX))
        y = y if normal else (_F(-np.inf) if x == _F(0.0) else (
            _F(np.inf) if x > _F(0.0) else _F(np.nan)))
        out[j] = y


_LOG_SIG = [nb.void(g[::1], nb.int32[::1], nb.int64, nb.int64, nb.float64, nb.float32[::1])
            for g in (nb.float32, nb.float64)]


@nb.njit(_LOG_SIG, cache=True, nogil=True, error_model="numpy")
def log_cells(g, bits, start, count, ln_gmax, out):
    """out[j] = ln(g[start + j]) - ln_gmax for j < count: ln(g / g_max) of reads [S] (NaN for a
    read not taken, -inf for a read of 0 S), ``ln_gmax`` = ln(g_max / 1 S).

    ``out`` is float32 (the fits need ln g to ~1e-7). For float32 reads, ``bits`` is
    ``g.view(np.int32)`` and the logs come from :func:`_log_normal_f32` (SIMD across reads),
    subnormal or infinite ones from np.log; for float64 reads (``bits`` empty) from np.log. Reads are >= 0
    or NaN (checked by the caller).
    """
    if bits.size == 0:
        for j in range(count):
            out[j] = np.log(np.float64(g[start + j])) - ln_gmax
        return
    e_gmax, ln_m_gmax = _split_gmax(ln_gmax)
    _log_block(g, bits, start, count, e_gmax, ln_m_gmax, out)
    rare = False
    for j in range(count):
        rare |= out[j] == _F(np.inf)
    if rare:
        _log_rare(g, start, count, ln_gmax, out)


@nb.njit(nogil=True, error_model="numpy")
def _pattern_weights(mask, L, w, v, one_minus_h):
    """Least-squares weights of slope (w) and intercept (v) of a line through the times with a
    bit set in ``mask`` (0 elsewhere), and 1 - h_k, h_k = v_k + w_k L_k the hat values; w[0] is
    NaN when there is no line (fewer than two times, or times too close), as in general_kernel.
    """
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
        w[0] = np.nan
        return
    inv_den = 1.0 / den
    for k in range(t_n):
        if (mask >> k) & 1:
            w[k] = (n_c * L[k] - s1) * inv_den
            v[k] = (s2 - s1 * L[k]) * inv_den
            one_minus_h[k] = 1.0 - (v[k] + w[k] * L[k])


@functools.lru_cache(maxsize=None)
def lines_kernel(t_n: int):
    """The kernel for one read per time (R = 1) at read times shared by all devices, compiled
    for ``t_n`` read times (cached in memory and on disk; LLVM unrolls the loops over times).

    ``lines(g, bits, L, f2, keep, g_target, levels, by_programmed, g_max, edges, out_level,
    out_lt, out_rn) -> bool`` adds the sums of :func:`general_kernel` (without repeats) of one
    chunk.

    A device's least-squares weights w_k, v_k and hat values h_k = v_k + w_k L_k depend only on
    which of its T reads were taken (a bit pattern); they are computed once per pattern seen in
    the chunk (as in general_kernel) and kept in a table. Per BLOCK of devices, in short passes
    whose iterations are independent (so that the CPU overlaps devices): the logs of the reads
    (:func:`log_cells`), each device's pattern, its slope and intercept = (w, v) . y over the
    reads taken, g_P (:func:`exp_cells`), the residual sum of squares (>= 3 reads), then the
    per-level sums over the runs of equal targets. The device is counted per (level, pattern)
    and, for the "programmed" read-noise groups, per (group, pattern); the sums per level and
    time (cells, f2, w, w^2, v, v^2, reads not taken) and per group and time (1 - h,
    (1 - h) f2) are these counts times the pattern's values, added at the end (exact counts:
    no rounding grows with the devices).

    Parameters
    ----------
    g : (n, T) reads [S] (float32 or float64, C order), NaN for a read not taken, else >= 0
    bits : (n * T,) int32, ``g.view(np.int32)`` for float32 reads, else empty
    L, f2 : (T,) float64, ln((t_eq + t0) / t0) and the read-noise time term (dimensionless)
    keep : (n,) uint8, 0 for a device kept, else its exclusion reason
    g_target : (n,) float64 target [S]; levels : (K,) float64 sorted distinct targets [S]
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level
    g_max : float [S]
    out_level : (n_blocks, K, N_LEVEL_SUMS) zeroed
    out_lt : (K, T, N_LT_SUMS) zeroed
    out_rn : (n_blocks, G, rn_columns(T)) zeroed

    Returns
    -------
    bool
        False when the chunk holds more than MAX_PATTERNS patterns (the sums are incomplete: the
        caller runs general_kernel instead).
    """
    if not 2 <= t_n <= MAX_PATTERN_TIMES:
        raise ValueError(f"lines_kernel: t_n = {t_n}; 2 to {MAX_PATTERN_TIMES} read times")

    @nb.njit(cache=True, nogil=True, error_model="numpy")
    def lines(g, bits, L, f2, keep, g_target, levels, by_programmed, g_max, edges,
              out_level, out_lt, out_rn):
        n = g.shape[0]
        n_blocks = out_level.shape[0]
        n_lev = levels.shape[0]
        n_grp = out_rn.shape[1]
        n_edges = edges.shape[0]
        inv_gmax = 1.0 / g_max
        ln_gmax = np.log(g_max)
        e_gmax, ln_m_gmax = _split_gmax(ln_gmax)
        f32 = bits.size > 0
        g_flat = g.reshape(n * t_n)
        slot_of = np.full(1 << t_n, -1, np.int64)
        cap = min(1 << t_n, MAX_PATTERNS)
        pat_w = np.zeros((cap, t_n))
        pat_v = np.zeros((cap, t_n))
        pat_h = np.zeros((cap, t_n))  # 1 - h_k for a read taken, else 0
        pat_nc = np.zeros(cap, np.int64)
        pat_p = np.zeros((cap, t_n))  # 1 for a read taken, else 0
        pat_ok = np.zeros(cap, np.bool_)
        masks = np.zeros(cap, np.int64)
        n_slots = 0
        kept = np.zeros((cap, n_lev))  # kept devices per pattern and level
        used = np.zeros((cap, n_lev))  # devices with a line per pattern and level
        used_grp = np.zeros((cap, n_grp)) if by_programmed else np.zeros((0, 0))
        y = np.empty(BLOCK * t_n, np.float32)
        slots = np.empty(BLOCK, np.int64)
        slope_a = np.empty(BLOCK)
        inter_a = np.empty(BLOCK)
        gp_a = np.empty(BLOCK)
        rss_a = np.empty(BLOCK)
        scale_bits = np.empty(BLOCK, np.int64)
        y0 = np.empty(t_n)  # one device's ln(g / g_max), 0 for a read not taken
        for b in range(n_blocks):
            first = b * BLOCK
            stop = min(n, first + BLOCK)
            n_b = stop - first
            if f32:
                _log_block(g_flat, bits, first * t_n, n_b * t_n, e_gmax, ln_m_gmax, y)
            else:
                log_cells(g_flat, bits, first * t_n, n_b * t_n, ln_gmax, y)
            rare = False  # a subnormal or infinite float32 read (+inf in y)
            # Short passes over the block, each with independent iterations (so that the CPU
            # overlaps devices instead of waiting on one device's chain of sums).
            for j in range(n_b):  # the pattern of reads taken; -1: device dropped
                if keep[first + j] != 0:
                    slots[j] = -1
                    continue
                mask = 0
                for k in range(t_n):
                    yk = y[j * t_n + k]
                    mask |= np.int64(yk == yk) << k
                    rare |= yk == _F(np.inf)
                slot = slot_of[mask]
                if slot < 0:
                    if n_slots == cap:
                        return False
                    slot = n_slots
                    n_slots += 1
                    slot_of[mask] = slot
                    masks[slot] = mask
                    _pattern_weights(mask, L, pat_w[slot], pat_v[slot], pat_h[slot])
                    nc = 0
                    for k in range(t_n):
                        nc += (mask >> k) & 1
                    pat_nc[slot] = nc
                    for k in range(t_n):
                        pat_p[slot, k] = (mask >> k) & 1
                    pat_ok[slot] = pat_w[slot, 0] == pat_w[slot, 0]  # NaN: no line
                slots[j] = slot
            if rare:
                _log_rare(g_flat, first * t_n, n_b * t_n, ln_gmax, y)
            for j in range(n_b):  # each line: slope, intercept (ln(g_P / g_max)), RSS
                slot = slots[j]
                slope = 0.0
                inter = np.nan
                rss = 0.0
                if slot >= 0 and pat_ok[slot]:
                    inter = 0.0
                    for k in range(t_n):
                        yk = np.float64(y[j * t_n + k])
                        yk = yk if yk == yk else 0.0
                        y0[k] = yk
                        slope += pat_w[slot, k] * yk
                        inter += pat_v[slot, k] * yk
                    if pat_nc[slot] >= 3:  # residual sum of squares (lines through >= 3 reads)
                        for k in range(t_n):
                            e = (y0[k] - inter - slope * L[k]) * pat_p[slot, k]
                            rss += e * e
                slope_a[j] = slope
                inter_a[j] = inter
                rss_a[j] = rss
            exp_cells(inter_a[:n_b], gp_a, scale_bits)
            for j in range(n_b):
                gp_a[j] *= g_max  # NaN, 0 or inf: no usable line
            i = first
            while i < stop:  # one run of devices with the same target
                target = g_target[i]
                lev = np.searchsorted(levels, target)
                c0 = c1 = c2 = c3 = c5 = c6 = c8 = c9 = 0.0
                r0 = r2 = r3 = 0.0
                while i < stop and g_target[i] == target:
                    j = i - first
                    i += 1
                    c0 += 1.0
                    slot = slots[j]
                    if slot < 0:
                        c9 += 1.0
                        continue
                    kept[slot, lev] += 1.0
                    gp = gp_a[j]
                    if not (gp > 0.0 and gp < np.inf):
                        c8 += 1.0  # a read of 0 S, or fewer than two reads
                        continue
                    nu = -slope_a[j]  # Eq. 8: ln g = ln g_P - nu L
                    c1 += 1.0
                    c2 += nu
                    c3 += nu * nu
                    c5 += gp
                    c6 += gp * gp
                    used[slot, lev] += 1.0
                    three = pat_nc[slot] >= 3
                    if by_programmed:  # group: the bin of x_P = g_P / g_max
                        xref = gp * inv_gmax
                        grp = min(max(np.searchsorted(edges, xref) - 1, 0), n_edges - 2)
                        out_rn[b, grp, 0] += 1.0
                        out_rn[b, grp, 1] += xref
                        if three:
                            out_rn[b, grp, 2] += 1.0
                            out_rn[b, grp, 3] += rss_a[j]
                            used_grp[slot, grp] += 1.0
                    else:
                        r0 += 1.0
                        if three:
                            r2 += 1.0
                            r3 += rss_a[j]
                _add_level(out_level, b, lev, c0, c1, c2, c3, 0.0, c5, c6, 0.0, c8, c9)
                if not by_programmed:
                    out_rn[b, lev, 0] += r0
                    out_rn[b, lev, 2] += r2
                    out_rn[b, lev, 3] += r3
        # per (level or group, time): counts per pattern times the pattern's values
        for s in range(n_slots):
            mask = masks[s]
            for lev in range(n_lev):
                ck = kept[s, lev]
                cu = used[s, lev]
                for k in range(t_n):
                    if not (mask >> k) & 1:
                        out_lt[lev, k, 6] += ck
                    elif cu > 0.0:
                        wk = pat_w[s, k]
                        vk = pat_v[s, k]
                        out_lt[lev, k, 0] += cu
                        out_lt[lev, k, 1] += cu * f2[k]
                        out_lt[lev, k, 2] += cu * wk
                        out_lt[lev, k, 3] += cu * (wk * wk)
                        out_lt[lev, k, 4] += cu * vk
                        out_lt[lev, k, 5] += cu * (vk * vk)
            if pat_nc[s] < 3:
                continue
            for grp in range(n_grp):
                c = used_grp[s, grp] if by_programmed else used[s, grp]
                if c > 0.0:
                    for k in range(t_n):
                        if (mask >> k) & 1:
                            out_rn[0, grp, 4 + 3 * t_n + k] += c * pat_h[s, k]
                            out_rn[0, grp, 4 + 4 * t_n + k] += c * (pat_h[s, k] * f2[k])
        return True

    return lines


@nb.njit([nb.float32[::1](nb.float32[::1]), nb.float64[::1](nb.float64[::1])], cache=True,
         nogil=True)
def distinct_values(a):
    """The sorted distinct values of ``a`` (NaN excluded), in one pass.

    A binary search in the values found so far per run of equal values, so O(n log K) for K
    distinct values and O(n) when equal values are stored together, as campaigns usually are.
    """
    found = np.empty(16, a.dtype)
    k = 0
    n = a.size
    i = 0
    while i < n:
        val = a[i]
        i += 1
        while i < n and a[i] == val:  # the rest of the run
            i += 1
        if val != val:
            continue
        pos = np.searchsorted(found[:k], val)
        if pos < k and found[pos] == val:
            continue
        if k == found.size:
            bigger = np.empty(2 * k, a.dtype)
            bigger[:k] = found
            found = bigger
        found[pos + 1:k + 1] = found[pos:k].copy()
        found[pos] = val
        k += 1
    return found[:k].copy()
