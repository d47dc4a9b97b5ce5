"""Fit reports: coefficients with standard errors, residuals per level, goodness of fit, plots.

Goodness of fit of each component, from its weighted residuals z_i = (data_i - fitted_i) / se_i
over its n points and k fitted parameters: chi2 = sum z_i^2; reduced chi2 = chi2 / (n - k);
weighted R^2; AIC = chi2 + 2 k and BIC = chi2 + k ln n (the Gaussian log-likelihood with known
standard errors, up to a constant shared by all models of the same data). A component the data
do not identify (``identified`` False) carries its ``source`` ("from prior ..., not identified by
these data") and no goodness of fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ComponentFit", "FitReport", "PCM_PARAMETERS"]

#: The PCMModel parameter behind each coefficient of each component of a PCM fit (names as in
#: :class:`aimc_device.pcm.ParameterCovariance`).
PCM_PARAMETERS = {
    "programming_noise": ("prog_coeffs[0]", "prog_coeffs[1]", "prog_coeffs[2]"),
    "drift_mean": ("drift_mean_coeffs[0]", "drift_mean_coeffs[1]", "drift_mean_bounds[0]",
                   "drift_mean_bounds[1]"),
    "drift_std": ("drift_std_coeffs[0]", "drift_std_coeffs[1]", "drift_std_bounds[0]",
                  "drift_std_bounds[1]"),
    "read_noise": ("read_noise_coeff", "read_noise_exponent", "read_noise_max"),
    "activation_energy": ("activation_energy",),
}


@dataclass
class ComponentFit:
    """One fitted statistic against the relative target conductance x = g/g_max.

    Attributes
    ----------
    name : str, e.g. "programming_noise"
    formula : str, the fitted functional form
    units : str, units of ``data`` and ``fitted`` ("S" or "1")
    coeff_names : tuple of str
    coeffs : ndarray, fitted coefficients (units in ``coeff_units``)
    stderr : ndarray, their standard errors (nan when fixed, not fitted)
    coeff_units : tuple of str
    x : ndarray (K,), relative conductance of each level (or group), dimensionless
    data : ndarray (K,), the per-level estimate from the measurements [units]
    data_se : ndarray (K,), its standard error [units]
    fitted : ndarray (K,), the fitted form at x [units]
    chi2_reduced : float, sum(((data - fitted) / data_se)^2) / (K - fitted params), dimensionless
    r_squared : float, weighted coefficient of determination, dimensionless
    aic, bic : float, Akaike and Bayesian information criteria from the weighted residuals
    n_devices : ndarray (K,), devices behind each point
    n_params : int, parameters fitted to the points
    notes : str
    identified : bool, False when the data do not determine the component (taken from a prior)
    source : str, "fitted", or where the component comes from when not identified
    covariance : ndarray (C, C) or None, covariance of ``coeffs`` (NaN rows and columns for
        coefficients not fitted); None: only the standard errors are known
    """

    name: str
    formula: str
    units: str
    coeff_names: tuple
    coeffs: np.ndarray
    stderr: np.ndarray
    coeff_units: tuple
    x: np.ndarray
    data: np.ndarray
    data_se: np.ndarray
    fitted: np.ndarray
    n_devices: np.ndarray
    n_params: int
    notes: str = ""
    identified: bool = True
    source: str = "fitted"
    covariance: np.ndarray | None = None

    @classmethod
    def from_prior(cls, name: str, formula: str, units: str, coeff_names: tuple, coeffs,
                   coeff_units: tuple, source: str, notes: str = "") -> "ComponentFit":
        """A component not identified by the data: the prior's coefficients, no points."""
        empty = np.zeros(0)
        return cls(name=name, formula=formula, units=units, coeff_names=coeff_names,
                   coeffs=np.asarray(coeffs, dtype=float),
                   stderr=np.full(len(coeff_names), np.nan), coeff_units=coeff_units, x=empty,
                   data=empty, data_se=empty, fitted=empty, n_devices=empty, n_params=0,
                   notes=notes, identified=False, source=source)

    @property
    def residuals(self) -> np.ndarray:
        """data - fitted per level [units]."""
        return self.data - self.fitted

    @property
    def relative_residuals(self) -> np.ndarray:
        """(data - fitted) / fitted per level, dimensionless."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.residuals / self.fitted

    @property
    def chi2(self) -> float:
        """sum of squared weighted residuals, dimensionless (nan without points)."""
        if self.x.size == 0:
            return float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            z = self.residuals / self.data_se
        return float(np.nansum(z * z))

    @property
    def chi2_reduced(self) -> float:
        return self.chi2 / max(1, self.x.size - self.n_params)

    @property
    def aic(self) -> float:
        """Akaike information criterion chi2 + 2 k."""
        return self.chi2 + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        """Bayesian information criterion chi2 + k ln n."""
        return self.chi2 + self.n_params * np.log(max(1, self.x.size))

    @property
    def r_squared(self) -> float:
        if self.x.size == 0:
            return float("nan")
        w = 1.0 / np.square(self.data_se)
        w = np.where(np.isfinite(w), w, 0.0)
        mean = np.sum(w * self.data) / np.sum(w)
        ss_res = np.sum(w * self.residuals**2)
        ss_tot = np.sum(w * (self.data - mean) ** 2)
        return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return {
            "formula": self.formula, "units": self.units,
            "coeffs": {n: {"value": float(c), "stderr": float(s), "units": u}
                       for n, c, s, u in zip(self.coeff_names, self.coeffs, self.stderr,
                                             self.coeff_units)},
            "chi2_reduced": self.chi2_reduced, "r_squared": self.r_squared,
            "aic": self.aic, "bic": self.bic, "n_points": int(self.x.size),
            "n_params": int(self.n_params), "identified": self.identified, "source": self.source,
            "x": self.x.tolist(), "data": self.data.tolist(), "data_se": self.data_se.tolist(),
            "fitted": self.fitted.tolist(), "residuals": self.residuals.tolist(),
            "notes": self.notes,
        }

    def provenance_line(self) -> str:
        """How the component was obtained, for a device card's provenance."""
        if not self.identified:
            return self.source
        return (f"fitted: chi2_red = {self.chi2_reduced:.3g}, R^2 = {self.r_squared:.4f}, "
                f"AIC = {self.aic:.4g}, BIC = {self.bic:.4g}, {self.x.size} points")


