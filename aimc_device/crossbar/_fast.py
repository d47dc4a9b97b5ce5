"""The fast CPU backend of the analog MVM: products in torch (BLAS, oneDNN), the rest in Numba.

Serves :mod:`aimc_device.crossbar.mvm` where its dispatch rule allows (CPU, float32/float64, the
elements of the standard model). Per tile: the DAC (Eq. 5), the signal W~ x~ (Eq. 2) and the
auxiliary products (W~ o P) x~, |W~| |x~|, |W~| x~^2 (Eqs. 14-18) as GEMMs or convolutions,
then one Numba pass for the rest (:func:`_kernels.output_stage`). Without gradient
(:func:`linear_eval`, :func:`conv_eval`) the DAC runs in integer levels in one Numba pass.
Training: the same forward, with the straight-through backward of the ADC (docs/model.md sec.
8) in :class:`_StageSTE` and :class:`ConvTileSTE`; only the signal carries a gradient.
Private; the tests compare it with the torch reference.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-19.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _kernels as _K
from .periphery import quantize, quantizer_levels, straight_through_mask, weight_form

_F = torch.nn.functional.linear
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def stage_keys(gen, n: int) -> list:
    """The keys of n tiles' draws, taken from the generator (one draw of it, one key per tile:
    the same keys as n draws of one)."""
    return [np.uint64(k) for k in torch.randint(0, 2 ** 62, (n,), generator=gen).tolist()]


def stage_key(gen) -> np.uint64:
    """The key of one tile's draws (:func:`stage_keys`)."""
    return stage_keys(gen, 1)[0]


def _np(t: torch.Tensor | None):
    return None if t is None else t.numpy()


# ---------------------------------------------------------------------------- dense tiles
_NO_OFFSETS = np.zeros(6, dtype=np.intp)  # Products.at of terms that each start at (0, 0)


def _aux_products(xd, w, cfg, options, z):
    """The kernel's :class:`_K.Products` of one tile from its DAC outputs xd (no gradient) and
    its signal z = W~ xd (rows, out): (W~ o P) xd and [|xd|; xd^2] against |W~| (Eqs. 14-18),
    in bfloat16 under ``options.aux_bfloat16`` (float32 only), read back in z's precision."""
    if not (cfg.has_ir_drop or cfg.has_short_term_noise):
        return _K.Products(z=z.numpy(), w_px=None, abs_x=None, x2=None, at=_NO_OFFSETS)
    dt = z.dtype
    adt = torch.bfloat16 if options.bfloat16_products and dt == torch.float32 else dt
    b = xd.shape[0]
    w_px = ss = None
    at = _NO_OFFSETS
    with torch.no_grad():
        if cfg.has_ir_drop:  # IR-drop shape (Eq. 15)
            w_px = _F(xd.to(adt), weight_form(w, "px", adt)).to(dt)
        parts = ([xd.abs()] if cfg.has_ir_drop else []) + ([xd * xd] if cfg.has_short_term_noise
                                                            else [])
        if parts:  # one GEMM: [|x~|; x~^2] against |W~| (Eqs. 14, 18)
            stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
            ss = _F(stacked.to(adt), weight_form(w, "abs", adt)).to(dt).numpy()
            at = np.zeros(6, dtype=np.intp)
            at[4] = (len(parts) - 1) * b  # x2's first row
    return _K.Products(z=z.numpy(), w_px=_np(w_px), abs_x=ss if cfg.has_ir_drop else None,
                       x2=ss if cfg.has_short_term_noise else None, at=at)


def linear_tile(x, start, w, cfg, alpha_k, scale_k, key, options):
    """alpha out_scale Q_out(F(Q_in(x_k / alpha))) of one tile (Eq. 1) on the fast backend
    with a gradient to take, x_k = x[:, start:start + w.shape[1]]: the tile's output (rows,
    out), with the straight-through backward of :class:`_StageSTE`."""
    n = w.shape[1]
    xt = quantize(x[:, start:start + n] / alpha_k, cfg.inp_bits, cfg.inp_bound)  # DAC (STE)
    z = _F(xt, w)  # Eq. 2, signal (the only term with a gradient)
    return _StageSTE.apply(z, alpha_k * scale_k, xt.detach(), w.detach(), cfg, options, n, key)


