"""The analog matrix-vector product of a tiled layer (MODEL.md sections 2, 3, 6; Eqs. 1-2, 5, 14-19).

:func:`analog_mvm` is the functional core shared by :class:`~aimc_device.crossbar.AnalogArray`
and the torch adapter (:mod:`aimc_device.nn`). Per tile it computes

    y_k = alpha_k * out_scale_k * Q_out( sigma_out xi + f_NL( dy_IR + sum_j (w~_ij + n_ij) x~_j ) ),
    x~ = Q_in(x_k / alpha_k),

and adds the tiles in digital. The cost is a few stacked GEMMs (DESIGN.md, "Speed by design"):
[x~; x~ o P] against W~ (signal and IR-drop shape), [|x~|; x~^2] against |W~| (IR-drop activity
and short-term noise variance); the rest is one fused elementwise pass (a Numba kernel on CPU,
torch ops elsewhere).

Gradients (hardware-aware training, MODEL.md sec. 8): the backward pass is plain floating point
through the (perturbed) weights, with straight-through quantisers; the noise, IR-drop and
asymmetry terms are added as constants (no gradient through them).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-19.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _kernels as _K
from .config import CrossbarConfig
from .mapping import split_sizes
from .periphery import (
    asymmetry_delta,
    ir_drop_delta,
    ir_drop_profile,
    quantize,
    quantizer_levels,
    s_adc,
    s_adc_gain,
    short_term_noise_std,
    straight_through_mask,
)

__all__ = ["analog_mvm", "analog_conv", "conv_channel_split"]

_F = torch.nn.functional.linear


_WEIGHT_FORMS = {
    "abs": lambda w: w.abs(),
    "px": lambda w: w * ir_drop_profile(w.shape[1], w.dtype, w.device),
    "bf16": lambda w: w.to(torch.bfloat16),
    "abs_bf16": lambda w: w.abs().to(torch.bfloat16),
}


def _weight_form(w: torch.Tensor, kind: str) -> torch.Tensor:
    """|W~| or a bfloat16 copy, cached on the tensor and invalidated by any in-place change."""
    if w.requires_grad:
        return _WEIGHT_FORMS[kind](w.detach())
    cache = getattr(w, "_aimc_forms", None)
    if cache is None or cache[0] != w._version:
        cache = (w._version, {})
        try:
            w._aimc_forms = cache
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor subclasses
            pass
    form = cache[1].get(kind)
    if form is None:
        form = cache[1][kind] = _WEIGHT_FORMS[kind](w)
    return form


def _abs_cached(w: torch.Tensor) -> torch.Tensor:
    return _weight_form(w, "abs")


def _as_tensor(v, like: torch.Tensor, name: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return t.to(dtype=like.dtype, device=like.device)


def _check(x, w_tiles, alpha, out_scale):
    if not isinstance(w_tiles, (list, tuple)) or not w_tiles:
        raise ValueError("w_tiles: expected a non-empty list of (out, in_k) weight tensors")
    n_out = w_tiles[0].shape[0]
    for k, w in enumerate(w_tiles):
        if w.dim() != 2 or w.shape[0] != n_out:
            raise ValueError(f"w_tiles[{k}]: shape {tuple(w.shape)}; every tile must be "
                             f"(out={n_out}, in_k)")
    n_in = sum(w.shape[1] for w in w_tiles)
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(f"x: shape {tuple(x.shape)}; expected (batch, {n_in}) for these tiles")
    n_t = len(w_tiles)
    if alpha.shape != (n_t,):
        raise ValueError(f"alpha: shape {tuple(alpha.shape)}; expected ({n_t},), one input range "
                         "per tile")
    if out_scale.shape != (n_t, n_out):
        raise ValueError(f"out_scale: shape {tuple(out_scale.shape)}; expected ({n_t}, {n_out}), "
                         "one factor per tile and output")


def analog_mvm(x: torch.Tensor, w_tiles, cfg: CrossbarConfig, alpha, out_scale, *,
               generator=None, asymmetry=None, zeta=None, fused: bool | None = None
               ) -> torch.Tensor:
    """Analog MVM of a tiled layer with its periphery (Eqs. 1, 2, 5, 14-19).

    Parameters
    ----------
    x : torch.Tensor (batch, in) or (in,), real inputs (unit of the layer's input)
    w_tiles : list of torch.Tensor (out, in_k), normalised signed weights w~ (already programmed,
        drifted or perturbed by the caller), dimensionless, nominally in [-1, 1]
    cfg : CrossbarConfig
    alpha : torch.Tensor (n_tiles,), input range per tile (unit of x)
    out_scale : torch.Tensor (n_tiles, out), digital factor per tile and column (gamma x any
        learned scale x drift-compensation factor; unit of y / unit of x)
    generator : torch.Generator or None
        Source of the per-MVM draws (short-term and output noise).
    asymmetry : list of torch.Tensor (out, in_k) or None
        Read-polarity asymmetry a_ij per tile (drawn once, see :func:`periphery.draw_asymmetry`);
        used only when given.
    zeta : torch.Tensor (out,) or list of them, or None
        S-shaped ADC saturation per column (Eq. 19); None: ``cfg.mu_zeta`` for every column.
    fused : bool or None
        Use the fused Numba output stage (CPU, no S-shaped ADC, no asymmetry, no bound
        management; with a gradient also no noise management, the backward being the
        straight-through one of the quantiser). None: whenever it applies. False: the torch
        path, which is the reference the tests compare against. The two draw different
        (equally distributed) noise from the same generator.

    Returns
    -------
    torch.Tensor (batch, out) (or (out,) for a 1-d x), in the unit of the layer's output.

    Raises
    ------
    ValueError
        On shapes that do not fit together, naming the argument.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__} (AnalogArray.mvm "
                        "takes numpy arrays)")
    w0 = w_tiles[0] if isinstance(w_tiles, (list, tuple)) and w_tiles else None
    if w0 is None:
        _check(x, w_tiles, None, None)
    squeeze = x.dim() == 1
    if squeeze:
        x = x[None]
    if x.dtype != w0.dtype:
        x = x.to(w0.dtype)
    alpha = _as_tensor(alpha, w0, "alpha").reshape(-1) if not (
        isinstance(alpha, torch.Tensor) and alpha.dim() == 1) else alpha.to(w0.dtype)
    out_scale = _as_tensor(out_scale, w0, "out_scale")
    _check(x, w_tiles, alpha, out_scale)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or alpha.requires_grad or out_scale.requires_grad
        or any(w.requires_grad for w in w_tiles))
    can_fuse = (not grad and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not cfg.s_adc and asymmetry is None and cfg.bound_management == "none")
    if fused and not can_fuse:
        raise ValueError("fused=True needs CPU tensors, no gradient, s_adc=False, no asymmetry "
                         "and bound_management='none'")
    if can_fuse and fused is not False:
        out = torch.empty((x.shape[0], w0.shape[0]), dtype=x.dtype)
        x = x.detach().contiguous()
        start = 0
        for k, w in enumerate(w_tiles):
            _tile_fused(x, start, w, cfg, alpha[k], out_scale[k], generator, out, k > 0)
            start += w.shape[1]
        return out[0] if squeeze else out
    if grad and fused is not False and len(w_tiles) > 1 and asymmetry is None \
            and cfg.noise_management == "none" and cfg.bound_management == "none" \
            and _fusable_grad(x, cfg, None) and len({w.shape[1] for w in w_tiles}) == 1:
        y = _fused_equal_tiles(x, w_tiles, cfg, alpha, out_scale, generator)
        return y[0] if squeeze else y
    out = None
    start = 0
    for k, w in enumerate(w_tiles):
        n = w.shape[1]
        xk = x[:, start:start + n]
        start += n
        asym = asymmetry[k] if asymmetry is not None else None
        zk = zeta[k] if isinstance(zeta, (list, tuple)) else zeta
        yk = _tile(xk, w, cfg, alpha[k], out_scale[k], generator, asym, zk, grad,
                   fused is not False)
        out = yk if out is None else (out + yk if grad else out.add_(yk))
    return out[0] if squeeze else out


