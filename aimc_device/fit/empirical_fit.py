"""Fit the empirical device model (:class:`~aimc_device.pcm.EmpiricalModel`) to a campaign.

One streaming pass over device chunks (memory independent of the number of devices), in threads,
gathers per level x_k and time index m:

- a histogram of one read per device (the first repeat that was read) of d = g / g_max - x_k, in
  bins 0.8 % of |d| wide (:mod:`._empirical_kernels`), with the extreme values; the quantiles at
  the probability grid are the Hazen quantiles (p_i = (i - 1/2) / n, linear between order
  statistics) of the binned reads, the reads of a bin spread evenly across it;
- the number of reads and of missing reads (NaN), and the mean and spread of d;
- read noise: with repeated reads (R >= 2), the pooled variance of each device's repeats at that
  time; with one read per time and >= 3 times, the pooled variance of each device's reads
  around its own least-squares line in s = ln((t + t0) / t0) (dof n_reads - 2; any curvature of
  a device's trajectory in s counts as read noise: an upper bound); otherwise it is not
  identified by the data and comes from the ``prior`` the user names, and the model and report
  say so;
- a uniform sample of up to ``sample_devices`` devices per level (the smallest hashes of their
  indices: order-independent, picked in a first pass over g_target in threads), all their
  reads, for the rank correlations.

Then:

- quantiles made non-decreasing across levels (weighted isotonic regression per time and
  probability, weights the reads per level; ``monotone=False`` keeps them as measured; the
  report keeps both);
- rank persistence: per level and consecutive times, the correlation of normal scores of the
  sampled devices' ranks (van der Waerden), rho_meas; the device's own correlation is rho =
  rho_meas / (a_m a_{m+1}), a = sqrt(1 - b^2) the part of a read's rank that is the device's
  (see the EmpiricalModel docstring), clipped to [0, 1];
- goodness of fit per level and time: the Kolmogorov-Smirnov distance between the binned reads
  and the model's distribution at the level (in-sample); :func:`aimc_device.fit.holdout_ks`
  gives the hold-out test for any family.

Devices are left out by the campaign's ``valid`` mask, by ``exclude`` (indices, a mask or a rule
per chunk), and, with ``stuck_below``, as stuck cells (counted into ``stuck_at_zero``).
"""
from __future__ import annotations

import datetime as _dt
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import xarray as xr
from scipy import optimize, special, stats

from ..io import MeasurementFormatError, device_chunk_reader, is_card_path, resolve_device_model
from ..io.measurements import check_conductances, default_chunk_devices, target_levels
from ..pcm import EmpiricalModel, PCMModel
from ..pcm.empirical import DEFAULT_HORIZON, DEFAULT_PROBS, central_width
from ..pcm.formulas import log_time
from ..pcm.formulas import read_noise_std as pcm_read_noise_std
from . import _empirical_kernels as EK
from ._stats import FIT_CHUNK_BYTES, FitError

__all__ = ["fit_empirical", "EmpiricalFitReport", "MIN_DEVICES_PER_LEVEL", "SAMPLE_DEVICES"]

#: Fewest usable devices a level needs.
MIN_DEVICES_PER_LEVEL = 3
#: Devices per level sampled for the rank correlations (standard error of a correlation rho
#: about (1 - rho^2) / sqrt(1000) <= 0.03).
SAMPLE_DEVICES = 1000
#: Key of the hash that picks the sampled devices.
_SAMPLE_KEY = np.uint64(0x5EED_0F_5A_4D_9E_E5)
#: Devices per chunk of the pass that picks the sampled devices (g_target and valid only).
_SAMPLE_CHUNK = 2**20
_BIN_LO, _BIN_HI = EK.bin_edges()


@dataclass
class EmpiricalFitReport:
    """What :func:`fit_empirical` measured, per level (K), time (M) and probability (J).

    Relative quantities are g / g_max or deviations d = g / g_max - x (dimensionless).

    Attributes
    ----------
    model : EmpiricalModel
    levels : (K,) relative targets; times : (M,) node times [s]; probs : (J,)
    quantiles : (K, M, J) the model's quantiles (g / g_max)
    quantiles_measured : (K, M, J) before the isotonic ordering across levels
    n_devices, n_excluded, n_stuck : (K,) devices used, left out (valid mask or exclude), stuck
    n_reads, n_missing : (K, M) reads used (one per device and time) and reads missing (NaN)
    mean, std : (K, M) mean and standard deviation of d
    read_noise : (K, M) relative; read_noise_source : str; read_noise_identified : bool
    rank_correlation_measured : (K, M - 1) van der Waerden correlation of reads at t_m, t_m+1
    rank_correlation : (K, M - 1) the device's own (the model's rho)
    rank_pairs : (K, M - 1) sampled devices behind each correlation
    ks_statistic, ks_pvalue : (K, M) in-sample Kolmogorov-Smirnov distance of the binned reads to
        the model's distribution at the level, and its one-sample p-value (optimistic: fitted)
    time_spread : (M,) largest |s_i - s_node| of per-device log-times (0 for common times)
    n_params : int, numbers in the model's tables (for information criteria)
    notes : list of str; provenance : dict
    """

    model: EmpiricalModel
    levels: np.ndarray
    times: np.ndarray
    probs: np.ndarray
    quantiles: np.ndarray
    quantiles_measured: np.ndarray
    n_devices: np.ndarray
    n_excluded: np.ndarray
    n_stuck: np.ndarray
    n_reads: np.ndarray
    n_missing: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    read_noise: np.ndarray
    read_noise_source: str
    read_noise_identified: bool
    rank_correlation_measured: np.ndarray
    rank_correlation: np.ndarray
    rank_pairs: np.ndarray
    ks_statistic: np.ndarray
    ks_pvalue: np.ndarray
    time_spread: np.ndarray
    n_params: int
    notes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text summary: devices, read noise, fit quality per time."""
        lines = [f"empirical fit of {self.provenance.get('source_file', '<Dataset>')}: "
                 f"{int(self.n_devices.sum())} devices in {self.levels.size} levels, "
                 f"{self.times.size} times ({int(self.n_excluded.sum())} left out, "
                 f"{int(self.n_stuck.sum())} stuck); reads used {int(self.n_reads.sum())}, "
                 f"missing {int(self.n_missing.sum())}",
                 f"  read noise: {self.read_noise_source}"]
        for m, t in enumerate(self.times):
            lines.append(f"  t = {t:10.4g} s: in-sample KS D median "
                         f"{np.nanmedian(self.ks_statistic[:, m]):.3f}, max "
                         f"{np.nanmax(self.ks_statistic[:, m]):.3f}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly summary (arrays as lists)."""
        out = {}
        for k, v in self.__dict__.items():
            if k == "model":
                continue
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


