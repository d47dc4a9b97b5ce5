"""The evaluation task: rebuild an analog model from its spec, program it, drift it, measure.

Each task is a pure function of (spec, seed key, times): the programming, drift and per-MVM
noise all come from ``numpy.random.SeedSequence(key)``, and torch runs on one thread inside the
task, so a task gives the same numbers wherever it runs (serially, on a LocalCluster, on a
remote cluster).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import nn as ann
from ..crossbar import CrossbarConfig
from ..io import model_from_dict, model_to_dict
from ..workloads import get_workload

__all__ = ["ModelSpec", "evaluate_task", "build_analog"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to rebuild one analog model (all plain, picklable data).

    Attributes
    ----------
    workload : str
        Registry name of the workload.
    workload_kwargs : dict
        ``get_workload(workload, **workload_kwargs)`` (``quick`` and overrides).
    model_seed : int
        Seed of ``build_model`` (the architecture's initialisation; the weights come from
        ``state``).
    cfg : dict
        ``CrossbarConfig.to_dict()``.
    device : dict
        The device model of either family as plain data
        (:func:`aimc_device.io.model_to_dict`; an empirical model's tables travel as lists and
        its interpolation tables are rebuilt in the worker).
    digital : tuple of str
        Layers kept in floating point.
    state : bytes
        ``torch.save`` of the analog model's state dict (unprogrammed).
    token : str
        Digest of all of the above (identifies the model in a worker's cache).
    """

    workload: str
    workload_kwargs: dict
    model_seed: int
    cfg: dict
    device: dict
    digital: tuple
    state: bytes = field(repr=False)
    token: str = ""

    @classmethod
    def from_model(cls, workload: str, workload_kwargs: dict, model_seed: int,
                   cfg: CrossbarConfig, device, digital, analog) -> "ModelSpec":
        """A spec of the analog model ``analog`` (its state dict, without programmed state)."""
        state = {k: v.detach().cpu().clone() for k, v in analog.state_dict().items()
                 if ".prog_" not in k and not k.startswith("prog_")}
        buf = io.BytesIO()
        torch.save(state, buf)
        return cls(workload, dict(workload_kwargs), int(model_seed), cfg.to_dict(),
                   model_to_dict(device), tuple(digital), buf.getvalue())._with_token()

    def _with_token(self) -> "ModelSpec":
        h = hashlib.sha256(self.state)
        h.update(json.dumps([self.workload, self.workload_kwargs, self.model_seed, self.cfg,
                             self.device, list(self.digital)], sort_keys=True,
                            default=str).encode())
        return ModelSpec(self.workload, self.workload_kwargs, self.model_seed, self.cfg,
                         self.device, self.digital, self.state, h.hexdigest()[:16])

    def replace(self, cfg: CrossbarConfig | None = None,
                device=None) -> "ModelSpec":
        """The same trained weights under another crossbar config or device model (either
        family)."""
        return ModelSpec(self.workload, self.workload_kwargs, self.model_seed,
                         (cfg.to_dict() if cfg is not None else self.cfg),
                         (model_to_dict(device) if device is not None else self.device),
                         self.digital, self.state)._with_token()


_CACHE: dict[str, tuple] = {}


def build_analog(spec: ModelSpec):
    """(workload, analog model in eval mode) for ``spec``, cached per process by its token."""
    hit = _CACHE.get(spec.token)
    if hit is not None:
        return hit
    wl = get_workload(spec.workload, **spec.workload_kwargs)
    model = wl.build_model(seed=spec.model_seed)
    cfg = CrossbarConfig.from_dict(spec.cfg)
    device = model_from_dict(spec.device)
    analog = ann.convert(model, cfg, device, digital=spec.digital, rng=spec.model_seed)
    state = torch.load(io.BytesIO(spec.state), map_location="cpu", weights_only=True)
    analog.load_state_dict(state)
    analog.eval()
    if len(_CACHE) >= 8:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[spec.token] = (wl, analog)
    return wl, analog


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block (a task's numbers do not depend on where it runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def evaluate_task(spec: ModelSpec, key: tuple, times) -> np.ndarray:
    """Program the model of ``spec`` once and measure its test error at each time.

    Parameters
    ----------
    spec : ModelSpec
    key : tuple of int
        Seed key, e.g. ``(seed, variant, repeat)``; programming, drift and per-MVM noise all
        derive from ``numpy.random.SeedSequence(key)``.
    times : sequence of float
        Times after programming [s].

    Returns
    -------
    ndarray (len(times),), test error at each time, a fraction.
    """
    wl, analog = build_analog(spec)
    gen = np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
    out = np.empty(len(times))
    with one_thread(), torch.no_grad():
        try:
            ann.program(analog, rng=gen)
            for i, t in enumerate(times):
                ann.drift(analog, float(t), rng=gen)
                out[i] = wl.evaluate(analog)
        finally:
            ann.forget_programming(analog)
    return out
