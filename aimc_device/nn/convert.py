"""Turn a floating-point torch model into its analog twin, and drive its life cycle.

``convert`` swaps the linear maps of a module tree (Linear, Conv1d/2d, ConvTranspose1d/2d,
LSTM, GRU, MultiheadAttention, and whatever :func:`register_conversion` adds) for their analog
versions (``layers.py``) and reports what it did in a :class:`ConversionSummary`; ``program``
and ``drift`` then put every analog layer through the crossbar's life cycle (program -> drift to
t -> MVM).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from .._checks import check_bool, check_float, check_instance, check_int
from .._random import as_generator
from ..crossbar import CrossbarConfig
from ..io import resolve_device_model
from .layers import (
    AnalogConv1d,
    AnalogConv2d,
    AnalogConvTranspose1d,
    AnalogConvTranspose2d,
    AnalogGRU,
    AnalogLayer,
    AnalogLinear,
    AnalogLSTM,
    AnalogMultiheadAttention,
)
from .tile import AnalogTile

__all__ = ["convert", "program", "drift", "forget_programming", "analog_tiles",
           "analog_layers", "set_noise_scale", "reseed", "register_conversion",
           "unregister_conversion", "ConversionSummary", "AnalogConversionError"]

_log = logging.getLogger(__name__)

# digital class -> factory(module, cfg, device, rng) -> analog module. A module's conversion is
# that of the first class in its MRO found here (a registered subclass before its base).
_CONVERSIONS: dict[type, Callable] = {
    nn.MultiheadAttention: AnalogMultiheadAttention.from_digital,
    nn.Linear: AnalogLinear.from_digital,
    nn.Conv2d: AnalogConv2d.from_digital,
    nn.Conv1d: AnalogConv1d.from_digital,
    nn.ConvTranspose2d: AnalogConvTranspose2d.from_digital,
    nn.ConvTranspose1d: AnalogConvTranspose1d.from_digital,
    nn.LSTM: AnalogLSTM.from_digital,
    nn.GRU: AnalogGRU.from_digital,
}
_BUILTIN = frozenset(_CONVERSIONS)

# Modules with parameters that are no matrix-vector product: staying digital is by design.
_NOT_MVM = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm,
            nn.GroupNorm, nn.RMSNorm, nn.PReLU)


class AnalogConversionError(ValueError):
    """``convert(..., strict=True)`` found linear maps it cannot put on crossbars."""


def register_conversion(cls: type, factory: Callable | None = None, *,
                        linear: Callable | None = None) -> None:
    """Teach :func:`convert` to put modules of class ``cls`` (and its subclasses) on crossbars.

    Parameters
    ----------
    cls : type, a torch.nn.Module subclass
    factory : callable(module, cfg, device, rng) -> nn.Module, optional
        Builds the analog module that replaces ``module`` (``rng``: a numpy SeedSequence for its
        tiles). The ``from_digital`` class methods of the analog layers have this signature.
    linear : callable(module) -> (weight, bias), optional
        For a module that computes the linear map y = x W^T + b on the last dimension of its
        input: returns W of shape (out, in) and b (out,) or None. The module becomes an
        :class:`AnalogLinear`. Give exactly one of ``factory`` and ``linear``.

    Examples
    --------
    The transposed-weight ``Conv1D`` of GPT-style model code (weight (in, out), y = x W + b):

    >>> register_conversion(Conv1D, linear=lambda m: (m.weight.T, m.bias))  # doctest: +SKIP
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls: expected a torch.nn.Module subclass, got {cls!r}")
    if (factory is None) == (linear is None):
        raise TypeError("register_conversion: give exactly one of factory= and linear=")
    if factory is not None and not callable(factory):
        raise TypeError(f"factory: expected a callable(module, cfg, device, rng), got "
                        f"{type(factory).__name__}")
    if linear is not None:
        if not callable(linear):
            raise TypeError(f"linear: expected a callable(module) -> (weight, bias), got "
                            f"{type(linear).__name__}")

        def factory(module, cfg, device, rng, _get=linear):
            weight, bias = _get(module)
            return AnalogLinear.from_weight(weight, bias, cfg, device, rng)
    _CONVERSIONS[cls] = factory


