"""Keep freed heap memory in the process during training (glibc only). Private.

An HWA training step allocates and frees the same large buffers every step (stage outputs, ADC
levels, masks, the products of the convolutions, their gradients). With glibc's default
policy the freed top of the heap is returned to the operating system, and the next step takes
it back page by page: on a 2-core x86-64 VM about 2000-3000 page faults per step of the small
CNN of ``benchmarks/bench_nn.py``, some 4 ms of a 20 ms step, and the floating-point model run
in the same process afterwards paid them too. Keeping up to ``trim_threshold`` of freed memory
(and serving blocks up to ``mmap_threshold`` from the heap, glibc's own ceiling for its dynamic
threshold) brings that to a few dozen faults per step.

It changes the allocator of the whole process, so it is an opt-in call,
:func:`aimc_device.nn.retain_freed_memory`, for a script that trains (the benchmarks call it);
importing the package leaves the allocator alone. Elsewhere than glibc (macOS, Windows, musl)
it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["retain_freed_memory"]

# mallopt parameter numbers of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(trim_threshold: int = 128 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS every step.

    Parameters
    ----------
    trim_threshold : int, bytes of free memory at the top of the heap kept before trimming
    mmap_threshold : int, bytes above which a block gets its own mapping (32 MiB: glibc's
        maximum for its dynamic threshold)

    Returns
    -------
    bool, whether the settings were applied (False where the C library is not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no such knobs
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
