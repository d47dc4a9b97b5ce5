"""Analog versions of torch layers: Linear, Conv1d/2d (grouped and depthwise too),
ConvTranspose1d/2d, LSTM, GRU and MultiheadAttention.

Each keeps its weight matrices on :class:`~aimc_device.nn.tile.AnalogTile` modules (crossbar
tiles with the periphery of a :class:`~aimc_device.crossbar.CrossbarConfig` and the noise of a
device model of either family) and its bias in digital floating point. They are ordinary torch
modules: state_dict, ``.to()``, ``no_grad`` inference and DistributedDataParallel work.
Each class has ``from_digital(module, cfg, device, rng)`` that maps a trained floating-point
layer onto the tiles.

They stand in for the torch layers in model code: they carry the attributes model code reads
(``weight``: the effective floating-point weight in the torch layer's shape, read-only;
``bias``; ``in_features``/``out_features``; ``in_channels``/``out_channels``/``kernel_size``/
``stride``/``padding``/``dilation``/``groups``/``padding_mode``). ``torch.compile`` leaves
their forward pass out of the compiled graph (it runs eagerly, the rest of the model
compiled), and under ``torch.autocast`` they compute in their own floating-point dtype and
return the autocast dtype.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import types
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..crossbar import CrossbarConfig
from ..crossbar.mvm import analog_conv, conv_channel_split
from .tile import AnalogTile, grouped_operands, require_tensor

__all__ = ["AnalogLinear", "AnalogConv1d", "AnalogConv2d", "AnalogConvTranspose1d",
           "AnalogConvTranspose2d", "AnalogLSTM", "AnalogGRU", "AnalogMultiheadAttention",
           "AnalogLayer", "analog_forward"]


def _cast_floats(obj, dtype: torch.dtype):
    """Floating-point tensors in ``obj`` (a tensor, or tuples/lists of them) cast to dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if type(obj) in (tuple, list):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    return obj


_HALF = (torch.float16, torch.bfloat16)


def analog_forward(forward):
    """Decorator of an analog layer's ``forward``: kept out of ``torch.compile`` graphs, and
    autocast-aware.

    - ``torch.compile``: Dynamo does not trace it (``torch.compiler.disable``, applied from
      the first time the forward is looked up with Dynamo loaded, see :class:`_OutOfGraphs`);
      the analog layer runs eagerly between the compiled parts of the model, and its own state
      (noise scale, programmed arrays, generators) places no guards, so nothing recompiles per
      step.
    - ``torch.autocast``: the analog MVM runs with autocast off, on inputs cast to the layer's
      compute dtype (float32 or float64, the precisions the crossbar engine computes in), and
      the floating-point outputs come back in the autocast dtype (bfloat16 or float16), as
      those of the torch layer would. Gradients pass through the casts.
    - a model cast as a whole to 16 bits (``.half()``, ``.to(torch.bfloat16)``): the same, the
      analog MVM in float32 and the outputs in the input's dtype.
    """
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return forward(self, *args, **kwargs)
        kind = first.device.type
        own = self.parameter_dtype()
        if torch.is_autocast_enabled(kind):
            out_dtype = torch.get_autocast_dtype(kind)
        elif first.dtype in _HALF or own in _HALF:
            out_dtype = first.dtype
        else:
            return forward(self, *args, **kwargs)
        dtype = self.compute_dtype()
        with torch.autocast(kind, enabled=False):
            out = forward(self, *_cast_floats(args, dtype),
                          **{k: _cast_floats(v, dtype) for k, v in kwargs.items()})
        return _cast_floats(out, out_dtype)

    return _OutOfGraphs(run)