# ----------------------------------------------------------------------------- input checks
def _attr_float(ds: xr.Dataset, where: str, name: str, required: bool = True):
    if name not in ds.attrs:
        if required:
            raise MeasurementFormatError(where, f"attrs['{name}']", "missing",
                                         "read the campaign with aimc_device.io.read_measurements")
        return None
    try:
        value = float(np.asarray(ds.attrs[name]).reshape(()))
    except (TypeError, ValueError):
        raise MeasurementFormatError(where, f"attrs['{name}']", "not a single number",
                                     "store a scalar") from None
    if not np.isfinite(value) or value <= 0:
        raise MeasurementFormatError(where, f"attrs['{name}']", f"{value!r} is not a positive "
                                     "finite number", "store a positive value")
    return value


def _check_structure(ds, where: str):
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset (from aimc_device.io.read_measurements),"
                        f" got {type(ds).__name__}")
    for name, dims in (("g_target", ("device",)), ("g", ("device", "time", "repeat"))):
        if name not in ds:
            raise MeasurementFormatError(where, name, "missing variable", f"needs {name}{dims}")
        if ds[name].dims != dims:
            raise MeasurementFormatError(where, name, f"wrong dims {ds[name].dims}",
                                         f"expected {dims}")
        if not np.issubdtype(ds[name].dtype, np.floating):
            raise MeasurementFormatError(where, name, f"wrong dtype {ds[name].dtype}",
                                         "store it as float32 or float64")
    if "time" not in ds.coords:
        raise MeasurementFormatError(where, "time", "missing coordinate", "add time [s]")


def _resolve_times(ds, times, t0: float, where: str):
    """(source of per-device times or None, common times (T,) or None)."""
    t_n = ds.sizes["time"]
    n = ds.sizes["device"]
    if times is None:
        temp = ds.get("temperature")
        if temp is not None:
            ref = _attr_float(ds, where, "reference_temperature", False)
            temps = np.asarray(temp.values, dtype=float)
            if ref is None or np.any(np.abs(temps - ref) > 1e-9 * ref):
                raise FitError(
                    f"{where}: temperature: the campaign has reads after intervals at other "
                    "temperatures than the reference (bakes); pass times= the equivalent times "
                    "at the reference temperature (aimc_device.fit.equivalent_time(ds, "
                    "activation_energy))")
        times = ds["read_time"] if "read_time" in ds else ds["time"].values
    if isinstance(times, xr.DataArray):
        times = times.data
    shape = tuple(np.shape(times))
    if shape == (t_n,):
        t = np.asarray(times, dtype=np.float64)
        if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(np.diff(t) <= 0):
            raise FitError(f"{where}: times: must be finite, >= 0 and strictly increasing [s]")
        return None, t
    if shape == (n, t_n):
        return times, None
    raise FitError(f"{where}: times: shape {shape}; expected (time,) = ({t_n},) or (device, "
                   f"time) = ({n}, {t_n}) equivalent times [s]")


def _use_mask(ds, exclude, where: str):
    """(``use(start, stop)`` -> bool (stop - start,) of the devices to use, callable rule or
    None). The campaign's ``valid`` mask is read chunk by chunk."""
    n = ds.sizes["device"]
    read_valid = None
    if "valid" in ds:
        if ds["valid"].shape != (n,):
            raise MeasurementFormatError(where, "valid", f"shape {ds['valid'].shape}",
                                         f"expected (device,) = ({n},)")
        read_valid = device_chunk_reader(ds, "valid")
    rule = drop = None
    if callable(exclude):
        rule = exclude
    elif exclude is not None:
        arr = np.asarray(exclude)
        drop = np.zeros(n, dtype=bool)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise ValueError(f"exclude: a boolean mask needs shape ({n},), got {arr.shape}")
            drop = arr
        elif arr.size:
            if not np.issubdtype(arr.dtype, np.integer) or arr.min() < -n or arr.max() >= n:
                raise ValueError(f"exclude: device indices must be integers in [0, {n})")
            drop[arr] = True

    def use(start: int, stop: int, buffer: np.ndarray | None = None) -> np.ndarray:
        """Devices start:stop to use; ``buffer`` (bool, >= stop - start) is reused memory."""
        u = (np.ones(stop - start, bool) if read_valid is None
             else np.array(read_valid(start, stop, buffer), dtype=bool))
        if drop is not None:
            u &= ~drop[start:stop]
        return u

    return use, rule


