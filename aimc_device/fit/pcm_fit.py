"""Fit the statistics of a PCM model (Eqs. 7-11 of the paper, docs/model.md) to a campaign.

Every function streams the campaign once, chunk by chunk (see :mod:`._stats`), reduces it to
per-level estimates with standard errors, and fits the functional form of the model to them with
:mod:`scipy.optimize`. None of them modifies its input. Times are equivalent times at the
reference temperature (:mod:`.temperature`); devices marked invalid or named by ``exclude`` are
left out, and so are reads not taken (NaN).

Choices (documented here and in the FitReport notes):

- read noise (Eqs. 10-11), with repeated reads (R >= 2): per group (target level for
  ``read_noise_reference == "target"``, bins of the estimated g_P / g_max for "programmed") and
  time, the ratio of the summed repeat variances to the summed unbiased g_D^2 estimates is
  Q_s(x)^2 f2 with f2 = ln((t_eff + T_read)/(2 T_read)), t_eff = t or t + t0 per
  ``read_noise_time``; coeff and exponent of Q_s = coeff x^exponent are fitted to all (group,
  time) points at once (curve_fit, weighted); the cap of Q_s is kept from the prior (reached
  only at x < 0.01 for the published numbers);
- read noise with one read per time (R = 1): from the scatter of each device around its own
  drift line, for devices read at >= 3 times. The read noise makes g_k = g_D,k (1 + eps_k),
  eps_k ~ Normal(0, Q_s^2 f2_k) (Eq. 11), so ln g_k = ln g_D,k + u_k with u_k = ln(1 + eps_k);
  for a least-squares line with independent errors the expected residual sum of squares is
  E[RSS] = sum_k (1 - h_k) Var(u_k), h_k the hat values. Var(u_k) = V(Q_s^2 f2_k), V the
  variance of ln(1 + eps) (V(s2) = s2 + 2.5 s2^2 + ..., computed by quadrature, eps conditioned
  on 1 + eps > 0 since a device with a read of 0 S is left out); per group the equation
  sum_devices RSS = sum_{devices, k} (1 - h_k) V(Q^2 f2_k) is solved for Q^2. So the residual
  variance of ln g around the line is Q_s^2 ln((t_eff + T_read)/(2 T_read)), averaged over the
  cells with the weights (1 - h_k), and nothing else is subtracted: anything else that moves a
  device off its straight line in L (a drift law that is not a power law, per-read telegraph
  noise, a per-time common-mode shift of the instrument) is counted as read noise and biases Q_s
  upward. With fewer than three read times (or fewer than two groups with three devices read at
  three times) the read noise is not identified: it is taken from the prior the caller names,
  and the report and the card say so;
- programming noise (Eq. 7): sigma_P per level is the spread across devices of the extrapolated
  g_P = exp(intercept of the drift line at t = 0), minus the read-noise part of that spread;
  c0 + c1 x + c2 x^2 is fitted to it by weighted least squares (curve_fit). With repeats, each
  device's read-noise variance of ln g_P comes from its repeats (as for the bias of its line);
  with R = 1 it follows from the read-noise estimate (fitted or prior) and the least-squares
  weights v_k of the intercept: ln g_P,raw = ln g_P + sum_k v_k u_k, so E[g_P,raw] = E[g_P] M1
  and Var(g_P,raw) = Var(g_P) M2 + E[g_P]^2 (M2 - M1^2), with M1 = prod_k E[(1 + eps_k)^v_k] and
  M2 = prod_k E[(1 + eps_k)^(2 v_k)] (v_k the level's mean weights);
- drift (Eqs. 8-9): nu per device is minus the slope of its line; per level its mean and its
  spread minus the read-noise variance of the slope: from the repeats, or with R = 1
  sum_k w_k^2 V(Q_s^2 f2_k) (and the mean corrected by sum_k w_k E[u_k], the bias of the log).
  mu_nu and sigma_nu are fitted (least_squares, weighted) to clip(a ln x + b, lo, hi) with
  ``clip="fit"``: a, b and the lower clip ``lo`` are fitted (the data at large x reach it); the
  upper clip ``hi`` is only reached at x < 0.02 for the published numbers, so it is taken from
  the prior and raised, if needed, to the largest fitted value at the measured levels. When the
  data never reach ``lo`` it is kept from the prior likewise. ``clip="fixed"`` keeps both clips
  of the prior and fits a and b only. For the "programmed" read-noise convention the R = 1
  corrections take Q_s at the level's target.
"""
from __future__ import annotations

import datetime as _dt
import functools
import os

import numpy as np
import xarray as xr
from scipy import optimize

from .._checks import check_int
from ..io import DeviceExclusion, MeasurementFormatError
from ..io.measurements import field_name
from ..pcm import PCMModel, read_noise_q
from ._stats import CampaignStats, FitError, campaign_statistics, resolve_prior
from .report import ComponentFit, FitReport
from .temperature import ActivationEnergy, resolve_activation_energy

__all__ = ["fit_programming_noise", "fit_drift", "fit_read_noise", "fit_pcm", "FitError",
           "check_plausible", "MIN_DEVICES_PER_LEVEL", "SCALE_RANGE", "MIN_RELATIVE_SPREAD"]

