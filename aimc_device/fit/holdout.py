"""Hold-out test of a device-model fit, for any family: fit on half the devices of each level,
predict the other half, two-sample Kolmogorov-Smirnov test per level and time.

The split is deterministic: within each level the devices are ordered by a hash of (seed, device
index) and the first half (rounded up) is fitted. The model is sampled through
:func:`aimc_device.pcm.program` / :func:`aimc_device.pcm.read` (any family) at the held-out
devices' targets, ``draws`` independent programmings, at each time; its reads are compared with
one read per held-out device (the first repeat that was read), see :func:`compare_to_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from scipy import stats

from . import _empirical_kernels as EK
from ._stats import FitError
from .criterion import (Criterion, first_read, fitted_numbers, model_reads, read_log_likelihood,
                        time_nodes)

__all__ = ["HoldoutResult", "holdout_ks", "split_devices", "compare_to_model"]


@dataclass
class HoldoutResult:
    """Per level (K) and time (M): the two-sample KS test of held-out devices against the model.

    Attributes
    ----------
    levels : (K,) relative targets x = g_target / g_max
    times : (M,) times at which both were compared [s]
    statistic, pvalue : (K, M) KS distance and p-value (NaN where a level had < 2 reads)
    n_test, n_model : (K, M) held-out reads and model reads compared
    family : str, the fitted model's family
    model : the model fitted on the other half
    notes : list of str
    criterion : Criterion or None, the predictive log-likelihood of both halves (from
        :func:`holdout_ks`)
    """

    levels: np.ndarray
    times: np.ndarray
    statistic: np.ndarray
    pvalue: np.ndarray
    n_test: np.ndarray
    n_model: np.ndarray
    family: str
    model: object = None
    notes: list = field(default_factory=list)
    criterion: Criterion | None = None

    def passing(self, alpha: float = 0.01) -> np.ndarray:
        """(K, M) bool: p > alpha (False where not tested)."""
        return np.nan_to_num(self.pvalue, nan=-1.0) > alpha

    def fraction_passing(self, alpha: float = 0.01) -> float:
        """Fraction of the tested (level, time) cells with p > alpha."""
        tested = np.isfinite(self.pvalue)
        return float(self.passing(alpha)[tested].mean()) if tested.any() else float("nan")

    def fraction_passing_per_time(self, alpha: float = 0.01) -> np.ndarray:
        """(M,) fraction of the tested levels with p > alpha at each time."""
        tested = np.isfinite(self.pvalue)
        ok = self.passing(alpha)
        return np.array([ok[tested[:, m], m].mean() if tested[:, m].any() else np.nan
                         for m in range(self.times.size)])

    def summary(self, alpha: float = 0.01) -> str:
        """Plain text: fraction of levels passing per time."""
        lines = [f"hold-out KS ({self.family}): {self.fraction_passing(alpha):.1%} of (level, "
                 f"time) cells with p > {alpha:g}"]
        for m, t in enumerate(self.times):
            lines.append(f"  t = {t:10.4g} s: {self.fraction_passing_per_time(alpha)[m]:.1%} of "
                         f"levels pass, median p = {np.nanmedian(self.pvalue[:, m]):.3g}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def passing_per_level(self, alpha: float = 0.01) -> list[str]:
        """One line per level: the times whose test passes (p > alpha), of those tested."""
        tested = np.isfinite(self.pvalue)
        ok = self.passing(alpha)
        return [f"x = {x:.4g}: {int(ok[k].sum())}/{int(tested[k].sum())} times pass, "
                f"min p = {np.nanmin(self.pvalue[k]) if tested[k].any() else np.nan:.3g}"
                for k, x in enumerate(self.levels)]

    def to_dict(self) -> dict:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
               for k, v in self.__dict__.items() if k not in ("model", "criterion")}
        if self.criterion is not None:
            out["criterion"] = self.criterion.to_dict()
        return out


def split_devices(g_target, seed: int = 0, use=None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic halves of the devices of each level.

    Parameters
    ----------
    g_target : array (N,), target conductance [S]; devices of equal target form a level
    seed : int
    use : bool array (N,), optional, devices to split (others are in neither half)

    Returns
    -------
    (fit_idx, test_idx) : sorted device indices; per level the first ceil(n / 2) devices in
    the order of hash(seed, index) are fitted.
    """
    g_target = np.asarray(g_target)
    n = g_target.size
    key = np.uint64(np.random.SeedSequence(int(seed)).generate_state(1, dtype=np.uint64)[0])
    h = EK.device_hashes(key, n)
    idx = np.arange(n) if use is None else np.flatnonzero(use)
    _, level = np.unique(g_target[idx], return_inverse=True)
    order = np.lexsort((h[idx], level))
    lev_sorted = level[order]
    start = np.searchsorted(lev_sorted, lev_sorted, side="left")
    count = np.bincount(lev_sorted)
    rank = np.arange(order.size) - start
    in_fit = rank < (count[lev_sorted] + 1) // 2
    return np.sort(idx[order[in_fit]]), np.sort(idx[order[~in_fit]])


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    v = np.concatenate([a, b])
    fa = np.searchsorted(a, v, side="right") / a.size
    fb = np.searchsorted(b, v, side="right") / b.size
    return float(np.abs(fa - fb).max())


