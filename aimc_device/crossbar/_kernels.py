"""Numba kernels of the crossbar's fast CPU backend: the output stage of a tile. Private.

:func:`output_stage` takes a tile's products (GEMMs or convolutions) and applies the rest of the
MVM in one pass; :func:`conv_stage` runs a convolution tile of few rows whole, forming the
products from the image itself. Both take three records: the products (:class:`Products`) or a
convolution's weights (:class:`ConvWeights`), the per-call scalars (:class:`Stage`, made by
:func:`stage`) and the outputs (:class:`Outputs`); a switched-off term is None, and Numba
compiles one version per set of present terms, with the dead code removed, so that every loop
is branch-free and vectorises. Each element is written once, in scalar form: the pre-ADC value
(:func:`_pre_adc`: IR drop Eqs. 15-16, 18 with ``periphery.IR_DROP_POLY``, short-term and
output noise Eqs. 2 and 14) and the ADC with the digital factors (:func:`_adc_out`: Eqs. 1,
5). They restate the torch reference (``periphery.py``, :mod:`aimc_device.crossbar.mvm`), and
the tests compare the two. Normal variates come from the counter-based ziggurat of the PCM
sampler, keyed by (key, element index, stream), so the same key gives the same numbers on any
thread count. The DAC (Eq. 5) and the straight-through backward of the stage follow.

No kernel here is compiled with fast-math: with it ("reassoc", "contract", "arcp", "afn") a
loop's vectorised body and its scalar fallback, which LLVM picks at run time from the buffers'
addresses, may round the same expression differently, so that the same inputs gave outputs one
ulp apart from run to run. Without it every output is the IEEE evaluation of its expression in
source order, whichever code path runs.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-16.
"""
from __future__ import annotations

import functools
import math
from collections import namedtuple

import numba as nb
import numpy as np
from numba import prange, types
from numba.extending import overload

from .periphery import IR_DROP_POLY, quantizer_levels
from ..pcm.numba_builds import serial_and_parallel

# The counter-based generator and ziggurat tables of the device sampler (one definition).
from ..pcm.counter_rng import FAST as _FAST
from ..pcm.counter_rng import finish_variate, half_normal_rect, normals_block
from ..pcm.counter_rng import hash_counter as _hash

#: Stream number of the per-MVM draws (the PCM sampler uses streams 0 to 2 of 4).
STREAM_MVM = np.uint64(3)
#: Elements per call above which the parallel DAC and stage backward are used (the same numbers
#: either way).
PARALLEL_MIN_SIZE = 1 << 15
#: Outputs per call above which the parallel output stage is used: from about 2000 outputs its
#: two threads beat one (2-core AVX2 machine: 17 vs 33 us at 8192 outputs, 9 vs 8 us at 1024).
STAGE_PARALLEL_MIN = 1 << 11
#: Outputs per work item of :func:`output_stage` (whole rows, an even number of them).
_ITEM_SIZE = 1024
#: Output elements per work item of :func:`conv_stage` (whole pixels, an even number).
_CONV_ITEM_SIZE = 4096
#: Most tile rows for which :func:`conv_stage` computes a convolution's products itself: below
#: it the convolution is bound by its outputs (each is a few multiply-adds), and writing the four
#: products to memory and reading them back costs more than computing them in place.
CONV_STAGE_MAX_ROWS = 32

_S32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)

Stage = namedtuple("Stage", "unit on2 wn2 iru c1 c2 c3 s_out levels row_f mask_bound key "
                            "noisy accumulate row0")
Stage.__doc__ = """Per-call scalars of an output stage, in the arrays' precision (see :func:`stage`).

unit: normalised input per unit of the products' inputs (the DAC level size, or 1); on2:
sigma_out^2; wn2: (sigma_w0 unit)^2; iru: unit s g_ir n (Eq. 18); c1, c2, c3: the IR-drop
polynomial (``periphery.IR_DROP_POLY``, Eq. 16);
s_out: ADC levels per output unit, None for no ADC; levels: the largest ADC level (with no ADC:
the bound b_out the outputs are clipped to, inf for none); row_f: the digital factor common to
all outputs; mask_bound: bound of the straight-through mask; key: the draws' key; noisy: whether
any noise is drawn; accumulate: add to the outputs instead of writing them; row0: the index of
the arrays' first row among the rows of the call, even (a call done in blocks of rows draws, for
each block, the numbers of those rows of the whole call)."""

