"""The analog weight of a layer: a crossbar array as a torch module.

An :class:`AnalogTile` holds one weight matrix (out x in) the way the hardware holds it
(docs/model.md sections 1 and 8): normalised weights ``w~`` in [-1, 1] (the conductances relative to
g_max, signed by the device of the differential pair), cut along the inputs into tiles of at most
``cfg.max_rows`` rows, with learned digital output scales (column-wise ``gamma`` and a per-tile
``kappa``) and a learned input range ``alpha`` per tile. All physics comes from
:mod:`aimc_device.crossbar` (periphery, mapping, programming, drift compensation) and
:mod:`aimc_device.pcm` (device noise); this module only wires it into torch.

Three ways to run the forward pass:

- training (``module.training``): the periphery of ``cfg`` with weight noise drawn from the
  device model's training noise (PCM: programming noise plus 20 s of 1/f read noise; empirical:
  the spread of a level's distribution at 20 s), scaled by ``noise_scale``, a new draw every
  call; gradients flow to the clean ``weight``, ``alpha``, ``gamma`` and ``kappa``;
- evaluation after :meth:`program` / :meth:`drift`: the programmed, drifted conductances of the
  crossbar array, with fresh short-term and output noise each call;
- evaluation before programming: the periphery with the clean weights.
"""
from __future__ import annotations

import contextlib
import operator

import numpy as np
import torch
from torch import nn

from ..crossbar import AnalogArray, CrossbarConfig
from ..crossbar.mapping import map_weights, split_sizes
from ..crossbar.mvm import analog_mvm
from ..crossbar.state import export_state, import_state
from ..io import resolve_device_model
from ..pcm.torch_ops import perturb_tensor

__all__ = ["AnalogTile", "grouped_operands", "require_tensor"]