def conv_channel_split(in_channels: int, kernel_numel: int, max_rows: int) -> list[int]:
    """Channels per tile of a convolution: near-equal groups, each with at most ``max_rows`` rows.

    A tile holds whole input channels (``channels x kernel_numel`` rows), so that every tile is
    itself a convolution (see :func:`analog_conv`).
    """
    per_tile = max_rows // kernel_numel
    if per_tile < 1:
        raise ValueError(f"kernel of {kernel_numel} elements does not fit {max_rows} tile rows; "
                         "raise CrossbarConfig.max_rows or keep the layer digital")
    return split_sizes(in_channels, per_tile)


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}


def _one_channel_last(x: torch.Tensor) -> torch.Tensor:
    """A contiguous one-channel image batch marked channels-last (a stride-only view): oneDNN
    otherwise takes the NCHW path, 5-10x slower forward and backward, and the output needs a
    copy. Elementwise ops on such a tensor may return NCHW strides again, so each product
    applies it to its own input."""
    if x.dim() != 4 or x.shape[1] != 1 or not x.is_contiguous():
        return x
    _, _, h, w = x.shape
    return x.as_strided(x.shape, (h * w, 1, w, 1))


class _ChannelsLast(torch.autograd.Function):
    """x in channels-last memory order; the gradient goes back in x's own order (a network of
    NCHW layers otherwise gets channels-last gradients, and its pooling and activation backward
    passes convert them, several times slower)."""

    @staticmethod
    def forward(ctx, x):
        ctx.nchw = x.is_contiguous()
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous() if ctx.nchw else grad


