"""Device requirements: how good must the devices and the periphery be for a network to keep its
accuracy, and how sure is the answer.

The inverse of a study. For each *knob* (a device statistic scaled against the device card, or
a periphery setting), everything else held at the card and the crossbar configuration, the
search finds the limit at which the hardware-aware-trained network still meets the target
normalised accuracy A* at each time after programming, with a stated confidence: at the limit
the ``coverage`` quantile of A* over programming repeats (default the 10th percentile: 90 % of
repeats) is at or above the target.

The decision statistic at a knob value v, from the A* of n programming repeats with mean m and
standard deviation s, is the normal-model quantile q(v) = m - z_c s (z_c the standard normal
quantile of ``coverage``), with standard error se(q) = s sqrt(1/n + z_c^2 / (2 (n - 1))); v
passes when q(v) >= target. The search

- brackets the limit by steps of a factor ``step`` from the card's value (up while it passes,
  down while it fails), then bisects on a log scale (geometric midpoints) until the bracket is
  narrower than a factor 1 + ``rtol``; integer knobs (ADC and DAC bits) bisect over integers
  and return the fewest bits that pass, with one bit fewer evaluated and failing;
- starts each value with ``min_repeats`` repeats and doubles them, up to ``max_repeats``, only
  while the decision is close (|q - target| <= ``z_decision`` se);
- uses the same programming draws at every value of every knob and for the card itself
  (common random numbers: repeat r draws from ``SeedSequence([seed, 300, r])``), so that A*
  along a knob is smooth and the card passes or fails alike in every search;
- checks that q falls monotonically along the knob over all values it evaluated: a rise by
  more than 3 standard errors (and more than a quarter of 1 - target) is reported, with the
  values, in the result and as a warning.

Evaluation-only by default: the network is HWA-trained once with the card and the standard
crossbar configuration, as in the paper's sensitivity analysis [1]; ``retrain=True`` HWA-trains
it again at every value searched (checkpointed, so a repeated value is trained once). Each
(knob, time) search is one Dask task; finished searches are checkpointed and a run that was
stopped resumes with the rest.

Calibration uncertainty: with ``calibration_samples=K`` and a device card that keeps its fit's
covariance (:func:`aimc_device.io.load_device_uncertainty`), the network is also evaluated on K
plausible device models drawn from it (:meth:`aimc_device.pcm.ParameterCovariance.sample_models`),
R repeats each, and the variance of A*(t) is split into its calibration and programming parts
(:func:`aimc_device.nn.calibration_spread`).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Fig. 4 and Methods (sensitivity
   analysis, normalised accuracy A*).
.. [2] D. C. Montgomery, Design and Analysis of Experiments, 8th ed., Wiley (2013),
   section 13.1 (the one-way random-effects model and its variance components).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from scipy import stats

from .. import __version__
from .. import nn as ann
from .._checks import check_bool, check_float, check_int
from ..crossbar import CrossbarConfig
from ..io import load_device_uncertainty, save_figure
from ..pcm import ParameterCovariance
from . import _dask
from ._checkpoint import atomic_save, fingerprint, load_checkpoint
from ._tasks import evaluate_task, one_thread
from ._validate import check_times, device_inputs, workload_name
from .report import check_outputs, hardware_description, provenance_line, write_outputs
from .study import TIME_LABELS, prepare_models, resolve_device

__all__ = ["Knob", "KNOBS", "SearchSettings", "SearchResult", "search_limit", "requirements",
           "calibration_spread", "evaluate_calibration", "format_requirements_table",
           "plot_requirements",
           "REQUIREMENT_TIMES"]

#: Default times after programming of a requirements run: 1 h, 1 day, 1 year [s].
REQUIREMENT_TIMES = (3600.0, 86400.0, 31536000.0)


# ------------------------------------------------------------------------------------ knobs
def _stuck_total(dev) -> float:
    return float(dev.stuck_at_zero + dev.stuck_at_gmax + dev.stuck_at_random)


def _set_stuck(dev, v: float):
    """The device with a total stuck fraction v: the card's mix scaled, or all stuck at 0 S
    when the card has none."""
    total = _stuck_total(dev)
    if total > 0:
        return dev.scaled(stuck=v / total)
    return dev.replace(stuck_at_zero=min(v, 1.0))


def _bits(v) -> int:
    return int(round(v))


@dataclass(frozen=True)
class Knob:
    """One knob of a requirements search.

    Attributes
    ----------
    name : str
    kind : str, "device" (a statistic of the device card) or "periphery"
    unit : str, what a value means, with its unit
    card : callable(cfg, device) -> float, the value of the card and configuration
    apply : callable(cfg, device, value) -> (cfg, device)
    integer : bool, an integer knob where more is better (ADC and DAC bits)
    first : float, where the search starts when the card's value is 0
    lower, upper : float, the range searched (a failing ``lower`` or a passing ``upper`` is
        reported as out of range)
    """

    name: str
    kind: str
    unit: str
    card: Callable
    apply: Callable
    integer: bool = False
    first: float = 1.0
    lower: float = 1.0 / 64
    upper: float = 64.0


def _scale(**which):
    return lambda c, d, v: (c, d.scaled(**{k: v for k in which}))


#: The knobs: device statistics as scale factors of the card (1 = the card), the stuck
#: fraction absolute (a card may have none), periphery settings in their own units.
KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("programming noise", "device", "x card sigma_P (Eq. 7)", lambda c, d: 1.0,
         _scale(programming=1)),
    Knob("drift mean", "device", "x card mu_nu (Eq. 9)", lambda c, d: 1.0,
         _scale(drift_mean=1)),
    Knob("drift spread", "device", "x card sigma_nu (Eq. 9)", lambda c, d: 1.0,
         _scale(drift_spread=1)),
    Knob("read noise", "device", "x card Q_s (Eq. 10)", lambda c, d: 1.0,
         _scale(read_noise=1)),
    Knob("stuck devices", "device", "fraction of devices stuck [1]",
         lambda c, d: _stuck_total(d), lambda c, d, v: (c, _set_stuck(d, v)), first=1e-3,
         lower=1e-6, upper=0.5),
    Knob("all device statistics", "device", "x card (all five together)", lambda c, d: 1.0,
         lambda c, d, v: (c, d.scaled(programming=v, drift_mean=v, drift_spread=v,
                                      read_noise=v, stuck=v))),
    Knob("ADC bits", "periphery", "output bits [bit]", lambda c, d: float(c.out_bits or 0),
         lambda c, d, v: (c.replace(out_bits=_bits(v)), d), integer=True, lower=1, upper=16),
    Knob("DAC bits", "periphery", "input bits [bit]", lambda c, d: float(c.inp_bits or 0),
         lambda c, d, v: (c.replace(inp_bits=_bits(v)), d), integer=True, lower=1, upper=16),
    Knob("output noise", "periphery", "sigma_out [normalised output units] (Eq. 2)",
         lambda c, d: c.out_noise, lambda c, d, v: (c.replace(out_noise=v), d), first=0.04,
         lower=1e-4, upper=10.0),
    Knob("short-term noise", "periphery", "sigma_w0 [1] (Eq. 14)", lambda c, d: c.w_noise,
         lambda c, d, v: (c.replace(w_noise=v), d), first=0.0175, lower=1e-5, upper=5.0),
    Knob("IR drop", "periphery", "x r_wire (Eqs. 15-18)", lambda c, d: c.ir_drop,
         lambda c, d, v: (c.replace(ir_drop=v), d), first=1.0, lower=1e-3, upper=1e4),
    Knob("S-ADC spread", "periphery", "sigma_zeta [1] (Eq. 19, S-ADC on)",
         lambda c, d: c.sigma_zeta if c.s_adc else 0.0,
         lambda c, d, v: (c.replace(s_adc=True, sigma_zeta=v), d), first=0.1, lower=1e-3,
         upper=10.0),
)}


# ------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class SearchSettings:
    """How a limit is searched and decided (see the module docstring).

    Attributes
    ----------
    target : float, the A* to meet, in (0, 1]
    coverage : float, fraction of programming repeats that must meet it, in (0, 1)
    min_repeats, max_repeats : int, repeats at each value: first, and at most
    z_decision : float, repeats are added while |q - target| <= z_decision se(q)
    rtol : float, relative width of the final bracket (continuous knobs)
    step : float, bracketing factor (> 1)
    """

    target: float = 0.99
    coverage: float = 0.9
    min_repeats: int = 4
    max_repeats: int = 16
    z_decision: float = 1.0
    rtol: float = 0.1
    step: float = 2.0

    def __post_init__(self):
        check_float(self.target, "target", 0.0, 1.0, lo_open=True)
        check_float(self.coverage, "coverage", 0.0, 1.0, lo_open=True, hi_open=True)
        check_int(self.min_repeats, "min_repeats", lo=2)
        check_int(self.max_repeats, "max_repeats", lo=self.min_repeats)
        check_float(self.z_decision, "z_decision", lo=0.0)
        check_float(self.rtol, "rtol", lo=0.0, lo_open=True)
        check_float(self.step, "step", lo=1.0, lo_open=True)

    def statistic(self, a) -> tuple[float, float]:
        """(q, se(q)): the normal-model ``coverage`` quantile of the A* values ``a`` and its
        standard error."""
        a = np.asarray(a, dtype=float)
        n = a.size
        zc = float(stats.norm.ppf(self.coverage))
        s = float(a.std(ddof=1)) if n > 1 else 0.0
        q = float(a.mean()) - zc * s
        se = s * math.sqrt(1.0 / n + zc * zc / (2.0 * max(n - 1, 1)))
        return q, se


@dataclass
class SearchResult:
    """The outcome of one search (one knob at one time).

    Attributes
    ----------
    limit : float
        Continuous knobs: the largest value found to pass (NaN: none, see ``status``);
        integer knobs: the fewest bits that pass.
    failing : float
        The nearest value found to fail (continuous: the top of the final bracket; integer:
        ``limit - 1``); NaN when none was evaluated.
    status : str
        "limit"; "above range" (passes up to ``upper``, or with ``lower`` bits: not limiting);
        "below range" (fails even at ``lower``, or with ``upper`` bits).
    monotone : bool
        False when q rose along the knob (see ``message``).
    message : str
    values, q, se, mean, n : lists, every value evaluated with its statistic, standard error,
        mean A* and repeats
    fraction_at_limit : float, fraction of the repeats at ``limit`` with A* >= target
    """

    limit: float = float("nan")
    failing: float = float("nan")
    status: str = "limit"
    monotone: bool = True
    message: str = ""
    values: list = field(default_factory=list)
    q: list = field(default_factory=list)
    se: list = field(default_factory=list)
    mean: list = field(default_factory=list)
    n: list = field(default_factory=list)
    fraction_at_limit: float = float("nan")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _check_monotone(values, q, se, worse_up: bool, settings: SearchSettings):
    """(monotone, message): does q fall along the knob (toward worse values)?"""
    order = np.argsort(values) if worse_up else np.argsort(values)[::-1]
    v, qq, ss = (np.asarray(x, dtype=float)[order] for x in (values, q, se))
    tol = 0.25 * (1.0 - settings.target)
    worst = None
    for i in range(len(v)):
        for j in range(i + 1, len(v)):  # j is worse than i
            rise = qq[j] - qq[i]
            if rise > max(3.0 * math.hypot(ss[i], ss[j]), tol) and (
                    worst is None or rise > worst[0]):
                worst = (rise, v[i], qq[i], v[j], qq[j])
    if worst is None:
        return True, ""
    rise, vi, qi, vj, qj = worst
    return False, (f"A* does not fall monotonically along the knob: its {settings.coverage:g} "
                   f"quantile is {qj:.4f} at {vj:.4g} but {qi:.4f} at {vi:.4g}, a better "
                   f"value (rise {rise:.4f}, more than 3 standard errors); the limit may not "
                   "be the only crossing of the target: check with more repeats "
                   "(max_repeats) or a finer grid")


def _improves(points, worse: float, better: float, st: SearchSettings) -> bool:
    """Does the statistic rise, beyond noise, from ``worse`` to ``better`` (two steps)?"""
    qw, sw = st.statistic(points[worse])
    qb, sb = st.statistic(points[better])
    return qb - qw > max(2.0 * math.hypot(sw, sb), 0.1 * (1.0 - st.target))


def search_limit(evaluate: Callable, card: float, knob: Knob,
                 settings: SearchSettings | None = None) -> SearchResult:
    """Search the limit of one knob (bracketing, then bisection on a log scale or over
    integers), adding repeats only where the decision is close.

    Parameters
    ----------
    evaluate : callable(value, repeats) -> array of A*
        A* of each programming repeat in ``repeats`` (a range of repeat indices) with the knob
        at ``value``; repeat r must be the same draw at every value (common random numbers).
    card : float
        The card's value of the knob (the search starts there; at ``knob.first`` when 0).
    knob : Knob
        Its kind (integer or continuous) and range.
    settings : SearchSettings

    Returns
    -------
    SearchResult
    """
    st = settings or SearchSettings()
    points: dict[float, np.ndarray] = {}

    def decide(v: float) -> bool:
        v = float(v)
        a = points.get(v, np.zeros(0))
        n = max(st.min_repeats, a.size)
        while True:
            if a.size < n:
                new = np.asarray(evaluate(v, range(a.size, n)), dtype=float).reshape(-1)
                a = np.concatenate([a, new])
                points[v] = a
            q, se = st.statistic(a)
            if abs(q - st.target) > st.z_decision * se or n >= st.max_repeats:
                return q >= st.target
            n = min(st.max_repeats, 2 * n)

    res = SearchResult()
    if knob.integer:
        lo_b, hi_b = int(knob.lower), int(knob.upper)
        b0 = int(round(card)) if card and card > 0 else 8
        b0 = min(max(b0, lo_b), hi_b)
        if decide(b0):
            passing, failing = b0, lo_b - 1
        elif decide(hi_b):
            passing, failing = hi_b, b0
        else:
            passing, failing = None, hi_b
            res.status = "below range"
        if passing is not None:
            while passing - failing > 1:
                mid = (passing + failing) // 2
                if decide(mid):
                    passing = mid
                else:
                    failing = mid
            res.limit = float(passing)
            res.failing = float(failing) if failing >= lo_b else float("nan")
            if failing < lo_b:
                res.status = "above range"  # even the fewest bits searched pass
    else:
        v0 = card if card > 0 else knob.first
        step = st.step
        if decide(v0):
            lo, hi = v0, min(v0 * step, knob.upper)
            while lo < knob.upper and decide(hi):
                lo, hi = hi, min(hi * step, knob.upper)
            if lo >= knob.upper:
                res.status, hi = "above range", float("nan")
        else:
            hi, lo = v0, max(v0 / step, knob.lower)
            tried = [v0]
            while hi > knob.lower and not decide(lo):
                tried.append(lo)
                if len(tried) >= 3 and not _improves(points, tried[-3], tried[-1], st):
                    res.message = (f"the target is not met by this knob alone: A* does not "
                                   f"rise from {tried[-3]:.3g} to {tried[-1]:.3g} (other "
                                   "nonidealities dominate)")
                    hi = knob.lower
                    break
                hi, lo = lo, max(lo / step, knob.lower)
            if hi <= knob.lower:
                res.status, lo = "below range", float("nan")
        if res.status == "limit":
            while hi / lo > 1.0 + st.rtol:
                mid = math.sqrt(lo * hi)
                if decide(mid):
                    lo = mid
                else:
                    hi = mid
        res.limit, res.failing = float(lo), float(hi)
    vals = sorted(points)
    for v in vals:
        q, se = st.statistic(points[v])
        res.values.append(float(v))
        res.q.append(q)
        res.se.append(se)
        res.mean.append(float(points[v].mean()))
        res.n.append(int(points[v].size))
    if np.isfinite(res.limit) and res.limit in points:
        res.fraction_at_limit = float(np.mean(points[res.limit] >= st.target))
    res.monotone, note = _check_monotone(res.values, res.q, res.se, not knob.integer, st)
    res.message = "; ".join(m for m in (res.message, note) if m)
    return res


# ------------------------------------------------------------------------------- evaluators
def _measure(analog, metric, data, keys, t: float) -> np.ndarray:
    """Program ``analog`` with each key's draws, move it to ``t`` and measure ``metric``."""
    out = np.empty(len(keys))
    with one_thread(), torch.no_grad():
        for i, key in enumerate(keys):
            gen = np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
            ann.program(analog, rng=gen)
            ann.drift(analog, float(t), rng=gen)
            out[i] = float(metric(analog, data))
        ann.forget_programming(analog)
    return out


