"""The empirical device-model family: measured conductance distributions per level and time.

Where the PCM model of the paper (:class:`~aimc_device.pcm.PCMModel`) describes a device by a few
functional forms, :class:`EmpiricalModel` keeps what a campaign measured: for each programmed level
x_k = g_target / g_max and each measured time t_m, the distribution of one read of the
conductance, as quantiles Q[k, m, j] of g/g_max at a fixed probability grid p_j. Skewed or
heavy-tailed spreads, relaxation in either direction and spreads that broaden with time are kept
as measured. Any device technology whose campaign follows the measurement schema fits it (RRAM,
PCM, FeFET, ...).

The rules:

- **Interpolation between levels**: each quantile is interpolated in x by PCHIP (monotone, no
  overshoot) onto a grid of ``GRID_STEPS`` points per interval between levels; between grid points
  linearly. After that, the quantiles are made non-decreasing in probability and then in x
  (running maxima; a no-op when the measured table is already ordered, as the fit makes it), so
  that every quantile is monotone in x and every distribution monotone in p.
- **Targets outside the levels**: below the lowest level x_1 (> 0) the distribution of x_1 is
  scaled by x / x_1 (its relative deviations kept; a target of 0 S reads 0 S); above the highest
  level x_K that of x_K is scaled by x / x_K. The read noise scales alike.
- **Time**: interpolation is linear in s = ln((t + t0) / t0) (the time variable of the drift law,
  finite at t = 0, ~ln t for t >> t0). Before the first measured time the first time's
  distribution is used. Beyond the last measured time t_M each quantile continues linearly in s
  with the slope of the last two measured times up to ``horizon`` (default 10 years), where the
  continued quantiles are clipped to [0, the largest measured quantile] and made non-decreasing;
  beyond the horizon they are held. With one measured time the distribution is held for all t.
- **Probabilities**: quantiles are linear in the normal score z = Phi^-1(p) between the grid's
  probabilities (exact for a Gaussian); beyond the outermost ones they are held (the model
  never reads beyond its extreme quantiles, 0.1 % and 99.9 % by default: a continued tail would
  not stay monotone in x), and g is clipped at 0.
- **Persistence of a device's rank** (Gaussian copula): a device keeps a latent normal score z.
  At programming z at the first measured time is drawn; between consecutive measured times it
  follows z_{m+1} = rho_m z_m + sqrt(1 - rho_m^2) eta_m (a Markov chain; rho_m is the rank
  correlation of the devices themselves, measured by the fit); between measured times the
  normalised blend of the neighbouring nodes; beyond the last measured time it is held.
  rho = 1 is the comonotonic limit (a device keeps its rank for ever).
- **Read noise**: each read renews a fraction b of the rank, z_read = sqrt(1 - b^2) z + b xi
  with b = min(sigma_read / sigma_c, 1), sigma_c = (Q(z = 1) - Q(z = -1)) / 2 the central
  (Gaussian-equivalent) width of the level's distribution. A read's marginal is then exactly the
  tabulated distribution (which is that of one measured read), two reads of a device differ by
  about sigma_read near the median, and the device's own spread is the rest.
- **Faults**: stuck-at fractions as in the PCM model (0 by default).

References
----------
.. [1] F. N. Fritsch, R. E. Carlson, "Monotone piecewise cubic interpolation", SIAM J. Numer.
   Anal. 17, 238 (1980) (PCHIP).
.. [2] R. B. Nelsen, "An Introduction to Copulas", 2nd ed., Springer (2006), Gaussian copula.
.. [3] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023): the device-model interface (program,
   read, training noise) this family shares with the PCM model.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import interpolate, special

from .._random import derive_key
from . import _empirical_kernels as EK
from .formulas import log_time
from .params import check_stuck_fractions, scale_note

__all__ = ["EmpiricalModel", "EmpiricalState", "DEFAULT_PROBS", "DEFAULT_HORIZON",
           "GRID_STEPS", "quantile_at_z", "central_width"]

#: Default probability grid: 49 probabilities equally spaced in normal score between 0.1 % and
#: 99.9 % (spacing 0.13 in z; in the tails the probabilities are 0.06 % apart, in the body 5 %).
DEFAULT_PROBS = special.ndtr(np.linspace(special.ndtri(0.001), special.ndtri(0.999), 49))
#: Default extrapolation horizon [s]: 10 years of 365.25 days.
DEFAULT_HORIZON = 10 * 365.25 * 86400.0
#: Interpolation grid points per interval between two measured levels.
GRID_STEPS = 16
#: Equiprobable normal scores of the tabulated standard deviation (training noise).
_STD_POINTS = special.ndtri((np.arange(512) + 0.5) / 512)


def _tuple_or_array(a) -> np.ndarray:
    arr = np.array(a, dtype=np.float64, copy=True)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class EmpiricalModel:
    """Measured conductance distributions per level and time, with read noise and rank persistence.

    Conductances in siemens [S], times in seconds [s], temperatures in kelvin [K]; tabulated
    conductances relative to g_max (dimensionless). See the module docstring for the
    interpolation, extrapolation, copula and read-noise rules.

    Attributes
    ----------
    g_max : float
        Conductance the relative values refer to [S].
    levels : ndarray (K,)
        Measured relative targets x_k = g_target / g_max, strictly increasing, >= 0, at least one
        > 0, dimensionless.
    times : ndarray (M,)
        Measured times since the end of programming, strictly increasing, >= 0 [s] (equivalent
        times at ``reference_temperature`` when the campaign had bakes).
    probs : ndarray (J,)
        Probability grid, strictly increasing in (0, 1), dimensionless.
    quantiles : ndarray (K, M, J)
        Quantiles of one read, g/g_max, >= 0, non-decreasing along the probability axis.
    read_noise : ndarray (K, M)
        Standard deviation of one read around the device's conductance, relative to g_max.
    rank_correlation : ndarray (K, M - 1)
        Correlation rho_m of a device's latent normal score between measured times m and m + 1
        (Gaussian copula), in [0, 1].
    t0 : float
        Duration of programming; the time variable is ln((t + t0) / t0) [s].
    t_read : float or None
        Duration of one read [s] (informational).
    reference_temperature : float
        Temperature the times refer to [K].
    activation_energy : float or None
        Arrhenius activation energy of the campaign's equivalent times [eV]; None if unknown.
    horizon : float
        Time up to which quantiles are extrapolated beyond the last measured time [s].
    stuck_at_zero, stuck_at_gmax, stuck_at_random : float
        Fractions of devices stuck at 0 S, at g_max, or at a uniform conductance in [0, g_max].
    read_noise_source : str
        Where the read noise comes from ("repeated reads", "scatter around each device's trend",
        "prior ...: not identified by these data", or "given").
    name, citation : str
        A label and where the numbers come from.
    """

    g_max: float
    levels: np.ndarray
    times: np.ndarray
    probs: np.ndarray
    quantiles: np.ndarray
    read_noise: np.ndarray
    rank_correlation: np.ndarray
    t0: float = 1.0
    t_read: float | None = None
    reference_temperature: float = 300.0
    activation_energy: float | None = None
    horizon: float = DEFAULT_HORIZON
    stuck_at_zero: float = 0.0
    stuck_at_gmax: float = 0.0
    stuck_at_random: float = 0.0
    read_noise_source: str = "given"
    name: str = "empirical"
    citation: str = ""

    #: Units of each numeric field, written next to it in device cards ("eV": electronvolt).
    UNITS: ClassVar[dict[str, str]] = {
        "g_max": "S", "levels": "1", "times": "s", "probs": "1", "quantiles": "1",
        "read_noise": "1", "rank_correlation": "1", "t0": "s", "t_read": "s",
        "reference_temperature": "K", "activation_energy": "eV", "horizon": "s",
        "stuck_at_zero": "1", "stuck_at_gmax": "1", "stuck_at_random": "1",
    }
    #: Numeric fields that may be None.
    OPTIONAL: ClassVar[tuple[str, ...]] = ("t_read", "activation_energy")
    ARRAYS: ClassVar[tuple[str, ...]] = ("levels", "times", "probs", "quantiles", "read_noise",
                                         "rank_correlation")

    def __post_init__(self) -> None:
        for name in self.ARRAYS:
            object.__setattr__(self, name, _tuple_or_array(getattr(self, name)))
        for name in self.UNITS:
            if name in self.ARRAYS:
                continue
            v = getattr(self, name)
            if v is None and name in self.OPTIONAL:
                continue
            object.__setattr__(self, name, float(v))
        self._validate()
        object.__setattr__(self, "_cache", {})

    # ---------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        def bad(field_name: str, what: str) -> ValueError:
            v = getattr(self, field_name)
            shown = f"array of shape {v.shape}" if isinstance(v, np.ndarray) else repr(v)
            return ValueError(f"EmpiricalModel.{field_name} = {shown}: {what}")

        for name in self.UNITS:
            v = getattr(self, name)
            if v is None:
                continue
            if not np.all(np.isfinite(v)):
                raise bad(name, "must be finite (no NaN or inf)")
        for name in ("g_max", "t0", "reference_temperature"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.t_read is not None and self.t_read <= 0:
            raise bad("t_read", "must be positive (or None)")
        if self.activation_energy is not None and self.activation_energy < 0:
            raise bad("activation_energy", "must be >= 0 [eV] (or None when unknown)")
        lv, tm, pr = self.levels, self.times, self.probs
        for name, arr in (("levels", lv), ("times", tm), ("probs", pr)):
            if arr.ndim != 1 or arr.size == 0:
                raise bad(name, "must be a non-empty 1-d array")
            if np.any(np.diff(arr) <= 0):
                raise bad(name, "must be strictly increasing")
        if lv[0] < 0 or lv[-1] <= 0:
            raise bad("levels", "relative targets must be >= 0 with at least one > 0")
        if tm[0] < 0:
            raise bad("times", "times since programming must be >= 0 [s]")
        if pr[0] <= 0 or pr[-1] >= 1 or pr.size < 2:
            raise bad("probs", "needs at least two probabilities strictly inside (0, 1)")
        k, m, j = lv.size, tm.size, pr.size
        if self.quantiles.shape != (k, m, j):
            raise bad("quantiles", f"expected shape (levels, times, probs) = {(k, m, j)}")
        if np.any(self.quantiles < 0):
            raise bad("quantiles", "relative conductances must be >= 0")
        if np.any(np.diff(self.quantiles, axis=2) < 0):
            raise bad("quantiles", "must be non-decreasing along the probability axis")
        if self.read_noise.shape != (k, m) or np.any(self.read_noise < 0):
            raise bad("read_noise", f"expected shape {(k, m)}, values >= 0")
        if self.rank_correlation.shape != (k, m - 1):
            raise bad("rank_correlation", f"expected shape {(k, m - 1)}")
        if np.any((self.rank_correlation < 0) | (self.rank_correlation > 1)):
            raise bad("rank_correlation", "must lie in [0, 1]")
        if self.horizon < tm[-1]:
            raise bad("horizon", f"must be >= the last measured time {tm[-1]:.6g} s")
        check_stuck_fractions(self, bad)

    # ---------------------------------------------------------------------- identity, helpers
    def _key(self) -> tuple:
        h = hashlib.sha1()
        for name in self.ARRAYS:
            h.update(getattr(self, name).tobytes())
            h.update(str(getattr(self, name).shape).encode())
        scalars = tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                        if f.name not in self.ARRAYS)
        return (h.hexdigest(), scalars)

    def __eq__(self, other) -> bool:
        if not isinstance(other, EmpiricalModel):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __getstate__(self) -> dict:
        """The fields only: the interpolation tables are rebuilt where the model is unpickled
        (a Dask worker, another process), not shipped with it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_cache", {})

    def replace(self, **changes) -> "EmpiricalModel":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Field name -> value (arrays as nested lists); the inverse of ``EmpiricalModel(**d)``."""
        return {f.name: (v.tolist() if isinstance(v := getattr(self, f.name), np.ndarray) else v)
                for f in dataclasses.fields(self)}

    @property
    def has_faults(self) -> bool:
        """True when any stuck-at fraction is non-zero."""
        return (self.stuck_at_zero + self.stuck_at_gmax + self.stuck_at_random) > 0.0

    @property
    def family(self) -> str:
        """The device-model family: "empirical"."""
        return "empirical"

    # --------------------------------------------------------------------- sampling tables
    @property
    def tables(self) -> "_Tables":
        """The interpolation tables the samplers use (built once per model)."""
        tab = self._cache.get("tables")
        if tab is None:
            tab = self._cache["tables"] = _build_tables(self)
        return tab

    def time_position(self, t: float) -> tuple[int, float]:
        """(n, w): time t [s] lies at fraction w of the table's time segment n (clamped)."""
        t = float(t)
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"t = {t!r}: the time since programming must be finite and >= 0 "
                             "[s]")
        nodes = self.tables.s_nodes
        s = log_time(t, self.t0)
        if s <= nodes[0]:
            return 0, 0.0
        if s >= nodes[-1]:
            return nodes.size - 2, 1.0
        n = int(np.searchsorted(nodes, s, side="right")) - 1
        return n, (s - nodes[n]) / (nodes[n + 1] - nodes[n])

    # ------------------------------------------------------------------ deterministic curves
    def quantile(self, g_target, t: float, p) -> np.ndarray:
        """The conductance at probability p of a read t seconds after programming.

        Parameters
        ----------
        g_target : array, target conductance [S]
        t : float, time since the end of programming [s]
        p : array, probability in (0, 1), broadcast against g_target

        Returns
        -------
        ndarray, conductance [S] (faults not included).
        """
        g, p = np.broadcast_arrays(np.asarray(g_target, dtype=np.float64),
                                   np.asarray(p, dtype=np.float64))
        if np.any((p <= 0) | (p >= 1)):
            raise ValueError("p: probabilities must lie strictly inside (0, 1)")
        return self.quantile_z(g, t, special.ndtri(p))

    def quantile_z(self, g_target, t: float, z) -> np.ndarray:
        """The conductance at normal score z (probability Phi(z)) at time t [S]; see
        :meth:`quantile`."""
        g, z = np.broadcast_arrays(np.asarray(g_target, dtype=np.float64),
                                   np.asarray(z, dtype=np.float64))
        n, w = self.time_position(t)
        tab = self.tables
        out = np.empty(g.size)
        EK.quantile_kernel(np.ascontiguousarray(g.reshape(-1)) / self.g_max,
                           np.ascontiguousarray(z.reshape(-1)), tab.x_top, tab.grid, tab.znodes,
                           tab.q, n, w, out)
        return (out * self.g_max).reshape(g.shape)

    def median(self, g_target, t: float) -> np.ndarray:
        """Median conductance of a read at time t [S]."""
        return self.quantile_z(g_target, t, 0.0)

    def _grid_lookup(self, table: np.ndarray, g, t: float, scaled: bool) -> np.ndarray:
        """A (G, S) table at |g| [S] and time t, bilinear; ``scaled``: values scale with x
        above the top level."""
        x = np.abs(np.asarray(g, dtype=np.float64)) / self.g_max
        tab = self.tables
        n, w = self.time_position(t)
        xq = np.minimum(x, tab.x_top)
        gi = np.clip(np.searchsorted(tab.grid, xq, side="right") - 1, 0, tab.grid.size - 2)
        wx = np.clip((xq - tab.grid[gi]) / (tab.grid[gi + 1] - tab.grid[gi]), 0.0, 1.0)
        a = table[gi, n] + w * (table[gi, n + 1] - table[gi, n])
        b = table[gi + 1, n] + w * (table[gi + 1, n + 1] - table[gi + 1, n])
        out = a + wx * (b - a)
        if scaled:
            out = out * np.where(x > tab.x_top, x / tab.x_top, 1.0)
        return out

    def read_noise_std(self, g_target, t: float) -> np.ndarray:
        """Standard deviation of one read around the device's conductance at time t [S]."""
        return self._grid_lookup(self.tables.sigma, g_target, t, True) * self.g_max

    def training_noise_std(self, g, t: float = 20.0):
        """Gaussian-equivalent standard deviation of a read at time t around its mean [S], for
        hardware-aware training noise: the standard deviation of the level's distribution (the
        device's spread and one read's noise); the shift of the median with time (relaxation,
        drift) is systematic, not noise, and is left out.

        Parameters
        ----------
        g : array (numpy or torch), signed conductance [S]; |g| is the target
        t : float, time since programming [s]

        Returns
        -------
        array like g [S]
        """
        if type(g).__module__.startswith("torch"):
            from .empirical_torch import training_noise_std_torch

            return training_noise_std_torch(g, t, self)
        return self._grid_lookup(self.tables.std, g, t, True) * self.g_max

    # -------------------------------------------------------------------------- sampling
    def program(self, g_target, rng=None, faults=None) -> "EmpiricalState":
        """Program devices: draw each device's latent rank and the faults (what is drawn once).

        Parameters
        ----------
        g_target : ndarray, target conductance [S], any shape, >= 0
        rng : int, numpy.random.Generator or None
            Seed or generator; the same seed gives the same bits on any number of threads.
        faults : (stuck, g_stuck) or None
            The devices' faults, bool and [S] arrays of g_target's size (as from
            :func:`aimc_device.pcm.draw_faults`); None: drawn here, by device index, with this
            call's seed when the model has faults (the fault model of the PCM family).

        Returns
        -------
        EmpiricalState, arrays of g_target's shape and float dtype.
        """
        from .devices import _faults, check_conductance

        g = check_conductance(g_target, "g_target", self)
        key = derive_key(rng)
        flat = np.ascontiguousarray(g, dtype=g.dtype).reshape(-1)
        z0 = np.empty_like(flat)
        EK.program_kernel(key, z0)
        if faults is None and self.has_faults:
            faults = _faults(flat.size, self, key)
        stuck = g_stuck = None
        if faults is not None:
            stuck, g_stuck = (np.asarray(a).reshape(g.shape) for a in faults)
            stuck, g_stuck = stuck.astype(bool), g_stuck.astype(flat.dtype)
        return EmpiricalState(g_target=flat.copy().reshape(g.shape), z0=z0.reshape(g.shape),
                              key=key, stuck=stuck, g_stuck=g_stuck)

    def read(self, state: "EmpiricalState", t: float, rng=None) -> np.ndarray:
        """Conductance t seconds after programming: the quantile function at the device's rank
        at time t, with the read's noise (module docstring).

        Parameters
        ----------
        state : EmpiricalState, from :meth:`program`
        t : float, time since the end of programming [s], >= 0
        rng : int, numpy.random.Generator or None

        Returns
        -------
        ndarray, conductance [S], same shape and dtype as ``state.g_target``.
        """
        if not isinstance(state, EmpiricalState):
            raise TypeError(f"state: expected an EmpiricalState from EmpiricalModel.program, got "
                            f"{type(state).__name__}; program the devices with the same model")
        n, w = self.time_position(t)
        key = derive_key(rng)
        tab = self.tables
        g = np.ascontiguousarray(state.g_target).reshape(-1)
        z0 = np.ascontiguousarray(state.z0, dtype=g.dtype).reshape(-1)
        out = np.empty_like(g)
        EK.read_kernel(g, z0, state.key, key, self.g_max, tab.x_top, tab.grid, tab.znodes, tab.q,
                       tab.b, tab.rho, self.times.size, n, w, out)
        if state.stuck is not None:
            s = state.stuck.reshape(-1)
            out[s] = state.g_stuck.reshape(-1)[s]
        return out.reshape(state.g_target.shape)

    # ------------------------------------------------------------------------------ knobs
    def scaled(self, *, programming: float = 1.0, drift_mean: float = 1.0,
               drift_spread: float = 1.0, read_noise: float = 1.0,
               stuck: float = 1.0) -> "EmpiricalModel":
        """A model with its statistics scaled by factors (>= 0; all 1: this model).

        Each level's and time's spread is split, Gaussian-equivalently, into the device's part
        and the read noise: with sigma_c the central width (module docstring) and b =
        min(sigma_read / sigma_c, 1), the device's deviations from the median are D_m =
        sqrt(1 - b^2) (Q_m - med_m). Then

        - ``programming`` scales D at the first measured time, D_1;
        - ``drift_spread`` scales the change of the deviations since then, D_m - D_1
          (broadening or narrowing with time);
        - ``drift_mean`` scales the median's change since the first time, med_m - med_1
          (relaxation or drift, either direction);
        - ``read_noise`` scales sigma_read;
        - ``stuck`` scales the three stuck-at fractions (zero stays zero; set fractions with
          :meth:`replace`).

        The new read's deviations are D'_m sqrt(sigma_D'^2 + sigma_read'^2) / sigma_D' (the
        device's shape with the summed variance; a Gaussian of the read noise where the device
        has no spread left), clipped at g = 0 and made non-decreasing in probability.

        Returns
        -------
        EmpiricalModel
        """
        note = scale_note(programming=programming, drift_mean=drift_mean,
                          drift_spread=drift_spread, read_noise=read_noise, stuck=stuck)
        if not note:
            return self
        zn = special.ndtri(self.probs)
        q = self.quantiles
        med = quantile_at_z(q, zn, 0.0)
        dev = q - med[..., None]
        width = central_width(q, zn)
        b = np.where(width > 0, np.minimum(self.read_noise / np.where(width > 0, width, 1.0),
                                           1.0), 0.0)
        d_dev = np.sqrt(1.0 - b * b)[..., None] * dev
        d1 = d_dev[:, :1]
        d_new = programming * d1 + drift_spread * (d_dev - d1)
        sig_r = read_noise * self.read_noise
        w_dev = central_width(d_new, zn)
        total = np.sqrt(w_dev**2 + sig_r**2)[..., None]
        safe = np.where(w_dev > 0, w_dev, 1.0)[..., None]
        d_out = np.where(w_dev[..., None] > 0, d_new * total / safe, total * zn)
        med_new = med[:, :1] + drift_mean * (med - med[:, :1])
        q_new = np.maximum.accumulate(np.clip(med_new[..., None] + d_out, 0.0, None), axis=2)
        return self.replace(
            quantiles=q_new, read_noise=sig_r,
            stuck_at_zero=self.stuck_at_zero * stuck, stuck_at_gmax=self.stuck_at_gmax * stuck,
            stuck_at_random=self.stuck_at_random * stuck, name=f"{self.name} ({note})",
            citation=f"{self.citation}; scaled: {note}" if self.citation else f"scaled: {note}")


@dataclass(frozen=True)
class EmpiricalState:
    """What is drawn once when devices of an :class:`EmpiricalModel` are programmed.

    Attributes
    ----------
    g_target : ndarray, target conductance [S]
    z0 : ndarray, each device's latent normal score at the first measured time, dimensionless
    key : numpy.uint64, the programming key: the device's rank innovations between measured times
        are drawn from it (counter-based, by device index), so they too are fixed at programming
    stuck : ndarray of bool or None, devices stuck at a fixed conductance (faults)
    g_stuck : ndarray or None, the conductance of stuck devices [S] (0 elsewhere)
    """

    g_target: np.ndarray
    z0: np.ndarray
    key: np.uint64
    stuck: np.ndarray | None = None
    g_stuck: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.g_target.shape


# ------------------------------------------------------------------------------ the tables
@dataclass(frozen=True)
class _Tables:
    """Interpolation tables of an EmpiricalModel (see ``_empirical_kernels``)."""

    grid: np.ndarray      # (G,) relative targets
    x_top: float          # highest measured level
    s_nodes: np.ndarray   # (S,) ln((t + t0) / t0) of the time nodes
    znodes: np.ndarray    # (J,) normal scores of probs
    q: np.ndarray         # (G, S, J) quantiles of g/g_max
    b: np.ndarray         # (G, S) renewed fraction of the rank per read
    sigma: np.ndarray     # (G, S) read noise, relative
    std: np.ndarray       # (G, S) standard deviation of a read, relative
    rho: np.ndarray       # (G, max(M - 1, 1)) rank correlation between measured times


