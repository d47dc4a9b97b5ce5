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

__all__ = ["BLOCK", "N_LEVEL_SUMS", "moments_kernel", "sums_kernel"]

#: Devices per partial sum (fixed, so that sums are the same on any number of threads).
BLOCK = 2048
#: Per-level sums: n_total, n, nu, nu^2, var(nu), g_P, g_P^2, g_P^2 var(ln g_P).
N_LEVEL_SUMS = 8
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


_SUMS_SIG = [nb.void(nb.float32[:, ::1], nb.float32[:, ::1], nb.int64, gt[::1], gt[::1],
                     nb.float32[:, ::1], nb.float32[:, ::1], nb.float64[::1], nb.boolean,
                     nb.float64, nb.float64[::1], nb.float64[:, :, ::1], nb.float64[:, :, ::1])
             for gt in (nb.float32, nb.float64)]


@nb.njit(_SUMS_SIG, cache=True, nogil=True)
def sums_kernel(m, s2, r_n, g_target, levels, line, var, gp, by_programmed, g_max, edges,
                out_level, out_rn):
    """Add each device's drift-line results to per-level and per-read-noise-group sums.

    Parameters
    ----------
    m, s2 : (n, T) repeat mean [S] and variance [S^2]; r_n : repeats R;
    g_target : (n,) target conductance [S]; levels : (K,) sorted distinct targets [S] (each
    g_target is one of them);
    line : (2, n) slope (= -nu) and intercept (ln g_P / g_max) of each device's drift line;
    var : (2, n) their read-noise variances (all dimensionless);
    gp : (n,) g_P [S] (NaN, 0 or inf: device not used);
    by_programmed : group read noise by bins ``edges`` of g_P / g_max instead of by level;
    g_max [S]; out_level : (n_blocks, K, 8) zeroed; out_rn : (n_blocks, G, 2 + 2T) zeroed,
    columns n, sum x_ref, sum s2_k [S^2] (T), sum (m_k^2 - s2_k / R) [S^2] (T).
    """
    n, t_n = m.shape
    n_blocks = out_level.shape[0]
    n_edges = edges.shape[0]
    inv_r = 1.0 / r_n
    acc_rn = np.zeros(2 + 2 * t_n)
    for b in range(n_blocks):
        stop = min(n, (b + 1) * BLOCK)
        i = b * BLOCK
        while i < stop:  # one run of devices with the same target
            target = g_target[i]
            lev = np.searchsorted(levels, target)
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = 0.0
            while i < stop and g_target[i] == target:
                c0 += 1.0
                g = gp[i]
                if g > 0.0 and g < np.inf:
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
                            out_rn[b, grp, 2 + k] += sk
                            out_rn[b, grp, 2 + t_n + k] += mk * mk - sk * inv_r
                    else:  # x_ref: the caller uses the level's target
                        acc_rn[0] += 1.0
                        for k in range(t_n):
                            sk = np.float64(s2[i, k])
                            mk = np.float64(m[i, k])
                            acc_rn[2 + k] += sk
                            acc_rn[2 + t_n + k] += mk * mk - sk * inv_r
                i += 1
            out_level[b, lev, 0] += c0
            out_level[b, lev, 1] += c1
            out_level[b, lev, 2] += c2
            out_level[b, lev, 3] += c3
            out_level[b, lev, 4] += c4
            out_level[b, lev, 5] += c5
            out_level[b, lev, 6] += c6
            out_level[b, lev, 7] += c7
            if not by_programmed:
                for q in range(acc_rn.size):
                    out_rn[b, lev, q] += acc_rn[q]
                    acc_rn[q] = 0.0


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