def compare_to_model(model, ds: xr.Dataset, *, times=None, n_fit=None, seed: int = 0,
                     draws: int = 8) -> HoldoutResult:
    """Kolmogorov-Smirnov test per level and time of a campaign's reads against a model.

    The model programs the campaign's targets ``draws`` times and reads them at each time
    (:func:`aimc_device.pcm.program` / :func:`aimc_device.pcm.read`, any family); the KS distance
    D is that between one read per device (the first repeat that was read) and all the model's
    reads. The p-value is that of a two-sample test of sizes (reads, ``n_fit``) (the asymptotic
    Kolmogorov law with Stephens' correction, as :func:`scipy.stats.ks_2samp`'s "asymp" method):
    a model fitted to ``n_fit`` devices of a level knows their distribution no better than a
    sample of that size. ``n_fit=None`` takes the model's reads as the sample.

    Parameters
    ----------
    model : a device model (PCMModel, EmpiricalModel)
    ds : xarray.Dataset, the campaign (loaded into memory)
    times : array (T,) or (N, T), optional, equivalent times of the reads [s]; default
        ``read_time`` if present, else the ``time`` coordinate. Per-device times: each time
        index is read at the mean log-time ln((t + t0)/t0) of its reads.
    n_fit : int or array (K,) per level (sorted targets), optional
    seed : int; draws : int

    Returns
    -------
    HoldoutResult
    """
    g_target, g, t_nodes = _reads(ds, times)
    sims = model_reads(model, g_target, t_nodes, seed, draws)
    return _ks_cells(model, g_target, g, t_nodes, sims, n_fit, float(ds.attrs["g_max"]))


def _ks_cells(model, g_target, g, t_nodes, sims, n_fit, g_max: float) -> HoldoutResult:
    """The KS tests of :func:`compare_to_model` of reads g (n, T) against the model's reads
    ``sims`` (draws, n, T)."""
    levels, lev = np.unique(g_target, return_inverse=True)
    t_n = t_nodes.size
    n_ref = (np.full(levels.size, -1) if n_fit is None
             else np.broadcast_to(np.asarray(n_fit), levels.shape))
    shape = (levels.size, t_n)
    stat, pval = np.full(shape, np.nan), np.full(shape, np.nan)
    n_test, n_model = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for k in range(levels.size):
        rows = lev == k
        for m in range(t_n):
            data = g[rows, m]
            data = data[np.isfinite(data)]
            sim = sims[:, rows, m].ravel()
            n_test[k, m], n_model[k, m] = data.size, sim.size
            if data.size < 2:
                continue
            stat[k, m] = _ks_distance(data, sim)
            n2 = n_ref[k] if n_ref[k] > 0 else sim.size
            en = np.sqrt(data.size * n2 / (data.size + n2))
            pval[k, m] = stats.kstwobign.sf((en + 0.12 + 0.11 / en) * stat[k, m])
    return HoldoutResult(levels=levels.astype(float) / g_max, times=t_nodes, statistic=stat,
                         pvalue=pval, n_test=n_test, n_model=n_model,
                         family=getattr(model, "family", type(model).__name__), model=model)


