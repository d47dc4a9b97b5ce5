"""One streaming pass over a campaign: per-level sufficient statistics for all fits.

Per device (vectorised over a device chunk), from the R repeated reads at each of the T times:
the repeat mean m_k and the unbiased repeat variance s2_k [S^2]. Then

- drift: an ordinary least-squares line of y_k = ln m_k + s2_k / (2 R m_k^2) (the second term
  removes the bias of the log of a noisy mean) against L_k = ln((t_k + t0) / t0) (Eq. 8);
  nu = -slope, ln g_P = intercept (the extrapolation to t = 0). The read-noise part of each
  device's slope and intercept variance is known from the repeats: Var(ln m_k) ~ s2_k / (R m_k^2)
  (delta method), propagated with the OLS weights. Its mean over a level is subtracted from the
  spread of nu and of g_P across devices, so the fitted spreads are those of the devices alone;
- read noise: per group (target level, or bin of the estimated g_P / g_max for the "programmed"
  convention) and time, sum s2 and the unbiased sum (m^2 - s2 / R) of g_D^2; their ratio is
  sigma_read^2 / g_D^2 = Q_s^2 ln((t_eff + T_read) / (2 T_read)) (Eq. 11).

Only sums are kept (a few arrays of length levels x times), so memory does not grow with the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from ..io import iter_device_chunks
from ..io.measurements import CONDUCTANCE_UNITS, TIME_UNITS, _check_dataset, _root_quantity
from ..pcm import PCMModel

__all__ = ["CampaignStats", "FitError", "campaign_statistics", "PROGRAMMED_BINS"]

#: Edges of the bins of x_P = g_P / g_max that group devices for the read-noise fit when Q_s is
#: referred to the programmed conductance (``read_noise_reference == "programmed"``),
#: dimensionless: 80 log-spaced bins from 1e-3 to 2.
PROGRAMMED_BINS = np.geomspace(1e-3, 2.0, 81)


class FitError(ValueError):
    """The data cannot support the requested fit (one level only, no repeated reads, ...)."""


@dataclass
class CampaignStats:
    """Sums over devices per target level (and per read-noise group and time).

    Attributes
    ----------
    x : ndarray (K,), relative target of each level, g_target / g_max, dimensionless
    g_max : float, [S]; t0 : float, [s]; t_read : float, [s]
    time : ndarray (T,), read times [s]
    repeats : int, R
    n_total : ndarray (K,), devices per level
    n : ndarray (K,), devices used (all repeat-means > 0)
    sum_nu, sum_nu2, sum_var_nu : ndarray (K,), sums of nu, nu^2, read-noise variance of nu
    sum_gp, sum_gp2, sum_gp2_var : ndarray (K,), sums of g_P [S], g_P^2 [S^2], g_P^2 Var(ln g_P)
    rn_x : ndarray (G,), sum of x_ref per read-noise group
    rn_n : ndarray (G,), devices per read-noise group
    rn_s2 : ndarray (G, T), sum of repeat variances [S^2]
    rn_g2 : ndarray (G, T), sum of unbiased g_D^2 estimates [S^2]
    reference : str, "target" or "programmed"
    source : str, the file the statistics came from (or "<Dataset>")
    """

    x: np.ndarray
    g_max: float
    t0: float
    t_read: float
    time: np.ndarray
    repeats: int
    reference: str
    source: str
    n_total: np.ndarray = field(default=None)
    n: np.ndarray = field(default=None)
    sum_nu: np.ndarray = field(default=None)
    sum_nu2: np.ndarray = field(default=None)
    sum_var_nu: np.ndarray = field(default=None)
    sum_gp: np.ndarray = field(default=None)
    sum_gp2: np.ndarray = field(default=None)
    sum_gp2_var: np.ndarray = field(default=None)
    rn_x: np.ndarray = field(default=None)
    rn_n: np.ndarray = field(default=None)
    rn_s2: np.ndarray = field(default=None)
    rn_g2: np.ndarray = field(default=None)

    def __post_init__(self):
        k, t_n = self.x.size, self.time.size
        g = k if self.reference == "target" else PROGRAMMED_BINS.size - 1
        for name in ("n_total", "n", "sum_nu", "sum_nu2", "sum_var_nu", "sum_gp", "sum_gp2",
                     "sum_gp2_var"):
            setattr(self, name, np.zeros(k))
        self.rn_x, self.rn_n = np.zeros(g), np.zeros(g)
        self.rn_s2, self.rn_g2 = np.zeros((g, t_n)), np.zeros((g, t_n))

    @property
    def drift_log_time(self) -> np.ndarray:
        """L_k = ln((t_k + t0) / t0), dimensionless (Eq. 8)."""
        return np.log((self.time + self.t0) / self.t0)


def _drift_weights(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS weights: slope = y @ w, intercept (at L = 0) = y @ v."""
    Lc = L - L.mean()
    w = Lc / np.dot(Lc, Lc)
    v = 1.0 / L.size - L.mean() * w
    return w, v