def analog_conv(x: torch.Tensor, w_tiles, cfg: CrossbarConfig, alpha, out_scale, *,
                channel_sizes, kernel_size, stride=1, padding=0, dilation=1, generator=None,
                zeta=None, bias=None) -> torch.Tensor:
    """Analog convolution: the analog MVM of every image patch, computed as convolutions.

    Mathematically the same as :func:`analog_mvm` on the unfolded patches (im2col) with tiles
    of whole input channels, but each term of Eqs. 2, 14-18 (signal, |W~| against |x~| and
    x~^2, (W~ o P) against x~) is one convolution, so that no patch matrix is built and the
    backward pass of hardware-aware training is that of a convolution.

    Parameters
    ----------
    x : torch.Tensor (batch, C, *spatial), real inputs (unit of the layer's input)
    w_tiles : list of torch.Tensor (out, c_k * prod(kernel_size)), normalised weights per tile
    cfg : CrossbarConfig (noise_management "none", bound_management "none")
    alpha : torch.Tensor (n_tiles,), input range per tile
    out_scale : torch.Tensor (n_tiles, out), digital factor per tile and column
    channel_sizes : list of int, input channels per tile (:func:`conv_channel_split`)
    kernel_size, stride, padding, dilation : tuples (one entry per spatial dimension)
    generator : torch.Generator or None, per-MVM draws
    zeta : S-shaped ADC gains, as in :func:`analog_mvm`
    bias : torch.Tensor (out,) or None, the layer's digital bias (added once, in the first
        tile's output stage where it can be)

    Returns
    -------
    torch.Tensor (batch, out, *spatial_out)
    """
    if cfg.noise_management != "none" or cfg.bound_management != "none":
        raise ValueError("analog_conv: noise and bound management act per input vector; use "
                         "analog_mvm on unfolded patches for them")
    dims = x.dim() - 2
    conv = _CONV[dims]
    w0 = w_tiles[0]
    n_out = w0.shape[0]
    if x.dtype != w0.dtype:
        x = x.to(w0.dtype)
    if dims == 2:  # channels-last: each product's (rows, out) layout is then a free view
        x = _ChannelsLast.apply(x) if x.requires_grad else x.contiguous(
            memory_format=torch.channels_last)
        x = _one_channel_last(x)
    alpha = _as_tensor(alpha, w0, "alpha").reshape(-1)
    out_scale = _as_tensor(out_scale, w0, "out_scale")
    if sum(channel_sizes) != x.shape[1] or len(channel_sizes) != len(w_tiles):
        raise ValueError(f"x: {x.shape[1]} channels; the tiles hold {list(channel_sizes)}")
    grad = torch.is_grad_enabled() and (
        x.requires_grad or alpha.requires_grad or out_scale.requires_grad
        or any(w.requires_grad for w in w_tiles))
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s_ + 1 for size, k, s_, p, d in
               zip(x.shape[2:], kernel_size, stride, padding, dilation)]
    out = None
    c0 = 0
    for k, (w, ck) in enumerate(zip(w_tiles, channel_sizes)):
        xk = x[:, c0:c0 + ck]
        c0 += ck
        shape = (n_out, ck, *kernel_size)

        def prod(inp, wt, shape=shape):
            if dims == 2:
                inp = _one_channel_last(inp)
            y = conv(inp, wt.reshape(shape), None, stride, padding, dilation)
            return y.movedim(1, -1).reshape(-1, n_out)

        if _fusable_grad(xk, cfg, None) and dims <= 2:  # one fused tile (Numba stage, STE)
            geometry = (kernel_size, stride, padding, dilation, spatial)
            yk = _ConvTileSTE.apply(xk, alpha[k], w, alpha[k] * out_scale[k],
                                    bias if k == 0 else None, cfg, geometry,
                                    _stage_key(generator))
            if k == 0:
                bias = None  # added
        elif _fusable_grad(xk, cfg, None):  # fused output stage, differentiable (STE)
            yk = _fused_tile(xk / alpha[k], w, cfg, alpha[k] * out_scale[k], generator, prod)
        else:
            zk = zeta[k] if isinstance(zeta, (list, tuple)) else zeta
            z = _analog(xk / alpha[k], w, cfg, generator, None, zk, grad, prod)
            yk = quantize(z, cfg.out_bits, cfg.out_bound) * (alpha[k] * out_scale[k])  # Eq. 1
        out = yk if out is None else (out + yk if grad else out.add_(yk))
    if bias is not None:
        out = out + bias
    return out.reshape(x.shape[0], *spatial, n_out).movedim(-1, 1)


def _tile(xk, w, cfg, alpha_k, scale_k, gen, asym, zeta, grad, fuse=True):
    """One tile: alpha * out_scale * Q_out(analog(Q_in(x / alpha))) (Eq. 1)."""
    if cfg.noise_management == "abs_max":
        a = xk.detach().abs().amax(dim=1, keepdim=True)
        a = torch.where(a > 0, a, torch.ones_like(a))  # (batch, 1)
    else:
        a = alpha_k
    if cfg.bound_management == "iterative" and math.isfinite(cfg.out_bound):
        return _tile_bound_managed(xk, w, cfg, a, scale_k, gen, asym, zeta, grad)
    if fuse and grad and cfg.noise_management == "none" and _fusable_grad(xk, cfg, asym):
        return _fused_tile(xk / a, w, cfg, a * scale_k, gen)  # training forward, fused
    z = _analog(xk / a, w, cfg, gen, asym, zeta, grad)
    return quantize(z, cfg.out_bits, cfg.out_bound) * (a * scale_k)  # Eq. 1, ADC of Eq. 5


_EMPTY = {}


