"""Model choice: fit both device-model families to a campaign, test each on held-out devices, keep
the one the data support.

:func:`fit_device` fits the PCM model of the paper (:func:`aimc_device.fit.fit_pcm`: a dozen
parameters in four functional forms) and the empirical family
(:func:`aimc_device.fit.fit_empirical`: the measured distributions per level and time), each in
one streaming pass over the campaign, and reports per component how well each describes the data
(PCM: reduced chi2, AIC and BIC of each form; empirical: the in-sample Kolmogorov-Smirnov distance
per level and time, and its number of tabulated values). It then runs the same hold-out test for
both (:func:`aimc_device.fit.holdout_ks`): each family is fitted again on half the devices of
each level and predicts the other half; a two-sample KS test per level and time compares them.

The decision rule (:data:`DECISION_RULE`): a (level, time) cell *fails* when its hold-out KS test
rejects the model at p <= ``alpha`` (0.01). A correct model fails in a fraction ``alpha`` of the
cells by chance, so in n cells it fails at most ``binom.ppf(0.99, n, alpha)`` times with 99 %
probability (the *chance limit*). The PCM family, the simpler one, is chosen when its failures
stay within the chance limit, or when its fraction of failing cells is no larger than the
empirical family's; otherwise the empirical family. A family whose fit refuses the campaign
(e.g. the PCM fit of one read per time at fewer than three times without a prior for the read
noise) is not a candidate, and the report says why. ``family="pcm"`` or ``"empirical"`` fits
that family alone (with its hold-out test) and keeps it.

Cost: the two full fits stream the campaign once each (the activation-energy fit once more when
the campaign has bakes at two or more temperatures); the hold-out runs on a sample of at most
``holdout_devices`` devices per level (the devices with the smallest hashes of their indices:
order-independent), read in one more pass at raw read speed, so that its cost and the power of
its tests do not grow with the file. The report gives the wall time of each step.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023): the PCM model (Eqs. 7-12).
.. [2] F. J. Massey, "The Kolmogorov-Smirnov test for goodness of fit", J. Am. Stat. Assoc. 46,
   68 (1951): the two-sample test of the hold-out.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
from scipy import stats

from .. import pcm
from .._checks import check_float, check_int
from ..io import DeviceExclusion, device_chunk_reader, resolve_device_model
from ..io.measurements import VECTOR_CHUNK_DEVICES, default_chunk_devices, target_levels
from ..pcm import PCMModel
from . import _empirical_kernels as EK
from ._stats import FIT_CHUNK_BYTES, FitError, campaign_temperatures
from .empirical_fit import EmpiricalFitReport, fit_empirical
from .criterion import first_read, time_nodes
from .holdout import holdout_ks
from .pcm_fit import fit_pcm
from .report import FitReport
from .temperature import equivalent_time, resolve_activation_energy

__all__ = ["fit_device", "DeviceFitReport", "DECISION_RULE", "FAMILIES", "HOLDOUT_DEVICES",
           "HOLDOUT_DRAWS", "ALPHA", "chance_limit"]

#: The device-model families :func:`fit_device` fits, simplest first.
FAMILIES = ("pcm", "empirical")
#: Devices per level in the hold-out sample (half fitted, half tested).
HOLDOUT_DEVICES = 2000
#: Programmings of the held-out targets by the model in the hold-out test.
HOLDOUT_DRAWS = 8
#: Significance level of a hold-out cell's KS test.
ALPHA = 0.01
#: Probability with which a correct model's failures stay within the chance limit.
_CHANCE_QUANTILE = 0.99
#: The decision rule, as stated in reports and device cards.
DECISION_RULE = (
    "a (level, time) cell fails when the hold-out two-sample KS test rejects the family at "
    f"p <= {ALPHA:g}; the PCM family (the simpler) is chosen when its failing cells stay within "
    f"what chance gives a correct model ({_CHANCE_QUANTILE:.0%} quantile of Binomial(cells, "
    f"{ALPHA:g})) or are no larger a fraction than the empirical family's; else the empirical "
    "family; a family whose fit refuses the campaign is not a candidate; when neither can be "
    "tested on held-out devices, the PCM family is kept")


def chance_limit(cells: int, alpha: float = ALPHA) -> int:
    """Most failing cells a correct model shows in ``cells`` KS tests at level ``alpha`` with 99 %
    probability: the 99 % quantile of Binomial(cells, alpha)."""
    return int(stats.binom.ppf(_CHANCE_QUANTILE, int(cells), float(alpha)))


@dataclass
class DeviceFitReport:
    """What :func:`fit_device` fitted, tested and chose.

    Attributes
    ----------
    family : str, the family chosen ("pcm" or "empirical")
    model : the chosen model
    choice : str, "auto" (by :data:`DECISION_RULE`) or "given" (``family=`` named it)
    reason : str, why this family (the numbers behind the rule, or the other family's refusal)
    rule : str, :data:`DECISION_RULE`
    models : dict family -> model fitted to the whole campaign
    reports : dict family -> its report (:class:`FitReport`, :class:`EmpiricalFitReport`)
    refused : dict family -> why its fit refused the campaign
    holdout : dict family -> :class:`~aimc_device.fit.HoldoutResult` on the hold-out sample
    holdout_refused : dict family -> why its hold-out fit refused the sample
    alpha : float, significance level of a hold-out cell
    holdout_devices : ndarray (K,), devices per level in the hold-out sample
    activation_energy : dict, E_a [eV], T_ref [K] and its source (shared by both families)
    qq : dict, measured and predicted quantiles for :meth:`plot`: ``levels`` (L,) relative
        targets, ``times`` (T,) [s], ``probs`` (P,), ``measured`` (L, T, P) and per family
        (L, T, P), all g / g_max
    timings : dict, step -> wall time [s]
    provenance : dict, for the device card: the chosen family's fit, the rule, the decision,
        both hold-out results and the timings
    """

    family: str
    model: object
    choice: str
    reason: str
    rule: str = DECISION_RULE
    models: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)
    holdout_refused: dict = field(default_factory=dict)
    alpha: float = ALPHA
    holdout_devices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    activation_energy: dict = field(default_factory=dict)
    qq: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def pcm(self) -> FitReport | None:
        """The PCM fit's report (None when not fitted or refused)."""
        return self.reports.get("pcm")

    @property
    def empirical(self) -> EmpiricalFitReport | None:
        """The empirical fit's report (None when not fitted or refused)."""
        return self.reports.get("empirical")

    def parameter_covariance(self):
        """The chosen model's calibration uncertainty for its device card: the PCM fit's
        :meth:`FitReport.parameter_covariance` when the PCM family was chosen, else None (the
        empirical family keeps no parameter covariance)."""
        return self.pcm.parameter_covariance() if self.family == "pcm" and self.pcm else None

    def failing(self, family: str) -> tuple[int, int]:
        """(failing cells, tested cells) of a family's hold-out test."""
        res = self.holdout[family]
        tested = np.isfinite(res.pvalue)
        return int((tested & ~res.passing(self.alpha)).sum()), int(tested.sum())

    def criteria(self) -> dict:
        """family -> :class:`aimc_device.fit.criterion.Criterion` of its hold-out fit: the
        predictive log-likelihood of the reads of the fitted half (AIC, BIC) and of the
        held-out half (per read)."""
        return {f: r.criterion for f, r in self.holdout.items() if r.criterion is not None}

    def better(self, what: str = "heldout") -> str | None:
        """The family the criterion ``what`` favours: "heldout" (the larger held-out
        log-likelihood per read), "aic" or "bic" (the smaller); None with fewer than two."""
        crits = self.criteria()
        if len(crits) < 2:
            return None
        if what == "heldout":
            return max(crits, key=lambda f: crits[f].heldout_per_read)
        if what in ("aic", "bic"):
            return min(crits, key=lambda f: getattr(crits[f], what))
        raise ValueError(f"what = {what!r}: choose 'heldout', 'aic' or 'bic'")

    def holdout_line(self, family: str) -> str:
        """One line: a family's hold-out result (or why there is none)."""
        if family in self.holdout:
            fail, cells = self.failing(family)
            return (f"{cells - fail} of {cells} (level, time) cells pass "
                    f"({(cells - fail) / max(cells, 1):.1%}; {fail} fail, chance limit "
                    f"{chance_limit(cells, self.alpha)})")
        if family in self.holdout_refused:
            return f"no hold-out test: {self.holdout_refused[family]}"
        return "not tested"

    def summary(self) -> str:
        """Plain text: the decision and why, each family's goodness of fit per component, the
        hold-out test per time, the time each step took."""
        fam = {"pcm": "PCM family (fit_pcm)", "empirical": "empirical family (fit_empirical)"}
        lines = [f"device-model fit: family chosen: {self.family} ({self.choice}); "
                 f"{self.reason}",
                 f"  rule: {self.rule}"]
        ea = self.activation_energy
        if ea:
            lines.append(f"  activation energy {ea['value']:.4g} eV at T_ref = "
                         f"{ea['reference_temperature']:.2f} K: {ea['source']}")
        dropped = self.provenance.get("excluded_devices")
        if dropped:
            lines.append(f"  devices: {dropped}")
        for f in FAMILIES:
            if f in self.refused:
                lines.append(f"{fam[f]}: refused: {self.refused[f]}")
                continue
            if f not in self.reports:
                lines.append(f"{fam[f]}: not fitted (family given)")
                continue
            lines.append(f"{fam[f]}:")
            rep = self.reports[f]
            first = rep.summary().splitlines()[0].split(": ", 1)[-1]  # devices, exclusions
            body = [first] + (rep.summary().splitlines()[1:] if f == "pcm"
                              else _empirical_lines(rep))
            lines += ["  " + ln for ln in body]
            lines.append(f"  hold-out: {self.holdout_line(f)}")
            crit = self.criteria().get(f)
            if crit is not None:
                lines.append(f"  criterion: {crit.line()}")
        crits = self.criteria()
        if len(crits) == 2:
            lines.append("criterion: " + "; ".join(
                f"{what} favours {self.better(what)}" for what in ("heldout", "aic", "bic")))
        tested = [f for f in FAMILIES if f in self.holdout]
        if tested:
            times = self.holdout[tested[0]].times
            lines.append(f"hold-out KS per time: fraction of levels with p > {self.alpha:g} "
                         f"({', '.join(tested)}); devices per level in the sample "
                         f"{int(np.min(self.holdout_devices))}-{int(np.max(self.holdout_devices))}"
                         " (half fitted, half tested)")
            per = {f: self.holdout[f].fraction_passing_per_time(self.alpha) for f in tested}
            for m, t in enumerate(times):
                vals = "  ".join(f"{per[f][m]:7.1%}" for f in tested)
                lines.append(f"  t = {t:10.4g} s: {vals}")
            lines.append(f"hold-out KS per level: times with p > {self.alpha:g} of those tested "
                         f"({', '.join(tested)})")
            rows = {f: self.holdout[f].passing_per_level(self.alpha) for f in tested}
            for k, x in enumerate(self.holdout[tested[0]].levels):
                vals = "  ".join(f"{f} " + rows[f][k].split(": ", 1)[1] for f in tested)
                lines.append(f"  x = {x:.4g}: {vals}")
        lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly summary: the decision, each family's report and hold-out, timings."""
        return {"family": self.family, "choice": self.choice, "reason": self.reason,
                "rule": self.rule, "alpha": self.alpha, "refused": dict(self.refused),
                "holdout_refused": dict(self.holdout_refused),
                "holdout_devices": np.asarray(self.holdout_devices).tolist(),
                "activation_energy": dict(self.activation_energy),
                "reports": {k: v.to_dict() for k, v in self.reports.items()},
                "holdout": {k: v.to_dict() for k, v in self.holdout.items()},
                "timings": dict(self.timings), "provenance": dict(self.provenance)}

    def plot(self, reference=None):
        """Measured against predicted distributions, and the PCM fit's curves.

        Top: quantile-quantile plots for up to four representative levels (rows: the lowest,
        the highest and two between) and each fitted family (columns): the quantiles of the
        model's reads (the model fitted to the whole campaign, programmed at the sample's
        targets) against those of the measured reads (one per device and time, the hold-out
        sample), at 1 %-99 %, one line per time (colour); on the diagonal the model reproduces
        the measured distribution. Bottom (when the PCM family was fitted): its fitted curves
        per component (:meth:`FitReport.plot`).

        Parameters
        ----------
        reference : PCMModel, optional, drawn into the PCM curves (see :meth:`FitReport.plot`)

        Returns
        -------
        matplotlib.figure.Figure (Agg canvas; save it with ``fig.savefig``).
        """
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        qq = self.qq
        fams = [f for f in FAMILIES if f in qq]
        n_lv = len(qq.get("levels", ()))
        pcm_rep = self.reports.get("pcm")
        curve_rows = -(-len(pcm_rep.components) // 2) if pcm_rep is not None else 0
        height = 3.0 * n_lv + 3.4 * curve_rows + 0.6
        fig = Figure(figsize=(11, max(height, 4.0)), layout="constrained")
        FigureCanvasAgg(fig)
        if curve_rows:
            top, bottom = fig.subfigures(2, 1, height_ratios=[3.0 * n_lv + 0.6,
                                                              3.4 * curve_rows])
        else:
            top, bottom = fig, None
        if n_lv and fams:
            axes = top.subplots(n_lv, len(fams), squeeze=False)
            times = qq["times"]
            cmap = colormaps["viridis"]
            colours = [cmap(i / max(len(times) - 1, 1)) for i in range(len(times))]
            for r, x in enumerate(qq["levels"]):
                for c, f in enumerate(fams):
                    ax = axes[r, c]
                    meas, pred = qq["measured"][r], qq[f][r]
                    lo = np.nanmin([np.nanmin(meas), np.nanmin(pred)])
                    hi = np.nanmax([np.nanmax(meas), np.nanmax(pred)])
                    ax.plot([lo, hi], [lo, hi], "-", color="0.7", lw=1)
                    for m, t in enumerate(times):
                        ax.plot(meas[m], pred[m], ".-", ms=2, lw=1, color=colours[m],
                                label=f"{t:.3g} s")
                    title = f"{f}, x = {x:.3g}"
                    if f in self.holdout:
                        res = self.holdout[f]
                        k = int(np.argmin(np.abs(res.levels - x)))
                        ok = int(res.passing(self.alpha)[k].sum())
                        title += f": hold-out {ok}/{res.times.size} times pass"
                    ax.set_title(title, fontsize=9)
                    ax.set_xlabel("measured quantile, g / g_max", fontsize=8)
                    ax.set_ylabel("predicted quantile, g / g_max", fontsize=8)
                    ax.tick_params(labelsize=7)
            axes[0, -1].legend(fontsize=7, title="time", title_fontsize=7, loc="upper left")
            top.suptitle(f"measured vs predicted distributions (family chosen: {self.family})",
                         fontsize=10)
        if bottom is not None:
            pcm_rep.plot(reference=reference, fig=bottom)
            bottom.suptitle("PCM family: fitted curves per component", fontsize=10)
        return fig


def _empirical_lines(rep: EmpiricalFitReport) -> list[str]:
    d = rep.ks_statistic
    lines = [f"distributions per level and time: in-sample KS D median {np.nanmedian(d):.3f}, "
             f"max {np.nanmax(d):.3f} over {np.isfinite(d).sum()} cells; "
             f"{rep.n_params} tabulated values",
             f"read noise: {rep.read_noise_source}"]
    if rep.rank_correlation.size:
        lines.append(f"rank persistence between measured times: median rho "
                     f"{np.median(rep.rank_correlation):.3f}")
    return lines + [f"note: {n}" for n in rep.notes]


# ------------------------------------------------------------------------- the hold-out sample
def _holdout_sample(ds: xr.Dataset, exclusion: DeviceExclusion, per_level: int, seed: int,
                    chunk_devices: int | None) -> tuple[xr.Dataset, np.ndarray]:
    """An in-memory campaign of at most ``per_level`` usable devices per level (the smallest
    hashes of (seed, index)), read in one pass; and their indices."""
    n = ds.sizes["device"]
    g_max = float(ds.attrs["g_max"])
    key = np.uint64(np.random.SeedSequence([int(seed), 1]).generate_state(1, np.uint64)[0])
    levels = target_levels(ds, chunk_devices)
    heaps = EK.bottom_k_state(levels.size, per_level)
    ranges = DeviceExclusion(ranges=exclusion.ranges)
    read_target = device_chunk_reader(ds, "g_target")
    read_valid = device_chunk_reader(ds, "valid") if "valid" in ds else None
    for start in range(0, n, VECTOR_CHUNK_DEVICES):  # smallest hashes per level, by chunks
        stop = min(n, start + VECTOR_CHUNK_DEVICES)
        gt = np.ascontiguousarray(read_target(start, stop))
        valid = (np.ones(stop - start, bool) if read_valid is None
                 else np.asarray(read_valid(start, stop), dtype=bool))
        use = ranges.codes(start, None, g_max, valid) == 0
        EK.bottom_k_add(gt, start, levels, use, key, *heaps)
    idx = np.sort(heaps[1][heaps[1] >= 0])
    rules = dataclasses.replace(exclusion, ranges=())
    read = device_chunk_reader(ds)
    read_t = device_chunk_reader(ds, "read_time") if "read_time" in ds else None
    step = chunk_devices or default_chunk_devices(ds.sizes["time"], ds.sizes["repeat"],
                                                  ds["g"].dtype.itemsize, 4 * FIT_CHUNK_BYTES)
    g_parts, t_parts, keep = [], [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        a, b = np.searchsorted(idx, [start, stop])
        if a == b:
            continue
        rows = idx[a:b] - start
        g = np.asarray(read(start, stop))[rows]
        g_parts.append(g)
        if read_t is not None:
            t_parts.append(np.asarray(read_t(start, stop))[rows])
        keep.append(rules.codes(0, g, g_max) == 0 if rules.needs_reads
                    else np.ones(rows.size, bool))
    keep = np.concatenate(keep) if keep else np.zeros(0, bool)
    idx = idx[keep]
    sub = ds.drop_vars([v for v in ("g", "read_time") if v in ds]).isel(device=idx).load()
    sub["g"] = (ds["g"].dims, np.concatenate(g_parts)[keep], ds["g"].attrs)
    if read_t is not None:
        sub["read_time"] = (ds["read_time"].dims, np.concatenate(t_parts)[keep],
                            ds["read_time"].attrs)
    return sub, idx


def _qq(sub: xr.Dataset, times, models: dict, seed: int, draws: int = 4) -> dict:
    """Measured and predicted quantiles (g / g_max) at up to four representative levels."""
    g_max = float(sub.attrs["g_max"])
    g_target = np.asarray(sub["g_target"].values)
    levels = np.unique(g_target)
    pick = levels[np.unique(np.round(np.linspace(0, levels.size - 1,
                                                 min(4, levels.size))).astype(int))]
    g = first_read(np.asarray(sub["g"].values))
    t_nodes = time_nodes(g, times, float(sub.attrs["t0"]))
    probs = np.linspace(0.01, 0.99, 50)
    out = {"levels": pick / g_max, "times": t_nodes, "probs": probs,
           "measured": np.full((pick.size, t_nodes.size, probs.size), np.nan)}
    rows = [np.flatnonzero(g_target == v) for v in pick]
    for r, rr in enumerate(rows):
        for m in range(t_nodes.size):
            v = g[rr, m]
            v = v[np.isfinite(v)]
            if v.size >= 2:
                out["measured"][r, m] = np.quantile(v, probs) / g_max
    # the model programs the sample's targets at the picked levels ``draws`` times (one batch)
    targets = np.tile(np.concatenate([g_target[rr] for rr in rows]), draws)
    which = np.tile(np.concatenate([np.full(rr.size, r) for r, rr in enumerate(rows)]), draws)
    for fam, model in models.items():
        q = np.full_like(out["measured"], np.nan)
        state = pcm.program(targets, model, rng=[seed, 7])
        for m, t in enumerate(t_nodes):
            g_model = pcm.read(state, float(t), model, rng=[seed, 7, m])
            for r in range(len(rows)):
                q[r, m] = np.quantile(g_model[which == r], probs) / g_max
        out[fam] = q
    return out


# ------------------------------------------------------------------------------- the fit
def fit_device(ds: xr.Dataset, family: str = "auto", *, prior=None, exclude=None,
               activation_energy: float | None = None,
               reference_temperature: float | None = None, clip: str = "fit",
               holdout: bool = True, holdout_devices: int = HOLDOUT_DEVICES,
               draws: int = HOLDOUT_DRAWS, alpha: float = ALPHA, seed: int = 0,
               chunk_devices: int | None = None, progress: bool = False,
               name: str = "fitted") -> tuple[object, DeviceFitReport]:
    """Fit a device model to a campaign, choosing the family the data support (module docstring).

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign from :func:`aimc_device.io.read_measurements` (lazy: streamed) or a simulated
        one; not modified.
    family : {"auto", "pcm", "empirical"}
        "auto": fit both and choose by :data:`DECISION_RULE`; a family name: fit that one only
        (with its hold-out test) and keep it.
    prior : PCMModel, EmpiricalModel, preset name or device card path, optional
        What the data do not identify (the read noise with one read per time at fewer than
        three times), marked "from prior" in the report and the card; a PCM prior also gives the
        PCM fit its start values and conventions (see :func:`fit_pcm`). Default none.
    exclude : str, sequence or aimc_device.io.DeviceExclusion, optional
        Devices to drop (indices "0-9,17", rules "dead", "stuck", "outside:LO:HI"), for both
        families and the hold-out.
    activation_energy : float, optional
        E_a [eV] of the equivalent times; default as in :func:`fit_pcm` (fitted with bakes at
        two or more temperatures, else the campaign attribute, else the prior's). Resolved once
        and used by both families.
    reference_temperature : float, optional
        T_ref [K] of the model; default the campaign's.
    clip : {"fit", "fixed"}
        The PCM fit's drift clip bounds (see :func:`fit_drift`).
    holdout : bool
        Run the hold-out test (with ``family="auto"`` without it the PCM family is kept when it
        fits, and the report says that no test decided).
    holdout_devices : int
        Devices per level in the hold-out sample (>= 6).
    draws : int
        Programmings of the held-out targets by each model.
    alpha : float
        Significance level of a hold-out cell's KS test, in (0, 0.5).
    seed : int
        The hold-out sample, its split and the models' draws.
    chunk_devices : int, optional
        Devices per streamed chunk.
    progress : bool
        Progress bars of the fits.
    name : str
        Name of the fitted model.

    Returns
    -------
    (model, DeviceFitReport)
        The chosen model (PCMModel or EmpiricalModel) and the report;
        ``report.provenance`` is what a device card of the model should carry.

    Raises
    ------
    FitError
        Neither family can be fitted (both reasons named), the named family refuses the
        campaign, or bakes without an activation energy.
    MeasurementFormatError
        Implausible data or a broken file (either fit's checks).
    """
    if family not in ("auto",) + FAMILIES:
        raise ValueError(f"family = {family!r}: choose 'auto', 'pcm' or 'empirical'")
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset (from aimc_device.io.read_measurements),"
                        f" got {type(ds).__name__}")
    if clip not in ("fit", "fixed"):
        raise ValueError(f"clip = {clip!r}: choose 'fit' or 'fixed'")
    holdout_devices = check_int(holdout_devices, "holdout_devices", lo=6)
    draws = check_int(draws, "draws", lo=1)
    alpha = check_float(alpha, "alpha", 0.0, 0.5, lo_open=True, hi_open=True)
    seed = check_int(seed, "seed", lo=0)
    if chunk_devices is not None:
        check_int(chunk_devices, "chunk_devices", lo=1)
    where = ds.attrs.get("source_file", "<Dataset>")
    prior_model = resolve_device_model(prior, what="prior")
    pcm_prior = prior_model if isinstance(prior_model, PCMModel) else None
    exclusion = DeviceExclusion.parse(exclude)
    exclusion.check_indices(ds.sizes["device"], where)
    g_max = float(ds.attrs["g_max"]) if "g_max" in ds.attrs else None
    timings = {}

    def timed(step, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            timings[step] = timings.get(step, 0.0) + time.perf_counter() - t0

    ea = timed("activation energy", resolve_activation_energy, ds, pcm_prior,
               activation_energy, reference_temperature, exclude=exclusion,
               chunk_devices=chunk_devices, progress=progress)
    t_ref = ea.reference_temperature
    accelerated = campaign_temperatures(ds, t_ref)[0] is not None
    teq = timed("activation energy", equivalent_time, ds, ea.value, t_ref) if accelerated \
        else None
    rule = None
    if exclusion.needs_reads or exclusion.ranges:
        def rule(start, gt, g):
            return exclusion.codes(start, g, g_max) != 0

    def pcm_fit(d, times=None):  # fit_pcm maps the times itself (bakes, E_a)
        return fit_pcm(d, pcm_prior, clip=clip, exclude=exclusion if d is ds else None,
                       activation_energy=ea, chunk_devices=chunk_devices,
                       progress=progress and d is ds, name=name)

    def empirical_fit(d, times=None):
        model, rep = fit_empirical(d, times=times, exclude=rule if d is ds else None,
                                   prior=prior_model, activation_energy=ea.value,
                                   chunk_devices=chunk_devices, progress=progress and d is ds,
                                   name=name)
        if model.reference_temperature != t_ref:
            model = model.replace(reference_temperature=t_ref)
            rep.model = model
        return model, rep

    fitters = {"pcm": pcm_fit, "empirical": empirical_fit}
    wanted = FAMILIES if family == "auto" else (family,)
    models, reports, refused = {}, {}, {}
    for f in wanted:
        try:
            models[f], reports[f] = timed(f"{f} fit", fitters[f], ds, times=teq)
        except FitError as exc:
            refused[f] = str(exc)
    if not models:
        raise FitError("; ".join(f"{f} family: {refused[f]}" for f in wanted))
    held, held_refused, n_sample, qq = {}, {}, np.zeros(0, np.int64), {}
    if holdout:
        sub, idx = timed("hold-out sample", _holdout_sample, ds, exclusion, holdout_devices,
                         seed, chunk_devices)
        sub_times = None if teq is None else (teq[idx] if teq.ndim == 2 else teq)
        n_sample = np.unique(np.asarray(sub["g_target"].values), return_counts=True)[1]
        for f in models:
            try:
                held[f] = timed(f"{f} hold-out", holdout_ks, sub, fitters[f], times=sub_times,
                                seed=seed, draws=draws)
            except FitError as exc:
                held_refused[f] = str(exc)
        qq = timed("plot data", _qq, sub, sub_times if sub_times is not None else
                   (sub["read_time"].values if "read_time" in sub else sub["time"].values),
                   models, seed)
    chosen, reason = _decide(family, models, refused, held, held_refused, alpha, holdout)
    model = models[chosen]
    report = DeviceFitReport(
        family=chosen, model=model, choice="auto" if family == "auto" else "given",
        reason=reason, models=models, reports=reports, refused=refused, holdout=held,
        holdout_refused=held_refused, alpha=alpha, holdout_devices=n_sample,
        activation_energy={"value": ea.value, "stderr": ea.stderr, "reference_temperature": t_ref,
                           "source": ea.source, "identified": ea.identified},
        qq=qq, timings=timings)
    report.provenance = _provenance(report, where, family, exclusion, seed)
    return model, report


def _decide(family, models, refused, held, held_refused, alpha, holdout) -> tuple[str, str]:
    """The family chosen and the reason, by :data:`DECISION_RULE`."""
    if family != "auto":
        if family in refused:
            raise FitError(f"family {family}: {refused[family]}")
        return family, f"family given (family={family!r}); the other family was not fitted"
    if len(models) == 1:
        (only,) = models
        other = next(f for f in FAMILIES if f != only)
        return only, f"the {other} fit refused the campaign ({refused[other]})"
    if not holdout:
        return "pcm", "no hold-out test (holdout=False): the PCM family kept as it fits"
    cand = [f for f in FAMILIES if f in held]
    if not cand:
        return "pcm", (f"neither family could be tested on held-out devices (pcm: "
                       f"{held_refused['pcm']}; empirical: {held_refused['empirical']}): the "
                       "PCM family kept as it fits")
    if len(cand) == 1:
        other = next(f for f in FAMILIES if f != cand[0])
        return cand[0], f"the {other} family could not be tested ({held_refused[other]})"
    fail, cells = {}, {}
    for f in FAMILIES:
        tested = np.isfinite(held[f].pvalue)
        cells[f] = int(tested.sum())
        fail[f] = int((tested & ~held[f].passing(alpha)).sum())
    limit = chance_limit(cells["pcm"], alpha)
    frac = {f: fail[f] / max(cells[f], 1) for f in FAMILIES}
    numbers = (f"hold-out KS fails (p <= {alpha:g}) in {fail['pcm']} of {cells['pcm']} cells "
               f"for PCM (chance limit {limit}) and {fail['empirical']} of "
               f"{cells['empirical']} for the empirical family")
    if fail["pcm"] <= limit:
        return "pcm", f"{numbers}: PCM within chance"
    if frac["pcm"] <= frac["empirical"]:
        return "pcm", f"{numbers}: PCM fails no more often"
    return "empirical", f"{numbers}: PCM beyond chance and more often than the empirical family"


def _provenance(report: DeviceFitReport, where: str, family: str, exclusion, seed: int) -> dict:
    from .. import __version__

    rep = report.reports[report.family]
    prov = dict(rep.provenance)
    prov.update({
        "source_file": where, "fit_function": "aimc_device.fit.fit_device",
        "family_fit_function": rep.provenance.get("fit_function", ""),
        "family": report.family, "family_choice": "auto" if family == "auto" else "given",
        "family_decision": report.reason, "family_rule": report.rule,
        "holdout_seed": seed,
        "package_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fit_timings": ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())})
    ea = report.activation_energy
    prov.setdefault("activation_energy_source", ea["source"])
    prov.setdefault("activation_energy_stderr_eV", ea["stderr"])
    if exclusion.spec:
        prov["exclude"] = exclusion.spec
        if "pcm" in report.reports:  # what the streaming pass dropped, and why
            prov.setdefault("excluded_devices",
                            report.reports["pcm"].provenance.get("excluded_devices", ""))
    for f in FAMILIES:
        if f in report.refused:
            prov[f"refused_{f}"] = report.refused[f]
        elif f in report.holdout or f in report.holdout_refused:
            prov[f"holdout_{f}"] = report.holdout_line(f)
    return prov
