"""Virtual measurement campaigns: what a lab would measure on devices that follow a PCMModel.

The result is an ``xarray.Dataset`` in the measurement schema of ``docs/measurement-format.md``
(the same one :func:`aimc_device.io.read_measurements` returns):

- dims ``device`` (N), ``time`` (T), ``repeat`` (R);
- ``g_target(device)`` [S], target conductance of each device;
- ``g(device, time, repeat)`` [S], conductance read at ``time`` seconds after the end of
  programming, R repeated reads per time (each with its own 1/f read-noise draw);
- coordinate ``time(time)`` [s], strictly increasing;
- attrs ``g_max`` [S], ``t0`` [s] (duration of programming), ``t_read`` [s],
  ``reference_temperature`` [K] and metadata;
- optionally (schema version 2) ``read_time(device, time)`` [s] per-device read times,
  ``temperature(time)`` [K] of the interval that ends with each read, and NaN for reads not
  taken.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np
import xarray as xr

from .._random import as_generator
from .devices import ProgrammedState, program, read
from .formulas import equivalent_time
from .params import PCMModel

__all__ = ["simulate_campaign", "DEFAULT_READ_TIMES"]

#: Read times of the default campaign [s]: from 1 s to about 1 day after programming.
DEFAULT_READ_TIMES = (1.0, 10.0, 100.0, 1000.0, 10000.0, 86400.0)


def simulate_campaign(model: PCMModel, levels: int | np.ndarray = 20,
                      devices_per_level: int = 2000, times=DEFAULT_READ_TIMES, repeats: int = 8,
                      rng=None, dtype=np.float32, name: str = "virtual campaign", *,
                      temperature=None, missing: float = 0.0) -> xr.Dataset:
    """Simulate a PCM measurement campaign from a device model.

    Parameters
    ----------
    model : PCMModel
        Its ``activation_energy`` [eV] and ``reference_temperature`` [K] map the intervals at
        other temperatures to equivalent times (:func:`~aimc_device.pcm.equivalent_time`).
    levels : int or array
        Number of target levels, spread evenly over (0, g_max] as x_k = k / levels, or the
        relative targets x = g/g_max themselves (dimensionless, in (0, 1]).
    devices_per_level : int
        Devices programmed to each level.
    times : array (T,) or (N, T)
        Read times after the end of programming [s], strictly increasing; one row for all
        devices, or one row per device (N = levels x devices_per_level; devices with equal rows
        are read together).
    repeats : int
        Repeated reads at each time (1: one read per time).
    rng : int, numpy.random.Generator or None
    dtype : numpy dtype of the conductances (float32 keeps files small).
    name : str
        Stored as the ``source`` attribute.
    temperature : array (T,), optional
        Temperature during the interval that ends with each read [K] (a bake: a step of
        elevated temperature); default: every interval at ``model.reference_temperature``.
        Devices are read as after the equivalent time at the reference temperature.
    missing : float
        Fraction of reads left out at random (NaN, "not read"), in [0, 1).

    Returns
    -------
    xarray.Dataset in the measurement schema (see module docstring); ``schema_version`` 2 with
    a ``read_time(device, time)`` [s] variable (per-device times; the coordinate ``time`` is
    their per-column median), ``temperature(time)`` [K] and NaN for missing reads when used.
    """
    gen = as_generator(rng)
    x = (np.arange(1, int(levels) + 1) / int(levels) if np.ndim(levels) == 0
         else np.asarray(levels, dtype=float))
    if np.any(x <= 0) or np.any(x > 1):
        raise ValueError("levels: relative targets must lie in (0, 1]")
    if devices_per_level < 1 or repeats < 1:
        raise ValueError("devices_per_level and repeats must be >= 1")
    n = x.size * int(devices_per_level)
    times = np.asarray(times, dtype=float)
    if times.ndim not in (1, 2) or (times.ndim == 2 and times.shape[0] != n) or \
            np.any(np.diff(times, axis=-1) <= 0) or np.any(times < 0) or times.shape[-1] == 0:
        raise ValueError(f"times: read times of shape (T,) or (N={n}, T), >= 0 and strictly "
                         "increasing along T [s]")
    t_n = times.shape[-1]
    if temperature is not None:
        temperature = np.asarray(temperature, dtype=float)
        if temperature.shape != (t_n,) or not np.all(temperature > 0):
            raise ValueError(f"temperature: {t_n} positive temperatures [K], one per read time")
    if not 0.0 <= missing < 1.0:
        raise ValueError("missing: a fraction of reads in [0, 1)")
    g_target = np.repeat(x * model.g_max, devices_per_level).astype(dtype)
    state = program(g_target, model, rng=gen)
    t_eq = equivalent_time(times, temperature, model.activation_energy,
                           model.reference_temperature)
    g = np.empty((g_target.size, t_n, repeats), dtype=dtype)
    if t_eq.ndim == 1:
        _read_block(g, state, t_eq, model, gen)
    else:  # devices with the same read times together
        rows, inverse = np.unique(t_eq, axis=0, return_inverse=True)
        for j, row in enumerate(rows):
            idx = np.flatnonzero(inverse.reshape(-1) == j)
            block = np.empty((idx.size, t_n, repeats), dtype=dtype)
            _read_block(block, _subset(state, idx), row, model, gen)
            g[idx] = block
    if missing > 0:
        g[gen.random(g.shape) < missing] = np.nan
    data_vars = {
        "g_target": (("device",), g_target, {"units": "S", "long_name": "target conductance"}),
        "g": (("device", "time", "repeat"), g,
              {"units": "S", "long_name": "conductance read after programming"}),
    }
    nominal = times
    if times.ndim == 2:
        nominal = np.median(times, axis=0)
        data_vars["read_time"] = (("device", "time"), times,
                                  {"units": "s", "long_name": "read time of each device"})
    if temperature is not None:
        data_vars["temperature"] = (("time",), temperature, {
            "units": "K", "long_name": "temperature of the interval ending with the read"})
    v2 = times.ndim == 2 or temperature is not None or missing > 0
    ds = xr.Dataset(
        data_vars=data_vars,
        coords={
            "device": np.arange(g_target.size),
            "time": ("time", nominal, {"units": "s", "long_name": "time since end of programming"}),
            "repeat": np.arange(repeats),
        },
        attrs={
            "schema": "aimc-device/pcm-campaign",
            "schema_version": 2 if v2 else 1,
            "g_max": model.g_max, "g_max_units": "S",
            "t0": model.t0, "t0_units": "s",
            "t_read": model.t_read, "t_read_units": "s",
            "reference_temperature": model.reference_temperature,
            "reference_temperature_units": "K",
            "technology": "PCM (simulated)",
            "source": name,
            "device_model": model.name,
            "date": _dt.date.today().isoformat(),
        },
    )
    return ds


def _read_block(out: np.ndarray, state: ProgrammedState, t_eq: np.ndarray, model: PCMModel,
                gen: np.random.Generator) -> None:
    """Fill ``out`` (n, T, R) with reads of ``state`` at the times ``t_eq`` [s]."""
    for k, t in enumerate(t_eq):
        for r in range(out.shape[2]):
            out[:, k, r] = read(state, t, model, rng=gen)


def _subset(state: ProgrammedState, idx: np.ndarray) -> ProgrammedState:
    """The devices ``idx`` of a programmed state."""
    pick = (lambda a: None if a is None else a[idx])  # noqa: E731
    return ProgrammedState(g_target=state.g_target[idx], g_prog=state.g_prog[idx],
                           nu=state.nu[idx], stuck=pick(state.stuck), q_read=pick(state.q_read),
                           q_model=state.q_model)
