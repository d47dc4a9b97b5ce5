"""Information criteria of a device-model family from its predictive density of the reads.

Each family predicts, at each target level and time, the distribution of a read:

- the PCM family (and any family without quantile tables): a Normal with the mean and standard
  deviation of the model's own reads at the level's targets (:func:`aimc_device.pcm.program` /
  :func:`aimc_device.pcm.read`, ``draws`` programmings), i.e. the Gaussian form of the paper's
  statistics (Eqs. 7-12 of Rasch et al. 2023, docs/model.md);
- the empirical family: the piecewise density of its quantile table at the level and time,
  q_1 <= ... <= q_J at probabilities p_1 < ... < p_J: mass p_{j+1} - p_j spread evenly over
  [q_j, q_{j+1}], and the mass p_1 below q_1 and 1 - p_J above q_J in exponential tails
  (density p_1 / lambda exp(-(q_1 - g) / lambda) below q_1), lambda the larger of the scale at
  which the tail's density meets that of the end segment (p_1 / f(q_1+)) and the decay length
  of a Normal tail of the table's Gaussian-equivalent width w = (Q(z=1) - Q(z=-1)) / 2 at the
  end node's normal score z_1 (w / |z_1|), so that a table whose end quantiles coincide does
  not make the tail a wall. Segments narrower than ``MIN_WIDTH`` g_max are widened to it (a
  quantised table would otherwise give an infinite density).

The log-likelihood ln L = sum over reads of ln f(read) (one read per device and time, the first
repeat that was read; reads in S) gives AIC = 2 k - 2 ln L and BIC = k ln n - 2 ln L (n reads,
k the family's fitted numbers: the PCM fit's fitted coefficients, the empirical fit's table
entries). On the devices a model was fitted to these favour the family that describes the data
with fewer numbers; the held-out log-likelihood per read, on devices the model was not fitted
to, needs no penalty and is fair to a nonparametric family.

References
----------
.. [1] H. Akaike, "A new look at the statistical model identification", IEEE Trans. Autom.
   Control 19, 716 (1974).
.. [2] G. Schwarz, "Estimating the dimension of a model", Ann. Stat. 6, 461 (1978).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from .. import pcm
from ._stats import log_time

__all__ = ["Criterion", "MIN_WIDTH", "table_log_density", "read_log_likelihood",
           "fitted_numbers", "first_read", "time_nodes", "model_reads"]

#: Narrowest segment of a quantile table in the empirical density, relative to g_max.
MIN_WIDTH = 1e-9


@dataclass
class Criterion:
    """A family's predictive log-likelihood on the devices it was fitted to and on held-out ones.

    Attributes
    ----------
    family : str
    n_params : int, k: the numbers fitted (coefficients or table entries)
    levels : (K,) relative targets; times : (M,) [s]
    loglik, n_reads : (K, M) ln L of the reads of the fitted devices and their count
    loglik_heldout, n_heldout : (K, M) the same for the held-out devices
    """

    family: str
    n_params: int
    levels: np.ndarray
    times: np.ndarray
    loglik: np.ndarray
    n_reads: np.ndarray
    loglik_heldout: np.ndarray
    n_heldout: np.ndarray

    @property
    def aic(self) -> float:
        """2 k - 2 ln L on the fitted devices."""
        return float(2 * self.n_params - 2.0 * np.nansum(self.loglik))

    @property
    def bic(self) -> float:
        """k ln n - 2 ln L on the fitted devices (n reads)."""
        n = max(int(self.n_reads.sum()), 1)
        return float(self.n_params * np.log(n) - 2.0 * np.nansum(self.loglik))

    @property
    def heldout_per_read(self) -> float:
        """ln L per read on the held-out devices (larger is better)."""
        return float(np.nansum(self.loglik_heldout) / max(int(self.n_heldout.sum()), 1))

    def line(self) -> str:
        """One line: k, AIC, BIC, held-out log-likelihood per read."""
        return (f"k = {self.n_params}, AIC {self.aic:.6g}, BIC {self.bic:.6g} "
                f"({int(self.n_reads.sum())} reads of the fitted half); held-out log-likelihood "
                f"{self.heldout_per_read:.4f} per read ({int(self.n_heldout.sum())} reads)")

    def to_dict(self) -> dict:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
               for k, v in self.__dict__.items()}
        out.update(aic=self.aic, bic=self.bic, heldout_per_read=self.heldout_per_read)
        return out


def table_log_density(v: np.ndarray, q: np.ndarray, probs: np.ndarray,
                      min_width: float) -> np.ndarray:
    """ln f(v) of the piecewise density of a quantile table (module docstring).

    Parameters
    ----------
    v : (n,) values [S]; q : (J,) non-decreasing quantiles [S] at probabilities ``probs`` (J,)
    min_width : float, narrowest segment [S] (and Gaussian-equivalent width)

    Returns
    -------
    (n,) log densities [ln(1/S)]
    """
    q = np.asarray(q, dtype=np.float64)
    zn = special.ndtri(probs)
    w_eq = max(0.5 * (np.interp(1.0, zn, q) - np.interp(-1.0, zn, q)), min_width)
    width = np.maximum(np.diff(q), min_width)
    edges = q[0] + np.concatenate([[0.0], np.cumsum(width)])
    dens = np.diff(probs) / width
    v = np.asarray(v, dtype=np.float64)
    j = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, width.size - 1)
    out = np.log(dens[j])
    for side, mass, f_end, z_end in ((v < edges[0], probs[0], dens[0], zn[0]),
                                     (v > edges[-1], 1.0 - probs[-1], dens[-1], zn[-1])):
        if side.any():
            lam = max(mass / f_end, w_eq / max(abs(z_end), 1.0))
            dist = np.where(v < edges[0], edges[0] - v, v - edges[-1])[side]
            out[side] = np.log(mass / lam) - dist / lam
    return out


def first_read(g: np.ndarray) -> np.ndarray:
    """(n, T, R) -> (n, T): the first repeat that was read (NaN if none)."""
    out = g[:, :, 0].astype(np.float64)
    for r in range(1, g.shape[2]):
        out = np.where(np.isnan(out), g[:, :, r], out)
    return out


def time_nodes(g: np.ndarray, times, t0: float) -> np.ndarray:
    """The times (T,) [s] at which a model is compared with reads g (n, T): ``times`` (T,), or
    for per-device times (n, T) the mean log-time ln((t + t0)/t0) of the reads taken."""
    times = np.asarray(times, dtype=float)
    if times.ndim == 1:
        return times
    with np.errstate(invalid="ignore"):
        s = np.where(np.isnan(g), np.nan, log_time(times, t0))
    return t0 * np.expm1(np.nanmean(s, axis=0))


def model_reads(model, g_target: np.ndarray, t_nodes: np.ndarray, seed: int,
                draws: int) -> np.ndarray:
    """(draws, n, T) reads [S] of ``model`` programmed ``draws`` times at ``g_target`` [S] and
    read at each of ``t_nodes`` [s] (any family, through pcm.program / pcm.read)."""
    sims = np.empty((draws, g_target.size, t_nodes.size))
    for d in range(draws):
        state = pcm.program(g_target, model, rng=[seed, d])
        for m, t in enumerate(t_nodes):
            sims[d, :, m] = pcm.read(state, float(t), model, rng=[seed, d, m + 1])
    return sims


def read_log_likelihood(model, g_target: np.ndarray, g: np.ndarray, t_nodes: np.ndarray,
                        g_max: float, *, seed: int = 0, draws: int = 8, sims=None,
                        sims_targets=None):
    """ln L per level and time of reads under a model's predictive density (module docstring).

    Parameters
    ----------
    model : PCMModel, EmpiricalModel or any family pcm.program / pcm.read sample
    g_target : (n,) targets [S]; g : (n, T) one read per device and time [S], NaN: not read
    t_nodes : (T,) times [s]; g_max : float [S]
    seed, draws : the model's reads for the Normal (families without quantile tables)
    sims : (draws, n', T), optional, those reads when already drawn (:func:`model_reads`) at
        targets ``sims_targets`` (n',) [S] (default ``g_target``); each level of g_target
        must be among them

    Returns
    -------
    (levels (K,) [S], loglik (K, T), n_reads (K, T))
    """
    levels, lev = np.unique(g_target, return_inverse=True)
    shape = (levels.size, t_nodes.size)
    ll, cnt = np.zeros(shape), np.zeros(shape, np.int64)
    tables = hasattr(model, "quantile_z") and hasattr(model, "probs")
    if tables:
        probs = np.asarray(model.probs, dtype=np.float64)
        zn = special.ndtri(probs)
        # the table of every level at each time, in one call per time
        q = np.stack([model.quantile_z(np.repeat(levels, zn.size), float(t),
                                       np.tile(zn, levels.size)).reshape(levels.size, -1)
                      for t in t_nodes], axis=1)
        q = np.maximum.accumulate(q, axis=2)
    else:
        if sims is None:
            sims, sims_targets = model_reads(model, g_target, t_nodes, seed, draws), g_target
        elif sims_targets is None:
            sims_targets = g_target
        mu, sd = np.empty(shape), np.empty(shape)
        for k, v in enumerate(levels):
            s = sims[:, sims_targets == v, :]
            if s.shape[1] == 0:
                raise ValueError(f"read_log_likelihood: no model reads at the level {v:.6g} S")
            s = s.transpose(2, 0, 1).reshape(t_nodes.size, -1)
            mu[k], sd[k] = s.mean(axis=1), np.maximum(s.std(axis=1, ddof=1), MIN_WIDTH * g_max)
    for k in range(levels.size):
        rows = lev == k
        for m in range(t_nodes.size):
            data = g[rows, m]
            data = data[np.isfinite(data)]
            cnt[k, m] = data.size
            if data.size == 0:
                continue
            if tables:
                ll[k, m] = table_log_density(data, q[k, m], probs, MIN_WIDTH * g_max).sum()
            else:
                ll[k, m] = stats.norm.logpdf(data, mu[k, m], sd[k, m]).sum()
    return levels, ll, cnt


def fitted_numbers(report) -> int:
    """k of a fit report: the empirical fit's table entries (``n_params``), or the sum of the
    fitted coefficients of the PCM fit's components the data identify."""
    comps = getattr(report, "components", None)
    if comps is None:
        return int(report.n_params)
    return int(sum(c.n_params for c in comps.values() if c.identified))