def _empty(dtype):
    e = _EMPTY.get(dtype)
    if e is None:
        e = _EMPTY[dtype] = np.empty((0, 0), dtype=dtype)
    return e


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _tile_fused(x, start, w, cfg, alpha_k, scale_k, gen, out, accumulate):
    """One tile, columns ``start:`` of x (C order), on CPU without gradient: stacked GEMMs and
    the fused Numba stages (DAC, then the output stage)."""
    b, n = x.shape[0], w.shape[1]
    dt = x.dtype
    need_ir = cfg.ir_drop > 0 and cfg.ir_drop_g > 0
    need_st = cfg.w_noise > 0
    xk = x[:, start:start + n]
    if cfg.noise_management == "abs_max":
        a = xk.abs().amax(dim=1)
        a = torch.where(a > 0, a, torch.ones_like(a))  # (batch,)
        row_f = a.numpy()
    else:
        a = float(alpha_k)  # a scalar: no tensor arithmetic on the way
        row_f = np.array((a,), dtype=_NP_DTYPE[dt])
    col_f = scale_k.detach().contiguous().numpy()
    aux16 = cfg.aux_bfloat16 and dt == torch.float32 and (need_ir or need_st)
    buf = torch.empty(((2 if need_ir and not aux16 else 1) * b, n), dtype=dt)
    lev = buf[:b]
    if cfg.inp_bits:  # DAC (Eq. 5) in integer levels; the level size is folded into `unit`
        s_in, in_levels = quantizer_levels(cfg.inp_bits, cfg.inp_bound)
        _K.dac_levels(x.numpy(), start, 1.0 / row_f, s_in, in_levels, lev.numpy())
        unit = 1.0 / s_in
    else:
        torch.div(xk, torch.from_numpy(row_f)[:, None] if row_f.size > 1 else a, out=lev)
        if math.isfinite(cfg.inp_bound):  # no quantiser: the DAC's bound alone (Eq. 5)
            lev.clamp_(-cfg.inp_bound, cfg.inp_bound)
        unit = 1.0
    adt = torch.bfloat16 if aux16 else dt
    w_aux = _weight_form(w, "bf16") if aux16 else w
    wabs = _weight_form(w, "abs_bf16" if aux16 else "abs") if (need_ir or need_st) else None
    if need_ir and not aux16:
        torch.mul(lev, ir_drop_profile(n, dt), out=buf[b:])
        zz = _F(buf, w)  # [W~ x~; W~ (P o x~)] in one GEMM (Eqs. 2, 15)
        w_px = zz[b:]
    else:
        zz = _F(lev, w)  # Eq. 2, signal (always in the working precision)
        if need_ir:  # IR-drop shape, an auxiliary GEMM (Eq. 15)
            w_px = _F((lev * ir_drop_profile(n, dt)).to(adt), w_aux).to(dt)
    empty = _empty(zz.numpy().dtype)
    abs_x = x2 = empty
    if need_ir or need_st:
        m = int(need_ir) + int(need_st)
        buf2 = torch.empty((m * b, n), dtype=adt)
        if need_ir:
            buf2[:b].copy_(lev).abs_()
        if need_st:
            sq = buf2[(m - 1) * b:].copy_(lev)
            sq.mul_(sq)
        ss = _F(buf2, wabs).to(dt).numpy()  # [|x~|; x~^2] against |W~| (Eqs. 14, 18)
        abs_x = ss[:b] if need_ir else empty
        x2 = ss[(m - 1) * b:] if need_st else empty
    zn = zz.numpy()
    s_out, levels = quantizer_levels(cfg.out_bits, cfg.out_bound)  # ADC (Eq. 5)
    key = _stage_key(gen)
    _K.output_stage(zn[:b], w_px.numpy() if need_ir else empty, abs_x, x2, need_ir, need_st, unit,
                    cfg.out_noise, cfg.w_noise, cfg.ir_drop * cfg.ir_drop_g * n, s_out, levels,
                    row_f, col_f, key, bool(accumulate), out.numpy(), bound=cfg.out_bound)


def _tile_bound_managed(xk, w, cfg, a, scale_k, gen, asym, zeta, grad):
    """Iterative bound management: halve the inputs of saturated samples and repeat."""
    b = xk.shape[0]
    a = (a * torch.ones((b, 1), dtype=xk.dtype, device=xk.device)).detach()
    z = _analog(xk / a, w, cfg, gen, asym, zeta, grad)
    for _ in range(cfg.bound_management_iters):
        sat = (z.detach().abs() >= cfg.out_bound).any(dim=1)
        if not bool(sat.any()):
            break
        a = torch.where(sat[:, None], 2.0 * a, a)
        idx = sat.nonzero()[:, 0]
        z_new = _analog(xk[idx] / a[idx], w, cfg, gen, asym, zeta, grad)
        z = z.index_put((idx,), z_new) if grad else z.index_put_((idx,), z_new)
    return quantize(z, cfg.out_bits, cfg.out_bound) * (a * scale_k)


def _aux_terms(xd, w, cfg, prod, w_px=None):
    """The no-gradient products of one tile (Eqs. 14, 15, 18): (W~ o P) x~, |W~| |x~|, |W~| x~^2.

    Returns (w_px, abs_x, x2), each (rows, out) or None when its nonideality is off.
    """
    need_ir = cfg.ir_drop > 0 and cfg.ir_drop_g > 0
    need_st = cfg.w_noise > 0
    abs_x = x2 = None
    with torch.no_grad():
        if need_ir and w_px is None:  # IR-drop shape (W~ o P) x~ (Eq. 15)
            w_px = prod(xd, _weight_form(w, "px"))
        if need_ir or need_st:
            wabs = _abs_cached(w)
            if need_ir and need_st:  # one product: [|x~|; x~^2] against |W~| (Eqs. 14, 18)
                s = prod(torch.cat([xd.abs(), xd * xd]), wabs)
                abs_x, x2 = s.chunk(2)
            elif need_ir:
                abs_x = prod(xd.abs(), wabs)
            else:
                x2 = prod(xd * xd, wabs)
    return (w_px if need_ir else None), abs_x, x2


