"""Atomic training checkpoints (temp file + ``os.replace``), state dicts only (no pickled objects).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
:func:`torch.save` and read back with ``weights_only=True``; a reader therefore never runs code
from the file. A killed writer leaves the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

import torch

__all__ = ["atomic_save", "atomic_path", "load_checkpoint", "fingerprint"]


def fingerprint(settings: dict) -> str:
    """A short hex digest of JSON-serialisable settings (names checkpoints of one recipe)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def atomic_save(obj: dict, path) -> None:
    """Write ``obj`` with :func:`torch.save` to a temp file beside ``path``, then rename it.

    Parameters
    ----------
    obj : dict
        State dicts and plain values.
    path : str or os.PathLike
        Destination; replaced only once the new file is complete.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp file name beside ``path``; on success it replaces ``path``, else vanishes.

    Parameters
    ----------
    path : str or os.PathLike, the destination (its folder is created)
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
