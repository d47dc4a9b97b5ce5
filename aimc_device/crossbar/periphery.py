"""The periphery of a crossbar tile, one torch function per element (docs/model.md 2, 3, 6).

Each element is written once here, on torch tensors, and serves numpy callers (converted at the
boundary in :mod:`aimc_device.crossbar.array`), CPU and CUDA, and the torch adapter. Units:
inputs relative to the input range (x~ = x / alpha), weights relative to the column scale
(w~ in [-1, 1]), outputs in normalised output units (see :class:`CrossbarConfig`).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 2, 5, 14-19.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "quantize", "quantizer_step", "quantizer_levels", "straight_through_mask", "output_noise",
    "short_term_noise_std", "short_term_noise",
    "ir_drop_profile", "weight_form", "ir_drop_coefficient", "ir_drop_delta", "ir_drop",
    "draw_zeta",
    "s_adc_gain", "s_adc",
    "draw_asymmetry", "asymmetry_delta",
]


def quantizer_step(bits: int, bound: float) -> float:
    """Width of one level of the quantiser (Eq. 5): 2 b / (2^q - 2), in the units of ``bound``."""
    return 2.0 * bound / (2.0 ** bits - 2.0)


def quantizer_levels(bits: int | None, bound: float) -> tuple[float, float]:
    """(scale, levels) of the quantiser (Eq. 5): levels per unit of ``bound``'s unit,
    (2^q - 2) / (2 b), and the largest level index 2^(q-1) - 1 (= b * scale; 2^q - 1 levels in
    all). (0.0, 0.0) for no quantiser (``bits`` None or 0)."""
    if not bits:
        return 0.0, 0.0
    return (2.0 ** bits - 2.0) / (2.0 * bound), 2.0 ** (bits - 1) - 1.0


def straight_through_mask(z: torch.Tensor, bound: float) -> torch.Tensor:
    """Where the quantiser's straight-through gradient passes: |z| <= b (docs/model.md sec. 8;
    clipped values do not move), as a bool tensor like z."""
    return z.abs() <= bound


class _QuantizeSTE(torch.autograd.Function):
    """Q(z) forward; straight-through backward: identity inside [-b, b], 0 outside."""

    @staticmethod
    def forward(ctx, z, scale, levels, bound):
        ctx.save_for_backward(z)
        ctx.bound = bound
        return torch.round(z * scale).clamp_(-levels, levels).div_(scale)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * straight_through_mask(z, ctx.bound).to(grad.dtype), None, None, None


def quantize(z: torch.Tensor, bits: int | None, bound: float) -> torch.Tensor:
    """Uniform symmetric quantiser with 2^q - 1 levels (docs/model.md sec. 2, Eq. 5).

    Q(z) = clip(round((2^q - 2) z / (2 b)) 2 b / (2^q - 2), -b, b); the gradient is passed
    straight through inside the bound and is 0 outside (clipped values do not move). With no
    bits the converter has unlimited resolution but keeps its range: Q(z) = clip(z, -b, b)
    (no clipping for b = inf).

    Parameters
    ----------
    z : torch.Tensor, values in the units of ``bound`` (normalised input or output units)
    bits : int or None, resolution q [bit]; None or 0: no rounding
    bound : float, bound b, same units as z; inf (only without bits): no clipping

    Returns
    -------
    torch.Tensor like z.
    """
    if not bits:
        # clamp's gradient is 1 inside [-b, b] and 0 outside: the straight-through rule
        return z if math.isinf(bound) else z.clamp(-bound, bound)
    scale, levels = quantizer_levels(bits, bound)  # Eq. 5
    if torch.is_grad_enabled() and z.requires_grad:
        return _QuantizeSTE.apply(z, scale, levels, bound)
    return torch.round(z * scale).clamp_(-levels, levels).div_(scale)


def _randn_like(z: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)


def output_noise(z: torch.Tensor, std: float, generator=None) -> torch.Tensor:
    """Additive Gaussian output noise, a new draw every MVM (Eq. 2): z + sigma_out xi.

    Parameters
    ----------
    z : torch.Tensor, analog outputs [normalised output units]
    std : float, sigma_out [normalised output units]
    generator : torch.Generator or None
    """
    if std == 0:
        return z
    return z + std * _randn_like(z, generator)


def short_term_noise_std(abs_w_x2: torch.Tensor, w_noise: float) -> torch.Tensor:
    """Output-referred short-term read noise (Eq. 14): sigma_i = sigma_w0 sqrt(sum_j |w~_ij| x~_j^2).

    Parameters
    ----------
    abs_w_x2 : torch.Tensor, sum_j |w~_ij| x~_j^2 (the GEMM |W~| . x~^2), (batch, out)
    w_noise : float, sigma_w0, relative to g_max

    Returns
    -------
    torch.Tensor, sigma_i [normalised output units], (batch, out)
    """
    return w_noise * abs_w_x2.clamp(min=0.0).sqrt()  # Eq. 14


def short_term_noise(x: torch.Tensor, w: torch.Tensor, w_noise: float,
                     generator=None) -> torch.Tensor:
    """A draw of the short-term read noise of W~ x~ (Eq. 14), (batch, out), reference form."""
    std = short_term_noise_std(torch.nn.functional.linear(x * x, w.abs()), w_noise)
    return std * _randn_like(std, generator)


_PROFILE_CACHE: dict = {}


def ir_drop_profile(n: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Relative IR-drop weight of each row, P_j = 1 - (1 - j/n)^2, j = 0..n-1 (docs/model.md 6).

    Row j = 0 (the first input of the tile) sits at the end of the column where the line
    resistance has no effect; P grows toward the far rows. (Which physical end is j = 0 is not
    stated in [1]; this is the documented choice.)
    """
    key = (int(n), dtype, str(device))
    p = _PROFILE_CACHE.get(key)
    if p is None:
        j = torch.arange(n, dtype=torch.float64)
        p = (1.0 - (1.0 - j / n) ** 2).to(dtype=dtype, device=device)  # Eq. 17
        _PROFILE_CACHE[key] = p
    return p