#: Fewest devices a level needs to enter a fit.
MIN_DEVICES_PER_LEVEL = 3
#: Plausible range of the median over levels of (mean g_P / target): outside it, reads and
#: targets are of different scales (a unit error), dimensionless.
SCALE_RANGE = (0.1, 10.0)
#: Smallest plausible spread of a level across devices relative to its mean, dimensionless.
MIN_RELATIVE_SPREAD = 1e-6

_READ_NOISE = ("read_noise", "Q_s = min(coeff x^exponent, cap)", "1",
               ("coeff", "exponent", "cap"), ("1", "1", "1"))


def _stats(ds, prior, chunk_devices, progress, stats, exclude=None, activation_energy=None,
           reference_temperature=None) -> CampaignStats:
    if stats is not None:
        return stats
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset (from aimc_device.io.read_measurements),"
                        f" got {type(ds).__name__}")
    ea = resolve_activation_energy(ds, prior, activation_energy, reference_temperature,
                                   exclude=exclude, chunk_devices=chunk_devices,
                                   progress=progress)
    st = campaign_statistics(ds, prior, chunk_devices, progress, exclude=exclude,
                             activation_energy=ea.value,
                             reference_temperature=ea.reference_temperature)
    check_plausible(st, field_name(ds, "g"), field_name(ds, "g_target"))
    return st


def check_plausible(st: CampaignStats, gfield: str = "g", tfield: str = "g_target") -> None:
    """Refuse data a fit would turn into a wrong card without noticing.

    Raises
    ------
    MeasurementFormatError
        naming the file and field: a level of one device; reads and targets of different scales
        (the median over levels of mean g_P / target outside SCALE_RANGE: e.g. reads in S
        labelled uS); a level whose spread across devices is below MIN_RELATIVE_SPREAD of its
        mean; constant reads (no device's reads change, no read noise).
    """
    single = np.flatnonzero(st.n_total == 1)
    if single.size:
        vals = ", ".join(f"{st.x[i] * st.g_max:.6g} S" for i in single[:5])
        raise MeasurementFormatError(
            st.source, tfield, f"{single.size} level(s) with a single device (g_target = "
            f"{vals}{', ...' if single.size > 5 else ''})", "devices programmed to one target "
            "form a level: store the nominal target, not a measured one, or drop the device "
            "(exclude=)")
    use = (st.n >= MIN_DEVICES_PER_LEVEL) & (st.x > 0)
    if not use.any():
        return
    n, x = st.n[use], st.x[use]
    mean = st.sum_gp[use] / n
    ratio = float(np.median(mean / (x * st.g_max)))
    if not SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
        raise MeasurementFormatError(
            st.source, f"{gfield} and {tfield}", f"reads and targets are of different scales: "
            f"the programmed conductance is {ratio:.3g} x the target (median over levels)",
            "check the units attributes of both (e.g. reads in S labelled uS)")
    var = np.clip((st.sum_gp2[use] - n * mean**2) / np.maximum(n - 1, 1), 0.0, None)
    flat = np.sqrt(var) < MIN_RELATIVE_SPREAD * mean
    if flat.any():
        i = int(np.argmax(flat))
        raise MeasurementFormatError(
            st.source, gfield, f"the level g_target = {x[i] * st.g_max:.6g} S has a spread "
            f"across devices below {MIN_RELATIVE_SPREAD:g} of its mean", "the reads look copied "
            "or quantised away; check the file")
    # nu and the read-noise sums are exactly 0 for constant reads, up to float32 rounding
    mu_nu = st.sum_nu[use] / n
    sd_nu = np.sqrt(np.clip(st.sum_nu2[use] / n - mu_nu**2, 0.0, None))
    if st.has_repeats:
        noise = float(np.sum(st.rn_s2) / max(np.sum(st.rn_g2), 1e-300))
    else:
        noise = float(np.sum(st.rn_rss) / max(np.sum(st.rn_h1), 1.0))
    if np.all(np.abs(mu_nu) < 1e-6) and np.all(sd_nu < 1e-6) and noise < 1e-12:
        raise MeasurementFormatError(
            st.source, gfield, "constant reads: no device's reads change with time or between "
            "reads", "check that the file holds the measured reads")


def _usable_levels(st: CampaignStats, what: str, need: int) -> np.ndarray:
    use = (st.n >= MIN_DEVICES_PER_LEVEL) & (st.x > 0)
    if use.sum() < need:
        raise FitError(
            f"{st.source}: g_target: {int(use.sum())} usable target level(s) with >= "
            f"{MIN_DEVICES_PER_LEVEL} devices and g_target > 0; the {what} fit needs at least "
            f"{need} distinct levels spread over (0, g_max]")
    return use


def _cov(jac: np.ndarray) -> np.ndarray:
    """Covariance of a least-squares estimate from the Jacobian of its weighted residuals."""
    return np.linalg.pinv(jac.T @ jac)


# ------------------------------------------------------------------ the log of a noisy read
#: Relative read-noise standard deviations s of the table of log_noise_moments, dimensionless.
_S_TABLE = np.linspace(0.0, 2.0, 801)


