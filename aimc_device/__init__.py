"""aimc-device: PCM device models, an analog in-memory-computing crossbar simulator, and
hardware-aware training in PyTorch.

References
----------
.. [1] M. J. Rasch et al., "Hardware-aware training for large-scale and diverse deep learning
   inference workloads using in-memory computing-based accelerators", Nat. Commun. 14, 5282 (2023).
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("aimc-device")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

from . import pcm  # noqa: E402

__all__ = ["pcm", "__version__"]


def __getattr__(name):
    # Higher layers load on first use so that `import aimc_device` stays light.
    import importlib

    if name in ("io", "fit", "crossbar", "nn", "study", "workloads"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
