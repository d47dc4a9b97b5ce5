"""One streaming pass over a campaign: per-level sufficient statistics for all fits.

Per device (vectorised over a device chunk), from the reads at each of the T times: the mean
m_k of the reads taken (NaN marks a read not taken) and, with R >= 2 repeats, their unbiased
variance s2_k [S^2]. Then

- drift: an ordinary least-squares line of y_k = ln m_k (+ s2_k / (2 r_k m_k^2) with repeats:
  the bias of the log of a noisy mean) against L_k = ln((t_eq,k + t0) / t0) (Eq. 8) over the
  times the device was read, t_eq the equivalent time at the reference temperature
  (:func:`aimc_device.pcm.equivalent_time`); nu = -slope, ln g_P = intercept (the extrapolation
  to t = 0). With repeats, the read-noise part of each device's slope and intercept variance is
  known from them: Var(ln m_k) ~ s2_k / (r_k m_k^2) (delta method), propagated with the
  device's least-squares weights. Without repeats (R = 1) the sums of the weights per level and
  time are kept instead, so that the fits can propagate the read noise they estimate (see
  :mod:`.pcm_fit`);
- read noise: with repeats, per group (target level, or bin of the estimated g_P / g_max for the
  "programmed" convention) and time, the sums of s2 and of the unbiased estimates (m^2 - s2 / r)
  of g_D^2; their ratio is sigma_read^2 / g_D^2 = Q_s^2 ln((t_eff + T_read) / (2 T_read))
  (Eq. 11). Without repeats, per group the residual sum of squares of the devices' lines (devices
  read at >= 3 times) and, per time, the sums of (1 - h_k) and (1 - h_k) f2_k, h_k the hat value
  of the cell: E[RSS] = sum_k (1 - h_k) Var(ln g_k) for a line with independent errors.

Three paths compute the same sums (:mod:`._kernels`): a fast one for campaigns with R >= 2
reads at every cell and one set of read times (one least-squares weight vector for all devices,
SIMD over the chunk); for one read per time at shared read times, SIMD passes over blocks of
devices in float32 that count the devices per pattern of reads taken, whose least-squares
weights give the per-time sums (lines_kernel); and a general one, one device at a time, for
everything else (general_kernel). A chunk with a missing read leaves the fast path.

Only sums are kept (a few arrays of length levels x times) besides the chunks in flight:
``g_target`` and ``valid`` stream with the reads, so memory does not grow with the devices.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from ..io import (DeviceExclusion, ExclusionRecord, default_chunk_devices, device_chunk_reader,
                  resolve_device_model)
from ..io.measurements import (CONDUCTANCE_UNITS, DEFAULT_REFERENCE_TEMPERATURE, TIME_UNITS,
                               check_conductances, check_campaign, check_read_times,
                               root_quantity, field_name, target_levels)
from ..pcm import PCMModel, equivalent_time
from ..pcm.formulas import log_time
from ._kernels import (BLOCK, MAX_PATTERN_TIMES, N_LEVEL_SUMS, N_LT_SUMS, cells_kernel,
                       general_kernel, lines_kernel, moments_kernel, rn_columns, sums_kernel)

__all__ = ["CampaignStats", "FitError", "campaign_statistics", "PROGRAMMED_BINS",
           "campaign_temperatures", "log_time", "read_noise_log_time", "CampaignChunk",
           "iter_campaign_chunks"]

#: Bytes of ``g`` per streamed chunk [B]: small enough that a chunk and its work arrays stay in
#: the last-level cache while two threads work (measured: 4 MiB 25 % faster than 16 MiB).
FIT_CHUNK_BYTES = 2**22

#: Edges of the bins of x_P = g_P / g_max that group devices for the read-noise fit when Q_s is
#: referred to the programmed conductance (``read_noise_reference == "programmed"``),
#: dimensionless: 80 log-spaced bins from 1e-3 to 2.
PROGRAMMED_BINS = np.geomspace(1e-3, 2.0, 81)


class FitError(ValueError):
    """The data cannot support the requested fit (one level only, all devices excluded, ...)."""


def resolve_prior(prior) -> PCMModel:
    """The prior of a PCM fit from a PCMModel, a preset name, a device card's path or None
    (``PCMModel()``, the rasch2023 statistics), through
    :func:`aimc_device.io.resolve_device_model`; anything else raises a TypeError naming it,
    and an empirical model (which has none of the PCM model's forms) a FitError."""
    model = resolve_device_model(prior, default=PCMModel(), what="prior")
    if not isinstance(model, PCMModel):
        raise FitError(f"prior: {model.name!r} is an {model.family} device model; the PCM fit "
                       "takes its start values and conventions from a PCM model (a preset "
                       "name, a PCMModel or a PCM card)")
    return model


@dataclass
class CampaignStats:
    """Sums over devices per target level (and per level and time, per read-noise group).

    Attributes
    ----------
    x : ndarray (K,), relative target of each level, g_target / g_max, dimensionless
    g_max : float, [S]; t0 : float, [s]; t_read : float, [s]
    time : ndarray (T,), nominal read times [s]
    repeats : int, R
    reference : str, "target" or "programmed" (read-noise groups)
    source : str, the file the statistics came from (or "<Dataset>")
    activation_energy : float, E_a used for the equivalent times [eV]
    reference_temperature : float, T_ref of the equivalent times [K]
    temperature : ndarray (T,) or None, temperature of each interval [K]
    read_noise_time : str, "t" or "t_plus_t0": the time in the read-noise term f2
    n_total : ndarray (K,), devices per level
    n : ndarray (K,), devices used (kept, a line through >= 2 times, no read of 0 S)
    n_unusable : ndarray (K,), kept devices without a usable line
    n_excluded : ndarray (K,), devices dropped (``valid`` or ``exclude``)
    sum_nu, sum_nu2, sum_var_nu : ndarray (K,), sums of nu, nu^2, read-noise variance of nu
        (from repeats)
    sum_gp, sum_gp2, sum_gp2_var : ndarray (K,), sums of g_P [S], g_P^2 [S^2],
        g_P^2 Var(ln g_P) (from repeats)
    lt : ndarray (K, T, N_LT_SUMS), per level and time over the used devices (general path):
        cells read, sum f2, sum w, sum w^2, sum v, sum v^2 (the least-squares weights of slope
        and intercept), reads not taken (all kept devices); zero where the fast path ran
    rn_x : ndarray (G,), sum of x_ref per read-noise group
    rn_n : ndarray (G,), devices per read-noise group
    rn_s2, rn_g2, rn_dof : ndarray (G, T), sums of repeat variances [S^2], of unbiased g_D^2
        estimates [S^2] and of their degrees of freedom (r - 1)
    rn_nrss, rn_rss : ndarray (G,), devices read at >= 3 times and the sum of their residual
        sums of squares of ln g around their lines
    rn_h1, rn_hf : ndarray (G, T), sums of (1 - h_k) and (1 - h_k) f2_k over those devices
    exclusion : ExclusionRecord, devices dropped and why
    chunks_fast, chunks_general : int, chunks that took the fast path, and the others
    """

    x: np.ndarray
    g_max: float
    t0: float
    t_read: float
    time: np.ndarray
    repeats: int
    reference: str
    source: str
    activation_energy: float = 0.0
    reference_temperature: float = DEFAULT_REFERENCE_TEMPERATURE
    temperature: np.ndarray | None = None
    read_noise_time: str = "t"
    n_total: np.ndarray = field(default=None)
    n: np.ndarray = field(default=None)
    n_unusable: np.ndarray = field(default=None)
    n_excluded: np.ndarray = field(default=None)
    sum_nu: np.ndarray = field(default=None)
    sum_nu2: np.ndarray = field(default=None)
    sum_var_nu: np.ndarray = field(default=None)
    sum_gp: np.ndarray = field(default=None)
    sum_gp2: np.ndarray = field(default=None)
    sum_gp2_var: np.ndarray = field(default=None)
    lt: np.ndarray = field(default=None)
    rn_x: np.ndarray = field(default=None)
    rn_n: np.ndarray = field(default=None)
    rn_s2: np.ndarray = field(default=None)
    rn_g2: np.ndarray = field(default=None)
    rn_dof: np.ndarray = field(default=None)
    rn_nrss: np.ndarray = field(default=None)
    rn_rss: np.ndarray = field(default=None)
    rn_h1: np.ndarray = field(default=None)
    rn_hf: np.ndarray = field(default=None)
    exclusion: ExclusionRecord = field(default_factory=ExclusionRecord)
    chunks_fast: int = 0
    chunks_general: int = 0

    def __post_init__(self):
        k, t_n = self.x.size, self.time.size
        g = self.n_groups
        for name in ("n_total", "n", "n_unusable", "n_excluded", "sum_nu", "sum_nu2",
                     "sum_var_nu", "sum_gp", "sum_gp2", "sum_gp2_var"):
            setattr(self, name, np.zeros(k))
        self.lt = np.zeros((k, t_n, N_LT_SUMS))
        for name in ("rn_x", "rn_n", "rn_nrss", "rn_rss"):
            setattr(self, name, np.zeros(g))
        for name in ("rn_s2", "rn_g2", "rn_dof", "rn_h1", "rn_hf"):
            setattr(self, name, np.zeros((g, t_n)))

    @property
    def n_groups(self) -> int:
        """Read-noise groups: the levels, or the PROGRAMMED_BINS."""
        return self.x.size if self.reference == "target" else PROGRAMMED_BINS.size - 1

    @property
    def has_repeats(self) -> bool:
        """R >= 2: read noise from the spread of repeated reads."""
        return self.repeats >= 2

    @property
    def drift_log_time(self) -> np.ndarray:
        """L_k = ln((t_eq,k + t0) / t0) at the nominal times, dimensionless (Eq. 8)."""
        t_eq = equivalent_time(self.time, self.temperature, self.activation_energy,
                               self.reference_temperature)
        return log_time(t_eq, self.t0)

    @property
    def missing_reads(self) -> np.ndarray:
        """(T,) reads not taken at each time, over the kept devices (general-path chunks)."""
        return self.lt[:, :, 6].sum(axis=0)


def read_noise_log_time(t_eq, t0: float, t_read: float, read_noise_time: str) -> np.ndarray:
    """f2 = ln((t_eff + T_read) / (2 T_read)) (Eq. 11, squared time term), dimensionless, with
    t_eff = t_eq or t_eq + t0 (``read_noise_time``); t_eq, t0, t_read [s]."""
    t_eff = np.asarray(t_eq, dtype=np.float64) + (t0 if read_noise_time == "t_plus_t0" else 0.0)
    return np.log((t_eff + t_read) / (2.0 * t_read))


def campaign_temperatures(ds: xr.Dataset, reference_temperature: float | None = None):
    """(temperature (T,) [K] or None, T_ref [K]): the interval temperatures of a campaign and the
    reference temperature of its equivalent times (``reference_temperature`` or the campaign's).

    None when every interval is at T_ref (no acceleration to apply).
    """
    t_camp = float(ds.attrs.get("reference_temperature", DEFAULT_REFERENCE_TEMPERATURE))
    t_ref = t_camp if reference_temperature is None else float(reference_temperature)
    if not np.isfinite(t_ref) or t_ref <= 0:
        raise ValueError(f"reference_temperature = {reference_temperature!r}: a temperature "
                         "above 0 K")
    if "temperature" in ds:
        temp = np.asarray(ds["temperature"].values, dtype=np.float64)
    else:
        temp = np.full(ds.sizes["time"], t_camp)
    return (None if np.all(temp == t_ref) else temp), t_ref


def _drift_weights(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS weights: slope = y @ w, intercept (at L = 0) = y @ v."""
    Lc = L - L.mean()
    w = Lc / np.dot(Lc, Lc)
    v = 1.0 / L.size - L.mean() * w
    return w, v


class _Workspace:
    """One thread's reused buffers for chunks of up to ``k`` devices (no fresh memory per chunk:
    a freshly allocated multi-MB array costs more in page faults than the work done on it)."""

    def __init__(self, k: int, t_n: int, r_n: int, dtype, per_device_times: bool):
        self.k = k
        self.g = np.empty((k, t_n, r_n), dtype)
        self.t = np.empty((k, t_n), np.float64) if per_device_times else None
        self.m, self.s2, self.rel, self.y = (np.empty((k, t_n), np.float32) for _ in range(4))
        self.line = np.empty(2 * k, np.float32)
        self.lin4 = np.empty(4 * k, np.float32)
        self.gp = np.empty(k)
        self.keep = np.zeros(k, np.uint8)
        self.gt = None  # g_target of a chunk (its dtype), allocated on first use
        self.valid = np.empty(k, bool)


def _fast_sums(st: CampaignStats, g_target: np.ndarray, levels: np.ndarray, g: np.ndarray,
               w4: np.ndarray, keep: np.ndarray, ws: _Workspace):
    """Per-level and per-group sums of a chunk with R >= 2 reads everywhere and shared times, or
    None when the chunk holds a read not taken (NaN). Raises on inf or a negative read.

    ``w4`` (4, T) float32 holds the OLS weights w, v of the slope and the intercept and their
    squares. Every step is a GIL-free kernel or a vectorised numpy call into the reused buffers
    of ``ws``.
    """
    n = g.shape[0]
    m, s2, rel, y, gp = ws.m[:n], ws.s2[:n], ws.rel[:n], ws.y[:n], ws.gp[:n]
    line = ws.line[:2 * n].reshape(2, n)
    lin4 = ws.lin4[:4 * n].reshape(4, n)
    var = lin4[2:]  # read-noise variances of slope and intercept
    flat = (a.reshape(-1) for a in (g, m, s2, rel, y))
    if moments_kernel(st.repeats)(next(flat), np.float32(1.0 / st.g_max), *flat):
        return None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Drift line per device (Eq. 8) through y_k = ln(m_k / g_max) + Var(ln m_k) / 2, the
        # bias-corrected log of the repeat mean: slope and intercept (ln(g_P / g_max) at t = 0)
        # = (w, v) . y, their read-noise variances (w^2, v^2) . Var(ln m).
        np.log(y, out=y)
        np.matmul(w4[:2], y.T, out=line)
        np.matmul(w4, rel.T, out=lin4)
        line += np.float32(0.5) * lin4[:2]
        # g_P at t = 0, bias-corrected; NaN, 0 or inf mark a device with a zero mean read
        np.exp(line[1] - np.float32(0.5) * var[1], out=gp)
        gp *= st.g_max
    n_blocks = -(-n // BLOCK)
    out_level = np.zeros((n_blocks, st.x.size, N_LEVEL_SUMS))
    out_rn = np.zeros((n_blocks, st.n_groups, rn_columns(st.time.size)))
    sums_kernel(m, s2, st.repeats, np.ascontiguousarray(g_target), levels, line, var, gp, keep,
                st.reference != "target", st.g_max, PROGRAMMED_BINS, out_level, out_rn)
    return out_level.sum(axis=0), None, out_rn.sum(axis=0)


def _general_sums(st: CampaignStats, g_target: np.ndarray, levels: np.ndarray, g: np.ndarray,
                  L: np.ndarray, f2: np.ndarray, keep: np.ndarray, check, lines: bool = True):
    """Per-level, per-level-and-time and per-group sums of any chunk: lines_kernel for one read
    per time at shared read times (``lines``), else cells_kernel with repeats, a numpy log and
    general_kernel. ``check()`` raises on a negative or infinite read: called first on the
    general path, and when lines_kernel finds such a read."""
    n, t_n, r_n = g.shape
    g = np.ascontiguousarray(g)
    if lines and r_n == 1 and L.shape[0] == 1 and t_n <= MAX_PATTERN_TIMES:
        n_blocks = -(-n // BLOCK)
        out_level = np.zeros((n_blocks, st.x.size, N_LEVEL_SUMS))
        out_lt = np.zeros((st.x.size, t_n, N_LT_SUMS))
        out_rn = np.zeros((n_blocks, st.n_groups, rn_columns(t_n)))
        L0 = np.ascontiguousarray(L[0])
        status = lines_kernel(t_n)(g.reshape(-1), L0, tuple(L0.astype(np.float32)),
                                   np.ascontiguousarray(f2[0]), keep,
                                   np.ascontiguousarray(g_target), levels,
                                   st.reference != "target", st.g_max, PROGRAMMED_BINS,
                                   out_level, out_lt, out_rn)
        if status > 0:
            check()
        if status == 0:
            return out_level.sum(axis=0), out_lt, out_rn.sum(axis=0)
    check()
    inv_gmax = 1.0 / st.g_max
    none32 = np.zeros((0, 0), np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if r_n >= 2:
            m, s2, rel = (np.empty((n, t_n), np.float32) for _ in range(3))
            cnt = np.empty((n, t_n), np.uint8)
            cells_kernel(g, inv_gmax, m, s2, cnt, rel)
            y = np.log(m * np.float32(inv_gmax))
            y += np.float32(0.5) * rel
        else:
            m = s2 = rel = none32
            cnt = np.zeros((0, 0), np.uint8)
            y = np.log(g[:, :, 0] * g.dtype.type(inv_gmax)).astype(np.float32, copy=False)
    n_blocks = -(-n // BLOCK)
    k = st.x.size
    out_level = np.zeros((n_blocks, k, N_LEVEL_SUMS))
    out_lt = np.zeros((n_blocks, k, t_n, N_LT_SUMS))
    out_rn = np.zeros((n_blocks, st.n_groups, rn_columns(t_n)))
    general_kernel(np.ascontiguousarray(y), rel, m, s2, cnt, r_n, L, f2, keep,
                   np.ascontiguousarray(g_target, dtype=np.float64), levels, st.has_repeats,
                   st.reference != "target", st.g_max, PROGRAMMED_BINS, out_level, out_lt,
                   out_rn)
    return out_level.sum(axis=0), out_lt.sum(axis=0), out_rn.sum(axis=0)


def _add_sums(st: CampaignStats, lv: np.ndarray, lt: np.ndarray | None, rn: np.ndarray) -> None:
    st.n_total += lv[:, 0]
    st.n += lv[:, 1]
    st.sum_nu += lv[:, 2]
    st.sum_nu2 += lv[:, 3]
    st.sum_var_nu += lv[:, 4]
    st.sum_gp += lv[:, 5]
    st.sum_gp2 += lv[:, 6]
    st.sum_gp2_var += lv[:, 7]
    st.n_unusable += lv[:, 8]
    st.n_excluded += lv[:, 9]
    if lt is not None:
        st.lt += lt
    st.rn_n += rn[:, 0]
    st.rn_x += rn[:, 1] if st.reference != "target" else rn[:, 0] * st.x
    st.rn_nrss += rn[:, 2]
    st.rn_rss += rn[:, 3]
    t_n = st.time.size
    for j, name in enumerate(("rn_s2", "rn_g2", "rn_dof", "rn_h1", "rn_hf")):
        getattr(st, name)[...] += rn[:, 4 + j * t_n:4 + (j + 1) * t_n]


class _ChunkSource:
    """What every streaming consumer reads of a campaign, chunk by chunk: the reads, the reason
    code of each device (``valid``, ``exclude``) and the equivalent times at T_ref, with the
    values checked (inf, negative reads, read times not increasing)."""

    def __init__(self, ds: xr.Dataset, exclude, activation_energy: float | None,
                 reference_temperature: float | None):
        self.where = where = ds.attrs.get("source_file", "<Dataset>")
        self.g_max = root_quantity(where, ds.attrs, "g_max", CONDUCTANCE_UNITS, True)
        self.temperature, self.t_ref = campaign_temperatures(ds, reference_temperature)
        if self.temperature is not None and activation_energy is None:
            raise FitError(f"{where}: temperature: the campaign has intervals at other "
                           f"temperatures than T_ref = {self.t_ref:.2f} K and no activation "
                           "energy was given; pass activation_energy= (eV) or fit it from bakes "
                           "at two or more temperatures")
        self.e_a = float(activation_energy or 0.0)
        self.exclusion = DeviceExclusion.parse(exclude)
        self.n = ds.sizes["device"]
        self.exclusion.check_indices(self.n, where)
        self.read_valid = device_chunk_reader(ds, "valid") if "valid" in ds else None
        self.read_target = device_chunk_reader(ds, "g_target")
        self.select = self.read_valid is not None or not self.exclusion.is_empty()
        self.time = np.asarray(ds["time"].values, dtype=np.float64)
        self.t_eq_shared = equivalent_time(self.time, self.temperature, self.e_a, self.t_ref)
        self.per_device = "read_time" in ds
        self.read_g = device_chunk_reader(ds)
        self.read_t = device_chunk_reader(ds, "read_time") if self.per_device else None
        self.gfield, self.tfield = field_name(ds, "g"), field_name(ds, "read_time")

    def reads(self, start: int, stop: int, out: np.ndarray | None = None,
              keep_buffer: np.ndarray | None = None, valid_buffer: np.ndarray | None = None):
        """(g [S] (n, T, R), reason codes (n,) uint8) of devices start:stop (values unchecked);
        ``out``, ``keep_buffer`` and ``valid_buffer`` are reused memory."""
        g = self.read_g(start, stop, out)
        if self.select:
            valid = (None if self.read_valid is None
                     else np.asarray(self.read_valid(start, stop, valid_buffer)))
            codes = self.exclusion.codes(start, g, self.g_max, valid)
        elif keep_buffer is not None:
            codes = keep_buffer[:stop - start]
        else:
            codes = np.zeros(stop - start, np.uint8)
        return g, codes

    def targets(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """g_target [S] of devices start:stop (float32 or float64), into ``out`` if given."""
        gt = np.asarray(self.read_target(start, stop, out))
        return gt if gt.dtype in (np.float32, np.float64) else gt.astype(np.float64)

    def check(self, start: int, g: np.ndarray) -> None:
        """Raise on inf or a negative read (NaN is a read not taken)."""
        check_conductances(self.where, self.gfield, g, offset=start, allow_nan=True)

    def equivalent_times(self, start: int, stop: int, out: np.ndarray | None = None):
        """Equivalent times at T_ref [s]: (n, T) with per-device read times, else (1, T)."""
        if not self.per_device:
            return self.t_eq_shared[None, :]
        t = np.asarray(self.read_t(start, stop, out), dtype=np.float64)
        check_read_times(self.where, self.tfield, t, start)
        return equivalent_time(t, self.temperature, self.e_a, self.t_ref)


@dataclass
class CampaignChunk:
    """One device chunk of a campaign, as :func:`iter_campaign_chunks` yields it.

    Attributes
    ----------
    start, stop : int, the devices start:stop
    g_target : ndarray (n,), target conductance [S]
    g : ndarray (n, T, R), reads [S], NaN where not taken (checked: no inf, none negative)
    t_eq : ndarray (n, T) or (1, T), equivalent times at the reference temperature [s]
    keep : ndarray (n,) bool, False for a device dropped (``valid`` or ``exclude``)
    codes : ndarray (n,) uint8, the reason of each drop (aimc_device.io.EXCLUSION_REASONS)
    """

    start: int
    stop: int
    g_target: np.ndarray
    g: np.ndarray
    t_eq: np.ndarray
    keep: np.ndarray
    codes: np.ndarray


def iter_campaign_chunks(ds: xr.Dataset, *, exclude=None,
                         activation_energy: float | None = None,
                         reference_temperature: float | None = None,
                         chunk_devices: int | None = None,
                         record: ExclusionRecord | None = None):
    """Stream a campaign for a fit: reads, equivalent times and kept devices, chunk by chunk.

    Parameters
    ----------
    ds : xarray.Dataset, a campaign (lazy or in memory); conductances [S], times [s]
    exclude : str, sequence or aimc_device.io.DeviceExclusion, optional; devices to drop besides
        those marked False in ``valid``
    activation_energy : float, optional, E_a [eV] (see :func:`aimc_device.fit.
        resolve_activation_energy`); needed when the campaign has intervals away from T_ref
    reference_temperature : float, optional, T_ref [K]; default the campaign's
    chunk_devices : int, optional, devices per chunk; default about 4 MiB of ``g``
    record : aimc_device.io.ExclusionRecord, optional; the drops are added to it, in order

    Yields
    ------
    CampaignChunk

    Raises
    ------
    FitError
        Intervals away from T_ref and no activation energy.
    MeasurementFormatError
        inf or negative reads, per-device read times not increasing (naming file and index).
    """
    check_campaign(ds, ds.attrs.get("source_file", "<Dataset>"))
    src = _ChunkSource(ds, exclude, activation_energy, reference_temperature)
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(ds.sizes["time"], ds.sizes["repeat"],
                                              ds["g"].dtype.itemsize, FIT_CHUNK_BYTES)
    for start in range(0, src.n, max(1, int(chunk_devices))):
        stop = min(src.n, start + max(1, int(chunk_devices)))
        g, codes = src.reads(start, stop)
        src.check(start, g)
        if record is not None:
            record.add(start, codes)
        yield CampaignChunk(start, stop, src.targets(start, stop), g,
                            src.equivalent_times(start, stop), codes == 0, codes)


def campaign_statistics(ds: xr.Dataset, prior: PCMModel | None = None,
                        chunk_devices: int | None = None, progress: bool = False,
                        n_workers: int | None = None, *, exclude=None,
                        activation_energy: float | None = None,
                        reference_temperature: float | None = None,
                        general: bool = False) -> CampaignStats:
    """Stream a campaign once, chunk by chunk, and return its per-level sums.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign (docs/measurement-format.md), lazy or in memory; not modified.
    prior : PCMModel, optional
        Supplies the conventions (``read_noise_reference``, ``read_noise_time``) and ``t_read``
        [s] when the campaign has none. Default ``PCMModel()`` (the rasch2023 statistics,
        conventions "t"/"target").
    chunk_devices : int, optional
        Devices per chunk; default about ``FIT_CHUNK_BYTES`` (4 MiB) of ``g``.
    progress : bool
        Show a tqdm progress bar over chunks (when stderr is a terminal).
    n_workers : int, optional
        Chunks processed at once in threads; default Numba's thread count. The result does not
        depend on it.
    exclude : str, sequence or DeviceExclusion, optional
        Devices to drop (:class:`aimc_device.io.DeviceExclusion`), besides those marked False in
        ``valid``; recorded in ``exclusion``.
    activation_energy : float, optional
        E_a [eV] for the equivalent times; needed when the campaign has intervals at another
        temperature than the reference.
    reference_temperature : float, optional
        T_ref [K] of the equivalent times; default the campaign's ``reference_temperature``.
    general : bool
        Run every chunk through general_kernel (for tests of the faster paths).

    Returns
    -------
    CampaignStats

    Raises
    ------
    FitError
        Fewer than two read times, a campaign with bakes and no activation energy, no usable
        device.
    MeasurementFormatError
        When the Dataset breaks the schema or a chunk holds inf or negative values.
    """
    prior = resolve_prior(prior)
    where = ds.attrs.get("source_file", "<Dataset>")
    _check_dataset_quick(ds, where)
    g_max = root_quantity(where, ds.attrs, "g_max", CONDUCTANCE_UNITS, True)
    t0 = root_quantity(where, ds.attrs, "t0", TIME_UNITS, True)
    t_read = root_quantity(where, ds.attrs, "t_read", TIME_UNITS, False) or prior.t_read
    time = np.asarray(ds["time"].values, dtype=np.float64)
    repeats = int(ds.sizes["repeat"])
    if time.size < 2:
        raise FitError(f"{where}: time: only {time.size} read time; the drift fit needs at least "
                       "two (better five or more, spread over decades)")
    src = _ChunkSource(ds, exclude, activation_energy, reference_temperature)
    temperature, t_ref, e_a, n = src.temperature, src.t_ref, src.e_a, src.n
    levels = target_levels(ds, chunk_devices)
    if levels.dtype not in (np.float32, np.float64):
        levels = levels.astype(np.float64)
    levels64 = levels.astype(np.float64)
    st = CampaignStats(x=levels64 / g_max, g_max=g_max, t0=t0, t_read=t_read,
                       time=time, repeats=repeats, reference=prior.read_noise_reference,
                       source=where, activation_energy=e_a, reference_temperature=t_ref,
                       temperature=temperature, read_noise_time=prior.read_noise_time)
    per_device = src.per_device
    fast = repeats >= 2 and not per_device and temperature is None and not general
    wv = np.asarray(_drift_weights(log_time(src.t_eq_shared, t0)))
    w4 = np.concatenate([wv, wv * wv]).astype(np.float32)
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(time.size, repeats, ds["g"].dtype.itemsize,
                                              FIT_CHUNK_BYTES)
    chunk_devices = max(1, int(chunk_devices))
    starts = range(0, n, chunk_devices)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="fitting", unit="chunk", disable=None)

    local = threading.local()
    shape = (ds.sizes["time"], repeats)

    def work(start: int):
        stop = min(n, start + chunk_devices)
        if not hasattr(local, "ws"):
            local.ws = _Workspace(min(n, chunk_devices), *shape, ds["g"].dtype, per_device)
        ws = local.ws
        g, keep = src.reads(start, stop, ws.g, ws.keep, ws.valid)
        if ws.gt is None:
            ws.gt = np.empty(ws.k, ds["g_target"].dtype)
        g_target = src.targets(start, stop, ws.gt)
        out = _fast_sums(st, g_target, levels, g, w4, keep, ws) if fast else None
        if out is not None:
            return out, keep, True
        t_eq = src.equivalent_times(start, stop, ws.t)
        L = log_time(t_eq, t0)
        f2 = read_noise_log_time(t_eq, t0, t_read, st.read_noise_time)
        return (_general_sums(st, g_target, levels64, g, L, f2, keep,
                              lambda: src.check(start, g), not general), keep, False)

    def collect(result, start):
        sums, keep, was_fast = result
        _add_sums(st, *sums)
        st.exclusion.add(start, keep)
        if was_fast:
            st.chunks_fast += 1
        else:
            st.chunks_general += 1
        if bar is not None:
            bar.update()

    # Chunks run in threads (the kernels release the GIL); at most 2 x workers are in flight,
    # which bounds memory, and their sums are added in chunk order (thread-count independent).
    workers = max(1, numba.get_num_threads() if n_workers is None else int(n_workers))
    # One BLAS thread per chunk: the chunks already fill the cores, and BLAS threads spinning
    # against each other would double the CPU time.
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for start in starts:
            pending.append((pool.submit(work, start), start))
            if len(pending) >= 2 * workers:
                fut, s0 = pending.popleft()
                collect(fut.result(), s0)
        while pending:
            fut, s0 = pending.popleft()
            collect(fut.result(), s0)
    if bar is not None:
        bar.close()
    if st.n_excluded.sum() == st.n_total.sum():
        raise FitError(f"{where}: g: all {n} devices are excluded ({st.exclusion.summary()}); "
                       "nothing to fit — loosen --exclude / exclude= or check /valid")
    if st.n.sum() == 0:
        raise FitError(f"{where}: g: no device has a usable drift line (every device reads 0 S "
                       "at some time, all-zero conductance, or is read at fewer than two times);"
                       " nothing to fit — check the units and the measurement")
    return st


def _check_dataset_quick(ds: xr.Dataset, where: str) -> None:
    """Structure, units, attrs, g_target and time (g itself is checked chunk by chunk)."""
    from ..io import MeasurementFormatError

    check_campaign(ds, where)
    if ds["g"].attrs.get("units") != "S" or ds["g_target"].attrs.get("units") != "S" or \
            ds["time"].attrs.get("units") != "s":
        raise MeasurementFormatError(where, "units", "the fits expect SI units (S, s)",
                                     "read the file with aimc_device.io.read_measurements, which "
                                     "converts to SI")