class _OutOfGraphs:
    """A method kept out of ``torch.compile`` graphs: the function itself while Dynamo is not
    loaded (no graph can be traced then, and importing Dynamo takes about as long as importing
    torch), else its ``torch.compiler.disable`` wrapper, made once. ``torch.compile`` loads
    Dynamo before it traces anything, so every lookup of the method in a traced model gets the
    wrapper."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn, self.disabled = fn, None

    def __get__(self, obj, objtype=None):
        fn = self.fn
        if "torch._dynamo" in sys.modules:
            if self.disabled is None:
                self.disabled = torch.compiler.disable(fn)
            fn = self.disabled
        return fn if obj is None else types.MethodType(fn, obj)


class AnalogLayer(nn.Module):
    """Base of the analog layers: iterate their tiles with :meth:`analog_tiles`."""

    def analog_tiles(self):
        return [m for m in self.modules() if isinstance(m, AnalogTile)]

    def parameter_dtype(self) -> torch.dtype:
        """The dtype of the layer's parameters (a module cast casts them all)."""
        own = next((p for p in self._parameters.values() if p is not None), None)
        return (own if own is not None else next(self.parameters())).dtype

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the analog computation: that of the layer's parameters, or float32 for
        a layer cast to a 16-bit type."""
        dtype = self.parameter_dtype()
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    @contextlib.contextmanager
    def one_draw(self):
        """Every tile of the layer uses one draw of its training weight noise within this
        context (one draw per call of a layer that reads a tile several times)."""
        with contextlib.ExitStack() as draws:
            for tile in self.analog_tiles():
                draws.enter_context(tile.one_draw())
            yield


def _spawn(rng, n: int) -> list[np.random.SeedSequence]:
    """n independent seed sequences from a seed, a SeedSequence or None."""
    ss = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
    return ss.spawn(n)


def _bias_param(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone())


class AnalogLinear(AnalogLayer):
    """y = analog(W x) + b for x (..., in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 cfg: CrossbarConfig | None = None, device=None, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tile = AnalogTile(in_features, out_features, cfg or CrossbarConfig(), device,
                               rng=rng)
        bound = 1.0 / math.sqrt(in_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias \
            else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, cfg, device=None,
                    rng=None) -> "AnalogLinear":
        """The analog layer of the linear map y = x W^T + b, W of shape (out, in)."""
        weight = weight.detach()
        new = cls(weight.shape[1], weight.shape[0], bias is not None, cfg, device, rng)
        new.tile.set_weight(weight)
        new.bias = _bias_param(bias)
        return new.to(weight.device, weight.dtype)

    @classmethod
    def from_digital(cls, module: nn.Linear, cfg, device=None, rng=None) -> "AnalogLinear":
        return cls.from_weight(module.weight, module.bias, cfg, device, rng)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (out, in) the tiles represent, clean; read-only."""
        return self.tile.effective_weight()

    @analog_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tensor(x, type(self).__name__)
        y = self.tile(x)
        if self.bias is None:
            return y
        # Without a graph the tile's fresh output takes the bias in place (no second buffer of
        # the output's size to map and fill)
        return y.add_(self.bias) if not torch.is_grad_enabled() else y + self.bias


class _AnalogConvNd(AnalogLayer):
    """Convolution as an analog MVM of its image patches.

    groups = 1: one :class:`AnalogTile` whose crossbar tiles hold whole input channels. groups
    > 1 (grouped and depthwise convolutions): each group on its own tiles, held by one such
    layer per group in ``group_layers`` (its programming, drift and input ranges its own), and
    the digital bias here; the forward pass reads all groups in one grouped analog convolution
    (:func:`~aimc_device.crossbar.analog_conv` with ``groups``), or group by group where the
    configuration needs the unfolded patches (per-vector noise or bound management, read
    asymmetry). A padding mode other than zeros, and padding="same", pad the input digitally
    before the convolution.
    """

    _dims = 2

    def __init__(self, conv, cfg, device=None, rng=None):
        super().__init__()
        name = type(conv).__name__
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = conv.padding, tuple(conv.dilation)
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        if len(self.kernel_size) != self._dims:
            raise ValueError(f"{name}: a {len(self.kernel_size)}-d kernel for a {self._dims}-d "
                             "analog convolution")
        weight = conv.weight.detach()  # the effective weight, also of a parametrized module
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            pads = [int(p) for p in conv._reversed_padding_repeated_twice]
            self._pre_pad = pads if any(pads) else None
            self._pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            self._conv_padding = (0,) * self._dims
        else:
            self._pre_pad, self._pad_mode = None, "constant"
            self._conv_padding = tuple(conv.padding)
        if self.groups == 1:
            self._build_tile(weight, cfg, device, rng)
            self.bias = _bias_param(conv.bias)
            return
        i_g, o_g = self.in_channels // self.groups, self.out_channels // self.groups
        seqs = _spawn(rng, self.groups)
        self.group_layers = nn.ModuleList(
            type(self)(SimpleNamespace(
                in_channels=i_g, out_channels=o_g, kernel_size=self.kernel_size,
                stride=self.stride, padding=self._conv_padding, dilation=self.dilation,
                groups=1, padding_mode="zeros", weight=weight[g * o_g:(g + 1) * o_g], bias=None),
                cfg, device, seqs[g])
            for g in range(self.groups))
        self.bias = _bias_param(conv.bias)

    def _build_tile(self, weight, cfg, device, rng):
        k_numel = math.prod(self.kernel_size)
        fan_in = self.in_channels * k_numel
        # Tiles hold whole input channels, so each tile is itself a convolution (analog_conv).
        self.channel_sizes = conv_channel_split(self.in_channels, k_numel, cfg.max_rows)
        self.tile = AnalogTile(fan_in, self.out_channels, cfg, device, rng=rng,
                               tile_sizes=[c * k_numel for c in self.channel_sizes])
        self.tile.set_weight(weight.reshape(self.out_channels, fan_in))
        # analog_conv serves every mode but per-vector noise/bound management and read asymmetry
        self._conv_path = cfg.noise_management == "none" and cfg.bound_management == "none"

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        return cls(module, cfg, device, rng).to(module.weight.device, module.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (out, in / groups, *kernel_size), clean; read-only."""
        if self.groups > 1:
            return torch.cat([g.weight for g in self.group_layers])
        return self.tile.effective_weight().reshape(self.out_channels, self.in_channels,
                                                    *self.kernel_size)

    def input_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """abs-max of the inputs each tile sees, (n_tiles,): the max over its channel group
        (groups = 1)."""
        if x.dim() == self._dims + 1:
            x = x.unsqueeze(0)
        return torch.stack([p.abs().amax() for p in torch.split(x.detach(),
                                                                 self.channel_sizes, dim=1)])

    def tile_input_absmax(self, x: torch.Tensor) -> list:
        """[(tile, abs-max of the inputs of each of its crossbar tiles)] for the layer's
        :class:`AnalogTile` modules, from the layer's input x."""
        if self.groups == 1:
            return [(self.tile, self.input_absmax(x))]
        parts = torch.split(x, self.in_channels // self.groups, dim=-self._dims - 1)
        return [(layer.tile, layer.input_absmax(p)) for layer, p in zip(self.group_layers, parts)]

    @analog_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tensor(x, type(self).__name__)
        unbatched = x.dim() == self._dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad, mode=self._pad_mode)
        y = self._convolve(x) if self.groups == 1 else self._convolve_groups(x)
        return y.squeeze(0) if unbatched else y

    def _convolve_groups(self, x: torch.Tensor) -> torch.Tensor:
        """The analog convolution of a batch, groups > 1, zero padding, bias included."""
        first = self.group_layers[0]
        ops = grouped_operands([g.tile for g in self.group_layers], x.device, x.dtype) \
            if first._conv_path else None
        if ops is not None:
            return analog_conv(x, ops["w_tiles"], first.tile.cfg, ops["alpha"],
                               ops["out_scale"], channel_sizes=first.channel_sizes,
                               kernel_size=self.kernel_size, stride=self.stride,
                               padding=self._conv_padding, dilation=self.dilation,
                               groups=self.groups, generator=ops["generator"],
                               zeta=ops["zeta"], bias=self.bias)
        parts = torch.split(x, self.in_channels // self.groups, dim=1)
        y = torch.cat([layer(p) for layer, p in zip(self.group_layers, parts)], dim=1)
        return y if self.bias is None else y + self.bias.reshape(-1, *([1] * self._dims))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The analog convolution of a batch (groups = 1, zero padding), bias included."""
        tile = self.tile
        ops = tile.operands(x.device, x.dtype) if self._conv_path else None
        if ops is not None and ops["asymmetry"] is None:
            # Every term as a convolution: no patch matrix, and the backward of a convolution.
            return analog_conv(x, ops["w_tiles"], tile.cfg, ops["alpha"], ops["out_scale"],
                               channel_sizes=self.channel_sizes, kernel_size=self.kernel_size,
                               stride=self.stride, padding=self._conv_padding,
                               dilation=self.dilation, generator=ops["generator"],
                               zeta=ops["zeta"], bias=self.bias)
        if self._dims == 1:  # treat (B, C, L) as (B, C, 1, L)
            x4 = x.unsqueeze(2)
            ks, st, pd, dl = ((1, self.kernel_size[0]), (1, self.stride[0]),
                              (0, self._conv_padding[0]), (1, self.dilation[0]))
        else:
            x4, ks, st, pd, dl = x, self.kernel_size, self.stride, self._conv_padding, \
                self.dilation
        b, _, h, w = x4.shape
        cols = F.unfold(x4, ks, dilation=dl, padding=pd, stride=st)  # (B, C*k, L)
        h_out = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
        w_out = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
        y = self.tile(cols.transpose(1, 2))  # (B, L, out)
        if self.bias is not None:
            y = y + self.bias
        y = y.transpose(1, 2).reshape(b, self.out_channels, h_out, w_out)
        return y.squeeze(2) if self._dims == 1 else y


class AnalogConv2d(_AnalogConvNd):
    """Analog nn.Conv2d (any groups, padding and padding_mode)."""

    _dims = 2


class AnalogConv1d(_AnalogConvNd):
    """Analog nn.Conv1d (any groups, padding and padding_mode)."""

    _dims = 1


class _AnalogConvTransposeNd(AnalogLayer):
    """Transposed convolution as the analog convolution it equals: the input with stride - 1
    zeros inserted between its samples and dilation * (kernel - 1) - padding zeros at its
    edges (plus output_padding at the end), convolved at stride 1 with the kernel flipped and
    its in/out axes swapped (per group). Each output is then one crossbar read, as for a
    convolution; the inner :class:`AnalogConv1d`/:class:`AnalogConv2d` is ``conv``.
    """

    _dims = 2
    _conv_cls = AnalogConv2d

    def __init__(self, convt, cfg, device=None, rng=None):
        super().__init__()
        if convt.padding_mode != "zeros":
            raise ValueError(f"{type(convt).__name__}: padding_mode={convt.padding_mode!r}; "
                             "transposed convolutions take zero padding only")
        d = self._dims
        self.in_channels, self.out_channels = convt.in_channels, convt.out_channels
        self.kernel_size, self.stride = tuple(convt.kernel_size), tuple(convt.stride)
        self.padding, self.dilation = tuple(convt.padding), tuple(convt.dilation)
        self.output_padding, self.groups = tuple(convt.output_padding), convt.groups
        self.padding_mode = "zeros"
        g, i_g = self.groups, self.in_channels // self.groups
        o_g = self.out_channels // g
        w = convt.weight.detach()  # (in, out / groups, *k)
        w = w.reshape(g, i_g, o_g, *self.kernel_size).transpose(1, 2)
        w = w.reshape(self.out_channels, i_g, *self.kernel_size).flip(tuple(range(2, 2 + d)))
        self.conv = self._conv_cls(SimpleNamespace(
            in_channels=self.in_channels, out_channels=self.out_channels,
            kernel_size=self.kernel_size, stride=(1,) * d, padding=(0,) * d,
            dilation=self.dilation, groups=g, padding_mode="zeros", weight=w, bias=convt.bias),
            cfg, device, rng)

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        return cls(module, cfg, device, rng).to(module.weight.device, module.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (in, out / groups, *kernel_size), clean; read-only."""
        g, i_g = self.groups, self.in_channels // self.groups
        o_g = self.out_channels // g
        w = self.conv.weight.flip(tuple(range(2, 2 + self._dims)))  # (out, i_g, *k)
        w = w.reshape(g, o_g, i_g, *self.kernel_size).transpose(1, 2)
        return w.reshape(self.in_channels, o_g, *self.kernel_size)

    @property
    def bias(self):
        return self.conv.bias

    @analog_forward
    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        require_tensor(x, type(self).__name__)
        unbatched = x.dim() == self._dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        extra = self.output_padding if output_size is None else \
            nn.modules.conv._ConvTransposeNd._output_padding(
                self, x, output_size, self.stride, self.padding, self.kernel_size, self._dims,
                self.dilation)
        if any(s > 1 for s in self.stride):
            spread = x.new_zeros(*x.shape[:2], *[(n - 1) * s + 1 for n, s in
                                                 zip(x.shape[2:], self.stride)])
            spread[(..., *[slice(None, None, s) for s in self.stride])] = x
            x = spread
        pads = []
        for i in reversed(range(self._dims)):  # F.pad: last dimension first; < 0 crops
            edge = self.dilation[i] * (self.kernel_size[i] - 1) - self.padding[i]
            pads += [edge, edge + extra[i]]
        y = self.conv(F.pad(x, pads))
        return y.squeeze(0) if unbatched else y


class AnalogConvTranspose2d(_AnalogConvTransposeNd):
    """Analog nn.ConvTranspose2d (any groups, stride, padding, output_padding, dilation)."""

    _dims = 2
    _conv_cls = AnalogConv2d


class AnalogConvTranspose1d(_AnalogConvTransposeNd):
    """Analog nn.ConvTranspose1d (any groups, stride, padding, output_padding, dilation)."""

    _dims = 1
    _conv_cls = AnalogConv1d


_RNN_WEIGHT = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?")


class _AnalogRNN(AnalogLayer):
    """Shared driver of the analog recurrent layers: layers, directions, batch_first, dropout,
    unbatched inputs, and one weight-noise draw per call (docs/model.md sec. 8: one draw per
    mini-batch, while the tiles are read once per time step).

    Model code reads the torch layer's weights by name: ``weight_ih_l{k}``, ``weight_hh_l{k}``
    (the effective weights the tiles represent, clean, in torch's shape, dtype and device;
    read-only), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (``_reverse`` for the second direction),
    ``all_weights`` and ``_flat_weights_names``.
    """

    _n_state = 1  # tensors in the recurrent state: (h,) or (h, c)

    def _settings(self, rnn: nn.Module) -> int:
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.batch_first = rnn.num_layers, rnn.batch_first
        self.dropout, self.bidirectional = rnn.dropout, rnn.bidirectional
        self.has_bias = rnn.bias
        return 2 if rnn.bidirectional else 1

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        p = next(module.parameters())
        return cls(module, cfg, device, rng).to(p.device, p.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            found = _RNN_WEIGHT.fullmatch(name)
            if found is None:
                raise
        kind, layer, reverse = found.group(1), int(found.group(2)), bool(found.group(3))
        if layer >= self.num_layers or (reverse and not self.bidirectional):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} "
                                 f"(num_layers={self.num_layers}, "
                                 f"bidirectional={self.bidirectional})")
        k = 2 * layer + int(reverse) if self.bidirectional else layer
        return self._torch_weight(kind, k, layer)

    @property
    def _flat_weights_names(self) -> list[str]:
        """The names of torch's weights, in torch's order (readable attributes here)."""
        dirs = ("", "_reverse") if self.bidirectional else ("",)
        kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.has_bias else ())
        return [f"{kind}_l{layer}{sfx}" for layer in range(self.num_layers) for sfx in dirs
                for kind in kinds]

    @property
    def all_weights(self) -> list[list[torch.Tensor]]:
        """torch's weights per layer and direction, [[w_ih, w_hh(, b_ih, b_hh)], ...]."""
        names = self._flat_weights_names
        per = 4 if self.has_bias else 2
        return [[getattr(self, n) for n in names[i:i + per]] for i in range(0, len(names), per)]

    @staticmethod
    def _digital_weights(rnn: nn.Module, layer: int, d: int):
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return [getattr(rnn, n + sfx).detach() if hasattr(rnn, n + sfx) else None
                for n in names]

    @analog_forward
    def forward(self, x: torch.Tensor, hx=None):
        require_tensor(x, type(self).__name__)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            z = x.new_zeros(self.num_layers * dirs, x.shape[0], self.hidden_size)
            state0 = (z,) * self._n_state
        else:
            state0 = tuple(hx) if self._n_state > 1 else (hx,)
            if unbatched:
                state0 = tuple(s.unsqueeze(1) for s in state0)
        final = [[] for _ in range(self._n_state)]
        out = x
        with self.one_draw():
            for layer in range(self.num_layers):
                outs = []
                for d in range(dirs):
                    k = layer * dirs + d
                    o, state = self._run_direction(k, out, tuple(s[k] for s in state0),
                                                   reverse=bool(d))
                    outs.append(o)
                    for acc, s in zip(final, state):
                        acc.append(s)
                out = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
                if self.dropout and self.training and layer < self.num_layers - 1:
                    out = F.dropout(out, self.dropout, training=True)
        final = tuple(torch.stack(acc) for acc in final)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            final = tuple(s.squeeze(1) for s in final)
        return out, (final if self._n_state > 1 else final[0])


