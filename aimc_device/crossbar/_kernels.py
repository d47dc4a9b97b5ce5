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


#: Outputs per work item (rounded to whole rows, an even number of them): one scratch buffer
#: each, long enough for SIMD loops even when rows are short (a 16-channel convolution).
_ITEM_SIZE = 1024
#: Fast-math without "nnan"/"ninf": the NaN that marks a variate to finish must survive.
_STAGE_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: Outputs per call above which the parallel kernel is used.
PARALLEL_MIN_SIZE = 1 << 15
#: The ``mask`` argument meaning "no mask".
NO_MASK = np.zeros((0, 0), dtype=np.bool_)
_AT0 = np.zeros(6, dtype=np.intp)


@nb.njit("intp(intp)", cache=True)
def _rows_per_item(nc):  # pragma: no cover - via tests
    return max(2, (_ITEM_SIZE // max(nc, 1)) // 2 * 2)


# Switched-off elements come as None: Numba compiles one version per set of present arguments,
# with the dead branches removed, so that every loop is branch-free and vectorises (a run-time
# switch per element cost 15-40 %). Cached on disk like any signature.
@nb.njit(cache=True, fastmath=_STAGE_FASTMATH)
def _stage_block(b0, b1, z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, s_out, levels,
                 row_f, col_f, key, out, mask, mask_bound, level_out, noise, noisy,
                 accumulate):  # pragma: no cover - via tests
    """Rows b0:b1 of :func:`output_stage`; ``noise`` is a scratch buffer (z's dtype) of at least
    (b1 - b0) * cols + 1 elements; b0 * cols is even."""
    nc = z.shape[1]
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    m = (b1 - b0) * nc
    e0 = b0 * nc
    if noisy:  # standard normals, element e = row * cols + col: one hash ...
        base = _FAST + np.uint64(e0 // 2)
        for h in range((m + 1) // 2):  # ... two variates (2h, 2h + 1), rectangle step, SIMD
            r = _hash(key, base + np.uint64(h))
            noise[2 * h] = half_normal_rect(r & _MASK32)
            noise[2 * h + 1] = half_normal_rect(r >> _S32)
        for j in range(m):  # ... then the ~1.5 % outside their rectangle, one by one
            if noise[j] != noise[j]:
                r = _hash(key, base + np.uint64(j // 2))
                half = r >> _S32 if j % 2 else r & _MASK32
                noise[j] = half_normal(key, half, np.uint64(e0 + j), STREAM_MVM)
    else:
        noise[:m] = 0.0
    r_ir, c_ir, r_abs, c_abs, r_sq, c_sq = at[0], at[1], at[2], at[3], at[4], at[5]
    for b in range(b0, b1):  # then two branch-free (vectorised) passes per row, each over few
        rf = row_f[0] if row_f.shape[0] == 1 else row_f[b]  # arrays (few alias checks)
        v = noise[(b - b0) * nc:(b - b0 + 1) * nc]
        for i in range(nc):  # pre-ADC value, in place of the noise
            var = on2
            if x2 is not None:
                var += wn2 * x2[b + r_sq, c_sq + i]  # Eq. 14
            vi = z[b, i] * unit + math.sqrt(var) * v[i]  # Eq. 2, signal and noise
            if w_px is not None:
                a = abs_x[b + r_abs, c_abs + i] * iru  # Eq. 18
                vi -= a * (0.5 + a * (-0.2 + 0.05 * a)) * (
                    w_px[b + r_ir, c_ir + i] * unit)  # Eqs. 15-16
            v[i] = vi
        for i in range(nc):
            vi = v[i]
            if mask is not None:  # straight-through mask of the ADC (MODEL.md sec. 8)
                mask[b, i] = abs(vi) <= mask_bound
            if s_out is not None:
                lev = min(max(np.rint(vi * s_out), -levels), levels)  # Eq. 5, ADC
                if level_out is not None:
                    level_out[b, i] = np.int8(lev)
                vi = lev / s_out
            r_out = vi * rf * col_f[i]  # Eq. 1
            if accumulate:
                out[b, i] += r_out
            else:
                out[b, i] = r_out


@nb.njit(cache=True, parallel=True)
def output_stage_parallel(z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, s_out, levels,
                          row_f, col_f, key, out, mask, mask_bound, level_out, noisy,
                          accumulate):  # pragma: no cover - via tests
    """:func:`output_stage`, blocks of rows in parallel."""
    n_rows, nc = z.shape
    rows = _rows_per_item(nc)
    for item in prange((n_rows + rows - 1) // rows):
        noise = np.empty(rows * nc + 1, dtype=z.dtype)
        _stage_block(item * rows, min(n_rows, (item + 1) * rows), z, w_px, abs_x, x2, at, unit,
                     out_noise, w_noise, ir_k, s_out, levels, row_f, col_f, key, out, mask,
                     mask_bound, level_out, noise, noisy, accumulate)


@nb.njit(cache=True)
def output_stage_serial(z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, s_out, levels,
                        row_f, col_f, key, out, mask, mask_bound, level_out, noisy,
                        accumulate):  # pragma: no cover - via tests
    """:func:`output_stage` on one thread (small calls: no thread start-up)."""
    n_rows, nc = z.shape
    rows = _rows_per_item(nc)
    noise = np.empty(rows * nc + 1, dtype=z.dtype)
    for b0 in range(0, n_rows, rows):
        _stage_block(b0, min(n_rows, b0 + rows), z, w_px, abs_x, x2, at, unit, out_noise,
                     w_noise, ir_k, s_out, levels, row_f, col_f, key, out, mask, mask_bound,
                     level_out, noise, noisy, accumulate)


def output_stage(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                 levels, row_f, col_f, key, accumulate, out, mask=NO_MASK, mask_bound=0.0,
                 at=_AT0, parallel=None, level_out=None):
    """out (+)= row_f col_f Q_out(z u + dy_IR + sqrt(sigma_out^2 + sigma_i^2) xi) (Eqs. 1, 2, 5,
    14-16), in one pass over blocks of rows (in parallel for large calls).

    z : (batch, cols) W~ lev, C order, in input-level units (x~ = u lev)
    w_px, abs_x, x2 : C-ordered arrays holding W~ (P o lev), |W~| |lev|, |W~| lev^2 as blocks:
        term[b, i] = array[b + at[2k], at[2k + 1] + i] for k = 0, 1, 2 (rows stacked under the
        signal in one GEMM, or column blocks of one grouped convolution); used only when
        has_ir (w_px, abs_x) and has_st (x2)
    unit : u, normalised input per level; ir_k : ir_drop scale x g_ir x n_rows
    s_out : ADC levels per output unit (0: no ADC); levels : 2^(q-1) - 1
    row_f : (batch,) or (1,), col_f : (cols,), digital factors of Eq. 1
    mask : (batch, cols) bool, filled with |pre-ADC value| <= mask_bound (training's
        straight-through mask), or NO_MASK
    level_out : (batch, cols) int8 or None, filled with the ADC level of each output (needs
        the ADC and at most 8 bits), which training keeps for its backward pass
    parallel : None (by size), True or False (the same numbers either way)
    The draws depend on (key, row, column) only: same key, same numbers on any thread count.
    """
    if parallel is None:
        parallel = z.size >= PARALLEL_MIN_SIZE
    kernel = output_stage_parallel if parallel else output_stage_serial
    kernel(z, w_px if has_ir else None, abs_x if has_ir else None, x2 if has_st else None, at,
           float(unit), float(out_noise), float(w_noise), float(ir_k),
           float(s_out) if s_out > 0.0 else None, float(levels), row_f, col_f, key, out,
           mask if mask.shape[0] > 0 else None, float(mask_bound),
           level_out if s_out > 0.0 else None, bool(out_noise > 0.0 or has_st), bool(accumulate))


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


#: Rows per partial sum of the stage's backward (fixed: the same sums on any thread count).
_BWD_ROWS = 256


@nb.njit(cache=True, parallel=True)
def stage_backward(grad, q, q_scale, mask, factor, grad_z,
                   partial):  # pragma: no cover - via tests
    """Backward of the training output stage, one pass (MODEL.md sec. 8, straight-through ADC).

    grad, q : (rows, cols) upstream gradient and the stage's quantised output before the
    digital factor, as values (q_scale 1) or as int8 ADC levels (q_scale the level size);
    mask : (rows, cols) bool straight-through mask or None; factor : (cols,) or (1,) digital
    factor. Writes grad_z = grad * factor * mask and, per block of ``_BWD_ROWS``
    rows, partial[block] = sum over its rows of grad * q (float64; the caller adds the blocks in
    order).
    """
    n_rows, nc = grad.shape
    one = factor.shape[0] == 1
    for blk in prange(partial.shape[0]):
        acc = partial[blk]
        acc[:] = 0.0
        for b in range(blk * _BWD_ROWS, min(n_rows, (blk + 1) * _BWD_ROWS)):
            for i in range(nc):
                g = grad[b, i]
                f = factor[0] if one else factor[i]
                v = g * f
                if mask is not None:
                    v = v if mask[b, i] else 0.0 * v
                grad_z[b, i] = v
                acc[i] += g * (q[b, i] * q_scale)