class _EvalPlan:
    """What a call without gradient of a tiled layer reads from its operands, prepared once per
    operands: per tile its weights, first input, DAC constants, digital factors (row_f = alpha,
    col_f = out_scale) and the kernel's :class:`_K.Stage` record. Valid while the weights,
    ``alpha`` and ``out_scale`` are the same tensors, unchanged in place (their version
    counters), and the configuration, options and dtype are the same."""

    def __init__(self, w_tiles, cfg, alpha, out_scale, options, dtype):
        self.sources = (tuple(w_tiles), alpha, out_scale)
        self.versions = self._versions(w_tiles, alpha, out_scale)
        self.setting = (cfg, options, dtype)
        a = alpha.detach().reshape(-1).to(dtype)
        scale = out_scale.detach().to(dtype)
        self.tiles = []
        start = 0
        for k, w in enumerate(w_tiles):
            n = w.shape[1]
            alpha_k = float(a[k])
            if cfg.inp_bits:  # the DAC in integer levels (Eq. 5)
                s_in, limit = quantizer_levels(cfg.inp_bits, cfg.inp_bound)
                dac = (np.array((1.0 / alpha_k,), dtype=_NP_DTYPE[dtype]), s_in, limit)
                unit = 1.0 / s_in
            else:
                dac, unit = None, 1.0
            stage = _K.stage(cfg, n, _NP_DTYPE[dtype], 0, unit=unit, row_f=alpha_k,
                             accumulate=k > 0)
            self.tiles.append((w.detach(), start, n, alpha_k, dac, stage,
                               scale[k].contiguous().numpy()))
            start += n
        self.n_out = w_tiles[0].shape[0]

    @staticmethod
    def _versions(w_tiles, alpha, out_scale):
        return tuple(w._version for w in w_tiles) + (alpha._version, out_scale._version)

    def fits(self, w_tiles, cfg, alpha, out_scale, options, dtype) -> bool:
        tiles, a, s = self.sources
        return (a is alpha and s is out_scale and len(tiles) == len(w_tiles)
                and all(p is q for p, q in zip(tiles, w_tiles))
                and self.versions == self._versions(w_tiles, alpha, out_scale)
                and self.setting == (cfg, options, dtype))


#: Bytes of a tile's products per block of rows in a call without gradient: a call with more
#: rows runs in blocks of rows, so that its work buffers (DAC levels, products) stay below the
#: allocator's threshold for mapping a block of its own (32 MiB at most in glibc) and are reused
#: from block to block, not mapped and page-faulted afresh on every call.
EVAL_BLOCK_BYTES = 8 << 20


