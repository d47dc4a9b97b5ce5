"""Device cards: a device model of either family with its provenance in HDF5 (never pickle).

Layout (schema ``aimc-device/pcm-device-card``):

- root attrs ``schema``, ``schema_version``, ``family`` ("pcm" or "empirical"; a card without it
  is a PCM card) and the string fields of the model (PCM: ``name``, ``citation``,
  ``read_noise_time``, ``read_noise_reference``; empirical: ``name``, ``citation``,
  ``read_noise_source``);
- ``/model/<field>``: one float64 dataset per numeric field of the model (scalar or array), with
  attr ``units`` from the model class's ``UNITS``; an empirical card's optional fields
  (``t_read``, ``activation_energy``) are absent when None; a PCM card without one of
  ``PCMModel.OPTIONAL_FIELDS`` (``activation_energy``, ``reference_temperature``: written by
  later versions) loads with the field's default;
- ``/uncertainty`` (optional; a fitted PCM card): dataset ``covariance`` (P, P) of the fitted
  parameters with attr ``parameters`` (their names, ``field`` or ``field[i]``) and dataset
  ``values`` (P,), the fitted values (see :class:`aimc_device.pcm.ParameterCovariance`); a
  card without it loads as before and has no calibration uncertainty (readers of older
  versions ignore the group);
- ``/provenance`` attrs: ``source_file``, ``source_sha256``, ``fit_function``,
  ``package_version``, ``date`` (unless left out) and anything else passed in (strings or
  numbers).

Versions: 1, a PCM card (its layout unchanged; PCM cards are still written as version 1, so
older readers load them); 2 adds the ``family`` attribute and the empirical family (an empirical
card is version 2: older readers refuse it with "unsupported version").
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os

import h5py
import numpy as np

from ..pcm import EmpiricalModel, ParameterCovariance, PCMModel
from ._atomic import atomic_output, check_output
from ._errors import DeviceCardError
from .measurements import _clean_attr, _open, _schema_version, file_sha256

__all__ = ["CARD_SCHEMA", "CARD_SCHEMA_VERSION", "save_device_model", "load_device_model",
           "load_device_card", "load_device_uncertainty", "resolve_device_model", "is_card_path",
           "model_family", "model_to_dict", "model_from_dict", "DEVICE_MODELS"]

CARD_SCHEMA = "aimc-device/pcm-device-card"
#: The newest card version this package reads (see the module docstring).
CARD_SCHEMA_VERSION = 2
#: family -> (model class, version written)
_FAMILIES = {"pcm": (PCMModel, 1), "empirical": (EmpiricalModel, 2)}
#: The device-model classes (either family), for isinstance checks.
DEVICE_MODELS = (PCMModel, EmpiricalModel)


def _string_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.UNITS)


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_device_model(model, path, provenance: dict | None = None, *,
                      uncertainty: ParameterCovariance | None = None,
                      overwrite: bool = False) -> dict:
    """Save a device model as an HDF5 device card, atomically.

    Parameters
    ----------
    model : PCMModel or EmpiricalModel
    path : str or os.PathLike
        Destination file; replaced only when complete. It may replace a device card; it is never
        the campaign named by ``provenance["source_file"]`` and, unless ``overwrite``, never an
        existing file of another kind (a campaign, a checkpoint, ...): see
        :func:`aimc_device.io.check_output`.
    provenance : dict, optional
        ``source_file`` (the campaign fitted), ``source_sha256`` (computed from ``source_file``
        when missing and the file exists), ``fit_function``, and any other str/number entries.
        ``package_version`` and ``date`` (ISO 8601, UTC) are filled in when absent;
        ``date=None`` writes no date (with the same model and provenance, the same file, byte
        for byte: no HDF5 object carries a timestamp either).
    uncertainty : ParameterCovariance, optional
        The covariance of the fitted parameters (from
        :meth:`aimc_device.fit.FitReport.parameter_covariance`), written to ``/uncertainty``;
        its parameters must be fields of ``model``.
    overwrite : bool
        Replace an existing file of another kind too.

    Returns
    -------
    dict, the provenance written.

    Raises
    ------
    OutputRefusedError
        When ``path`` is the source campaign or an existing file of another kind.
    """
    family = model_family(model)
    if provenance is not None and not isinstance(provenance, dict):
        raise TypeError(f"provenance: expected a dict or None, got {type(provenance).__name__}")
    if uncertainty is not None:
        if not isinstance(uncertainty, ParameterCovariance):
            raise TypeError(f"uncertainty: expected an aimc_device.pcm.ParameterCovariance or "
                            f"None, got {type(uncertainty).__name__}")
        uncertainty.check_model(model)
    cls, version = _FAMILIES[family]
    prov = {"source_file": "", "source_sha256": "", "fit_function": ""}
    prov.update({k: v for k, v in (provenance or {}).items() if v is not None})
    src = prov.get("source_file")
    check_output(path, CARD_SCHEMA, inputs=src or None, overwrite=overwrite)  # before hashing
    if src and not prov.get("source_sha256") and os.path.isfile(src):
        prov["source_sha256"] = file_sha256(src)
    prov.setdefault("package_version", _package_version())
    if "date" not in (provenance or {}):
        prov["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_output(path, CARD_SCHEMA, inputs=src or None,
                       overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema"] = CARD_SCHEMA
        f.attrs["schema_version"] = version
        f.attrs["family"] = family
        for name in _string_fields(cls):
            f.attrs[name] = str(getattr(model, name))
        grp = f.create_group("model")
        for name, unit in cls.UNITS.items():
            if getattr(model, name) is None:  # an optional field (empirical family)
                continue
            d = grp.create_dataset(name, data=np.asarray(getattr(model, name),
                                                         dtype=np.float64), track_times=False)
            d.attrs["units"] = unit
        if uncertainty is not None:
            ug = f.create_group("uncertainty")
            d = ug.create_dataset("covariance", data=uncertainty.covariance, track_times=False)
            d.attrs["parameters"] = np.array(uncertainty.parameters, dtype=h5py.string_dtype())
            d.attrs["units"] = "product of the parameters' units"
            ug.create_dataset("values", data=uncertainty.values, track_times=False)
        pg = f.create_group("provenance")
        for key, value in prov.items():
            if isinstance(value, (str, int, float, bool, np.generic)):
                pg.attrs[key] = value
            else:
                pg.attrs[key] = str(value)
    return prov


def load_device_card(path) -> tuple[PCMModel | EmpiricalModel, dict]:
    """Load a device card: the model and its provenance.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    (PCMModel or EmpiricalModel, dict)
        The model of the card's family (bit-exact as saved) and the provenance attributes.

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
        version = _schema_version(path, f.attrs.get("schema_version", 0), CARD_SCHEMA_VERSION,
                                  DeviceCardError)
        family = str(_clean_attr(f.attrs.get("family", "pcm")))
        if family not in _FAMILIES:
            raise DeviceCardError(path, "attrs['family']", f"unknown family {family!r}",
                                  f"known families: {sorted(_FAMILIES)}")
        cls, needs = _FAMILIES[family]
        if version < needs:
            raise DeviceCardError(path, "attrs['schema_version']", f"version {version} has no "
                                  f"{family} family", "save the card again")
        optional = getattr(cls, "OPTIONAL", ())
        kwargs = {}
        for name in _string_fields(cls):
            if name not in f.attrs:
                raise DeviceCardError(path, f"attrs['{name}']", "missing", "save it again")
            kwargs[name] = str(_clean_attr(f.attrs[name]))
        if "model" not in f:
            raise DeviceCardError(path, "/model", "missing group", "save it again")
        arrays = getattr(cls, "ARRAYS", ())
        defaulted = getattr(cls, "OPTIONAL_FIELDS", ())
        for name, unit in cls.UNITS.items():
            if name not in f["model"]:
                if name in defaulted:
                    continue  # a card written before the field existed: the default
                if name in optional:
                    kwargs[name] = None
                    continue
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
            if name in arrays:
                kwargs[name] = np.asarray(value, dtype=np.float64)
            else:
                kwargs[name] = (tuple(float(v) for v in value) if np.ndim(value)
                                else float(value))
        prov = ({k: _clean_attr(v) for k, v in f["provenance"].attrs.items()}
                if "provenance" in f else {})
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DeviceCardError(path, "/model", str(exc), "the card holds an invalid model")
    return model, prov


