"""Turn a floating-point torch model into its analog twin, and drive its life cycle.

``convert`` swaps Linear, Conv1d, Conv2d, LSTM and MultiheadAttention modules anywhere in a
module tree for their analog versions (``layers.py``); ``program`` and ``drift`` then put every
analog layer through the crossbar's life cycle (program -> drift to t -> MVM).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from torch import nn

from .._checks import check_bool, check_float, check_instance, check_int
from .._random import as_generator
from ..crossbar import CrossbarConfig
from ..crossbar.array import resolve_device
from ..pcm import PCMModel
from .layers import (
    AnalogConv1d,
    AnalogConv2d,
    AnalogLayer,
    AnalogLinear,
    AnalogLSTM,
    AnalogMultiheadAttention,
)
from .tile import AnalogTile

__all__ = ["convert", "program", "drift", "forget_programming", "analog_tiles",
           "analog_layers", "set_noise_scale", "reseed"]

# Order matters: MultiheadAttention holds a Linear (out_proj) that it converts itself.
_CONVERSIONS: list[tuple[type, type]] = [
    (nn.MultiheadAttention, AnalogMultiheadAttention),
    (nn.Linear, AnalogLinear),
    (nn.Conv2d, AnalogConv2d),
    (nn.Conv1d, AnalogConv1d),
    (nn.LSTM, AnalogLSTM),
]


def _analog_class(module: nn.Module):
    for digital_cls, analog_cls in _CONVERSIONS:
        if isinstance(module, digital_cls):
            return analog_cls
    return None


def convert(model: nn.Module, cfg: CrossbarConfig | None = None, device: PCMModel | None = None,
            digital: Iterable[str] = (), rng=0, inplace: bool = False) -> nn.Module:
    """An analog copy of ``model``: its Linear/Conv/LSTM/attention layers on crossbar tiles.

    Parameters
    ----------
    model : nn.Module
        Any module tree (Sequential nesting, custom modules, transformer encoders).
    cfg : CrossbarConfig, optional
        Periphery and tiling; default the paper's standard model.
    device : PCMModel or preset name, optional
        Device statistics for the training noise and for programming; None: periphery only
        (no weight noise; programming gives the exact weights, which do not drift).
    digital : iterable of str
        Qualified module names (as in ``model.named_modules()``) kept in floating point, with
        everything below them, e.g. ``("stem", "fc")`` for the first convolution and the last
        classifier.
    rng : int, numpy.random.SeedSequence or None
        Seeds each analog layer's own generators, in module order.
    inplace : bool
        Convert ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module, the analog model (in the same train/eval mode as ``model``).

    Raises
    ------
    TypeError
        ``model`` not a torch module, ``cfg`` not a CrossbarConfig (a dict: build one with
        ``CrossbarConfig(**d)``), ``device`` not a PCMModel or preset name, ``digital`` not a
        collection of names, ``rng`` not a seed.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    if isinstance(cfg, dict):
        raise TypeError("cfg: expected a CrossbarConfig, got dict; build one with "
                        "CrossbarConfig(**settings) or CrossbarConfig.from_dict(settings)")
    check_instance(cfg, "cfg", CrossbarConfig, "a CrossbarConfig", allow_none=True)
    device = resolve_device(device)
    if isinstance(digital, (str, bytes)) or not isinstance(digital, Iterable):
        raise TypeError(f"digital = {digital!r}: give a collection of module names, e.g. "
                        "('stem', 'fc')")
    for name in digital:
        check_instance(name, "digital[...]", str, "a module name (str)")
    if not isinstance(rng, np.random.SeedSequence) and rng is not None:
        check_int(rng, "rng", lo=0)
    check_bool(inplace, "inplace")
    cfg = cfg if cfg is not None else CrossbarConfig()
    digital = set(digital)
    names = {n for n, _ in model.named_modules()}
    unknown = digital - names
    if unknown:
        raise KeyError(f"digital: no module named {sorted(unknown)} in the model; "
                       f"names look like {sorted(n for n in names if n)[:8]}")
    out = model if inplace else copy.deepcopy(model)
    root_seq = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            if qual in digital or isinstance(child, AnalogLayer):
                continue
            if isinstance(child, nn.TransformerEncoder):
                child.use_nested_tensor = False  # its nested fast path reads raw weights
            cls = _analog_class(child)
            if cls is not None:
                new = cls.from_digital(child, cfg, device, rng=root_seq.spawn(1)[0])
                new.train(child.training)
                setattr(module, name, new)
            else:
                visit(child, qual)

    if "" not in digital:
        cls = _analog_class(out)
        if cls is not None:  # the model is itself a single convertible layer
            return cls.from_digital(out, cfg, device, rng=root_seq.spawn(1)[0]).train(
                out.training)
        visit(out, "")
    return out


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