def unregister_conversion(cls: type) -> None:
    """Forget a conversion added by :func:`register_conversion` (built-in ones stay)."""
    if cls in _BUILTIN:
        raise ValueError(f"{cls.__name__}: a built-in conversion cannot be removed; keep such "
                         "layers digital with convert(..., digital=names)")
    _CONVERSIONS.pop(cls, None)


def _factory(module: nn.Module):
    for klass in type(module).__mro__:
        if klass in _CONVERSIONS:
            return _CONVERSIONS[klass]
    return None


@dataclasses.dataclass
class ConversionSummary:
    """What :func:`convert` did.

    Attributes
    ----------
    analog : list of (name, digital class, analog class, crossbar tiles)
    digital : list of (name, class, reason) for the modules with weights left digital
    unsupported : list of (name, class, reason), the part of ``digital`` that holds linear maps
        ``convert`` could not put on crossbars (warned about; ``strict=True`` raises): layers
        whose conversion refused their settings, and modules of other classes with a parameter
        of two or more dimensions named like a weight (``weight``, ``q_proj_weight``)
    """

    analog: list = dataclasses.field(default_factory=list)
    digital: list = dataclasses.field(default_factory=list)
    unsupported: list = dataclasses.field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        """Crossbar tiles of the whole model."""
        return sum(row[3] for row in self.analog)

    def __str__(self) -> str:
        lines = [f"analog: {len(self.analog)} modules on {self.n_tiles} crossbar tiles"]
        lines += [f"  {n or '(model)'}: {d} -> {a}, {t} tiles" for n, d, a, t in self.analog]
        lines.append(f"digital: {len(self.digital)} modules with weights")
        lines += [f"  {n or '(model)'}: {c} ({why})" for n, c, why in self.digital]
        return "\n".join(lines)


def _digital_reason(module: nn.Module) -> tuple[str, bool] | None:
    """(why the module stays digital, whether it is an unsupported linear map) for a module
    with weights of its own, None for one without."""
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return None
    if isinstance(module, _NOT_MVM):
        return "no matrix-vector product", False
    # A matrix named like a weight marks a linear map (Conv1D.weight, q_proj_weight); other
    # matrices (positional embeddings, class tokens) are added or concatenated, not multiplied.
    mats = sorted(n for n, p in own.items() if p.dim() >= 2 and "weight" in n.lower())
    if not mats:
        return "no weight matrix", False
    return (f"no analog conversion for {type(module).__name__} (weights {', '.join(mats)}); "
            "add one with aimc_device.nn.register_conversion", True)