def load_device_model(path) -> PCMModel | EmpiricalModel:
    """Load the model of a device card, whichever family it holds (see
    :func:`load_device_card`)."""
    return load_device_card(path)[0]


def model_family(model) -> str:
    """The family of a device model: "pcm" or "empirical"; a TypeError for anything else."""
    family = next((k for k, (cls, _) in _FAMILIES.items() if isinstance(model, cls)), None)
    if family is None:
        raise TypeError(f"model: expected a PCMModel or an EmpiricalModel, got "
                        f"{type(model).__name__}")
    return family


def model_to_dict(model) -> dict:
    """A device model of either family as plain data (JSON-serialisable, picklable), the
    inverse of :func:`model_from_dict`: a PCM model's ``to_dict()`` as it is (so that
    ``PCMModel(**d)`` still reads it), ``{"family": "empirical", **model.to_dict()}`` for the
    empirical family."""
    family = model_family(model)
    return model.to_dict() if family == "pcm" else {"family": family, **model.to_dict()}


def model_from_dict(d: dict):
    """The device model of a :func:`model_to_dict` dict (a dict without ``family`` is a PCM
    model's ``to_dict()``)."""
    d = dict(d)
    family = d.pop("family", "pcm")
    if family not in _FAMILIES:
        raise ValueError(f"device model: unknown family {family!r}; known families: "
                         f"{sorted(_FAMILIES)}")
    return _FAMILIES[family][0](**d)


