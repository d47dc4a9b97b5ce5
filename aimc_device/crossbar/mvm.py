"""The analog matrix-vector product of a tiled layer (docs/model.md 2, 3, 6; Eqs. 1-2, 5, 14-19).

:func:`analog_mvm` (a matrix of input vectors) and :func:`analog_conv` (images, every term a
convolution) are the functional core shared by :class:`~aimc_device.crossbar.AnalogArray` and
the torch adapter (:mod:`aimc_device.nn`). Per tile k they compute

    y_k = alpha_k * out_scale_k * Q_out( sigma_out xi + f_NL( dy_IR + sum_j (w~_ij + n_ij) x~_j ) ),
    x~ = Q_in(x_k / alpha_k),

and add the tiles in digital. This module holds the torch reference of these equations
(:func:`_reference_tile`, :func:`_pre_adc`): each written once, it runs on any device and dtype
and is the oracle of the tests. The fast CPU backend (:mod:`._fast`, Numba) computes the same
where the one dispatch rule :func:`_fast_backend` allows.

Gradients (hardware-aware training, docs/model.md sec. 8): the backward pass is plain floating point
through the (perturbed) weights, with straight-through quantisers; the noise, IR-drop and
asymmetry terms are added as constants (no gradient through them). The per-MVM noise is drawn
the same way with and without a gradient: the same generator state gives the same draw.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1, 2, 5, 14-19.
"""
from __future__ import annotations

import math

import torch

from . import _fast
from .config import CrossbarConfig
from .mapping import split_sizes
from .options import EngineOptions, current_options
from .periphery import (
    asymmetry_delta,
    ir_drop_delta,
    quantize,
    s_adc,
    s_adc_gain,
    short_term_noise_std,
    weight_form,
)

__all__ = ["analog_mvm", "analog_conv", "conv_channel_split"]

_F = torch.nn.functional.linear
_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
         3: torch.nn.functional.conv3d}


def _fast_backend(x: torch.Tensor, cfg: CrossbarConfig, asymmetry, options: EngineOptions
                  ) -> bool:
    """The dispatch rule: the fast CPU backend for CPU tensors in float32/float64 under the
    elements it implements (no S-shaped ADC, read asymmetry, noise or bound management), unless
    the options ask for the reference. Grad mode plays no part."""
    return (options.backend == "auto" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and not cfg.s_adc and asymmetry is None
            and cfg.noise_management == "none" and cfg.bound_management == "none")


def _tile_item(v, k):
    """Tile k's entry of a per-tile list (or the one value for every tile)."""
    return v[k] if isinstance(v, (list, tuple)) else v


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return t.to(dtype=like.dtype, device=like.device)