def convert(model: nn.Module, cfg: CrossbarConfig | None = None, device=None,
            digital: Iterable[str] = (), rng=0, inplace: bool = False, strict: bool = False,
            return_summary: bool = False):
    """An analog copy of ``model``: its linear maps on crossbar tiles.

    Converted: nn.Linear, nn.Conv1d/2d (any groups, padding and padding_mode),
    nn.ConvTranspose1d/2d, nn.LSTM, nn.GRU, nn.MultiheadAttention (also inside transformer
    layers), subclasses of these (parametrized modules such as weight_norm too: their
    effective weight is programmed), and classes added with :func:`register_conversion`.

    Parameters
    ----------
    model : nn.Module
        Any module tree (Sequential nesting, custom modules, transformer encoders).
    cfg : CrossbarConfig, optional
        Periphery and tiling; default the paper's standard model.
    device : PCMModel, EmpiricalModel, preset name or device card path, optional
        Device statistics (either family, see :func:`aimc_device.io.resolve_device_model`) for
        the training noise and for programming; None: periphery only (no weight noise;
        programming gives the exact weights, which do not drift).
    digital : iterable of str
        Qualified module names (as in ``model.named_modules()``) kept in floating point, with
        everything below them, e.g. ``("stem", "fc")`` for the first convolution and the last
        classifier.
    rng : int, numpy.random.SeedSequence or None
        Seeds each analog layer's own generators, in module order.
    inplace : bool
        Convert ``model`` itself instead of a deep copy.
    strict : bool
        Raise :class:`AnalogConversionError` (before changing anything) if a linear map cannot
        be converted; by default it stays digital with a warning.
    return_summary : bool
        Return ``(model, summary)`` instead of the model. The summary (a
        :class:`ConversionSummary`) is also logged at INFO level to ``aimc_device.nn.convert``.

    Returns
    -------
    nn.Module, the analog model (in the same train/eval mode as ``model``), or
    (nn.Module, ConversionSummary) with ``return_summary``.

    Raises
    ------
    TypeError
        ``model`` not a torch module, ``cfg`` not a CrossbarConfig (a dict: build one with
        ``CrossbarConfig(**d)``), ``device`` not a device model, preset name or card path,
        ``digital`` not a collection of names, ``rng`` not a seed.
    KeyError
        A name in ``digital`` that is no module of the model.
    AnalogConversionError
        With ``strict=True``, naming every linear map that would stay digital and why.

    Notes
    -----
    Parametrized modules (``torch.nn.utils.parametrize``, e.g. ``weight_norm``): the effective
    weight is mapped onto the tiles, and hardware-aware training then trains the tile's own
    parametrisation (normalised weights w~ with column scales, see :class:`AnalogTile`) in
    place of the module's; w~ times its column scale plays the part of weight_norm's direction
    times magnitude. A constraint a parametrization enforces (orthogonality, a spectral norm)
    is not enforced during analog training.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    if isinstance(cfg, dict):
        raise TypeError("cfg: expected a CrossbarConfig, got dict; build one with "
                        "CrossbarConfig(**settings) or CrossbarConfig.from_dict(settings)")
    check_instance(cfg, "cfg", CrossbarConfig, "a CrossbarConfig", allow_none=True)
    device = resolve_device_model(device)
    if isinstance(digital, (str, bytes)) or not isinstance(digital, Iterable):
        raise TypeError(f"digital = {digital!r}: give a collection of module names, e.g. "
                        "('stem', 'fc')")
    for name in digital:
        check_instance(name, "digital[...]", str, "a module name (str)")
    if not isinstance(rng, np.random.SeedSequence) and rng is not None:
        check_int(rng, "rng", lo=0)
    check_bool(inplace, "inplace")
    check_bool(strict, "strict")
    check_bool(return_summary, "return_summary")
    cfg = cfg if cfg is not None else CrossbarConfig()
    digital = set(digital)
    names = {n for n, _ in model.named_modules()}
    unknown = digital - names
    if unknown:
        raise KeyError(f"digital: no module named {sorted(unknown)} in the model; "
                       f"names look like {sorted(n for n in names if n)[:8]}")
    _refresh_weight_norm(model)
    out = model if inplace else copy.deepcopy(model)
    root_seq = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
    summary = ConversionSummary()
    swaps: list[tuple[nn.Module | None, str, nn.Module]] = []  # (parent, name, analog module)

    def keep(qual, module, reason, unsupported):
        summary.digital.append((qual, type(module).__name__, reason))
        if unsupported:
            summary.unsupported.append(summary.digital[-1])

    def visit(parent: nn.Module | None, name: str, module: nn.Module, qual: str) -> None:
        if qual in digital:
            if any(True for _ in module.parameters()):
                keep(qual, module, "named in digital=", False)
            return
        if isinstance(module, AnalogLayer):
            return
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # its nested fast path reads raw weights
        factory = _factory(module)
        if factory is not None:
            try:
                new = factory(module, cfg, device, rng=root_seq.spawn(1)[0])
            except ValueError as err:
                keep(qual, module, str(err), True)
                return
            new.train(module.training)
            swaps.append((parent, name, new))
            tiles = sum(t.n_tiles for t in new.modules() if isinstance(t, AnalogTile))
            summary.analog.append((qual, type(module).__name__, type(new).__name__, tiles))
            return
        why = _digital_reason(module)
        if why is not None:
            keep(qual, module, *why)
        for child_name, child in module.named_children():
            visit(module, child_name, child, f"{qual}.{child_name}" if qual else child_name)

    visit(None, "", out, "")
    if summary.unsupported:
        listing = "; ".join(f"{n or '(model)'} ({c}): {why}" for n, c, why in summary.unsupported)
        if strict:
            raise AnalogConversionError(
                f"convert(strict=True): {len(summary.unsupported)} linear maps cannot be put on "
                f"crossbars: {listing}. Keep them digital with digital=names, or convert "
                "with strict=False")
        warnings.warn(f"convert: {len(summary.unsupported)} modules with weight matrices stay "
                      f"digital: {listing}", stacklevel=2)
    for parent, name, new in swaps:
        if parent is None:
            out = new
        else:
            setattr(parent, name, new)
    _guard_transformer_fast_path(out)
    _log.info("convert: %s", summary)
    return (out, summary) if return_summary else out


@torch.no_grad()
def _refresh_weight_norm(model: nn.Module) -> None:
    """Modules under the hook-based ``torch.nn.utils.weight_norm`` keep their weight as a
    tensor attribute that the hook recomputes before every forward; left over from the last
    forward, it is part of an autograd graph, which deepcopy refuses. Set it to its current
    value, detached (what the next forward would compute; nothing else changes)."""
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(m, hook.name, hook.compute_weight(m).detach())


def _guard_transformer_fast_path(model: nn.Module) -> None:
    """Keep nn.TransformerEncoderLayer off its fused inference kernel where it holds analog
    layers: that kernel reads ``linear1.weight`` and friends and would compute digitally with
    the analog layers' effective weights. Its fast-path test skips layers whose activation is
    not flagged as relu/gelu; the flag is used nowhere else (the activation itself is kept)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                isinstance(c, AnalogLayer) for c in m.modules()):
            m.activation_relu_or_gelu = False