def _fusable_grad(z: torch.Tensor, cfg: CrossbarConfig, asym) -> bool:
    """Whether the training forward can take the fused Numba output stage."""
    return (z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)
            and not cfg.s_adc and asym is None)


def _aux_blocks(aux, dtype):
    """The auxiliary products as C-ordered numpy arrays and the kernel's block offsets ``at``.

    Column blocks of one C-ordered array are passed as that array with column offsets, without
    copies; anything else as C-ordered arrays of its own.
    """
    ts = [None if t is None else t.to(dtype) for t in aux]
    live = [t for t in ts if t is not None]
    empty = _empty(_NP_DTYPE[dtype])
    at = np.zeros(6, dtype=np.intp)
    if live and all(t.dim() == 2 and t.stride(1) == 1 for t in live) and len(
            {(t.untyped_storage().data_ptr(), t.stride(0), t.shape[0]) for t in live}) == 1:
        first = min(t.storage_offset() for t in live)
        width = live[0].stride(0)
        base = live[0].as_strided((live[0].shape[0], width), (width, 1), first)
        if all(t.storage_offset() - first + t.shape[1] <= width for t in live):
            for k, t in enumerate(ts):
                if t is not None:
                    at[2 * k + 1] = t.storage_offset() - first
            arr = base.numpy()
            return [empty if t is None else arr for t in ts], at
    return [empty if t is None else t.contiguous().numpy() for t in ts], at


class _StageBuffers:
    """Outputs of a training output stage of shape (rows, cols): the result, the ADC levels or
    values its backward needs, the straight-through mask, and the digital factors as the kernel
    takes them (``row_f``, ``col_f``)."""

    def __init__(self, shape, dtype, factor, cfg, bias=None):
        dt = _NP_DTYPE[dtype]
        self.bias = bias
        f = factor.detach().reshape(-1).to(dtype).contiguous().numpy()
        clips = math.isfinite(cfg.out_bound)  # the ADC's bound, with or without its bits
        self.mask = torch.empty(shape, dtype=torch.bool) if clips else None
        self.s_out, self.levels = quantizer_levels(cfg.out_bits, cfg.out_bound)  # ADC (Eq. 5)
        # The backward needs Q_out before the digital factor: as int8 ADC levels when they fit
        # (a quarter of the memory, and the factor applied in the same pass), else as values.
        self.int_levels = bool(cfg.out_bits) and cfg.out_bits <= 8
        self.out = torch.empty(shape, dtype=dtype)
        if self.int_levels:
            self.q = torch.empty(shape, dtype=torch.int8)
            self.row_f, self.col_f = (f, np.ones(shape[1], dt)) if f.size == 1 else (
                np.ones(1, dt), f)
        else:
            self.q = self.out
            self.row_f, self.col_f = np.ones(1, dt), np.ones(shape[1], dt)

    def kernel_args(self):
        """Keyword arguments of the stage kernels: mask (the STE of periphery.quantize), the
        int8 levels and the bias (added in the kernel when it applies the factor)."""
        bias = None
        if self.bias is not None and self.int_levels:
            bias = self.bias.detach().to(self.out.dtype).contiguous().numpy()
        return dict(mask=_K.NO_MASK if self.mask is None else self.mask.numpy(),
                    level_out=self.q.numpy() if self.int_levels else None, bias=bias)

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
    _K.stage_backward(grad.numpy(), q.numpy(), ctx.q_scale,
                      None if mask is None else mask.numpy(), f.numpy(), grad_z.numpy(), partial,
                      partial_b)
    grad_f = grad_b = None
    if need_f:
        grad_f = torch.from_numpy(partial.sum(axis=0)).to(factor.dtype)
        if factor.dim() == 0:
            grad_f = grad_f.sum()
    if need_b:
        grad_b = torch.from_numpy(partial_b.sum(axis=0)).to(grad.dtype)
    return grad_z, grad_f, grad_b


class _FusedStageSTE(torch.autograd.Function):
    """factor * Q_out(z + dy_IR + noise) in one Numba pass (Eqs. 1, 2, 5, 14-16), with the
    straight-through backward of :func:`periphery.quantize`: identity inside the ADC bound, 0
    outside; the noise and IR-drop terms carry no gradient (MODEL.md sec. 8).

    ``z`` (rows, out) has the gradient; ``factor`` is the digital scale, (out,) or scalar. The
    kernel adds the analog terms; the ADC is applied to its result, so that the mask is that of
    the pre-ADC value.
    """

    @staticmethod
    def forward(ctx, z, factor, aux, cfg, n_rows, key):
        zd = z.detach().contiguous()
        (w_px, abs_x, x2), at = _aux_blocks(aux, zd.dtype)
        st = _StageBuffers(zd.shape, zd.dtype, factor, cfg)
        _K.output_stage(zd.numpy(), w_px, abs_x, x2, aux[0] is not None, aux[2] is not None,
                        1.0, cfg.out_noise, cfg.w_noise, cfg.ir_drop * cfg.ir_drop_g * n_rows,
                        st.s_out, st.levels, st.row_f, st.col_f, key, False, st.out.numpy(),
                        mask_bound=cfg.out_bound, at=at, bound=cfg.out_bound,
                        **st.kernel_args())
        return st.finish(ctx, factor)

    @staticmethod
    def backward(ctx, grad):
        q, factor, mask = ctx.saved_tensors
        grad_z, grad_f, _ = _stage_grads(ctx, grad, q, factor, mask, ctx.needs_input_grad[1])
        return grad_z, grad_f, None, None, None, None


