"""Deterministic formulas of the PCM model (docs/model.md 4), for numpy arrays and torch tensors.

Each function takes an array of any shape (numpy ndarray or torch tensor, float32 or float64) and
returns the same kind of array. These are the statistics' single definition: the sampling kernels
(``_kernels.py``, Numba, fused) restate them in scalar form for speed and are tested against these
functions; the torch sampler (``torch_ops.py``) calls these directly.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-11.
.. [2] JEDEC JEP122, "Failure Mechanisms and Models for Semiconductor Devices" (Arrhenius
   acceleration factor of a thermally activated mechanism).
.. [3] D. Ielmini, S. Lavizzari, D. Sharma, A. L. Lacaita, Appl. Phys. Lett. 92(19) (2008),
   doi:10.1063/1.2930680; D. Ielmini et al., IEEE Trans. Electron Devices 56(5), 1070-1077
   (2009), doi:10.1109/TED.2009.2016397: temperature acceleration of the structural relaxation
   (drift) of PCM.
"""
from __future__ import annotations

import math

import numpy as np

from .params import PCMModel

__all__ = [
    "relative_conductance",
    "programming_noise_std",
    "drift_exponent_stats",
    "log_time",
    "drift_factor",
    "read_noise_q",
    "read_noise_time_factor",
    "read_noise_std",
    "training_noise_std",
    "BOLTZMANN_EV",
    "arrhenius_factor",
    "equivalent_time",
    "stuck_conductance",
]

#: Boltzmann constant [eV/K] (CODATA, exact since the 2019 SI: k / e).
BOLTZMANN_EV = 1.380649e-23 / 1.602176634e-19

#: Smallest relative conductance put into a logarithm or a negative power, dimensionless; below
#: it the clip bounds of the formulas are reached anyway (ln x -> -inf gives the upper clip of
#: mu_nu and sigma_nu; x^-0.65 -> inf gives the cap of Q_s). Representable in float32.
X_FLOOR = 1e-12


def _xp(a):
    """The array namespace of ``a``: torch for tensors, numpy otherwise."""
    if type(a).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _as_array(a):
    xp = _xp(a)
    return a if xp is not np else np.asarray(a, dtype=np.result_type(a, np.float32))


def relative_conductance(g, model: PCMModel):
    """x = |g| / g_max, floored at a tiny positive number for logs and powers.

    Parameters
    ----------
    g : array, conductance [S]
    model : PCMModel

    Returns
    -------
    array, x, dimensionless, in (0, inf)
    """
    g = _as_array(g)
    xp = _xp(g)
    return xp.clip(xp.abs(g) / model.g_max, X_FLOOR, None)


def programming_noise_std(g_target, model: PCMModel):
    """Standard deviation of the programming error, sigma_P (Eq. 7).

    sigma_P(x) = c0 + c1 x + c2 x^2 with x = g_target / g_max.

    Parameters
    ----------
    g_target : array, target conductance [S]
    model : PCMModel

    Returns
    -------
    array, sigma_P [S]
    """
    g_target = _as_array(g_target)
    x = _xp(g_target).abs(g_target) / model.g_max
    c0, c1, c2 = model.prog_coeffs
    return c0 + x * (c1 + x * c2)  # Eq. 7


def drift_exponent_stats(g_target, model: PCMModel):
    """Mean and standard deviation of the drift exponent nu (Eq. 9).

    mu_nu = clip(a ln x + b, lo, hi), sigma_nu = clip(a' ln x + b', lo', hi').

    Parameters
    ----------
    g_target : array, target conductance [S]
    model : PCMModel

    Returns
    -------
    (mean, std) : arrays, dimensionless
    """
    x = relative_conductance(g_target, model)
    xp = _xp(x)
    lnx = xp.log(x)
    a, b = model.drift_mean_coeffs
    sa, sb = model.drift_std_coeffs
    mean = xp.clip(a * lnx + b, *model.drift_mean_bounds)  # Eq. 9, mean
    std = xp.clip(sa * lnx + sb, *model.drift_std_bounds)  # Eq. 9, spread
    return mean, std


def log_time(t, t0: float):
    """The drift law's time variable L = ln((t + t0) / t0) (Eq. 8), dimensionless.

    Parameters
    ----------
    t : float or array, time since the end of programming [s], >= 0
    t0 : float, duration of programming [s], > 0

    Returns
    -------
    float for a scalar t, else a float64 array of t's shape.
    """
    if np.ndim(t) == 0:
        return math.log1p(float(t) / t0)
    return np.log1p(np.asarray(t, dtype=np.float64) / t0)


def drift_factor(nu, t, model: PCMModel):
    """Drift attenuation ((t + t0) / t0)^(-nu) (Eq. 8).

    Parameters
    ----------
    nu : array, drift exponent, dimensionless
    t : float, time since the end of programming [s], >= 0
    model : PCMModel

    Returns
    -------
    array, g_D / g_P, dimensionless
    """
    nu = _as_array(nu)
    xp = _xp(nu)
    return xp.exp(-nu * log_time(t, model.t0))  # Eq. 8


def read_noise_q(x_ref, model: PCMModel):
    """Relative 1/f read-noise amplitude Q_s(x) = min(coeff x^exponent, max) (Eq. 10).

    Parameters
    ----------
    x_ref : array, relative conductance g/g_max, dimensionless
    model : PCMModel

    Returns
    -------
    array, Q_s, dimensionless
    """
    x_ref = _as_array(x_ref)
    xp = _xp(x_ref)
    x = xp.clip(xp.abs(x_ref), X_FLOOR, None)
    # coeff x^exponent as exp(exponent ln x): SIMD log and exp in numpy and torch (their
    # non-integer power is a slower scalar path; 200k float32 in torch 0.18 ms -> 0.05 ms)
    return xp.clip(model.read_noise_coeff * xp.exp(model.read_noise_exponent * xp.log(x)), None,
                   model.read_noise_max)  # Eq. 10


