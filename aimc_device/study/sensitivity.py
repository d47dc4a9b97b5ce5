"""Sensitivity analysis: one nonideality at a time, from its standard value up to eps_M = 20 %.

For each nonideality, its knob is moved away from the standard model (everything else kept
standard) until the MVM error of the crossbar test case (Eq. 20, :func:`aimc_device.crossbar.
mvm_error`) rises from its standard value to ``max_mvm_error``; the knob values for a grid of
MVM errors are found by root finding (:func:`scipy.optimize.brentq`) on ``mvm_error`` with
common random numbers (a fixed seed). The HWA-trained model is then evaluated at each setting,
``repeats`` times, at ``t`` after programming, giving the loss of A*(t) and the threshold where
A*(t) crosses the iso-accuracy level (99 %) (docs/model.md section 10, Fig. 4 of [1]).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Fig. 4.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import xarray as xr
from scipy.optimize import brentq

from .. import __version__
from .. import nn as ann
from ..crossbar import CrossbarConfig, mvm_error
from ..crossbar.metric import standard_test_case
from ..io import model_from_dict, model_to_dict
from .._checks import check_bool
from . import _dask
from ._tasks import evaluate_task
from ._validate import (check_reachable, check_recipe, check_sensitivity, device_inputs,
                        workload_name)
from .report import (check_outputs, format_sensitivity_table, hardware_description,
                     plot_sensitivity, write_outputs)
from .study import TIME_LABELS, prepare_models, resolve_device

__all__ = ["Nonideality", "NONIDEALITIES", "find_scale", "knob_levels", "run_sensitivity"]


@dataclass(frozen=True)
class Nonideality:
    """One knob of the sensitivity analysis.

    Attributes
    ----------
    name : str
    knob : str, what the value means (with its unit)
    standard : callable(cfg, device) -> float, the knob's value in the standard model
    apply : callable(cfg, device, value) -> (cfg, device), the model with the knob at ``value``
    discrete : bool, integer knob stepped down by one (DAC/ADC bits) instead of root finding
    first : float, first trial value when the standard value is 0 (bracket search)
    upper : float, largest value searched (relative to a non-zero standard, absolute otherwise)
    """

    name: str
    knob: str
    standard: Callable
    apply: Callable
    discrete: bool = False
    first: float = 1.0
    upper: float = 1e3


#: The nonidealities of docs/model.md sections 2-6 and 10, each scaled alone. "IR drop" scales the
#: wire resistance (``CrossbarConfig.ir_drop``: r_wire -> s r_wire; the IR-drop term grows as
#: c(s a) / c(a), less than s-fold), "programming noise" and "drift" the device statistics with
#: the device model's ``scaled`` (either family: ``programming=s``; ``drift_mean=s,
#: drift_spread=s``, for PCM the statistics of nu, for the empirical family the change of the
#: distributions since the first measured time).
NONIDEALITIES: dict[str, Nonideality] = {n.name: n for n in (
    Nonideality("DAC", "input bits [bit]", lambda c, d: float(c.inp_bits or 0),
                lambda c, d, v: (c.replace(inp_bits=int(v)), d), discrete=True),
    Nonideality("ADC", "output bits [bit]", lambda c, d: float(c.out_bits or 0),
                lambda c, d, v: (c.replace(out_bits=int(v)), d), discrete=True),
    Nonideality("output noise", "sigma_out [1]", lambda c, d: c.out_noise,
                lambda c, d, v: (c.replace(out_noise=v), d), first=0.04),
    Nonideality("short-term noise", "sigma_w0 [1]", lambda c, d: c.w_noise,
                lambda c, d, v: (c.replace(w_noise=v), d), first=0.0175),
    Nonideality("programming noise", "x sigma_P [1]", lambda c, d: 1.0,
                lambda c, d, v: (c, d.scaled(programming=v)), upper=100.0),
    Nonideality("drift", "x nu stats [1]", lambda c, d: 1.0,
                lambda c, d, v: (c, d.scaled(drift_mean=v, drift_spread=v)), upper=30.0),
    Nonideality("IR drop", "x r_wire [1]", lambda c, d: c.ir_drop,
                lambda c, d, v: (c.replace(ir_drop=v), d), first=1.0, upper=1e4),
    Nonideality("S-shaped ADC", "mu_zeta [1]", lambda c, d: c.mu_zeta if c.s_adc else 0.0,
                lambda c, d, v: (c.replace(s_adc=v > 0, mu_zeta=v if v > 0 else c.mu_zeta), d),
                first=0.25, upper=1e3),
    Nonideality("stuck devices", "stuck-at-0 fraction [1]", lambda c, d: d.stuck_at_zero,
                lambda c, d, v: (c, d.replace(stuck_at_zero=min(v, 1.0))), first=1e-3,
                upper=0.5),
)}


def _eps(nonideality: Nonideality, cfg, dev, value, t, weights, inputs, seed) -> float:
    c, d = nonideality.apply(cfg, dev, value)
    e = mvm_error(c, device=d, t=t, weights=weights, inputs=inputs, rng=seed)
    return e if np.isfinite(e) else np.inf


def find_scale(nonideality: str | Nonideality, target: float, cfg: CrossbarConfig | None = None,
               device=None, t: float | None = 3600.0, weights=None,
               inputs=None, seed: int = 0, bracket: tuple | None = None) -> tuple[float, float]:
    """The knob value at which the MVM error (Eq. 20) reaches ``target``, by root finding.

    Parameters
    ----------
    nonideality : str or Nonideality, a name of :data:`NONIDEALITIES` (continuous knobs)
    target : float, MVM error to reach, dimensionless (0.2 = 20 %)
    cfg : CrossbarConfig, the standard model (default)
    device : PCMModel or EmpiricalModel, default the "rasch2023" preset
    t : float or None, time after programming of the MVM error [s]
    weights, inputs : arrays (out, in), (n, in), the test case (default the paper's 512 x 512)
    seed : int, fixes test case and device draws for every evaluation (common random numbers)
    bracket : (lo, hi), optional; default from the standard value, expanded by doubling

    Returns
    -------
    (value, eps) : the knob value and the MVM error reached there; (nan, eps_max) when the
    target is out of reach below the knob's upper limit.
    """
    ni = NONIDEALITIES[nonideality] if isinstance(nonideality, str) else nonideality
    if ni.discrete:
        raise ValueError(f"{ni.name}: an integer knob; use knob_levels()")
    cfg = cfg if cfg is not None else CrossbarConfig()
    dev = resolve_device(device)[0]

    def f(v):
        return _eps(ni, cfg, dev, v, t, weights, inputs, seed) - target

    if bracket is None:
        v0 = ni.standard(cfg, dev)
        lo, hi = v0, (2 * v0 if v0 > 0 else ni.first)
        limit = ni.upper * v0 if v0 > 0 else ni.upper
        fhi = f(hi)
        while fhi < 0 and hi < limit:
            lo, hi = hi, min(2 * hi, limit)
            fhi = f(hi)
        if fhi < 0:
            return float("nan"), fhi + target
    else:
        lo, hi = bracket
        if f(hi) < 0:
            return float("nan"), f(hi) + target
    if f(lo) >= 0:
        return float(lo), f(lo) + target
    v = brentq(f, lo, hi, xtol=1e-4 * abs(hi), rtol=1e-4, maxiter=60)
    return float(v), f(v) + target


def knob_levels(nonideality: str | Nonideality, targets, cfg: CrossbarConfig, device,
                t: float | None, weights, inputs, seed: int) -> list[tuple[float, float]]:
    """(value, eps) for each MVM error in ``targets`` (continuous knobs), or for each bit
    count from the standard one down to the first that passes the last target (DAC, ADC)."""
    ni = NONIDEALITIES[nonideality] if isinstance(nonideality, str) else nonideality
    if ni.discrete:
        out, b = [], int(ni.standard(cfg, device))
        while b >= 2:
            e = _eps(ni, cfg, device, b, t, weights, inputs, seed)
            out.append((float(b), float(e)))
            if e >= targets[-1]:
                break
            b -= 1
        return out[1:]  # the standard value is level 0, evaluated once for all
    res = []
    for target in targets:
        v, e = find_scale(ni, target, cfg, device, t, weights, inputs, seed)
        res.append((v, e))
        if not np.isfinite(v):
            break
    return res


def _levels_task(_shared, name, cfg_d, dev_d, targets, t, shape, n_inputs, seed):
    w, x = standard_test_case(seed, n_inputs, shape)
    return knob_levels(name, targets, CrossbarConfig.from_dict(cfg_d), model_from_dict(dev_d), t,
                       w, x, seed)


def run_sensitivity(workload="cnn", device=None, cfg: CrossbarConfig | None = None,
                    nonidealities=None, max_mvm_error: float = 0.20, n_levels: int = 5,
                    repeats: int = 10, t: float = 3600.0, iso_accuracy: float = 0.99,
                    out_dir="study-out", seed: int = 0, quick: bool = False,
                    hwa_epochs: int | None = None, test_shape=None, n_inputs: int | None = None,
                    scheduler=None, progress: bool = True, plot: bool = True,
                    verbose: bool = True, overwrite: bool = False, command: str | None = None,
                    **study_kwargs) -> xr.Dataset:
    """Scale each nonideality alone until eps_M = ``max_mvm_error``; measure the loss of A*(t).

    Parameters
    ----------
    workload : str or Workload
    device : PCMModel, EmpiricalModel, preset name or device card path (see :func:`run_study`)
    cfg : CrossbarConfig, the standard model (default the paper's)
    nonidealities : sequence of str, optional; default all of :data:`NONIDEALITIES`
    max_mvm_error : float, the MVM error (dimensionless) at the top of the sweep, 0.2 in [1]
    n_levels : int, MVM-error levels from the standard value to ``max_mvm_error`` (inclusive)
    repeats : int, programming repeats per setting
    t : float, evaluation time after programming [s] (also the time of eps_M, so that drift
        counts), 1 h by default
    iso_accuracy : float, the A* threshold (0.99)
    out_dir : folder of the checkpoints (shared with :func:`run_study`) and results
    seed : int, seeds training (as in run_study), the MVM-error test case and the evaluation
        tasks (keyed by (seed, 100 + nonideality index, level, repeat))
    quick : bool, the workload's reduced settings and a 128 x 128 test matrix with 200 inputs
    hwa_epochs : int, optional, as in :func:`run_study`
    test_shape : (out, in), optional, the MVM-error test matrix (default 512 x 512, quick
        128 x 128)
    n_inputs : int, optional, inputs of the test case (default 1000, quick 200)
    scheduler, progress, plot, verbose, overwrite, command : as in :func:`run_study`
    **study_kwargs : passed to :func:`aimc_device.study.prepare_models` (hwa_lr, distill, ...)

    Returns
    -------
    xarray.Dataset
        ``value(nonideality, level)`` (knob), ``mvm_error`` and ``target_mvm_error``,
        ``error(nonideality, level, repeat)``, ``normalized_accuracy`` with ``_mean``/``_sem``,
        ``delta_normalized_accuracy`` (against the standard model), ``threshold_mvm_error`` and
        ``threshold_value`` per nonideality (NaN: A* stays above the threshold up to the top
        of the sweep). Level 0 is the standard model.
    """
    names = check_sensitivity(nonidealities, NONIDEALITIES, max_mvm_error, n_levels, repeats,
                              t, iso_accuracy, test_shape, n_inputs)
    check_bool(plot, "plot")
    check_bool(verbose, "verbose")
    # The recipe as prepare_models will get it (an unknown keyword raises TypeError here).
    recipe = inspect.signature(prepare_models).bind(workload, device, cfg, out_dir, seed, quick,
                                                     hwa_epochs, progress=progress,
                                                     **study_kwargs)
    recipe.apply_defaults()
    check_recipe(**recipe.arguments)
    stem = os.path.join(os.fspath(out_dir), f"{workload_name(workload)}-sensitivity")
    check_outputs(stem, plot, inputs=device_inputs(device), overwrite=overwrite)
    test_shape = tuple(int(v) for v in test_shape) if test_shape is not None else (
        (128, 128) if quick else (512, 512))
    n_inputs = int(n_inputs) if n_inputs is not None else (200 if quick else 1000)
    t = float(t)
    # The standard model's MVM error first: a sweep top below it is refused before training.
    cfg0 = cfg if cfg is not None else CrossbarConfig()
    w, x = standard_test_case(seed, n_inputs, test_shape)
    eps0 = mvm_error(cfg0, device=resolve_device(device)[0], t=t, weights=w, inputs=x, rng=seed)
    check_reachable(max_mvm_error, eps0)
    prep = prepare_models(workload, device, cfg, out_dir, seed, quick, hwa_epochs,
                          progress=progress, **study_kwargs)
    cfg, dev = prep.cfg, prep.device
    t0 = time.perf_counter()
    targets = list(np.linspace(eps0, max_mvm_error, n_levels)[1:])
    dev_d = model_to_dict(dev)
    level_calls = [(0, n, cfg.to_dict(), dev_d, targets, t, test_shape, n_inputs, seed)
                   for n in names]
    with _dask.session(scheduler) as sched:
        ds = _sweep(prep, names, level_calls, targets, eps0, n_levels, repeats, t, seed, sched,
                    progress, iso_accuracy, max_mvm_error, t0)
    ds.attrs.update(test_shape=list(test_shape), n_inputs=n_inputs,
                    scheduler=_dask.scheduler_label(scheduler),
                    command=command or (f"aimc_device.study.run_sensitivity("
                                        f"{prep.workload.name!r}, seed={seed}, quick={quick})"),
                    hardware=hardware_description())
    write_outputs(ds, stem, format_sensitivity_table, plot_sensitivity if plot else None,
                  verbose, inputs=device_inputs(device), overwrite=overwrite)
    return ds


def _sweep(prep, names, level_calls, targets, eps0, n_levels, repeats, t, seed, scheduler,
           progress, iso_accuracy, max_mvm_error, t0) -> xr.Dataset:
    """Root finding and evaluation of the sensitivity grid on one scheduler."""
    cfg, dev, spec = prep.cfg, prep.device, prep.specs["hwa"]
    levels = _dask.compute(_levels_task, [None], level_calls, scheduler=scheduler,
                           progress=progress, desc="root finding")
    t_roots = time.perf_counter() - t0
    n_lev = max(n_levels, 1 + max((len(lv) for lv in levels), default=0))
    value = np.full((len(names), n_lev), np.nan)
    eps = np.full((len(names), n_lev), np.nan)
    tgt = np.full((len(names), n_lev), np.nan)
    specs, calls = [spec], [(0, (int(seed), 99, 0, r), (float(t),)) for r in range(repeats)]
    for i, (n, lv) in enumerate(zip(names, levels)):
        ni = NONIDEALITIES[n]
        value[i, 0], eps[i, 0], tgt[i, 0] = ni.standard(cfg, dev), eps0, eps0
        for k, (v, e) in enumerate(lv, start=1):
            tgt[i, k] = targets[k - 1] if not ni.discrete and k - 1 < len(targets) else np.nan
            if not np.isfinite(v):
                continue
            value[i, k], eps[i, k] = v, e
            c, d = ni.apply(cfg, dev, v)
            specs.append(spec.replace(cfg=c, device=d))
            calls += [(len(specs) - 1, (int(seed), 100 + list(NONIDEALITIES).index(n), k, r),
                       (float(t),)) for r in range(repeats)]
    t1 = time.perf_counter()
    results = _dask.compute(evaluate_task, specs, calls, scheduler=scheduler, progress=progress,
                            desc="sensitivity evaluation")
    t_eval = time.perf_counter() - t1
    err = np.full((len(names), n_lev, repeats), np.nan)
    std_err = np.array([res[0] for (si, _, _), res in zip(calls, results) if si == 0])
    err[:, 0, :] = std_err
    for (si, key, _), res in zip(calls, results):
        if si == 0:
            continue
        i = names.index(list(NONIDEALITIES)[key[1] - 100])
        err[i, key[2], key[3]] = res[0]
    fp, chance = prep.fp_error, prep.chance_error
    a = ann.normalized_accuracy(err, fp, chance)
    a_mean = a.mean(axis=-1)
    a_sem = ann.standard_error(a)
    a0 = float(a_mean[0, 0])
    thr_eps = np.full(len(names), np.nan)
    thr_val = np.full(len(names), np.nan)
    for i in range(len(names)):
        ok = np.flatnonzero(np.isfinite(eps[i]))
        below = [k for k in ok if a_mean[i, k] < iso_accuracy]
        if not below:
            continue
        k = below[0]
        if k == ok[0]:
            thr_eps[i], thr_val[i] = eps[i, k], value[i, k]
            continue
        j = ok[list(ok).index(k) - 1]
        f = (a_mean[i, j] - iso_accuracy) / (a_mean[i, j] - a_mean[i, k])
        thr_eps[i] = eps[i, j] + f * (eps[i, k] - eps[i, j])
        thr_val[i] = value[i, j] + f * (value[i, k] - value[i, j])
    loss = np.full(len(names), np.nan)
    for i in range(len(names)):  # A* lost at eps_M = max_mvm_error, interpolated in eps_M
        ok = np.isfinite(eps[i])
        if ok.any() and eps[i][ok].max() >= max_mvm_error - 1e-3:
            loss[i] = a0 - np.interp(max_mvm_error, eps[i][ok], a_mean[i][ok])
    label = TIME_LABELS.get(float(t), f"{t:g} s")
    dims = ("nonideality", "level")
    ds = xr.Dataset(
        {"value": (dims, value, {"long_name": "knob value (see coordinate 'knob')"}),
         "mvm_error": (dims, eps, {"units": "1", "long_name": "MVM error eps_M (Eq. 20)"}),
         "target_mvm_error": (dims, tgt, {"units": "1"}),
         "error": (dims + ("repeat",), err, {"units": "1", "long_name": "test error"}),
         "normalized_accuracy": (dims + ("repeat",), a),
         "normalized_accuracy_mean": (dims, a_mean),
         "normalized_accuracy_sem": (dims, a_sem),
         "delta_normalized_accuracy": (dims, a_mean - a0),
         "loss_at_max_mvm_error": (("nonideality",), loss, {
             "long_name": "A* of the standard model minus A* at eps_M = max_mvm_error "
                          "(linear in eps_M between levels; NaN: not reached)"}),
         "threshold_mvm_error": (("nonideality",), thr_eps),
         "threshold_value": (("nonideality",), thr_val),
         "standard_mvm_error": ((), eps0), "standard_normalized_accuracy": ((), a0),
         "fp_error": ((), fp), "chance_error": ((), chance)},
        coords={"nonideality": names, "level": np.arange(n_lev), "repeat": np.arange(repeats),
                "knob": ("nonideality", [NONIDEALITIES[n].knob for n in names])},
        attrs={"title": f"aimc-device sensitivity: {prep.workload.name}",
               "workload": prep.workload.name, "seed": int(seed), "repeats": int(repeats),
               "time": float(t), "time_label": label, "iso_accuracy": float(iso_accuracy),
               "max_mvm_error": float(max_mvm_error), "n_levels": int(n_levels),
               "seed_scheme": "MVM-error test case and device draws from seed (common random "
                              "numbers); evaluation task (nonideality i, level k, repeat r) from "
                              "SeedSequence([seed, 100 + i, k, r]), standard model [seed, 99, 0, r]",
               "settings": json.dumps(prep.settings, sort_keys=True, default=str),
               "crossbar_config": json.dumps(cfg.to_dict(), default=str),
               "device_model": json.dumps(model_to_dict(dev), default=str),
               "device_provenance": json.dumps(prep.device_provenance, default=str),
               "timings": json.dumps({**prep.timings, "root_finding_s": t_roots,
                                      "evaluation_s": t_eval}),
               "package_version": __version__,
               "references": "M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Fig. 4"})
    return ds