def analog_mvm(x: torch.Tensor, w_tiles, cfg: CrossbarConfig, alpha, out_scale, *,
               generator=None, asymmetry=None, zeta=None, options: EngineOptions | None = None
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
    options : EngineOptions or None
        Backend and precision (:class:`~aimc_device.crossbar.EngineOptions`); None: those in
        effect (:func:`~aimc_device.crossbar.engine_options`).

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
    if not isinstance(w_tiles, (list, tuple)) or not w_tiles:
        _check(x, w_tiles, None, None)
    w0 = w_tiles[0]
    squeeze = x.dim() == 1
    x = (x[None] if squeeze else x).to(w0.dtype)
    given = (alpha, out_scale)
    alpha = _as_tensor(alpha, w0).reshape(-1)
    out_scale = _as_tensor(out_scale, w0)
    _check(x, w_tiles, alpha, out_scale)
    options = options or current_options()
    fast = _fast_backend(x, cfg, asymmetry, options)
    if fast and not x.is_contiguous():
        x = x.contiguous()
    grad = _needs_grad(x, alpha, out_scale, *w_tiles)
    if fast and not grad:  # the caller's own tensors: constants derived from them are kept
        a, s = (g if isinstance(g, torch.Tensor) else c for g, c in zip(given, (alpha, out_scale)))
        out = _fast.linear_eval(x, w_tiles, cfg, a, s, generator, options)
        return out[0] if squeeze else out
    if not fast and _stackable(w_tiles, cfg, asymmetry):
        out = _reference_stacked(x, w_tiles, cfg, alpha, out_scale, generator, zeta)
        return out[0] if squeeze else out
    out = None
    start = 0
    for k, w in enumerate(w_tiles):
        if fast:
            yk = _fast.linear_tile(x, start, w, cfg, alpha[k], out_scale[k],
                                   _fast.stage_key(generator), options)
        else:
            yk = _reference_tile(x[:, start:start + w.shape[1]], w, cfg, alpha[k], out_scale[k],
                                 generator, _tile_item(asymmetry, k), _tile_item(zeta, k))
        start += w.shape[1]
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
                channel_sizes, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                generator=None, zeta=None, bias=None, options: EngineOptions | None = None
                ) -> torch.Tensor:
    """Analog convolution: the analog MVM of every image patch, computed as convolutions.

    Mathematically the same as :func:`analog_mvm` on the unfolded patches (im2col) with tiles
    of whole input channels, but each term of Eqs. 2, 14-18 (signal, |W~| against |x~| and
    x~^2, (W~ o P) against x~) is one convolution, so that no patch matrix is built and the
    backward pass of hardware-aware training is that of a convolution.

    A grouped convolution (``groups`` = G > 1; depthwise for G = channels) keeps each group on
    its own crossbar tiles: group g's matrix (out / G, C / G * kernel elements) is cut into
    tiles of whole channels as a convolution of C / G channels would be, and no tile holds two
    groups. The G tiles that hold the same channel part of every group form one entry of
    ``w_tiles``, read at once as one grouped convolution; their input ranges are
    ``alpha[k, g]``, and every term (signal, IR drop, noise variance) is a sum over one
    physical tile's rows.

    Parameters
    ----------
    x : torch.Tensor (batch, C, *spatial), real inputs (unit of the layer's input)
    w_tiles : list of torch.Tensor (out, c_k * prod(kernel_size)), normalised weights per tile;
        with groups, rows g * out / G to (g + 1) * out / G are group g's tile
    cfg : CrossbarConfig (noise_management "none", bound_management "none")
    alpha : torch.Tensor (n_tiles,), input range per tile; with groups (n_tiles, G), per tile
        and group
    out_scale : torch.Tensor (n_tiles, out), digital factor per tile and column
    channel_sizes : list of int, input channels per tile (of one group: summing to C / G;
        :func:`conv_channel_split`)
    kernel_size, stride, padding, dilation : int or tuple (one entry per spatial dimension)
    groups : int, the convolution's groups G (C and out divisible by G)
    generator : torch.Generator or None, per-MVM draws
    zeta : S-shaped ADC gains, as in :func:`analog_mvm`
    bias : torch.Tensor (out,) or None, the layer's digital bias (added once)
    options : EngineOptions or None, as in :func:`analog_mvm`

    Returns
    -------
    torch.Tensor (batch, out, *spatial_out)

    Raises
    ------
    ValueError
        On management modes that act per input vector, and on shapes that do not fit together,
        naming the argument.
    """
    if cfg.noise_management != "none" or cfg.bound_management != "none":
        raise ValueError("analog_conv: noise and bound management act per input vector; use "
                         "analog_mvm on unfolded inputs for them")
    dims = x.dim() - 2
    conv = _CONV[dims]
    kernel_size, stride, padding, dilation = (
        tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
        for v in (kernel_size, stride, padding, dilation))
    w0 = w_tiles[0]
    n_out = w0.shape[0]
    x = x.to(w0.dtype)
    alpha = _as_tensor(alpha, w0).reshape(len(w_tiles), groups)
    out_scale = _as_tensor(out_scale, w0)
    options = options or current_options()
    fast = _fast_backend(x, cfg, None, options) and dims <= 2
    grad = _needs_grad(x, alpha, out_scale, *w_tiles)
    if dims == 2 and (grad or not fast):
        # channels-last: each product's (rows, out) layout is then a free view (the DAC of an
        # evaluation on the fast backend writes its levels channels last from either layout)
        x = _ChannelsLast.apply(x) if x.requires_grad else x.contiguous(
            memory_format=torch.channels_last)
        x = _fast.one_channel_last(x)
    if groups * sum(channel_sizes) != x.shape[1] or len(channel_sizes) != len(w_tiles):
        raise ValueError(f"x: {x.shape[1]} channels; the tiles hold {list(channel_sizes)} "
                         f"channels of each of {groups} groups")
    if n_out % groups:
        raise ValueError(f"w_tiles: {n_out} outputs do not split into groups={groups}")
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s_ + 1 for size, k, s_, p, d in
               zip(x.shape[2:], kernel_size, stride, padding, dilation)]
    bcast = (1, -1) + (1,) * dims  # a per-channel factor against (batch, C, *spatial)
    out = None
    c0 = 0
    for k, (w, ck) in enumerate(zip(w_tiles, channel_sizes)):
        xk = _group_channels(x, groups, c0, ck)
        c0 += ck
        # the input range of each group's tile, per input channel and per output column
        a_in = alpha[k, 0] if groups == 1 else alpha[k].repeat_interleave(ck).reshape(bcast)
        a_out = alpha[k, 0] if groups == 1 else alpha[k].repeat_interleave(n_out // groups)
        if fast:
            geometry = (kernel_size, stride, padding, dilation, spatial, groups)
            if not grad:  # the tiles' outputs summed in place
                out = _fast.conv_eval(xk, a_in, w, a_out * out_scale[k], cfg, options,
                                      geometry, _fast.stage_key(generator), out)
                continue
            yk = _fast.ConvTileSTE.apply(xk, a_in, w, a_out * out_scale[k], None, cfg, options,
                                         geometry, _fast.stage_key(generator))
        else:
            shape = (n_out, ck, *kernel_size)

            def prod(inp, wt, shape=shape):  # the tile's product as a convolution, (rows, out)
                if dims == 2:
                    inp = _fast.one_channel_last(inp)
                y = conv(inp, wt.reshape(shape), None, stride, padding, dilation, groups)
                return y.movedim(1, -1).reshape(-1, n_out)

            yk = _reference_tile(xk, w, cfg, a_in, out_scale[k], generator, None,
                                 _tile_item(zeta, k), prod, a_out)
        out = yk if out is None else (out + yk if grad else out.add_(yk))
    if bias is not None:  # a torch add after the stage (cheaper than inside the Numba stage)
        out = out + bias if grad or _needs_grad(bias) else out.add_(bias)
    return out.reshape(x.shape[0], *spatial, n_out).movedim(-1, 1)


def _group_channels(x: torch.Tensor, groups: int, c0: int, ck: int) -> torch.Tensor:
    """Channels c0 to c0 + ck of every group of x (batch, C, *spatial), group after group."""
    if groups == 1:
        return x[:, c0:c0 + ck]
    per = x.shape[1] // groups
    if ck == per:
        return x
    idx = (torch.arange(groups, device=x.device)[:, None] * per
           + torch.arange(c0, c0 + ck, device=x.device)).reshape(-1)
    xk = x.index_select(1, idx)
    return xk.contiguous(memory_format=torch.channels_last) if xk.dim() == 4 else xk


# ------------------------------------------------------------------------ the reference
def _stackable(w_tiles, cfg: CrossbarConfig, asymmetry) -> bool:
    """Whether the reference reads the tiles at once as one batch of equal tiles (several tiles
    of one size; no read asymmetry, whose term is a matrix product per tile, and no iterative
    bound management, which reads the saturated rows of each tile again)."""
    return (len(w_tiles) > 1 and asymmetry is None and cfg.bound_management == "none"
            and all(w.shape[1] == w_tiles[0].shape[1] for w in w_tiles))


def _tile_batch_product(inp, wt):
    """The products of a batch of equal tiles: (T, rows, n) against (T, out, n) -> (T, rows,
    out)."""
    return torch.matmul(inp, wt.transpose(-1, -2))


def _reference_stacked(x, w_tiles, cfg, alpha, out_scale, gen, zeta):
    """The reference of equal tiles as one batch (leading dimension T): the equations of
    :func:`_reference_tile` with per-tile alpha, out_scale and S-ADC gains broadcast, then the
    sum over tiles (Eq. 1). The same model as tile by tile; the noise comes in one draw."""
    n_t, n = len(w_tiles), w_tiles[0].shape[1]
    xs = x.reshape(x.shape[0], n_t, n).transpose(0, 1)  # (T, rows, n)
    if isinstance(zeta, (list, tuple)):
        zeta = torch.stack(list(zeta)).unsqueeze(1)  # (T, 1, out)
    y = _reference_tile(xs, torch.stack(list(w_tiles)), cfg, alpha.reshape(n_t, 1, 1),
                        out_scale.unsqueeze(1), gen, None, zeta, _tile_batch_product)
    return y.sum(dim=0)


def _reference_tile(xk, w, cfg, alpha_k, scale_k, gen, asym, zeta, prod=_F, alpha_out=None):
    """One tile, torch reference: a out_scale Q_out(pre-ADC(Q_in(x / a))) (Eqs. 1, 5), with
    a = alpha, or the abs-max of each input vector under ``noise_management="abs_max"``; under
    iterative bound management the inputs of saturated vectors are halved and read again.

    ``alpha_out``: the input range as it multiplies each output column, where ``alpha_k``
    differs per input (the tiles of a grouped convolution, see :func:`analog_conv`); None:
    alpha_k."""
    a = alpha_k
    if cfg.noise_management == "abs_max":
        a = xk.detach().abs().amax(dim=-1, keepdim=True)
        a = torch.where(a > 0, a, torch.ones_like(a))  # (..., batch, 1)
    grad = _needs_grad(xk, w, alpha_k, scale_k)
    z = _pre_adc(xk / a, w, cfg, gen, asym, zeta, prod)
    if cfg.bound_management == "iterative" and math.isfinite(cfg.out_bound):
        a = (a * torch.ones((xk.shape[0], 1), dtype=xk.dtype, device=xk.device)).detach()
        for _ in range(cfg.bound_management_iters):
            sat = (z.detach().abs() >= cfg.out_bound).any(dim=1)
            if not bool(sat.any()):
                break
            a = torch.where(sat[:, None], 2.0 * a, a)
            idx = sat.nonzero()[:, 0]
            z_new = _pre_adc(xk[idx] / a[idx], w, cfg, gen, asym, zeta, prod)
            z = z.index_put((idx,), z_new) if grad else z.index_put_((idx,), z_new)
    a_out = a if alpha_out is None else alpha_out
    return quantize(z, cfg.out_bits, cfg.out_bound) * (a_out * scale_k)  # Eq. 1, ADC of Eq. 5


def _pre_adc(xs, w, cfg, gen, asym, zeta, prod=_F):
    """Pre-ADC analog value of one tile for inputs xs = x / alpha (Eq. 2 with Eqs. 14-19).

    ``prod(inputs, weights)`` is the tile's product in the caller's layout, returning
    (rows, out): ``F.linear`` for a matrix of input vectors, a convolution for images (see
    :func:`analog_conv`); every term below is one such product. Only the signal W~ x~ carries a
    gradient.
    """
    xt = quantize(xs, cfg.inp_bits, cfg.inp_bound)  # DAC, Eq. 5
    z = prod(xt, w)  # Eq. 2, signal
    n = w.shape[-1]
    extra = []  # the terms without gradient, added to the signal
    with torch.no_grad():
        xd = xt.detach()
        if cfg.has_ir_drop:  # Eqs. 15-18
            w_px = prod(xd, weight_form(w, "px"))
            extra.append(ir_drop_delta(prod(xd.abs(), weight_form(w, "abs")), w_px, n,
                                       cfg.ir_drop, cfg.ir_drop_g))
        if asym is not None:
            if prod is not _F:
                raise ValueError("asymmetry: read-polarity asymmetry needs the matrix layout; "
                                 "use analog_mvm on unfolded inputs")
            extra.append(asymmetry_delta(xd, w.detach(), asym))
        st_std = short_term_noise_std(prod(xd * xd, weight_form(w, "abs")), cfg.w_noise) \
            if cfg.has_short_term_noise else 0.0  # Eq. 14
        if cfg.s_adc:  # short-term noise before the nonlinearity, output noise after it
            if cfg.has_short_term_noise:
                extra.append(st_std * _randn(z, gen))
            out_std = cfg.out_noise
        else:  # f_NL = identity: both noises are one Gaussian of variance sigma_out^2 + sigma_i^2
            out_std = (cfg.out_noise ** 2 + st_std ** 2) ** 0.5
        noisy = cfg.out_noise > 0 or (cfg.has_short_term_noise and not cfg.s_adc)
        noise = out_std * _randn(z, gen) if noisy else None
    for term in extra:
        z = z + term
    if cfg.s_adc:
        zeta = cfg.mu_zeta if zeta is None else zeta
        z = s_adc(z, zeta, cfg.out_bound, s_adc_gain(zeta, cfg.mu_zeta, cfg.s_adc_gain))  # Eq. 19
    return z if noise is None else z + noise  # Eq. 2, output noise


def _randn(like: torch.Tensor, gen) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