class AnalogLSTM(_AnalogRNN):
    """Analog nn.LSTM: per layer and direction one crossbar holds [W_ih, W_hh] (4H x (I + H)).

    The gates i, f, g, o = analog([x_t, h_{t-1}]) + b_ih + b_hh follow torch's gate order, so a
    trained nn.LSTM maps over exactly. Supports num_layers, bias, batch_first, dropout and
    bidirectional; not proj_size.
    """

    _n_state = 2

    def __init__(self, lstm: nn.LSTM, cfg, device=None, rng=None):
        super().__init__()
        if lstm.proj_size:
            raise ValueError("nn.LSTM with proj_size > 0 is not supported; keep it digital")
        dirs = self._settings(lstm)
        self.cells = nn.ModuleList()
        self.biases = nn.ParameterList()
        seqs = _spawn(rng, self.num_layers * dirs)
        for layer in range(self.num_layers):
            for d in range(dirs):
                w_ih, w_hh, b_ih, b_hh = self._digital_weights(lstm, layer, d)
                w = torch.cat([w_ih, w_hh], dim=1)
                tile = AnalogTile(w.shape[1], w.shape[0], cfg, device,
                                  rng=seqs[layer * dirs + d])
                tile.set_weight(w)
                self.cells.append(tile)
                if lstm.bias:
                    self.biases.append(nn.Parameter((b_ih + b_hh).clone()))

    def _torch_weight(self, kind: str, k: int, layer: int):
        """torch's weight ``kind`` of layer and direction k. The tile holds [W_ih, W_hh]; one
        digital vector holds b_ih + b_hh: bias_ih is that sum and bias_hh zero (the gates see
        the same sum as torch's)."""
        if kind.startswith("weight"):
            n_in = self.input_size if layer == 0 else self.hidden_size * (
                2 if self.bidirectional else 1)
            w = self.cells[k].effective_weight()
            return w[:, :n_in] if kind == "weight_ih" else w[:, n_in:]
        if not self.has_bias:
            raise AttributeError(f"{type(self).__name__} with bias=False has no {kind}")
        return self.biases[k] if kind == "bias_ih" else torch.zeros_like(self.biases[k])

    def _run_direction(self, k: int, x: torch.Tensor, state, reverse: bool):
        h, c = state
        tile = self.cells[k]
        bias = self.biases[k] if self.has_bias else None
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outs = [None] * x.shape[1]
        for s in steps:
            gates = tile(torch.cat([x[:, s], h], dim=1))
            if bias is not None:
                gates = gates + bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs[s] = h
        return torch.stack(outs, dim=1), (h, c)


