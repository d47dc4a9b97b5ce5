"""Fit the statistics of a PCM model (MODEL.md section 4) to a measurement campaign.

Every function streams the campaign once, chunk by chunk (see :mod:`._stats`), reduces it to
per-level estimates with standard errors, and fits the functional form of the model to them with
:mod:`scipy.optimize`. None of them modifies its input.

Choices (documented here and in the FitReport notes):

- programming noise (Eq. 7): sigma_P per level is the spread across devices of the extrapolated
  g_P = exp(intercept of the drift line at t = 0), minus the mean read-noise variance of that
  intercept; c0 + c1 x + c2 x^2 is fitted to it by weighted least squares (curve_fit);
- drift (Eqs. 8-9): nu per device is minus the slope of ln(repeat-mean g) against
  ln((t + t0) / t0); per level its mean and its spread (minus the read-noise variance of the
  slope). mu_nu and sigma_nu are fitted (least_squares, weighted) to clip(a ln x + b, lo, hi) with
  ``clip="fit"``: a, b and the lower clip ``lo`` are fitted (the data at large x reach it); the
  upper clip ``hi`` is only reached at x < 0.02 for the published numbers, so it is taken from
  the prior and raised, if needed, to the largest fitted value at the measured levels. When the
  data never reach ``lo`` it is kept from the prior likewise. ``clip="fixed"`` keeps both clips
  of the prior and fits a and b only;
- read noise (Eqs. 10-11): per group (target level for ``read_noise_reference == "target"``,
  bins of the estimated g_P / g_max for "programmed") and time, the ratio of the summed repeat
  variances to the summed unbiased g_D^2 estimates is Q_s(x)^2 ln((t_eff + T_read)/(2 T_read)),
  with t_eff = t or t + t0 per ``read_noise_time``; coeff and exponent of Q_s = coeff x^exponent
  are fitted to all (group, time) points at once (curve_fit, weighted); the cap of Q_s is kept
  from the prior (reached only at x < 0.01 for the published numbers).
"""
from __future__ import annotations

import datetime as _dt
import os

import numpy as np
import xarray as xr
from scipy import optimize

from ..pcm import PCMModel
from .._checks import check_int
from ._stats import CampaignStats, FitError, campaign_statistics, resolve_prior
from .report import ComponentFit, FitReport

__all__ = ["fit_programming_noise", "fit_drift", "fit_read_noise", "fit_pcm", "FitError"]

#: Fewest devices a level needs to enter a fit.
MIN_DEVICES_PER_LEVEL = 3


def _stats(ds, prior, chunk_devices, progress, stats) -> CampaignStats:
    if stats is not None:
        return stats
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset (from aimc_device.io.read_measurements),"
                        f" got {type(ds).__name__}")
    return campaign_statistics(ds, prior, chunk_devices, progress)


def _usable_levels(st: CampaignStats, what: str, need: int) -> np.ndarray:
    use = (st.n >= MIN_DEVICES_PER_LEVEL) & (st.x > 0)
    if use.sum() < need:
        raise FitError(
            f"{st.source}: g_target: {int(use.sum())} usable target level(s) with >= "
            f"{MIN_DEVICES_PER_LEVEL} devices and g_target > 0; the {what} fit needs at least "
            f"{need} distinct levels spread over (0, g_max]")
    return use


def _cov_se(jac: np.ndarray) -> np.ndarray:
    cov = np.linalg.pinv(jac.T @ jac)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def fit_programming_noise(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
                          chunk_devices: int | None = None, progress: bool = False,
                          stats: CampaignStats | None = None):
    """Fit sigma_P(x) = c0 + c1 x + c2 x^2 (Eq. 7) to the spread of g_P per level.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign (docs/measurement-format.md), lazy or in memory; conductances [S], times [s].
    prior : PCMModel, preset name or device card path, optional
        Start values and conventions; default ``PCMModel()``.
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
        Fewer than three usable target levels, no repeated reads, all-zero conductance.
    """
    prior = resolve_prior(prior)
    st = _stats(ds, prior, chunk_devices, progress, stats)
    use = _usable_levels(st, "programming-noise", 3)
    n = st.n[use]
    mean = st.sum_gp[use] / n
    var_tot = (st.sum_gp2[use] - n * mean**2) / (n - 1)
    var_meas = st.sum_gp2_var[use] / n           # read-noise part of the extrapolated g_P
    sigma = np.sqrt(np.clip(var_tot - var_meas, 0.0, None))
    se = var_tot / (np.maximum(sigma, 1e-30) * np.sqrt(2.0 * (n - 1)))
    x = st.x[use]

    def poly(xx, c0, c1, c2):
        return c0 + xx * (c1 + xx * c2)  # Eq. 7

    if not np.any(sigma > 0):
        raise FitError(f"{st.source}: g: no spread of the programmed conductance across devices "
                       "at any level; cannot fit programming noise")
    popt, pcov = optimize.curve_fit(poly, x, sigma, p0=np.asarray(prior.prog_coeffs),
                                    sigma=se, absolute_sigma=True)
    cf = ComponentFit(
        name="programming_noise", formula="sigma_P = c0 + c1 x + c2 x^2", units="S",
        coeff_names=("c0", "c1", "c2"), coeffs=popt, stderr=np.sqrt(np.diag(pcov)),
        coeff_units=("S", "S", "S"), x=x, data=sigma, data_se=se, fitted=poly(x, *popt),
        n_devices=n, n_params=3,
        notes="sigma_P per level: spread of the extrapolated g_P (t = 0) minus its read-noise "
              "variance; weighted least squares")
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
    se_p = _cov_se(best.jac)
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
    return (float(a), float(b)), (max(lo, lo_min), hi), np.array([*se_p[:2], *se_b]), notes


