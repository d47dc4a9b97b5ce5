"""Temperature acceleration: equivalent times of a campaign and its activation energy.

A campaign may hold intervals at other temperatures than its reference temperature T_ref (a
bake: a step of elevated temperature between two reads). Reads then map to equivalent times at
T_ref through the Arrhenius acceleration factor [1] (:func:`aimc_device.pcm.equivalent_time`):

    t_eq,k = sum_{i <= k} (t_i - t_{i-1}) exp(E_a / k_B (1/T_ref - 1/T_i)),   t_{-1} = 0,

the time-temperature equivalence of the drift (structural relaxation) of PCM [2]. Every fit takes
its times from it.

The activation energy E_a is, in this order: the one given (``activation_energy=``); fitted when
the campaign has intervals at two or more temperatures other than T_ref (below); the campaign's
root attribute ``activation_energy`` [eV]; the prior model's when it is not 0; otherwise a
campaign with bakes is refused (one bake temperature does not separate E_a from the shape of
the time dependence).

The fit: per level l and time k, the mean y_lk of ln(g / g_max) over the devices read (their
bias-corrected repeat means) with its standard error, and for a trial E_a the mean L_lk over the
same devices of L = ln((t_eq(E_a) + t0) / t0) from each device's own read times; the drift law
(Eq. 8 of the paper, averaged over the devices of a level: E[ln g] = E[ln g_P] - E[nu] E[L])
makes each level a straight line in L. The objective is
chi2(E_a) = sum_lk ((y_lk - a_l - b_l L_lk) / se_lk)^2, with each level's a_l, b_l by weighted
least squares (the curves of all levels collapse onto
their lines at the right E_a); it is scanned over 0-3 eV, refined with
``scipy.optimize.minimize_scalar`` and then fitted with all a_l, b_l and E_a together by
``scipy.optimize.least_squares``, whose Jacobian gives the standard error of E_a (scaled by
sqrt(reduced chi2) when that exceeds 1).

References
----------
.. [1] JEDEC JEP122, "Failure Mechanisms and Models for Semiconductor Devices" (Arrhenius
   acceleration factor).
.. [2] D. Ielmini, S. Lavizzari, D. Sharma, A. L. Lacaita, "Temperature acceleration of structural
   relaxation in amorphous Ge2Sb2Te5", Appl. Phys. Lett. 92(19) (2008),
   doi:10.1063/1.2930680; D. Ielmini et al., "Reliability impact of chalcogenide-structure
   relaxation in phase-change memory (PCM) cells - Part I: Experimental study", IEEE Trans.
   Electron Devices 56(5), 1070-1077 (2009), doi:10.1109/TED.2009.2016397.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy import optimize
from scipy.interpolate import CubicSpline

from ..io import DeviceExclusion, MeasurementFormatError
from ..io.measurements import target_levels
from ..pcm import PCMModel
from ..pcm import equivalent_time as _equivalent_time
from ._stats import FitError, campaign_temperatures, iter_campaign_chunks, log_time
from .report import ComponentFit

__all__ = ["equivalent_time", "ActivationEnergy", "resolve_activation_energy",
           "fit_activation_energy", "bake_temperatures", "E_A_RANGE"]

#: Range of activation energies scanned by the fit [eV].
E_A_RANGE = (0.0, 3.0)
#: Fewest devices read at a (level, time) for its mean to enter the activation-energy fit.
MIN_CELL_DEVICES = 3


def equivalent_time(ds: xr.Dataset, activation_energy: float,
                    reference_temperature: float | None = None) -> np.ndarray:
    """Equivalent times at the reference temperature of every read of a campaign [s].

    t_eq,k = sum_{i <= k} (t_i - t_{i-1}) exp(E_a / k_B (1/T_ref - 1/T_i)), t_{-1} = 0, with
    T_i the campaign's ``temperature`` of the interval ending with read i (its reference
    temperature where it has none) [1, 2].

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign; its ``read_time(device, time)`` [s] when present, else the coordinate
        ``time`` [s].
    activation_energy : float, E_a [eV]
    reference_temperature : float, optional, T_ref [K]; default the campaign's
        ``reference_temperature`` attribute (300 K when absent)

    Returns
    -------
    ndarray (N, T) with per-device read times, else (T,); float64 [s]. Loads ``read_time``
    (N x T values); the fits stream it by device chunks instead.
    """
    temperature, t_ref = campaign_temperatures(ds, reference_temperature)
    t = ds["read_time"].values if "read_time" in ds else ds["time"].values
    return _equivalent_time(t, temperature, float(activation_energy), t_ref)


def bake_temperatures(ds: xr.Dataset, reference_temperature: float | None = None) -> np.ndarray:
    """The distinct interval temperatures of a campaign other than T_ref [K] (rounded to 0.01 K)."""
    temperature, t_ref = campaign_temperatures(ds, reference_temperature)
    if temperature is None:
        return np.zeros(0)
    temps = np.unique(np.round(temperature, 2))
    return temps[np.abs(temps - round(t_ref, 2)) > 0]


@dataclass
class ActivationEnergy:
    """The activation energy a fit used, and where it came from.

    Attributes
    ----------
    value : float, E_a [eV]
    stderr : float, its standard error [eV] (nan when not fitted)
    reference_temperature : float, T_ref [K]
    source : str, "fitted to ...", "given ...", "campaign attribute ...", "from prior ..."
    identified : bool, True when the campaign's data determined it
    component : ComponentFit or None, the fit when there was one
    """

    value: float
    stderr: float
    reference_temperature: float
    source: str
    identified: bool
    component: ComponentFit | None = None


def _campaign_attr_ea(ds: xr.Dataset, where: str) -> float | None:
    if "activation_energy" not in ds.attrs:
        return None
    try:
        value = float(np.asarray(ds.attrs["activation_energy"]).reshape(()))
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise MeasurementFormatError(where, "attrs['activation_energy']",
                                     f"{ds.attrs['activation_energy']!r} is not an energy >= 0",
                                     "store the activation energy in eV")
    return value


def resolve_activation_energy(ds: xr.Dataset, prior: PCMModel | None = None,
                              activation_energy: float | None = None,
                              reference_temperature: float | None = None, *, exclude=None,
                              chunk_devices: int | None = None,
                              progress: bool = False) -> ActivationEnergy:
    """The activation energy for a campaign's equivalent times (see the module docstring).

    Parameters
    ----------
    ds : xarray.Dataset, a campaign
    prior : PCMModel, optional; its ``activation_energy`` [eV] is the last resort (when not 0)
    activation_energy : float, optional, E_a given by the user [eV]; used as is
    reference_temperature : float, optional, T_ref [K]; default the campaign's
    exclude : devices to drop for the fit (:class:`aimc_device.io.DeviceExclusion`)
    chunk_devices : int, optional; progress : bool

    Returns
    -------
    ActivationEnergy

    Raises
    ------
    FitError
        The campaign has intervals away from T_ref at one temperature only and no E_a is given
        (argument, campaign attribute or prior).
    """
    where = ds.attrs.get("source_file", "<Dataset>")
    temperature, t_ref = campaign_temperatures(ds, reference_temperature)
    bakes = bake_temperatures(ds, reference_temperature)
    if activation_energy is not None:
        value = float(activation_energy)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"activation_energy = {activation_energy!r}: an energy >= 0 [eV]")
        return ActivationEnergy(value, float("nan"), t_ref, f"given (activation_energy = "
                                f"{value:g} eV), not fitted", False)
    if bakes.size >= 2:
        return fit_activation_energy(ds, t_ref, exclude=exclude, chunk_devices=chunk_devices,
                                     progress=progress)
    attr = _campaign_attr_ea(ds, where)
    if attr is not None:
        return ActivationEnergy(attr, float("nan"), t_ref, "campaign attribute "
                                "activation_energy, not fitted", False)
    prior_ea = prior.activation_energy if prior is not None else 0.0
    if temperature is None:
        return ActivationEnergy(prior_ea, float("nan"), t_ref, "not identified by these data "
                                "(no interval away from the reference temperature): kept from "
                                "the prior", False)
    if prior_ea > 0:
        return ActivationEnergy(prior_ea, float("nan"), t_ref,
                                f"from prior {prior.name}, not identified by these data (bakes at"
                                f" one temperature, {bakes[0]:.2f} K)", False)
    raise FitError(f"{where}: temperature: the campaign has bakes at one temperature "
                   f"({', '.join(f'{b:.2f} K' for b in bakes)}) besides T_ref = {t_ref:.2f} K, "
                   "which does not determine the activation energy; give it (activation_energy="
                   " / --activation-energy, in eV, or the campaign attribute activation_energy), "
                   "or measure bakes at two or more temperatures")


def _log_time_means(ds: xr.Dataset, exclusion: DeviceExclusion, temperature: np.ndarray,
                    t_ref: float, grid: np.ndarray, chunk_devices: int | None, progress: bool):
    """One pass: per level and time, the devices read, the sums of y = ln(m / g_max) (m the
    mean of the reads taken, + s2 / (2 r m^2) with >= 2 of them) and of y^2, and for each E_a
    of ``grid`` the sum of L = ln((t_eq(E_a) + t0) / t0) over the same cells."""
    g_max, t0 = float(ds.attrs["g_max"]), float(ds.attrs["t0"])
    levels = target_levels(ds, chunk_devices)
    k, t_n = levels.size, ds.sizes["time"]
    cnt, sy, syy = (np.zeros((k, t_n)) for _ in range(3))
    sl = np.zeros((grid.size, k, t_n))
    # E_a = 0: the chunks' equivalent times are the read times themselves
    chunks = iter_campaign_chunks(ds, exclude=exclusion, activation_energy=0.0,
                                  reference_temperature=t_ref, chunk_devices=chunk_devices)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="activation energy", unit="chunk", disable=None)
    for ch in chunks:
        lev = np.searchsorted(levels, ch.g_target)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gg = ch.g.astype(np.float64)
            r = np.sum(~np.isnan(gg), axis=2)
            m = np.nanmean(gg, axis=2)
            y = np.log(m / g_max)
            if gg.shape[2] >= 2:
                s2 = np.nanvar(gg, axis=2, ddof=1)
                y = y + np.where(r >= 2, s2 / (2.0 * r * m * m), 0.0)
        cell = ch.keep[:, None] & np.isfinite(y)
        t = np.broadcast_to(ch.t_eq, y.shape)
        y0 = np.where(cell, y, 0.0)
        for j in range(t_n):
            cnt[:, j] += np.bincount(lev, cell[:, j], minlength=k)
            sy[:, j] += np.bincount(lev, y0[:, j], minlength=k)
            syy[:, j] += np.bincount(lev, y0[:, j] ** 2, minlength=k)
        for e, e_a in enumerate(grid):
            L = np.where(cell, log_time(_equivalent_time(t, temperature, e_a, t_ref), t0), 0.0)
            for j in range(t_n):
                sl[e, :, j] += np.bincount(lev, L[:, j], minlength=k)
    return levels.astype(np.float64) / g_max, cnt, sy, syy, sl


def fit_activation_energy(ds: xr.Dataset, reference_temperature: float | None = None, *,
                          exclude=None, chunk_devices: int | None = None,
                          progress: bool = False) -> ActivationEnergy:
    """Fit E_a to a campaign with bakes at two or more temperatures (see the module docstring).

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign with ``temperature(time)`` [K]; lazy or in memory.
    reference_temperature : float, optional, T_ref [K]; default the campaign's
    exclude : devices to drop (:class:`aimc_device.io.DeviceExclusion`)
    chunk_devices : int, optional; progress : bool

    Returns
    -------
    ActivationEnergy with its ComponentFit ("activation_energy": the level means against the
    fitted lines, x = the mean L at the fitted E_a).

    Notes
    -----
    The mean of L over the devices of a level at a time depends on E_a through each device's
    own read times; it is summed in the one pass over the data on a grid of E_a (0.05 eV steps
    over E_A_RANGE) and interpolated between them with a cubic spline (L is smooth in E_a).
    """
    temperature, t_ref = campaign_temperatures(ds, reference_temperature)
    where = ds.attrs.get("source_file", "<Dataset>")
    if temperature is None:
        raise FitError(f"{where}: temperature: every interval is at T_ref = {t_ref:.2f} K; "
                       "nothing determines an activation energy")
    grid = np.linspace(E_A_RANGE[0], E_A_RANGE[1], 61)
    x, cnt, sy, syy, sl = _log_time_means(ds, DeviceExclusion.parse(exclude), temperature, t_ref,
                                          grid, chunk_devices, progress)
    cell = (cnt >= MIN_CELL_DEVICES) & (x[:, None] > 0)
    use = cell.sum(axis=1) >= 3
    if not use.any():
        raise FitError(f"{where}: g: no level has {MIN_CELL_DEVICES} devices read at three or "
                       "more times; the activation energy cannot be fitted")
    cnt, cell, sl = cnt[use], cell[use], sl[:, use]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(cell, sy[use] / cnt, 0.0)
        var = (syy[use] - cnt * y**2) / (cnt - 1)
        se = np.where(cell, np.sqrt(np.clip(var, 0.0, None) / cnt), np.inf)
        mean_l = CubicSpline(grid, np.where(cell[None], sl / cnt[None], 0.0), axis=0)
    se = np.where(se > 0, se, np.inf)
    wgt = np.where(np.isfinite(se), 1.0 / se**2, 0.0)
    k_lev = int(use.sum())

    def lines(e_a):
        L = mean_l(e_a)
        sw, swx, swy = wgt.sum(1), (wgt * L).sum(1), (wgt * y).sum(1)
        swxx, swxy = (wgt * L * L).sum(1), (wgt * L * y).sum(1)
        b = (sw * swxy - swx * swy) / (sw * swxx - swx**2)
        return L, (swy - b * swx) / sw, b

    def chi2(e_a):
        L, a, b = lines(e_a)
        return float(np.sum(wgt * (y - a[:, None] - b[:, None] * L) ** 2))

    vals = np.array([chi2(e) for e in grid])
    j = int(np.argmin(vals))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
    e_best = float(optimize.minimize_scalar(chi2, bounds=(lo, hi), method="bounded",
                                            options={"xatol": 1e-7}).x)
    _, a0, b0 = lines(e_best)
    sw = np.sqrt(wgt)

    def resid(p):
        a, b = p[:k_lev, None], p[k_lev:2 * k_lev, None]
        return (sw * (y - a - b * mean_l(p[-1])))[cell]

    res = optimize.least_squares(resid, np.concatenate([a0, b0, [e_best]]), x_scale="jac",
                                 bounds=([-np.inf] * (2 * k_lev) + [E_A_RANGE[0]],
                                         [np.inf] * (2 * k_lev) + [E_A_RANGE[1]]))
    n_pts, n_par = int(cell.sum()), 2 * k_lev + 1
    chi2_red = float(np.sum(res.fun**2) / max(1, n_pts - n_par))
    cov = np.linalg.pinv(res.jac.T @ res.jac)
    e_fit = float(res.x[-1])
    se_e = float(np.sqrt(max(cov[-1, -1], 0.0)) * np.sqrt(max(1.0, chi2_red)))
    Lf = mean_l(e_fit)
    fitted = res.x[:k_lev, None] + res.x[k_lev:2 * k_lev, None] * Lf
    temps = ", ".join(f"{v:.2f} K" for v in bake_temperatures(ds, reference_temperature))
    cf = ComponentFit(
        name="activation_energy",
        formula="mean ln(g/g_max) of level l = a_l + b_l ln((t_eq(E_a) + t0)/t0)", units="1",
        coeff_names=("E_a", "T_ref"), coeffs=np.array([e_fit, t_ref]),
        stderr=np.array([se_e, np.nan]), coeff_units=("eV", "K"), x=Lf[cell], data=y[cell],
        data_se=se[cell], fitted=fitted[cell], n_devices=cnt[cell], n_params=n_par,
        notes=f"bakes at {temps}; per level a straight line in L = ln((t_eq + t0)/t0) (Eq. 8 "
              "averaged over devices), E_a common to all levels; x is the mean L at the fitted "
              "E_a. The level means at successive times share their devices, so the standard "
              "errors treat correlated points as independent and chi2_red is small")
    return ActivationEnergy(e_fit, se_e, t_ref, f"fitted to bakes at {temps}", True, cf)
