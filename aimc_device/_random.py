"""Randomness passed in: seeds, numpy Generators and counter-based keys (shared by all layers)."""
from __future__ import annotations

import numpy as np

__all__ = ["as_generator", "derive_key", "torch_generator"]

RngLike = "int | numpy.random.Generator | numpy.random.SeedSequence | None"


def as_generator(rng=None) -> np.random.Generator:
    """A numpy Generator from a seed, a SeedSequence, a Generator (returned as is) or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_, float, str, bytes)):
        raise TypeError(f"rng = {rng!r}: give an int seed >= 0, a numpy Generator, a "
                        "SeedSequence or None")
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"rng = {rng!r}: give an int seed >= 0, a numpy Generator, a "
                        f"SeedSequence or None ({exc})") from None


def derive_key(rng=None) -> np.uint64:
    """A 64-bit key for the counter-based kernels.

    An int seed maps to a fixed key (same seed, same key); a Generator gives up one draw, so a
    sequence of calls on one Generator gets independent keys; None takes fresh OS entropy.
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        if rng < 0:
            raise ValueError(f"rng seed must be >= 0, got {rng}")
        ss = np.random.SeedSequence(int(rng))
        return np.uint64(ss.generate_state(1, dtype=np.uint64)[0])
    return np.uint64(as_generator(rng).integers(0, 2**64, dtype=np.uint64))


def torch_generator(rng=None, device="cpu"):
    """A torch.Generator seeded from ``rng`` (a torch.Generator is returned as is)."""
    import torch

    if isinstance(rng, torch.Generator):
        return rng
    gen = torch.Generator(device=device)
    gen.manual_seed(int(derive_key(rng)) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen
