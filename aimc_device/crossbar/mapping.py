"""Weight -> tile mapping (docs/model.md section 1): tiling, column-wise scales, conductance targets
and the differential pair.

A weight is the difference of the two devices of its pair, w~ = (g+ - g-) / g_max. The device of
the weight's sign is the *active* one, programmed to g_max |w~|; the other one is programmed
toward 0 S. Which of the other devices are modelled (programmed with noise, drifting, read with
noise) is ``CrossbarConfig.pair_devices``: "active" models the other device only where the
weight is exactly 0 (a zero weight then has a zero-mean error) or where it is stuck (see
:class:`aimc_device.crossbar.AnalogArray`); the rest sit at exactly 0 S. "both" models every
device. The modelled devices form one flat array: the n active devices in the weights' C order,
then the other devices of the ``partners`` (flat weight indices), in that order.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Methods (mapping, Eq. 1).
"""
from __future__ import annotations

import math

import torch

__all__ = ["split_sizes", "tile_slices", "map_weights", "conductance_targets",
           "pair_partners", "pair_faults", "device_targets", "weights_from_conductance"]


def split_sizes(n: int, max_size: int) -> list[int]:
    """Cut ``n`` rows into the fewest parts of at most ``max_size``, of near-equal size.

    The first ``n % k`` parts get one row more. ``split_sizes(1100, 512) == [367, 367, 366]``.
    """
    n, max_size = int(n), int(max_size)
    if n < 1:
        raise ValueError(f"split_sizes: n = {n}; a layer needs at least one input")
    if max_size < 1:
        raise ValueError(f"split_sizes: max_size = {max_size} must be >= 1 (CrossbarConfig.max_rows)")
    k = math.ceil(n / max_size)
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def tile_slices(tile_sizes) -> list[slice]:
    """Column slices of the weight matrix (inputs) for each tile."""
    out, start = [], 0
    for s in tile_sizes:
        out.append(slice(start, start + int(s)))
        start += int(s)
    return out