#: Coefficients (c1, c2, c3) of the cubic IR-drop coefficient c(a) = c1 a + c2 a^2 + c3 a^3
#: (docs/model.md sec. 6, Eq. 16 of Rasch et al., Nat. Commun. 14, 5282 (2023)).
IR_DROP_POLY = (0.5, -0.2, 0.05)


def ir_drop_coefficient(a: torch.Tensor) -> torch.Tensor:
    """Cubic IR-drop coefficient c(a) = 0.05 a^3 - 0.2 a^2 + 0.5 a (docs/model.md 6, Eq. 16)."""
    c1, c2, c3 = IR_DROP_POLY
    return a * (c1 + a * (c2 + c3 * a))  # Eq. 16


_WEIGHT_FORMS = {  # the weight matrices of the auxiliary products (Eqs. 14, 15, 18)
    "abs": lambda w: w.abs(),
    "px": lambda w: w * ir_drop_profile(w.shape[-1], w.dtype, w.device),
}


def weight_form(w: torch.Tensor, kind: str, dtype=None) -> torch.Tensor:
    """|W~| ("abs") or W~ o P ("px", P of :func:`ir_drop_profile` along the rows, the last
    dimension) in ``dtype`` (None: w's), cached on the tensor until any in-place change of it
    (the weights of a programmed array are read many times); computed afresh, without
    gradient, for weights that require one."""
    dtype = dtype or w.dtype
    if w.requires_grad:
        return _WEIGHT_FORMS[kind](w.detach()).to(dtype)
    cache = getattr(w, "_aimc_forms", None)
    if cache is None or cache[0] != w._version:
        cache = (w._version, {})
        try:
            w._aimc_forms = cache
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor subclasses
            pass
    form = cache[1].get((kind, dtype))
    if form is None:
        form = cache[1][(kind, dtype)] = _WEIGHT_FORMS[kind](w).to(dtype)
    return form