@dataclass
class _SpecEvaluator:
    """A workload's HWA-trained model (a ModelSpec); with ``retrain`` trained again per value."""

    spec: object
    cfg: CrossbarConfig
    device: object
    fp_error: float
    chance_error: float
    retrain: dict | None = None

    def errors(self, cfg, device, keys, t) -> np.ndarray:
        spec = self.spec
        if self.retrain is not None:
            spec = prepare_models(cfg=cfg, device=device, progress=False,
                                  **self.retrain).specs["hwa"]
        else:
            spec = spec.replace(cfg=cfg, device=device)
        return np.array([evaluate_task(spec, key, (float(t),))[0] for key in keys])


@dataclass
class _ModelEvaluator:
    """The user's analog model, test data and metric; with ``train_data`` and ``retrain`` an
    HWA fine-tuning of ``hwa_epochs`` per value (from the same starting weights)."""

    analog: torch.nn.Module
    test_data: object
    metric: Callable
    cfg: CrossbarConfig
    device: object
    fp_error: float
    chance_error: float
    train_data: object = None
    retrain: bool = False
    hwa_epochs: int = 1
    seed: int = 0
    loss_fn: Callable = F.cross_entropy
    _cache: dict = field(default_factory=dict, repr=False)

    def errors(self, cfg, device, keys, t) -> np.ndarray:
        model = ann.with_hardware(self.analog, cfg, device)
        if self.retrain:
            ann.reseed(model, [self.seed, 7])
            ann.train_hwa(model, self.train_data, epochs=self.hwa_epochs,
                          loss_fn=self.loss_fn, progress=False)
        return _measure(model.eval(), self.metric, self.test_data, keys, t)