Products = namedtuple("Products", "z w_px abs_x x2 at")
Products.__doc__ = """A tile's products, C-ordered (rows, >= cols) arrays: z = W~ x~ in its first
columns; w_px = (W~ o P) x~, abs_x = |W~| |x~| (None: no IR drop), x2 = |W~| x~^2 (None: no
short-term noise), each term[b, i] = array[b + at[2k], at[2k + 1] + i] for k = 0, 1, 2 (rows
stacked under another product, or column blocks of one convolution's output)."""

Outputs = namedtuple("Outputs", "out col_f bias mask level_out")
Outputs.__doc__ = """Where a stage writes: out (rows, cols); col_f (cols,), the digital factor of
each column (Eq. 1); bias (cols,) or None, added after the factors; mask (rows, cols) bool or
None, filled with |pre-ADC value| <= mask_bound (training's straight-through mask); level_out
(rows, cols) int8 or None, the ADC level of each output (needs an ADC of at most 8 bits)."""

ConvWeights = namedtuple("ConvWeights", "w wpx wabs wsq")
ConvWeights.__doc__ = """A convolution tile's weights, (cols, rows) C order, rows in the order
(channel, kernel row, kernel column): W~; W~ o P (None: no IR drop); |W~| for the IR-drop
activity (None: no IR drop); |W~| for the short-term noise (None: none)."""


def stage(cfg, n_rows, dtype, key, *, unit=1.0, row_f=1.0, accumulate=False) -> Stage:
    """The :class:`Stage` record of a tile of ``n_rows`` rows under ``cfg`` in ``dtype``."""
    return _stage(cfg, n_rows, np.dtype(dtype), float(unit), float(row_f), bool(accumulate)
                  )._replace(key=np.uint64(key))


@functools.lru_cache(maxsize=4096)
def _stage(cfg, n_rows, dtype, unit, row_f, accumulate) -> Stage:
    ft = dtype.type  # scalars in the arrays' precision
    s_out, levels = quantizer_levels(cfg.out_bits, cfg.out_bound)  # ADC (Eq. 5)
    return Stage(unit=ft(unit), on2=ft(cfg.out_noise) * ft(cfg.out_noise),
                 wn2=ft(cfg.w_noise * unit) * ft(cfg.w_noise * unit),
                 iru=ft(unit * cfg.ir_drop * cfg.ir_drop_g * n_rows),
                 c1=ft(IR_DROP_POLY[0]), c2=ft(IR_DROP_POLY[1]), c3=ft(IR_DROP_POLY[2]),
                 s_out=ft(s_out) if s_out > 0.0 else None,
                 levels=ft(levels if s_out > 0.0 else cfg.out_bound), row_f=ft(row_f),
                 mask_bound=ft(cfg.out_bound), key=np.uint64(0), noisy=cfg.has_noise,
                 accumulate=accumulate, row0=0)


# Element access that maps a switched-off term (None) to zero or to nothing at compile time: a
# plain `if a is None` on a record's field does not compile, and a run-time switch per element
# cost 15-40 %.
def _at(a, b, i, zero):
    """a[b, i], or ``zero`` when a is None."""


def _at1(a, i, zero):
    """a[i], or ``zero`` when a is None."""


def _put(a, b, i, v):
    """a[b, i] = v, nothing when a is None."""


def _adc(v, s_out, levels):
    """(level, value) of the ADC for the pre-ADC value v (Eq. 5): round(v s_out) clipped to
    [-levels, levels] and that level / s_out; with no ADC (s_out None) v clipped to the bound
    ``levels``, twice."""


@overload(_at)
def _at_impl(a, b, i, zero):
    if isinstance(a, types.NoneType):
        return lambda a, b, i, zero: zero
    return lambda a, b, i, zero: a[b, i]


@overload(_at1)
def _at1_impl(a, i, zero):
    if isinstance(a, types.NoneType):
        return lambda a, i, zero: zero
    return lambda a, i, zero: a[i]


