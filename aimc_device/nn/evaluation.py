"""Evaluation over time after programming (MODEL.md section 9).

Program the model, move it to each time after programming (drift, 1/f noise and drift
compensation drawn once per time and held for the whole test set), measure, and repeat with new
device draws; the result is an xarray Dataset.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from .._random import as_generator
from .convert import analog_tiles, drift, forget_programming, program

__all__ = ["PAPER_TIMES", "classification_error", "normalized_accuracy", "standard_error",
           "evaluate_over_time"]

#: 1 s, 1 h, 1 day and 1 year after programming [s] (Rasch et al. 2023, Table 3).
PAPER_TIMES = (1.0, 3600.0, 86400.0, 31536000.0)


@torch.no_grad()
def classification_error(model: nn.Module, data) -> float:
    """Fraction of misclassified samples over an iterable of (inputs, targets) batches."""
    model.eval()
    wrong, total = 0, 0
    for x, y in data:
        out = model(x)
        wrong += int((out.argmax(dim=-1) != y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("classification_error: the data yielded no samples")
    return wrong / total


def standard_error(values, axis: int = -1):
    """Standard error of the mean over ``axis`` (NaN with fewer than two values)."""
    v = np.asarray(values, dtype=float)
    n = v.shape[axis]
    if n < 2:
        return np.full(np.delete(v.shape, axis % v.ndim), np.nan)
    return v.std(axis=axis, ddof=1) / np.sqrt(n)


def normalized_accuracy(error, fp_error: float, chance_error: float):
    """A* = 1 - (err - err_FP) / (err_chance - err_FP) (Rasch et al. 2023, MODEL.md section 9)."""
    if not chance_error > fp_error:
        raise ValueError(f"normalized_accuracy: chance error {chance_error} must exceed the "
                         f"floating-point error {fp_error}")
    return 1.0 - (np.asarray(error) - fp_error) / (chance_error - fp_error)


def evaluate_over_time(model: nn.Module, data, metric: Callable = classification_error,
                       times=PAPER_TIMES, repeats: int = 25, rng=0,
                       fp_error: float | None = None, chance_error: float | None = None,
                       progress: bool = True, name: str = "error") -> xr.Dataset:
    """Program, drift and measure a model at several times after programming, repeatedly.

    Parameters
    ----------
    model : nn.Module, an analog model (from :func:`aimc_device.nn.convert`) with a device model
    data : the evaluation data, passed to ``metric``
    metric : callable(model, data) -> float, lower is better (default classification error)
    times : sequence of float, times after programming [s]
    repeats : int, programming + evaluation repeats with new device draws (15-25 in the paper)
    rng : int, numpy.random.Generator or None
    fp_error, chance_error : float, optional; with both, A* is added
    progress : bool, show a tqdm bar
    name : str, name of the metric variable

    Returns
    -------
    xarray.Dataset with ``{name}(repeat, time)``, ``{name}_mean(time)``, ``{name}_sem(time)``
    and, given fp/chance errors, ``normalized_accuracy(time)`` and its standard error; every
    setting (times, repeats, seed, crossbar config, device model) in attrs.
    """
    tiles = analog_tiles(model)
    if not tiles:
        raise ValueError("evaluate_over_time: the model holds no analog layers; convert it first")
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or times.size == 0 or np.any(times < 0):
        raise ValueError("times: give one or more non-negative times after programming [s]")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    seed_for_attrs = rng if isinstance(rng, (int, np.integer)) else -1
    gen = as_generator(rng)
    values = np.empty((repeats, times.size))
    was_training = model.training
    model.eval()
    bar = tqdm(total=repeats * times.size, desc="evaluate over time", disable=not progress,
               leave=False)
    try:
        for r in range(repeats):
            program(model, rng=gen)
            for k, t in enumerate(times):
                drift(model, float(t), rng=gen)
                values[r, k] = float(metric(model, data))
                bar.update(1)
    finally:
        bar.close()
        forget_programming(model)
        model.train(was_training)
    sem = standard_error(values, axis=0)
    tile = tiles[0]
    ds = xr.Dataset(
        {name: (("repeat", "time"), values),
         f"{name}_mean": (("time",), values.mean(axis=0)),
         f"{name}_sem": (("time",), sem)},
        coords={"time": ("time", times, {"units": "s",
                                         "long_name": "time after programming"}),
                "repeat": np.arange(repeats)},
        attrs={"repeats": repeats, "seed": int(seed_for_attrs),
               "crossbar_config": json.dumps(tile.cfg.to_dict()),
               "device_model": json.dumps(tile.device_model.to_dict()
                                          if tile.device_model is not None else None),
               "metric": getattr(metric, "__name__", str(metric))},
    )
    if fp_error is not None and chance_error is not None:
        a = normalized_accuracy(values, fp_error, chance_error)
        ds["normalized_accuracy"] = (("time",), a.mean(axis=0))
        ds["normalized_accuracy_sem"] = (("time",), sem / (chance_error - fp_error))
        ds.attrs.update(fp_error=float(fp_error), chance_error=float(chance_error))
    return ds
