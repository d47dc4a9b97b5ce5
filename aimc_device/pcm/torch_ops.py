"""The PCM sampler on torch tensors, for tensors that live on a GPU.

Same statistics as the Numba kernels (``_kernels.py``), written with the array-generic formulas
of ``formulas.py`` and ``torch.randn``; the tests check that both give the same distributions.
On CPU tensors prefer :func:`aimc_device.pcm.program` / :func:`read` / :func:`perturb` (Numba),
which :func:`perturb_tensor` dispatches to without a copy.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 7-12.
"""
from __future__ import annotations

import torch

from .._random import torch_generator
from .devices import perturb_flat
from .empirical import EmpiricalModel
from .formulas import (
    drift_exponent_stats,
    drift_factor,
    programming_noise_std,
    read_noise_q,
    read_noise_time_factor,
    training_noise_std,
)
from .params import PCMModel

__all__ = ["program_torch", "read_torch", "perturb_torch", "perturb_tensor"]


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def program_torch(g_target: torch.Tensor, model: PCMModel, generator=None):
    """Programming error and drift exponents on a tensor (Eqs. 7, 9).

    Parameters
    ----------
    g_target : torch.Tensor, target conductance [S], >= 0
    model : PCMModel
    generator : torch.Generator, int seed or None (on g_target's device)

    Returns
    -------
    (g_prog [S], nu dimensionless) : tensors like g_target; g_prog clipped at 0. For an
    :class:`EmpiricalModel`: (z, g_stuck), see :func:`.empirical_torch.program_torch`.
    """
    if isinstance(model, EmpiricalModel):
        from . import empirical_torch

        return empirical_torch.program_torch(g_target, model, generator)
    gen = torch_generator(generator, g_target.device)
    g_prog = (g_target + programming_noise_std(g_target, model) * _randn(g_target, gen)).clamp_(
        min=0.0)  # Eq. 7
    mean, std = drift_exponent_stats(g_target, model)
    nu = mean + std * _randn(g_target, gen)  # Eq. 9
    return g_prog, nu


def read_torch(g_target: torch.Tensor, g_prog: torch.Tensor, nu: torch.Tensor, t: float,
               model: PCMModel, generator=None) -> torch.Tensor:
    """Conductance t seconds after programming: drift and 1/f read noise (Eqs. 8-12).

    Parameters
    ----------
    g_target, g_prog : torch.Tensor [S]; nu : torch.Tensor, dimensionless
    t : float, time since the end of programming [s]
    model : PCMModel
    generator : torch.Generator, int seed or None

    Returns
    -------
    torch.Tensor, conductance [S], >= 0.

    For an :class:`EmpiricalModel`, ``g_prog`` and ``nu`` are the pair (z, g_stuck) its
    ``program_torch`` returned (see :func:`.empirical_torch.read_torch`).
    """
    if isinstance(model, EmpiricalModel):
        from . import empirical_torch

        return empirical_torch.read_torch(g_target, g_prog, nu, t, model, generator)
    gen = torch_generator(generator, g_prog.device)
    g_d = g_prog * drift_factor(nu, t, model)  # Eq. 8
    ref = g_target if model.read_noise_reference == "target" else g_prog
    sig = g_d.abs() * read_noise_q(ref / model.g_max, model) * read_noise_time_factor(t, model)
    return (g_d + sig * _randn(g_d, gen)).clamp_(min=0.0)  # Eqs. 11-12


def perturb_torch(g: torch.Tensor, model: PCMModel, t: float = 20.0, scale: float = 1.0,
                  generator=None) -> torch.Tensor:
    """HWA training noise on a tensor: programming noise plus t seconds of read noise, no drift.

    out = g + scale * (sigma_P(|g|) xi_1 + |g| Q_s(|g|/g_max) tf(t) xi_2) [S]; see
    :func:`aimc_device.pcm.perturb`. An :class:`EmpiricalModel` uses its
    ``training_noise_std``.
    """
    if isinstance(model, EmpiricalModel):
        from . import empirical_torch

        return empirical_torch.perturb_torch(g, model, t, scale, generator)
    gen = torch_generator(generator, g.device)
    sig_p, sig_r = training_noise_std(g, t, model)  # Eqs. 7, 10-11
    return g + scale * torch.hypot(sig_p, sig_r) * _randn(g, gen)  # independent: one Gaussian


def perturb_tensor(g: torch.Tensor, model: PCMModel, t: float = 20.0, scale: float = 1.0,
                   rng=None, unit: float = 1.0) -> torch.Tensor:
    """The sampling adapter: HWA weight noise for a tensor of signed conductances [S].

    CPU tensors go through the counter-based Numba kernel of :func:`pcm.perturb` on a
    shared-memory view (no copy of the input; the same numbers as :func:`pcm.perturb`); other
    devices use :func:`perturb_torch`. The result does not require grad.

    Parameters
    ----------
    g : torch.Tensor, signed conductance [S]
    model : PCMModel
    t : float, read-noise time [s]
    scale : float, noise scale, dimensionless
    rng : int, numpy.random.Generator, torch.Generator or None
    unit : float, the unit of ``g`` and of the result [S] (``model.g_max``: normalised
        weights w~, as the training noise of :class:`aimc_device.nn.AnalogTile` uses it)
    """
    g = g.detach()
    if g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) \
            and not isinstance(rng, torch.Generator):
        g = g.contiguous()
        out = perturb_flat(g.reshape(-1).numpy(), model, t=t, scale=scale, rng=rng, unit=unit)
        return torch.from_numpy(out).reshape(g.shape)
    if unit != 1.0:
        return perturb_torch(g * unit, model, t=t, scale=scale,
                             generator=torch_generator(rng, g.device)).div_(unit)
    return perturb_torch(g, model, t=t, scale=scale, generator=torch_generator(rng, g.device))