def _a_star(evaluator, err):
    return ann.normalized_accuracy(np.asarray(err), evaluator.fp_error, evaluator.chance_error)


def _search_task(evaluator, knob_name: str, t: float, seed: int, settings: dict) -> dict:
    """One (knob, time) search; a plain function of its arguments (a Dask task)."""
    knob = KNOBS[knob_name]
    st = SearchSettings(**settings)
    cfg0, dev0 = evaluator.cfg, evaluator.device

    def evaluate(v, repeats):
        c, d = knob.apply(cfg0, dev0, v)
        err = evaluator.errors(c, d, [(seed, 300, r) for r in repeats], t)
        return _a_star(evaluator, err)

    t0 = time.perf_counter()
    res = search_limit(evaluate, knob.card(cfg0, dev0), knob, st).to_dict()
    res["seconds"] = time.perf_counter() - t0
    return res


def _card_task(evaluator, device, draw: int, t: float, seed: int, repeats: int) -> list:
    """A* of ``repeats`` programming repeats of the card (draw -1, the draws of the searches)
    or of calibration draw ``draw``."""
    keys = [(seed, 300, r) if draw < 0 else (seed, 501 + draw, r) for r in range(repeats)]
    dev = evaluator.device if device is None else device
    return _a_star(evaluator, evaluator.errors(evaluator.cfg, dev, keys, t)).tolist()