def _targets(read, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """g_target [S] of devices start:stop as a contiguous float32 or float64 array (into
    ``out`` when given)."""
    gt = np.asarray(read(start, stop, out))
    if gt.dtype not in (np.float32, np.float64):
        gt = gt.astype(np.float64)
    return np.ascontiguousarray(gt)


# ------------------------------------------------------------------------------ the pass
class _Accumulator:
    """One worker thread's histograms (integer counts, extremes: order-independent); int32
    counts (half the cache footprint of int64) unless a level could hold 2^31 devices; the
    columns past N_BINS are work space of EK.one_read_kernel."""

    def __init__(self, k: int, t_n: int, n: int):
        self.hist = np.zeros((k, t_n, EK.HIST_COLUMNS), np.int32 if n < 2**31 else np.int64)
        self.lohi = np.empty((k, t_n, 2))
        self.lohi[..., 0] = np.inf
        self.lohi[..., 1] = -np.inf
        self.buf = None


def _sample(ds, where: str, levels: np.ndarray, g_max: float, use, k_samp: int,
            n_workers: int | None):
    """A pass over g_target (and valid) in threads, one number per device: the targets checked,
    and per level the ``k_samp`` devices with the smallest hashes of their indices among those
    ``use`` keeps (a uniform sample that does not depend on the order, for the rank
    correlations). Returns (sel_idx (S,) sorted device indices, sel_lev (S,) their levels,
    sel_row (S,) their rows lev * k_samp + 0 ... size[lev] - 1, size (K,), counts (K,) the
    devices ``use`` keeps per level)."""
    n, k = ds.sizes["device"], levels.size
    read_target = device_chunk_reader(ds, "g_target")
    local, heaps, lock = threading.local(), [], threading.Lock()

    def work(start: int) -> None:
        stop = min(n, start + _SAMPLE_CHUNK)
        state = getattr(local, "heaps", None)
        if state is None:  # this thread's heaps (EK.bottom_k_add) and read buffers
            state = local.heaps = EK.bottom_k_state(k, k_samp)
            local.gt = np.empty(min(n, _SAMPLE_CHUNK), ds["g_target"].dtype)
            local.valid = np.empty(min(n, _SAMPLE_CHUNK), bool)
            with lock:
                heaps.append(state)
        gt = _targets(read_target, start, stop, local.gt)
        _check_targets(where, start, gt, g_max)
        EK.bottom_k_add(gt, start, levels, use(start, stop, local.valid), _SAMPLE_KEY, *state)

    workers = max(1, numba.get_num_threads() if n_workers is None else int(n_workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(0, n, _SAMPLE_CHUNK)))
    counts = sum((h[3] for h in heaps), np.zeros(k, np.int64))
    chosen = []
    for lev in range(k):  # the smallest among the threads' smallest: as one pass over all
        hh = np.concatenate([h[0][lev, :h[2][lev]] for h in heaps])
        ii = np.concatenate([h[1][lev, :h[2][lev]] for h in heaps])
        chosen.append(np.sort(ii[np.argsort(hh)[:k_samp]]))  # hashes are distinct
    size = np.array([c.size for c in chosen], np.int64)
    none = np.zeros(0, np.int64)
    sel_idx = np.concatenate(chosen + [none])
    sel_lev = np.repeat(np.arange(k), size)
    sel_row = np.concatenate([lev * k_samp + np.arange(m) for lev, m in enumerate(size)] + [none])
    order = np.argsort(sel_idx, kind="stable")
    return sel_idx[order], sel_lev[order], sel_row[order], size, counts


def _stream(ds, where, levels, x_lv, g_max, t0, t_common, t_source, use, rule, stuck_below,
            sampled, k_samp, chunk_devices, progress, n_workers):
    """One pass over the campaign in threads: (hist, lohi, sums, lvl, tsum, sample); sample
    (K * k_samp, T) holds the rows of the ``sampled`` devices (:func:`_sample`)."""
    n, t_n, r_n = ds.sizes["device"], ds.sizes["time"], ds.sizes["repeat"]
    k = levels.size
    sel_idx, sel_lev, sel_row = sampled[:3]
    read_target = device_chunk_reader(ds, "g_target")
    read = device_chunk_reader(ds)
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(t_n, r_n, ds["g"].dtype.itemsize, FIT_CHUNK_BYTES)
    chunk_devices = max(1, int(chunk_devices))
    s_common = None if t_common is None else log_time(t_common, t0)[None, :]
    sample = np.full((max(k * k_samp, 1), t_n), np.nan)
    local = threading.local()
    accs, lock = [], threading.Lock()
    inv_gmax = 1.0 / g_max
    stuck = -1.0 if stuck_below is None else float(stuck_below)

    def work(start: int):
        stop = min(n, start + chunk_devices)
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = _Accumulator(k, t_n, n)
            acc.buf = np.empty((min(n, chunk_devices), t_n, r_n), ds["g"].dtype)
            acc.gt = np.empty(min(n, chunk_devices), ds["g_target"].dtype)
            acc.valid = np.empty(min(n, chunk_devices), bool)
            with lock:
                accs.append(acc)
        g = read(start, stop, acc.buf)
        if g.dtype not in (np.float32, np.float64):
            g = g.astype(np.float64)
        gt = _targets(read_target, start, stop, acc.gt)
        u = use(start, stop, acc.valid)
        if rule is not None:
            drop = np.asarray(rule(start, gt, g), dtype=bool)
            if drop.shape != (stop - start,):
                raise ValueError(f"exclude: the rule returned shape {drop.shape} for devices "
                                 f"{start}:{stop}; expected ({stop - start},)")
            u = u & ~drop
        if s_common is not None:
            s = s_common
        else:
            tt = np.asarray(t_source[start:stop], dtype=np.float64)
            if np.any(tt < 0):
                raise FitError(f"{where}: times: negative read time among devices "
                               f"{start}:{stop}; times are measured from the end of programming")
            s = log_time(tt, t0)
        sums = np.zeros((k, t_n, EK.N_CELL_SUMS))
        lvl = np.zeros((k, EK.N_LEVEL_SUMS))
        tsum = np.zeros((t_n, 4))
        tsum[:, 2], tsum[:, 3] = np.inf, -np.inf
        g = np.ascontiguousarray(g)
        u = np.ascontiguousarray(u)
        s = np.ascontiguousarray(s)
        if r_n == 1 and s_common is not None:  # one read per time at shared times
            kernel = EK.one_read_kernel(t_n, g.dtype == np.float64)
            if kernel(g.reshape(-1), gt, u, levels, x_lv, inv_gmax, s[0], stuck, acc.hist,
                      acc.lohi, sums, lvl):
                _raise_bad_read(where, start, g)
        else:
            _raise_bad_read(where, start, g)
            EK.chunk_kernel(g, gt, u, levels, x_lv, inv_gmax, s, stuck, acc.hist, acc.lohi,
                            sums, lvl, tsum)
            if s_common is None:
                _time_extremes(s, g, tsum)
        p0, p1 = np.searchsorted(sel_idx, [start, stop])
        if p1 > p0:  # the sampled devices of this chunk: their reads, their repeats' spread
            EK.sample_rows(g, sel_idx[p0:p1] - start, sel_row[p0:p1], sel_lev[p0:p1], u,
                           inv_gmax, s, stuck, sample, sums)
        return sums, lvl, tsum

    starts = range(0, n, chunk_devices)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="fitting (empirical)", unit="chunk", disable=None)
    sums = np.zeros((k, t_n, EK.N_CELL_SUMS))
    lvl = np.zeros((k, EK.N_LEVEL_SUMS))
    tsum = np.zeros((t_n, 4))
    tsum[:, 2], tsum[:, 3] = np.inf, -np.inf

    def add(res):
        a, b, c = res
        sums.__iadd__(a)
        lvl.__iadd__(b)
        tsum[:, :2] += c[:, :2]
        tsum[:, 2] = np.minimum(tsum[:, 2], c[:, 2])
        tsum[:, 3] = np.maximum(tsum[:, 3], c[:, 3])
        if bar is not None:
            bar.update()

    workers = max(1, numba.get_num_threads() if n_workers is None else int(n_workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for start in starts:
            pending.append(pool.submit(work, start))
            if len(pending) >= 2 * workers:
                add(pending.popleft().result())
        while pending:
            add(pending.popleft().result())
    if bar is not None:
        bar.close()
    hist = accs[0].hist[..., :EK.N_BINS].astype(np.int64)
    lohi = accs[0].lohi
    for acc in accs[1:]:
        hist += acc.hist[..., :EK.N_BINS]
        lohi[..., 0] = np.minimum(lohi[..., 0], acc.lohi[..., 0])
        lohi[..., 1] = np.maximum(lohi[..., 1], acc.lohi[..., 1])
    return hist, lohi, sums, lvl, tsum, sample


def _check_targets(where: str, start: int, gt: np.ndarray, g_max: float) -> None:
    """Raise on a NaN, inf or negative target (naming it; ``start``: the chunk's first device)
    or one above g_max [S]."""
    hi = check_conductances(where, "g_target", gt, offset=start)
    if hi > g_max * (1 + 1e-6):
        raise FitError(f"{where}: g_target: targets up to {hi:.4g} S exceed g_max = "
                       f"{g_max:.4g} S; check the units of g_target and attrs['g_max']")


def _raise_bad_read(where: str, start: int, g: np.ndarray) -> None:
    """Raise naming the first device of the chunk (first device ``start``) with a negative or
    infinite read, if any."""
    bad = EK.first_bad_device(g)
    if bad >= 0:
        raise MeasurementFormatError(where, "g", f"negative or infinite conductance at device "
                                     f"{start + bad}", "conductances are >= 0 and finite (NaN "
                                     "marks a read that was not taken); check the units and the "
                                     "sign convention")


def _time_extremes(s: np.ndarray, g: np.ndarray, tsum: np.ndarray) -> None:
    """Per time the smallest and largest log-time of the devices read (per-device times)."""
    read_any = np.any(np.isfinite(g), axis=2) & np.isfinite(s)
    with np.errstate(invalid="ignore"):
        lo = np.where(read_any, s, np.inf).min(axis=0)
        hi = np.where(read_any, s, -np.inf).max(axis=0)
    tsum[:, 2] = np.minimum(tsum[:, 2], lo)
    tsum[:, 3] = np.maximum(tsum[:, 3], hi)


# ------------------------------------------------------------------------- the statistics
def _hazen_quantiles(counts: np.ndarray, lo_d: float, hi_d: float, probs: np.ndarray):
    """Hazen quantiles of binned deviations (the reads of a bin spread evenly across it)."""
    nz = np.flatnonzero(counts)
    c = counts[nz].astype(np.float64)
    lo = np.clip(_BIN_LO[nz], lo_d, hi_d)
    hi = np.clip(_BIN_HI[nz], lo_d, hi_d)
    lo[0], hi[-1] = lo_d, hi_d
    before = np.cumsum(c) - c
    n = c.sum()
    width = hi - lo
    p = np.stack([(before + 0.5) / n, (before + c - 0.5) / n], axis=1).ravel()
    v = np.stack([lo + 0.5 * width / c, hi - 0.5 * width / c], axis=1).ravel()
    return np.interp(probs, p, v), (hi, np.cumsum(c) / n)


def _binned_moments(hist, lohi, n_reads):
    """Mean and standard deviation of d per (level, time) from the histograms (bin centres,
    clamped to the extremes; bins are 0.8 % of |d| wide)."""
    centre = 0.5 * (_BIN_LO + _BIN_HI)
    c = np.clip(centre, lohi[..., :1], lohi[..., 1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (hist * c).sum(axis=2) / n_reads
        var = (hist * (c - mean[..., None]) ** 2).sum(axis=2) / n_reads
    return mean, np.sqrt(var)


def _model_cdf(v: np.ndarray, qn: np.ndarray, zn: np.ndarray) -> np.ndarray:
    """CDF at values v of the piecewise-linear quantile function qn(zn), held beyond the end
    nodes (the model's rule: the end probabilities are point masses at the end quantiles)."""
    z = np.interp(v, qn, zn)
    z = np.where(v < qn[0], -np.inf, np.where(v >= qn[-1], np.inf, z))
    return special.ndtr(z)


def _adjacent_max(rho: np.ndarray, t_n: int) -> np.ndarray:
    """(K, T): per time, the larger correlation of its two neighbouring pairs (K, T - 1)."""
    out = np.zeros((rho.shape[0], t_n))
    if t_n >= 2:
        out[:, :-1] = rho
        out[:, 1:] = np.maximum(out[:, 1:], rho)
    return np.clip(out, 0.0, 1.0)


def _score_correlation(za: np.ndarray, zb: np.ndarray) -> float:
    den = np.sqrt(np.dot(za, za) * np.dot(zb, zb))
    return float(np.dot(za, zb) / den) if den > 0 else 1.0


def _rank_correlations(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(van der Waerden correlation of consecutive columns (T - 1,), pairs used) of a (n, T)
    block of reads; NaN where fewer than MIN_DEVICES_PER_LEVEL pairs.

    Each pair of times m, m + 1 is ranked over the devices read at both, in one call: the
    columns themselves when no read is missing, else the pairs side by side, NaN elsewhere (NaN
    left out); the van der Waerden scores Phi^-1((rank - 1/2) / n), n the devices ranked, and
    their correlation.
    """
    t_n = block.shape[1]
    rho = np.full(t_n - 1, np.nan)
    ok = np.isfinite(block)
    both = ok[:, :-1] & ok[:, 1:]
    pairs = both.sum(axis=0)
    if t_n < 2 or not np.any(pairs >= MIN_DEVICES_PER_LEVEL):
        return rho, pairs
    if ok.all():
        z = special.ndtri((stats.rankdata(block, axis=0) - 0.5) / block.shape[0])
        za, zb = z[:, :-1], z[:, 1:]
    else:
        cols = np.stack([np.where(both, block[:, :-1], np.nan),
                         np.where(both, block[:, 1:], np.nan)], axis=2)  # (n, T - 1, 2)
        ranks = stats.rankdata(cols, axis=0, nan_policy="omit")
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.nan_to_num(special.ndtri((ranks - 0.5) / pairs[None, :, None]), nan=0.0)
        za, zb = z[..., 0], z[..., 1]
    for m in np.flatnonzero(pairs >= MIN_DEVICES_PER_LEVEL):
        rho[m] = _score_correlation(za[:, m], zb[:, m])
    return rho, pairs


def _prior_read_noise(prior, x_lv, t_nodes, g_max):
    """(read noise (K, M) relative, description) from the named prior."""
    if isinstance(prior, (str, os.PathLike)):
        label = (f"card {os.path.basename(os.fspath(prior))}" if is_card_path(prior)
                 else f"preset {prior}")
        prior = resolve_device_model(prior, what="prior")
    else:
        label = getattr(prior, "name", repr(prior))
    g = x_lv * g_max
    if isinstance(prior, EmpiricalModel):
        rn = np.stack([prior.read_noise_std(g, t) for t in t_nodes], axis=1)
    elif isinstance(prior, PCMModel):
        rn = np.stack([pcm_read_noise_std(g, t, prior) for t in t_nodes], axis=1)
    elif np.ndim(prior) == 0 and np.isfinite(prior) and float(prior) >= 0:
        label = f"{float(prior):.3g} S"
        rn = np.full((x_lv.size, t_nodes.size), float(prior))
    else:
        raise TypeError("prior: a PCMModel, an EmpiricalModel, a preset name, a device card's "
                        f"path or a read-noise std [S]; got {type(prior).__name__}")
    return np.asarray(rn, dtype=np.float64) / g_max, label


def fit_empirical(ds: xr.Dataset, *, times=None, exclude=None, prior=None, probs=None,
                  stuck_below: float | None = None, monotone: bool = True,
                  horizon: float = DEFAULT_HORIZON, activation_energy: float | None = None,
                  sample_devices: int = SAMPLE_DEVICES, chunk_devices: int | None = None,
                  progress: bool = False, n_workers: int | None = None,
                  name: str = "fitted") -> tuple[EmpiricalModel, EmpiricalFitReport]:
    """Fit an :class:`~aimc_device.pcm.EmpiricalModel` to a campaign in one streaming pass.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign (docs/measurement-format.md), lazy or in memory, SI units; NaN reads are
        skipped; ``valid(device)``, ``read_time(device, time)`` and ``temperature(time)`` are
        used when present. Not modified.
    times : array (T,) or (N, T), optional
        Times of the reads [s], equivalent times at the reference temperature when the campaign
        has bakes (:func:`aimc_device.fit.equivalent_time`). Default: ``read_time`` if present,
        else the ``time`` coordinate (an error when the campaign has bakes).
    exclude : array of int, bool array (N,) or callable, optional
        Devices to leave out: indices, a mask (True: leave out), or a rule ``rule(start,
        g_target[start:stop], g[start:stop]) -> bool (stop - start,)`` applied to each chunk.
    prior : PCMModel, EmpiricalModel, str or float, optional
        Where the read noise comes from when the data do not identify it (one read per time
        and fewer than three times): a model, a preset name, a device card's path, or a std [S].
    probs : array (J,), optional
        Probability grid; default :data:`aimc_device.pcm.empirical.DEFAULT_PROBS`.
    stuck_below : float, optional
        Devices whose reads all lie below this relative conductance g / g_max are stuck cells:
        left out of the distributions and counted into ``stuck_at_zero``.
    monotone : bool
        Order the quantiles across levels (isotonic regression); see the module docstring.
    horizon : float
        The model's extrapolation horizon [s].
    activation_energy : float, optional
        Activation energy of the equivalent times [eV], stored in the model; default the
        campaign's ``activation_energy`` attribute when present.
    sample_devices : int
        Devices per level sampled for the rank correlations.
    chunk_devices : int, optional
        Devices per streamed chunk; default about 4 MiB of reads.
    progress : bool
        Show a progress bar.
    n_workers : int, optional
        Chunks processed at once (threads); default Numba's thread count. The result does not
        depend on it.
    name : str

    Returns
    -------
    (EmpiricalModel, EmpiricalFitReport)

    Raises
    ------
    FitError
        Targets above g_max, targets not grouped in levels, a level with fewer than three
        usable devices, no usable device, constant reads, reads and targets of different scales,
        read noise not identified and no prior, bakes without equivalent times.
    MeasurementFormatError
        A missing variable or attribute, a negative or infinite read.
    """
    where = ds.attrs.get("source_file", "<Dataset>") if isinstance(ds, xr.Dataset) else ""
    _check_structure(ds, where)
    g_max = _attr_float(ds, where, "g_max")
    t0 = _attr_float(ds, where, "t0")
    t_read = _attr_float(ds, where, "t_read", False)
    t_ref = _attr_float(ds, where, "reference_temperature", False) or 300.0
    if activation_energy is None and "activation_energy" in ds.attrs:
        activation_energy = float(ds.attrs["activation_energy"])
    probs = DEFAULT_PROBS if probs is None else np.asarray(probs, dtype=np.float64)
    zn = special.ndtri(probs)
    n, t_n, r_n = ds.sizes["device"], ds.sizes["time"], ds.sizes["repeat"]
    t_source, t_common = _resolve_times(ds, times, t0, where)
    use, rule = _use_mask(ds, exclude, where)
    levels = target_levels(ds, chunk_devices)
    if levels.dtype not in (np.float32, np.float64):
        levels = levels.astype(np.float64)
    if levels.size > max(1, n // MIN_DEVICES_PER_LEVEL):
        raise FitError(f"{where}: g_target: {levels.size} distinct targets among {n} devices; "
                       "the empirical fit needs devices grouped in levels (equal targets), "
                       f"at least {MIN_DEVICES_PER_LEVEL} per level")
    k_samp = max(1, int(sample_devices))
    sampled = _sample(ds, where, levels, g_max, use, k_samp, n_workers)
    size, counts = sampled[3:]
    if counts.sum() == 0:
        raise FitError(f"{where}: every device is excluded (valid mask / exclude); nothing "
                       "to fit")
    x_lv = levels.astype(np.float64) / g_max
    hist, lohi, sums, lvl, tsum, sample = _stream(
        ds, where, levels, x_lv, g_max, t0, t_common, t_source, use, rule, stuck_below,
        sampled, k_samp, chunk_devices, progress, n_workers)
    notes = []
    # ---- levels and times
    n_dev, n_stuck = lvl[:, 0], lvl[:, 2]
    if n_dev.sum() == 0:
        raise FitError(f"{where}: no usable device (all excluded or stuck)")
    keep = n_dev > 0
    if not keep.all():
        notes.append(f"levels without usable devices dropped: x = "
                     f"{', '.join(f'{v:.4g}' for v in x_lv[~keep])}")
    few = keep & (n_dev < MIN_DEVICES_PER_LEVEL)
    if few.any():
        raise FitError(f"{where}: g_target: level(s) x = "
                       f"{', '.join(f'{v:.4g}' for v in x_lv[few])} have fewer than "
                       f"{MIN_DEVICES_PER_LEVEL} usable devices; leave them out with exclude= or "
                       "measure more devices")
    n_reads_t = hist.sum(axis=(0, 2))
    if np.any(n_reads_t == 0):
        m = int(np.argmax(n_reads_t == 0))
        raise FitError(f"{where}: g: no device was read at time index {m}; drop that time")
    if t_common is not None:
        t_nodes = t_common
        spread = np.zeros(t_n)
    else:
        s_node = tsum[:, 0] / tsum[:, 1]
        t_nodes = t0 * np.expm1(s_node)
        spread = np.maximum(tsum[:, 3] - s_node, s_node - tsum[:, 2])
        if np.any(np.diff(t_nodes) <= 0):
            raise FitError(f"{where}: times: the mean read times per time index do not increase")
        notes.append("per-device read times: each time index is modelled at the mean log-time "
                     f"of its reads (largest deviation {spread.max():.3g} in ln((t + t0)/t0))")
    kk = np.flatnonzero(keep)
    x_k = x_lv[kk]
    hist, lohi, sums = hist[kk], lohi[kk], sums[kk]
    n_reads = hist.sum(axis=2).astype(np.float64)
    mean, std = _binned_moments(hist, lohi, n_reads)
    # ---- plausibility (units)
    ok = n_reads >= 2
    if not np.any(std[ok] > 0):
        raise FitError(f"{where}: g: the reads are constant at every level and time; nothing "
                       "to fit (check the measurement)")
    level_mean = x_k[:, None] + mean
    ratio = np.nanmedian(np.where(ok & (x_k[:, None] > 0), level_mean / x_k[:, None], np.nan))
    if np.isfinite(ratio) and not 1e-3 < ratio < 1e3:
        raise FitError(f"{where}: g and g_target: the reads are {ratio:.3g} x their targets; "
                       "they are not of one scale (check the units attributes of /g and "
                       "/g_target)")
    rel_spread = np.nanmedian(np.where(ok & (level_mean > 0), std / level_mean, np.nan))
    if np.isfinite(rel_spread) and rel_spread < 1e-6:
        raise FitError(f"{where}: g: the spread of a level is {rel_spread:.2g} of its mean; "
                       "implausibly small (check the units of /g against g_max)")
    # ---- quantiles
    j_n = probs.size
    q_meas = np.full((kk.size, t_n, j_n), np.nan)
    ks_d = np.full((kk.size, t_n), np.nan)
    cdf_points = {}
    for a in range(kk.size):
        for m in range(t_n):
            if n_reads[a, m] >= MIN_DEVICES_PER_LEVEL:
                qd, pts = _hazen_quantiles(hist[a, m], lohi[a, m, 0], lohi[a, m, 1], probs)
                q_meas[a, m] = x_k[a] + qd
                cdf_points[a, m] = pts
    s_nodes = log_time(t_nodes, t0)
    for a in range(kk.size):
        good = np.isfinite(q_meas[a, :, 0])
        if not good.any():
            raise FitError(f"{where}: g: level x = {x_k[a]:.4g} has fewer than "
                           f"{MIN_DEVICES_PER_LEVEL} reads at every time")
        if not good.all():
            notes.append(f"level x = {x_k[a]:.4g}: times with < {MIN_DEVICES_PER_LEVEL} reads "
                         "interpolated in log time from the other times")
            for j in range(j_n):
                q_meas[a, ~good, j] = np.interp(s_nodes[~good], s_nodes[good], q_meas[a, good, j])
    q_meas = np.clip(q_meas, 0.0, None)
    q_fit = q_meas.copy()
    if monotone and kk.size > 1:
        w = np.maximum(n_reads, 1.0)
        for m in range(t_n):
            for j in range(j_n):
                q_fit[:, m, j] = optimize.isotonic_regression(q_meas[:, m, j],
                                                              weights=w[:, m]).x
        moved = np.abs(q_fit - q_meas)
        if moved.max() > 0:
            j_max = int(np.unravel_index(np.argmax(moved), moved.shape)[2])
            notes.append(f"quantiles ordered across levels (isotonic): largest change "
                         f"{moved.max():.3g} g_max (at p = {probs[j_max]:.3g}), median change "
                         f"{np.median(moved):.2g} g_max")
    q_fit = np.maximum.accumulate(q_fit, axis=2)
    # ---- read noise
    identified = True
    if r_n >= 2 and np.any(sums[..., 2] > 0):
        with np.errstate(invalid="ignore", divide="ignore"):
            rn = np.sqrt(sums[..., 1] / sums[..., 2])
        source = ("repeated reads: pooled std of each sampled device's repeats per level and "
                  "time")
    elif t_n >= 3 and np.any(lvl[kk, 4] > 0):
        with np.errstate(invalid="ignore", divide="ignore"):
            per_level = np.sqrt(lvl[kk, 3] / lvl[kk, 4])
        rn = np.repeat(per_level[:, None], t_n, axis=1)
        source = ("one read per time: pooled scatter of each device's reads around its own line "
                  "in ln((t + t0)/t0), per level (an upper bound: curvature counts as noise)")
    else:
        identified = False
        if prior is None:
            raise FitError(
                f"{where}: g: the read noise is not identified by these data ({r_n} read(s) per "
                f"time, {t_n} time(s); it needs repeated reads or >= 3 times); name a prior: "
                "prior= a PCMModel, an EmpiricalModel, a preset name, a card's path, or a "
                "read-noise std [S] (0.0 for none)")
        rn, label = _prior_read_noise(prior, x_k, t_nodes, g_max)
        source = f"prior {label}: not identified by these data"
    bad_rn = ~np.isfinite(rn)
    if bad_rn.any() and identified:
        if bad_rn.all():
            raise FitError(f"{where}: g: no device has enough reads to measure the read noise")
        for m in range(t_n):
            fine = ~bad_rn[:, m]
            if fine.any():
                rn[~fine, m] = np.interp(x_k[~fine], x_k[fine], rn[fine, m])
            else:
                rn[:, m] = np.nanmean(rn, axis=1)
        notes.append("read noise interpolated across levels where a level had no usable reads")
    # ---- rank persistence
    rho_meas = np.full((kk.size, max(t_n - 1, 0)), np.nan)
    pairs = np.zeros((kk.size, max(t_n - 1, 0)), np.int64)
    if t_n >= 2:
        for a, lev in enumerate(kk):
            rho_meas[a], pairs[a] = _rank_correlations(
                sample[lev * k_samp: lev * k_samp + size[lev]])
    width = central_width(q_fit, zn)
    b = np.where(width > 0, np.minimum(rn / np.where(width > 0, width, 1.0), 1.0), 0.0)
    # a read renews a fraction b of the rank: two reads correlate at most sqrt(1 - b_m^2)
    # sqrt(1 - b_m+1^2); where the data's reads correlate more, b is capped so that they can
    b_cap = np.sqrt(np.clip(1.0 - _adjacent_max(np.nan_to_num(rho_meas, nan=0.0), t_n), 0, 1))
    capped = b > b_cap
    if capped.any():
        b = np.minimum(b, b_cap)
        rn = np.where(capped, b * width, rn)
        source += ("; capped at the rank persistence in "
                   f"{int(capped.sum())} of {capped.size} (level, time) cells")
        notes.append("read noise capped where a device's consecutive reads correlate more "
                     "than that noise allows (sqrt(1 - b^2) per read)")
    a_dev = np.sqrt(1.0 - b * b)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = rho_meas / np.maximum(a_dev[:, :-1] * a_dev[:, 1:], 1e-12)
    if np.any(np.isnan(rho)):
        notes.append("rank correlation not measurable (< 3 sampled pairs): rank held (rho = 1)")
    rho = np.clip(np.nan_to_num(rho, nan=1.0), 0.0, 1.0)
    # ---- stuck cells, the model
    stuck_frac = 0.0
    if stuck_below is not None:
        stuck_frac = float(n_stuck.sum() / max(1.0, n_stuck.sum() + n_dev.sum()))
    src = os.path.basename(where) if where else "<Dataset>"
    try:
        model = EmpiricalModel(
            g_max=g_max, levels=x_k, times=t_nodes, probs=probs, quantiles=q_fit,
            read_noise=rn, rank_correlation=rho, t0=t0, t_read=t_read,
            reference_temperature=t_ref, activation_energy=activation_energy,
            horizon=max(horizon, float(t_nodes[-1])), stuck_at_zero=stuck_frac,
            read_noise_source=source, name=name,
            citation=f"fitted by aimc_device.fit.fit_empirical to {src}")
    except ValueError as exc:
        raise FitError(f"{where}: the fitted tables are not a valid model ({exc})") from None
    # ---- goodness of fit (in-sample)
    ks_p = np.full_like(ks_d, np.nan)
    for (a, m), (edges, f_data) in cdf_points.items():
        # the binned reads' CDF just below and at each occupied bin's upper edge
        lo_edges = np.concatenate([[lohi[a, m, 0]], edges[:-1]])
        f_model = _model_cdf(x_k[a] + np.concatenate([lo_edges, edges]), q_fit[a, m], zn)
        f_before = np.concatenate([[0.0], f_data[:-1]])
        ks_d[a, m] = np.abs(np.concatenate([f_before, f_data]) - f_model).max()
        rn_sqrt = np.sqrt(n_reads[a, m])  # Stephens (1970) form of the asymptotic law
        ks_p[a, m] = stats.kstwobign.sf((rn_sqrt + 0.12 + 0.11 / rn_sqrt) * ks_d[a, m])
    from .. import __version__

    provenance = {"source_file": where, "fit_function": "aimc_device.fit.fit_empirical",
                  "fit_options": f"monotone={monotone}, stuck_below={stuck_below}, "
                                 f"exclude={'rule' if rule else exclude is not None}, "
                                 f"times={'given' if times is not None else 'campaign'}",
                  "read_noise": source,
                  "package_version": __version__,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    report = EmpiricalFitReport(
        model=model, levels=x_k, times=t_nodes, probs=probs, quantiles=q_fit,
        quantiles_measured=q_meas, n_devices=n_dev[kk], n_excluded=lvl[kk, 1],
        n_stuck=n_stuck[kk], n_reads=n_reads, n_missing=sums[..., 0], mean=mean, std=std,
        read_noise=rn, read_noise_source=source, read_noise_identified=identified,
        rank_correlation_measured=rho_meas, rank_correlation=rho, rank_pairs=pairs,
        ks_statistic=ks_d, ks_pvalue=ks_p, time_spread=spread,
        n_params=int(q_fit.size + rn.size + rho.size), notes=notes, provenance=provenance)
    return model, report

