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
from .devices import ProgrammedState, perturb_flat
from .empirical import EmpiricalModel
from .formulas import (
    drift_exponent_stats,
    drift_factor,
    programming_noise_std,
    read_noise_q,
    read_noise_time_factor,
    stuck_conductance,
    training_noise_std,
)
from .params import PCMModel

__all__ = ["program_torch", "read_torch", "draw_faults_torch", "perturb_torch",
           "perturb_tensor"]


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def draw_faults_torch(n: int, model: PCMModel, generator=None, device="cpu",
                      dtype=torch.float32):
    """Which of ``n`` devices are stuck, and at what conductance: the fault model of
    :func:`formulas.stuck_conductance` with ``torch.rand`` variates (the distribution of
    :func:`aimc_device.pcm.draw_faults`, other numbers).

    Returns
    -------
    (stuck, g_stuck) : bool tensor (n,) and tensor (n,) [S] of ``dtype`` on ``device``, or None
    when the model has no faults.
    """
    if not model.has_faults:
        return None
    gen = torch_generator(generator, device)
    u = torch.rand((2, int(n)), dtype=dtype, device=device, generator=gen)
    return stuck_conductance(u[0], u[1], model)


def program_torch(g_target: torch.Tensor, model: PCMModel, generator=None,
                  faults=None) -> ProgrammedState:
    """Programming error, drift exponents and faults on a tensor (Eqs. 7, 9): the statistics of
    :func:`aimc_device.pcm.program`.

    Parameters
    ----------
    g_target : torch.Tensor, target conductance [S], >= 0
    model : PCMModel
    generator : torch.Generator, int seed or None (on g_target's device)
    faults : (stuck, g_stuck) or None
        The devices' faults (bool and [S] tensors of g_target's size); None: drawn here with
        :func:`draw_faults_torch` when the model has faults.

    Returns
    -------
    ProgrammedState of tensors like g_target: g_prog [S] (clipped at 0; stuck devices at their
    stuck conductance), nu (0 for stuck devices), stuck (bool, or None without faults);
    q_read None (:func:`read_torch` computes Q_s). For an :class:`EmpiricalModel` the state of
    :func:`.empirical_torch.program_torch`.
    """
    if isinstance(model, EmpiricalModel):
        from . import empirical_torch

        return empirical_torch.program_torch(g_target, model, generator, faults)
    gen = torch_generator(generator, g_target.device)
    g_prog = (g_target + programming_noise_std(g_target, model) * _randn(g_target, gen)).clamp_(
        min=0.0)  # Eq. 7
    mean, std = drift_exponent_stats(g_target, model)
    nu = mean + std * _randn(g_target, gen)  # Eq. 9
    if faults is None and model.has_faults:
        faults = draw_faults_torch(g_target.numel(), model, gen, g_target.device, g_target.dtype)
    stuck = None
    if faults is not None:
        stuck = faults[0].to(g_target.device, torch.bool).reshape(g_target.shape)
        g_stuck = faults[1].to(g_target.device, g_target.dtype).reshape(g_target.shape)
        g_prog = torch.where(stuck, g_stuck, g_prog)
        nu = nu.masked_fill_(stuck, 0.0)
    return ProgrammedState(g_target=g_target, g_prog=g_prog, nu=nu, stuck=stuck)


def read_torch(state: ProgrammedState, t: float, model: PCMModel,
               generator=None) -> torch.Tensor:
    """Conductance t seconds after programming: drift and 1/f read noise (Eqs. 8-12); stuck
    devices return their stuck conductance. The statistics of :func:`aimc_device.pcm.read`.

    Parameters
    ----------
    state : ProgrammedState of tensors, from :func:`program_torch`
    t : float, time since the end of programming [s]
    model : PCMModel
    generator : torch.Generator, int seed or None

    Returns
    -------
    torch.Tensor, conductance [S], >= 0.

    For an :class:`EmpiricalModel`, ``state`` is the one its ``program_torch`` returned (see
    :func:`.empirical_torch.read_torch`).
    """
    if isinstance(model, EmpiricalModel):
        from . import empirical_torch

        return empirical_torch.read_torch(state, t, model, generator)
    g_prog = state.g_prog
    gen = torch_generator(generator, g_prog.device)
    g_d = g_prog * drift_factor(state.nu, t, model)  # Eq. 8
    ref = state.g_target if model.read_noise_reference == "target" else g_prog
    sig = g_d.abs() * read_noise_q(ref / model.g_max, model) * read_noise_time_factor(t, model)
    g = (g_d + sig * _randn(g_d, gen)).clamp_(min=0.0)  # Eqs. 11-12
    return g if state.stuck is None else torch.where(state.stuck, g_prog, g)


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