def read_noise_time_factor(t: float, model: PCMModel) -> float:
    """sqrt(ln((t_eff + T_read) / (2 T_read))) of Eq. 11, with t_eff per ``model.read_noise_time``.

    Parameters
    ----------
    t : float, time since the end of programming [s]
    model : PCMModel

    Returns
    -------
    float, dimensionless; 0 where the log would be negative (t_eff < T_read).
    """
    t_eff = float(t) + (model.t0 if model.read_noise_time == "t_plus_t0" else 0.0)
    return float(np.sqrt(max(np.log((t_eff + model.t_read) / (2.0 * model.t_read)), 0.0)))


def read_noise_std(g, t: float, model: PCMModel, g_ref=None):
    """Standard deviation of the 1/f read noise at time t (Eq. 11).

    sigma_read = |g| * Q_s(x_ref) * sqrt(ln((t_eff + T_read) / (2 T_read))).

    Parameters
    ----------
    g : array, drifted conductance g_D [S]
    t : float, time since the end of programming [s]
    model : PCMModel
    g_ref : array, optional, conductance [S] that sets Q_s: the target (``read_noise_reference ==
        "target"``) or the programmed one (``"programmed"``). Defaults to ``g``.

    Returns
    -------
    array, sigma_read [S]
    """
    g = _as_array(g)
    xp = _xp(g)
    x_ref = (g if g_ref is None else _as_array(g_ref)) / model.g_max
    return xp.abs(g) * read_noise_q(x_ref, model) * read_noise_time_factor(t, model)  # Eq. 11


def training_noise_std(g, t: float, model: PCMModel):
    """Standard deviations of the HWA training noise (docs/model.md sec. 8): the programming error
    sigma_P(|g|) (Eq. 7) and t seconds of 1/f read noise |g| Q_s(|g| / g_max) tf(t) (Eqs. 10-11
    at g_D = g, no drift).

    Parameters
    ----------
    g : array (numpy or torch), signed conductance [S]
    t : float, read-noise time [s]
    model : PCMModel

    Returns
    -------
    (sigma_P, sigma_read) : arrays like g [S]
    """
    g = _as_array(g)
    a = _xp(g).abs(g)
    sig_r = a * read_noise_q(a / model.g_max, model)
    sig_r *= read_noise_time_factor(t, model)  # Eq. 11
    return programming_noise_std(a, model), sig_r


def arrhenius_factor(temperature, activation_energy: float, reference_temperature: float):
    """Arrhenius acceleration factor AF = exp(E_a / k_B (1/T_ref - 1/T)) [2].

    A time dt spent at temperature T ages a thermally activated process as much as AF dt at
    T_ref; AF > 1 above T_ref, < 1 below it.

    Parameters
    ----------
    temperature : array, temperature T [K], > 0
    activation_energy : float, E_a [eV], >= 0
    reference_temperature : float, T_ref [K], > 0

    Returns
    -------
    array, AF, dimensionless
    """
    temperature = np.asarray(temperature, dtype=np.float64)
    return np.exp(activation_energy / BOLTZMANN_EV
                  * (1.0 / reference_temperature - 1.0 / temperature))


def equivalent_time(t, temperature, activation_energy: float, reference_temperature: float):
    """Equivalent times at T_ref of reads taken after intervals at other temperatures [2, 3].

    t_eq,k = sum_{i <= k} (t_i - t_{i-1}) AF(T_i), with t_{-1} = 0 (the end of programming) and
    T_i the temperature during the interval (t_{i-1}, t_i] that ends with read i.

    Parameters
    ----------
    t : array (..., T), read times since the end of programming [s], increasing along the last
        axis (one row per device, or one row for all)
    temperature : array (T,) or None, temperature of each interval [K]; None: all at T_ref
    activation_energy : float, E_a [eV]
    reference_temperature : float, T_ref [K]

    Returns
    -------
    ndarray (..., T) float64, equivalent times at T_ref [s]
    """
    t = np.asarray(t, dtype=np.float64)
    if temperature is None:
        return t.copy()
    af = arrhenius_factor(temperature, activation_energy, reference_temperature)
    dt = np.diff(t, axis=-1, prepend=0.0)
    return np.cumsum(dt * af, axis=-1)


def stuck_conductance(u_kind, u_value, model: PCMModel):
    """The fault model of one device, from two uniform variates in [0, 1) per device.

    With the model's fractions f0 (stuck at 0 S), f1 (at g_max) and f2 (at a uniform random
    conductance): a device is stuck at 0 S when u_kind < f0, at g_max when f0 <= u_kind <
    f0 + f1, at u_value g_max when f0 + f1 <= u_kind < f0 + f1 + f2, and healthy otherwise.

    Parameters
    ----------
    u_kind, u_value : arrays (numpy or torch) of uniform variates in [0, 1), dimensionless
    model : PCMModel

    Returns
    -------
    (stuck, g_stuck) : bool array, and the stuck conductance [S] (0 where not stuck)
    """
    u_kind, u_value = _as_array(u_kind), _as_array(u_value)
    xp = _xp(u_kind)
    f0, f1, f2 = model.stuck_at_zero, model.stuck_at_gmax, model.stuck_at_random
    stuck = u_kind < f0 + f1 + f2
    at_max = (u_kind >= f0) & (u_kind < f0 + f1)
    at_rand = (u_kind >= f0 + f1) & stuck
    g = xp.where(at_rand, u_value * model.g_max, 0.0)  # at random; 0 S elsewhere
    return stuck, xp.where(at_max, model.g_max, g)
