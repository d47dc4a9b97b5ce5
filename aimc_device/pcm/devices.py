"""Sampling PCM devices: programming, drift, 1/f read noise and faults, on numpy arrays.

The heavy work runs in fused, parallel Numba kernels (``_kernels.py``); these wrappers check
input, choose the kernel for the dtype and keep what is drawn once (programming error, drift
exponent, faults) in a :class:`ProgrammedState` apart from what each read draws.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-12.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .._random import derive_key
from . import _kernels as K
from .empirical import EmpiricalModel, EmpiricalState
from .formulas import (
    X_FLOOR,
    log_time,
    read_noise_q,
    read_noise_time_factor,
    stuck_conductance,
    training_noise_std,
)
from .params import PCMModel

__all__ = ["ProgrammedState", "program", "read", "perturb", "draw_faults", "check_conductance",
           "programmed_conductance"]


def check_conductance(g, name: str = "g_target", model: PCMModel | None = None,
                      signed: bool = False, unit: float = 1.0) -> np.ndarray:
    """Validate a conductance array [S] (or in units of ``unit`` siemens): finite, non-negative
    unless ``signed``; float32/float64.

    Raises
    ------
    ValueError
        Naming ``name`` and what is wrong.
    """
    return _checked_range(g, name, model, signed, unit)[0]


def _checked_range(g, name, model, signed, unit):
    """check_conductance's array and its largest magnitude [units of ``unit``]."""
    arr = np.asarray(g)
    if arr.dtype not in (np.float32, np.float64):
        if not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name}: expected a numeric array of conductances [S], "
                            f"got {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.size == 0:
        return arr, 0.0
    lo, hi = arr.min(), arr.max()  # two SIMD passes; NaN propagates into both
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name}: contains NaN or inf; conductances must be finite [S]")
    if not signed and lo < 0:
        raise ValueError(f"{name}: negative conductance {lo * unit:.3g} S; conductances are "
                         ">= 0 (use the sign of the weight for the differential pair)")
    top = float(max(-lo, hi))
    if model is not None and top * unit > 10 * model.g_max:
        raise ValueError(f"{name}: values up to {top * unit:.3g} S exceed 10 x g_max = "
                         f"{10 * model.g_max:.3g} S; pass conductances in siemens, not uS")
    return arr, top


@dataclass(frozen=True)
class ProgrammedState:
    """What is drawn once when devices are programmed: numpy arrays from :func:`program`, torch
    tensors from :func:`aimc_device.pcm.torch_ops.program_torch`.

    Attributes
    ----------
    g_target : ndarray, target conductance [S]
    g_prog : ndarray, programmed conductance right after programming, g_P [S] (Eq. 7, >= 0)
    nu : ndarray, drift exponent per device, dimensionless (Eq. 9)
    stuck : ndarray of bool or None, devices stuck at their programmed value (faults)
    q_read : ndarray or None, the device's relative read-noise amplitude Q_s (Eq. 10),
        dimensionless, computed at programming for the model ``q_model`` names; :func:`read`
        uses it when it reads with a model of the same read-noise parameters, else recomputes
    q_model : tuple or None, (g_max, coefficient, exponent, cap, reference) behind ``q_read``

    :func:`program` allocates g_target (a copy), g_prog, nu and q_read as rows of one block: one
    allocation instead of four, which the allocator reuses from one programming to the next
    (fresh multi-MB arrays cost more in first-touch page faults than the sampling itself). The
    block lives as long as any of them does.
    """

    g_target: np.ndarray
    g_prog: np.ndarray
    nu: np.ndarray
    stuck: np.ndarray | None = None
    q_read: np.ndarray | None = None
    q_model: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.g_target.shape


def read_noise_key(model: PCMModel) -> tuple:
    """The parameters of a model that the read-noise amplitude Q_s depends on."""
    return (model.g_max, model.read_noise_coeff, model.read_noise_exponent,
            model.read_noise_max, model.read_noise_reference)


def _flat(a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype).reshape(-1)


def draw_faults(n: int, model: PCMModel, rng=None):
    """Which of ``n`` devices are stuck, and at what conductance (the fault model of
    :func:`formulas.stuck_conductance`: stuck at 0 S, at g_max or at a uniform conductance in
    [0, g_max], with the model's fractions).

    Device i's fault depends on (seed, i) only: the same on any thread count, and the same for
    device i whatever ``n`` is.

    Parameters
    ----------
    n : int, number of devices
    model : PCMModel
    rng : int, numpy.random.Generator or None

    Returns
    -------
    (stuck, g_stuck) : bool ndarray (n,) and float64 ndarray (n,) [S], or None when the model
    has no faults.
    """
    if not model.has_faults:
        return None
    return _faults(int(n), model, derive_key(rng))


def _faults(n: int, model: PCMModel, key):
    u_kind, u_value = np.empty(n), np.empty(n)
    K.fault_uniforms(key, u_kind, u_value)
    return stuck_conductance(u_kind, u_value, model)