#: Split of the spread of A* into calibration and programming parts (re-exported).
calibration_spread = ann.calibration_spread


def evaluate_calibration(analog: torch.nn.Module, data, device, uncertainty=None,
                         n_models: int = 8, metric: Callable = ann.classification_error,
                         times=ann.PAPER_TIMES, repeats: int = 5, rng=0,
                         fp_error: float | None = None, chance_error: float | None = None,
                         progress: bool = False) -> xr.Dataset:
    """:func:`aimc_device.nn.evaluate_over_time` with ``calibration_samples`` for a device card:
    plausible device models drawn from the card's fit covariance, the spread of A* split into
    its calibration and programming parts.

    Parameters
    ----------
    analog : nn.Module, an analog model (HWA-trained); not modified
    data : evaluation data, passed to ``metric``
    device : PCMModel or device card path (a card keeps its covariance)
    uncertainty : ParameterCovariance, optional; default the card's
    n_models : int, plausible device models (>= 2)
    metric, times, repeats, fp_error, chance_error, progress : as in ``evaluate_over_time``
        (``repeats`` >= 2 per model)
    rng : int, seeds the draws of the models and the programming repeats

    Returns
    -------
    xarray.Dataset: ``{metric}(draw, repeat, time)``; with ``fp_error`` and ``chance_error``
    also ``normalized_accuracy(draw, repeat, time)``, ``calibration_spread(time)`` and
    ``repeat_spread(time)`` (standard deviations of A*,
    :func:`aimc_device.nn.calibration_spread`).
    """
    dev, _ = resolve_device(device)
    if uncertainty is None and device_inputs(device):
        uncertainty = load_device_uncertainty(os.fspath(device))
    if uncertainty is None:
        raise ValueError("evaluate_calibration: the device keeps no fit covariance; pass "
                         "uncertainty= or a card fitted by this version")
    return ann.evaluate_over_time(ann.with_hardware(analog, None, dev), data, metric, times,
                                  repeats, rng=rng, fp_error=fp_error,
                                  chance_error=chance_error, progress=progress,
                                  name=getattr(metric, "__name__", "error"),
                                  uncertainty=uncertainty, calibration_samples=n_models)