def ir_drop_delta(abs_w_abs_x: torch.Tensor, w_px: torch.Tensor, n_rows: int, scale: float,
                  g_ir: float) -> torch.Tensor:
    """IR-drop change of the outputs from its two GEMMs (docs/model.md sec. 6, Eqs. 15-18).

    a_i = s g_ir n sum_j |w~_ij||x~_j|,  dy_i = -c(a_i) sum_j w~_ij x~_j P_j: the wire
    resistance scaled by s (r_wire -> s r_wire), so that dy is cubic in s through c(a).

    Parameters
    ----------
    abs_w_abs_x : torch.Tensor, sum_j |w~_ij| |x~_j| (batch, out)
    w_px : torch.Tensor, sum_j w~_ij x~_j P_j (batch, out)
    n_rows : int, occupied rows n of the tile
    scale : float, wire-resistance scale s, dimensionless (``CrossbarConfig.ir_drop``, 1 in the
        standard model)
    g_ir : float, r_wire g_max_ir, dimensionless

    Returns
    -------
    torch.Tensor, dy [normalised output units], (batch, out)
    """
    a = abs_w_abs_x * (scale * g_ir * n_rows)  # Eq. 18
    return -ir_drop_coefficient(a) * w_px  # Eq. 15


def ir_drop(x: torch.Tensor, w: torch.Tensor, scale: float, g_ir: float) -> torch.Tensor:
    """IR-drop change dy of W~ x~ for one tile, reference form (Eqs. 15-18), (batch, out);
    ``scale`` is the wire-resistance scale s (see :func:`ir_drop_delta`)."""
    p = ir_drop_profile(w.shape[1], w.dtype, w.device)
    f = torch.nn.functional.linear
    return ir_drop_delta(f(x.abs(), w.abs()), f(x * p, w), w.shape[1], scale, g_ir)


def draw_zeta(n_cols: int, mu: float, sigma: float, generator=None, dtype=torch.float32,
              device="cpu") -> torch.Tensor:
    """Per-column saturation of the S-shaped ADC, zeta_i = mu (1 + sigma xi), >= 0 (Eq. 19)."""
    xi = torch.randn(n_cols, dtype=dtype, device=device, generator=generator)
    return (mu * (1.0 + sigma * xi)).clamp_(min=0.0)


def s_adc_gain(zeta, mu_zeta: float, calibration: str):
    """Gain g_i of the S-shaped ADC per column (Eq. 19, ``CrossbarConfig.s_adc_gain``).

    "column": g_i = 1 + zeta_i, so that f_i(+-b_out) = +-b_out in every column; "tile":
    g = 1 + mu_zeta, the same for every column (f(+-b_out) = +-b_out for the mean saturation);
    "none": g = 1.

    Parameters
    ----------
    zeta : float or torch.Tensor (out,), saturation per column, dimensionless
    mu_zeta : float, mean saturation, dimensionless
    calibration : str, "column", "tile" or "none"
    """
    if calibration == "column":
        return 1.0 + zeta
    if calibration == "tile":
        return 1.0 + mu_zeta
    if calibration == "none":
        return 1.0
    raise ValueError(f"S-ADC gain calibration {calibration!r}: choose 'column', 'tile' or 'none'")


def s_adc(z: torch.Tensor, zeta, bound: float, gain=None) -> torch.Tensor:
    """S-shaped ADC transfer (docs/model.md sec. 6, Eq. 19).

    f_i(z) = g_i z / (1 + zeta_i |z| / b_out): saturating, with zeta per unit of z / b_out
    and a gain g_i from :func:`s_adc_gain`.

    Parameters
    ----------
    z : torch.Tensor, (batch, out) [normalised output units]
    zeta : float or torch.Tensor (out,), dimensionless
    bound : float, b_out [normalised output units]
    gain : float, torch.Tensor (out,) or None, dimensionless; None: 1 + zeta (the column
        calibration, f_i(+-b_out) = +-b_out)
    """
    gain = 1.0 + zeta if gain is None else gain
    return z * gain / (1.0 + (zeta / bound) * z.abs())  # Eq. 19


def draw_asymmetry(shape, sigma: float, generator=None, dtype=torch.float32,
                   device="cpu") -> torch.Tensor:
    """Read-polarity asymmetry a_ij ~ Normal(0, sigma_a), one per device (docs/model.md 4)."""
    return sigma * torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)


def asymmetry_delta(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Output change from read-polarity asymmetry (docs/model.md sec. 4).

    Negative inputs are read in a second phase where weight w~_ij reads as w~_ij (1 + a_ij):
    y = W~ x+ - (W~ o (1 + A)) x-  =  W~ x - (W~ o A) x-,  with x- = max(-x, 0).
    Returns the second term, -(W~ o A) x-, (batch, out).
    """
    return -torch.nn.functional.linear((-x).clamp(min=0.0), w * a)
