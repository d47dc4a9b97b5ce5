"""The programmed state of an :class:`AnalogArray` as a flat dict of tensors, and back.

What a programmed array has drawn (programming error, drift exponents, faults, read asymmetry,
S-ADC gains) for each modelled device (flat: the active devices, then the other device of each
pair in ``partners``, see :mod:`aimc_device.crossbar.mapping`), where it stands in time (current weights, drift-compensation reference and
factors) and its per-MVM random stream, so that a torch ``state_dict`` can carry it and a reload
continues exactly where it left off. No pickle: tensors only.
"""
from __future__ import annotations

import torch

from ..pcm import ProgrammedState
from ..pcm.devices import read_noise_key
from . import array as _array
from .array import AnalogArray
from .mapping import device_targets

__all__ = ["export_state", "import_state"]


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
        for key in ("g_prog", "nu", "stuck", "q_read"):
            value = getattr(st, key)
            if value is not None:
                out[key] = torch.as_tensor(value)
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
    # states saved before the other devices of pairs were modelled hold (out, in) arrays of the
    # active devices: no partners, the same flat order
    partners = state.get("partners", torch.zeros(0, dtype=torch.int64)).to(w.device)
    array._partners = partners

    def flat(key):
        return state[key].reshape(-1)

    if "g_prog" in state and _array._numba_sampler(w):
        q_read = flat("q_read").numpy().copy() if "q_read" in state else None
        array._state = ProgrammedState(
            g_target=device_targets(array._g_target, partners).numpy().copy(),
            g_prog=flat("g_prog").numpy().copy(), nu=flat("nu").numpy().copy(),
            stuck=flat("stuck").numpy().copy() if "stuck" in state else None,
            q_read=q_read,
            q_model=read_noise_key(array.device_model) if q_read is not None else None)
    elif "g_prog" in state:
        array._state = ProgrammedState(
            g_target=device_targets(array._g_target, partners),
            g_prog=flat("g_prog").to(w.device).clone(), nu=flat("nu").to(w.device).clone(),
            stuck=flat("stuck").to(w.device).clone() if "stuck" in state else None)
    else:
        array._state = None
    array.asymmetry = (list(torch.split(state["asymmetry"].to(w.device), array.tile_sizes, 1))
                       if "asymmetry" in state else None)
    array.zeta = list(state["zeta"].to(w.device)) if "zeta" in state else None
    return array