# ------------------------------------------------------------------------------- the run
def _user_model(model, train_data, test_data, metric, fp_error, chance_error, cfg, dev,
                digital_layers, hwa_epochs, seed, progress, loss_fn):
    """(analog model HWA-trained once, fp_error, chance_error) for the user's model."""
    from ..workloads import chance_error as _chance

    if test_data is None:
        raise ValueError("requirements: with model=, give test_data (an iterable of (inputs, "
                         "targets) batches) and optionally train_data and metric")
    metric = metric or ann.classification_error
    analog = model
    if not ann.analog_tiles(model):
        if fp_error is None:
            fp_error = float(metric(model.eval(), test_data))
        analog = ann.convert(model, cfg, dev, digital=tuple(digital_layers or ()), rng=seed)
        if train_data is not None:
            ann.reseed(analog, [seed, 6])
            ann.train_hwa(analog, train_data, epochs=int(hwa_epochs or 1), loss_fn=loss_fn,
                          progress=progress)
    elif fp_error is None:
        raise ValueError("requirements: model is already analog; give fp_error (the metric of "
                         "the floating-point model)")
    if chance_error is None:
        if metric is not ann.classification_error:
            raise ValueError("requirements: give chance_error (the metric of a model that "
                             "learned nothing) for a metric other than classification_error")
        chance_error = _chance(torch.cat([y for _, y in test_data]))
    return analog.eval(), float(fp_error), float(chance_error)


