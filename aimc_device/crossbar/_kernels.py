"""Numba kernels of the crossbar's output stage: one fused, parallel pass per tile. Private.

:func:`output_stage` takes a tile's products (GEMMs or convolutions); :func:`conv_stage` runs a
convolution tile of few rows whole, forming the products from the image itself; the DAC, the
straight-through backward and their serial/parallel dispatch follow. The single definition of
each periphery element is in ``periphery.py`` (torch); these kernels restate the output-side
elements in scalar form for speed on CPU (IR drop Eqs. 15-16 with the polynomial of
``periphery.IR_DROP_POLY``, short-term and output noise Eqs. 2 and 14, ADC Eq. 5, digital
scales Eq. 1) in the precision of the arrays, and the tests compare them with the torch path.
Normal variates come from the counter-based ziggurat of the PCM sampler, keyed by (key, element
index, stream), so the same key gives the same numbers on any thread count.

No kernel here is compiled with fast-math: LLVM vectorises these elementwise loops without it,
and with it ("reassoc", "contract", "arcp", "afn") a loop's vectorised body and its scalar
fallback, which LLVM picks at run time from the buffers' addresses (its overlap check), may round
the same expression differently, so that the same inputs gave outputs one ulp apart from run to
run. Without it every output is the IEEE evaluation of its expression in source order, whichever
code path runs.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-16.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange, types
from numba.extending import overload

from .periphery import IR_DROP_POLY

# The counter-based generator and ziggurat tables of the device sampler (one definition).
from ..pcm._kernels import FAST as _FAST
from ..pcm._kernels import _hash, finish_variate, half_normal_rect, normals_block

#: Stream number of the per-MVM draws (the PCM sampler uses streams 0 and 2 of 4).
STREAM_MVM = np.uint64(3)

_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)


#: Outputs per work item (rounded to whole rows, an even number of them): one scratch buffer
#: each, long enough for SIMD loops even when rows are short (a 16-channel convolution).
_ITEM_SIZE = 1024
#: Outputs per call above which the parallel kernel is used.
PARALLEL_MIN_SIZE = 1 << 15
#: The ``mask`` argument meaning "no mask".
NO_MASK = np.zeros((0, 0), dtype=np.bool_)
_AT0 = np.zeros(6, dtype=np.intp)


@nb.njit("intp(intp)", cache=True)
def _rows_per_item(nc):  # pragma: no cover - via tests
    return max(2, (_ITEM_SIZE // max(nc, 1)) // 2 * 2)


@nb.njit(cache=True)
def _normals(key, e0, m, noise):  # pragma: no cover - via tests
    """noise[:m] = the standard normals of elements e0 .. e0 + m - 1 (e0 even), stream
    STREAM_MVM (:func:`aimc_device.pcm._kernels.normals_block`)."""
    normals_block(key, e0, m, noise, STREAM_MVM)


@nb.njit(cache=True)
def _ir_drop(abs_x, w_px, iru, unit, poly):  # pragma: no cover - via tests
    """IR-drop deviation of one output (Eqs. 15-16, 18): a = |W~||x~| g_ir n scaled by ``iru``,
    dy = c(a) (W~ o P) x~ with c(a) = a (c1 + a (c2 + c3 a)), ``poly`` = (c1, c2, c3) from
    :data:`periphery.IR_DROP_POLY`; subtracted from the output."""
    a = abs_x * iru
    return a * (poly[0] + a * (poly[1] + poly[2] * a)) * (w_px * unit)


@nb.njit(cache=True)
def _adc_level(v, s_out, levels):  # pragma: no cover - via tests
    """ADC level of the value v (Eq. 5): round(v s_out) clipped to [-levels, levels]."""
    return min(max(np.rint(v * s_out), -levels), levels)


@nb.njit(cache=True)
def _adc(e0, m, v, v0, s_out, levels, rf, cf, add, out, mask, mask_bound, level_out,
         accumulate):  # pragma: no cover - via tests
    """Elements e0 .. e0 + m - 1 of the flat outputs from their pre-ADC values v[v0:v0 + m]:
    the straight-through mask, the ADC (Eq. 5, its int8 level when asked; with no ADC,
    s_out None, the clip to [-levels, levels]), the digital factor rf cf[e] (Eq. 1) and the
    digital term add[e] (a bias; None: none), written or added."""
    for e in range(m):
        vi = v[v0 + e]
        if mask is not None:  # straight-through mask of the ADC (MODEL.md sec. 8)
            mask[e0 + e] = abs(vi) <= mask_bound
        if s_out is not None:
            lev = _adc_level(vi, s_out, levels)  # Eq. 5, ADC
            if level_out is not None:
                level_out[e0 + e] = np.int8(lev)
            vi = lev / s_out
        else:  # no quantiser: the bound alone (levels = b_out, inf for none)
            vi = min(max(vi, -levels), levels)
        r_out = vi * rf * cf[e]  # Eq. 1
        if add is not None:
            r_out += add[e]
        if accumulate:
            out[e0 + e] += r_out
        else:
            out[e0 + e] = r_out


# Helpers that map a switched-off term (None) to None at compile time: a plain `if a is None`
# returning either would give an Optional type, checked at every access (no SIMD).
def _flat(a):
    """A C-ordered array as 1-d (None stays None)."""


def _tiled(a, n, nc):
    """(n * nc,) with a (nc,) repeated n times (None stays None)."""


@overload(_tiled)
def _tiled_impl(a, n, nc):
    if isinstance(a, types.NoneType):
        return lambda a, n, nc: None

    def impl(a, n, nc):
        t = np.empty(n * nc, dtype=a.dtype)
        for p in range(n):
            for i in range(nc):
                t[p * nc + i] = a[i]
        return t
    return impl


@overload(_flat)
def _flat_impl(a):
    if isinstance(a, types.NoneType):
        return lambda a: None
    return lambda a: a.reshape(-1)


# Switched-off elements come as None: Numba compiles one version per set of present arguments,
# with the dead branches removed, so that every loop is branch-free and vectorises (a run-time
# switch per element cost 15-40 %). Cached on disk like any signature.
@nb.njit(cache=True)
def _stage_block(b0, b1, z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, poly, s_out,
                 levels, row_f, col_f, bias, key, out, mask, mask_bound, level_out, noise, noisy,
                 accumulate):  # pragma: no cover - via tests
    """Rows b0:b1 of :func:`output_stage`; ``noise`` is a scratch buffer (z's dtype) of at least
    (b1 - b0) * cols + 1 elements; b0 * cols is even."""
    nc = out.shape[1]
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    m = (b1 - b0) * nc
    if noisy:  # standard normals, element e = row * cols + col
        _normals(key, b0 * nc, m, noise)
    else:
        noise[:m] = 0.0
    r_ir, c_ir, r_abs, c_abs, r_sq, c_sq = at[0], at[1], at[2], at[3], at[4], at[5]
    for b in range(b0, b1):  # then two branch-free (vectorised) passes per row, each over few
        rf = row_f[0] if row_f.shape[0] == 1 else row_f[b]  # arrays (few alias checks)
        o = (b - b0) * nc
        if nc >= _LONG_ROW:  # a row view: faster loops, one reference count per row
            _stage_row(b, noise[o:o + nc], 0, z, w_px, abs_x, x2, r_ir, c_ir, r_abs, c_abs, r_sq,
                       c_sq, unit, on2, wn2, iru, poly, s_out, levels, rf, col_f, bias, out,
                       mask, mask_bound, level_out, accumulate)
        else:
            _stage_row(b, noise, o, z, w_px, abs_x, x2, r_ir, c_ir, r_abs, c_abs, r_sq, c_sq,
                       unit, on2, wn2, iru, poly, s_out, levels, rf, col_f, bias, out, mask,
                       mask_bound, level_out, accumulate)


#: Columns from which the output stage passes each row's noise as a view (see _stage_block).
_LONG_ROW = 32


@nb.njit(cache=True, inline="always")
def _stage_row(b, v, o, z, w_px, abs_x, x2, r_ir, c_ir, r_abs, c_abs, r_sq, c_sq, unit, on2, wn2,
               iru, poly, s_out, levels, rf, col_f, bias, out, mask, mask_bound, level_out,
               accumulate):  # pragma: no cover - via tests
    """Output row b of :func:`output_stage` from its standard normals v[o:o + cols]: the
    pre-ADC values in place of the normals, then mask, ADC, digital factors and bias."""
    nc = out.shape[1]
    for i in range(nc):  # pre-ADC value, in place of the noise
        var = on2
        if x2 is not None:
            var += wn2 * x2[b + r_sq, c_sq + i]  # Eq. 14
        vi = z[b, i] * unit + math.sqrt(var) * v[o + i]  # Eq. 2, signal and noise
        if w_px is not None:
            vi -= _ir_drop(abs_x[b + r_abs, c_abs + i], w_px[b + r_ir, c_ir + i], iru, unit,
                           poly)  # Eqs. 15-16, 18
        v[o + i] = vi
    # The steps of _adc on 2-d rows: calling _adc on flat views here ran 1.4-1.6x slower.
    for i in range(nc):
        vi = v[o + i]
        if mask is not None:  # straight-through mask of the ADC (MODEL.md sec. 8)
            mask[b, i] = abs(vi) <= mask_bound
        if s_out is not None:
            lev = _adc_level(vi, s_out, levels)  # Eq. 5, ADC
            if level_out is not None:
                level_out[b, i] = np.int8(lev)
            vi = lev / s_out
        else:  # no quantiser: the bound alone (levels = b_out, inf for none)
            vi = min(max(vi, -levels), levels)
        r_out = vi * rf * col_f[i]  # Eq. 1
        if bias is not None:
            r_out += bias[i]
        if accumulate:
            out[b, i] += r_out
        else:
            out[b, i] = r_out


@nb.njit(cache=True, parallel=True)
def output_stage_parallel(z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, poly, s_out,
                          levels, row_f, col_f, bias, key, out, mask, mask_bound, level_out,
                          noisy, accumulate):  # pragma: no cover - via tests
    """:func:`output_stage`, blocks of rows in parallel."""
    n_rows, nc = out.shape
    rows = _rows_per_item(nc)
    for item in prange((n_rows + rows - 1) // rows):
        noise = np.empty(rows * nc + 1, dtype=out.dtype)
        _stage_block(item * rows, min(n_rows, (item + 1) * rows), z, w_px, abs_x, x2, at, unit,
                     out_noise, w_noise, ir_k, poly, s_out, levels, row_f, col_f, bias, key, out,
                     mask, mask_bound, level_out, noise, noisy, accumulate)


@nb.njit(cache=True)
def output_stage_serial(z, w_px, abs_x, x2, at, unit, out_noise, w_noise, ir_k, poly, s_out,
                        levels, row_f, col_f, bias, key, out, mask, mask_bound, level_out, noisy,
                        accumulate):  # pragma: no cover - via tests
    """:func:`output_stage` on one thread (small calls: no thread start-up)."""
    n_rows, nc = out.shape
    rows = _rows_per_item(nc)
    noise = np.empty(rows * nc + 1, dtype=out.dtype)
    for b0 in range(0, n_rows, rows):
        _stage_block(b0, min(n_rows, b0 + rows), z, w_px, abs_x, x2, at, unit, out_noise,
                     w_noise, ir_k, poly, s_out, levels, row_f, col_f, bias, key, out, mask,
                     mask_bound, level_out, noise, noisy, accumulate)


def output_stage(z, w_px, abs_x, x2, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
                 levels, row_f, col_f, key, accumulate, out, mask=NO_MASK, mask_bound=0.0,
                 at=_AT0, parallel=None, level_out=None, bias=None, bound=math.inf):
    """out (+)= row_f col_f Q_out(z u + dy_IR + sqrt(sigma_out^2 + sigma_i^2) xi) (Eqs. 1, 2, 5,
    14-16), in one pass over blocks of rows (in parallel for large calls).

    z : (batch, >= cols) W~ lev in its first columns, C order, input-level units (x~ = u lev)
    w_px, abs_x, x2 : C-ordered arrays holding W~ (P o lev), |W~| |lev|, |W~| lev^2 as blocks:
        term[b, i] = array[b + at[2k], at[2k + 1] + i] for k = 0, 1, 2 (rows stacked under the
        signal in one GEMM, or column blocks of one convolution's output); used only when
        has_ir (w_px, abs_x) and has_st (x2)
    unit : u, normalised input per level; ir_k : s g_ir n_rows, the wire-resistance scale s
        (``CrossbarConfig.ir_drop``) times g_ir times the tile's rows (Eq. 18)
    s_out : ADC levels per output unit (0: no ADC); levels : 2^(q-1) - 1
    bound : with no ADC, the bound b_out the outputs are clipped to (inf: no clipping)
    row_f : (batch,) or (1,), col_f : (cols,), digital factors of Eq. 1
    mask : (batch, cols) bool, filled with |pre-ADC value| <= mask_bound (training's
        straight-through mask), or NO_MASK
    level_out : (batch, cols) int8 or None, filled with the ADC level of each output (needs
        the ADC and at most 8 bits), which training keeps for its backward pass
    parallel : None (by size), True or False (the same numbers either way)
    bias : (cols,) or None, a digital term added to every row after the factors (a layer's
        bias; pass it to one call only when tiles accumulate)
    The draws depend on (key, row, column) only: same key, same numbers on any thread count.
    """
    if parallel is None:
        parallel = out.size >= PARALLEL_MIN_SIZE
    kernel = output_stage_parallel if parallel else output_stage_serial
    ft = out.dtype.type  # scalars in the arrays' precision: float32 arithmetic for float32 data
    kernel(z, w_px if has_ir else None, abs_x if has_ir else None, x2 if has_st else None, at,
           ft(unit), ft(out_noise), ft(w_noise), ft(ir_k), _poly(out.dtype),
           ft(s_out) if s_out > 0.0 else None, ft(levels if s_out > 0.0 else bound), row_f,
           col_f, bias, key, out,
           mask if mask.shape[0] > 0 else None, ft(mask_bound),
           level_out if s_out > 0.0 else None, bool(out_noise > 0.0 or has_st), bool(accumulate))


def _poly(dtype):
    """The IR-drop polynomial's coefficients (periphery.IR_DROP_POLY) in ``dtype``."""
    return np.array(IR_DROP_POLY, dtype=dtype)


@nb.njit(cache=True)
def _gather_patches(r0, r1, x, geom, pt):  # pragma: no cover - via tests
    """pt[j, p] = input j of the patch of output pixel r0 + p (zero in the padding).

    Output pixel r is (b, oh, ow) in C order; the patch's inputs come in the order of the tile's
    rows (channel, kernel row, kernel column). Runs of pixels along one output row are copied
    tap by tap (a strided copy that vectorises)."""
    _, h_in, w_in, n_ch = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n = (geom[0], geom[1], geom[2], geom[3], geom[4],
                                                  geom[5], geom[6], geom[7], geom[8], geom[9])
    zero = x.dtype.type(0.0)
    r = r0
    while r < r1:
        ow0 = r % ow_n
        t = r // ow_n
        oh = t % oh_n
        b = t // oh_n
        run = min(r1 - r, ow_n - ow0)
        p0 = r - r0
        j = 0
        for c in range(n_ch):
            for ki in range(kh):
                ih = oh * sh - ph + ki * dh
                row_in = 0 <= ih < h_in
                for kj in range(kw):
                    iw0 = ow0 * sw - pw + kj * dw
                    for q in range(run):
                        iw = iw0 + q * sw
                        pt[j, p0 + q] = x[b, ih, iw, c] if row_in and 0 <= iw < w_in else zero
                    j += 1
        r += run


@nb.njit(cache=True)
def _conv_block(r0, r1, x, geom, w, wpx, wabs, wsq, unit, out_noise, w_noise, ir_k, poly, s_out,
                levels, rf, cf, bt, key, out, mask, mask_bound, level_out, noisy, pt, prod,
                noise):  # pragma: no cover - via tests
    """Output pixels r0:r1 of :func:`conv_stage`. Scratch: pt (rows, P) patches, prod
    (4, cols, P) products, noise (cols, P), P >= r1 - r0; r0 * cols even; rf the row factor and
    cf (P * cols,) the column factor of each output of a block (in output order), bt the
    same for the bias (or None)."""
    n_rows, nc = w.shape[1], w.shape[0]
    npx = r1 - r0
    zero = x.dtype.type(0.0)
    _gather_patches(r0, r1, x, geom, pt)
    # The products, pixels along the vector: prod[k, i, p] for k = W~ x~, (W~ o P) x~,
    # |W~| |x~|, |W~| x~^2 (Eqs. 2, 15, 18, 14), four tile rows per pass (each pass reads and
    # writes its accumulators once for four rows), then the rows left over.
    for i in range(nc):
        z, px, ab, sq = prod[0, i], prod[1, i], prod[2, i], prod[3, i]
        z[:npx] = zero
        if wpx is not None:
            px[:npx] = zero
            ab[:npx] = zero
        if wsq is not None:
            sq[:npx] = zero
        j = 0
        while j < n_rows:
            if j + 4 <= n_rows:
                t0, t1, t2, t3 = pt[j], pt[j + 1], pt[j + 2], pt[j + 3]
                a0, a1, a2, a3 = w[i, j], w[i, j + 1], w[i, j + 2], w[i, j + 3]
                for p in range(npx):
                    z[p] += a0 * t0[p] + a1 * t1[p] + a2 * t2[p] + a3 * t3[p]
                if wpx is not None:
                    b0, b1, b2, b3 = wpx[i, j], wpx[i, j + 1], wpx[i, j + 2], wpx[i, j + 3]
                    c0, c1, c2, c3 = wabs[i, j], wabs[i, j + 1], wabs[i, j + 2], wabs[i, j + 3]
                    for p in range(npx):
                        v0, v1, v2, v3 = t0[p], t1[p], t2[p], t3[p]
                        px[p] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
                        ab[p] += c0 * abs(v0) + c1 * abs(v1) + c2 * abs(v2) + c3 * abs(v3)
                if wsq is not None:
                    c0, c1, c2, c3 = wsq[i, j], wsq[i, j + 1], wsq[i, j + 2], wsq[i, j + 3]
                    for p in range(npx):
                        v0, v1, v2, v3 = t0[p], t1[p], t2[p], t3[p]
                        sq[p] += c0 * v0 * v0 + c1 * v1 * v1 + c2 * v2 * v2 + c3 * v3 * v3
                j += 4
            else:
                t0 = pt[j]
                a0 = w[i, j]
                for p in range(npx):
                    z[p] += a0 * t0[p]
                if wpx is not None:
                    b0, c0 = wpx[i, j], wabs[i, j]
                    for p in range(npx):
                        px[p] += b0 * t0[p]
                        ab[p] += c0 * abs(t0[p])
                if wsq is not None:
                    c0 = wsq[i, j]
                    for p in range(npx):
                        sq[p] += c0 * t0[p] * t0[p]
                j += 1
    if noisy:
        _normals_by_column(key, r0, npx, nc, noise)
    else:
        noise[:, :npx] = 0.0
    on2 = out_noise * out_noise
    wn2 = w_noise * w_noise * unit * unit
    iru = unit * ir_k
    for i in range(nc):  # pre-ADC values column by column, pixels along the vector
        for p in range(npx):
            var = on2
            if wsq is not None:
                var += wn2 * prod[3, i, p]  # Eq. 14
            vi = prod[0, i, p] * unit + math.sqrt(var) * noise[i, p]  # Eq. 2
            if wpx is not None:
                vi -= _ir_drop(prod[2, i, p], prod[1, i, p], iru, unit, poly)  # Eqs. 15-16
            noise[i, p] = vi
    v = prod[0].reshape(-1)  # the pre-ADC values in output order, in place of the signal
    for p in range(npx):
        for i in range(nc):
            v[p * nc + i] = noise[i, p]
    _adc(r0 * nc, npx * nc, v, 0, s_out, levels, rf, cf, bt, out.reshape(-1), _flat(mask),
         mask_bound, _flat(level_out), False)


@nb.njit(cache=True)
def _normals_by_column(key, r0, npx, nc, noise):  # pragma: no cover - via tests
    """noise[i, p] = the standard normal of element (r0 + p) * nc + i, the same numbers as
    :func:`_normals` (r0 * nc even), laid out column by column."""
    e0 = r0 * nc
    if nc % 2 == 0:  # the pair (2h, 2h + 1) is columns (i, i + 1) of one pixel
        half_nc = nc // 2
        base = _FAST + np.uint64(e0 // 2)
        for i2 in range(half_nc):
            lo = noise[2 * i2]
            hi = noise[2 * i2 + 1]
            for p in range(npx):
                r = _hash(key, base + np.uint64(p * half_nc + i2))
                lo[p] = half_normal_rect(r & _MASK32)
                hi[p] = half_normal_rect(r >> _S32)
        for i in range(nc):
            for p in range(npx):
                if noise[i, p] != noise[i, p]:
                    e = p * nc + i
                    noise[i, p] = finish_variate(key, base, e, e0 + e, STREAM_MVM)
    else:  # pairs straddle pixels: draw in element order, then lay out
        flat = np.empty(npx * nc + 1, dtype=noise.dtype)
        _normals(key, e0, npx * nc, flat)
        for p in range(npx):
            for i in range(nc):
                noise[i, p] = flat[p * nc + i]


#: Output elements per work item of :func:`conv_stage` (whole pixels, an even number).
_CONV_ITEM_SIZE = 4096


@nb.njit(cache=True, parallel=True)
def conv_stage_parallel(x, geom, w, wpx, wabs, wsq, unit, out_noise, w_noise, ir_k, poly, s_out,
                        levels, row_f, col_f, bias, key, out, mask, mask_bound, level_out,
                        noisy):  # pragma: no cover - via tests
    """:func:`conv_stage`, blocks of output pixels in parallel."""
    n_px, nc = out.shape
    n_rows = w.shape[1]
    per = max(2, (_CONV_ITEM_SIZE // max(nc, 1)) // 2 * 2)
    cf = _tiled(col_f, per, nc)  # the column factors (Eq. 1) of a block's outputs in order
    bt = _tiled(bias, per, nc)  # and the bias
    for item in prange((n_px + per - 1) // per):
        r0 = item * per
        pt = np.empty((n_rows, per), dtype=x.dtype)
        prod = np.empty((4, nc, per), dtype=out.dtype)
        noise = np.empty((nc, per), dtype=out.dtype)
        _conv_block(r0, min(n_px, r0 + per), x, geom, w, wpx, wabs, wsq, unit, out_noise,
                    w_noise, ir_k, poly, s_out, levels, row_f[0], cf, bt, key, out, mask,
                    mask_bound, level_out, noisy, pt, prod, noise)


#: Most tile rows for which :func:`conv_stage` computes a convolution's products itself: below
#: it the convolution is bound by its outputs (each is a few multiply-adds), and writing the four
#: products to memory and reading them back costs more than computing them in place.
CONV_STAGE_MAX_ROWS = 32


def conv_stage(x, geom, w, wpx, wabs, has_ir, has_st, unit, out_noise, w_noise, ir_k, s_out,
               levels, row_f, col_f, key, out, mask=NO_MASK, mask_bound=0.0, level_out=None,
               bias=None, bound=math.inf):
    """The whole forward of a convolution tile with few rows, one pass per block of output
    pixels: the patches gathered from the image, the products W~ x~, (W~ o P) x~, |W~| |x~|,
    |W~| x~^2, then the output stage of :func:`output_stage` on them (Eqs. 1, 2, 5, 14-16).

    x : (batch, height, width, channels) C order, normalised inputs x~ (units of ``unit``)
    geom : intp (10,), kernel height and width, strides, paddings, dilations, output height and
        width
    w, wpx, wabs : (cols, rows) C order, W~, W~ o P and |W~| (rows in the order channel, kernel
        row, kernel column); wpx used only when has_ir, wabs when has_ir or has_st
    out : (batch * out_h * out_w, cols), the output pixels in C order, channels last
    row_f : (1,), one factor for all pixels (no per-vector input range on this path)
    bias : (cols,) or None, as in :func:`output_stage`
    The other arguments are those of :func:`output_stage`, and so are the draws (element index
    pixel * cols + col): the same key gives the numbers of the output stage applied to the
    products computed as convolutions.
    """
    if row_f.shape[0] != 1:
        raise ValueError("conv_stage: row_f must hold one factor (no per-vector scales here)")
    ft = out.dtype.type
    conv_stage_parallel(x, geom, w, wpx if has_ir else None,
                        wabs if (has_ir or has_st) else None, wabs if has_st else None,
                        ft(unit), ft(out_noise), ft(w_noise), ft(ir_k), _poly(out.dtype),
                        ft(s_out) if s_out > 0.0 else None,
                        ft(levels if s_out > 0.0 else bound), row_f, col_f, bias, key,
                        out, mask if mask.shape[0] > 0 else None, ft(mask_bound),
                        level_out if s_out > 0.0 else None, bool(out_noise > 0.0 or has_st))


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


# Rows split over both cores: each core then holds the levels its GEMM threads read next (a
# single-threaded DAC made the following GEMM slower than it saved).
dac_levels_parallel = nb.njit(_DAC_SIG, cache=True, parallel=True)(_dac_levels)
dac_levels_serial = nb.njit(_DAC_SIG, cache=True)(_dac_levels)


def dac_levels(x, *args):
    """Dispatch to the serial or the parallel DAC kernel by size (same numbers from both)."""
    out = args[-1]
    kernel = dac_levels_parallel if out.size >= PARALLEL_MIN_SIZE else dac_levels_serial
    kernel(x, *args)


#: Rows per partial sum of the stage's backward (fixed: the same sums on any thread count).
_BWD_ROWS = 256


def _stage_backward(grad, q, q_scale, mask, factor, grad_z, partial,
                    partial_b):  # pragma: no cover - via tests
    """Backward of the training output stage, one pass (MODEL.md sec. 8, straight-through ADC).

    grad, q : (rows, cols) upstream gradient and the stage's quantised output before the
    digital factor, as values (q_scale 1) or as int8 ADC levels (q_scale the level size);
    mask : (rows, cols) bool straight-through mask or None; factor : (cols,) or (1,) digital
    factor. Writes grad_z = grad * factor * mask and, per block of ``_BWD_ROWS``
    rows, partial[block] = sum over its rows of grad * q (float64; the caller adds the blocks in
    order), and partial_b[block] = the sum of grad (a bias's gradient) unless None.
    """
    n_rows, nc = grad.shape
    one = factor.shape[0] == 1
    for blk in prange(partial.shape[0]):
        acc = partial[blk]
        acc[:] = 0.0
        if partial_b is not None:
            partial_b[blk] = 0.0
        for b in range(blk * _BWD_ROWS, min(n_rows, (blk + 1) * _BWD_ROWS)):
            for i in range(nc):
                g = grad[b, i]
                f = factor[0] if one else factor[i]
                v = g * f
                if mask is not None:
                    v = v if mask[b, i] else 0.0 * v
                grad_z[b, i] = v
                acc[i] += g * (q[b, i] * q_scale)
                if partial_b is not None:
                    partial_b[blk, i] += g


_stage_backward_parallel = nb.njit(cache=True, parallel=True)(_stage_backward)
_stage_backward_serial = nb.njit(cache=True)(_stage_backward)


def stage_backward(grad, q, q_scale, mask, factor, grad_z, partial, partial_b=None):
    """:func:`_stage_backward`, in parallel for large calls (the same sums either way: the
    blocks are fixed)."""
    kernel = _stage_backward_parallel if grad.size >= PARALLEL_MIN_SIZE else \
        _stage_backward_serial
    kernel(grad, q, q_scale, mask, factor, grad_z, partial, partial_b)
