"""Fit reports: coefficients with standard errors, residuals per level, goodness of fit, plots."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ComponentFit", "FitReport"]


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
    n_devices : ndarray (K,), devices behind each point
    notes : str
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
    def chi2_reduced(self) -> float:
        dof = max(1, self.x.size - self.n_params)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = self.residuals / self.data_se
        return float(np.nansum(z * z) / dof)

    @property
    def r_squared(self) -> float:
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
            "x": self.x.tolist(), "data": self.data.tolist(), "data_se": self.data_se.tolist(),
            "fitted": self.fitted.tolist(), "residuals": self.residuals.tolist(),
            "notes": self.notes,
        }


@dataclass
class FitReport:
    """What :func:`aimc_device.fit.fit_pcm` found, component by component.

    Attributes
    ----------
    components : dict of str -> ComponentFit
        "programming_noise", "drift_mean", "drift_std", "read_noise".
    model : PCMModel or None, the fitted model
    n_devices : int, devices in the campaign
    n_excluded : int, devices left out (a repeat-mean of 0 S at some time, or a target of 0 S)
    provenance : dict, source file, fit function, package version, date
    """

    components: dict = field(default_factory=dict)
    model: object = None
    n_devices: int = 0
    n_excluded: int = 0
    provenance: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> ComponentFit:
        return self.components[name]

    def summary(self) -> str:
        """A plain-text table of coefficients, standard errors and goodness of fit."""
        lines = [f"fit of {self.provenance.get('source_file', '<Dataset>')}: "
                 f"{self.n_devices} devices ({self.n_excluded} excluded)"]
        for cf in self.components.values():
            lines.append(f"  {cf.name}: {cf.formula}   chi2_red = {cf.chi2_reduced:.3g}, "
                         f"R^2 = {cf.r_squared:.4f}")
            for n, c, s, u in zip(cf.coeff_names, cf.coeffs, cf.stderr, cf.coeff_units):
                se = "fixed" if not np.isfinite(s) else f"+- {s:.3g}"
                lines.append(f"      {n:>10s} = {c:.6g} {se} [{u}]")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly summary of every component and the provenance."""
        return {"n_devices": self.n_devices, "n_excluded": self.n_excluded,
                "provenance": dict(self.provenance),
                "components": {k: v.to_dict() for k, v in self.components.items()}}

    def plot(self, reference=None):
        """Data per level against the fitted curves, one panel per component.

        Parameters
        ----------
        reference : PCMModel, optional
            Also draw this model's curves (e.g. the preset the campaign was simulated from).

        Returns
        -------
        matplotlib.figure.Figure (Agg canvas; save it with ``fig.savefig``).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ..pcm import drift_exponent_stats, programming_noise_std, read_noise_q

        fig = Figure(figsize=(11, 8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2).ravel()
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
            ax.errorbar(cf.x, cf.data * f, yerr=cf.data_se * f, fmt="o", ms=3, label="data")
            xs = np.linspace(cf.x.min(), cf.x.max(), 200)
            if self.model is not None:
                curve = _model_curve(name, xs, self.model)
                ax.plot(xs, curve * f, "-", label="fit")
            if name in ref_curves:
                rx, ry = ref_curves[name]
                ax.plot(rx, np.asarray(ry) * f, "--", color="gray",
                        label=f"reference ({reference.name})")
            ax.set_xlabel("x = g_target / g_max")
            ax.set_ylabel(f"{name} [{unit or '1'}]")
            ax.set_title(f"{cf.formula}\nchi2_red = {cf.chi2_reduced:.2g}", fontsize=9)
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