def fit_drift(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
              clip: str = "fit", chunk_devices: int | None = None, progress: bool = False,
              stats: CampaignStats | None = None):
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
        Fewer than two usable levels, fewer than two read times, no repeats, all-zero data.
    """
    if clip not in ("fit", "fixed"):
        raise ValueError(f"clip = {clip!r}: choose 'fit' or 'fixed'")
    prior = resolve_prior(prior)
    st = _stats(ds, prior, chunk_devices, progress, stats)
    use = _usable_levels(st, "drift", 2 if clip == "fixed" else 3)
    n, x = st.n[use], st.x[use]
    mu = st.sum_nu[use] / n
    var_tot = (st.sum_nu2[use] - n * mu**2) / (n - 1)
    var_meas = st.sum_var_nu[use] / n            # read-noise part of each device's slope
    sd = np.sqrt(np.clip(var_tot - var_meas, 0.0, None))
    mu_se = np.sqrt(var_tot / n)
    sd_se = var_tot / (np.maximum(sd, 1e-12) * np.sqrt(2.0 * (n - 1)))
    out, comps = {}, {}
    for key, y, se, lo_min in (("drift_mean", mu, mu_se, -np.inf), ("drift_std", sd, sd_se, 0.0)):
        coeffs, bounds, stderr, notes = _fit_clipped_log(
            x, y, se, getattr(prior, f"{key}_coeffs"), getattr(prior, f"{key}_bounds"), clip,
            lo_min)
        out[f"{key}_coeffs"], out[f"{key}_bounds"] = coeffs, bounds
        sym = "mu_nu" if key == "drift_mean" else "sigma_nu"
        comps[key] = ComponentFit(
            name=key, formula=f"{sym} = clip(a ln x + b, lo, hi)", units="1",
            coeff_names=("a", "b", "lo", "hi"), coeffs=np.array([*coeffs, *bounds]),
            stderr=stderr, coeff_units=("1",) * 4, x=x, data=y, data_se=se,
            fitted=np.clip(coeffs[0] * np.log(x) + coeffs[1], *bounds), n_devices=n,
            n_params=2 if clip == "fixed" else 3,
            notes="; ".join([f"clip={clip}", *notes]))
    return out, comps


def fit_read_noise(ds: xr.Dataset | None = None, prior: PCMModel | None = None, *,
                   chunk_devices: int | None = None, progress: bool = False,
                   stats: CampaignStats | None = None):
    """Fit Q_s(x) = min(coeff x^exponent, cap) (Eqs. 10-11) to the spread of repeated reads.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign with repeated reads (repeat >= 2); conductances [S], times [s].
    prior : PCMModel, preset name or device card path, optional
        Start values, the cap (kept), ``t_read`` [s] when the campaign has none, and the
        conventions ``read_noise_time`` ("t" or "t_plus_t0") and ``read_noise_reference``
        ("target" or "programmed"); default ``PCMModel()`` ("t", "target").
    chunk_devices : int, optional
    progress : bool
    stats : CampaignStats, optional

    Returns
    -------
    params : dict
        ``read_noise_coeff``, ``read_noise_exponent`` (dimensionless).
    components : dict of str -> ComponentFit
        ``{"read_noise": ...}`` with Q_s per group (dimensionless).

    Raises
    ------
    FitError
        No repeated reads, no read time after T_read, fewer than two usable groups.
    """
    prior = resolve_prior(prior)
    st = _stats(ds, prior, chunk_devices, progress, stats)
    t_eff = st.time + (st.t0 if prior.read_noise_time == "t_plus_t0" else 0.0)
    f2 = np.log((t_eff + st.t_read) / (2.0 * st.t_read))     # Eq. 11, squared time factor
    tk = f2 > 0
    if not tk.any():
        raise FitError(f"{st.source}: time: no read time later than T_read = {st.t_read:.3g} s; "
                       "the 1/f read noise cannot be measured")
    ok_g = (st.rn_n >= MIN_DEVICES_PER_LEVEL) & np.all(st.rn_g2[:, tk] > 0, axis=1)
    ok_g &= st.rn_x > 0
    if ok_g.sum() < 2:
        raise FitError(f"{st.source}: g_target: {int(ok_g.sum())} usable conductance group(s); "
                       "the read-noise fit needs at least two distinct levels")
    n_g = st.rn_n[ok_g]
    x = st.rn_x[ok_g] / n_g
    ratio = st.rn_s2[ok_g][:, tk] / st.rn_g2[ok_g][:, tk]      # (G, T') = Q^2 f2
    f2t = f2[tk]
    q2 = np.mean(ratio / f2t, axis=1)
    if not np.any(q2 > 0):
        raise FitError(f"{st.source}: g: repeated reads are identical; no read noise to fit")
    rel = np.sqrt(2.0 / (n_g * (st.repeats - 1)))               # rel. SE of each ratio
    q = np.sqrt(np.clip(q2, 0.0, None))
    q_se = 0.5 * q * rel / np.sqrt(f2t.size)
    cap = prior.read_noise_max
    xx = np.repeat(x, f2t.size)
    ff = np.tile(f2t, x.size)
    yy = ratio.ravel()
    sig = (q2[:, None] * f2t[None, :] * rel[:, None]).ravel()

    def model(_, c, p):
        return np.minimum(c * xx**p, cap) ** 2 * ff           # Eqs. 10-11

    p0 = (prior.read_noise_coeff, prior.read_noise_exponent)
    popt, pcov = optimize.curve_fit(model, xx, yy, p0=p0, sigma=sig, absolute_sigma=True)
    c, p = (float(v) for v in popt)
    cf = ComponentFit(
        name="read_noise", formula="Q_s = min(coeff x^exponent, cap)", units="1",
        coeff_names=("coeff", "exponent", "cap"), coeffs=np.array([c, p, cap]),
        stderr=np.array([*np.sqrt(np.diag(pcov)), np.nan]), coeff_units=("1", "1", "1"),
        x=x, data=q, data_se=q_se, fitted=np.minimum(c * x**p, cap), n_devices=n_g, n_params=2,
        notes=f"read_noise_time={prior.read_noise_time}, "
              f"read_noise_reference={prior.read_noise_reference}; cap kept from the prior")
    return {"read_noise_coeff": c, "read_noise_exponent": p}, {"read_noise": cf}


def fit_pcm(ds: xr.Dataset, prior: PCMModel | None = None, *, clip: str = "fit",
            chunk_devices: int | None = None, progress: bool = False,
            name: str = "fitted") -> tuple[PCMModel, FitReport]:
    """Fit a whole PCM model (programming noise, drift, read noise) to a campaign.

    One streaming pass over the data (memory independent of the file size), then
    :func:`fit_programming_noise`, :func:`fit_drift` and :func:`fit_read_noise` on its statistics.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign from :func:`aimc_device.io.read_measurements` (lazy) or
        :func:`aimc_device.pcm.simulate_campaign`; not modified.
    prior : PCMModel, preset name or device card path, optional
        Start values, conventions, the clips and cap not fitted, fault fractions; default
        ``PCMModel()``.
    clip : {"fit", "fixed"}
        Drift clip bounds (see :func:`fit_drift`).
    chunk_devices : int, optional
        Devices per streamed chunk.
    progress : bool
        Show a tqdm progress bar.
    name : str
        Name of the fitted model.

    Returns
    -------
    (PCMModel, FitReport)
        The fitted model (g_max [S], t0 [s] and T_read [s] from the campaign) and the report.

    Raises
    ------
    FitError
        When the data cannot support a fit (one level only, no repeated reads, all-zero g).
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset, got {type(ds).__name__}")
    prior = resolve_prior(prior)
    if clip not in ("fit", "fixed"):  # before the pass over the data
        raise ValueError(f"clip = {clip!r}: choose 'fit' or 'fixed'")
    if chunk_devices is not None:
        check_int(chunk_devices, "chunk_devices", lo=1)
    st = campaign_statistics(ds, prior, chunk_devices, progress)
    params, comps = {}, {}
    for fn, kw in ((fit_programming_noise, {}), (fit_drift, {"clip": clip}), (fit_read_noise, {})):
        p, c = fn(None, prior, stats=st, **kw)
        params.update(p)
        comps.update(c)
    src = st.source
    try:
        model = prior.replace(g_max=st.g_max, t0=st.t0, t_read=st.t_read, name=name,
                              citation=f"fitted by aimc_device.fit.fit_pcm to "
                                       f"{os.path.basename(src)}", **params)
    except ValueError as exc:
        raise FitError(f"{src}: the fitted statistics are not a valid model ({exc})") from None
    from .. import __version__

    report = FitReport(
        components=comps, model=model, n_devices=int(st.n_total.sum()),
        n_excluded=int(st.n_total.sum() - st.n[st.x > 0].sum()),
        provenance={"source_file": src, "fit_function": "aimc_device.fit.fit_pcm",
                    "fit_options": f"clip={clip}, read_noise_time={prior.read_noise_time}, "
                                   f"read_noise_reference={prior.read_noise_reference}",
                    "package_version": __version__,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return model, report
