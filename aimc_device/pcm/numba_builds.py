"""Serial and parallel builds of one Numba kernel, each with its own on-disk cache (for
the Numba kernels of every layer).

Numba's on-disk cache files a function's compiled versions under its qualified name and source
line, and keys them by signature, CPU and bytecode, not by compile flags. Two builds of one
Python function (``njit(cache=True)`` and ``njit(cache=True, parallel=True)``) would therefore
share one entry: each process would load whichever build was compiled first for both, so that
the "serial" kernel could run the threaded code or the other way round, and the speed of a call
depended on the order kernels were first compiled in on that machine. :func:`serial_and_parallel`
compiles each build from a copy of the function under its own name.
"""
from __future__ import annotations

import types

import numba as nb

__all__ = ["serial_and_parallel"]


def _renamed(fn, suffix: str):
    """A copy of the Python function ``fn`` (same code, globals, closure) named name + suffix."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                              fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__, copy.__doc__ = fn.__module__, fn.__doc__
    return copy


def serial_and_parallel(fn, *signature):
    """(serial, parallel) Numba builds of ``fn`` (``prange`` loops run in threads in the second),
    cached on disk separately; ``signature``: optional, as for ``numba.njit``. Both builds give
    the same numbers where ``fn``'s results do not depend on how its loops are split."""
    serial = nb.njit(*signature, cache=True)(_renamed(fn, "_serial"))
    parallel = nb.njit(*signature, cache=True, parallel=True)(_renamed(fn, "_parallel"))
    return serial, parallel