def requirements(workload="cnn", device=None, cfg: CrossbarConfig | None = None, *,
                 target: float = 0.99, times=REQUIREMENT_TIMES, knobs=None,
                 coverage: float = 0.9, min_repeats: int = 4, max_repeats: int = 16,
                 rtol: float = 0.1, retrain: bool = False, calibration_samples: int = 0,
                 calibration_repeats: int = 4, uncertainty: ParameterCovariance | None = None,
                 model=None, train_data=None, test_data=None, metric=None, fp_error=None,
                 chance_error=None, loss_fn: Callable = F.cross_entropy,
                 out_dir="requirements-out", seed: int = 0,
                 quick: bool = False, hwa_epochs: int | None = None, scheduler=None,
                 progress: bool = True, plot: bool = True, verbose: bool = True,
                 overwrite: bool = False, command: str | None = None,
                 **study_kwargs) -> xr.Dataset:
    """The limit of each knob at which the network still meets ``target`` at each time.

    Parameters
    ----------
    workload : str or Workload, the network and data (ignored when ``model`` is given)
    device : PCMModel, EmpiricalModel, preset name or device card path; default "rasch2023"
    cfg : CrossbarConfig, the periphery (default the paper's standard model)
    target : float, A* to meet (0.99)
    times : sequence of float, times after programming [s] (default 1 h, 1 day, 1 year)
    knobs : sequence of str, optional; default all of :data:`KNOBS`
    coverage : float, fraction of programming repeats that must meet the target (0.9)
    min_repeats, max_repeats : int, programming repeats per value, first and at most
    rtol : float, relative precision of a continuous limit (0.1: within 10 %)
    retrain : bool, HWA-train again at every value searched (default: trained once)
    calibration_samples : int, plausible device models drawn from the card's fit covariance
        (0: none); needs a card that keeps one, or ``uncertainty``
    calibration_repeats : int, programming repeats per calibration draw (>= 2)
    uncertainty : ParameterCovariance, optional; default the card's
    model : torch.nn.Module, optional, the user's own network: a trained floating-point model
        (converted and HWA-trained once on ``train_data`` for ``hwa_epochs``, default 1) or an
        analog model already HWA-trained
    train_data, test_data : iterables of (inputs, targets) batches (DataLoaders)
    metric : callable(model, data) -> float, lower is better; default classification error
    fp_error, chance_error : float, the metric of the floating-point model and of chance
        (computed where possible)
    loss_fn : callable(outputs, targets) -> loss, the training loss of the user's model in HWA
        training (once, and at every value with ``retrain``); default cross-entropy
    out_dir : folder of checkpoints and of ``<workload>-requirements.nc/.txt/.png``
    seed : int, seeds training, programming repeats and calibration draws
    quick : bool, the workload's quick settings
    hwa_epochs : int, optional, as in :func:`run_study`
    scheduler : None (a LocalCluster), "synchronous", an address or a distributed.Client
    progress, plot, verbose, overwrite : as in :func:`run_study`
    command : str, optional, the command line that ran this (shown on the figure)
    **study_kwargs : passed to :func:`prepare_models`

    Returns
    -------
    xarray.Dataset
        ``limit(knob, time)`` in the knob's units (``unit``), ``failing(knob, time)``,
        ``status``, ``monotone``, ``card_value(knob)``, ``headroom(knob, time)`` (limit / card
        value; for bits, card bits - limit), ``fraction_at_limit``, ``repeats_used``,
        ``a_star_card(time, repeat)``; with calibration draws ``a_star_calibration(draw,
        time, repeat)``, ``calibration_spread(time)``, ``repeat_spread(time)``.
    """
    settings = SearchSettings(target=target, coverage=coverage, min_repeats=min_repeats,
                              max_repeats=max_repeats, rtol=rtol)
    times = check_times(times)
    names = _check_knobs(knobs)
    check_bool(retrain, "retrain")
    check_bool(plot, "plot")
    check_bool(verbose, "verbose")
    check_int(calibration_samples, "calibration_samples", lo=0)
    check_int(calibration_repeats, "calibration_repeats", lo=2)
    t_start = time.perf_counter()
    dev, prov = resolve_device(device)
    if calibration_samples:
        if uncertainty is None and device_inputs(device):
            uncertainty = load_device_uncertainty(os.fspath(device))
        if uncertainty is None:
            raise ValueError("calibration_samples: the device card keeps no fit covariance "
                             "(fit it again with this version: aimc-device fit), or pass "
                             "uncertainty=")
        draws = uncertainty.sample_models(dev, calibration_samples, rng=[seed, 501])
    else:
        draws = []
    name = "model" if model is not None else workload_name(workload)
    stem = os.path.join(os.fspath(out_dir), f"{name}-requirements")
    check_outputs(stem, plot, inputs=device_inputs(device), overwrite=overwrite)
    cfg = cfg if cfg is not None else CrossbarConfig()
    if model is not None:
        analog, fp_err, ch_err = _user_model(model, train_data, test_data, metric, fp_error,
                                             chance_error, cfg, dev,
                                             study_kwargs.get("digital_layers"), hwa_epochs,
                                             seed, progress, loss_fn)
        evaluator = _ModelEvaluator(analog, test_data, metric or ann.classification_error, cfg,
                                    dev, fp_err, ch_err, train_data, retrain,
                                    int(hwa_epochs or 1), seed, loss_fn)
        token = fingerprint({"state": {k: v.tolist() for k, v in analog.state_dict().items()
                                       if ".prog_" not in k}})
        recipe = {"model": type(model).__name__}
        timings = {}
    else:
        prep = prepare_models(workload, device, cfg, out_dir, seed, quick, hwa_epochs,
                              progress=progress, **study_kwargs)
        again = ({"workload": workload, "out_dir": out_dir, "seed": seed, "quick": quick,
                  "hwa_epochs": hwa_epochs, **study_kwargs} if retrain else None)
        evaluator = _SpecEvaluator(prep.specs["hwa"], prep.cfg, prep.device, prep.fp_error,
                                   prep.chance_error, again)
        token = prep.specs["hwa"].token
        recipe = prep.settings
        prov = prep.device_provenance
        timings = dict(prep.timings)
    run_settings = {"search": settings.__dict__, "seed": int(seed), "retrain": retrain,
                    "model": token, "cfg": cfg.to_dict(), "device": str(dev.to_dict()),
                    "calibration": [calibration_samples, calibration_repeats]}
    ckpt = os.path.join(os.fspath(out_dir), "checkpoints",
                        f"{name}-requirements-{fingerprint(run_settings)}.pt")
    done = (load_checkpoint(ckpt, run_settings) or {}).get("results", {})
    searches = [("search", n, float(t)) for n in names for t in times]
    others = [("card", -1, float(t)) for t in times]
    others += [("calibration", k, float(t)) for k in range(len(draws)) for t in times]
    searches = [j for j in searches if _job_key(j) not in done]
    others = [j for j in others if _job_key(j) not in done]
    search_calls = [(0, n, t, int(seed), dict(settings.__dict__)) for _, n, t in searches]
    other_calls = [(0, None, -1, t, int(seed), settings.max_repeats) if kind == "card" else
                   (0, draws[k], k, t, int(seed), calibration_repeats)
                   for kind, k, t in others]

    def saver(jobs):
        def saved(i, res):
            done[_job_key(jobs[i])] = res
            atomic_save({"results": done, "settings": json.dumps(run_settings, sort_keys=True,
                                                                 default=str)}, ckpt)
        return saved

    t0 = time.perf_counter()
    with _dask.session(scheduler) as sched:
        _dask.compute(_search_task, [evaluator], search_calls, scheduler=sched,
                      progress=progress, desc="requirements (knob x time)",
                      on_result=saver(searches))
        _dask.compute(_card_task, [evaluator], other_calls, scheduler=sched, progress=progress,
                      desc="card and calibration draws", on_result=saver(others))
    timings["search_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    ds = _to_dataset(done, names, times, evaluator, settings, draws, calibration_repeats,
                     seed, recipe, prov, timings, scheduler, name, retrain)
    ds.attrs["command"] = command or f"aimc_device.study.requirements({name!r}, ...)"
    ds.attrs["hardware"] = hardware_description()
    for n in names:
        for t in times:
            if not done[_job_key(("search", n, t))]["monotone"]:
                warnings.warn(f"requirements: {n} at {_label(t)}: "
                              f"{done[_job_key(('search', n, t))]['message']}", stacklevel=2)
    write_outputs(ds, stem, format_requirements_table, plot_requirements if plot else None,
                  verbose, inputs=device_inputs(device), overwrite=overwrite)
    return ds


def _job_key(job) -> str:
    kind, what, t = job
    return f"{kind}|{what}|{t!r}"


def _label(t: float) -> str:
    return TIME_LABELS.get(float(t), f"{t:g} s")


def _check_knobs(knobs) -> list[str]:
    if knobs is None:
        return list(KNOBS)
    if isinstance(knobs, (str, bytes)) or not hasattr(knobs, "__iter__"):
        raise TypeError(f"knobs = {knobs!r}: give a list of names from {list(KNOBS)}")
    names = list(knobs)
    unknown = [n for n in names if n not in KNOBS]
    if unknown or not names:
        raise ValueError(f"knobs: unknown {unknown or 'none given'}; choose from {list(KNOBS)}")
    return names


