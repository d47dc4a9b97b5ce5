"""Evaluation over time after programming (docs/model.md section 9).

Program the model, move it to each time after programming (drift, 1/f noise and drift
compensation drawn once per time and held for the whole test set), measure, and repeat with new
device draws; the result is an xarray Dataset.
"""
from __future__ import annotations

import collections.abc
import copy
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
           "evaluate_over_time", "with_hardware", "calibration_spread"]

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


def with_hardware(model: nn.Module, cfg=None, device=None) -> nn.Module:
    """A copy of an analog model whose tiles use ``cfg`` and ``device`` when programmed and read.

    The tiling and the trained parameters stay as they are; None keeps a tile's own crossbar
    configuration (``cfg``) or device model (``device``).
    """
    out = copy.deepcopy(model)
    for tile in analog_tiles(out):
        tile.cfg = cfg if cfg is not None else tile.cfg
        tile.device_model = device if device is not None else tile.device_model
    return out


def calibration_spread(a_star) -> dict:
    """Split the spread of A* over calibration draws and programming repeats.

    One-way random-effects model (D. C. Montgomery, Design and Analysis of Experiments, 8th
    ed., Wiley 2013, section 13.1): A*_kr = mu + c_k + e_kr, c_k ~ (0, s_cal^2) the effect of calibration
    draw k (a plausible device model), e_kr ~ (0, s_rep^2) that of programming repeat r. With K
    draws of R repeats each: s_rep^2 = mean_k var_r(A*_kr) (the within-draw variance) and
    s_cal^2 = max(0, var_k(mean_r A*_kr) - s_rep^2 / R).

    Parameters
    ----------
    a_star : array (..., K, R), A* (dimensionless)

    Returns
    -------
    dict with ``calibration`` and ``repeat`` (standard deviations, arrays of shape (...)),
    ``total`` (sqrt of their squares' sum) and ``mean``.
    """
    a = np.asarray(a_star, dtype=float)
    if a.ndim < 2 or a.shape[-1] < 2 or a.shape[-2] < 2:
        raise ValueError("calibration_spread: give A* of shape (..., draws >= 2, repeats >= 2)")
    r = a.shape[-1]
    within = a.var(axis=-1, ddof=1).mean(axis=-1)
    between = a.mean(axis=-1).var(axis=-1, ddof=1)
    cal = np.sqrt(np.clip(between - within / r, 0.0, None))
    rep = np.sqrt(within)
    return {"calibration": cal, "repeat": rep, "total": np.hypot(cal, rep),
            "mean": a.mean(axis=(-1, -2))}


def evaluate_over_time(model: nn.Module, data, metric: Callable = classification_error,
                       times=PAPER_TIMES, repeats: int = 25, rng=0,
                       fp_error: float | None = None, chance_error: float | None = None,
                       progress: bool = True, name: str = "error", uncertainty=None,
                       calibration_samples: int = 0) -> xr.Dataset:
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
    uncertainty : aimc_device.pcm.ParameterCovariance, optional
        The covariance of the fit that made the model's device card
        (:func:`aimc_device.io.load_device_uncertainty`); with ``calibration_samples`` the
        evaluation propagates it.
    calibration_samples : int
        Plausible device models drawn from ``uncertainty`` around the tiles' device model
        (0: none; else >= 2, with ``repeats`` >= 2): the model is evaluated with each, and the
        spread of A* is split into its calibration and programming parts
        (:func:`calibration_spread`).

    Returns
    -------
    xarray.Dataset with ``{name}(repeat, time)``, ``{name}_mean(time)``, ``{name}_sem(time)``
    and, given fp/chance errors, ``normalized_accuracy(time)`` and its standard error; every
    setting (times, repeats, seed, crossbar config, device model) in attrs. With calibration
    samples: ``{name}(draw, repeat, time)``, and given fp/chance errors
    ``normalized_accuracy(draw, repeat, time)``, ``calibration_spread(time)`` and
    ``repeat_spread(time)`` (standard deviations of A*).
    """
    check_int(calibration_samples, "calibration_samples", lo=0)
    if calibration_samples:
        return _evaluate_calibration(model, data, metric, times, repeats, rng, fp_error,
                                     chance_error, progress, name, uncertainty,
                                     calibration_samples)
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


def _evaluate_calibration(model, data, metric, times, repeats, rng, fp_error, chance_error,
                          progress, name, uncertainty, n_models) -> xr.Dataset:
    """:func:`evaluate_over_time` with each of ``n_models`` plausible device models."""
    check_instance(model, "model", nn.Module, "a torch.nn.Module (an analog model)")
    check_int(n_models, "calibration_samples", lo=2)
    check_int(repeats, "repeats", lo=2)
    if uncertainty is None:
        raise ValueError("calibration_samples: give uncertainty= (the fit's covariance, "
                         "aimc_device.io.load_device_uncertainty(card))")
    devices = {id(t.device_model): t.device_model for t in analog_tiles(model)}
    if len(devices) != 1 or None in devices.values():
        raise ValueError("calibration_samples: the model's tiles must share one device model "
                         "(convert it with device=the card)")
    dev = next(iter(devices.values()))
    seed = int(rng) if isinstance(rng, (int, np.integer)) else int(
        as_generator(rng).integers(2**62))
    draws = uncertainty.sample_models(dev, n_models, rng=[seed, 501])
    runs = [evaluate_over_time(with_hardware(model, None, d), data, metric, times, repeats,
                               rng=[seed, 502 + k], progress=progress, name=name)
            for k, d in enumerate(draws)]
    values = np.stack([r[name].values for r in runs])           # (draw, repeat, time)
    ds = xr.Dataset({name: (("draw", "repeat", "time"), values)},
                    coords={"draw": np.arange(n_models), "repeat": np.arange(repeats),
                            "time": ("time", runs[0]["time"].values, {"units": "s"})},
                    attrs={"device_model": dev.name, "seed": seed,
                           "parameters": list(uncertainty.parameters)})
    if fp_error is not None and chance_error is not None:
        a = normalized_accuracy(values, fp_error, chance_error)
        sp = calibration_spread(np.moveaxis(a, -1, 0))
        ds["normalized_accuracy"] = (("draw", "repeat", "time"), a)
        ds["calibration_spread"] = (("time",), sp["calibration"])
        ds["repeat_spread"] = (("time",), sp["repeat"])
        ds.attrs.update(fp_error=float(fp_error), chance_error=float(chance_error))
    return ds