def _conv_products(x4, w, conv4, need_ir, need_st, aux16=False):
    """The four products of a convolution tile (Eqs. 2, 14, 15, 18) as convolutions, for the
    output stage: W~ x~ (the signal), (W~ o P) x~, |W~| |x~|, |W~| x~^2.

    x4 : (batch, C, H, W) channels-last inputs x~; w : (out, C * kh * kw) weights W~;
    conv4 : 2-d (kernel_size, stride, padding, dilation, spatial). One convolution takes x~
    against [W~; W~ o P], and also |W~| when x~ >= 0 (inputs after a ReLU, where |x~| = x~);
    another takes |W~| against [|x~|; x~^2] stacked along the batch (no grouped convolution:
    oneDNN's grouped kernels ran 3x slower in half the calls here). With ``aux16``
    (``CrossbarConfig.aux_bfloat16``) the signal runs alone in the working precision and the
    auxiliary products in bfloat16 (half the memory traffic of their outputs).

    Returns ((w_px, abs_x, x2, z), at): C-ordered numpy arrays (empty for a switched-off term;
    z holds the signal in its first columns) and the output stage's block offsets (see
    :func:`_K.output_stage`).
    """
    ks, st, pd, dl, _ = conv4
    n_out = w.shape[0]
    shape = (n_out, x4.shape[1], *ks)
    conv2d = torch.nn.functional.conv2d
    nonneg = need_ir and bool(x4.min() >= 0)  # then |x~| = x~: one input for three products
    adt = torch.bfloat16 if aux16 else x4.dtype

    def rows(y):  # (batch, out, H', W') -> (batch * H' * W', out), free for channels-last
        y = y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return y.reshape(-1, y.shape[3]).to(x4.dtype).numpy()

    first = ([_weight_form(w, "px")] if need_ir else []) + ([_abs_cached(w)] if nonneg else [])
    xa = x4.to(adt)  # the inputs of the auxiliary products
    a0 = None
    if aux16:  # the signal alone in the working precision, the rest in bfloat16
        a0 = rows(conv2d(x4, w.reshape(shape), None, st, pd, dl))
    else:
        first = [w] + first
    a1 = None
    if first:
        w1 = (first[0] if len(first) == 1 else torch.cat(first)).to(adt)
        a1 = rows(conv2d(xa, w1.reshape(-1, *shape[1:]), None, st, pd, dl))
    z_arr, c1 = (a0, 0) if aux16 else (a1, n_out)  # a1's first free column
    n_rows = z_arr.shape[0]
    second = ([xa.abs()] if need_ir and not nonneg else []) + ([xa * xa] if need_st else [])
    a2 = None
    if second:
        x2in = second[0] if len(second) == 1 else torch.cat(second)
        a2 = rows(conv2d(_one_channel_last(x2in.contiguous(memory_format=torch.channels_last)),
                         _abs_cached(w).to(adt).reshape(shape), None, st, pd, dl))
    empty = _empty(z_arr.dtype)
    at = np.zeros(6, dtype=np.intp)  # (row, column) of w_px, abs_x, x2; z at column 0
    terms = [empty, empty, empty, z_arr]
    if need_ir:
        terms[0], at[1] = a1, c1
        if nonneg:
            terms[1], at[3] = a1, at[1] + n_out
        else:
            terms[1] = a2
    if need_st:
        terms[2], at[4] = a2, (len(second) - 1) * n_rows
    return terms, at