def _log_read_grid(s2, n: int = 4001):
    """Quadrature of eps ~ Normal(0, s2) conditioned on 1 + eps > 0 in u = ln(1 + eps): the grid
    u (..., n) and its normalised trapezoid weights (..., n). In u the integrand is smooth
    (the density carries the factor e^u) and the divergent log at 1 + eps = 0 is far out at
    u = -40 when the truncation matters (s > 0.1), else the grid spans eps in +-10 s."""
    s = np.sqrt(np.clip(np.asarray(s2, dtype=np.float64), 0.0, None))[..., None]
    s = np.maximum(s, 1e-12)
    lo = np.where(10.0 * s < 1.0, np.log(np.clip(1.0 - 10.0 * s, 1e-300, None)), -40.0)
    hi = np.log1p(10.0 * s)
    u = lo + (hi - lo) * np.linspace(0.0, 1.0, n)
    e = np.exp(u)
    dens = np.exp(-0.5 * ((e - 1.0) / s) ** 2) * e
    w = dens * (hi - lo) / (n - 1)
    w[..., 0] *= 0.5
    w[..., -1] *= 0.5
    return u, w / w.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=1)
def _log_noise_table():
    """Mean and variance of ln(1 + eps) at the s of _S_TABLE."""
    u, w = _log_read_grid(_S_TABLE**2)
    mean = (w * u).sum(axis=-1)
    var = np.clip((w * u * u).sum(axis=-1) - mean**2, 0.0, None)
    mean[0] = var[0] = 0.0
    return mean, var


def log_noise_moments(s2):
    """Mean and variance of u = ln(1 + eps), eps ~ Normal(0, s2) conditioned on 1 + eps > 0
    (a device with a read of 0 S is left out of the fits).

    Tabulated by quadrature at s = sqrt(s2) in [0, 2] (steps of 0.0025) and interpolated
    linearly in s2 (both moments are nearly linear in s2; s beyond 2 takes the value at 2).

    Parameters
    ----------
    s2 : array, relative read-noise variance Q_s^2 f2 (Eq. 11), dimensionless

    Returns
    -------
    (mean, var) : arrays like s2, dimensionless; mean ~ -s2/2, var ~ s2 + 2.5 s2^2 for small s2
    """
    s2 = np.clip(np.asarray(s2, dtype=np.float64), 0.0, None)
    mean, var = _log_noise_table()
    return np.interp(s2, _S_TABLE**2, mean), np.interp(s2, _S_TABLE**2, var)


def _power_moment(s2, p):
    """E[(1 + eps)^p] for eps ~ Normal(0, s2) conditioned on 1 + eps > 0 (dimensionless)."""
    u, w = _log_read_grid(s2)
    return (w * np.exp(np.asarray(p, dtype=np.float64)[..., None] * u)).sum(axis=-1)