def quantile_at_z(q: np.ndarray, zn: np.ndarray, z: float) -> np.ndarray:
    """Quantile tables q (..., J) at nodes zn (J,) evaluated at one normal score z: linear
    between nodes, held beyond the end nodes (the model's rule)."""
    j = int(np.clip(np.searchsorted(zn, z, side="right") - 1, 0, zn.size - 2))
    wz = min(max((z - zn[j]) / (zn[j + 1] - zn[j]), 0.0), 1.0)
    return q[..., j] + wz * (q[..., j + 1] - q[..., j])


def central_width(q: np.ndarray, zn: np.ndarray) -> np.ndarray:
    """(Q(z = 1) - Q(z = -1)) / 2: the Gaussian-equivalent central width of q (..., J)."""
    return 0.5 * (quantile_at_z(q, zn, 1.0) - quantile_at_z(q, zn, -1.0))


def _grid(levels: np.ndarray) -> np.ndarray:
    parts = [[0.0]] if levels[0] > 0 else []
    for a, b in zip(levels[:-1], levels[1:]):
        parts.append(np.linspace(a, b, GRID_STEPS, endpoint=False))
    parts.append([levels[-1]])
    return np.concatenate(parts)


def _on_grid(levels: np.ndarray, grid: np.ndarray, values: np.ndarray,
             scale_below: bool) -> np.ndarray:
    """values (K, ...) at the levels -> (G, ...) on the grid: PCHIP between levels; below the
    lowest level scaled by x / x_1 (``scale_below``) or held."""
    out = np.empty((grid.size,) + values.shape[1:])
    below = grid < levels[0]
    if below.any():
        shape = (-1,) + (1,) * (values.ndim - 1)
        factor = (grid[below] / levels[0]).reshape(shape) if scale_below else 1.0
        out[below] = factor * values[0]
    if levels.size >= 2:
        out[~below] = interpolate.PchipInterpolator(levels, values, axis=0)(grid[~below])
    else:
        out[~below] = values[0]
    return out


