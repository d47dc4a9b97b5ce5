"""An analog array and its life cycle: map -> program -> drift to t -> MVM (docs/model.md, 1-5).

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eqs. 1-12 and Methods (drift
   compensation).
"""
from __future__ import annotations

import numpy as np
import torch

from .._random import derive_key, torch_generator
from ..io import resolve_device_model
from ..pcm import draw_faults, program, programmed_conductance, read
from ..pcm.torch_ops import (is_torch_state, program_torch, programmed_conductance_torch,
                             read_torch)
from .config import CrossbarConfig
from .mapping import (
    conductance_targets,
    device_targets,
    map_weights,
    pair_faults,
    pair_partners,
    split_sizes,
    tile_slices,
    weights_from_conductance,
)
from .mvm import analog_mvm
from .options import current_options
from .periphery import draw_asymmetry, draw_zeta

__all__ = ["AnalogArray"]


def _to_tensor(a, name: str, dtype=None, device=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if not (t.is_floating_point()):
        t = t.to(torch.float64 if dtype is None else dtype)
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device or t.device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf; give finite values")
    return t


def _numba_sampler(t: torch.Tensor) -> bool:
    """Whether devices held in ``t`` are sampled by the Numba kernels of :mod:`aimc_device.pcm`
    (CPU tensors) or by its torch sampler (other devices)."""
    return t.device.type == "cpu"


_REF_SEED = 20230823  # fixed seed of the drift-compensation inputs (any fixed value)


_REF_CACHE: dict = {}


def _reference_inputs(n: int, n_rows: int, dtype, device) -> torch.Tensor:
    """The fixed, known +-1 inputs of the drift-compensation readout (n, n_rows), cached."""
    key = (n, n_rows, dtype, str(device))
    x = _REF_CACHE.get(key)
    if x is None:
        gen = torch.Generator().manual_seed(_REF_SEED)
        x = torch.randint(0, 2, (n, n_rows), generator=gen).to(dtype) * 2 - 1
        x = _REF_CACHE[key] = x.to(device)
    return x


class AnalogArray:
    """A weight matrix mapped onto PCM crossbar tiles, with periphery and drift compensation.

    Parameters
    ----------
    weights : ndarray or torch.Tensor (out, in), the layer's weights (any unit)
    cfg : CrossbarConfig or None (the standard model)
    device : PCMModel, EmpiricalModel, preset name, device card path or None
        Device statistics for :meth:`program` and :meth:`drift` (either family, see
        :func:`aimc_device.io.resolve_device_model`); default the "rasch2023" preset
        (docs/model.md sec. 4). None: ideal devices, the programmed weights equal their targets and
        do not drift (only the periphery is non-ideal). Each weight is a differential pair,
        w~ = (g+ - g-) / g_max; ``cfg.pair_devices`` says which devices are sampled (see
        :mod:`aimc_device.crossbar.mapping`).
    bias : ndarray or torch.Tensor (out,) or None, digital bias beta (unit of the output)
    input_range : float or sequence (n_tiles,), alpha per tile (unit of the input)
    tile_sizes : list of int, optional; inputs per tile (default: near-equal parts of at most
        cfg.max_rows; a convolution passes whole channel groups)

    Attributes
    ----------
    tile_sizes : list of int, inputs per tile (near-equal parts of at most cfg.max_rows)
    w_target : torch.Tensor (out, in), normalised target weights w~ (column scale per tile)
    w_tiles : list of torch.Tensor (out, in_k), current normalised weights per tile (targets
        before :meth:`program`, programmed or drifted after)
    gamma : torch.Tensor (n_tiles, out), column scales (unit of the weights)
    alpha : torch.Tensor (n_tiles,), input range per tile
    comp : torch.Tensor (n_tiles, out), drift-compensation factors (1 until :meth:`drift`)
    t : float or None, time since programming of the current weights [s]
    mvm_generator : torch.Generator, the per-MVM stream (seeded by :meth:`program`)

    References
    ----------
    .. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023).
    """

    def __init__(self, weights, cfg: CrossbarConfig | None = None, device="rasch2023",
                 bias=None, input_range=1.0, tile_sizes=None):
        self.cfg = CrossbarConfig() if cfg is None else cfg
        if not isinstance(self.cfg, CrossbarConfig):
            raise TypeError(f"cfg: expected a CrossbarConfig, got {type(self.cfg).__name__}")
        self.device_model = resolve_device_model(device)
        W = _to_tensor(weights, "weights")
        if W.dim() != 2 or W.shape[0] == 0 or W.shape[1] == 0:
            raise ValueError(f"weights: expected a non-empty 2-d matrix (out, in), got shape "
                             f"{tuple(W.shape)}")
        self.weights = W
        self.shape = tuple(W.shape)
        if tile_sizes is None:
            self.tile_sizes = split_sizes(W.shape[1], self.cfg.max_rows)
        else:
            self.tile_sizes = [int(n) for n in tile_sizes]
            if sum(self.tile_sizes) != W.shape[1] or min(self.tile_sizes) < 1 \
                    or max(self.tile_sizes) > self.cfg.max_rows:
                raise ValueError(f"tile_sizes = {self.tile_sizes}: must add up to the "
                                 f"{W.shape[1]} inputs, each in [1, max_rows={self.cfg.max_rows}]")
        self.slices = tile_slices(self.tile_sizes)
        w_tiles, self.gamma = map_weights(W, self.tile_sizes,
                                          self.cfg.columnwise_scaling)  # docs/model.md sec. 1
        self.w_target = torch.cat(w_tiles, dim=1)
        self._g_target, self._sign = conductance_targets(self.w_target, self.cfg.g_max)
        # pairs whose other device is modelled (cfg.pair_devices; mapping module docstring)
        self._pair_partners = pair_partners(self.w_target, self.cfg.pair_devices)
        self._partners = self._pair_partners  # those of the current programming
        self.bias = None if bias is None else _to_tensor(bias, "bias", W.dtype, W.device)
        if self.bias is not None and self.bias.shape != (W.shape[0],):
            raise ValueError(f"bias: shape {tuple(self.bias.shape)}; expected ({W.shape[0]},)")
        self.alpha = torch.ones(len(self.tile_sizes), dtype=W.dtype, device=W.device)
        self.input_range = input_range
        self.comp = torch.ones_like(self.gamma)
        self.asymmetry = None
        self.zeta = None
        self.t = None
        self._state = None
        self._s_ref = None
        self._gen = torch_generator(None, W.device)
        self._device_gens: dict = {}
        self._set_weights(self.w_target.clone())

    # ------------------------------------------------------------------ weights and ranges
    @property
    def n_tiles(self) -> int:
        return len(self.tile_sizes)

    def _set_weights(self, w: torch.Tensor) -> None:
        self._w = w
        # contiguous per tile (one view when there is one tile), so that GEMMs need no copy
        self.w_tiles = [w if len(self.slices) == 1 else w[:, sl].contiguous()
                        for sl in self.slices]

    @property
    def input_range(self) -> torch.Tensor:
        """alpha per tile (unit of the input); set with a float or one value per tile."""
        return self.alpha

    @input_range.setter
    def input_range(self, value) -> None:
        a = torch.as_tensor(np.asarray(value, dtype=np.float64)).to(self.alpha.dtype)
        a = a.to(self.alpha.device).reshape(-1)
        if a.numel() == 1:
            a = a.expand(self.n_tiles).clone()
        if a.numel() != self.n_tiles:
            raise ValueError(f"input_range: give one value or {self.n_tiles} (one per tile), "
                             f"got {a.numel()}")
        if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
            raise ValueError(f"input_range = {a.tolist()}: must be finite and > 0")
        self.alpha = a

    def calibrate_input_range(self, x_samples, quantile: float = 1.0) -> torch.Tensor:
        """Set alpha per tile from sample inputs: the ``quantile`` of |x| on each tile's inputs.

        quantile = 1 is the abs-max (the paper's direct-mapping calibration, docs/model.md sec. 9).
        """
        x = self._input(x_samples)[0]
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile = {quantile}: must lie in (0, 1]")
        vals = []
        for sl in self.slices:
            ax = x[:, sl].abs()
            v = ax.max() if quantile == 1.0 else torch.quantile(ax.reshape(-1).double(), quantile)
            vals.append(float(v) if float(v) > 0 else 1.0)
        self.input_range = vals
        return self.alpha

    # ------------------------------------------------------------------ life cycle
    def _streams(self, rng, n: int) -> list[int]:
        """n independent sub-seeds from one rng (seed, Generator or None)."""
        key = int(derive_key(rng))
        return [int(s) for s in np.random.SeedSequence(key).generate_state(n, dtype=np.uint64)]

    def program(self, rng=None) -> "AnalogArray":
        """Program the devices: draw what the device model fixes at programming (PCM: programming
        error and drift exponents, docs/model.md Eqs. 7, 9; empirical: each device's rank) and set
        the weights to the conductances right after programming
        (:func:`aimc_device.pcm.programmed_conductance`).

        Also draws what the periphery fixes once (read asymmetry, S-ADC zeta), records the drift
        compensation reference s_ref from the programmed weights, and seeds the per-MVM stream.

        Parameters
        ----------
        rng : int, numpy.random.Generator or None
        """
        s_prog, s_asym, s_zeta, s_mvm, s_fault = self._streams(rng, 5)
        model = self.device_model
        if model is None:  # ideal devices: the targets exactly, no drift
            self._state = None
            self._set_weights(self.w_target.clone())
        else:
            partners, faults = self._pair_partners, None
            if model.has_faults:  # per physical device: either device of a pair can be stuck
                stuck, g_stuck = (torch.from_numpy(a).to(self._sign.device) for a in
                                  draw_faults(2 * self._sign.numel(), model, rng=s_fault))
                partners, *faults = pair_faults(self._sign, partners, stuck, g_stuck,
                                                self.cfg.pair_devices)
            g_dev = device_targets(self._g_target, partners)  # the modelled devices, flat
            if _numba_sampler(g_dev):
                self._state = program(g_dev.numpy(), model, rng=s_prog,
                                      faults=None if faults is None else
                                      [f.numpy() for f in faults])
                g_prog = torch.from_numpy(programmed_conductance(self._state, model,
                                                                 rng=[s_prog, 1]))
            else:  # the same faults as on CPU (drawn above), the torch sampler's noise
                gen = torch_generator(s_prog, g_dev.device)
                self._state = program_torch(g_dev, model, faults=faults, generator=gen)
                g_prog = programmed_conductance_torch(self._state, model, generator=gen)
            self._partners = partners
            self._set_weights(weights_from_conductance(g_prog, self._sign, self.cfg.g_max,
                                                       partners))  # Eq. 12
        dev, dt = self._w.device, self._w.dtype
        self.asymmetry = None
        if self.cfg.asymmetry > 0:
            gen = torch_generator(s_asym, dev)
            self.asymmetry = [draw_asymmetry(w.shape, self.cfg.asymmetry, gen, dt, dev)
                              for w in self.w_tiles]
        self.zeta = None
        if self.cfg.s_adc:
            gen = torch_generator(s_zeta, dev)
            self.zeta = [draw_zeta(self.shape[0], self.cfg.mu_zeta, self.cfg.sigma_zeta, gen,
                                   dt, dev) for _ in self.w_tiles]
        self._s_ref = self._readout()
        self.comp = torch.ones_like(self.gamma)
        self.t = 0.0
        self._gen = torch_generator(s_mvm, dev)
        self._device_gens = {}
        return self

    def drift(self, t: float, rng=None) -> "AnalogArray":
        """Move every device to t seconds after programming and compensate (docs/model.md, 4-5).

        Drift and 1/f read noise are drawn once here and held until the next call; the drift
        compensation factor per tile (or column) is s_ref / s_t.

        Parameters
        ----------
        t : float, time since the end of programming [s], >= 0
        rng : int, numpy.random.Generator or None
        """
        if self._s_ref is None:
            raise RuntimeError("AnalogArray.drift: call program(rng) first")
        t = float(t)
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"t = {t!r}: the time since programming must be finite and >= 0 [s]")
        model = self.device_model
        if model is None:
            self._set_weights(self.w_target.clone())
        else:
            if is_torch_state(self._state):  # the torch sampler's state
                g = read_torch(self._state, t, model,
                               generator=torch_generator(rng, self._state.g_target.device))
            else:
                g = torch.from_numpy(read(self._state, t, model, rng=rng)).to(self._w.device)
            self._set_weights(weights_from_conductance(g, self._sign, self.cfg.g_max,
                                                       self._partners))  # Eq. 12
        self.t = t
        if self.cfg.drift_compensation is None:
            self.comp = torch.ones_like(self.gamma)
        else:
            s_t = self._readout()
            self.comp = self._s_ref / torch.where(s_t > 0, s_t, torch.ones_like(s_t))
        return self

    def _readout(self) -> torch.Tensor:
        """Drift-compensation readout s per tile, broadcast to (n_tiles, out) (docs/model.md, 5).

        The known inputs are a fixed set of ``cfg.drift_comp_inputs`` random +-1 vectors (the
        same for every array and every call), read without per-MVM noise; s = sum over inputs
        and columns of |y| per tile ("global") or per column ("column"). Random full-scale
        inputs weigh the devices as typical inputs do, so that the compensated output scale is
        restored even though small conductances drift faster than large ones.
        """
        s = []
        # bfloat16 GEMM (float32 accumulation) under EngineOptions.aux_bfloat16: +-1 inputs are
        # exact, the rounding of weights and outputs is unbiased and averages out over the sum.
        low = current_options().bfloat16_products and self._w.dtype == torch.float32
        for w in self.w_tiles:
            dt = torch.bfloat16 if low else w.dtype
            x_ref = _reference_inputs(self.cfg.drift_comp_inputs, w.shape[1], dt, w.device)
            y = torch.nn.functional.linear(x_ref, w.to(dt)).to(w.dtype)
            s.append(y.abs().sum(dim=0))
        s = torch.stack(s)  # (n_tiles, out)
        if self.cfg.drift_compensation == "column":
            return s
        return s.sum(dim=1, keepdim=True).expand_as(s).clone()

    # ------------------------------------------------------------------ MVM
    def _input(self, x):
        is_numpy = not isinstance(x, torch.Tensor)
        t = _to_tensor(x, "x", self._w.dtype, self._w.device)
        if t.dim() not in (1, 2) or t.shape[-1] != self.shape[1]:
            raise ValueError(f"x: shape {tuple(t.shape)}; expected (batch, {self.shape[1]}) or "
                             f"({self.shape[1]},)")
        return (t if t.dim() == 2 else t[None]), is_numpy, t.dim() == 1

    @property
    def mvm_generator(self) -> torch.Generator:
        """The stream of per-MVM draws (short-term, output noise), seeded by :meth:`program`."""
        return self._gen

    def mvm_generator_on(self, device) -> torch.Generator:
        """The per-MVM stream for inputs on ``device``: :attr:`mvm_generator` on the array's
        own device; on another one, a generator of that device seeded like it by
        :meth:`program` (one per device, kept until the next programming), so that the same seed
        gives the same sequence of evaluations there too."""
        device = torch.device(device)
        if device == self._gen.device:
            return self._gen
        gen = self._device_gens.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self._gen.initial_seed())
            self._device_gens[device] = gen
        return gen

    @property
    def out_scale(self) -> torch.Tensor:
        """Digital factor per tile and column, gamma x drift compensation (n_tiles, out)."""
        return self.gamma * self.comp

    def mvm(self, x, rng=None):
        """The analog product y = W x (+ bias) with the full periphery (docs/model.md Eqs. 1, 2).

        Parameters
        ----------
        x : ndarray or torch.Tensor (batch, in) or (in,), inputs (unit of the layer's input)
        rng : int, torch.Generator or None
            Per-MVM draws; None continues the stream seeded by :meth:`program`.

        Returns
        -------
        Same kind as x (numpy in, numpy out), (batch, out) or (out,).
        """
        xt, is_numpy, squeeze = self._input(x)
        gen = self._gen if rng is None else torch_generator(rng, self._w.device)
        with torch.no_grad():
            y = analog_mvm(xt, self.w_tiles, self.cfg, self.alpha, self.out_scale,
                           generator=gen, asymmetry=self.asymmetry, zeta=self.zeta)
            if self.bias is not None:
                y.add_(self.bias)
        y = y[0] if squeeze else y
        return y.cpu().numpy() if is_numpy else y

    __call__ = mvm

    def __repr__(self) -> str:
        dev = "ideal" if self.device_model is None else self.device_model.name
        return (f"AnalogArray(shape={self.shape}, tiles={self.tile_sizes}, device={dev}, "
                f"t={self.t})")
