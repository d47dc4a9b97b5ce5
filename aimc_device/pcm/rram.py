"""Synthetic RRAM-like measurement campaigns: a test device unlike PCM, for the empirical family.

:func:`simulate_rram_campaign` returns a campaign in the in-memory schema (the one
:func:`aimc_device.io.read_measurements` returns, version 2 features included): one read per
device and time by default, a bake (an interval at an elevated temperature), a few dead cells,
missing reads (NaN) and, optionally, per-device read times.

The device is **synthetic**: its parameters (:class:`RRAMCampaignParams`) are round numbers chosen
to show, qualitatively, what retention measurements of filamentary HfO2 RRAM after write-verify
report -- conductance relaxation toward intermediate states (low states drift up, high states
down, state-dependent), distributions that broaden with log time, heavy tails [1, 2] -- and the
Arrhenius acceleration used by bake tests [3]. They are not fitted to any measured device and
are no statement about a real technology.

The model of one device i with relative target x (g = x g_max) at equivalent time t_eq:

- after write-verify: g_0 / g_max = x + sigma_p(x) T_i, T_i a Student-t variate of
  ``prog_dof`` degrees of freedom scaled to unit variance (heavy tails), sigma_p = a + b x;
- relaxation toward ``relax_center`` x_c, with a per-device lognormal amplitude A_i (mean 1,
  log-spread ``relax_shape``: skewed toward x_c):
  mu_i(t) = -rate (x - x_c) A_i L(t), L(t) = ln(1 + t_eq / tau);
- broadening: a Brownian motion in L with state-dependent amplitude sigma_w(x) = w (4 x (1 - x))
  + w_floor, so ranks decorrelate with log time;
- read noise: Gaussian, sigma_r(x) = c + d x, new for every read;
- dead cells (fraction ``dead_fraction``) read |N(0, dead_level)| g_max at every time;
- missing reads: a fraction ``missing_fraction`` of the (device, time) reads is NaN.

Equivalent time at the reference temperature T_ref of an interval dt at temperature T [3]:
dt exp(E_a / k_B (1 / T_ref - 1 / T)); t_eq of read k sums the intervals up to it.

References
----------
.. [1] W. Wan et al., "A compute-in-memory chip based on resistive random-access memory",
   Nature 608, 504 (2022), doi:10.1038/s41586-022-04992-8 (conductance relaxation after
   write-verify in HfO2 RRAM).
.. [2] Y. Zhao et al., "Investigation of statistical retention of filamentary analog RRAM for
   neuromorphic computing", IEEE IEDM (2017), 39.4 (state-dependent relaxation and broadening
   of multilevel HfO2 RRAM distributions with time and bake).
.. [3] JEDEC JEP122H, "Failure Mechanisms and Models for Semiconductor Devices" (2016),
   Arrhenius acceleration factor of temperature-accelerated tests.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import xarray as xr
from .._random import as_generator
from .formulas import equivalent_time

__all__ = ["RRAMCampaignParams", "simulate_rram_campaign", "DEFAULT_RRAM_TIMES",
           "DEFAULT_RRAM_TEMPERATURES"]

#: Wall-clock read times of the default campaign [s]: five reads at room temperature, one after
#: a 30-minute bake, one a day after programming.
DEFAULT_RRAM_TIMES = (1.0, 10.0, 100.0, 1000.0, 3600.0, 5400.0, 86400.0)
#: Temperature of the interval ending with each read [K]: the sixth interval is the bake at 80 C.
DEFAULT_RRAM_TEMPERATURES = (300.0, 300.0, 300.0, 300.0, 300.0, 353.15, 300.0)


@dataclass(frozen=True)
class RRAMCampaignParams:
    """Parameters of the synthetic RRAM-like test device (module docstring); not a real device.

    Attributes
    ----------
    g_max : float, conductance of x = 1 [S]
    x_min : float, lowest relative target of the default levels, dimensionless
    t0 : float, duration of write-verify programming [s]
    t_read : float, duration of one read [s]
    prog_std : (a, b), sigma_p(x) = a + b x after write-verify, relative to g_max
    prog_dof : float, Student-t degrees of freedom of the programming error (> 2)
    relax_center : float, relative conductance x_c the states relax toward
    relax_rate : float, relaxation per unit of L = ln(1 + t_eq / tau) and of (x - x_c)
    relax_tau : float, time scale tau of L [s]
    relax_shape : float, log-spread of the lognormal relaxation amplitude A_i (mean 1)
    broaden : (w, w_floor), Brownian amplitude per sqrt(L): w 4 x (1 - x) + w_floor, relative
    read_noise : (c, d), read-noise std sigma_r = c + d x, relative to g_max
    dead_fraction : float, fraction of dead cells
    dead_level : float, dead cells read |N(0, dead_level)|, relative to g_max
    missing_fraction : float, fraction of (device, time) reads missing (NaN)
    activation_energy : float, Arrhenius activation energy of the relaxation [eV]
    reference_temperature : float, temperature the equivalent times refer to [K]
    """

    g_max: float = 100e-6
    x_min: float = 0.1
    t0: float = 1.0
    t_read: float = 1e-6
    prog_std: tuple[float, float] = (0.004, 0.008)
    prog_dof: float = 4.0
    relax_center: float = 0.45
    relax_rate: float = 0.012
    relax_tau: float = 1.0
    relax_shape: float = 0.6
    broaden: tuple[float, float] = (0.006, 0.001)
    read_noise: tuple[float, float] = (0.0005, 0.003)
    dead_fraction: float = 0.005
    dead_level: float = 0.002
    missing_fraction: float = 0.01
    activation_energy: float = 1.0
    reference_temperature: float = 300.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prog_std", tuple(float(v) for v in self.prog_std))
        object.__setattr__(self, "broaden", tuple(float(v) for v in self.broaden))
        object.__setattr__(self, "read_noise", tuple(float(v) for v in self.read_noise))
        for name in ("g_max", "t0", "t_read", "relax_tau", "reference_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RRAMCampaignParams.{name} = {getattr(self, name)!r}: must be "
                                 "positive")
        if not self.prog_dof > 2:
            raise ValueError(f"RRAMCampaignParams.prog_dof = {self.prog_dof!r}: needs > 2 "
                             "degrees of freedom (finite variance)")
        for name in ("dead_fraction", "missing_fraction", "x_min"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RRAMCampaignParams.{name} = {getattr(self, name)!r}: must "
                                 "lie in [0, 1]")
        for name in ("prog_std", "broaden", "read_noise"):
            if len(getattr(self, name)) != 2 or min(getattr(self, name)) < 0:
                raise ValueError(f"RRAMCampaignParams.{name} = {getattr(self, name)!r}: two "
                                 "non-negative numbers")
        for name in ("relax_shape", "dead_level", "activation_energy", "relax_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RRAMCampaignParams.{name} = {getattr(self, name)!r}: must "
                                 "be >= 0")


def simulate_rram_campaign(params: RRAMCampaignParams | None = None, levels=16,
                           devices_per_level: int = 500, times=DEFAULT_RRAM_TIMES,
                           temperatures=DEFAULT_RRAM_TEMPERATURES, repeats: int = 1,
                           read_time_jitter: float = 0.0, rng=None, dtype=np.float32,
                           name: str = "synthetic RRAM-like campaign") -> xr.Dataset:
    """Simulate a campaign of the synthetic RRAM-like test device (module docstring).

    Parameters
    ----------
    params : RRAMCampaignParams, optional (default: the defaults)
    levels : int or array
        Number of target levels, spread evenly over [x_min, 1], or the relative targets x =
        g_target / g_max themselves (in (0, 1]).
    devices_per_level : int
    times : sequence of float, wall-clock read times since the end of programming [s],
        strictly increasing
    temperatures : sequence of float or None, temperature of the interval ending with each read
        [K]; None: all at the reference temperature (no bake)
    repeats : int, reads per device and time (each with its own read noise)
    read_time_jitter : float
        Per-device read times: each read happens at tau_k + jitter (tau_k - tau_{k-1}) u, u
        uniform in [-0.5, 0.5] (0: every device is read at ``times``); must be < 1.
    rng : int, numpy.random.Generator or None
    dtype : numpy dtype of the conductances
    name : str, stored as the ``source`` attribute

    Returns
    -------
    xarray.Dataset
        dims device (N), time (T), repeat (R); ``g_target(device)`` [S]; ``g(device, time,
        repeat)`` [S] with NaN for missing reads; coordinate ``time`` [s] (wall clock);
        ``temperature(time)`` [K] when given; ``read_time(device, time)`` [s] with jitter;
        attrs ``g_max`` [S], ``t0`` [s], ``t_read`` [s], ``reference_temperature`` [K],
        ``activation_energy`` [eV], ``schema_version`` 2. The generator's truth, not part of
        the schema: ``equivalent_time`` ((device, time) with jitter, else (time,)) [s] and
        ``dead(device)``.
    """
    p = params or RRAMCampaignParams()
    gen = as_generator(rng)
    x = (np.linspace(p.x_min, 1.0, int(levels)) if np.ndim(levels) == 0
         else np.asarray(levels, dtype=float))
    if np.any(x <= 0) or np.any(x > 1):
        raise ValueError("levels: relative targets must lie in (0, 1]")
    tau = np.asarray(times, dtype=float)
    if tau.ndim != 1 or tau.size == 0 or np.any(np.diff(tau) <= 0) or tau[0] < 0:
        raise ValueError("times: read times must be >= 0 and strictly increasing [s]")
    temp = (np.full(tau.size, p.reference_temperature) if temperatures is None
            else np.asarray(temperatures, dtype=float))
    if temp.shape != tau.shape or np.any(temp <= 0):
        raise ValueError("temperatures: one positive temperature [K] per read time")
    if devices_per_level < 1 or repeats < 1:
        raise ValueError("devices_per_level and repeats must be >= 1")
    if not 0.0 <= read_time_jitter < 1.0:
        raise ValueError("read_time_jitter: must lie in [0, 1)")
    n = x.size * devices_per_level
    xi = np.repeat(x, devices_per_level)
    if read_time_jitter > 0:
        gaps = np.diff(tau, prepend=0.0)
        read_times = tau + read_time_jitter * gaps * gen.uniform(-0.5, 0.5, (n, tau.size))
    else:
        read_times = tau
    t_eq = equivalent_time(read_times, temp, p.activation_energy, p.reference_temperature)
    big_l = np.broadcast_to(np.log1p(t_eq / p.relax_tau), (n, tau.size))
    # write-verify: heavy-tailed programming error (unit-variance Student t)
    t_var = gen.standard_t(p.prog_dof, n) / np.sqrt(p.prog_dof / (p.prog_dof - 2.0))
    g0 = xi + (p.prog_std[0] + p.prog_std[1] * xi) * t_var
    # relaxation toward x_c with a lognormal (skewed) amplitude per device
    amp = np.exp(p.relax_shape * gen.standard_normal(n) - 0.5 * p.relax_shape**2)
    mu = -p.relax_rate * ((xi - p.relax_center) * amp)[:, None] * big_l
    # broadening: Brownian motion in L with a state-dependent amplitude
    dl = np.diff(big_l, axis=1, prepend=0.0)
    walk = np.cumsum(np.sqrt(dl) * gen.standard_normal((n, tau.size)), axis=1)
    amp_w = p.broaden[0] * 4.0 * xi * (1.0 - xi) + p.broaden[1]
    g_dev = g0[:, None] + mu + amp_w[:, None] * walk
    sig_r = (p.read_noise[0] + p.read_noise[1] * xi)[:, None, None]
    g = g_dev[:, :, None] + sig_r * gen.standard_normal((n, tau.size, repeats))
    dead = gen.random(n) < p.dead_fraction
    g[dead] = np.abs(p.dead_level * gen.standard_normal((int(dead.sum()), tau.size, repeats)))
    g = np.clip(g, 0.0, None) * p.g_max
    g[gen.random((n, tau.size)) < p.missing_fraction] = np.nan
    g_target = (xi * p.g_max).astype(dtype)
    data_vars = {
        "g_target": (("device",), g_target, {"units": "S", "long_name": "target conductance"}),
        "g": (("device", "time", "repeat"), g.astype(dtype),
              {"units": "S", "long_name": "conductance read after programming (NaN: not read)"}),
        "temperature": (("time",), temp, {"units": "K", "long_name": "temperature of the "
                                          "interval ending with the read"}),
        "dead": (("device",), dead, {"long_name": "dead cell (generator truth)"}),
    }
    eq_dims = ("device", "time") if read_time_jitter > 0 else ("time",)
    data_vars["equivalent_time"] = (eq_dims, t_eq, {
        "units": "s", "long_name": "equivalent time at the reference temperature (generator "
        "truth)"})
    if read_time_jitter > 0:
        data_vars["read_time"] = (("device", "time"), read_times,
                                  {"units": "s", "long_name": "read time since programming"})
    return xr.Dataset(
        data_vars=data_vars,
        coords={
            "time": ("time", tau, {"units": "s", "long_name": "time since end of programming"}),
            "repeat": np.arange(repeats),
        },
        attrs={
            "schema": "aimc-device/pcm-campaign",
            "schema_version": 2,
            "g_max": p.g_max, "g_max_units": "S",
            "t0": p.t0, "t0_units": "s",
            "t_read": p.t_read, "t_read_units": "s",
            "reference_temperature": p.reference_temperature,
            "reference_temperature_units": "K",
            "activation_energy": p.activation_energy, "activation_energy_units": "eV",
            "technology": "RRAM-like (synthetic test device)",
            "source": name,
            "date": _dt.date.today().isoformat(),
        },
    )