def _to_dataset(done, names, times, ev, st: SearchSettings, draws, cal_repeats, seed, recipe,
                prov, timings, scheduler, name, retrain) -> xr.Dataset:
    nk, nt = len(names), len(times)
    limit = np.full((nk, nt), np.nan)
    failing = np.full((nk, nt), np.nan)
    frac = np.full((nk, nt), np.nan)
    used = np.zeros((nk, nt), dtype=np.int64)
    evals = np.zeros((nk, nt), dtype=np.int64)
    mono = np.ones((nk, nt), dtype=bool)
    status = np.empty((nk, nt), dtype=object)
    points = {}
    for i, n in enumerate(names):
        for j, t in enumerate(times):
            r = done[_job_key(("search", n, t))]
            limit[i, j], failing[i, j] = r["limit"], r["failing"]
            frac[i, j], mono[i, j], status[i, j] = r["fraction_at_limit"], r["monotone"], \
                r["status"]
            used[i, j], evals[i, j] = int(np.sum(r["n"])), len(r["values"])
            points[f"{n} @ {_label(t)}"] = {k: r[k] for k in ("values", "q", "se", "n",
                                                                "message")}
    card = np.array([KNOBS[n].card(ev.cfg, ev.device) for n in names])
    integer = np.array([KNOBS[n].integer for n in names])
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(integer[:, None], card[:, None] - limit, limit / card[:, None])
    a_card = np.array([done[_job_key(("card", -1, float(t)))] for t in times])
    data = {
        "limit": (("knob", "time"), limit, {"long_name": "limit meeting the target (see "
                                                         "'unit')"}),
        "failing": (("knob", "time"), failing, {"long_name": "nearest value found to fail"}),
        "status": (("knob", "time"), status.astype(str)),
        "monotone": (("knob", "time"), mono),
        "card_value": (("knob",), card),
        "headroom": (("knob", "time"), head, {"long_name": "limit / card value (bits: card "
                                                           "bits - fewest bits)"}),
        "fraction_at_limit": (("knob", "time"), frac),
        "repeats_used": (("knob", "time"), used),
        "values_evaluated": (("knob", "time"), evals),
        "a_star_card": (("time", "repeat"), a_card, {"long_name": "A* of the card"}),
    }
    coords = {"knob": names, "time": ("time", np.asarray(times), {"units": "s"}),
              "time_label": ("time", [_label(t) for t in times]),
              "unit": ("knob", [KNOBS[n].unit for n in names]),
              "kind": ("knob", [KNOBS[n].kind for n in names]),
              "repeat": np.arange(a_card.shape[1])}
    if draws:
        cal = np.array([[done[_job_key(("calibration", k, float(t)))] for t in times]
                        for k in range(len(draws))])  # (draw, time, repeat)
        sp = calibration_spread(np.moveaxis(cal, 0, 1))
        data["a_star_calibration"] = (("draw", "time", "cal_repeat"), cal)
        data["calibration_spread"] = (("time",), sp["calibration"], {
            "long_name": "std of A* from the calibration (fit covariance)"})
        data["repeat_spread"] = (("time",), sp["repeat"], {
            "long_name": "std of A* from programming repeats"})
        coords.update(draw=np.arange(len(draws)), cal_repeat=np.arange(cal.shape[2]))
    return xr.Dataset(data, coords=coords, attrs={
        "title": f"aimc-device requirements: {name}", "workload": name,
        "target": st.target, "coverage": st.coverage,
        "confidence": f"at each limit the {st.coverage:g} quantile of A* over programming "
                      f"repeats (normal model) is >= {st.target:g}, i.e. about "
                      f"{100 * (1 - st.coverage):.0f} % of repeats may fall below the target",
        "search": json.dumps(st.__dict__), "retrain": int(retrain), "seed": int(seed),
        "seed_scheme": "repeat r: SeedSequence([seed, 300, r]) at every value of every knob "
                       "and for the card; calibration draw d: [seed, 501 + d, r]",
        "fp_error": float(ev.fp_error), "chance_error": float(ev.chance_error),
        "search_points": json.dumps(points, default=float),
        "settings": json.dumps(recipe, sort_keys=True, default=str),
        "crossbar_config": json.dumps(ev.cfg.to_dict(), default=str),
        "device_model": json.dumps(ev.device.to_dict(), default=lambda a: np.asarray(
            a).tolist()),
        "device_provenance": json.dumps(prov, default=str),
        "timings": json.dumps(timings), "scheduler": _dask.scheduler_label(scheduler),
        "package_version": __version__,
        "references": "M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Fig. 4 (knobs)"})


# --------------------------------------------------------------------------- presentation
def _fmt(v: float, integer: bool) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{int(v)}" if integer else f"{v:.3g}"


