"""Weight -> tile mapping (MODEL.md section 1): tiling, column-wise scales, conductance targets.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Methods (mapping, Eq. 1).
"""
from __future__ import annotations

import math

import torch

__all__ = ["split_sizes", "tile_slices", "map_weights", "conductance_targets",
           "weights_from_conductance"]


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
    """Column-wise mapping of a weight matrix onto tiles (MODEL.md sec. 1).

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
    """Differential-pair targets: g^ = g_max |w~| on the device of sign(w~) (MODEL.md sec. 1).

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


def weights_from_conductance(g: torch.Tensor, sign: torch.Tensor, g_max: float) -> torch.Tensor:
    """Signed normalised weight of a device pair, w~ = sign g / g_max (MODEL.md Eq. 12)."""
    return sign * (g / g_max)