def _row_block(rows: int, cols: int, itemsize: int) -> int:
    """Rows per block of a call of ``rows`` x ``cols`` outputs (all of them, or an even number:
    the output stage's draws are keyed by pairs of elements)."""
    if rows * cols * itemsize <= EVAL_BLOCK_BYTES:
        return rows
    return max(2, EVAL_BLOCK_BYTES // (cols * itemsize) // 2 * 2)


def linear_eval(x, w_tiles, cfg, alpha, out_scale, generator, options):
    """The analog MVM of a tiled layer (Eq. 1, every tile) on the fast backend, without
    gradient: x (rows, in) C-ordered, in the weights' dtype; returns (rows, out).

    Per tile: the DAC in integer levels (one Numba pass), the signal and the auxiliary products
    (:func:`_aux_products`), then the output stage, which adds the tile's output to the sum;
    a call of many rows in blocks of rows (:data:`EVAL_BLOCK_BYTES`), with the same numbers.
    ``alpha`` and ``out_scale`` are the caller's tensors: the constants derived from them are
    kept with the first tile's weights (:class:`_EvalPlan`) while they stay the same.
    """
    w0 = w_tiles[0]
    plan = getattr(w0, "_aimc_eval", None)
    if plan is None or not plan.fits(w_tiles, cfg, alpha, out_scale, options, x.dtype):
        plan = _EvalPlan(w_tiles, cfg, alpha, out_scale, options, x.dtype)
        try:
            w0._aimc_eval = plan
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor subclasses
            pass
    x = x.detach()
    rows = x.shape[0]
    out = torch.empty((rows, plan.n_out), dtype=x.dtype)
    keys = stage_keys(generator, len(plan.tiles))  # one per tile and call
    step = _row_block(rows, plan.n_out, x.element_size())
    for r0 in range(0, rows, step):
        xb = x[r0:r0 + step]
        xn = xb.numpy()
        outputs = _K.Outputs(out[r0:r0 + step].numpy(), None, None, None, None)
        for (w, start, n, alpha_k, dac, stage, col_f), key in zip(plan.tiles, keys):
            lev = torch.empty((xb.shape[0], n), dtype=x.dtype)
            if dac is not None:
                _K.dac_levels(xn, start, dac[0], dac[1], dac[2], lev.numpy())
            else:  # no quantiser: the DAC's bound alone
                torch.div(xb[:, start:start + n], alpha_k, out=lev)
                if math.isfinite(cfg.inp_bound):
                    lev.clamp_(-cfg.inp_bound, cfg.inp_bound)
            z = _F(lev, w)  # Eq. 2, signal, in DAC levels
            _K.output_stage(_aux_products(lev, w, cfg, options, z),
                            stage._replace(key=key, row0=r0), outputs._replace(col_f=col_f))
    return out


# ---------------------------------------------------------------------------- training stage
class _StageBuffers:
    """Outputs of a training output stage of shape (rows, cols): the result, the ADC levels or
    values its backward needs, the straight-through mask, and the digital factor as the kernel
    takes it (``row_f``, a scalar, and ``outputs.col_f``)."""

    def __init__(self, shape, dtype, factor, cfg, bias=None):
        dt = _NP_DTYPE[dtype]
        f = factor.detach().reshape(-1).to(dtype).contiguous().numpy()
        clips = math.isfinite(cfg.out_bound)  # the ADC's bound, with or without its bits
        self.bias = bias
        self.mask = torch.empty(shape, dtype=torch.bool) if clips else None
        self.s_out = quantizer_levels(cfg.out_bits, cfg.out_bound)[0]  # ADC (Eq. 5)
        # The backward needs Q_out before the digital factor: as int8 ADC levels when they fit
        # (a quarter of the memory, and the factor and bias applied in the same pass), else as
        # values.
        self.int_levels = bool(cfg.out_bits) and cfg.out_bits <= 8
        self.out = torch.empty(shape, dtype=dtype)
        self.q = torch.empty(shape, dtype=torch.int8) if self.int_levels else self.out
        self.row_f, col_f, b = 1.0, np.ones(shape[1], dt), None
        if self.int_levels:
            if f.size == 1:
                self.row_f = float(f[0])
            else:
                col_f = f
            if bias is not None:
                b = bias.detach().to(dtype).contiguous().numpy()
        self.outputs = _K.Outputs(self.out.numpy(), col_f, b, _np(self.mask),
                                  self.q.numpy() if self.int_levels else None)

    def finish(self, ctx, factor, *saved):
        """Save what the backward needs; the result with the digital factor applied."""
        ctx.q_scale = 1.0 / self.s_out if self.int_levels else 1.0
        ctx.save_for_backward(self.q, factor, self.mask, *saved)
        if self.int_levels:
            return self.out
        y = self.out * factor
        return y if self.bias is None else y.add_(self.bias.detach())


def _stage_grads(ctx, grad, q, factor, mask, need_f, need_b=False):
    """Backward of a training output stage (straight-through ADC): the gradients of its
    pre-ADC signal (rows, cols), of the digital factor and of the bias (None when not
    needed)."""
    grad = grad.contiguous()
    grad_z = torch.empty_like(grad)
    n_blocks = -(-grad.shape[0] // _K._BWD_ROWS)
    partial = np.empty((n_blocks, grad.shape[1]))
    partial_b = np.empty((n_blocks, grad.shape[1])) if need_b else None
    f = factor.detach().reshape(-1).to(grad.dtype).contiguous()
    _K.stage_backward(grad.numpy(), q.numpy(), ctx.q_scale, _np(mask), f.numpy(),
                      grad_z.numpy(), partial, partial_b)
    grad_f = grad_b = None
    if need_f:
        grad_f = torch.from_numpy(partial.sum(axis=0)).to(factor.dtype)
        if factor.dim() == 0:
            grad_f = grad_f.sum()
    if need_b:
        grad_b = torch.from_numpy(partial_b.sum(axis=0)).to(grad.dtype)
    return grad_z, grad_f, grad_b


class _StageSTE(torch.autograd.Function):
    """factor * Q_out(z + dy_IR + noise) in one Numba pass (Eqs. 1, 2, 5, 14-16), with the
    straight-through backward of :func:`periphery.quantize`: identity inside the ADC bound, 0
    outside; the noise and IR-drop terms carry no gradient (docs/model.md sec. 8).

    ``z`` (rows, out) = W~ x~ has the gradient; ``factor`` is the digital scale, (out,) or
    scalar; ``xt``, ``w`` the tile's DAC outputs and weights for the auxiliary products.
    """

    @staticmethod
    def forward(ctx, z, factor, xt, w, cfg, options, n_rows, key):
        zd = z.detach().contiguous()
        st = _StageBuffers(zd.shape, zd.dtype, factor, cfg)
        products = _aux_products(xt, w, cfg, options, zd)
        _K.output_stage(products, _K.stage(cfg, n_rows, products.z.dtype, key, row_f=st.row_f),
                        st.outputs)
        return st.finish(ctx, factor)

    @staticmethod
    def backward(ctx, grad):
        q, factor, mask = ctx.saved_tensors
        grad_z, grad_f, _ = _stage_grads(ctx, grad, q, factor, mask, ctx.needs_input_grad[1])
        return grad_z, grad_f, None, None, None, None, None, None


# ---------------------------------------------------------------------------- convolutions
def one_channel_last(x: torch.Tensor) -> torch.Tensor:
    """A contiguous one-channel image batch marked channels-last (a stride-only view): oneDNN
    otherwise takes the NCHW path, 5-10x slower forward and backward, and the output needs a
    copy. Elementwise ops on such a tensor may return NCHW strides again, so each product
    applies it to its own input."""
    if x.dim() != 4 or x.shape[1] != 1 or not x.is_contiguous():
        return x
    _, _, h, w = x.shape
    return x.as_strided(x.shape, (h * w, 1, w, 1))


def _conv_tile_products(x4, w, conv4, cfg, options, groups=1):
    """The four products of a convolution tile (Eqs. 2, 14, 15, 18) as convolutions, as the
    kernel's :class:`_K.Products`: W~ x~ (the signal), (W~ o P) x~, |W~| |x~|, |W~| x~^2.

    x4 : (batch, C, H, W) channels-last inputs x~; w : (out, C / groups * kh * kw) weights W~;
    conv4 : 2-d (kernel_size, stride, padding, dilation, spatial); groups : the tiles of a
    grouped convolution read at once (:func:`~aimc_device.crossbar.analog_conv`). The signal
    runs alone in the working precision; one convolution takes x~ against W~ o P, and also
    |W~| when x~ >= 0 (inputs after a ReLU, where |x~| = x~; ungrouped only, as the two weight
    sets stack along the outputs); another takes |W~| against [|x~|; x~^2] stacked along the
    batch (not as the groups of one convolution: oneDNN's grouped kernels ran 3x slower in half
    the calls here); both in bfloat16 under ``options.aux_bfloat16`` (float32 only).
    """
    ks, st, pd, dl, _ = conv4
    n_out = w.shape[0]
    shape = (n_out, x4.shape[1] // groups, *ks)
    conv2d = functools.partial(torch.nn.functional.conv2d, groups=groups)
    has_ir, has_st = cfg.has_ir_drop, cfg.has_short_term_noise
    # inputs after a ReLU: |x~| = x~, one input for three products
    nonneg = has_ir and groups == 1 and bool(x4.min() >= 0)
    adt = torch.bfloat16 if options.bfloat16_products and x4.dtype == torch.float32 else x4.dtype

    def rows(y):  # (batch, out, H', W') -> (batch * H' * W', out), free for channels-last
        y = y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return y.reshape(-1, y.shape[3]).to(x4.dtype).numpy()

    z = rows(conv2d(x4, w.reshape(shape), None, st, pd, dl))  # Eq. 2, the signal
    n_rows = z.shape[0]
    xa = x4.to(adt)  # the inputs of the auxiliary products
    at = np.zeros(6, dtype=np.intp)  # (row, column) of w_px, abs_x, x2 in their arrays
    w_px = abs_x = x2 = None
    if has_ir:
        first = [weight_form(w, "px", adt)] + ([weight_form(w, "abs", adt)] if nonneg else [])
        w_px = rows(conv2d(xa, torch.cat(first).reshape(-1, *shape[1:]), None, st, pd, dl))
        if nonneg:
            abs_x, at[3] = w_px, n_out
    second = ([xa.abs()] if has_ir and not nonneg else []) + ([xa * xa] if has_st else [])
    if second:
        x2in = second[0] if len(second) == 1 else torch.cat(second)
        a2 = rows(conv2d(one_channel_last(x2in.contiguous(memory_format=torch.channels_last)),
                         weight_form(w, "abs", adt).reshape(shape), None, st, pd, dl))
        if has_ir and not nonneg:
            abs_x = a2
        if has_st:
            x2, at[4] = a2, (len(second) - 1) * n_rows
    return _K.Products(z=z, w_px=w_px, abs_x=abs_x, x2=x2, at=at)


def _conv_tile_forward(x4, w, conv4, groups, cfg, options, stage, outputs):
    """The products and the output stage of one convolution tile into ``outputs``: x4 (batch,
    C, H, W) channels-last, the DAC's outputs in the units of ``stage.unit``; w (out, C / groups
    * kernel elements) contiguous; conv4 the 2-d geometry (kernel_size, stride, padding,
    dilation, spatial). Tiles of few rows run whole in Numba, from the image itself
    (:func:`_K.one_channel_stage` when each group reads one input channel, else
    :func:`_K.conv_stage`), larger ones through oneDNN's convolutions
    (:func:`_conv_tile_products`) and :func:`_K.output_stage`."""
    n_out, n_rows = w.shape
    if n_rows > _K.CONV_STAGE_MAX_ROWS:
        _K.output_stage(_conv_tile_products(x4, w, conv4, cfg, options, groups), stage, outputs)
        return
    has_ir, has_st = cfg.has_ir_drop, cfg.has_short_term_noise
    wabs = weight_form(w, "abs").numpy()
    cw = _K.ConvWeights(w.numpy(), weight_form(w, "px").numpy() if has_ir else None,
                        wabs if has_ir else None, wabs if has_st else None)
    geom = np.array([v for part in conv4 for v in part] + [n_out // groups], dtype=np.intp)
    image = x4.permute(0, 2, 3, 1).numpy()
    if groups > 1 and x4.shape[1] == groups:  # one input channel per group (depthwise)
        cw = _K.ConvWeights(*(None if a is None else np.ascontiguousarray(a.T) for a in cw))
        _K.one_channel_stage(image, geom, cw, stage, outputs)
    else:
        _K.conv_stage(image, geom, cw, stage, outputs)


def conv_eval(x, alpha, w, factor, cfg, options, conv, key, out=None):
    """One convolution tile on the fast backend without gradient: the forward of
    :class:`ConvTileSTE`, with the DAC in integer levels (Eq. 5) in one Numba pass that also
    lays the image out channels last (:func:`_K.dac_image`).

    x (batch, C, *spatial) in w's dtype; alpha: the tile's input range, a scalar or per input
    channel (1, C, 1[, 1]); factor (out,): the digital factor of each column; conv: as for
    :class:`ConvTileSTE`. Returns the output pixels as rows (batch * prod(spatial_out), out),
    channels last; with ``out`` (such rows) given, the tile's output is added to it.
    """
    kernel_size, stride, padding, dilation, spatial, groups = conv
    x = x.detach()
    # a programmed layer's own weights where possible: their |W~| and W~ o P stay cached on them
    wd = w if not w.requires_grad and w.is_contiguous() else w.detach().contiguous()
    dtype = wd.dtype
    n_out, n_rows = wd.shape
    if max(kernel_size) == 1 and not any(padding) and max(stride) > 1:
        # a 1x1 kernel without padding reads every stride-th input only: those alone are read
        x = x[(..., *(slice(None, None, st) for st in stride))]
        stride = (1,) * len(stride)
    if cfg.inp_bits:
        s_in, limit = quantizer_levels(cfg.inp_bits, cfg.inp_bound)
        x4 = x.unsqueeze(2) if x.dim() == 3 else x
        b, c, h, wid = x4.shape
        lev = torch.empty((b, h, wid, c), dtype=dtype)
        inv = (1.0 / alpha.detach().reshape(-1).to(dtype)).expand(c).contiguous()
        _K.dac_image(x4.permute(0, 2, 3, 1).numpy(), inv.numpy(), s_in, limit, lev.numpy())
        x4, unit = one_channel_last(lev.permute(0, 3, 1, 2)), 1.0 / s_in
    else:  # no quantiser: the DAC's bound alone
        x4 = quantize(x / alpha.detach(), None, cfg.inp_bound)
        x4 = x4.unsqueeze(2) if x4.dim() == 3 else x4
        x4, unit = one_channel_last(x4.contiguous(memory_format=torch.channels_last)), 1.0
    conv4 = (kernel_size, stride, padding, dilation, spatial) if x.dim() == 4 else (
        (1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation), (1, *spatial))
    accumulate = out is not None
    if not accumulate:
        out = torch.empty((x4.shape[0] * math.prod(conv4[4]), n_out), dtype=dtype)
    col_f = factor.detach().reshape(-1).to(dtype).expand(n_out).contiguous().numpy()
    stage = _K.stage(cfg, n_rows, _NP_DTYPE[dtype], key, unit=unit, accumulate=accumulate)
    _conv_tile_forward(x4, wd, conv4, groups, cfg, options, stage,
                       _K.Outputs(out.numpy(), col_f, None, None, None))
    return out


class ConvTileSTE(torch.autograd.Function):
    """One convolution tile on CPU, training or evaluation: factor * Q_out(W~ * x~ + dy_IR +
    noise) (Eqs. 1, 2, 5, 14-16), with the gradients of :class:`_StageSTE` (straight-through
    ADC) and then those of the convolution W~ * x~ and of the DAC to ``x``, ``alpha`` and ``w``.

    The products come from the image itself inside Numba for tiles of few rows (at most
    ``_K.CONV_STAGE_MAX_ROWS``: there the work scales with the outputs, and the products are
    cheaper computed than read back from memory), else from oneDNN convolutions
    (:func:`_conv_tile_products`) read in place by :func:`_K.output_stage`; see
    :func:`_conv_tile_forward`. Without a gradient to take, :func:`conv_eval` runs instead.

    ``x`` is the tile's input (batch, C, H, W) (or (batch, C, L)) and ``alpha`` its input range
    (a scalar, or per channel (1, C, 1, 1) for the tiles of a grouped convolution): the DAC
    x~ = Q_in(x / alpha) (Eq. 5, straight-through inside its bound) runs here, so that when x
    needs no gradient (a network's first layer) alpha's gradient through the DAC comes from one
    weight-gradient call instead of the input gradient. ``w`` (out, C / groups * kernel
    elements); ``bias`` (out,) or None, added after the digital factor; ``conv``: kernel_size,
    stride, padding, dilation, output size and groups. Returns the output pixels as rows
    (batch * out_h * out_w, out), channels last.
    """

    @staticmethod
    def forward(ctx, x, alpha, w, factor, bias, cfg, options, conv, key):
        kernel_size, stride, padding, dilation, spatial, groups = conv
        with torch.no_grad():
            xs = x.detach() / alpha.detach()
            xt = quantize(xs, cfg.inp_bits, cfg.inp_bound)  # DAC, Eq. 5
        if xt.dim() == 3:  # 1-d: a 2-d convolution of height 1
            x4, conv4 = xt.detach().unsqueeze(2), (
                (1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation), (1, *spatial))
        else:
            x4, conv4 = xt.detach(), conv[:5]
        x4 = one_channel_last(x4.contiguous(memory_format=torch.channels_last))
        wd = w.detach().contiguous()
        n_out, n_rows = wd.shape
        stb = _StageBuffers((x4.shape[0] * int(np.prod(conv4[4])), n_out), wd.dtype, factor, cfg,
                            bias)
        stage = _K.stage(cfg, n_rows, _NP_DTYPE[wd.dtype], key, row_f=stb.row_f)
        _conv_tile_forward(x4, wd, conv4, groups, cfg, options, stage, stb.outputs)
        ctx.conv = conv
        ctx.dac_bound = cfg.inp_bound if math.isfinite(cfg.inp_bound) else None
        return stb.finish(ctx, factor, xt, xs, alpha, w)

    @staticmethod
    def backward(ctx, grad):
        q, factor, mask, xt, xs, alpha, w = ctx.saved_tensors
        grad_z, grad_f, grad_b = _stage_grads(ctx, grad, q, factor, mask,
                                              ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        kernel_size, stride, padding, dilation, spatial, groups = ctx.conv
        need_x, need_a, need_w = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_w = None
        nones = (None, None, None, None)
        if not (need_x or need_a or need_w):
            return None, None, None, grad_f, grad_b, *nones
        n_out, n_ch = w.shape[0], xt.shape[1] // groups  # channels per group
        # rows (batch * spatial, out) -> (batch, out, *spatial) in channels-last memory
        g = grad_z.reshape(xt.shape[0], *spatial, n_out).movedim(-1, 1)
        # the DAC's straight-through rule (periphery.quantize): identity inside its bound
        inside = None if ctx.dac_bound is None else straight_through_mask(xs, ctx.dac_bound)
        v = xs if inside is None else xs * inside
        conv_args = (list(stride), list(padding), list(dilation), False, [0] * len(stride),
                     groups)
        w4 = w.reshape(n_out, n_ch, *kernel_size)
        if need_x:  # the full input gradient: x~ = Q(x / alpha)
            grad_xt, grad_w, _ = torch.ops.aten.convolution_backward(
                g, one_channel_last(xt), w4, None, *conv_args, [True, need_w, False])
            grad_x = (grad_xt if inside is None else grad_xt * inside) / alpha
            if need_a:  # d x~ / d alpha = -(x / alpha^2) inside the bound
                grad_a = -(grad_xt * v).sum_to_size(alpha.shape) / alpha
        else:
            # Only alpha needs the DAC's gradient: sum(grad_x~ * v) = <W~, dL/dW~ with input v>
            # (the adjoint of the convolution), one weight-gradient call on [x~, v] stacked as
            # channels of each group instead of the (for one channel, 7x dearer) input gradient.
            inp = torch.cat([xt.unflatten(1, (groups, n_ch)), v.unflatten(1, (groups, n_ch))],
                            2).flatten(1, 2) if need_a else xt
            inp = inp.contiguous(memory_format=torch.channels_last) if inp.dim() == 4 else inp
            w_in = torch.cat([w4, w4], 1) if need_a else w4
            _, gw, _ = torch.ops.aten.convolution_backward(
                g, one_channel_last(inp), w_in, None, *conv_args, [False, True, False])
            grad_w = gw[:, :n_ch] if need_w else None
            if need_a:  # per input channel: its group's output rows and the kernel
                per = (gw[:, n_ch:] * w4).flatten(2).sum(2).unflatten(0, (groups, -1)).sum(1)
                grad_a = -(per.sum() if alpha.dim() == 0 else per.reshape(alpha.shape)) / alpha
        grad_w = None if grad_w is None or not need_w else grad_w.reshape(w.shape)
        return grad_x, grad_a, grad_w, grad_f, grad_b, *nones
