"""Evaluation over time after programming (docs/model.md section 9).

Program the model, move it to each time after programming (drift, 1/f noise and drift
compensation drawn once per time and held for the whole test set), measure, and repeat with new
device draws; the result is an xarray Dataset.
"""
from __future__ import annotations

import collections.abc
import json
from typing import Callable

import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_instance, check_int
from .._random import as_generator
from ..io import model_to_dict
from .convert import analog_tiles, drift, forget_programming, program

__all__ = ["PAPER_TIMES", "classification_error", "normalized_accuracy", "standard_error",
           "evaluate_over_time"]

#: 1 s, 1 h, 1 day and 1 year after programming [s] (Rasch et al. 2023, Table 3).
PAPER_TIMES = (1.0, 3600.0, 86400.0, 31536000.0)


_NO_BATCHES = ("data yielded no batches: an iterator that was already consumed? pass a list or "
               "a DataLoader")


@torch.no_grad()
def classification_error(model: nn.Module, data) -> float:
    """Fraction of misclassified samples over an iterable of (inputs, targets) batches.

    Raises
    ------
    TypeError
        ``model`` not a torch module, ``data`` not an iterable, a batch not an (inputs, targets)
        pair.
    ValueError
        ``data`` yielded no batches (an empty list, or an iterator already consumed) or no
        samples.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    if data is None or isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data: expected an iterable of (inputs, targets) batches, got "
                        f"{type(data).__name__}")
    model.eval()
    wrong, total, batches = 0, 0, 0
    for batch in data:
        try:
            x, y = batch
        except (TypeError, ValueError):
            raise TypeError(f"data: each batch must be an (inputs, targets) pair, got "
                            f"{type(batch).__name__}") from None
        batches += 1
        out = model(x)
        wrong += int((out.argmax(dim=-1) != y).sum())
        total += int(y.numel())
    if batches == 0:
        raise ValueError(f"classification_error: {_NO_BATCHES}")
    if total == 0:
        raise ValueError("classification_error: data yielded batches with no samples (empty "
                         "targets)")
    return wrong / total


def standard_error(values, axis: int = -1):
    """Standard error of the mean over ``axis`` (NaN with fewer than two values)."""
    v = np.asarray(values, dtype=float)
    n = v.shape[axis]
    if n < 2:
        return np.full(np.delete(v.shape, axis % v.ndim), np.nan)
    return v.std(axis=axis, ddof=1) / np.sqrt(n)


def normalized_accuracy(error, fp_error: float, chance_error: float):
    """A* = 1 - (err - err_FP) / (err_chance - err_FP) (Rasch et al. 2023; docs/model.md 9)."""
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
    check_instance(model, "model", nn.Module, "a torch.nn.Module (an analog model)")
    tiles = analog_tiles(model)
    if not tiles:
        raise ValueError("evaluate_over_time: the model holds no analog layers; convert it first")
    if isinstance(data, collections.abc.Iterator):  # a generator: read once, then empty
        raise TypeError(f"data: a one-shot iterator ({type(data).__name__}) can be read only "
                        "once, but evaluate_over_time reads it once per repeat and time; pass a "
                        "list or a DataLoader")
    if not callable(metric):
        raise TypeError(f"metric: expected a callable(model, data) -> float, got "
                        f"{type(metric).__name__}")
    try:
        times = np.asarray(times, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"times = {times!r}: give a sequence of times after programming "
                        "[s]") from None
    if times.ndim != 1 or times.size == 0 or not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError("times: give one or more finite, non-negative times after programming "
                         "[s]")
    repeats = check_int(repeats, "repeats", lo=1)
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
               "device_model": json.dumps(model_to_dict(tile.device_model)
                                          if tile.device_model is not None else None),
               "metric": getattr(metric, "__name__", str(metric))},
    )
    if fp_error is not None and chance_error is not None:
        a = normalized_accuracy(values, fp_error, chance_error)
        ds["normalized_accuracy"] = (("time",), a.mean(axis=0))
        ds["normalized_accuracy_sem"] = (("time",), sem / (chance_error - fp_error))
        ds.attrs.update(fp_error=float(fp_error), chance_error=float(chance_error))
    return ds