@overload(_put)
def _put_impl(a, b, i, v):
    if isinstance(a, types.NoneType):
        return lambda a, b, i, v: None

    def impl(a, b, i, v):
        a[b, i] = v
    return impl


@overload(_adc)
def _adc_impl(v, s_out, levels):
    if isinstance(s_out, types.NoneType):
        def clip(v, s_out, levels):
            c = min(max(v, -levels), levels)
            return c, c
        return clip

    def adc(v, s_out, levels):
        lev = min(max(np.rint(v * s_out), -levels), levels)
        return lev, lev / s_out
    return adc


@nb.njit(cache=True)
def _pre_adc(z, w_px, abs_x, x2, xi, s):  # pragma: no cover - via tests
    """Pre-ADC value of one output from its products (a switched-off term 0) and its standard
    normal xi (Eqs. 2, 14-16, 18): z u + sqrt(sigma_out^2 + sigma_w0^2 u^2 x2) xi - c(a) u w_px,
    a = u s g_ir n abs_x, c(a) = a (c1 + a (c2 + c3 a))."""
    a = abs_x * s.iru  # Eq. 18
    c = a * (s.c1 + a * (s.c2 + s.c3 * a))  # Eq. 16
    return z * s.unit + math.sqrt(s.on2 + s.wn2 * x2) * xi - c * (w_px * s.unit)  # Eqs. 2, 14, 15


@nb.njit(cache=True)
def _adc_out(b, i, v, s, o):  # pragma: no cover - via tests
    """Output (b, i) from its pre-ADC value v: the straight-through mask (docs/model.md sec. 8), the
    ADC (Eq. 5, its level kept when asked), the digital factors and the bias (Eq. 1)."""
    _put(o.mask, b, i, abs(v) <= s.mask_bound)
    lev, q = _adc(v, s.s_out, s.levels)
    _put(o.level_out, b, i, np.int8(lev))
    r = q * s.row_f * o.col_f[i] + _at1(o.bias, i, o.col_f.dtype.type(0.0))
    if s.accumulate:
        o.out[b, i] += r
    else:
        o.out[b, i] = r


@nb.njit(cache=True)
def _normals(key, e0, m, noise):  # pragma: no cover - via tests
    """noise[:m] = the standard normals of elements e0 .. e0 + m - 1 (e0 even), stream
    STREAM_MVM (:func:`aimc_device.pcm.counter_rng.normals_block`)."""
    normals_block(key, e0, m, noise, STREAM_MVM)