def analog_tiles(model: nn.Module) -> list[AnalogTile]:
    """Every AnalogTile in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, AnalogTile)]


def analog_layers(model: nn.Module) -> list[AnalogLayer]:
    """Every analog layer in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, AnalogLayer)]


def _child_seeds(rng, n: int) -> list[np.random.Generator]:
    gen = as_generator(rng)
    return [np.random.default_rng(s) for s in gen.integers(0, 2**63, size=n)]


def program(model: nn.Module, rng=None) -> nn.Module:
    """Program every analog layer's weights onto its crossbars (new programming-noise draw).

    Parameters
    ----------
    model : nn.Module, an analog model from :func:`convert`
    rng : int, numpy.random.Generator or None; each tile gets its own child generator.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module (an analog model)")
    tiles = analog_tiles(model)
    if not tiles:
        raise ValueError("program(): the model holds no analog layers; convert it first")
    for tile, gen in zip(tiles, _child_seeds(rng, len(tiles))):
        tile.program(rng=gen)
    return model


def drift(model: nn.Module, t: float, rng=None) -> nn.Module:
    """Move every programmed analog layer to t seconds after programming.

    Drift and 1/f read noise are drawn once here and held for all evaluation batches; drift
    compensation (per ``cfg.drift_compensation``) is applied by the crossbar arrays.

    Parameters
    ----------
    model : nn.Module
    t : float, time since the end of programming [s]
    rng : int, numpy.random.Generator or None
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module (an analog model)")
    t = check_float(t, "t", lo=0.0)
    tiles = analog_tiles(model)
    for tile, gen in zip(tiles, _child_seeds(rng, len(tiles))):
        tile.drift(t, rng=gen)
    return model


def forget_programming(model: nn.Module) -> nn.Module:
    """Drop the programmed state of every analog layer."""
    for tile in analog_tiles(model):
        tile.forget_programming()
    return model


def reseed(model: nn.Module, seed, key=()) -> nn.Module:
    """Restart every analog tile's noise streams: tile i from SeedSequence([*seed, i, *key]).

    With it, the noise of a training epoch can be made a function of (seed, epoch) alone, so
    that a run resumed from a checkpoint draws exactly what an uninterrupted one draws.

    Parameters
    ----------
    model : nn.Module
    seed : int or sequence of int
    key : sequence of int, appended after the tile index (e.g. a stream number)
    """
    base = [int(s) for s in np.atleast_1d(seed)]
    extra = [int(k) for k in np.atleast_1d(key)] if np.size(key) else []
    for i, tile in enumerate(analog_tiles(model)):
        tile.reseed(np.random.SeedSequence([*base, i, *extra]))
    return model


def set_noise_scale(model: nn.Module, scale: float) -> None:
    """Set the training weight-noise scale of every analog layer (dimensionless)."""
    for tile in analog_tiles(model):
        tile.noise_scale = float(scale)