def map_weights(W: torch.Tensor, tile_sizes,
                columnwise: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Column-wise mapping of a weight matrix onto tiles (docs/model.md sec. 1).

    For tile k with inputs J_k: gamma_ki = max_{j in J_k} |w_ij|, w~_ij = w_ij / gamma_ki, so
    w~ lies in [-1, 1]. A column of zeros gets gamma = 0 and w~ = 0. With ``columnwise=False``
    every column of tile k shares gamma_k = max_{i, j in J_k} |w_ij|.

    Parameters
    ----------
    W : torch.Tensor, weights (out, in), any unit
    tile_sizes : sequence of int, inputs per tile, summing to ``in``
    columnwise : bool, one scale per column (True) or per tile (False)

    Returns
    -------
    w_tiles : list of torch.Tensor (out, in_k), normalised weights w~, dimensionless
    gamma : torch.Tensor (n_tiles, out), column scales, unit of W
    """
    sizes = [int(s) for s in tile_sizes]
    if W.dim() != 2:
        raise ValueError(f"weights: expected a 2-d matrix (out, in), got shape {tuple(W.shape)}")
    if sum(sizes) != W.shape[1]:
        raise ValueError(f"tile_sizes {sizes} add up to {sum(sizes)}, but the weights have "
                         f"{W.shape[1]} inputs (columns of the (out, in) matrix)")
    w_tiles, gammas = [], []
    for sl in tile_slices(sizes):
        block = W[:, sl]
        gamma = block.abs().amax(dim=1)  # gamma_i = max_j |w_ij|
        if not columnwise:
            gamma = gamma.amax().expand_as(gamma).clone()  # one scale for the tile
        safe = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
        w_tiles.append(block / safe[:, None])
        gammas.append(gamma)
    return w_tiles, torch.stack(gammas)


def conductance_targets(w_tilde: torch.Tensor, g_max: float):
    """Differential-pair targets: g^ = g_max |w~| on the device of sign(w~) (docs/model.md sec. 1).

    Parameters
    ----------
    w_tilde : torch.Tensor, normalised weights in [-1, 1]
    g_max : float, conductance of |w~| = 1 [S]

    Returns
    -------
    g_target : torch.Tensor, conductance of the active device [S], >= 0
    sign : torch.Tensor, +1 / -1 (which device of the pair; 0 weights count as +1)
    """
    sign = torch.where(w_tilde < 0, -1.0, 1.0).to(w_tilde.dtype)
    return w_tilde.abs() * g_max, sign


def pair_partners(w_tilde: torch.Tensor, pair_devices: str) -> torch.Tensor:
    """Flat indices of the weights whose other device is modelled: every weight ("both") or
    the exact zeros ("active"), int64, ascending."""
    if pair_devices == "both":
        return torch.arange(w_tilde.numel(), device=w_tilde.device)
    return (w_tilde.reshape(-1) == 0).nonzero().reshape(-1)


def pair_faults(sign: torch.Tensor, partners: torch.Tensor, stuck: torch.Tensor,
                g_stuck: torch.Tensor, pair_devices: str):
    """The modelled devices and their faults, from the faults of every physical device.

    Physical device 2 i is the + device of weight i (flat C order), 2 i + 1 its - device;
    either can be stuck (:func:`aimc_device.pcm.draw_faults`). The active device is the one of
    the weight's sign (+ for a zero weight). Under "active" the other device of a non-zero
    weight is otherwise at exactly 0 S; when it is stuck at a non-zero conductance it is
    modelled too, and pulls the weight toward the opposite sign (stuck at 0 S it changes
    nothing).

    Parameters
    ----------
    sign : torch.Tensor (out, in), +1 / -1, the sign of the active device
    partners : torch.Tensor of int64, the pairs whose other device is modelled anyway
        (:func:`pair_partners`)
    stuck : torch.Tensor of bool (2 n,), stuck physical devices
    g_stuck : torch.Tensor (2 n,), their conductance [S]
    pair_devices : str, "active" or "both" (``CrossbarConfig.pair_devices``)

    Returns
    -------
    (partners, stuck, g_stuck) : the partners (ascending), and the faults of the modelled
    devices in the order of :func:`device_targets`.
    """
    n = sign.numel()
    active = 2 * torch.arange(n, device=sign.device) + (sign.reshape(-1) < 0).long()
    other = active ^ 1
    if pair_devices == "active":
        pulled = (stuck[other] & (g_stuck[other] > 0)).nonzero().reshape(-1)
        if pulled.numel():
            partners = torch.unique(torch.cat([partners, pulled]))  # sorted
    ids = torch.cat([active, other[partners]])
    return partners, stuck[ids], g_stuck[ids]


def device_targets(g_target: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """Targets of the modelled devices [S], flat: the active devices' ``g_target`` (C order),
    then 0 S for the other device of each partner. A view of ``g_target`` when there are none."""
    flat = g_target.reshape(-1)
    if partners.numel() == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(partners.numel())])


def weights_from_conductance(g: torch.Tensor, sign: torch.Tensor, g_max: float,
                             partners: torch.Tensor | None = None) -> torch.Tensor:
    """Signed normalised weights of the differential pairs, w~ = (g+ - g-) / g_max
    (docs/model.md Eq. 12): sign (g_active - g_other) / g_max.

    Parameters
    ----------
    g : torch.Tensor, conductances of the modelled devices [S]: the active devices (n, in the
        C order of ``sign``), then the other device of each partner (see module docstring);
        or just the n active devices, of ``sign``'s shape
    sign : torch.Tensor (out, in), +1 / -1, the sign of the active device
    g_max : float, conductance of |w~| = 1 [S]
    partners : torch.Tensor of int64 or None, flat weight indices of the other devices in ``g``

    Returns
    -------
    torch.Tensor like ``sign``, w~, dimensionless.
    """
    n = sign.numel()
    w = sign * (g.reshape(-1)[:n].reshape(sign.shape) / g_max)
    if partners is not None and partners.numel():
        other = g.reshape(-1)[n:] / g_max
        flat_sign = sign.reshape(-1)
        if partners.numel() == n:  # every pair
            w -= sign * other.reshape(sign.shape)
        else:
            w.view(-1).index_add_(0, partners, -(flat_sign[partners] * other))
    return w
