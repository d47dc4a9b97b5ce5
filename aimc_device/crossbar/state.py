"""The programmed state of an :class:`AnalogArray` as a flat dict of tensors, and back.

What a programmed array has drawn for each modelled device (flat: the active devices, then the
other device of each pair in ``partners``, see :mod:`aimc_device.crossbar.mapping`) and by the
periphery (read asymmetry, S-ADC gains), where it stands in time (current weights,
drift-compensation reference and factors) and its per-MVM random stream, so that a torch
``state_dict`` can carry it and a reload continues exactly where it left off. No pickle: tensors
only.

The devices' state is that of the device model's family, by key:

- PCM (:class:`aimc_device.pcm.ProgrammedState`): ``g_prog``, ``nu``, ``stuck``, ``q_read``;
  the same for the Numba and the torch sampler, restored for the array's sampler;
- empirical, Numba sampler (:class:`aimc_device.pcm.EmpiricalState`): ``z0``, ``key`` (the
  uint64 programming key as int64 bits), ``stuck``, ``g_stuck``; read by the Numba sampler
  wherever the array lives;
- empirical, torch sampler (:class:`aimc_device.pcm.empirical_torch.EmpiricalTorchState`):
  ``z``, ``stuck``, ``g_stuck``; read by the torch sampler on the array's device.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..pcm import EmpiricalState, ProgrammedState
from ..pcm.devices import read_noise_key
from ..pcm.empirical_torch import EmpiricalTorchState
from . import array as _array
from .array import AnalogArray
from .mapping import device_targets

__all__ = ["export_state", "import_state"]

#: The key that tells each kind of saved device state apart -> (family, kind).
_STATE_KINDS = {"g_prog": ("pcm", "pcm"), "z0": ("empirical", "numba"),
                "z": ("empirical", "torch")}


def _device_arrays(st) -> dict[str, torch.Tensor]:
    """The arrays a device state holds besides its targets, as tensors (no copies)."""
    out = {}
    for f in dataclasses.fields(st):
        value = getattr(st, f.name)
        if f.name in ("g_target", "q_model") or value is None:
            continue
        if f.name == "key":  # a numpy.uint64 scalar: its bits as one int64
            value = np.asarray([value], dtype=np.uint64).view(np.int64)
        out[f.name] = torch.as_tensor(value)
    return out


def export_state(array: AnalogArray) -> dict[str, torch.Tensor]:
    """The programmed state of ``array`` as tensors (empty dict before programming).

    The tensors share memory with the array (no copies: a drift re-exports cheaply). That is
    safe because the array never changes them in place, it replaces them.
    """
    if array._s_ref is None:
        return {}
    out = {
        "w": array._w.detach(),
        "comp": array.comp.detach(),
        "s_ref": array._s_ref.detach(),
        "t": torch.tensor(float(array.t)),
        "mvm_rng": array._gen.get_state(),
    }
    st = array._state
    if st is not None and array._partners.numel():
        out["partners"] = array._partners.detach()
    if st is not None:  # numpy arrays (Numba sampler) or tensors (torch sampler)
        out.update(_device_arrays(st))
    if array.asymmetry is not None:
        out["asymmetry"] = torch.cat(array.asymmetry, dim=1)
    if array.zeta is not None:
        out["zeta"] = torch.stack(array.zeta)
    return out


def import_state(array: AnalogArray, state: dict[str, torch.Tensor]) -> AnalogArray:
    """Restore a state from :func:`export_state` into an array built from the same weights."""
    if not state:
        return array
    w = state["w"].to(array._w.device, array._w.dtype)
    if tuple(w.shape) != array.shape:
        raise ValueError(f"import_state: saved weights have shape {tuple(w.shape)}, the array "
                         f"{array.shape}; rebuild the array from the same weights")
    array._set_weights(w.clone())
    array.comp = state["comp"].to(w.device, w.dtype).clone()
    array._s_ref = state["s_ref"].to(w.device, w.dtype).clone()
    array.t = float(state["t"])
    gen = torch.Generator(device=w.device)
    gen.set_state(state["mvm_rng"].cpu())
    array._gen = gen
    array._device_gens = {}
    # states saved before the other devices of pairs were modelled hold (out, in) arrays of the
    # active devices: no partners, the same flat order
    partners = state.get("partners", torch.zeros(0, dtype=torch.int64)).to(w.device)
    array._partners = partners

    array._state = _device_state(array, state, partners, w.device)
    array.asymmetry = (list(torch.split(state["asymmetry"].to(w.device), array.tile_sizes, 1))
                       if "asymmetry" in state else None)
    array.zeta = list(state["zeta"].to(w.device)) if "zeta" in state else None
    return array


def _device_state(array: AnalogArray, state: dict, partners: torch.Tensor, device):
    """The device state of a saved dict, for the array's device model (None when ideal)."""
    kind = next((v for k, v in _STATE_KINDS.items() if k in state), None)
    model = array.device_model
    if kind is None:
        return None
    has = "ideal devices" if model is None else f"the {model.family} family"
    if model is None or model.family != kind[0]:
        raise ValueError(f"import_state: the saved state was programmed with a device model of "
                         f"the {kind[0]} family, the array has {has}; rebuild the array (convert the model) "
                         "with the device model it was programmed with")

    def flat(key, on=None):
        if key not in state:
            return None
        t = state[key].reshape(-1)
        return t.numpy().copy() if on is None else t.to(on).clone()

    g_target = device_targets(array._g_target, partners)
    if kind[1] == "numba" or (kind[1] == "pcm" and _array._numba_sampler(g_target)):
        g_target = g_target.cpu().numpy().copy()
        if kind[1] == "numba":
            key = np.uint64(state["key"].reshape(-1).numpy().view(np.uint64)[0])
            return EmpiricalState(g_target=g_target, z0=flat("z0").astype(g_target.dtype),
                                  key=key, stuck=flat("stuck"), g_stuck=flat("g_stuck"))
        q_read = flat("q_read")
        return ProgrammedState(
            g_target=g_target, g_prog=flat("g_prog"), nu=flat("nu"), stuck=flat("stuck"),
            q_read=q_read, q_model=read_noise_key(model) if q_read is not None else None)
    if kind[1] == "torch":
        z = state["z"].to(device).clone().reshape(g_target.shape + (-1,))
        return EmpiricalTorchState(g_target=g_target, z=z, stuck=flat("stuck", device),
                                   g_stuck=flat("g_stuck", device))
    return ProgrammedState(g_target=g_target, g_prog=flat("g_prog", device),
                           nu=flat("nu", device), stuck=flat("stuck", device))