def _level_read_noise(st: CampaignStats, q_model: PCMModel):
    """(s2 (K, T), cells (K, T)): the relative read-noise variance Q_s(x)^2 f2 at each level and
    time (mean f2 of the cells read) and the cells read per level and time."""
    cnt = st.lt[:, :, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        f2 = np.where(cnt > 0, st.lt[:, :, 1] / cnt, 0.0)
    q = np.asarray(read_noise_q(st.x, q_model), dtype=np.float64)
    return q[:, None] ** 2 * np.clip(f2, 0.0, None), cnt


def _read_noise_for_corrections(st: CampaignStats, prior: PCMModel, read_noise, named: bool):
    """The model whose Q_s corrects drift and programming noise when R = 1 (None with repeats)."""
    if st.has_repeats:
        return None, ""
    if read_noise is not None:
        return read_noise, "read-noise corrections with the given read-noise model"
    params, comps = fit_read_noise(None, prior if named else None, stats=st)
    cf = comps["read_noise"]
    note = ("read-noise corrections with the fitted Q_s" if cf.identified
            else f"read-noise corrections with the prior's Q_s ({cf.source})")
    return prior.replace(**params), note


def fit_programming_noise(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
                          read_noise: PCMModel | None = None, exclude=None,
                          activation_energy: float | None = None,
                          reference_temperature: float | None = None,
                          chunk_devices: int | None = None, progress: bool = False,
                          stats: CampaignStats | None = None):
    """Fit sigma_P(x) = c0 + c1 x + c2 x^2 (Eq. 7) to the spread of g_P per level.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign (docs/measurement-format.md), lazy or in memory; conductances [S], times [s].
    prior : PCMModel, preset name or device card path, optional
        Start values and conventions; default ``PCMModel()``. With one read per time and fewer
        than three read times, its read noise corrects the spread (then name it).
    read_noise : PCMModel, optional
        With one read per time: the model whose Q_s gives the read-noise part of the spread;
        default the read noise fitted to the same data (:func:`fit_read_noise`).
    exclude, activation_energy, reference_temperature
        Devices to drop, E_a [eV] and T_ref [K] of the equivalent times (see :func:`fit_pcm`).
    chunk_devices : int, optional
        Devices per streamed chunk.
    progress : bool
        Show a progress bar.
    stats : CampaignStats, optional
        Statistics from :func:`campaign_statistics` (then ``ds`` is not read again).

    Returns
    -------
    params : dict
        ``{"prog_coeffs": (c0, c1, c2)}`` [S].
    components : dict of str -> ComponentFit
        ``{"programming_noise": ...}`` with sigma_P per level [S].

    Raises
    ------
    FitError
        Fewer than three usable target levels, no spread.
    """
    named = prior is not None
    prior = resolve_prior(prior)
    st = _stats(ds, prior, chunk_devices, progress, stats, exclude, activation_energy,
                reference_temperature)
    use = _usable_levels(st, "programming-noise", 3)
    n = st.n[use]
    mean = st.sum_gp[use] / n
    var_tot = (st.sum_gp2[use] - n * mean**2) / (n - 1)
    q_model, q_note = _read_noise_for_corrections(st, prior, read_noise, named)
    if q_model is None:
        var_meas = st.sum_gp2_var[use] / n       # read-noise part of the extrapolated g_P
        var_p = var_tot - var_meas
        scale2 = 1.0
    else:
        s2, cnt = _level_read_noise(st, q_model)
        vbar = st.lt[:, :, 4] / np.maximum(st.n, 1)[:, None]
        m1 = np.prod(_power_moment(s2, vbar), axis=1)[use]
        m2 = np.prod(_power_moment(s2, 2.0 * vbar), axis=1)[use]
        e_p = mean / m1
        var_p = (var_tot - e_p**2 * (m2 - m1**2)) / m2
        scale2 = m2
    sigma = np.sqrt(np.clip(var_p, 0.0, None))
    se = var_tot / (scale2 * np.maximum(sigma, 1e-30) * np.sqrt(2.0 * (n - 1)))
    x = st.x[use]

    def poly(xx, c0, c1, c2):
        return c0 + xx * (c1 + xx * c2)  # Eq. 7

    if not np.any(sigma > 0):
        raise FitError(f"{st.source}: g: no spread of the programmed conductance across devices "
                       "at any level; cannot fit programming noise")
    popt, pcov = optimize.curve_fit(poly, x, sigma, p0=np.asarray(prior.prog_coeffs),
                                    sigma=se, absolute_sigma=True)
    notes = ["sigma_P per level: spread of the extrapolated g_P (t = 0) minus its read-noise "
             "variance; weighted least squares"]
    if q_note:
        notes.append(q_note)
    cf = ComponentFit(
        name="programming_noise", formula="sigma_P = c0 + c1 x + c2 x^2", units="S",
        coeff_names=("c0", "c1", "c2"), coeffs=popt, stderr=np.sqrt(np.diag(pcov)),
        covariance=pcov,
        coeff_units=("S", "S", "S"), x=x, data=sigma, data_se=se, fitted=poly(x, *popt),
        n_devices=n, n_params=3, notes="; ".join(notes))
    return {"prog_coeffs": tuple(float(c) for c in popt)}, {"programming_noise": cf}


def _fit_clipped_log(x, y, se, prior_coeffs, prior_bounds, clip: str, lo_min: float):
    """Fit y = clip(a ln x + b, lo, hi) (Eq. 9); returns (coeffs, bounds, stderr(4), note)."""
    lnx = np.log(x)
    hi_inf = np.inf

    if clip == "fixed":
        lo, hi = prior_bounds

        def resid(p):
            return (np.clip(p[0] * lnx + p[1], lo, hi) - y) / se

        starts = [np.asarray(prior_coeffs, dtype=float)]
    else:
        def resid(p):
            return (np.clip(p[0] * lnx + p[1], p[2], hi_inf) - y) / se

        # Two starts: the prior, and a line through the lower-x half with the floor at the rest.
        half = x <= np.median(x)
        a0, b0 = np.polyfit(lnx[half], y[half], 1) if half.sum() >= 2 else prior_coeffs
        starts = [np.array([*prior_coeffs, max(prior_bounds[0], lo_min)], dtype=float),
                  np.array([a0, b0, max(float(y[~half].mean()) if (~half).any() else y.min(),
                                        lo_min)])]
    best = None
    for p0 in starts:
        lb = [-np.inf, -np.inf] + ([lo_min] if clip != "fixed" else [])
        p0 = np.maximum(p0, np.asarray(lb) + 1e-12 * 0)
        res = optimize.least_squares(resid, p0, bounds=(lb, np.inf), x_scale="jac")
        if best is None or res.cost < best.cost:
            best = res
    cov_p = _cov(best.jac)
    se_p = np.sqrt(np.clip(np.diag(cov_p), 0.0, None))
    a, b = best.x[:2]
    line = a * lnx + b
    notes = []
    if clip == "fixed":
        lo, hi = prior_bounds
        se_b = (np.nan, np.nan)
    else:
        lo = float(best.x[2])
        se_lo = float(se_p[2])
        if not np.any(line < lo):  # floor never reached: not identified by the data
            lo = float(min(prior_bounds[0], line.min()))
            se_lo = np.nan
            notes.append("lower clip not reached by the data: kept from the prior")
        hi = float(max(prior_bounds[1], line.max()))
        if hi > prior_bounds[1]:
            notes.append("upper clip raised to the largest fitted value")
        se_b = (se_lo, np.nan)
    cov = np.full((4, 4), np.nan)
    k = 2 if clip == "fixed" else 3
    cov[:k, :k] = cov_p[:k, :k]
    return ((float(a), float(b)), (max(lo, lo_min), hi), np.array([*se_p[:2], *se_b]), cov,
            notes)


def fit_drift(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
              clip: str = "fit", read_noise: PCMModel | None = None, exclude=None,
              activation_energy: float | None = None,
              reference_temperature: float | None = None, chunk_devices: int | None = None,
              progress: bool = False, stats: CampaignStats | None = None):
    """Fit the drift-exponent statistics mu_nu(x), sigma_nu(x) (Eqs. 8-9).

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign, lazy or in memory; conductances [S], times [s].
    prior : PCMModel, preset name or device card path, optional
        Start values, the clip bounds kept when not fitted; default ``PCMModel()``.
    clip : {"fit", "fixed"}
        "fit": fit slope, intercept and the lower clip; the upper clip from the prior (raised to
        the largest fitted value at the measured levels). "fixed": both clips from the prior.
    read_noise : PCMModel, optional
        With one read per time: the model whose Q_s gives the read-noise part of the spread of
        nu; default the read noise fitted to the same data.
    exclude, activation_energy, reference_temperature
        See :func:`fit_pcm`.
    chunk_devices : int, optional
    progress : bool
    stats : CampaignStats, optional

    Returns
    -------
    params : dict
        ``drift_mean_coeffs``, ``drift_mean_bounds``, ``drift_std_coeffs``, ``drift_std_bounds``
        (dimensionless).
    components : dict of str -> ComponentFit
        ``{"drift_mean": ..., "drift_std": ...}``.

    Raises
    ------
    FitError
        Fewer than two usable levels, fewer than two read times.
    """
    if clip not in ("fit", "fixed"):
        raise ValueError(f"clip = {clip!r}: choose 'fit' or 'fixed'")
    named = prior is not None
    prior = resolve_prior(prior)
    st = _stats(ds, prior, chunk_devices, progress, stats, exclude, activation_energy,
                reference_temperature)
    use = _usable_levels(st, "drift", 2 if clip == "fixed" else 3)
    n, x = st.n[use], st.x[use]
    mu = st.sum_nu[use] / n
    var_tot = (st.sum_nu2[use] - n * mu**2) / (n - 1)
    q_model, q_note = _read_noise_for_corrections(st, prior, read_noise, named)
    if q_model is None:
        var_meas = st.sum_var_nu[use] / n        # read-noise part of each device's slope
    else:
        s2, _ = _level_read_noise(st, q_model)
        u_mean, u_var = log_noise_moments(s2)
        per = 1.0 / np.maximum(st.n, 1)[:, None]
        # nu_raw = nu - sum_k w_k u_k: mean shifted by the bias of the log, spread widened
        mu = mu + np.sum(st.lt[:, :, 2] * per * u_mean, axis=1)[use]
        var_meas = np.sum(st.lt[:, :, 3] * per * u_var, axis=1)[use]
    sd = np.sqrt(np.clip(var_tot - var_meas, 0.0, None))
    mu_se = np.sqrt(var_tot / n)
    sd_se = var_tot / (np.maximum(sd, 1e-12) * np.sqrt(2.0 * (n - 1)))
    out, comps = {}, {}
    for key, y, se, lo_min in (("drift_mean", mu, mu_se, -np.inf), ("drift_std", sd, sd_se, 0.0)):
        coeffs, bounds, stderr, cov, notes = _fit_clipped_log(
            x, y, se, getattr(prior, f"{key}_coeffs"), getattr(prior, f"{key}_bounds"), clip,
            lo_min)
        out[f"{key}_coeffs"], out[f"{key}_bounds"] = coeffs, bounds
        sym = "mu_nu" if key == "drift_mean" else "sigma_nu"
        comps[key] = ComponentFit(
            name=key, formula=f"{sym} = clip(a ln x + b, lo, hi)", units="1",
            coeff_names=("a", "b", "lo", "hi"), coeffs=np.array([*coeffs, *bounds]),
            stderr=stderr, covariance=cov, coeff_units=("1",) * 4, x=x, data=y, data_se=se,
            fitted=np.clip(coeffs[0] * np.log(x) + coeffs[1], *bounds), n_devices=n,
            n_params=2 if clip == "fixed" else 3,
            notes="; ".join([f"clip={clip}", *notes, *([q_note] if q_note else [])]))
    return out, comps


def _read_noise_from_prior(st: CampaignStats, prior: PCMModel | None, reason: str):
    if prior is None:
        raise FitError(f"{st.source}: g: the read noise is not identified by these data "
                       f"({reason}); name a prior for it: prior=PCMModel.preset('rasch2023') or "
                       "a device card (command line: --prior)")
    source = f"from prior {prior.name}, not identified by these data ({reason})"
    cf = ComponentFit.from_prior(
        *_READ_NOISE[:4], (prior.read_noise_coeff, prior.read_noise_exponent,
                           prior.read_noise_max), _READ_NOISE[4], source,
        notes=f"read_noise_time={prior.read_noise_time}, "
              f"read_noise_reference={prior.read_noise_reference}")
    return ({"read_noise_coeff": prior.read_noise_coeff,
             "read_noise_exponent": prior.read_noise_exponent}, {"read_noise": cf})


def _q2_from_residuals(st: CampaignStats, ok: np.ndarray):
    """Per group: Q^2 solving sum RSS = sum_k H1_k V(Q^2 F_k), and its standard error."""
    h1 = st.rn_h1[ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        fbar = np.where(h1 > 0, st.rn_hf[ok] / h1, 0.0)
    rss = st.rn_rss[ok]

    def expected(q2):
        return np.sum(h1 * log_noise_moments(q2[:, None] * fbar)[1], axis=1)

    lo = np.zeros(rss.size)
    hi = np.full(rss.size, 4.0 / np.max(fbar, axis=1))  # s = 2, the end of the table
    for _ in range(60):  # bisection, all groups at once (expected() increases with Q^2)
        mid = 0.5 * (lo + hi)
        big = expected(mid) > rss
        hi = np.where(big, mid, hi)
        lo = np.where(big, lo, mid)
    q2 = 0.5 * (lo + hi)
    dq = 1e-4 * np.maximum(q2, 1e-12)
    slope = (expected(q2 + dq) - expected(np.maximum(q2 - dq, 0.0))) / (
        q2 + dq - np.maximum(q2 - dq, 0.0))
    dof = h1.sum(axis=1)
    se_q2 = rss * np.sqrt(2.0 / dof) / np.maximum(slope, 1e-300)
    return q2, se_q2


def fit_read_noise(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
                   exclude=None, activation_energy: float | None = None,
                   reference_temperature: float | None = None,
                   chunk_devices: int | None = None, progress: bool = False,
                   stats: CampaignStats | None = None):
    """Fit Q_s(x) = min(coeff x^exponent, cap) (Eqs. 10-11) to the read-to-read spread.

    With repeated reads (R >= 2) from their spread; with one read per time from each device's
    scatter around its own drift line (devices read at >= 3 times; see the module docstring for
    what that estimate holds); with fewer read times from ``prior``, marked not identified.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign; conductances [S], times [s].
    prior : PCMModel, preset name or device card path, optional
        Start values, the cap (kept), ``t_read`` [s] when the campaign has none, and the
        conventions ``read_noise_time`` ("t" or "t_plus_t0") and ``read_noise_reference``
        ("target" or "programmed"); default ``PCMModel()`` ("t", "target"). Its read noise is
        used when the data do not identify it: then it must be given.
    exclude, activation_energy, reference_temperature
        See :func:`fit_pcm`.
    chunk_devices : int, optional
    progress : bool
    stats : CampaignStats, optional

    Returns
    -------
    params : dict
        ``read_noise_coeff``, ``read_noise_exponent`` (dimensionless).
    components : dict of str -> ComponentFit
        ``{"read_noise": ...}`` with Q_s per group (dimensionless); ``identified`` False when
        taken from the prior.

    Raises
    ------
    FitError
        No read time after T_read, fewer than two usable groups with repeats, read noise not
        identified and no prior named.
    """
    named = None if prior is None else resolve_prior(prior)
    prior = PCMModel() if named is None else named
    st = _stats(ds, prior, chunk_devices, progress, stats, exclude, activation_energy,
                reference_temperature)
    cap = prior.read_noise_max
    p0 = (prior.read_noise_coeff, prior.read_noise_exponent)
    conv = (f"read_noise_time={prior.read_noise_time}, "
            f"read_noise_reference={prior.read_noise_reference}; cap kept from the prior")
    if st.has_repeats:
        t_eff = st.time + (st.t0 if prior.read_noise_time == "t_plus_t0" else 0.0)
        f2 = np.log((t_eff + st.t_read) / (2.0 * st.t_read))     # Eq. 11, squared time factor
        if st.temperature is not None or st.chunks_general:
            with np.errstate(invalid="ignore", divide="ignore"):
                f2 = st.lt[:, :, 1].sum(0) / st.lt[:, :, 0].sum(0)  # mean f2 of the cells
        tk = np.isfinite(f2) & (f2 > 0)
        if not tk.any():
            raise FitError(f"{st.source}: time: no read time later than T_read = "
                           f"{st.t_read:.3g} s; the 1/f read noise cannot be measured")
        ok_g = (st.rn_n >= MIN_DEVICES_PER_LEVEL) & np.all(st.rn_g2[:, tk] > 0, axis=1)
        ok_g &= (st.rn_x > 0) & np.all(st.rn_dof[:, tk] > 0, axis=1)
        if ok_g.sum() < 2:
            raise FitError(f"{st.source}: g_target: {int(ok_g.sum())} usable conductance "
                           "group(s); the read-noise fit needs at least two distinct levels")
        n_g = st.rn_n[ok_g]
        x = st.rn_x[ok_g] / n_g
        ratio = st.rn_s2[ok_g][:, tk] / st.rn_g2[ok_g][:, tk]      # (G, T') = Q^2 f2
        f2t = f2[tk]
        q2 = np.mean(ratio / f2t, axis=1)
        if not np.any(q2 > 0):
            raise FitError(f"{st.source}: g: repeated reads are identical; no read noise to fit")
        rel_gk = np.sqrt(2.0 / st.rn_dof[ok_g][:, tk])              # rel. SE of each ratio
        q = np.sqrt(np.clip(q2, 0.0, None))
        q_se = 0.5 * q * np.sqrt(np.mean(rel_gk**2, axis=1) / f2t.size)
        xx = np.repeat(x, f2t.size)
        ff = np.tile(f2t, x.size)
        yy = ratio.ravel()
        sig = (q2[:, None] * f2t[None, :] * rel_gk).ravel()
        how = "spread of the repeated reads at each time"
    else:
        reason = None
        ok_g = (st.rn_nrss >= MIN_DEVICES_PER_LEVEL) & (st.rn_x > 0)
        ok_g &= np.any(st.rn_h1 > 0, axis=1) & np.all(np.isfinite(st.rn_hf), axis=1)
        if st.time.size < 3:
            reason = f"one read per time at {st.time.size} times: a device's line through " \
                     "two points leaves no scatter"
        elif ok_g.sum() < 2:
            reason = (f"one read per time; {int(ok_g.sum())} group(s) with "
                      f"{MIN_DEVICES_PER_LEVEL} devices read at three or more times")
        if reason is not None:
            return _read_noise_from_prior(st, named, reason)
        n_g = st.rn_nrss[ok_g]
        x = st.rn_x[ok_g] / st.rn_n[ok_g]
        q2_g, se_q2 = _q2_from_residuals(st, ok_g)
        if not np.any(q2_g > 0):
            raise FitError(f"{st.source}: g: every device lies exactly on its drift line; no "
                           "read noise to fit")
        q = np.sqrt(q2_g)
        q_se = se_q2 / (2.0 * np.maximum(q, 1e-30))
        xx, ff, yy, sig = x, np.ones_like(x), q2_g, se_q2
        how = ("scatter of each device around its own drift line (one read per time): residual "
               "variance of ln g = Q_s^2 ln((t_eff + T_read)/(2 T_read)) averaged over the cells "
               "with weights (1 - h), nothing else subtracted; a drift law that is not a power "
               "law or any per-read noise besides the 1/f read noise would raise Q_s")

    def model(_, c, p):
        return np.minimum(c * xx**p, cap) ** 2 * ff           # Eqs. 10-11

    popt, pcov = optimize.curve_fit(model, xx, yy, p0=p0, sigma=sig, absolute_sigma=True)
    c, p = (float(v) for v in popt)
    cf = ComponentFit(
        name="read_noise", formula="Q_s = min(coeff x^exponent, cap)", units="1",
        coeff_names=("coeff", "exponent", "cap"), coeffs=np.array([c, p, cap]),
        stderr=np.array([*np.sqrt(np.diag(pcov)), np.nan]),
        covariance=np.pad(pcov, ((0, 1), (0, 1)), constant_values=np.nan),
        coeff_units=("1", "1", "1"),
        x=x, data=q, data_se=q_se, fitted=np.minimum(c * x**p, cap), n_devices=n_g, n_params=2,
        notes=f"{how}; {conv}")
    return {"read_noise_coeff": c, "read_noise_exponent": p}, {"read_noise": cf}


def fit_pcm(ds: xr.Dataset, prior: PCMModel | None = None, *, clip: str = "fit",
            exclude=None, activation_energy: float | ActivationEnergy | None = None,
            reference_temperature: float | None = None, chunk_devices: int | None = None,
            progress: bool = False, name: str = "fitted") -> tuple[PCMModel, FitReport]:
    """Fit a whole PCM model (programming noise, drift, read noise) to a campaign.

    One streaming pass over the data (memory independent of the file size; two when the
    activation energy is fitted), then :func:`fit_read_noise`, :func:`fit_programming_noise` and
    :func:`fit_drift` on its statistics.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign from :func:`aimc_device.io.read_measurements` (lazy) or
        :func:`aimc_device.pcm.simulate_campaign`; not modified.
    prior : PCMModel, preset name or device card path, optional
        Start values, conventions, the clips and cap not fitted, fault fractions; default
        ``PCMModel()``. Components the data do not identify (the read noise with one read per
        time at fewer than three times) are taken from it, and then it must be named.
    clip : {"fit", "fixed"}
        Drift clip bounds (see :func:`fit_drift`).
    exclude : str, sequence or aimc_device.io.DeviceExclusion, optional
        Devices to drop besides those marked False in ``valid``: index ranges ("0-9,17") and
        rules ("dead", "stuck", "outside:LO:HI"); what was dropped and why goes into the report
        and the provenance.
    activation_energy : float or ActivationEnergy, optional
        E_a [eV] of the temperature acceleration; default fitted when the campaign has bakes at
        two or more temperatures, else the campaign attribute, else the prior's (if not 0). An
        :class:`ActivationEnergy` is one already resolved for this campaign (by
        :func:`resolve_activation_energy`, e.g. in :func:`aimc_device.fit.fit_device`), used
        with its source and fit.
    reference_temperature : float, optional
        T_ref [K] of the fitted model; default the campaign's.
    chunk_devices : int, optional
        Devices per streamed chunk.
    progress : bool
        Show a tqdm progress bar.
    name : str
        Name of the fitted model.

    Returns
    -------
    (PCMModel, FitReport)
        The fitted model (g_max [S], t0 [s], T_read [s], E_a [eV], T_ref [K] from the campaign
        and the fit) and the report.

    Raises
    ------
    FitError
        When the data cannot support a fit (one usable level, all devices excluded, bakes at
        one temperature without an activation energy, read noise not identified and no prior).
    MeasurementFormatError
        Implausible data (see :func:`check_plausible`) or a broken file.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset, got {type(ds).__name__}")
    named = prior is not None
    prior = resolve_prior(prior)
    if clip not in ("fit", "fixed"):  # before the pass over the data
        raise ValueError(f"clip = {clip!r}: choose 'fit' or 'fixed'")
    if chunk_devices is not None:
        check_int(chunk_devices, "chunk_devices", lo=1)
    exclusion = DeviceExclusion.parse(exclude)
    if isinstance(activation_energy, ActivationEnergy):  # resolved by the caller
        ea, activation_energy = activation_energy, None
    else:
        ea = resolve_activation_energy(
            ds, prior if named else None, activation_energy, reference_temperature,
            exclude=exclusion, chunk_devices=chunk_devices, progress=progress)
    st = campaign_statistics(ds, prior, chunk_devices, progress, exclude=exclusion,
                             activation_energy=ea.value,
                             reference_temperature=ea.reference_temperature)
    check_plausible(st, field_name(ds, "g"), field_name(ds, "g_target"))
    _usable_levels(st, "PCM", 2 if clip == "fixed" else 3)
    params, comps = {}, {}
    p, c = fit_read_noise(None, prior if named else None, stats=st)
    params.update(p)
    comps.update(c)
    for fn, kw in ((fit_programming_noise, {}), (fit_drift, {"clip": clip})):
        p, c = fn(None, prior if named else None, stats=st, **kw)
        params.update(p)
        comps.update(c)
    order = ("programming_noise", "drift_mean", "drift_std", "read_noise")
    comps = {k: comps[k] for k in order}
    if ea.component is not None:
        comps["activation_energy"] = ea.component
    src = st.source
    try:
        model = prior.replace(g_max=st.g_max, t0=st.t0, t_read=st.t_read, name=name,
                              activation_energy=ea.value,
                              reference_temperature=ea.reference_temperature,
                              citation=f"fitted by aimc_device.fit.fit_pcm to "
                                       f"{os.path.basename(src)}", **params)
    except ValueError as exc:
        raise FitError(f"{src}: the fitted statistics are not a valid model ({exc})") from None
    from .. import __version__

    notes = []
    lost = (st.n_total - st.n_excluded < MIN_DEVICES_PER_LEVEL) & (st.n_total > 1)
    few = (st.n < MIN_DEVICES_PER_LEVEL) & ~lost & (st.n_total > 1)
    for what, mask in (("left with fewer than 3 devices after exclusion", lost),
                       (f"with fewer than {MIN_DEVICES_PER_LEVEL} usable devices", few)):
        if mask.any():
            notes.append(f"{int(mask.sum())} level(s) {what} left out of the fits (x = "
                         f"{', '.join(f'{v:.3g}' for v in st.x[mask])})")
    if st.n_unusable.sum():
        notes.append(f"{int(st.n_unusable.sum())} device(s) without a usable drift line (a read "
                     "of 0 S, or read at fewer than two times) left out")
    excl = st.exclusion.to_dict()
    opts = [f"clip={clip}", f"read_noise_time={prior.read_noise_time}",
            f"read_noise_reference={prior.read_noise_reference}",
            f"prior={prior.name if named else 'default'}"]
    if exclusion.spec:
        opts.append(f"exclude={exclusion.spec}")
    if activation_energy is not None:
        opts.append(f"activation_energy={activation_energy:g}")
    if reference_temperature is not None:
        opts.append(f"reference_temperature={reference_temperature:g}")
    prov = {"source_file": src, "fit_function": "aimc_device.fit.fit_pcm",
            "fit_options": ", ".join(opts), "package_version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "reads_per_time": st.repeats,
            "excluded_devices": st.exclusion.summary(),
            "missing_reads": int(st.missing_reads.sum()),
            "activation_energy_source": ea.source,
            "activation_energy_stderr_eV": ea.stderr}
    for key, cf in comps.items():
        prov[f"component_{key}"] = cf.provenance_line()
    report = FitReport(
        components=comps, model=model, n_devices=int(st.n_total.sum()),
        n_excluded=int(st.n_total.sum() - st.n[st.x > 0].sum()), exclusions=excl,
        missing_reads=st.missing_reads,
        activation_energy={"value": ea.value, "stderr": ea.stderr,
                           "reference_temperature": ea.reference_temperature,
                           "source": ea.source, "identified": ea.identified},
        notes=notes, provenance=prov)
    return model, report