def is_card_path(name) -> bool:
    """Whether a device argument names a device card rather than a preset: an os.PathLike, or
    a string ending in .h5/.hdf5, holding a path separator or naming an existing file."""
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and (name.endswith((".h5", ".hdf5")) or os.sep in name
                                      or os.path.isfile(name))


def resolve_device_model(device, *, default=None, what: str = "device",
                         provenance: bool = False):
    """The device model a caller named: a model of either family, a preset name or the path of
    a device card; the one resolver behind every ``device=`` argument and ``--device`` option.

    Parameters
    ----------
    device : PCMModel, EmpiricalModel, str, os.PathLike or None
        A model (returned as is); a device card's path (see :func:`is_card_path`), loaded with
        :func:`load_device_card` whichever family it holds; any other string a PCM preset name
        (:meth:`aimc_device.pcm.PCMModel.preset`); None: ``default``.
    default : model, str or None
        What None means (resolved the same way); None: None is returned (ideal devices, where
        the caller allows them).
    what : str
        The argument's name in error messages.
    provenance : bool
        Also return where the model came from.

    Returns
    -------
    model, or (model, dict) with ``provenance``: ``source`` ("model object", "preset" or
    "device card"), ``name``, ``citation``, ``family``; for a card also ``card_path``,
    ``card_sha256`` and the card's own provenance as ``card_<key>``. (None, {}) for None.

    Raises
    ------
    TypeError
        ``device`` of another type (naming ``what``).
    FileNotFoundError
        A card path that does not exist.
    KeyError
        An unknown preset name (the message lists the presets).
    DeviceCardError
        A file that is not a valid device card.
    """
    if device is None:
        device = default
    if device is None:
        return (None, {}) if provenance else None
    if isinstance(device, DEVICE_MODELS):
        model, prov = device, {"source": "model object"}
    elif isinstance(device, (str, os.PathLike)):
        name = os.fspath(device)
        if is_card_path(device):
            if not os.path.isfile(name):
                raise FileNotFoundError(f"{what}: {name}: no such device card (give a preset "
                                        f"name, one of {PCMModel.presets()}, or the path of a "
                                        "card written by aimc-device fit)")
            model, card = load_device_card(name)
            prov = {"source": "device card", "card_path": os.path.abspath(name),
                    "card_sha256": file_sha256(name)}
            prov.update({f"card_{k}": v for k, v in card.items()})
        else:
            model, prov = PCMModel.preset(name), {"source": "preset"}
    else:
        raise TypeError(f"{what}: expected a device model (PCMModel or EmpiricalModel), a preset "
                        f"name, the path of a device card or None, got {type(device).__name__}")
    if not provenance:
        return model
    prov.update(name=model.name, citation=model.citation, family=model_family(model))
    return model, prov


def load_device_uncertainty(path) -> ParameterCovariance | None:
    """The calibration uncertainty a device card keeps, or None (a preset's card, an empirical
    card, a card written before cards kept it).

    Parameters
    ----------
    path : str or os.PathLike, a device card

    Returns
    -------
    aimc_device.pcm.ParameterCovariance or None

    Raises
    ------
    DeviceCardError
        The card is not readable (see :func:`load_device_card`) or its ``/uncertainty`` group
        is malformed (names, shapes, a covariance that is not one).
    """
    model, _ = load_device_card(path)
    path = os.path.abspath(os.fspath(path))
    with _open(path) as f:
        if "uncertainty" not in f:
            return None
        g = f["uncertainty"]
        try:
            cov = g["covariance"]
            names = [_clean_attr(v) for v in cov.attrs["parameters"]]
            unc = ParameterCovariance(tuple(str(n) for n in names), g["values"][()], cov[()])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceCardError(path, "/uncertainty", f"malformed ({exc})",
                                  "save the card again") from None
    try:
        unc.check_model(model)
    except ValueError as exc:
        raise DeviceCardError(path, "/uncertainty", str(exc), "save the card again") from None
    return unc
