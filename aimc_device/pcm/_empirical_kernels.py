"""Numba kernels that sample the empirical device model: one parallel pass over the devices.

Private. The public wrappers are :meth:`aimc_device.pcm.EmpiricalModel.program`, ``.read`` and
``.quantile``; the tests compare these kernels with a plain numpy reference of the same
interpolation (exact to rounding) and the torch sampler with them (KS tests).

Random numbers come from the counter-based generator of :mod:`._kernels` (SplitMix64 + ziggurat),
keyed by the seed and the device index: same seed, same bits, on any thread count. Streams:
the rank at the first measured time (``STREAM_PROGRAM`` of the programming key), the rank
innovations between measured times (``STREAM_RANK`` of the programming key, counter
``i (M - 1) + m``) and the read noise (``STREAM_READ`` of the read's key).

Table layout (built by ``EmpiricalModel``): ``grid`` (G,) relative targets x = g/g_max of the
interpolation grid; ``znodes`` (J,) normal scores Phi^-1(p_j) of the probability grid; ``q``
(G, S, J) quantiles of g/g_max at grid point, time node and probability; ``bt`` (G, S) the
fraction b of the rank that each read renews (read noise); ``rho`` (G, max(M - 1, 1)) the rank
correlation of a device between consecutive measured times.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

from .numba_builds import serial_and_parallel
from ._kernels import PERTURB_PARALLEL_MIN, STREAM_PROGRAM, STREAM_READ, normal

#: Stream of the rank innovations between consecutive measured times (programming key).
STREAM_RANK = 1


@nb.njit(cache=True, inline="always")
def bisect(a, v):  # pragma: no cover - via tests
    """The segment of the sorted array ``a`` holding ``v``: the largest i with a[i] <= v,
    clamped to [0, a.size - 2] (values outside the range take the end segments)."""
    lo = 0
    hi = a.shape[0] - 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if a[mid] <= v:
            lo = mid
        else:
            hi = mid
    return lo


@nb.njit(cache=True, inline="always")
def locate_x(grid, x_top, x):  # pragma: no cover - via tests
    """(grid segment, weight in it, factor): targets above the top level x_top evaluate the top
    level's table scaled by x / x_top."""
    f = 1.0
    if x > x_top:
        f = x / x_top
        x = x_top
    gi = bisect(grid, x)
    wx = (x - grid[gi]) / (grid[gi + 1] - grid[gi])
    wx = min(max(wx, 0.0), 1.0)
    return gi, wx, f


@nb.njit(cache=True, inline="always")
def bilinear(tab, gi, wx, n, w):  # pragma: no cover - via tests
    """tab (G, S) at grid segment (gi, wx) and time segment (n, w)."""
    a = tab[gi, n] + w * (tab[gi, n + 1] - tab[gi, n])
    b = tab[gi + 1, n] + w * (tab[gi + 1, n + 1] - tab[gi + 1, n])
    return a + wx * (b - a)


@nb.njit(cache=True, inline="always")
def quantile_at(q, znodes, gi, wx, n, w, z):  # pragma: no cover - via tests
    """g/g_max at normal score z: linear in z between the nodes (held beyond the end nodes),
    then bilinear in (grid, time)."""
    j = bisect(znodes, z)
    wz = min(max((z - znodes[j]) / (znodes[j + 1] - znodes[j]), 0.0), 1.0)
    a0 = q[gi, n, j] + wz * (q[gi, n, j + 1] - q[gi, n, j])
    a1 = q[gi, n + 1, j] + wz * (q[gi, n + 1, j + 1] - q[gi, n + 1, j])
    b0 = q[gi + 1, n, j] + wz * (q[gi + 1, n, j + 1] - q[gi + 1, n, j])
    b1 = q[gi + 1, n + 1, j] + wz * (q[gi + 1, n + 1, j + 1] - q[gi + 1, n + 1, j])
    a = a0 + w * (a1 - a0)
    b = b0 + w * (b1 - b0)
    return a + wx * (b - a)