def program(g_target, model: PCMModel, rng=None, faults=None) -> ProgrammedState:
    """Program devices to target conductances: draw the programming error and drift exponents.

    g_P = max(g^ + sigma_P(g^) xi, 0) (Eq. 7, clipped: a conductance is never negative);
    nu ~ Normal(mu_nu(x), sigma_nu(x)) (Eq. 9), fixed for the life of the device. Stuck devices
    (faults) hold their stuck conductance, and neither drift nor show read noise.

    Parameters
    ----------
    g_target : ndarray, target conductance [S], any shape, >= 0
    model : PCMModel
    rng : int, numpy.random.Generator or None
        Seed or generator; the same seed gives the same bits on any number of threads.
    faults : (stuck, g_stuck) or None
        The devices' faults, bool and [S] arrays of g_target's size (e.g. a selection from
        :func:`draw_faults` when the devices are part of a larger set); None: drawn here for
        the devices in flat order (:func:`draw_faults` with this call's seed) when the model
        has faults.

    Returns
    -------
    ProgrammedState, arrays of g_target's shape and float dtype (float32 stays float32);
    an :class:`EmpiricalState` for an :class:`EmpiricalModel` (see its ``program``).
    """
    if isinstance(model, EmpiricalModel):
        return model.program(g_target, rng)
    g = check_conductance(g_target, "g_target", model)
    shape, dtype = g.shape, g.dtype
    key = derive_key(rng)
    flat = _flat(g, dtype)
    # One block for the state's four arrays (fewer, larger first-touch faults).
    block = np.empty((4, flat.size), dtype=flat.dtype)
    g_copy, g_prog, nu, q = block
    np.copyto(g_copy, flat)
    c0, c1, c2 = model.prog_coeffs
    (ma, mb), (mlo, mhi) = model.drift_mean_coeffs, model.drift_mean_bounds
    (sa, sb), (slo, shi) = model.drift_std_coeffs, model.drift_std_bounds
    K.program_kernel(flat, model.g_max, c0, c1, c2, ma, mb, mlo, mhi, sa, sb, slo, shi,
                     model.read_noise_coeff, model.read_noise_exponent, model.read_noise_max,
                     model.read_noise_reference == "programmed", X_FLOOR, key, g_prog, nu, q)
    if faults is None and model.has_faults:
        faults = _faults(flat.size, model, key)  # stream STREAM_FAULT of the key
    stuck = None
    if faults is not None:
        stuck_flat, g_stuck = (np.asarray(a).reshape(-1) for a in faults)
        if stuck_flat.size != flat.size or g_stuck.size != flat.size:
            raise ValueError(f"faults: {stuck_flat.size} and {g_stuck.size} values for "
                             f"{flat.size} devices; give one (stuck, g_stuck) pair per device")
        stuck_flat = stuck_flat.astype(bool)
        g_prog[stuck_flat] = g_stuck[stuck_flat]
        nu[stuck_flat] = 0.0
        stuck = stuck_flat.reshape(shape)
    return ProgrammedState(g_target=g_copy.reshape(shape),
                           g_prog=g_prog.reshape(shape), nu=nu.reshape(shape), stuck=stuck,
                           q_read=q.reshape(shape), q_model=read_noise_key(model))


def programmed_conductance(state, model, rng=None) -> np.ndarray:
    """The conductance of programmed devices right after programming [S], for either family.

    PCM: g_P of Eq. 7 (no drift and, as in [1] at t = 0, no read noise; nothing is drawn).
    Empirical: one read at t = 0 (:meth:`EmpiricalModel.read`), i.e. a draw from the first
    measured time's distribution: a measured distribution is that of a read, there is no
    conductance without its read noise to give.

    Parameters
    ----------
    state : ProgrammedState or EmpiricalState, from :func:`program`
    model : PCMModel or EmpiricalModel, the model that programmed ``state``
    rng : int, numpy.random.Generator or None (used by the empirical family only)

    Returns
    -------
    ndarray, conductance [S], the state's shape and dtype.
    """
    if isinstance(state, EmpiricalState):
        return read(state, 0.0, model, rng)
    return state.g_prog