def _accumulate(st: CampaignStats, level: np.ndarray, g: np.ndarray, w, v) -> None:
    k, r = st.x.size, st.repeats
    m = g.mean(axis=2, dtype=np.float64)                      # (n, T) repeat mean [S]
    s2 = g.var(axis=2, ddof=1, dtype=np.float64)              # (n, T) repeat variance [S^2]
    st.n_total += np.bincount(level, minlength=k)
    ok = np.all(m > 0, axis=1)
    if not ok.all():
        m, s2, level = m[ok], s2[ok], level[ok]
    if level.size == 0:
        return
    rel = s2 / (r * m * m)                                   # Var(ln m_k), delta method
    y = np.log(m) + 0.5 * rel                                 # bias-corrected ln of the mean
    slope, icpt = y @ w, y @ v
    var_slope, var_icpt = rel @ (w * w), rel @ (v * v)
    nu = -slope
    gp = np.exp(icpt - 0.5 * var_icpt)                        # g_P at t = 0 [S]
    bc = lambda a: np.bincount(level, weights=a, minlength=k)  # noqa: E731
    st.n += np.bincount(level, minlength=k)
    st.sum_nu += bc(nu)
    st.sum_nu2 += bc(nu * nu)
    st.sum_var_nu += bc(var_slope)
    st.sum_gp += bc(gp)
    st.sum_gp2 += bc(gp * gp)
    st.sum_gp2_var += bc(gp * gp * var_icpt)
    if st.reference == "target":
        grp, xref = level, st.x[level]
    else:
        xref = gp / st.g_max
        grp = np.clip(np.searchsorted(PROGRAMMED_BINS, xref) - 1, 0, PROGRAMMED_BINS.size - 2)
    n_g = st.rn_n.size
    st.rn_n += np.bincount(grp, minlength=n_g)
    st.rn_x += np.bincount(grp, weights=xref, minlength=n_g)
    g2 = m * m - s2 / r                                       # unbiased g_D^2 [S^2]
    for kt in range(st.time.size):
        st.rn_s2[:, kt] += np.bincount(grp, weights=s2[:, kt], minlength=n_g)
        st.rn_g2[:, kt] += np.bincount(grp, weights=g2[:, kt], minlength=n_g)


def campaign_statistics(ds: xr.Dataset, prior: PCMModel | None = None,
                        chunk_devices: int | None = None, progress: bool = False
                        ) -> CampaignStats:
    """Stream a campaign once, chunk by chunk, and return its per-level sums.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign (docs/measurement-format.md), lazy or in memory; not modified.
    prior : PCMModel, optional
        Supplies the conventions (``read_noise_reference``) and ``t_read`` [s] when the campaign
        has none. Default ``PCMModel()`` (the rasch2023 statistics, conventions "t"/"target").
    chunk_devices : int, optional
        Devices per chunk; default the dask chunking of ``g`` (about 32 MiB).
    progress : bool
        Show a tqdm progress bar over chunks (when stderr is a terminal).

    Returns
    -------
    CampaignStats

    Raises
    ------
    FitError
        No repeated reads, fewer than two read times, or all conductances zero.
    MeasurementFormatError
        When the Dataset breaks the schema or a chunk holds NaN, inf or negative values.
    """
    prior = prior or PCMModel()
    where = ds.attrs.get("source_file", "<Dataset>")
    _check_dataset_quick(ds, where)
    g_max = _root_quantity(where, ds.attrs, "g_max", CONDUCTANCE_UNITS, True)
    t0 = _root_quantity(where, ds.attrs, "t0", TIME_UNITS, True)
    t_read = _root_quantity(where, ds.attrs, "t_read", TIME_UNITS, False) or prior.t_read
    time = np.asarray(ds["time"].values, dtype=np.float64)
    repeats = int(ds.sizes["repeat"])
    if repeats < 2:
        raise FitError(f"{where}: g: only {repeats} read per time; the read-noise and the "
                       "noise corrections need repeated reads (repeat >= 2)")
    if time.size < 2:
        raise FitError(f"{where}: time: only {time.size} read time; the drift fit needs at least "
                       "two (better five or more, spread over decades)")
    g_target = np.asarray(ds["g_target"].values, dtype=np.float64)
    levels, inverse = np.unique(g_target, return_inverse=True)
    st = CampaignStats(x=levels / g_max, g_max=g_max, t0=t0, t_read=t_read, time=time,
                       repeats=repeats, reference=prior.read_noise_reference, source=where)
    w, v = _drift_weights(st.drift_log_time)
    chunks = iter_device_chunks(ds, chunk_devices)
    if progress:
        from tqdm.auto import tqdm

        data = ds["g"].data
        n_chunks = (len(data.chunks[0]) if hasattr(data, "chunks") and chunk_devices is None
                    else None)
        chunks = tqdm(chunks, total=n_chunks, desc="fitting", unit="chunk", disable=None)
    start = 0
    for part in chunks:
        g = part["g"].values
        stop = start + g.shape[0]
        _accumulate(st, inverse[start:stop], g, w, v)
        start = stop
    if st.n.sum() == 0:
        raise FitError(f"{where}: g: every device reads 0 S at some time (all-zero "
                       "conductance); nothing to fit — check the units and the measurement")
    return st


def _check_dataset_quick(ds: xr.Dataset, where: str) -> None:
    """Structure, units, attrs, g_target and time (g itself is checked chunk by chunk)."""
    from ..io import MeasurementFormatError

    _check_dataset(ds, where)
    if ds["g"].attrs.get("units") != "S" or ds["g_target"].attrs.get("units") != "S" or \
            ds["time"].attrs.get("units") != "s":
        raise MeasurementFormatError(where, "units", "the fits expect SI units (S, s)",
                                     "read the file with aimc_device.io.read_measurements, which "
                                     "converts to SI")
