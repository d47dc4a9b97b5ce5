"""Device cards: a :class:`~aimc_device.pcm.PCMModel` with its provenance in HDF5 (never pickle).

Layout (schema ``aimc-device/pcm-device-card``, version 1):

- root attrs ``schema``, ``schema_version``, ``name``, ``citation``, ``read_noise_time``,
  ``read_noise_reference`` (the string fields of the model);
- ``/model/<field>``: one float64 dataset per numeric field of PCMModel (scalar or 1-D), with attr
  ``units`` from ``PCMModel.UNITS``;
- ``/provenance`` attrs: ``source_file``, ``source_sha256``, ``fit_function``,
  ``package_version``, ``date`` (unless left out) and anything else passed in (strings or
  numbers).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os

import h5py
import numpy as np

from ..pcm import PCMModel
from ._atomic import atomic_output
from ._errors import DeviceCardError
from .measurements import _clean_attr, _open, file_sha256

__all__ = ["CARD_SCHEMA", "CARD_SCHEMA_VERSION", "save_device_model", "load_device_model",
           "load_device_card"]

CARD_SCHEMA = "aimc-device/pcm-device-card"
CARD_SCHEMA_VERSION = 1
_STRING_FIELDS = tuple(f.name for f in dataclasses.fields(PCMModel) if f.name not in PCMModel.UNITS)


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_device_model(model: PCMModel, path, provenance: dict | None = None) -> dict:
    """Save a device model as an HDF5 device card, atomically.

    Parameters
    ----------
    model : PCMModel
    path : str or os.PathLike
        Destination file; replaced only when complete.
    provenance : dict, optional
        ``source_file`` (the campaign fitted), ``source_sha256`` (computed from ``source_file``
        when missing and the file exists), ``fit_function``, and any other str/number entries.
        ``package_version`` and ``date`` (ISO 8601, UTC) are filled in when absent;
        ``date=None`` writes no date (with the same model and provenance, the same file, byte
        for byte: no HDF5 object carries a timestamp either).

    Returns
    -------
    dict, the provenance written.
    """
    if not isinstance(model, PCMModel):
        raise TypeError(f"model: expected a PCMModel, got {type(model).__name__}")
    prov = {"source_file": "", "source_sha256": "", "fit_function": ""}
    prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
    src = prov.get("source_file")
    if src and not prov.get("source_sha256") and os.path.isfile(src):
        prov["source_sha256"] = file_sha256(src)
    prov.setdefault("package_version", _package_version())
    if "date" not in (provenance or {}):
        prov["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema"] = CARD_SCHEMA
        f.attrs["schema_version"] = CARD_SCHEMA_VERSION
        for name in _STRING_FIELDS:
            f.attrs[name] = str(getattr(model, name))
        grp = f.create_group("model")
        for name, unit in PCMModel.UNITS.items():
            d = grp.create_dataset(name, data=np.asarray(getattr(model, name),
                                                         dtype=np.float64), track_times=False)
            d.attrs["units"] = unit
        pg = f.create_group("provenance")
        for key, value in prov.items():
            if isinstance(value, (str, int, float, bool, np.generic)):
                pg.attrs[key] = value
            else:
                pg.attrs[key] = str(value)
    return prov


def load_device_card(path) -> tuple[PCMModel, dict]:
    """Load a device card: the model and its provenance.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    (PCMModel, dict)
        The model (bit-exact as saved) and the provenance attributes.

    Raises
    ------
    DeviceCardError
        (a ValueError) naming the file and field: not HDF5, truncated, unknown schema or newer
        version, missing field, wrong or missing units, invalid values.
    """
    path = os.path.abspath(os.fspath(path))
    with _open(path) as f:
        schema = _clean_attr(f.attrs.get("schema"))
        if schema != CARD_SCHEMA:
            raise DeviceCardError(path, "attrs['schema']", f"not a device card (schema "
                                  f"{schema!r})", f"expected {CARD_SCHEMA!r}; write it with "
                                  "aimc_device.io.save_device_model")
        version = int(_clean_attr(f.attrs.get("schema_version", 0)))
        if version > CARD_SCHEMA_VERSION or version < 1:
            raise DeviceCardError(path, "attrs['schema_version']", f"unsupported version "
                                  f"{version}", f"this reader knows 1..{CARD_SCHEMA_VERSION}")
        kwargs = {}
        for name in _STRING_FIELDS:
            if name not in f.attrs:
                raise DeviceCardError(path, f"attrs['{name}']", "missing", "save it again")
            kwargs[name] = str(_clean_attr(f.attrs[name]))
        if "model" not in f:
            raise DeviceCardError(path, "/model", "missing group", "save it again")
        for name, unit in PCMModel.UNITS.items():
            if name not in f["model"]:
                raise DeviceCardError(path, f"/model/{name}", "missing field", "save it again")
            d = f["model"][name]
            got = _clean_attr(d.attrs.get("units"))
            if got is None:
                raise DeviceCardError(path, f"/model/{name}", "missing units attribute",
                                      f"expected units {unit!r}")
            if got != unit:
                raise DeviceCardError(path, f"/model/{name}", f"units {got!r}",
                                      f"expected {unit!r} (SI)")
            value = d[()]
            kwargs[name] = (tuple(float(v) for v in value) if np.ndim(value) else float(value))
        prov = ({k: _clean_attr(v) for k, v in f["provenance"].attrs.items()}
                if "provenance" in f else {})
    try:
        model = PCMModel(**kwargs)
    except ValueError as exc:
        raise DeviceCardError(path, "/model", str(exc), "the card holds an invalid model")
    return model, prov


def load_device_model(path) -> PCMModel:
    """Load the :class:`PCMModel` of a device card (see :func:`load_device_card`)."""
    return load_device_card(path)[0]