@nb.njit("intp(intp)", cache=True)
def _rows_per_item(nc):  # pragma: no cover - via tests
    return max(2, (_ITEM_SIZE // max(nc, 1)) // 2 * 2)


def _output_stage(p, s, o):  # pragma: no cover - via tests
    """:func:`output_stage`, blocks of rows (in parallel in the parallel build)."""
    n_rows, nc = o.out.shape
    rows = _rows_per_item(nc)
    zero = o.out.dtype.type(0.0)
    r_ir, c_ir, r_abs, c_abs, r_sq, c_sq = p.at[0], p.at[1], p.at[2], p.at[3], p.at[4], p.at[5]
    for item in prange((n_rows + rows - 1) // rows):
        b0 = item * rows
        b1 = min(n_rows, b0 + rows)
        v = np.empty(rows * nc + 1, dtype=o.out.dtype)
        if s.noisy:  # standard normals, element e = row * cols + col (row of the call)
            _normals(s.key, (s.row0 + b0) * nc, (b1 - b0) * nc, v)
        else:
            v[:] = zero
        for b in range(b0, b1):  # two branch-free (vectorised) passes per row
            r = v[(b - b0) * nc:(b - b0 + 1) * nc]
            for i in range(nc):  # the pre-ADC values, in place of the normals
                r[i] = _pre_adc(p.z[b, i], _at(p.w_px, b + r_ir, c_ir + i, zero),
                                _at(p.abs_x, b + r_abs, c_abs + i, zero),
                                _at(p.x2, b + r_sq, c_sq + i, zero), r[i], s)
            for i in range(nc):
                _adc_out(b, i, r[i], s, o)


_output_stage_serial, _output_stage_parallel = serial_and_parallel(_output_stage)


def output_stage(products: Products, s: Stage, o: Outputs, parallel=None) -> None:
    """o.out (+)= row_f col_f Q_out(z u + dy_IR + sqrt(sigma_out^2 + sigma_i^2) xi) (+ bias)
    (Eqs. 1, 2, 5, 14-16), one pass over blocks of rows, in parallel for large calls.

    The draws depend on (key, s.row0 + row, column) only: the same key gives the same numbers
    on any thread count, and a call done in blocks of rows (even ``s.row0``) the numbers of the
    whole call. ``parallel``: None (by size), True or False.
    """
    if parallel is None:
        parallel = o.out.size >= STAGE_PARALLEL_MIN
    (_output_stage_parallel if parallel else _output_stage_serial)(products, s, o)


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
def _conv_products(npx, pt, w, wpx, wabs, wsq, prod, cols_per_group):  # pragma: no cover
    """prod[k, i, :npx] for k = W~ x~, (W~ o P) x~, |W~| |x~|, |W~| x~^2 (Eqs. 2, 15, 18, 14;
    0 for a switched-off term) from the patches pt (groups * rows, P): pixels along the vector,
    four tile rows per pass (each pass reads and writes its accumulators once for four rows),
    then the rows left over. Column i reads the patch rows of its group, i // cols_per_group."""
    n_rows, nc = w.shape[1], w.shape[0]
    prod[:, :, :npx] = 0.0
    for i in range(nc):
        z, px, ab, sq = prod[0, i], prod[1, i], prod[2, i], prod[3, i]
        g = (i // cols_per_group) * n_rows
        j = 0
        while j < n_rows:
            if j + 4 <= n_rows:
                t0, t1, t2, t3 = pt[g + j], pt[g + j + 1], pt[g + j + 2], pt[g + j + 3]
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
                t0 = pt[g + j]
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


@nb.njit(cache=True, parallel=True)
def _conv_stage(x, geom, cw, s, o):  # pragma: no cover - via tests
    """:func:`conv_stage`, blocks of output pixels in parallel."""
    n_px, nc = o.out.shape
    n_rows = x.shape[3] * geom[0] * geom[1]  # the patch of every group
    per = max(2, (_CONV_ITEM_SIZE // max(nc, 1)) // 2 * 2)
    for item in prange((n_px + per - 1) // per):
        r0 = item * per
        npx = min(n_px, r0 + per) - r0
        pt = np.empty((n_rows, per), dtype=x.dtype)
        prod = np.empty((4, nc, per), dtype=o.out.dtype)
        noise = np.empty((nc, per), dtype=o.out.dtype)
        _gather_patches(r0, r0 + npx, x, geom, pt)
        _conv_products(npx, pt, cw.w, cw.wpx, cw.wabs, cw.wsq, prod, geom[10])
        if s.noisy:
            _normals_by_column(s.key, r0, npx, nc, noise)
        else:
            noise[:, :npx] = 0.0
        for i in range(nc):  # pre-ADC values column by column, pixels along the vector
            for p in range(npx):
                noise[i, p] = _pre_adc(prod[0, i, p], prod[1, i, p], prod[2, i, p],
                                       prod[3, i, p], noise[i, p], s)
        for p in range(npx):
            for i in range(nc):
                _adc_out(r0 + p, i, noise[i, p], s, o)


@nb.njit(cache=True)
def _one_channel_products(r0, npx, x, geom, w, wpx, wabs, wsq, prod):  # pragma: no cover
    """prod[k, p, i] for k = W~ x~, (W~ o P) x~, |W~| |x~|, |W~| x~^2 (Eqs. 2, 15, 18, 14; 0 for
    a switched-off term) of output pixels r0 .. r0 + npx - 1 of a grouped convolution whose
    groups each read one input channel (depthwise): column i reads channel i // geom[10]. Taken
    straight from the channels-last image, tap by tap, the columns along the vector; the
    weights are (kernel elements, cols)."""
    _, h_in, w_in, _ = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw, oh_n, ow_n, per_group = (
        geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], geom[8],
        geom[9], geom[10])
    nc = w.shape[1]
    xr = np.empty(nc, dtype=x.dtype)  # the inputs of the columns, one tap
    prod[:, :npx] = 0.0
    for p in range(npx):
        r = r0 + p
        ow = r % ow_n
        t = r // ow_n
        oh = t % oh_n
        b = t // oh_n
        z, px, ab, sq = prod[0, p], prod[1, p], prod[2, p], prod[3, p]
        for ki in range(kh):
            ih = oh * sh - ph + ki * dh
            if ih < 0 or ih >= h_in:
                continue
            for kj in range(kw):
                iw = ow * sw - pw + kj * dw
                if iw < 0 or iw >= w_in:
                    continue
                tap = ki * kw + kj
                xv = x[b, ih, iw]
                if per_group > 1:  # column i's input: channel i // per_group
                    xv = xr
                    for i in range(nc):
                        xv[i] = x[b, ih, iw, i // per_group]
                wt = w[tap]
                for i in range(nc):
                    z[i] += wt[i] * xv[i]
                if wpx is not None:
                    wp, wa = wpx[tap], wabs[tap]
                    for i in range(nc):
                        px[i] += wp[i] * xv[i]
                        ab[i] += wa[i] * abs(xv[i])
                if wsq is not None:
                    ws = wsq[tap]
                    for i in range(nc):
                        sq[i] += ws[i] * (xv[i] * xv[i])


@nb.njit(cache=True, parallel=True)
def _one_channel_stage(x, geom, cw, s, o):  # pragma: no cover - via tests
    """:func:`one_channel_stage`, blocks of output pixels in parallel."""
    n_px, nc = o.out.shape
    per = max(2, (_CONV_ITEM_SIZE // max(nc, 1)) // 2 * 2)
    for item in prange((n_px + per - 1) // per):
        r0 = item * per
        npx = min(n_px, r0 + per) - r0
        prod = np.empty((4, per, nc), dtype=o.out.dtype)
        v = np.empty(per * nc + 1, dtype=o.out.dtype)
        _one_channel_products(r0, npx, x, geom, cw.w, cw.wpx, cw.wabs, cw.wsq, prod)
        if s.noisy:  # standard normals, element e = pixel * cols + col
            _normals(s.key, r0 * nc, npx * nc, v)
        else:
            v[:] = 0.0
        for p in range(npx):  # two branch-free (vectorised) passes per pixel
            r = v[p * nc:(p + 1) * nc]
            for i in range(nc):  # the pre-ADC values, in place of the normals
                r[i] = _pre_adc(prod[0, p, i], prod[1, p, i], prod[2, p, i], prod[3, p, i],
                                r[i], s)
            for i in range(nc):
                _adc_out(r0 + p, i, r[i], s, o)


def one_channel_stage(x, geom, cw: ConvWeights, s: Stage, o: Outputs) -> None:
    """:func:`conv_stage` for a grouped convolution whose groups each read one input channel
    (depthwise, with geom[10] output columns per channel): the products are summed tap by tap
    straight from the channels-last image, along the columns, without gathering patches (a
    patch of every group per pixel, most of it read by no column); the same numbers as
    :func:`conv_stage` up to the order of the sums, the same draws. The weights of ``cw`` are
    transposed: (kernel elements, cols) C order."""
    if geom.shape != (11,):  # the kernel reads every entry unchecked
        raise ValueError(f"one_channel_stage: geom must hold 11 entries, got shape {geom.shape}")
    if x.shape[3] * geom[10] != o.out.shape[1] or cw.w.shape != (geom[0] * geom[1],
                                                                 o.out.shape[1]):
        raise ValueError("one_channel_stage: expected one input channel per group, the weights "
                         f"(kernel elements, cols); got x {x.shape}, w {cw.w.shape}, outputs "
                         f"{o.out.shape}, {geom[10]} columns per group")
    _one_channel_stage(x, geom, cw, s, o)


def conv_stage(x, geom, cw: ConvWeights, s: Stage, o: Outputs) -> None:
    """The whole forward of a convolution tile with few rows, one pass per block of output
    pixels: the patches gathered from the image, the products W~ x~, (W~ o P) x~, |W~| |x~|,
    |W~| x~^2, then the output stage of :func:`output_stage` on them (Eqs. 1, 2, 5, 14-16).

    x : (batch, height, width, channels) C order, normalised inputs x~ (units of ``s.unit``)
    geom : intp (11,), kernel height and width, strides, paddings, dilations, output height and
        width, and the output columns per group (a grouped convolution's tiles read at once:
        column i reads the channels of group i // geom[10], in C / groups equal parts)
    o.out : (batch * out_h * out_w, cols), the output pixels in C order, channels last
    The draws are those of :func:`output_stage` (element index pixel * cols + col): the same key
    gives the numbers of the output stage applied to the products computed as convolutions.
    """
    if geom.shape != (11,):  # the kernel reads every entry unchecked
        raise ValueError(f"conv_stage: geom must hold 11 entries, got shape {geom.shape}")
    _conv_stage(x, geom, cw, s, o)


@nb.njit(cache=True, inline="always")
def _dac_level(v, f, lim):  # pragma: no cover - via tests
    """The DAC level of input v (Eq. 5): rint(v f) clipped to [-lim, lim], f = s_in / a (NaN
    stays NaN); branch-free, so that the loops over it vectorise."""
    q = np.rint(v * f)
    q = lim if q > lim else q
    return -lim if q < -lim else q


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
            dst[i] = _dac_level(row[i], s, lim)


# Rows split over both cores: each core then holds the levels its GEMM threads read next (a
# single-threaded DAC made the following GEMM slower than it saved).
dac_levels_serial, dac_levels_parallel = serial_and_parallel(_dac_levels, _DAC_SIG)


def dac_levels(x, *args):
    """Dispatch to the serial or the parallel DAC kernel by size (same numbers from both)."""
    out = args[-1]
    kernel = dac_levels_parallel if out.size >= PARALLEL_MIN_SIZE else dac_levels_serial
    kernel(x, *args)


def _dac_image(x, ch_inv, s_in, limit, out):  # pragma: no cover - via tests
    """DAC of Eq. 5 for a batch of images, in integer levels, one pass:
    out[b, h, w, c] = clip(rint(x[b, h, w, c] s_in / a_c), -limit, limit).

    x : (batch, H, W, C) inputs, any strides (an NCHW tensor seen channels last, or a
    channels-last one); ch_inv : (C,), 1 / a per channel (the input range of its tile);
    out : (batch, H, W, C) C order. NaN stays NaN (as in torch)."""
    b_n, h_n, w_n, c_n = out.shape
    sf = x.dtype.type(s_in)
    lim = x.dtype.type(limit)
    for bh in prange(b_n * h_n):
        src = x[bh // h_n, bh % h_n]  # (W, C)
        dst = out[bh // h_n, bh % h_n]
        if c_n == 1 or src.strides[1] == src.itemsize:  # channels contiguous
            for w in range(w_n):
                for c in range(c_n):
                    dst[w, c] = _dac_level(src[w, c], sf * ch_inv[c], lim)
        else:  # NCHW: each channel's row contiguous, written with the channels' stride
            for c in range(c_n):
                f = sf * ch_inv[c]
                for w in range(w_n):
                    dst[w, c] = _dac_level(src[w, c], f, lim)


dac_image_serial, dac_image_parallel = serial_and_parallel(_dac_image)


def dac_image(x, ch_inv, s_in, limit, out):
    """Dispatch to the serial or the parallel image DAC by size (same numbers from both)."""
    kernel = dac_image_parallel if out.size >= PARALLEL_MIN_SIZE else dac_image_serial
    kernel(x, ch_inv, s_in, limit, out)


#: Rows per partial sum of the stage's backward (fixed: the same sums on any thread count).
_BWD_ROWS = 256


def _stage_backward(grad, q, q_scale, mask, factor, grad_z, partial,
                    partial_b):  # pragma: no cover - via tests
    """Backward of the training output stage, one pass (docs/model.md sec. 8, straight-through ADC).

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


_stage_backward_serial, _stage_backward_parallel = serial_and_parallel(_stage_backward)


def stage_backward(grad, q, q_scale, mask, factor, grad_z, partial, partial_b=None):
    """:func:`_stage_backward`, in parallel for large calls (the same sums either way: the
    blocks are fixed)."""
    kernel = _stage_backward_parallel if grad.size >= PARALLEL_MIN_SIZE else \
        _stage_backward_serial
    kernel(grad, q, q_scale, mask, factor, grad_z, partial, partial_b)