class AnalogGRU(_AnalogRNN):
    """Analog nn.GRU: per layer and direction W_ih (3H x I) on one crossbar and W_hh (3H x H)
    on another, as the candidate gate needs them apart:

        r, z = sigmoid(analog(W_ih x_t) + b_ih + analog(W_hh h) + b_hh)   (their r, z rows)
        n = tanh(analog(W_in x_t) + b_in + r * (analog(W_hn h) + b_hn))
        h_t = (1 - z) * n + z * h

    in torch's gate order (r, z, n), so a trained nn.GRU maps over exactly. The input
    products of all time steps are one MVM batch. Supports num_layers, bias, batch_first,
    dropout and bidirectional.
    """

    def __init__(self, gru: nn.GRU, cfg, device=None, rng=None):
        super().__init__()
        dirs = self._settings(gru)
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        self.bias_ih, self.bias_hh = nn.ParameterList(), nn.ParameterList()
        seqs = _spawn(rng, 2 * self.num_layers * dirs)
        for layer in range(self.num_layers):
            for d in range(dirs):
                k = layer * dirs + d
                w_ih, w_hh, b_ih, b_hh = self._digital_weights(gru, layer, d)
                for tiles, w, seq in ((self.ih, w_ih, seqs[2 * k]),
                                      (self.hh, w_hh, seqs[2 * k + 1])):
                    tiles.append(AnalogTile(w.shape[1], w.shape[0], cfg, device, weight=w,
                                            rng=seq))
                if gru.bias:
                    self.bias_ih.append(nn.Parameter(b_ih.clone()))
                    self.bias_hh.append(nn.Parameter(b_hh.clone()))

    def _torch_weight(self, kind: str, k: int, layer: int):
        """torch's weight ``kind`` of layer and direction k."""
        if kind.startswith("weight"):
            return (self.ih if kind == "weight_ih" else self.hh)[k].effective_weight()
        if not self.has_bias:
            raise AttributeError(f"{type(self).__name__} with bias=False has no {kind}")
        return (self.bias_ih if kind == "bias_ih" else self.bias_hh)[k]

    def _run_direction(self, k: int, x: torch.Tensor, state, reverse: bool):
        (h,) = state
        gi = self.ih[k](x)  # (B, T, 3H): every time step's input product at once
        if self.has_bias:
            gi = gi + self.bias_ih[k]
        tile, b_hh = self.hh[k], (self.bias_hh[k] if self.has_bias else None)
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outs = [None] * x.shape[1]
        for s in steps:
            gh = tile(h)
            if b_hh is not None:
                gh = gh + b_hh
            i_r, i_z, i_n = gi[:, s].chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            outs[s] = h
        return torch.stack(outs, dim=1), (h,)