def format_requirements_table(ds: xr.Dataset) -> str:
    """The spec sheet: knob, limit at each time, the card's value and the headroom."""
    times = [str(s) for s in ds["time_label"].values]
    head = f"{'knob':24s} {'unit':44s} {'card':>8s} " + " ".join(
        f"{'limit ' + s:>11s} {'headroom':>8s}" for s in times)
    lines = [f"{ds.attrs.get('title', '')}: target A* >= {ds.attrs['target']:g} "
             f"({ds.attrs['confidence']})", head, "-" * len(head)]
    for n in ds["knob"].values:
        sub = ds.sel(knob=n)
        integer = KNOBS[str(n)].integer
        row = f"{str(n):24s} {str(sub['unit'].values):44s} " \
              f"{_fmt(float(sub['card_value']), integer):>8s} "
        cells = []
        for j in range(ds.sizes["time"]):
            s = str(sub["status"].values[j])
            lim = float(sub["limit"].values[j])
            h = float(sub["headroom"].values[j])
            mark = "" if bool(sub["monotone"].values[j]) else "!"
            if s == "above range":  # passes over the whole range searched
                txt = f"<={int(lim)}" if integer else f">={_fmt(lim, False)}"
            elif s == "below range":  # fails over the whole range searched
                txt = "not met"
            else:
                txt = _fmt(lim, integer)
            hs = "-" if not np.isfinite(h) else (f"{h:+.0f}" if integer else f"x{h:.3g}")
            cells.append(f"{txt + mark:>11s} {hs:>8s}")
        lines.append(row + " ".join(cells))
    a = ds["a_star_card"]
    lines.append("A* of the card (mean over repeats): " + ", ".join(
        f"{s} {float(a.isel(time=j).mean()):.4f}" for j, s in enumerate(times)))
    if "calibration_spread" in ds:
        lines.append("spread of A* of the card (std): " + ", ".join(
            f"{s}: calibration {float(ds['calibration_spread'][j]):.4f}, programming "
            f"{float(ds['repeat_spread'][j]):.4f}" for j, s in enumerate(times)))
    lines += _not_met_notes(ds)
    lines.append("headroom: limit / card value (bits: card bits - fewest bits meeting the "
                 "target); '!': A* not monotone along the knob (see the result's "
                 "search_points)")
    return "\n".join(lines)


def _not_met_notes(ds: xr.Dataset) -> list[str]:
    """One line per knob that misses the target over its whole range: the best A* it reached.

    A knob that fails even at its best value says that the setting it switches on costs more
    than the target allows by itself (the S-shaped ADC's transfer at any spread, for instance)
    or that other nonidealities dominate; the line gives that best value's A* quantile so that
    the shortfall can be read off.
    """
    points = json.loads(ds.attrs.get("search_points", "{}"))
    notes = []
    for n in ds["knob"].values:
        integer = KNOBS[str(n)].integer
        cells = []
        for j, label in enumerate(ds["time_label"].values):
            if str(ds["status"].sel(knob=n).values[j]) != "below range":
                continue
            p = points.get(f"{n} @ {label}")
            if not p or not p["values"]:
                continue
            best = int(np.argmax(p["values"]) if integer else np.argmin(p["values"]))
            cells.append(f"{label} A* {p['q'][best]:.4f} at {_fmt(p['values'][best], integer)}")
        if cells:
            notes.append(f"not met: {n}, best reached ({100 * ds.attrs['coverage']:.0f} % "
                         f"quantile): " + ", ".join(cells))
    return notes


def plot_requirements(ds: xr.Dataset, path, overwrite: bool = False) -> None:
    """One bar per knob from the best value to the limit (the allowed range), the card's value
    marked, one panel per time; relative to the card (log scale) for continuous knobs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [str(n) for n in ds["knob"].values]
    nt = ds.sizes["time"]
    fig, axes = plt.subplots(1, nt, figsize=(3.6 * nt + 1.6, 0.42 * len(names) + 1.6),
                             dpi=110, sharey=True, squeeze=False)
    for j, ax in enumerate(axes[0]):
        for i, n in enumerate(names):
            sub = ds.sel(knob=n).isel(time=j)
            card = float(sub["card_value"])
            lim = float(sub["limit"])
            s = str(sub["status"].values)
            knob = KNOBS[n]
            if knob.integer:  # allowed: limit .. 16 bits, shown as card bits - bits (log2 x)
                ref = card if card > 0 else 8
                lo = 2.0 ** (lim - ref) if np.isfinite(lim) else np.nan
                left, right = lo, 2.0 ** (knob.upper - ref)
                color = "tab:blue"
            else:
                ref = card if card > 0 else knob.first  # a card without it: vs knob.first
                left = knob.lower / ref
                right = lim / ref if np.isfinite(lim) else (
                    knob.upper / ref if s == "above range" else np.nan)
                color = "tab:green" if s != "above range" else "tab:olive"
            if np.isfinite(left) and np.isfinite(right):
                ax.barh(i, right - left, left=left, height=0.6, color=color, alpha=0.7)
            elif s == "below range":
                ax.text(1.3, i, "not met", va="center", fontsize=7, color="tab:red")
            if card > 0 or knob.integer:
                ax.plot([1.0], [i], marker="|", ms=14, mew=2.5, color="k")
            if not bool(sub["monotone"]):
                ax.text(right if np.isfinite(right) else 1.0, i, " !", va="center",
                        color="tab:red")
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(1e-2, 1e2)
        ax.set_title(f"t = {ds['time_label'].values[j]}", fontsize=9)
        ax.set_xlabel("allowed, relative to the card (bits: 2^(bits - card))", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    # A knob the card does not have (no stuck devices, no S-ADC) is shown against its first value.
    labels = [n if float(ds["card_value"].sel(knob=n)) > 0 or KNOBS[n].integer
              else f"{n}\n(card: none; 1 = {KNOBS[n].first:g})" for n in names]
    axes[0][0].set_yticks(range(len(names)), labels, fontsize=8)
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)  # first knob on top, every row in view
    fig.suptitle(f"{ds.attrs.get('title', '')}: A* >= {ds.attrs['target']:g} for "
                 f"{100 * ds.attrs['coverage']:.0f} % of programming repeats; | = card\n"
                 f"{provenance_line(ds)}",
                 fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, path, overwrite=overwrite)
    finally:
        plt.close(fig)