class _ConvTileSTE(torch.autograd.Function):
    """One convolution tile on CPU, training or evaluation: factor * Q_out(W~ * x~ + dy_IR +
    noise) (Eqs. 1, 2, 5, 14-16), with the gradients of :class:`_FusedStageSTE` (straight-through
    ADC) and then those of the convolution W~ * x~ and of the DAC to ``x``, ``alpha`` and ``w``.

    The products come from the image itself inside :func:`_K.conv_stage` for tiles of few rows
    (at most ``_K.CONV_STAGE_MAX_ROWS``: there the work scales with the outputs, and the
    products are cheaper computed than read back from memory), else from two oneDNN
    convolutions (:func:`_conv_products`) read in place by :func:`_K.output_stage`.

    ``x`` is the tile's input (batch, C, H, W) (or (batch, C, L)) and ``alpha`` its input range:
    the DAC x~ = Q_in(x / alpha) (Eq. 5, straight-through inside its bound) runs here, so that
    when x needs no gradient (a network's first layer) alpha's gradient through the DAC comes
    from one weight-gradient call instead of the input gradient. ``w`` (out, C * kernel
    elements); ``bias`` (out,) or None, added after the digital factor (in the kernel's pass with
    the int8 levels); returns the output pixels as rows (batch * out_h * out_w, out), channels
    last.
    """

    @staticmethod
    def forward(ctx, x, alpha, w, factor, bias, cfg, conv, key):
        kernel_size, stride, padding, dilation, spatial = conv
        with torch.no_grad():
            xs = x.detach() / alpha.detach()
            xt = quantize(xs, cfg.inp_bits, cfg.inp_bound)  # DAC, Eq. 5
        if xt.dim() == 3:  # 1-d: a 2-d convolution of height 1
            x4, conv4 = xt.detach().unsqueeze(2), (
                (1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation), (1, *spatial))
        else:
            x4, conv4 = xt.detach(), conv
        x4 = _one_channel_last(x4.contiguous(memory_format=torch.channels_last))
        wd = w.detach().contiguous()
        n_out, n_rows = wd.shape
        need_ir = cfg.ir_drop > 0 and cfg.ir_drop_g > 0
        need_st = cfg.w_noise > 0
        stb = _StageBuffers((x4.shape[0] * int(np.prod(conv4[4])), n_out), wd.dtype, factor, cfg,
                            bias)
        ir_k = cfg.ir_drop * cfg.ir_drop_g * n_rows
        if n_rows <= _K.CONV_STAGE_MAX_ROWS:
            empty = _empty(_NP_DTYPE[wd.dtype])
            geom = np.array([v for part in conv4 for v in part], dtype=np.intp)
            _K.conv_stage(x4.permute(0, 2, 3, 1).numpy(), geom, wd.numpy(),
                          _weight_form(wd, "px").numpy() if need_ir else empty,
                          _abs_cached(wd).numpy() if need_ir or need_st else empty, need_ir,
                          need_st, 1.0, cfg.out_noise, cfg.w_noise, ir_k, stb.s_out, stb.levels,
                          stb.row_f, stb.col_f, key, stb.out.numpy(), mask_bound=cfg.out_bound,
                          bound=cfg.out_bound, **stb.kernel_args())
        else:
            aux16 = cfg.aux_bfloat16 and wd.dtype == torch.float32 and (need_ir or need_st)
            (w_px, abs_x, x2, z), at = _conv_products(x4, wd, conv4, need_ir, need_st, aux16)
            _K.output_stage(z, w_px, abs_x, x2, need_ir, need_st, 1.0, cfg.out_noise,
                            cfg.w_noise, ir_k, stb.s_out, stb.levels, stb.row_f, stb.col_f, key,
                            False, stb.out.numpy(), mask_bound=cfg.out_bound, at=at,
                            bound=cfg.out_bound, **stb.kernel_args())
        ctx.conv = conv
        ctx.dac_bound = cfg.inp_bound if math.isfinite(cfg.inp_bound) else None
        return stb.finish(ctx, factor, xt, xs, alpha, w)

    @staticmethod
    def backward(ctx, grad):
        q, factor, mask, xt, xs, alpha, w = ctx.saved_tensors
        grad_z, grad_f, grad_b = _stage_grads(ctx, grad, q, factor, mask,
                                              ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        kernel_size, stride, padding, dilation, spatial = ctx.conv
        need_x, need_a, need_w = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_w = None
        if not (need_x or need_a or need_w):
            return None, None, None, grad_f, grad_b, None, None, None
        n_out, n_ch = w.shape[0], xt.shape[1]
        # rows (batch * spatial, out) -> (batch, out, *spatial) in channels-last memory
        g = grad_z.reshape(xt.shape[0], *spatial, n_out).movedim(-1, 1)
        # the DAC's straight-through rule (periphery.quantize): identity inside its bound
        inside = None if ctx.dac_bound is None else straight_through_mask(xs, ctx.dac_bound)
        v = xs if inside is None else xs * inside
        conv_args = (list(stride), list(padding), list(dilation), False, [0] * len(stride), 1)
        w4 = w.reshape(n_out, n_ch, *kernel_size)
        if need_x:  # the full input gradient: x~ = Q(x / alpha)
            grad_xt, grad_w, _ = torch.ops.aten.convolution_backward(
                g, _one_channel_last(xt), w4, None, *conv_args, [True, need_w, False])
            grad_x = (grad_xt if inside is None else grad_xt * inside) / alpha
            if need_a:  # d x~ / d alpha = -(x / alpha^2) inside the bound
                grad_a = -(grad_xt * v).sum() / alpha
        else:
            # Only alpha needs the DAC's gradient: sum(grad_x~ * v) = <W~, dL/dW~ with input v>
            # (the adjoint of the convolution), one weight-gradient call on [x~, v] stacked as
            # channels instead of the (for one channel, 7x dearer) input gradient.
            inp = torch.cat([xt, v], 1) if need_a else xt
            inp = inp.contiguous(memory_format=torch.channels_last) if inp.dim() == 4 else inp
            w_in = torch.cat([w4, w4], 1) if need_a else w4
            _, gw, _ = torch.ops.aten.convolution_backward(
                g, _one_channel_last(inp), w_in, None, *conv_args, [False, True, False])
            grad_w = gw[:, :n_ch] if need_w else None
            if need_a:
                grad_a = -(gw[:, n_ch:] * w4).sum() / alpha
        grad_w = None if grad_w is None or not need_w else grad_w.reshape(w.shape)
        return grad_x, grad_a, grad_w, grad_f, grad_b, None, None, None


def _stage_key(gen) -> np.uint64:
    return np.uint64(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))


def _fused_tile(xs, w, cfg, factor, gen, prod=_F):
    """factor * Q_out(analog(Q_in(xs))) with the fused output stage; differentiable (STE)."""
    xt = quantize(xs, cfg.inp_bits, cfg.inp_bound)  # DAC, Eq. 5
    z = prod(xt, w)  # Eq. 2, signal (the only term with a gradient)
    aux = _aux_terms(xt.detach(), w, cfg, prod)
    return _FusedStageSTE.apply(z, factor, aux, cfg, w.shape[1], _stage_key(gen))