def read(state: ProgrammedState, t: float, model: PCMModel, rng=None) -> np.ndarray:
    """Conductance t seconds after programming: drift plus 1/f read noise (Eqs. 8-12).

    g_D = g_P ((t + t0)/t0)^(-nu); g = max(g_D + |g_D| Q_s(x_ref) sqrt(ln((t_eff + T_read) /
    (2 T_read))) xi, 0), with x_ref and t_eff set by ``model.read_noise_reference`` and
    ``model.read_noise_time``. Stuck devices return their stuck value.

    Parameters
    ----------
    state : ProgrammedState
    t : float, time since the end of programming [s], >= 0
    model : PCMModel
    rng : int, numpy.random.Generator or None

    Returns
    -------
    ndarray, conductance [S], same shape and dtype as ``state.g_prog``.
    An :class:`EmpiricalModel` reads an :class:`EmpiricalState` (see its ``read``).
    """
    if isinstance(model, EmpiricalModel) or isinstance(state, EmpiricalState):
        if not isinstance(model, EmpiricalModel):
            raise TypeError("model: the state was programmed with an EmpiricalModel; read it "
                            "with that model")
        return model.read(state, t, rng)
    t = float(t)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"t = {t!r}: the time since programming must be finite and >= 0 [s]")
    key = derive_key(rng)
    dtype = state.g_prog.dtype
    g_prog = _flat(state.g_prog, dtype)
    nu = _flat(state.nu, dtype)
    if state.q_read is not None and state.q_model == read_noise_key(model):
        q = _flat(state.q_read, dtype)
    else:  # programmed with other read-noise parameters (or restored without Q_s)
        g_ref = state.g_target if model.read_noise_reference == "target" else state.g_prog
        q = _flat(read_noise_q(np.asarray(g_ref, dtype=np.float64) / model.g_max, model), dtype)
    out = np.empty_like(g_prog)
    K.read_kernel(g_prog, nu, q, log_time(t, model.t0),
                  read_noise_time_factor(t, model), key, out)
    if state.stuck is not None:
        s = state.stuck.reshape(-1)
        out[s] = g_prog[s]
    return out.reshape(state.g_prog.shape)


def perturb(g, model: PCMModel, t: float = 20.0, scale: float = 1.0, rng=None) -> np.ndarray:
    """Hardware-aware training noise: programming noise plus t seconds of 1/f read noise, no drift.

    out = g + scale * (sigma_P(|g|) xi_1 + |g| Q_s(|g|/g_max) sqrt(ln((t + T_read)/(2 T_read)))
    xi_2), docs/model.md section 8, drawn as one Gaussian of the summed variance whose standard
    deviation is interpolated in a table of the formulas (see :func:`_noise_std_table` for its
    accuracy). ``g`` may be signed (the sign of the weight).

    Parameters
    ----------
    g : ndarray, signed conductance [S]
    model : PCMModel
    t : float, read-noise time [s]; 20 s in [1]
    scale : float, noise scale (the ramped HWA hyper-parameter), dimensionless
    rng : int, numpy.random.Generator or None

    Returns
    -------
    ndarray, perturbed signed conductance [S], same shape and dtype as ``g``.
    """
    arr = np.asarray(g)
    return perturb_flat(arr.reshape(-1), model, t, scale, rng).reshape(arr.shape)


#: Intervals of the tabulated training-noise standard deviation (see :func:`_noise_std_table`).
NOISE_TABLE_SIZE = 16384


@functools.lru_cache(maxsize=32)
def _noise_std_table(model: PCMModel, t: float, dtype: str, top: float,
                     unit: float) -> np.ndarray:
    """sqrt(sigma_P^2 + sigma_read^2) of :func:`formulas.training_noise_std` on
    NOISE_TABLE_SIZE + 1 equidistant |g| in [0, top], conductances and result in units of
    ``unit`` siemens.

    The kernel interpolates linearly, so the perturbation costs one table lookup per device
    instead of a power and a dozen array passes. The standard deviation is smooth in |g| but
    for the kink where the read-noise amplitude reaches its clip (Eq. 10) and the steep
    |g|^(1 + exponent) near 0: for the preset the relative error is below 2e-4 up to |g| =
    2 g_max (the range of trained weights, one table of span 2 g_max) and below 5e-3 up to the
    10 g_max the input checks allow (spans of 4 to 16 g_max), largest at the clip (tested).
    """
    grid = np.linspace(0.0, top, NOISE_TABLE_SIZE + 1) * unit  # [S]
    if isinstance(model, EmpiricalModel):  # its own Gaussian-equivalent std
        std = model.training_noise_std(grid, t)
    else:
        std = np.hypot(*training_noise_std(grid, t, model))  # Eqs. 7, 10-11
    table = (std / unit).astype(dtype)
    table.flags.writeable = False
    return table


def perturb_flat(g: np.ndarray, model: PCMModel, t: float = 20.0, scale: float = 1.0,
                 rng=None, unit: float = 1.0) -> np.ndarray:
    """:func:`perturb` on a 1-d C-ordered float32/float64 array of signed conductances in units
    of ``unit`` siemens (1: siemens; ``model.g_max``: normalised weights), result in the same
    units: g + scale sqrt(sigma_P^2 + sigma_read^2)(|g|) xi, the two independent Gaussian errors
    drawn as one. The variate of device i depends on (seed, i) only: the same on any thread
    count."""
    g, top = _checked_range(g, "g", model, True, unit)
    g = np.ascontiguousarray(g)
    out = np.empty_like(g)
    if g.size == 0:
        return out
    # table range: a power-of-two multiple of g_max covering the largest |g| (a few tables)
    g_max_u = model.g_max / unit
    span = g_max_u * 2.0 ** max(0, math.ceil(math.log2(max(top / g_max_u, 1e-30))))
    table = _noise_std_table(model, float(t), g.dtype.str, span, float(unit))
    ft = g.dtype.type
    K.perturb_kernel(g, table, ft(NOISE_TABLE_SIZE / span), ft(scale), derive_key(rng), out)
    return out
