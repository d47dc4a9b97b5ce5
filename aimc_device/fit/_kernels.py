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
times. Everything else (reads not taken, one read per time, per-device or temperature-mapped
times) goes through ``general_kernel``, which does the same per device with its own least-
squares weights over the cells present; the two give the same sums where both apply (tested).

The kernels release the GIL: the caller runs several device chunks at once in threads (no
barrier per parallel region, so a busy core does not stall the others), and adds the chunk sums
in chunk order, so results do not depend on the thread count. Devices are summed in blocks of
``BLOCK`` to limit rounding. The plain numpy reference of the same sums lives in
tests/test_fit.py; the two are compared.
"""
from __future__ import annotations

import functools

import numba as nb
import numpy as np

__all__ = ["BLOCK", "N_LEVEL_SUMS", "N_LT_SUMS", "moments_kernel", "sums_kernel",
           "general_kernel", "rn_columns", "distinct_values"]

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
#: Per-level-and-time sums (general path): present cells, f2, w, w^2, v, v^2, reads not taken,
#: y, y^2, read time.
N_LT_SUMS = 10

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
                            acc_rn[4 + 2 * t_n + k] += dof
                else:
                    c8 += 1.0
                i += 1
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
            if not by_programmed:
                for q in range(acc_rn.size):
                    out_rn[b, lev, q] += acc_rn[q]
                    acc_rn[q] = 0.0


_GENERAL_SIG = [nb.void(g[:, :, ::1], nb.float64[:, ::1], nb.float64[:, ::1], nb.float64[:, ::1],
                        nb.uint8[::1], nb.float64[::1], nb.float64[::1], nb.boolean, nb.boolean,
                        nb.float64, nb.float64[::1], nb.float64[:, :, ::1],
                        nb.float64[:, :, :, ::1], nb.float64[:, :, ::1])
                for g in (nb.float32, nb.float64)]


@nb.njit(_GENERAL_SIG, cache=True, nogil=True, error_model="numpy")
def general_kernel(g, L, f2, t, keep, g_target, levels, repeats_mode, by_programmed, g_max,
                   edges, out_level, out_lt, out_rn):
    """Per-device drift lines over the reads that exist, and their per-level, per-level-and-time
    and per-read-noise-group sums (the general path: missing reads, per-device times, R >= 1).

    Per device: each cell's repeat mean m_k over the reads taken (NaN: not taken) and, with
    two or more, its unbiased variance s2_k; y_k = ln(m_k / g_max) (+ s2_k / (2 r_k m_k^2) when
    ``repeats_mode``: the bias of the log of a noisy mean, from the repeats); an ordinary
    least-squares line of y against L over the cells present: slope = sum w_k y_k, intercept =
    sum v_k y_k with w_k = (n L_k - S1) / D, v_k = (S2 - S1 L_k) / D (S1 = sum L, S2 = sum L^2,
    D = n S2 - S1^2); the read-noise variances of slope and intercept from the repeats, sum
    w_k^2 rel_k and sum v_k^2 rel_k with rel_k = s2_k / (r_k m_k^2); the hat values
    h_k = v_k + w_k L_k and the residual sum of squares (devices with >= 3 cells) for the read
    noise without repeats.

    Parameters
    ----------
    g : (n, T, R) reads [S], NaN where not taken
    L, f2, t : (1 or n, T) float64: ln((t_eq + t0) / t0), the read-noise time term
        ln((t_eff + T_read) / (2 T_read)) (both dimensionless) and the read time [s]; one row
        for all devices or one per device
    keep : (n,) uint8, 0 for a device kept, else its exclusion reason
    g_target : (n,) float64 target [S]; levels : (K,) float64 sorted distinct targets [S]
    repeats_mode : bool, R >= 2 (read noise and bias corrections from the repeats)
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level
    g_max : float [S]
    out_level : (n_blocks, K, N_LEVEL_SUMS) zeroed
    out_lt : (n_blocks, K, T, N_LT_SUMS) zeroed
    out_rn : (n_blocks, G, rn_columns(T)) zeroed
    """
    n, t_n, r_n = g.shape
    shared = L.shape[0] == 1
    n_edges = edges.shape[0]
    inv_gmax = 1.0 / g_max
    ys = np.empty(t_n)
    rels = np.empty(t_n)
    ms = np.empty(t_n)
    s2s = np.empty(t_n)
    cnts = np.zeros(t_n, np.int64)
    for i in range(n):
        b = i // BLOCK
        lev = np.searchsorted(levels, g_target[i])
        out_level[b, lev, 0] += 1.0
        if keep[i] != 0:
            out_level[b, lev, 9] += 1.0
            continue
        row = 0 if shared else i
        # cells: repeat mean and variance over the reads taken
        usable = True
        n_c = 0
        for k in range(t_n):
            g0 = np.nan
            cnt = 0
            acc = 0.0
            acc2 = 0.0
            for r in range(r_n):
                val = np.float64(g[i, k, r])
                if val != val:
                    continue
                if cnt == 0:
                    g0 = val
                d = val - g0
                acc += d
                acc2 += d * d
                cnt += 1
            cnts[k] = cnt
            out_lt[b, lev, k, 6] += r_n - cnt
            if cnt == 0:
                continue
            mean = g0 + acc / cnt
            var = (acc2 - acc * acc / cnt) / (cnt - 1) if cnt >= 2 else 0.0
            ms[k] = mean
            s2s[k] = var
            if not mean > 0.0:
                usable = False
                continue
            rel = var / (cnt * mean * mean) if cnt >= 2 else 0.0
            rels[k] = rel
            ys[k] = np.log(mean * inv_gmax) + (0.5 * rel if repeats_mode else 0.0)
            n_c += 1
        if not usable or n_c < 2:
            out_level[b, lev, 8] += 1.0
            continue
        s1 = 0.0
        s2_ = 0.0
        for k in range(t_n):
            if cnts[k] > 0:
                s1 += L[row, k]
                s2_ += L[row, k] * L[row, k]
        den = n_c * s2_ - s1 * s1
        if not den > 1e-12 * n_c * s2_:
            out_level[b, lev, 8] += 1.0  # all reads at one time
            continue
        slope = 0.0
        inter = 0.0
        var_s = 0.0
        var_i = 0.0
        for k in range(t_n):
            if cnts[k] > 0:
                wk = (n_c * L[row, k] - s1) / den
                vk = (s2_ - s1 * L[row, k]) / den
                slope += wk * ys[k]
                inter += vk * ys[k]
                var_s += wk * wk * rels[k]
                var_i += vk * vk * rels[k]
        gp = g_max * np.exp(inter - 0.5 * var_i)
        if not (gp > 0.0 and gp < np.inf):
            out_level[b, lev, 8] += 1.0
            continue
        nu = -slope  # Eq. 8: ln g = ln g_P - nu L
        out_level[b, lev, 1] += 1.0
        out_level[b, lev, 2] += nu
        out_level[b, lev, 3] += nu * nu
        out_level[b, lev, 4] += var_s
        out_level[b, lev, 5] += gp
        out_level[b, lev, 6] += gp * gp
        out_level[b, lev, 7] += gp * gp * var_i
        if by_programmed:
            xref = gp * inv_gmax
            grp = min(max(np.searchsorted(edges, xref) - 1, 0), n_edges - 2)
            out_rn[b, grp, 1] += xref
        else:
            grp = lev
        out_rn[b, grp, 0] += 1.0
        rss = 0.0
        for k in range(t_n):
            if cnts[k] == 0:
                continue
            lk = L[row, k]
            wk = (n_c * lk - s1) / den
            vk = (s2_ - s1 * lk) / den
            fk = f2[row, k]
            e = ys[k] - inter - slope * lk
            rss += e * e
            out_lt[b, lev, k, 0] += 1.0
            out_lt[b, lev, k, 1] += fk
            out_lt[b, lev, k, 2] += wk
            out_lt[b, lev, k, 3] += wk * wk
            out_lt[b, lev, k, 4] += vk
            out_lt[b, lev, k, 5] += vk * vk
            out_lt[b, lev, k, 7] += ys[k]
            out_lt[b, lev, k, 8] += ys[k] * ys[k]
            out_lt[b, lev, k, 9] += t[row, k]
            if repeats_mode and cnts[k] >= 2:
                out_rn[b, grp, 4 + k] += s2s[k]
                out_rn[b, grp, 4 + t_n + k] += ms[k] * ms[k] - s2s[k] / cnts[k]
                out_rn[b, grp, 4 + 2 * t_n + k] += cnts[k] - 1.0
            if n_c >= 3:
                h = vk + wk * lk
                out_rn[b, grp, 4 + 3 * t_n + k] += 1.0 - h
                out_rn[b, grp, 4 + 4 * t_n + k] += (1.0 - h) * fk
        if n_c >= 3:
            out_rn[b, grp, 2] += 1.0
            out_rn[b, grp, 3] += rss


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
