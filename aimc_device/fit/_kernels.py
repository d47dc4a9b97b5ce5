"""Numba kernels of the fit's streaming pass over a device chunk.

Two passes around one vectorised numpy log: ``moments_kernel`` reads each device's reads once
(repeat mean and variance per time, and a count of bad values); the caller takes ln(m / g_max)
in float32 with numpy's SIMD log (its 1e-7 error is far below any spread fitted);
``accumulate_kernel`` fits each device's drift line and adds its results to per-level sums.

The kernels are single-threaded and release the GIL: the caller runs several device chunks at
once in threads (no barrier per parallel region, so a busy core does not stall the others), and
adds the chunk sums in chunk order, so results do not depend on the thread count. Devices are
summed in blocks of ``BLOCK`` to limit rounding. The plain numpy reference of the same sums lives
in tests/test_fit.py; the two are compared.
"""
from __future__ import annotations

import numba as nb
import numpy as np

__all__ = ["BLOCK", "N_LEVEL_SUMS", "moments_kernel", "accumulate_kernel"]

#: Devices per partial sum (fixed, so that sums are the same on any number of threads).
BLOCK = 2048
#: Per-level sums: n_total, n, nu, nu^2, var(nu), g_P, g_P^2, g_P^2 var(ln g_P).
N_LEVEL_SUMS = 8

_MOMENTS_SIG = [nb.int64(dt[:, :, ::1], nb.float64[:, ::1], nb.float64[:, ::1])
                for dt in (nb.float32, nb.float64)]


@nb.njit(_MOMENTS_SIG, cache=True, nogil=True)
def moments_kernel(g, m, s2):
    """Repeat mean m [S] and unbiased repeat variance s2 [S^2] of g (n, T, R) -> (n, T).

    Returns the number of (device, time) cells holding a NaN, inf or negative read.
    """
    n, t_n, r_n = g.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    bad_total = 0
    for b in range(n_blocks):
        bad = 0
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            for k in range(t_n):
                # One pass: sums of the reads shifted by the first one (stable variance).
                g0 = np.float64(g[i, k, 0])
                acc = 0.0
                acc2 = 0.0
                lo = g0
                for r in range(r_n):
                    val = np.float64(g[i, k, r])
                    lo = min(lo, val)
                    d = val - g0
                    acc += d
                    acc2 += d * d
                if not (lo >= 0.0 and abs(acc2) < np.inf):
                    bad += 1
                m[i, k] = g0 + acc / r_n
                s2[i, k] = max(acc2 - acc * acc / r_n, 0.0) / (r_n - 1)
        bad_total += bad
    return bad_total


_ACC_SIG = nb.void(nb.float64[:, ::1], nb.float64[:, ::1], nb.float32[:, ::1], nb.int64,
                   nb.int64[::1], nb.float64[::1], nb.float64[::1], nb.boolean, nb.float64,
                   nb.float64[::1], nb.float64[:, :, ::1], nb.float64[:, :, ::1])


@nb.njit(_ACC_SIG, cache=True, nogil=True)
def accumulate_kernel(m, s2, lnx, r_n, level, w, v, by_programmed, g_max, edges, out_level,
                      out_rn):
    """Fit each device's drift line and add it to per-level and per-read-noise-group sums.

    Parameters
    ----------
    m, s2 : (n, T) repeat mean [S] and variance [S^2]; lnx : (n, T) float32 ln(m / g_max);
    r_n : repeats R; level : (n,) level index; w, v : (T,) OLS weights of the slope and the
    intercept against ln((t + t0)/t0); by_programmed : group read noise by bins ``edges`` of
    g_P / g_max instead of by level; g_max [S];
    out_level : (n_blocks, K, 8) zeroed; out_rn : (n_blocks, G, 2 + 2T) zeroed, columns
    n, sum x_ref, sum s2_k [S^2] (T), sum (m_k^2 - s2_k / R) [S^2] (T).
    """
    n, t_n = m.shape
    n_blocks = out_level.shape[0]
    n_edges = edges.shape[0]
    log_gmax = np.log(g_max)
    for b in range(n_blocks):
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            lev = level[i]
            out_level[b, lev, 0] += 1.0
            ok = True
            for k in range(t_n):
                if not m[i, k] > 0.0:
                    ok = False
            if not ok:
                continue
            slope = 0.0
            icpt = 0.0
            var_s = 0.0
            var_i = 0.0
            for k in range(t_n):
                rel = s2[i, k] / (r_n * m[i, k] * m[i, k])   # Var(ln m_k), delta method
                y = np.float64(lnx[i, k]) + 0.5 * rel          # bias-corrected ln(m / g_max)
                slope += w[k] * y
                icpt += v[k] * y
                var_s += w[k] * w[k] * rel
                var_i += v[k] * v[k] * rel
            nu = -slope                                     # Eq. 8: ln g = ln g_P - nu L
            gp = np.exp(icpt + log_gmax - 0.5 * var_i)      # g_P at t = 0 [S]
            out_level[b, lev, 1] += 1.0
            out_level[b, lev, 2] += nu
            out_level[b, lev, 3] += nu * nu
            out_level[b, lev, 4] += var_s
            out_level[b, lev, 5] += gp
            out_level[b, lev, 6] += gp * gp
            out_level[b, lev, 7] += gp * gp * var_i
            if by_programmed:
                xref = gp / g_max
                grp = np.searchsorted(edges, xref) - 1
                grp = min(max(grp, 0), n_edges - 2)
            else:
                xref = -1.0  # the caller uses the level's target instead
                grp = lev
            out_rn[b, grp, 0] += 1.0
            out_rn[b, grp, 1] += xref
            for k in range(t_n):
                out_rn[b, grp, 2 + k] += s2[i, k]
                out_rn[b, grp, 2 + t_n + k] += m[i, k] * m[i, k] - s2[i, k] / r_n