def _reads(ds: xr.Dataset, times):
    """(g_target (n,) [S], first read per device and time (n, T) [S], time nodes (T,) [s])."""
    g_target = np.asarray(ds["g_target"].values)
    g = first_read(np.asarray(ds["g"].values))
    if times is None:
        times = ds["read_time"].values if "read_time" in ds else ds["time"].values
    return g_target, g, time_nodes(g, times, float(ds.attrs["t0"]))


def holdout_ks(ds: xr.Dataset, fit_function=None, *, times=None, exclude=None, seed: int = 0,
               draws: int = 8, **fit_kwargs) -> HoldoutResult:
    """Fit on half the devices of each level, test the other half, KS per level and time.

    Parameters
    ----------
    ds : xarray.Dataset, a campaign (loaded into memory per half)
    fit_function : callable ``fit_function(ds, **kwargs) -> (model, report)``
        Default :func:`aimc_device.fit.fit_empirical`; any family that
        :func:`aimc_device.pcm.program` / :func:`aimc_device.pcm.read` sample.
    times : array (T,) or (N, T), optional
        Equivalent times [s] of the reads, passed to the fit (its half) and used for the model's
        reads (see :func:`compare_to_model`).
    exclude : array of int or bool (N,), optional
        Devices left out of both halves (with the campaign's ``valid`` mask).
    seed : int, the split and the model's draws
    draws : int, independent programmings of the held-out targets
    **fit_kwargs : passed to ``fit_function``

    Returns
    -------
    HoldoutResult, p-values of a two-sample test of sizes (held-out reads, fitted devices)
    (see :func:`compare_to_model`), with its ``criterion``: the model's predictive
    log-likelihood of the reads of the fitted and of the held-out half, AIC and BIC
    (:class:`aimc_device.fit.criterion.Criterion`).
    """
    if fit_function is None:
        from .empirical_fit import fit_empirical as fit_function
    n = ds.sizes["device"]
    use = np.ones(n, bool)
    if "valid" in ds:
        use &= np.asarray(ds["valid"].values, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        use &= ~(ex if ex.dtype == bool else np.isin(np.arange(n), ex))
    g_target = np.asarray(ds["g_target"].values)
    fit_idx, test_idx = split_devices(g_target, seed, use)
    if test_idx.size == 0:
        raise FitError("holdout_ks: no device to test (every level has one device)")
    per_device = times is not None and np.ndim(times) == 2
    kw = dict(fit_kwargs)
    if times is not None:
        kw["times"] = np.asarray(times)[fit_idx] if per_device else np.asarray(times)
    fit_half = ds.isel(device=fit_idx)
    model, report = fit_function(fit_half, **kw)[:2]
    test_times = None
    if times is not None:
        test_times = np.asarray(times)[test_idx] if per_device else np.asarray(times)
    levels = np.unique(g_target[test_idx])
    n_fit = np.array([(g_target[fit_idx] == v).sum() for v in levels])
    g_max = float(ds.attrs["g_max"])
    gt_test, g_test, t_nodes = _reads(ds.isel(device=test_idx), test_times)
    sims = model_reads(model, gt_test, t_nodes, seed, draws)
    res = _ks_cells(model, gt_test, g_test, t_nodes, sims, n_fit, g_max)
    # the predictive log-likelihood on both halves, at the test half's time nodes
    _, ll_test, n_test = read_log_likelihood(model, gt_test, g_test, t_nodes, g_max, sims=sims)
    gt_fit, g_fit, _ = _reads(fit_half, kw.get("times"))
    tested = np.isin(gt_fit, levels)  # a level of one device has no held-out half
    _, ll_fit, n_fit_reads = read_log_likelihood(model, gt_fit[tested], g_fit[tested], t_nodes,
                                                 g_max, sims=sims, sims_targets=gt_test)
    res.criterion = Criterion(
        family=res.family, n_params=fitted_numbers(report), levels=res.levels, times=res.times,
        loglik=ll_fit, n_reads=n_fit_reads, loglik_heldout=ll_test, n_heldout=n_test)
    return res
