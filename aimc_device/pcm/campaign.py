"""Virtual measurement campaigns: what a lab would measure on devices that follow a PCMModel.

The result is an ``xarray.Dataset`` in the measurement schema of ``docs/measurement-format.md``
(the same one :func:`aimc_device.io.read_measurements` returns):

- dims ``device`` (N), ``time`` (T), ``repeat`` (R);
- ``g_target(device)`` [S], target conductance of each device;
- ``g(device, time, repeat)`` [S], conductance read at ``time`` seconds after the end of
  programming, R repeated reads per time (each with its own 1/f read-noise draw);
- coordinate ``time(time)`` [s], strictly increasing;
- attrs ``g_max`` [S], ``t0`` [s] (duration of programming), ``t_read`` [s] and metadata.
"""
from __future__ import annotations

import datetime as _dt

import numpy as np
import xarray as xr

from .._random import as_generator
from .devices import program, read
from .params import PCMModel

__all__ = ["simulate_campaign", "DEFAULT_READ_TIMES"]

#: Read times of the default campaign [s]: from 1 s to about 1 day after programming.
DEFAULT_READ_TIMES = (1.0, 10.0, 100.0, 1000.0, 10000.0, 86400.0)


def simulate_campaign(model: PCMModel, levels: int | np.ndarray = 20,
                      devices_per_level: int = 2000, times=DEFAULT_READ_TIMES, repeats: int = 8,
                      rng=None, dtype=np.float32, name: str = "virtual campaign") -> xr.Dataset:
    """Simulate a PCM measurement campaign from a device model.

    Parameters
    ----------
    model : PCMModel
    levels : int or array
        Number of target levels, spread evenly over (0, g_max] as x_k = k / levels, or the
        relative targets x = g/g_max themselves (dimensionless, in (0, 1]).
    devices_per_level : int
        Devices programmed to each level.
    times : sequence of float
        Read times after the end of programming [s], strictly increasing.
    repeats : int
        Repeated reads at each time (for the read noise).
    rng : int, numpy.random.Generator or None
    dtype : numpy dtype of the conductances (float32 keeps files small).
    name : str
        Stored as the ``source`` attribute.

    Returns
    -------
    xarray.Dataset in the measurement schema (see module docstring).
    """
    gen = as_generator(rng)
    x = (np.arange(1, int(levels) + 1) / int(levels) if np.ndim(levels) == 0
         else np.asarray(levels, dtype=float))
    if np.any(x <= 0) or np.any(x > 1):
        raise ValueError("levels: relative targets must lie in (0, 1]")
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or np.any(np.diff(times) <= 0) or np.any(times < 0):
        raise ValueError("times: read times must be >= 0 and strictly increasing [s]")
    if devices_per_level < 1 or repeats < 1:
        raise ValueError("devices_per_level and repeats must be >= 1")
    g_target = np.repeat(x * model.g_max, devices_per_level).astype(dtype)
    state = program(g_target, model, rng=gen)
    g = np.empty((g_target.size, times.size, repeats), dtype=dtype)
    for k, t in enumerate(times):
        for r in range(repeats):
            g[:, k, r] = read(state, t, model, rng=gen)
    ds = xr.Dataset(
        data_vars={
            "g_target": (("device",), g_target, {"units": "S", "long_name": "target conductance"}),
            "g": (("device", "time", "repeat"), g,
                  {"units": "S", "long_name": "conductance read after programming"}),
        },
        coords={
            "device": np.arange(g_target.size),
            "time": ("time", times, {"units": "s", "long_name": "time since end of programming"}),
            "repeat": np.arange(repeats),
        },
        attrs={
            "schema": "aimc-device/pcm-campaign",
            "schema_version": 1,
            "g_max": model.g_max, "g_max_units": "S",
            "t0": model.t0, "t0_units": "s",
            "t_read": model.t_read, "t_read_units": "s",
            "technology": "PCM (simulated)",
            "source": name,
            "device_model": model.name,
            "date": _dt.date.today().isoformat(),
        },
    )
    return ds
