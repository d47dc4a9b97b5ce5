"""Atomic training checkpoints (temp file + ``os.replace``), state dicts only (no pickled objects).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
:func:`torch.save` through :func:`aimc_device.io.atomic_output` and read back with
``weights_only=True``; a reader therefore never runs code from the file. A killed writer leaves
the previous checkpoint intact (and its temporary file is removed by the next write).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch

from ..io import KIND_CHECKPOINT, atomic_output

__all__ = ["atomic_save", "atomic_path", "load_checkpoint", "fingerprint"]


def fingerprint(settings: dict) -> str:
    """A short hex digest of JSON-serialisable settings (names checkpoints of one recipe)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def atomic_save(obj: dict, path, overwrite: bool = False) -> None:
    """Write ``obj`` with :func:`torch.save` to a temp file beside ``path``, then rename it.

    Parameters
    ----------
    obj : dict
        State dicts and plain values.
    path : str or os.PathLike
        Destination; replaced only once the new file is complete. An existing file of another
        kind than a checkpoint is refused unless ``overwrite``.
    overwrite : bool
    """
    with atomic_path(path, KIND_CHECKPOINT, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_path(path, kind: str, overwrite: bool = False):
    """:func:`aimc_device.io.atomic_output` into a folder that is created when missing.

    Parameters
    ----------
    path : str or os.PathLike, the destination
    kind : str, what is written (``aimc_device.io.KIND_*``)
    overwrite : bool, replace an existing file of another kind too
    """
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_output(path, kind, overwrite=overwrite) as tmp:
        yield tmp


def load_checkpoint(path, settings: dict | None = None) -> dict | None:
    """Read a checkpoint written by :func:`atomic_save`, or None when there is none.

    Parameters
    ----------
    path : str or os.PathLike
    settings : dict, optional
        When given, the checkpoint's ``"settings"`` entry must equal it; a checkpoint of another
        recipe raises ValueError naming the file (delete it or choose another output folder).

    Returns
    -------
    dict or None
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({exc}); delete it to start "
                         "again") from None
    if settings is not None and json.loads(ck.get("settings", "null")) != json.loads(
            json.dumps(settings, sort_keys=True, default=str)):
        raise ValueError(f"{path}: checkpoint of other settings; delete it or use another "
                         "output folder")
    return ck