@nb.njit(cache=True, inline="always")
def device_rank(key, i, z0, rho, gi, wx, m_meas, n, w):  # pragma: no cover - via tests
    """The device's latent normal score at time segment (n, w): a Gaussian Markov chain over the
    measured times, z_{m+1} = rho_m z_m + sqrt(1 - rho_m^2) eta_m, and between two measured
    times the normalised linear blend ((1 - w) z_n + w z_{n+1}) / sqrt((1 - w)^2 + w^2 +
    2 w (1 - w) rho_n) (unit variance); held beyond the last measured time."""
    top = min(n + 1, m_meas - 1)
    z = z0
    za = z0
    zb = z0
    base = np.uint64(i) * np.uint64(max(m_meas - 1, 1))
    for m in range(top):
        r = rho[gi, m] + wx * (rho[gi + 1, m] - rho[gi, m])
        eta = normal(key, base + np.uint64(m), np.uint64(STREAM_RANK))
        z = r * z + math.sqrt(max(1.0 - r * r, 0.0)) * eta
        if m + 1 == n:
            za = z
        if m + 1 == top:
            zb = z
    if top <= n:
        return za
    r = rho[gi, n] + wx * (rho[gi + 1, n] - rho[gi, n])
    norm = math.sqrt((1.0 - w) * (1.0 - w) + w * w + 2.0 * w * (1.0 - w) * r)
    return ((1.0 - w) * za + w * zb) / norm


_PROGRAM_SIG = ["void(uint64, {t}[::1])".format(t=t) for t in ("float32", "float64")]


@nb.njit(_PROGRAM_SIG, cache=True, parallel=True)
def program_kernel(key, z0):  # pragma: no cover - via tests
    """z0[i] = the device's normal score at the first measured time (stream STREAM_PROGRAM)."""
    for i in prange(z0.shape[0]):
        z0[i] = normal(key, np.uint64(i), np.uint64(STREAM_PROGRAM))



def _table(ndim: int):
    """A read-only C-ordered float64 array type (the model's tables are immutable)."""
    return nb.types.Array(nb.float64, ndim, "C", readonly=True)


_T1, _T2, _T3 = _table(1), _table(2), _table(3)
_READ_SIG = [
    nb.void(t[::1], t[::1], nb.uint64, nb.uint64, nb.float64, nb.float64, _T1, _T1, _T3, _T2, _T2,
            nb.int64, nb.int64, nb.float64, t[::1])
    for t in (nb.float32, nb.float64)
]


def _read(g_target, z0, key_prog, key_read, g_max, x_top, grid, znodes, q, bt, rho, m_meas, n,
          w, out):  # pragma: no cover - via tests
    """One read of every device at time segment (n, w) of the table's time nodes (the body of
    :func:`read_kernel`).

    z = device_rank(...); the read renews a fraction b of the rank, z_r = sqrt(1 - b^2) z +
    b xi (xi of stream STREAM_READ, key_read), so that the read's marginal is exactly the
    tabulated distribution; out = max(Q(x, t, z_r), 0) g_max [S].
    """
    for i in prange(g_target.shape[0]):
        x = abs(np.float64(g_target[i])) / g_max
        gi, wx, f = locate_x(grid, x_top, x)
        z = device_rank(key_prog, i, np.float64(z0[i]), rho, gi, wx, m_meas, n, w)
        b = bilinear(bt, gi, wx, n, w)
        zr = math.sqrt(max(1.0 - b * b, 0.0)) * z + b * normal(key_read, np.uint64(i),
                                                                  np.uint64(STREAM_READ))
        out[i] = max(quantile_at(q, znodes, gi, wx, n, w, zr) * f, 0.0) * g_max


def _quantile(x, z, x_top, grid, znodes, q, n, w, out):  # pragma: no cover - via tests
    """out = max(Q(x, t, z), 0), g/g_max at relative target x and normal score z (one time)."""
    for i in prange(x.shape[0]):
        gi, wx, f = locate_x(grid, x_top, abs(x[i]))
        out[i] = max(quantile_at(q, znodes, gi, wx, n, w, z[i]) * f, 0.0)


_QUANTILE_SIG = nb.void(nb.float64[::1], nb.float64[::1], nb.float64, _T1, _T1, _T3, nb.int64,
                        nb.float64, nb.float64[::1])
# Each kernel in a parallel and a serial build: below PERTURB_PARALLEL_MIN devices waking the
# thread pool costs more than the work (the same numbers either way: keyed by device index).
_read_serial, _read_parallel = serial_and_parallel(_read, _READ_SIG)
_quantile_serial, _quantile_parallel = serial_and_parallel(_quantile, _QUANTILE_SIG)


def read_kernel(g_target, *args):
    """:func:`_read` (one read of every device, see there), on the thread pool for large
    arrays."""
    big = g_target.shape[0] >= PERTURB_PARALLEL_MIN
    (_read_parallel if big else _read_serial)(g_target, *args)


def quantile_kernel(x, *args):
    """:func:`_quantile`, on the thread pool for large arrays."""
    (_quantile_parallel if x.shape[0] >= PERTURB_PARALLEL_MIN else _quantile_serial)(x, *args)