class AnalogMultiheadAttention(AnalogLayer):
    """Analog nn.MultiheadAttention: the q, k, v in-projections on one crossbar (3E x E), or on
    three (E x E, E x kdim, E x vdim) when kdim/vdim differ from embed_dim, and the output
    projection on another; the attention arithmetic (softmax of q k^T) stays digital.

    Accepts the call signature of nn.MultiheadAttention (query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal). Self-attention reads the whole
    in-projection once; cross-attention reads each input through its own column block
    (key and value, when the same tensor, through one read of their two blocks). Each call
    uses one training weight-noise draw per crossbar.
    """

    # nn.TransformerEncoderLayer checks in_proj_bias to decide on its fused fast path; with
    # None it takes the ordinary path, which calls this module (the bias is ``in_bias``).
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention, cfg, device=None, rng=None):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                             "supported; keep it digital")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.head_dim = mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            seqs = _spawn(rng, 2)
            self.in_proj = AnalogTile(e, 3 * e, cfg, device, weight=mha.in_proj_weight.detach(),
                                      rng=seqs[0])
        else:
            seqs = _spawn(rng, 4)
            for i, (name, n_in) in enumerate((("q", e), ("k", self.kdim), ("v", self.vdim))):
                w = getattr(mha, f"{name}_proj_weight").detach()
                setattr(self, f"{name}_proj", AnalogTile(n_in, e, cfg, device, weight=w,
                                                         rng=seqs[i]))
        self.in_bias = _bias_param(mha.in_proj_bias)
        self.out_proj = AnalogLinear.from_digital(mha.out_proj, cfg, device, rng=seqs[-1])

    @classmethod
    def from_digital(cls, module, cfg, device=None, rng=None):
        p = next(module.parameters())
        return cls(module, cfg, device, rng).to(p.device, p.dtype)

    @property
    def in_proj_weight(self):
        """The effective in-projection weight (3E, E) (None when kdim/vdim != embed_dim)."""
        return self.in_proj.effective_weight() if self._qkv_same_embed_dim else None

    def _separate_weight(self, name):
        return None if self._qkv_same_embed_dim else getattr(self, name).effective_weight()

    q_proj_weight = property(lambda self: self._separate_weight("q_proj"),
                             doc="Effective query projection (E, E) when kdim/vdim differ.")
    k_proj_weight = property(lambda self: self._separate_weight("k_proj"),
                             doc="Effective key projection (E, kdim) when kdim/vdim differ.")
    v_proj_weight = property(lambda self: self._separate_weight("v_proj"),
                             doc="Effective value projection (E, vdim) when kdim/vdim differ.")

    def _project(self, query, key, value, same_kv: bool, self_attention: bool):
        """q, k, v in-projections (with their biases)."""
        e = self.embed_dim
        bias = self.in_bias

        def add(y, lo, hi):
            return y if bias is None else y + bias[lo:hi]

        if not self._qkv_same_embed_dim:
            return (add(self.q_proj(query), 0, e), add(self.k_proj(key), e, 2 * e),
                    add(self.v_proj(value), 2 * e, 3 * e))
        if self_attention:
            return add(self.in_proj(query), 0, 3 * e).chunk(3, dim=-1)
        q = add(self.in_proj(query, outputs=slice(0, e)), 0, e)
        if same_kv:
            k, v = add(self.in_proj(key, outputs=slice(e, 3 * e)), e, 3 * e).chunk(2, dim=-1)
        else:
            k = add(self.in_proj(key, outputs=slice(e, 2 * e)), e, 2 * e)
            v = add(self.in_proj(value, outputs=slice(2 * e, 3 * e)), 2 * e, 3 * e)
        return q, k, v

    @analog_forward
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            require_tensor(t, type(self).__name__, name)
        same_kv = key is value
        self_attention = same_kv and query is key
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt_len, bsz, e = query.shape
        src_len = key.shape[0]
        with self.one_draw():
            q, k, v = self._project(query, key, value, same_kv, self_attention)
            out, attn = self._attend(q, k, v, key_padding_mask, need_weights, attn_mask,
                                     is_causal, bsz, tgt_len, src_len)
            out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if attn is not None and average_attn_weights:
            attn = attn.mean(dim=1)
        if attn is not None and unbatched:
            attn = attn.squeeze(0)
        return out, attn

    def _attend(self, q, k, v, key_padding_mask, need_weights, attn_mask, is_causal, bsz,
                tgt_len, src_len):
        """Digital scaled dot-product attention of the projected heads -> ((L, B, E), weights)."""
        def heads(t, n):
            return t.reshape(n, bsz * self.num_heads, self.head_dim).transpose(0, 1)

        q, k, v = heads(q, tgt_len), heads(k, src_len), heads(v, src_len)
        mask = self._merge_masks(attn_mask, key_padding_mask, bsz, tgt_len, src_len, q.dtype)
        q4 = q.view(bsz, self.num_heads, tgt_len, self.head_dim)
        k4 = k.view(bsz, self.num_heads, src_len, self.head_dim)
        v4 = v.view(bsz, self.num_heads, src_len, self.head_dim)
        drop = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q4 @ k4.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if is_causal and mask is None:
                mask = torch.full((tgt_len, src_len), float("-inf"), device=q.device,
                                  dtype=q.dtype).triu(1)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if drop:
                attn = F.dropout(attn, drop)
            out = attn @ v4
        else:
            attn = None
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, dropout_p=drop,
                                                 is_causal=is_causal and mask is None)
        return out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim), attn

    def _merge_masks(self, attn_mask, key_padding_mask, bsz, tgt_len, src_len, dtype):
        mask = None
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
            mask = m.view(bsz, self.num_heads, tgt_len, src_len) if m.dim() == 3 else m
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros_like(kp, dtype=dtype).masked_fill(kp, float("-inf"))
            kp = kp.view(bsz, 1, 1, src_len)
            mask = kp if mask is None else mask + kp
        return mask
