"""How the analog MVM is computed: backend and precision choices, kept apart from the physics.

:class:`EngineOptions` holds the simulator's choices that are not part of the model of
:class:`~aimc_device.crossbar.CrossbarConfig`. Pass one to :func:`~aimc_device.crossbar.analog_mvm`
(``options=``), or set the default of every MVM in a block with :func:`engine_options`::

    with crossbar.engine_options(backend="reference"):
        y = analog_model(x)      # every analog layer on the torch reference
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from dataclasses import dataclass

import torch

__all__ = ["EngineOptions", "engine_options", "current_options", "BACKEND_CHOICES"]

#: "auto": the Numba backend for CPU tensors in float32/float64 where it implements the
#: configuration, the torch reference elsewhere; "reference": the torch reference everywhere.
BACKEND_CHOICES = ("auto", "reference")


@dataclass(frozen=True)
class EngineOptions:
    """Backend and precision of the analog MVM (not physics: the model is the same).

    Attributes
    ----------
    backend : str
        "auto" (default): the fast CPU backend (Numba) wherever it applies, that is for CPU
        tensors in float32 or float64 without the S-shaped ADC, read asymmetry, noise or bound
        management; the torch reference elsewhere (CUDA, other dtypes, those elements).
        "reference": the torch reference everywhere. Both draw the per-MVM noise from the given
        generator with the same distribution, but not the same numbers.
    aux_bfloat16 : bool or None
        On the fast backend in float32, compute the auxiliary products (short-term noise
        variance, IR-drop activity and shape, Eqs. 14-18) in bfloat16 with float32
        accumulation; the signal W~ x~ always runs in the working precision. Their relative
        error (< 1 %) enters only terms that are themselves a few % of the output: the outputs
        move by far less than one ADC level (tested: with the same draws, the standard deviation
        of the change is below 5 % of the output noise sigma_out, 2.6 % on a 512-row tile at
        three times the standard IR drop). False: everything in the working precision. None
        (default): True where the CPU computes bfloat16 natively (torch reports AVX512 or AMX),
        where it is about 4x faster; False elsewhere (on AVX2 CPUs bfloat16 products run
        slower than float32 ones).
    """

    backend: str = "auto"
    aux_bfloat16: bool | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"EngineOptions.backend = {self.backend!r}: choose one of "
                             f"{BACKEND_CHOICES}")
        if self.aux_bfloat16 is not None and not isinstance(self.aux_bfloat16, bool):
            raise ValueError(f"EngineOptions.aux_bfloat16 = {self.aux_bfloat16!r}: must be True, "
                             "False or None (by the CPU)")

    @property
    def bfloat16_products(self) -> bool:
        """Whether the auxiliary products of float32 tiles run in bfloat16 (see
        ``aux_bfloat16``)."""
        if self.aux_bfloat16 is None:
            return _native_bfloat16()
        return self.aux_bfloat16


@functools.lru_cache(maxsize=None)
def _native_bfloat16() -> bool:
    """Whether torch's CPU kernels run bfloat16 natively here (AVX512 or AMX)."""
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


_CURRENT = contextvars.ContextVar("aimc_device_engine_options", default=EngineOptions())


def current_options() -> EngineOptions:
    """The options in effect (set by :func:`engine_options`; the defaults otherwise)."""
    return _CURRENT.get()


@contextlib.contextmanager
def engine_options(options: EngineOptions | None = None, **changes):
    """Within the block, every MVM that is not given ``options=`` uses these options.

    Parameters
    ----------
    options : EngineOptions or None, the options (None: the ones in effect)
    **changes : fields to change, e.g. ``backend="reference"``
    """
    new = dataclasses.replace(options or current_options(), **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)
