"""The empirical device model's sampler on torch tensors, for tensors that live on a GPU.

The same rules and tables as the Numba kernels (:mod:`._empirical_kernels`, see
:mod:`.empirical`), written with torch operations and ``torch.randn``; the tests check that both
give the same distributions. On CPU prefer :meth:`EmpiricalModel.program` / ``read``.

The torch state (:class:`EmpiricalTorchState`) holds ``z`` (..., M), the device's latent normal
score at each measured time (drawn at programming), and the faults: ``stuck`` and ``g_stuck``,
the conductance of stuck devices [S].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._random import torch_generator
from .empirical import EmpiricalModel

__all__ = ["EmpiricalTorchState", "program_torch", "read_torch", "perturb_torch", "training_noise_std_torch"]


def _tables(model: EmpiricalModel, device) -> dict:
    """The model's tables as float64 tensors on ``device`` (cached per device)."""
    cache = model._cache.setdefault("torch", {})
    key = str(torch.device(device))
    if key not in cache:
        tab = model.tables
        cache[key] = {name: torch.tensor(getattr(tab, name), dtype=torch.float64,
                                         device=device)
                      for name in ("grid", "znodes", "q", "b", "std", "rho")}
    return cache[key]


def _locate(tab: dict, model: EmpiricalModel, g: torch.Tensor):
    """Grid segment gi, weight wx and top-level factor f of |g| [S] (see ``locate_x``)."""
    x = g.detach().abs().to(torch.float64) / model.g_max
    x_top = float(model.levels[-1])
    f = torch.where(x > x_top, x / x_top, torch.ones_like(x))
    xq = x.clamp(max=x_top)
    grid = tab["grid"]
    gi = (torch.searchsorted(grid, xq, right=True) - 1).clamp(0, grid.numel() - 2)
    wx = ((xq - grid[gi]) / (grid[gi + 1] - grid[gi])).clamp(0.0, 1.0)
    return gi, wx, f


def _lerp_rows(table: torch.Tensor, gi, wx, col):
    """table (G, C) at grid segment (gi, wx), column ``col`` (an int)."""
    a = table[gi, col]
    return a + wx * (table[gi + 1, col] - a)


def _bilinear(table: torch.Tensor, gi, wx, n: int, w: float):
    a0, a1 = table[gi, n], table[gi, n + 1]
    b0, b1 = table[gi + 1, n], table[gi + 1, n + 1]
    a = a0 + w * (a1 - a0)
    b = b0 + w * (b1 - b0)
    return a + wx * (b - a)


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, dtype=torch.float64, device=like.device, generator=generator)


@dataclass(frozen=True)
class EmpiricalTorchState:
    """What :func:`program_torch` draws once for devices of an :class:`EmpiricalModel`, as tensors.

    Attributes
    ----------
    g_target : torch.Tensor, target conductance [S]
    z : torch.Tensor (*g_target.shape, M), float64, each device's normal score at every measured
        time, dimensionless
    stuck : torch.Tensor of bool or None, devices stuck at a fixed conductance (faults)
    g_stuck : torch.Tensor or None, the conductance of stuck devices [S] (0 elsewhere)
    """

    g_target: torch.Tensor
    z: torch.Tensor
    stuck: torch.Tensor | None = None
    g_stuck: torch.Tensor | None = None


def program_torch(g_target: torch.Tensor, model: EmpiricalModel, generator=None,
                  faults=None) -> EmpiricalTorchState:
    """Draw each device's latent rank at every measured time, and the faults.

    Parameters
    ----------
    g_target : torch.Tensor, target conductance [S], >= 0
    model : EmpiricalModel
    generator : torch.Generator, int seed or None (on g_target's device)
    faults : (stuck, g_stuck) or None
        The devices' faults (bool and [S] tensors of g_target's size); None: drawn here with
        :func:`aimc_device.pcm.torch_ops.draw_faults_torch` when the model has faults.

    Returns
    -------
    EmpiricalTorchState
    """
    from .torch_ops import draw_faults_torch

    gen = torch_generator(generator, g_target.device)
    tab = _tables(model, g_target.device)
    gi, wx, _ = _locate(tab, model, g_target)
    m_meas = model.times.size
    z = torch.empty(g_target.shape + (m_meas,), dtype=torch.float64, device=g_target.device)
    z[..., 0] = _randn(g_target, gen)
    for m in range(m_meas - 1):  # the Gaussian Markov chain of the module docstring
        r = _lerp_rows(tab["rho"], gi, wx, m)
        z[..., m + 1] = r * z[..., m] + torch.sqrt((1.0 - r * r).clamp(min=0.0)) * _randn(
            g_target, gen)
    if faults is None and model.has_faults:
        faults = draw_faults_torch(g_target.numel(), model, gen, g_target.device,
                                   g_target.dtype)
    stuck = g_stuck = None
    if faults is not None:
        stuck, g_stuck = (torch.as_tensor(a, device=g_target.device).reshape(g_target.shape)
                          for a in faults)
        stuck, g_stuck = stuck.to(torch.bool), g_stuck.to(g_target.dtype)
    return EmpiricalTorchState(g_target, z, stuck, g_stuck)


def read_torch(state: EmpiricalTorchState, t: float, model: EmpiricalModel,
               generator=None) -> torch.Tensor:
    """Conductance t seconds after programming (see :meth:`EmpiricalModel.read`).

    Parameters
    ----------
    state : EmpiricalTorchState, from :func:`program_torch`
    t : float, time since the end of programming [s]
    model : EmpiricalModel
    generator : torch.Generator, int seed or None

    Returns
    -------
    torch.Tensor, conductance [S], >= 0, g_target's dtype.
    """
    g_target, z = state.g_target, state.z
    gen = torch_generator(generator, g_target.device)
    tab = _tables(model, g_target.device)
    n, w = model.time_position(t)
    gi, wx, f = _locate(tab, model, g_target)
    top = min(n + 1, model.times.size - 1)
    za = z[..., n]
    if top > n:
        zb = z[..., top]
        r = _lerp_rows(tab["rho"], gi, wx, n)
        zd = ((1.0 - w) * za + w * zb) / torch.sqrt(
            (1.0 - w) ** 2 + w * w + 2.0 * w * (1.0 - w) * r)
    else:
        zd = za
    b = _bilinear(tab["b"], gi, wx, n, w)
    zr = torch.sqrt((1.0 - b * b).clamp(min=0.0)) * zd + b * _randn(g_target, gen)
    zn, q = tab["znodes"], tab["q"]
    j = (torch.searchsorted(zn, zr.contiguous(), right=True) - 1).clamp(0, zn.numel() - 2)
    wz = ((zr - zn[j]) / (zn[j + 1] - zn[j])).clamp(0.0, 1.0)

    def at(g_idx, t_idx):
        lo = q[g_idx, t_idx, j]
        return lo + wz * (q[g_idx, t_idx, j + 1] - lo)

    a = at(gi, n) + w * (at(gi, n + 1) - at(gi, n))
    bq = at(gi + 1, n) + w * (at(gi + 1, n + 1) - at(gi + 1, n))
    out = ((a + wx * (bq - a)) * f).clamp(min=0.0) * model.g_max
    out = out.to(g_target.dtype)
    return out if state.stuck is None else torch.where(state.stuck, state.g_stuck, out)


def training_noise_std_torch(g: torch.Tensor, t: float, model: EmpiricalModel) -> torch.Tensor:
    """:meth:`EmpiricalModel.training_noise_std` on a tensor [S], g's dtype."""
    tab = _tables(model, g.device)
    n, w = model.time_position(t)
    gi, wx, f = _locate(tab, model, g)
    return (_bilinear(tab["std"], gi, wx, n, w) * f * model.g_max).to(g.dtype)


def perturb_torch(g: torch.Tensor, model: EmpiricalModel, t: float = 20.0, scale: float = 1.0,
                  generator=None) -> torch.Tensor:
    """HWA training noise on a tensor: g + scale std(|g|, t) xi [S] (see
    :meth:`EmpiricalModel.training_noise_std`)."""
    gen = torch_generator(generator, g.device)
    std = training_noise_std_torch(g, t, model)
    return g + scale * std * torch.randn(g.shape, dtype=g.dtype, device=g.device, generator=gen)