@dataclass
class FitReport:
    """What :func:`aimc_device.fit.fit_pcm` found, component by component.

    Attributes
    ----------
    components : dict of str -> ComponentFit
        "programming_noise", "drift_mean", "drift_std", "read_noise", and "activation_energy"
        when it was fitted.
    model : PCMModel or None, the fitted model
    n_devices : int, devices in the campaign
    n_excluded : int, devices left out of the fit: dropped (``exclusions``), without a usable
        drift line (a read of 0 S, read at fewer than two times) or with a target of 0 S
    exclusions : dict, reason -> {"count", "devices"} of the devices dropped by ``valid`` or
        ``exclude`` (see :class:`aimc_device.io.ExclusionRecord`)
    missing_reads : ndarray (T,), reads not taken at each time among the kept devices
    activation_energy : dict, E_a [eV], its standard error, T_ref [K] and where it came from
    notes : list of str, what the fit did that a reader must know (levels left out, ...)
    provenance : dict, source file, fit function, options, package version, date, and one line
        per component saying whether it was fitted or taken from a prior
    """

    components: dict = field(default_factory=dict)
    model: object = None
    n_devices: int = 0
    n_excluded: int = 0
    exclusions: dict = field(default_factory=dict)
    missing_reads: np.ndarray = field(default_factory=lambda: np.zeros(0))
    activation_energy: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> ComponentFit:
        return self.components[name]

    def summary(self) -> str:
        """A plain-text table of coefficients, standard errors and goodness of fit."""
        lines = [f"fit of {self.provenance.get('source_file', '<Dataset>')}: "
                 f"{self.n_devices} devices ({self.n_excluded} excluded)"]
        if self.exclusions:
            lines.append("  dropped: " + "; ".join(f"{v['count']} {k} ({v['devices']})"
                                                  for k, v in self.exclusions.items()))
        if np.sum(self.missing_reads):
            lines.append(f"  reads not taken per time: "
                         f"{', '.join(str(int(v)) for v in self.missing_reads)}")
        if self.activation_energy:
            ea = self.activation_energy
            se = "" if not np.isfinite(ea.get("stderr", np.nan)) else f" +- {ea['stderr']:.3g}"
            lines.append(f"  activation energy {ea['value']:.4g}{se} eV at T_ref = "
                         f"{ea['reference_temperature']:.2f} K: {ea['source']}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for cf in self.components.values():
            if not cf.identified:
                lines.append(f"  {cf.name}: {cf.formula}   {cf.source.upper()}")
            else:
                lines.append(f"  {cf.name}: {cf.formula}   chi2_red = {cf.chi2_reduced:.3g}, "
                             f"R^2 = {cf.r_squared:.4f}, AIC = {cf.aic:.4g}, "
                             f"BIC = {cf.bic:.4g}")
            for n, c, s, u in zip(cf.coeff_names, cf.coeffs, cf.stderr, cf.coeff_units):
                se = "fixed" if not np.isfinite(s) else f"+- {s:.3g}"
                lines.append(f"      {n:>10s} = {c:.6g} {se} [{u}]")
        return "\n".join(lines)

    def parameter_covariance(self):
        """The covariance of the fitted model's parameters (a calibration uncertainty to keep
        in the device card and to draw plausible models from).

        Block-diagonal over the components (each is fitted to its own per-level estimates);
        within a component, the covariance of its least-squares fit. Coefficients not fitted
        (from a prior, a clip not reached by the data, a cap kept) are left out and stay fixed.
        Values are those of the fitted model.

        Returns
        -------
        aimc_device.pcm.ParameterCovariance or None (no model, or nothing fitted)
        """
        from ..pcm import ParameterCovariance

        if self.model is None:
            return None
        names, blocks = [], []
        for key, cf in self.components.items():
            fields = PCM_PARAMETERS.get(key)
            if fields is None or not cf.identified:
                continue
            se = np.asarray(cf.stderr, dtype=float)
            cov = (np.diag(se**2) if cf.covariance is None
                   else np.asarray(cf.covariance, dtype=float))
            keep = [i for i in range(len(fields))
                    if i < se.size and np.isfinite(se[i]) and np.isfinite(cov[i, i])]
            if not keep:
                continue
            names += [fields[i] for i in keep]
            blocks.append(cov[np.ix_(keep, keep)])
        if not names:
            return None
        full = np.zeros((len(names), len(names)))
        k = 0
        for b in blocks:
            full[k:k + len(b), k:k + len(b)] = 0.5 * (b + b.T)
            k += len(b)
        probe = ParameterCovariance(names, np.zeros(len(names)), full)
        probe.check_model(self.model)
        values = [_field_value(self.model, n) for n in names]
        return ParameterCovariance(names, values, full)

    def to_dict(self) -> dict:
        """JSON-friendly summary of every component and the provenance."""
        return {"n_devices": self.n_devices, "n_excluded": self.n_excluded,
                "exclusions": dict(self.exclusions),
                "missing_reads": np.asarray(self.missing_reads).tolist(),
                "activation_energy": dict(self.activation_energy), "notes": list(self.notes),
                "provenance": dict(self.provenance),
                "components": {k: v.to_dict() for k, v in self.components.items()}}

    def plot(self, reference=None, fig=None):
        """Data per level against the fitted curves, one panel per component.

        Parameters
        ----------
        reference : PCMModel, optional
            Also draw this model's curves (e.g. the preset the campaign was simulated from).
        fig : matplotlib Figure or SubFigure, optional
            Draw into it (e.g. a part of :meth:`aimc_device.fit.DeviceFitReport.plot`); default
            a new figure.

        Returns
        -------
        matplotlib.figure.Figure (Agg canvas; save it with ``fig.savefig``), or ``fig``.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ..pcm import drift_exponent_stats, programming_noise_std, read_noise_q

        n_panels = len(self.components)
        rows = -(-n_panels // 2)
        if fig is None:
            fig = Figure(figsize=(11, 4 * rows), layout="constrained")
            FigureCanvasAgg(fig)
        axes = fig.subplots(rows, 2, squeeze=False).ravel()
        for ax in axes[n_panels:]:
            fig.delaxes(ax)
        scale = {"S": (1e6, "uS"), "1": (1.0, "")}
        ref_curves = {}
        if reference is not None:
            xs = np.linspace(0.01, 1.0, 200)
            g = xs * reference.g_max
            mu, sd = drift_exponent_stats(g, reference)
            ref_curves = {"programming_noise": (xs, programming_noise_std(g, reference)),
                          "drift_mean": (xs, mu), "drift_std": (xs, sd),
                          "read_noise": (xs, read_noise_q(xs, reference))}
        for ax, (name, cf) in zip(axes, self.components.items()):
            f, unit = scale[cf.units]
            if name == "activation_energy":
                ax.errorbar(cf.x, cf.data, yerr=cf.data_se, fmt="o", ms=3, label="level means")
                ax.plot(cf.x, cf.fitted, "x", label="fitted lines")
                ax.set_xlabel("L = ln((t_eq + t0)/t0) at the fitted E_a")
                ax.set_ylabel("mean ln(g / g_max)")
                ax.set_title(f"E_a = {cf.coeffs[0]:.3g} +- {cf.stderr[0]:.2g} eV\n"
                             f"chi2_red = {cf.chi2_reduced:.2g}", fontsize=9)
                ax.legend(fontsize=8)
                continue
            xs = np.linspace(0.01, 1.0, 200)
            if cf.x.size:
                ax.errorbar(cf.x, cf.data * f, yerr=cf.data_se * f, fmt="o", ms=3, label="data")
                xs = np.linspace(cf.x.min(), cf.x.max(), 200)
            if self.model is not None:
                curve = _model_curve(name, xs, self.model)
                ax.plot(xs, curve * f, "-", label="fit" if cf.identified else cf.source)
            if name in ref_curves:
                rx, ry = ref_curves[name]
                ax.plot(rx, np.asarray(ry) * f, "--", color="gray",
                        label=f"reference ({reference.name})")
            ax.set_xlabel("x = g_target / g_max")
            ax.set_ylabel(f"{name} [{unit or '1'}]")
            ax.set_title(f"{cf.formula}\n" + (f"chi2_red = {cf.chi2_reduced:.2g}" if cf.identified
                                               else "not identified: from the prior"),
                         fontsize=9)
            ax.legend(fontsize=8)
        return fig


def _model_curve(name: str, x: np.ndarray, model) -> np.ndarray:
    from ..pcm import drift_exponent_stats, programming_noise_std, read_noise_q

    g = x * model.g_max
    if name == "programming_noise":
        return np.asarray(programming_noise_std(g, model))
    if name in ("drift_mean", "drift_std"):
        mu, sd = drift_exponent_stats(g, model)
        return np.asarray(mu if name == "drift_mean" else sd)
    return np.asarray(read_noise_q(x, model))


def _field_value(model, name: str) -> float:
    """The value of parameter ``field`` or ``field[i]`` of ``model``."""
    field_name, _, idx = name.partition("[")
    v = getattr(model, field_name)
    return float(v[int(idx.rstrip("]"))] if idx else v)