def require_tensor(x, where: str, name: str = "input") -> None:
    """Raise a TypeError naming ``where`` unless ``x`` is a torch.Tensor (an isinstance test)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: the {name} must be a torch.Tensor, got {type(x).__name__}; "
                        "convert it with torch.as_tensor(x, dtype=torch.float32)")


class _NoisyWeight(torch.autograd.Function):
    """w~ plus a draw of the device model's training noise (:func:`perturb_tensor` in units of
    g_max, either family); the gradient goes to the clean w~ unchanged (docs/model.md section 8: the
    update goes to the clean weights)."""

    @staticmethod
    def forward(ctx, w, model, t, scale, rng):
        noisy = perturb_tensor(w.detach(), model, t=t, scale=scale, rng=rng, unit=model.g_max)
        return noisy.to(w.device, w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def _select_outputs(ops: dict, cols: slice) -> dict:
    """The operands of :meth:`AnalogTile.operands` restricted to the output columns ``cols``."""
    def rows(ts):
        return None if ts is None else [t[cols] for t in ts]

    zeta = ops["zeta"]
    return dict(ops, w_tiles=rows(ops["w_tiles"]), out_scale=ops["out_scale"][:, cols],
                asymmetry=rows(ops["asymmetry"]),
                zeta=rows(zeta) if isinstance(zeta, (list, tuple)) else
                (None if zeta is None else zeta[cols]))


def grouped_operands(tiles, device: torch.device, dtype: torch.dtype) -> dict | None:
    """The operands of the tiles of a grouped convolution's groups (one :class:`AnalogTile`
    per group, equal shapes) as :func:`~aimc_device.crossbar.analog_conv` takes them with
    ``groups=len(tiles)``: crossbar tile k of every group stacked along the outputs, the input
    ranges (n_tiles, groups), the digital factors (n_tiles, out); the per-MVM draws from the
    first group's generator; in training, the weight noise of every group in one draw from the
    first group's stream (docs/model.md sec. 8: one draw per mini-batch). None when a group's
    programmed array has read asymmetry (which needs the unfolded patches).
    """
    first = tiles[0]
    held = None
    if not (first.training or torch.is_grad_enabled()) and all(t._array is not None
                                                             for t in tiles):
        # programmed, evaluating without a graph: the joint operands are kept while every
        # group's array, its state and its input ranges are the same (as each tile keeps its
        # own copy)
        alphas = [t.alpha for t in tiles]
        held = ((device, dtype), [a._version for a in alphas], alphas + [
            v for t in tiles for v in (t._array, t._array.w_tiles, t._array.comp,
                                       t._array.asymmetry, t._array.zeta)])
        kept = getattr(first, "_grouped_copy", None)
        if kept is not None and kept[:2] == held[:2] and all(map(operator.is_, kept[2],
                                                                 held[2])):
            return dict(kept[3], generator=first._array.mvm_generator_on(device))
    ops = [t.operands(device, dtype, noisy_weight=w)
           for t, w in zip(tiles, _joint_noisy_weights(tiles, dtype))]
    if any(o["asymmetry"] is not None for o in ops):
        return None
    n_tiles = len(ops[0]["w_tiles"])
    zeta = None
    if any(o["zeta"] is not None for o in ops):  # S-shaped ADC gains, per tile and column
        def gains(o, k):
            z = o["zeta"]
            return z[k] if z is not None else torch.full(
                (o["w_tiles"][k].shape[0],), tiles[0].cfg.mu_zeta, dtype=dtype, device=device)
        zeta = [torch.cat([gains(o, k) for o in ops]) for k in range(n_tiles)]
    joint = dict(w_tiles=[torch.cat([o["w_tiles"][k] for o in ops]) for k in range(n_tiles)],
                 alpha=torch.stack([o["alpha"] for o in ops], dim=1),
                 out_scale=torch.cat([o["out_scale"] for o in ops], dim=1),
                 generator=ops[0]["generator"], zeta=zeta)
    if held is not None:
        first._grouped_copy = (*held, joint)
    return joint


def _joint_noisy_weights(tiles, dtype: torch.dtype) -> list:
    """Each tile's w~ plus its training noise, drawn for all tiles at once from the first
    tile's stream (tiles of one layer's groups: equal shapes and noise settings), the gradient
    to each tile's clean weight; [None, ...] where each tile draws its own (not training, no
    noise, a held draw, or settings that differ)."""
    first = tiles[0]
    setting = (first.device_model, first.training_noise_time, first.noise_scale)
    if not first.training or first.device_model is None or first.noise_scale == 0.0 or any(
            t._held_draw is not None or (t.device_model, t.training_noise_time, t.noise_scale)
            != setting or t.weight.shape != first.weight.shape for t in tiles):
        return [None] * len(tiles)
    w = torch.cat([t.weight for t in tiles]).to(dtype)
    noisy = _NoisyWeight.apply(w, *setting, first._np_rng)
    return list(noisy.split(first.out_features))


class AnalogTile(nn.Module):
    """A weight matrix on analog crossbar tiles, trainable hardware-aware.

    Parameters
    ----------
    in_features, out_features : int
    cfg : CrossbarConfig
    device : PCMModel, EmpiricalModel, preset name, device card path or None
        Device statistics (either family, :func:`aimc_device.io.resolve_device_model`) for the
        training noise and for programming; None: no device noise (programming then gives the
        exact weights, with no drift).
    weight : torch.Tensor, optional
        Floating-point weights (out, in) in the layer's units; mapped column-wise per tile.
    rng : numpy.random.SeedSequence, int or None
        Seeds the tile's own generators (weight noise and per-MVM noise).
    tile_sizes : list of int, optional
        Inputs per crossbar tile; default near-equal parts of at most ``cfg.max_rows``.

    Attributes
    ----------
    weight : Parameter (out, in), normalised weights w~ in [-1, 1], dimensionless
    gamma : Parameter (n_tiles, out), column-wise output scales, units of the layer's weights
    kappa : Parameter (n_tiles,), per-tile output scale, initialised to kappa0 = cfg.out_bound
        (1 when the ADC is unbounded); the digital factor of column i of tile k is
        gamma_ki * kappa_k / kappa0 (see the parametrisation below)
    alpha : Parameter (n_tiles,), input range per tile, units of the layer's inputs
    noise_scale : float, scale of the training weight noise (ramped by the HWA callback)
    training_noise_time : float, read-noise time of the training noise [s]; 20 s (docs/model.md 8)

    Notes
    -----
    Output scales. The hardware applies one digital factor per column and tile,
    s_ki = gamma_ki kappa_k / kappa0, after the ADC (Eq. 1). It is learned as two parameters,
    as in the HWA training recipe of Rasch et al. (2023) (docs/model.md sec. 8): the column scales
    gamma (set by the mapping, gamma_ki = max_j |w_ij|) and a per-tile scale kappa, written
    relative to the ADC bound it starts at (kappa / kappa0 = 1 after mapping). The
    parametrisation is redundant on purpose: kappa adds one common-mode direction per tile to
    the per-column scales, so that plain SGD moves a tile's overall output scale with its own
    step size; only the product s reaches the forward pass, the programmed array and the
    checkpoints' effective weights. Where the loss does not depend on a tile's output scale
    (a normalisation layer right after it, e.g. BatchNorm), the gradients of kappa and of gamma
    vanish (up to its epsilon) and both stay at their initial values; that is expected.
    """

    def __init__(self, in_features: int, out_features: int, cfg: CrossbarConfig,
                 device=None, weight: torch.Tensor | None = None,
                 rng=None, tile_sizes=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.cfg = cfg
        self.device_model = resolve_device_model(device)
        self.tile_sizes = list(split_sizes(self.in_features, cfg.max_rows)
                               if tile_sizes is None else tile_sizes)
        n_tiles = len(self.tile_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.gamma = nn.Parameter(torch.ones(n_tiles, self.out_features))
        # kappa starts at the ADC bound b_out (docs/model.md sec. 8); with no ADC bound, at 1.
        self._kappa0 = float(cfg.out_bound) if np.isfinite(cfg.out_bound) else 1.0
        self.kappa = nn.Parameter(torch.full((n_tiles,), self._kappa0))
        self.alpha = nn.Parameter(torch.ones(n_tiles))
        self.noise_scale = 1.0
        self.training_noise_time = 20.0
        self._held_draw = None  # [noisy weight or None] inside one_draw()
        # The programmed crossbar array; its state goes into buffers named prog_<key> so that
        # state_dict carries it (see _save_state / _load_from_state_dict).
        self._array: AnalogArray | None = None
        self._operand_copy = None  # ((device, dtype), source tensors, operands) of the array
        self._grouped_copy = None  # the joint operands of a grouped layer (grouped_operands)
        self._prog_keys: list[str] = []
        ss = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
        self._np_rng = np.random.default_rng(ss.spawn(1)[0])
        self._torch_gen = torch.Generator().manual_seed(int(ss.generate_state(1)[0] & 0x7FFFFFFF))
        self._cuda_gens: dict = {}
        if weight is not None:
            self.set_weight(weight)
        else:
            nn.init.uniform_(self.weight, -1.0, 1.0)

    def reseed(self, seed_sequence: np.random.SeedSequence) -> None:
        """Restart the tile's own streams (training weight noise, per-MVM noise).

        The programmed array keeps its own stream (seeded by :meth:`program`).
        """
        self._np_rng = np.random.default_rng(seed_sequence)
        self._torch_gen.manual_seed(int(seed_sequence.generate_state(1, dtype=np.uint64)[0] >> 1))
        self._cuda_gens = {}  # derived from _np_rng on first use

    # ---------------------------------------------------------------------------- weights
    @property
    def n_tiles(self) -> int:
        return len(self.tile_sizes)

    def _digital_scale(self) -> torch.Tensor:
        """Digital factor per tile and column, (n_tiles, out)."""
        return self.gamma * (self.kappa / self._kappa0).unsqueeze(1)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Map floating-point weights (out, in) onto the tile: w~ and column-wise gamma."""
        weight = torch.as_tensor(weight, dtype=self.weight.dtype, device=self.weight.device)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        w_tiles, gamma = map_weights(weight, self.tile_sizes, self.cfg.columnwise_scaling)
        self.weight.copy_(torch.cat(list(w_tiles), dim=1))
        self.gamma.copy_(gamma)
        self.kappa.fill_(self._kappa0)
        self.forget_programming()

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The floating-point weight (out, in) the tile represents, clean (no device noise)."""
        parts = torch.split(self.weight, self.tile_sizes, dim=1)
        scale = self._digital_scale()
        return torch.cat([p * scale[k].unsqueeze(1) for k, p in enumerate(parts)], dim=1)

    @torch.no_grad()
    def clip_weights(self) -> None:
        """Clip w~ to [-1, 1] (after every optimiser step, docs/model.md section 8)."""
        self.weight.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def remap(self) -> None:
        """Remapping: rescale w~ so each column of each tile spans [-1, 1] (with
        ``cfg.columnwise_scaling`` False, so that each tile does)."""
        parts = torch.split(self.weight, self.tile_sizes, dim=1)
        for k, p in enumerate(parts):
            m = p.abs().amax(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
            if not self.cfg.columnwise_scaling:
                m = m.amax().expand_as(m)
            p.div_(m.unsqueeze(1))
            self.gamma[k].mul_(m)

    # --------------------------------------------------------------------------- noise
    def _generator(self, device: torch.device):
        if device.type == "cpu":
            return self._torch_gen
        gen = self._cuda_gens.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(int(self._np_rng.integers(2**62)))
            self._cuda_gens[device] = gen
        return gen

    def _noisy_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """w~ in ``dtype`` (None: the parameter's) plus device noise (docs/model.md section 8);
        the noise carries no gradient. Inside :meth:`one_draw`, the first call draws and the
        later ones reuse that draw."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        if self.device_model is None or self.noise_scale == 0.0:
            return w
        held = self._held_draw
        if held is not None and held[0] is not None:
            return held[0]
        noisy = _NoisyWeight.apply(w, self.device_model, self.training_noise_time,
                                   self.noise_scale, self._np_rng)
        if held is not None:
            held[0] = noisy
        return noisy

    @contextlib.contextmanager
    def one_draw(self):
        """Within this context every training forward of the tile uses one draw of the weight
        noise (docs/model.md sec. 8: one draw per mini-batch); a recurrent layer calls its tile once
        per time step, and wraps the sequence in this."""
        outer = self._held_draw
        if outer is not None:  # nested: the outer context's draw
            yield
            return
        self._held_draw = [None]
        try:
            yield
        finally:
            self._held_draw = None

    # ------------------------------------------------------------------------- forward
    def input_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """abs-max of the inputs (..., in) each tile sees, (n_tiles,)."""
        rows = x.detach().reshape(-1, self.in_features)
        return torch.stack([p.abs().amax() for p in torch.split(rows, self.tile_sizes, dim=1)])

    def operands(self, device: torch.device, dtype: torch.dtype, noisy_weight=None) -> dict:
        """What the crossbar's MVM needs for the current mode (see the module docstring).

        ``dtype``: that of the weights (the parameters are cast to it, with their gradient).
        ``noisy_weight``: in training, the tile's w~ with its weight noise already drawn (by
        :func:`grouped_operands` for all groups at once); None: drawn here.
        Returns a dict with ``w_tiles`` (list of (out, in_k) normalised weights), ``out_scale``
        ((n_tiles, out) digital factor), ``alpha``, ``generator`` (per-MVM draws),
        ``asymmetry`` and ``zeta`` (programmed read asymmetry and S-ADC gains, or None).
        """
        ops = dict(alpha=self.alpha, generator=self._generator(device), asymmetry=None,
                   zeta=None)
        if self.training:
            w = self._noisy_weight(dtype) if noisy_weight is None else noisy_weight
        elif self._array is not None:
            ops.update(self._programmed_operands(device, dtype))
            return ops
        else:
            w = self.weight.to(dtype)
        ops.update(w_tiles=list(torch.split(w, self.tile_sizes, dim=1)),
                   out_scale=self._digital_scale())
        return ops

    def _programmed_operands(self, device: torch.device, dtype: torch.dtype) -> dict:
        """The programmed array's weights, digital scales, asymmetry and S-ADC gains on
        ``device`` in ``dtype``, and its per-MVM stream there (seeded at programming).

        The array lives on the CPU (its devices drawn by the Numba kernels, so that a seed gives
        the same programmed weights wherever the layer runs); a copy on another device or in
        another dtype is made once per programmed or drifted state and kept, not every call.
        """
        arr = self._array
        source = (arr.w_tiles, arr.comp, arr.asymmetry, arr.zeta)
        held = self._operand_copy
        if held is None or held[0] != (device, dtype) or any(
                a is not b for a, b in zip(held[1], source)):
            def moved(ts):
                return None if ts is None else [t.to(device, dtype) for t in ts]

            ops = dict(w_tiles=moved(arr.w_tiles), out_scale=arr.out_scale.to(device, dtype),
                       asymmetry=moved(arr.asymmetry), zeta=moved(arr.zeta))
            held = self._operand_copy = ((device, dtype), source, ops)
        return dict(held[2], generator=arr.mvm_generator_on(device))

    def forward(self, x: torch.Tensor, outputs: slice | None = None) -> torch.Tensor:
        """y = analog MVM of x (..., in) -> (..., out), without bias.

        ``outputs``: read only these columns of the crossbar (e.g. the query block of an
        attention in-projection), (..., len(outputs)); the other columns are not computed.
        """
        require_tensor(x, type(self).__name__)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input: last dimension must be in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        ops = self.operands(x.device, x.dtype)
        if outputs is not None:
            ops = _select_outputs(ops, outputs)
        w_tiles = ops.pop("w_tiles")
        y = analog_mvm(x.reshape(-1, self.in_features), w_tiles, self.cfg,
                       ops.pop("alpha"), ops.pop("out_scale"), **ops)
        return y.reshape(*lead, w_tiles[0].shape[0])

    # --------------------------------------------------------------- programming and drift
    @torch.no_grad()
    def program(self, rng=None) -> None:
        """Program the current weights onto a crossbar array (draws programming noise; with no
        device model the array holds the weights exactly and does not drift, as
        :class:`aimc_device.crossbar.AnalogArray` with ``device=None``)."""
        self.forget_programming()
        self._array = self._new_array().program(rng=rng)
        self._save_state()

    @torch.no_grad()
    def drift(self, t: float, rng=None) -> None:
        """Move the programmed devices to t seconds after programming (with compensation)."""
        if self._array is None:
            raise RuntimeError("drift(): program the layer first (nn.program(model, rng))")
        self._array.drift(t, rng=rng)
        self._save_state()

    def forget_programming(self) -> None:
        """Drop the programmed state (the next evaluation uses the clean weights again)."""
        self._array = None
        self._operand_copy = self._grouped_copy = None
        for key in self._prog_keys:
            delattr(self, f"prog_{key}")
        self._prog_keys = []

    @property
    def is_programmed(self) -> bool:
        return self._array is not None

    def _new_array(self) -> AnalogArray:
        w = self.effective_weight().cpu()
        if w.dtype not in (torch.float32, torch.float64):  # a model cast to 16 bits
            w = w.float()
        arr = AnalogArray(w, self.cfg, device=self.device_model, tile_sizes=self.tile_sizes)
        arr.input_range = self.alpha.detach().cpu().to(w.dtype)
        return arr

    def _save_state(self) -> None:
        for key, value in export_state(self._array).items():
            name = f"prog_{key}"
            if key not in self._prog_keys:
                self._prog_keys.append(key)
            if name in self._buffers:
                self._buffers[name] = torch.as_tensor(value)
            else:
                self.register_buffer(name, torch.as_tensor(value))

    def _apply(self, fn, recurse=True):
        # A cast of the model (half(), to(torch.bfloat16), double()) leaves the programmed state
        # in its own precision: it records the devices as programmed, it is not a parameter.
        # Moves between devices still apply.
        kept = {f"prog_{k}": self._buffers.pop(f"prog_{k}") for k in self._prog_keys}
        self._operand_copy = self._grouped_copy = None  # made again on the next call
        try:
            out = super()._apply(fn, recurse)
        finally:
            device = next(self.parameters()).device
            for name, buf in kept.items():
                self._buffers[name] = buf.to(device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The programmed buffers exist only once programmed: create them from the saved ones.
        keys = [k[len(prefix) + 5:] for k in state_dict
                if k.startswith(prefix + "prog_") and "." not in k[len(prefix):]]
        if self._array is not None and not keys:
            self.forget_programming()
        for key in keys:
            name = f"prog_{key}"
            if name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
                self._prog_keys.append(key)
            else:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if keys:
            self._array = import_state(self._new_array(),
                                       {k: self._buffers[f"prog_{k}"].cpu() for k in keys})

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tiles={self.tile_sizes}, "
                f"programmed={self.is_programmed}")