def _build_tables(model: EmpiricalModel) -> _Tables:
    lv, tm = model.levels, model.times
    zn = special.ndtri(model.probs)
    s = log_time(tm, model.t0)
    q_t = np.transpose(model.quantiles, (1, 0, 2))   # (M, K, J)
    r_t = model.read_noise.T                        # (M, K)
    if tm.size >= 2 and model.horizon > tm[-1]:
        s_h = log_time(model.horizon, model.t0)
        ratio = (s_h - s[-1]) / (s[-1] - s[-2])
        q_h = q_t[-1] + ratio * (q_t[-1] - q_t[-2])
        q_h = np.maximum.accumulate(np.clip(q_h, 0.0, model.quantiles.max()), axis=-1)
        q_t = np.concatenate([q_t, q_h[None]])
        r_t = np.concatenate([r_t, r_t[-1:]])
        s = np.append(s, s_h)
    if s.size == 1:  # one time node: held for every t
        q_t = np.concatenate([q_t, q_t])
        r_t = np.concatenate([r_t, r_t])
        s = np.append(s, s[0] + 1.0)
    grid = _grid(lv)
    q = _on_grid(lv, grid, np.transpose(q_t, (1, 0, 2)), True)     # (G, S, J)
    q = np.maximum.accumulate(np.maximum.accumulate(q, axis=2), axis=0)
    sigma = np.clip(_on_grid(lv, grid, r_t.T, True), 0.0, None)    # (G, S)
    width = central_width(q, zn)
    b = np.where(width > 0, np.minimum(sigma / np.where(width > 0, width, 1.0), 1.0), 0.0)
    j = np.clip(np.searchsorted(zn, _STD_POINTS, side="right") - 1, 0, zn.size - 2)
    wz = np.clip((_STD_POINTS - zn[j]) / (zn[j + 1] - zn[j]), 0.0, 1.0)
    vals = np.clip(q[..., j] + wz * (q[..., j + 1] - q[..., j]), 0.0, None)
    std = vals.std(axis=-1)
    rc = model.rank_correlation if tm.size >= 2 else np.ones((lv.size, 1))
    rho = np.clip(_on_grid(lv, grid, rc, False), 0.0, 1.0)
    arrays = dict(grid=grid, s_nodes=s, znodes=zn, q=q, b=b, sigma=sigma, std=std, rho=rho)
    for k, v in arrays.items():
        v = np.ascontiguousarray(v, dtype=np.float64)
        v.flags.writeable = False
        arrays[k] = v
    return _Tables(x_top=float(lv[-1]), **arrays)
