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
from ..pcm._kernels import FAST as _FAST
from ..pcm._kernels import _hash, half_normal, half_normal_rect

#: Stream number of the per-MVM draws (the PCM sampler uses streams 0 and 2 of 4).
STREAM_MVM = np.uint64(3)

_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)


_ROW_SIG = [
    "void(intp, {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], {t}[:, ::1], boolean, boolean, float64, "
    "float64, float64, float64, float64, float64, {t}[::1], {t}[::1], uint64, boolean, "
    "{t}[:, ::1], float32[::1])".format(t=t)
    for t in ("float32", "float64")
]
_SIG = [sig.replace("void(intp, ", "void(").replace(", float32[::1])", ")") for sig in _ROW_SIG]
#: Rows per work item of the parallel kernel (one scratch buffer each).
_ROWS_PER_ITEM = 8


#: Fast-math without "nnan"/"ninf": the NaN that marks a variate to finish must survive.
_STAGE_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@nb.njit(_ROW_SIG, cache=True, fastmath=_STAGE_FASTMATH, inline="always")
def _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
               levels, row_f, col_f, key, accumulate, out, noise):  # pragma: no cover - via tests
    """Row b of :func:`output_stage`; ``noise`` is a float32 scratch buffer of the row's
    length + 1."""
    nc = z.shape[1]
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    rf = row_f[0] if row_f.shape[0] == 1 else row_f[b]
    if not (on2 > 0.0 or has_st):
        noise[:] = 0.0
    else:  # standard normals first: one hash, two variates (i, i + 1) ...
        half_nc = (nc + 1) // 2
        base = _FAST + np.uint64(b * half_nc)
        for h in range(half_nc):  # ... the rectangle step, vectorised (noise has 2 half_nc)
            r = _hash(key, base + np.uint64(h))
            noise[2 * h] = half_normal_rect(r & _MASK32)
            noise[2 * h + 1] = half_normal_rect(r >> _S32)
        for i in range(nc):  # ... then the ~1 % outside their rectangle, one by one
            if noise[i] != noise[i]:
                r = _hash(key, base + np.uint64(i // 2))
                half = r >> _S32 if i % 2 else r & _MASK32
                noise[i] = half_normal(key, half, np.uint64(b * nc + i), STREAM_MVM)
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


@nb.njit(_SIG, cache=True, parallel=True, fastmath=_STAGE_FASTMATH)
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
    n_rows = z.shape[0]
    for item in prange((n_rows + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM):
        noise = np.empty(z.shape[1] + 1, dtype=np.float32)
        for b in range(item * _ROWS_PER_ITEM, min(n_rows, (item + 1) * _ROWS_PER_ITEM)):
            _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k,
                       s_out, levels, row_f, col_f, key, accumulate, out, noise)


@nb.njit(_SIG, cache=True, fastmath=_STAGE_FASTMATH)
def output_stage_serial(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k,
                        s_out, levels, row_f, col_f, key, accumulate,
                        out):  # pragma: no cover - via tests
    """:func:`output_stage_parallel` on one thread (small batches: no thread start-up)."""
    noise = np.empty(z.shape[1] + 1, dtype=np.float32)
    for b in range(z.shape[0]):
        _stage_row(b, z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                   levels, row_f, col_f, key, accumulate, out, noise)


#: Outputs per call above which the parallel kernel is used.
PARALLEL_MIN_SIZE = 1 << 15


def output_stage(z, *args):
    """Dispatch to the serial or the parallel kernel by size (same numbers from both)."""
    kernel = output_stage_parallel if z.size >= PARALLEL_MIN_SIZE else output_stage_serial
    kernel(z, *args)


_DAC_SIG = ["void({t}[:, ::1], intp, {t}[::1], float64, float64, {t}[:, ::1])".format(t=t)
            for t in ("float32", "float64")]


def _dac_levels(x, start, row_inv, s_in, limit, out):  # pragma: no cover - via tests
    """DAC of Eq. 5 in integer levels, one pass: out = clip(rint(x s_in / a), -limit, limit).

    x : (batch, in) inputs; the tile's columns are ``start : start + out.shape[1]``;
    row_inv : (batch,) or (1,), 1 / a per row (input range alpha or the abs-max of the row);
    s_in : levels per unit of x / a, limit : 2^(q-1) - 1. NaN stays NaN (as in torch).
    """
    b_n, n = out.shape
    sf = x.dtype.type(s_in)
    lim = x.dtype.type(limit)
    for b in prange(b_n):
        s = sf * (row_inv[0] if row_inv.shape[0] == 1 else row_inv[b])
        row = x[b, start:start + n]  # row views: LLVM vectorises (5x faster than x[b, start + i])
        dst = out[b]
        for i in range(n):
            v = np.rint(row[i] * s)
            v = lim if v > lim else v
            dst[i] = -lim if v < -lim else v


_DAC_FLAGS = {"cache": True, "fastmath": {"nsz", "arcp", "contract"}}
# Rows split over both cores: each core then holds the levels its GEMM threads read next (a
# single-threaded DAC made the following GEMM slower than it saved).
dac_levels_parallel = nb.njit(_DAC_SIG, parallel=True, **_DAC_FLAGS)(_dac_levels)
dac_levels_serial = nb.njit(_DAC_SIG, **_DAC_FLAGS)(_dac_levels)


def dac_levels(x, *args):
    """Dispatch to the serial or the parallel DAC kernel by size (same numbers from both)."""
    out = args[-1]
    kernel = dac_levels_parallel if out.size >= PARALLEL_MIN_SIZE else dac_levels_serial
    kernel(x, *args)
