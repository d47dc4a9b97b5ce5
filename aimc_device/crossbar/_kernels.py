"""Numba kernel of the crossbar's output stage: one fused, parallel pass per tile. Private.

The single definition of each periphery element is in ``periphery.py`` (torch); this kernel
restates the output-side elements in scalar form for speed on CPU (IR drop Eqs. 15-16,
short-term and output noise Eqs. 2 and 14, ADC Eq. 5, digital scales Eq. 1), and the tests
compare it with the torch path. Normal variates come from the counter-based ziggurat of the PCM
sampler, keyed by (key, element index, stream), so the same key gives the same numbers on any
thread count.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-16.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

# The counter-based generator and ziggurat tables of the device sampler (one definition).
from ..pcm._kernels import _FI, _KI, _WI, _ZIG_R, _hash, _uniform, normal

#: Stream number of the per-MVM draws (the PCM sampler uses streams 0-2 of 4).
STREAM_MVM = np.uint64(3)

_MASK8 = np.uint64(0xFF)
_MASK52 = np.uint64(0x000FFFFFFFFFFFFF)
_S8, _S9 = np.uint64(8), np.uint64(9)
# Counter spaces, disjoint from each other and from the device sampler's (index*4+stream)*64+j:
_FAST = np.uint64(1) << np.uint64(63)  # first attempt of element i: _FAST + i
_RETRY = _FAST + (np.uint64(1) << np.uint64(62))  # its wedge / tail draws: _RETRY + 64 i + k
_SIX = np.uint64(6)


# 23-bit-mantissa versions of the ziggurat tables: one 64-bit hash gives two variates.
_KI23 = (_KI >> np.uint64(29)).astype(np.uint64)
_WI23 = _WI * float(2 ** 29)
_M23 = np.uint64(0x7FFFFF)
_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)


@nb.njit("float64(uint64, uint64, intp, float64, boolean)", cache=True)
def _finish(key, ctr, idx, x, neg):  # pragma: no cover - via tests
    """Complete a ziggurat attempt outside the rectangle: wedge or tail test of [1], else an
    independent full retry. ``ctr`` is the element's counter; its draws use counters of its own."""
    base = _RETRY + (ctr << _SIX)
    if idx == 0:  # tail beyond R
        for j in range(31):
            xx = -math.log1p(-_uniform(key, base + np.uint64(2 * j + 1))) / _ZIG_R
            yy = -math.log1p(-_uniform(key, base + np.uint64(2 * j + 2)))
            if yy + yy > xx * xx:
                return -(_ZIG_R + xx) if neg else _ZIG_R + xx
    elif (_FI[idx - 1] - _FI[idx]) * _uniform(key, base) + _FI[idx] < math.exp(-0.5 * x * x):
        return -x if neg else x  # wedge
    return normal(key, ctr, STREAM_MVM)  # rejected: an independent full retry (own counters)


@nb.njit("float64(uint64, uint64, uint64)", cache=True, inline="always")
def _half_normal(key, half, ctr):  # pragma: no cover - via tests
    """N(0, 1) from 32 random bits (8 layer, 1 sign, 23 mantissa) for element counter ctr."""
    idx = np.intp(half & _MASK8)
    rabs = (half >> _S9) & _M23
    x = float(np.int64(rabs)) * _WI23[idx]
    neg = ((half >> _S8) & np.uint64(1)) == np.uint64(1)
    if rabs < _KI23[idx]:
        return -x if neg else x
    return _finish(key, ctr, idx, x, neg)


_ROW_SIG = [
    "void(intp, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, float64, "
    "float64, float64, float64, float64, float64, {t}[::1], {t}[::1], uint64, boolean, "
    "{t}[:, ::1])".format(t=t)
    for t in ("float32", "float64")
]
_SIG = [sig.replace("void(intp, ", "void(") for sig in _ROW_SIG]


@nb.njit(_ROW_SIG, cache=True, fastmath=True, inline="always")
def _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
               levels, row_f, col_f, key, accumulate, out):  # pragma: no cover - via tests
    """Row b of :func:`output_stage`."""
    nc = z.shape[1]
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    rf = row_f[0] if row_f.shape[0] == 1 else row_f[b]
    noise = np.zeros(nc)
    if on2 > 0.0 or has_st:  # standard normals first: one hash, two variates (i, i + 1)
        half_nc = (nc + 1) // 2
        for h in range(half_nc):
            r = _hash(key, _FAST + np.uint64(b * half_nc + h))
            i = 2 * h
            noise[i] = _half_normal(key, r & _MASK32, np.uint64(b * nc + i))
            if i + 1 < nc:
                noise[i + 1] = _half_normal(key, r >> _S32, np.uint64(b * nc + i + 1))
    for i in range(nc):  # then one branch-free (vectorisable) pass
        v = z[b, i] * unit  # Eq. 2, signal
        if has_ir:
            a = abs_x[b, i] * iru  # Eq. 18
            v -= a * (0.5 + a * (-0.2 + 0.05 * a)) * (w_px[b, i] * unit)  # Eqs. 15-16
        var = on2
        if has_st:
            var += wn2 * x2[b, i]  # Eq. 14
        v += math.sqrt(var) * noise[i]
        if s_out > 0.0:
            v = min(max(np.rint(v * s_out), -levels), levels) / s_out  # Eq. 5, ADC
        r_out = v * rf * col_f[i]  # Eq. 1
        if accumulate:
            out[b, i] += r_out
        else:
            out[b, i] = r_out


@nb.njit(_SIG, cache=True, parallel=True)
def output_stage_parallel(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k,
                          s_out, levels, row_f, col_f, key, accumulate,
                          out):  # pragma: no cover - via tests
    """out (+)= row_f col_f Q_out(z u + dy_IR + sqrt(sigma_out^2 + sigma_i^2) xi), rows in
    parallel.

    z, w_px, abs_x, x2 : (batch, cols) GEMM results W~ lev, W~ (P o lev), |W~| |lev|,
        |W~| lev^2 in input-level units (x~ = u lev); unused ones may be (0, 0)
    unit : u, normalised input per level; ir_k : ir_drop scale x g_ir x n_rows
    s_out : ADC levels per output unit (0: no ADC); levels : 2^(q-1) - 1
    row_f : (batch,) or (1,), col_f : (cols,), digital factors of Eq. 1
    The draws depend on (key, row, column) only: same key, same numbers on any thread count.
    """
    for b in prange(z.shape[0]):
        _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                   levels, row_f, col_f, key, accumulate, out)


@nb.njit(_SIG, cache=True)
def output_stage_serial(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k,
                        s_out, levels, row_f, col_f, key, accumulate,
                        out):  # pragma: no cover - via tests
    """:func:`output_stage_parallel` on one thread (small batches: no thread start-up)."""
    for b in range(z.shape[0]):
        _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                   levels, row_f, col_f, key, accumulate, out)


#: Outputs per call above which the parallel kernel is used.
PARALLEL_MIN_SIZE = 1 << 15


def output_stage(z, *args):
    """Dispatch to the serial or the parallel kernel by size (same numbers from both)."""
    kernel = output_stage_parallel if z.size >= PARALLEL_MIN_SIZE else output_stage_serial
    kernel(z, *args)