def _fused_equal_tiles(x, w_tiles, cfg, alpha, out_scale, gen):
    """Training forward of T tiles of equal size at once (batched products, one output stage):
    sum_k alpha_k out_scale_k Q_out(analog(Q_in(x_k / alpha_k))) (Eq. 1), the same as the tiles
    one by one (:func:`_fused_tile`), with a few large calls in place of T sets of small ones.
    """
    n_t, n = len(w_tiles), w_tiles[0].shape[1]
    b = x.shape[0]
    xs = x.reshape(b, n_t, n) / alpha.reshape(1, n_t, 1)
    xt = quantize(xs, cfg.inp_bits, cfg.inp_bound).transpose(0, 1)  # DAC (Eq. 5): (T, B, n)
    w = torch.stack(w_tiles)  # (T, out, n)
    z = torch.bmm(xt, w.transpose(1, 2))  # Eq. 2, signal (the only term with a gradient)
    need_ir = cfg.ir_drop > 0 and cfg.ir_drop_g > 0
    need_st = cfg.w_noise > 0
    w_px = abs_x = x2 = None
    with torch.no_grad():  # the auxiliary products (Eqs. 14, 15, 18), each (T, B, out)
        xd, wd = xt.detach(), w.detach()
        if need_ir or need_st:
            wabs_t = wd.abs().transpose(1, 2)
        if need_ir:
            w_px = torch.bmm(xd * ir_drop_profile(n, xd.dtype), wd.transpose(1, 2))
            abs_x = torch.bmm(xd.abs(), wabs_t)
        if need_st:
            x2 = torch.bmm(xd * xd, wabs_t)
    rows = n_t * b
    aux = tuple(None if t is None else t.reshape(rows, -1) for t in (w_px, abs_x, x2))
    one = torch.ones((), dtype=x.dtype)
    q = _FusedStageSTE.apply(z.reshape(rows, -1), one, aux, cfg, n, _stage_key(gen))
    factor = (alpha.reshape(n_t, 1) * out_scale).unsqueeze(1)  # (T, 1, out), Eq. 1
    return (q.reshape(n_t, b, -1) * factor).sum(0)


def _analog(xs, w, cfg, gen, asym, zeta, grad, prod=_F):
    """Pre-ADC analog value of one tile for inputs xs = x / alpha (Eq. 2 with Eqs. 14-19).

    ``prod(inputs, weights)`` is the tile's product in the caller's layout, returning
    (rows, out): ``F.linear`` for a matrix of input vectors, a convolution for images (see
    :func:`analog_conv`); every term below is one such product.
    """
    xt = quantize(xs, cfg.inp_bits, cfg.inp_bound)  # DAC, Eq. 5
    n = w.shape[1]
    need_ir = cfg.ir_drop > 0 and cfg.ir_drop_g > 0
    need_st = cfg.w_noise > 0
    xd = xt.detach() if grad else xt
    w_px = None
    if need_ir and prod is _F and not grad:  # one GEMM: [x~; x~ o P] against W~ (Eqs. 2, 15)
        b = xt.shape[0]
        p = ir_drop_profile(n, xt.dtype, xt.device)
        zz = _F(torch.cat([xt, xd * p]), w)
        z, w_px = zz[:b], zz[b:]
    else:
        z = prod(xt, w)  # Eq. 2, signal
    w_px, abs_x, x2 = _aux_terms(xd, w, cfg, prod, w_px)
    with torch.no_grad():
        extra = None
        if need_ir:
            extra = ir_drop_delta(abs_x, w_px, n, cfg.ir_drop, cfg.ir_drop_g)  # Eq. 15
        if asym is not None:
            if prod is not _F:
                raise ValueError("asymmetry: read-polarity asymmetry needs the matrix layout; "
                                 "use analog_mvm on unfolded inputs")
            d = asymmetry_delta(xd, w.detach(), asym)
            extra = d if extra is None else extra.add_(d)
        if cfg.s_adc:
            if need_st:
                st = short_term_noise_std(x2, cfg.w_noise)  # Eq. 14
                st.mul_(torch.randn(st.shape, dtype=st.dtype, device=st.device, generator=gen))
                extra = st if extra is None else extra.add_(st)
            noise_std = cfg.out_noise
        else:
            # f_NL = identity: short-term and output noise are one Gaussian of variance
            # sigma_out^2 + sigma_i^2 (Eqs. 2, 14), one draw instead of two.
            if need_st:
                noise_std = (x2.mul_(cfg.w_noise ** 2).add_(cfg.out_noise ** 2)).sqrt_()
            else:
                noise_std = cfg.out_noise
        if isinstance(noise_std, torch.Tensor) or noise_std > 0:
            noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=gen)
            noise = noise.mul_(noise_std)
        else:
            noise = None
    if cfg.s_adc:
        if extra is not None:
            z = z + extra if grad else z.add_(extra)
        zeta = cfg.mu_zeta if zeta is None else zeta
        gain = s_adc_gain(zeta, cfg.mu_zeta, cfg.s_adc_gain)
        z = s_adc(z, zeta, cfg.out_bound, gain)  # Eq. 19
        if noise is not None:
            z = z + noise if grad else z.add_(noise)  # Eq. 2, output noise
        return z
    if extra is not None:
        noise = extra if noise is None else noise.add_(extra)
    if noise is not None:
        z = z + noise if grad else z.add_(noise)
    return z
