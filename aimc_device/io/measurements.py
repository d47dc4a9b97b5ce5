"""PCM measurement campaigns in HDF5 <-> ``xarray.Dataset``, read lazily by device chunks.

The schema (docs/measurement-format.md) in short:

- ``/g_target`` (N,) target conductance, attr ``units`` (S, mS, uS or nS);
- ``/g`` (N, T, R) conductance read R times at each of T times after programming, attr ``units``;
  NaN marks a read not taken (a missing read); inf and negative values are errors;
- ``/time`` (T,) read times after the end of programming, strictly increasing, attr ``units``
  (s, ms, us, ns, min, h or d); or (N, T), one row of read times per device (version 2), with
  an optional attr ``nominal`` (T,) of the nominal times;
- ``/temperature`` (T,), optional (version 2): the temperature during the interval that ends
  with each read (a bake), attr ``units`` (K or degC);
- ``/valid`` (N,), optional (version 2): bool or 0/1, False drops the device;
- root attrs ``g_max`` and ``t0`` with ``g_max_units`` and ``t0_units``; optional ``t_read`` (with
  ``t_read_units``), ``technology``, ``temperature`` (with ``temperature_units``: the
  measurement's reference temperature), ``activation_energy`` [eV], ``date``, ``source``;
  ``schema = "aimc-device/pcm-campaign"`` and ``schema_version`` (1 or 2).

:func:`read_measurements` returns a Dataset whose ``g``, ``g_target``, ``valid`` and per-device
``read_time`` are dask arrays that read the file one device chunk at a time, so files larger than
memory can be processed; everything in it is in SI units (siemens, seconds, kelvin).
:func:`iter_device_chunks` yields loaded device chunks for streaming fits; :func:`read_counts`
counts missing reads, dead and invalid devices; :class:`DeviceExclusion` drops devices by index
or by rule.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import h5py
import numpy as np
import xarray as xr

from .._checks import check_int
from ._atomic import atomic_output
from ._errors import MeasurementFormatError

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "CONDUCTANCE_UNITS", "TIME_UNITS", "TEMPERATURE_UNITS",
    "DEFAULT_REFERENCE_TEMPERATURE", "NEAR_ZERO", "STUCK_SPAN", "STUCK_EDGE",
    "SIMULATED_CAMPAIGN", "campaign_kind",
    "read_measurements", "write_measurements", "iter_device_chunks", "iter_device_arrays",
    "device_chunk_reader", "campaign_chunk_devices",
    "file_sha256",
    "default_chunk_devices",
    "ReadCounts", "read_counts", "DeviceExclusion", "ExclusionRecord", "has_v2_features",
    "field_name", "EXCLUSION_REASONS", "check_conductances", "check_read_times", "check_campaign",
    "root_quantity", "target_levels", "VECTOR_CHUNK_DEVICES",
]

SCHEMA = "aimc-device/pcm-campaign"
#: The version this package writes when a campaign uses missing reads, per-device read times,
#: temperatures or a valid mask (version 2); otherwise it writes version 1. It reads both.
SCHEMA_VERSION = 2
#: The kind of output of a campaign made by a simulation (``technology`` ending in
#: "(simulated)", as :func:`aimc_device.pcm.simulate_campaign` writes it): it never replaces a
#: measured campaign (kind :data:`SCHEMA`) unless told to.
SIMULATED_CAMPAIGN = SCHEMA + " (simulated)"
#: Accepted conductance units and their factor to siemens.
CONDUCTANCE_UNITS = {"S": 1.0, "mS": 1e-3, "uS": 1e-6, "µS": 1e-6, "nS": 1e-9}
#: Accepted time units and their factor to seconds.
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0,
              "h": 3600.0, "d": 86400.0}
#: Accepted temperature units and their offset to kelvin.
TEMPERATURE_UNITS = {"K": 0.0, "degC": 273.15}
#: Reference temperature [K] of a campaign whose file states none (room temperature).
DEFAULT_REFERENCE_TEMPERATURE = 300.0
#: A read below NEAR_ZERO * g_max counts as ~0 S (dead devices), dimensionless.
NEAR_ZERO = 1e-3
#: Rule ``stuck``: a device whose reads span at most STUCK_SPAN * g_max and whose mean read lies
#: within STUCK_EDGE * g_max of 0 or of g_max (dimensionless).
STUCK_SPAN = 0.01
STUCK_EDGE = 0.05
_REQUIRED = {"g_target": (1,), "g": (3,), "time": (1, 2)}
#: Attributes the reader derives from the data; the writer does not copy them into a file.
_DERIVED_ATTRS = ("source_file", "n_missing_reads", "n_dead_devices", "n_invalid_devices",
                  "schema", "schema_version")
_DOC = "see docs/measurement-format.md"
#: Bytes of ``g`` per device chunk when none is given: 16 MiB keeps memory flat and stays under
#: glibc's mmap threshold, so chunk buffers are reused instead of freshly page-faulted.
CHUNK_BYTES = 16 * 2**20


def default_chunk_devices(n_time: int, n_repeat: int, itemsize: int = 4,
                          chunk_bytes: int = CHUNK_BYTES) -> int:
    """Devices per chunk so that one chunk of ``g`` holds about ``chunk_bytes`` bytes [B]."""
    return max(1, int(chunk_bytes // max(1, n_time * n_repeat * itemsize)))


def _attr_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value[()])
    return str(value)


def _clean_attr(value):
    """An HDF5 attribute value as a plain Python scalar or string."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def campaign_kind(attrs) -> str:
    """:data:`SIMULATED_CAMPAIGN` for a campaign whose ``technology`` attribute ends in
    "(simulated)", else :data:`SCHEMA` (a measurement) (see :func:`aimc_device.io.file_kind`)."""
    tech = _attr_str(attrs.get("technology")) or ""
    return SIMULATED_CAMPAIGN if tech.rstrip().endswith("(simulated)") else SCHEMA


def _schema_version(path, value, newest: int, error=MeasurementFormatError) -> int:
    """The ``schema_version`` attribute as an int in 1..newest, else ``error`` naming it."""
    value = _clean_attr(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not np.isfinite(value) or value != int(value):
        raise error(path, "attrs['schema_version']", f"{value!r} is not a version number",
                    f"this reader knows versions 1..{newest}")
    if not 1 <= int(value) <= newest:
        raise error(path, "attrs['schema_version']", f"unsupported version {int(value)}",
                    f"this reader knows versions 1..{newest}" + (
                        "; update aimc-device" if value > newest else ""))
    return int(value)


def _to_si(value, factor: float):
    """value * factor, computed as a division for sub-units (25 uS -> exactly 2.5e-05 S)."""
    if factor == 1.0:
        return value
    return value / round(1.0 / factor) if factor < 1.0 else value * factor


def _unit_factor(path, field: str, units, table: dict) -> float:
    u = _attr_str(units)
    if u is None:
        raise MeasurementFormatError(path, field, "missing units attribute",
                                     f"add attrs['units'] = one of {list(table)} ({_DOC})")
    if u not in table:
        raise MeasurementFormatError(path, field, f"unknown units {u!r}",
                                     f"use one of {list(table)} ({_DOC})")
    return table[u]


def _check_finite(path, field: str, arr: np.ndarray, offset: int = 0,
                  allow_nan: bool = False) -> None:
    """Raise naming the first NaN or inf (inf only with ``allow_nan``); ``offset`` is added to
    the device (first) index."""
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), arr.shape)
        idx = (idx[0] + offset,) + tuple(idx[1:])
        what = "inf" if allow_nan else "NaN or inf"
        fix = ("store NaN for a read not taken; every read taken must be finite" if allow_nan
               else "remove or re-measure those devices; every value must be finite")
        raise MeasurementFormatError(
            path, field, f"{what} at index {tuple(int(i) for i in idx)}", fix)


def check_conductances(path, field: str, arr: np.ndarray, offset: int = 0,
                       allow_nan: bool = False) -> float:
    """Finite (or NaN, with ``allow_nan``: a read not taken) and >= 0; ``offset`` is the first
    device of a chunk (for the message). Returns the largest value (0 for none) [S]."""
    arr = np.asarray(arr)
    # Two cheap reductions first (fmin/fmax skip NaN); locate the culprit only when something is
    # wrong.
    reduce_lo, reduce_hi = (np.fmin, np.fmax) if allow_nan else (np.minimum, np.maximum)
    lo = reduce_lo.reduce(arr, axis=None, initial=0.0) if arr.size else 0.0
    hi = reduce_hi.reduce(arr, axis=None, initial=0.0) if arr.size else 0.0
    if not (np.isfinite(lo) and np.isfinite(hi)):
        _check_finite(path, field, arr, offset, allow_nan)
    if lo < 0:
        idx = np.unravel_index(int(np.nanargmin(arr)), arr.shape)
        idx = (idx[0] + offset,) + tuple(idx[1:])
        raise MeasurementFormatError(
            path, field, f"negative conductance {float(lo):.3g} at index "
            f"{tuple(int(i) for i in idx)}", "conductances are >= 0; clip the reads at 0 or "
            "check the sign convention and units")
    return float(hi)


def check_read_times(path, field: str, t: np.ndarray, offset: int = 0) -> None:
    """Per-device read times (n, T) [s]: finite, >= 0, strictly increasing along each row."""
    _check_finite(path, field, t, offset)
    if np.any(t < 0):
        i = np.unravel_index(int(np.argmin(t)), t.shape)
        raise MeasurementFormatError(path, field, f"negative read time at index "
                                     f"({i[0] + offset}, {i[1]})", "times are measured from the "
                                     "end of programming, >= 0")
    if t.shape[1] > 1:
        bad = np.diff(t, axis=1) <= 0
        if bad.any():
            i, k = np.unravel_index(int(np.argmax(bad)), bad.shape)
            raise MeasurementFormatError(
                path, field, f"read times of device {i + offset} not increasing (time[{k}] = "
                f"{t[i, k]:.6g} >= time[{k + 1}] = {t[i, k + 1]:.6g})", "each device's times "
                "must increase strictly; for a read not taken store the time it was scheduled")


def _check_time(path, field: str, t: np.ndarray) -> None:
    _check_finite(path, field, t)
    if np.any(t < 0):
        raise MeasurementFormatError(path, field, "negative read time",
                                     "times are measured from the end of programming, >= 0")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        k = int(np.argmax(np.diff(t) <= 0))
        raise MeasurementFormatError(
            path, field, f"read times not increasing (time[{k}] = {t[k]:.6g} >= "
            f"time[{k + 1}] = {t[k + 1]:.6g})", "sort the times (and g's time axis) so they "
            "increase strictly")


def _check_dtype(path, field: str, dtype) -> None:
    if not np.issubdtype(dtype, np.floating) or np.dtype(dtype).itemsize < 4:
        raise MeasurementFormatError(path, field, f"wrong dtype {np.dtype(dtype)}",
                                     "store it as float32 or float64")


def root_quantity(path, attrs, name: str, table: dict, required: bool) -> float | None:
    """Root attribute ``name`` with its ``{name}_units`` (a key of ``table``) in SI units, checked
    positive and finite; None when absent and not ``required``."""
    if name not in attrs:
        if required:
            raise MeasurementFormatError(path, f"attrs['{name}']", "missing root attribute",
                                         f"add it with attrs['{name}_units'] ({_DOC})")
        return None
    factor = _unit_factor(path, f"attrs['{name}_units']", attrs.get(f"{name}_units"), table)
    value = _scalar(path, attrs, name)
    if not np.isfinite(value) or value <= 0:
        raise MeasurementFormatError(path, f"attrs['{name}']", f"{value!r} is not a positive "
                                     "finite number", "store a positive value")
    return float(_to_si(value, factor))


def _scalar(path, attrs, name: str) -> float:
    try:
        return float(np.asarray(attrs[name]).reshape(()))
    except (TypeError, ValueError):
        raise MeasurementFormatError(path, f"attrs['{name}']", "not a single number",
                                     "store a scalar") from None


def _to_kelvin(path, field: str, values, units) -> np.ndarray:
    """Temperatures in ``units`` (K or degC) -> [K], checked finite and > 0 K."""
    offset = _unit_factor(path, field, units, TEMPERATURE_UNITS)
    kelvin = np.asarray(values, dtype=np.float64) + offset
    if not np.all(np.isfinite(kelvin)) or np.any(kelvin <= 0):
        raise MeasurementFormatError(path, field, "temperatures must be finite and above 0 K",
                                     f"check the values and the units ({_attr_str(units)})")
    return kelvin


def _reference_temperature(path, attrs) -> float:
    """The campaign's reference temperature [K]: root ``reference_temperature`` or
    ``temperature`` (with their ``_units``), else DEFAULT_REFERENCE_TEMPERATURE."""
    for name in ("reference_temperature", "temperature"):
        if name in attrs:
            value = _scalar(path, attrs, name)
            return float(_to_kelvin(path, f"attrs['{name}']", value,
                                    attrs.get(f"{name}_units")))
    return DEFAULT_REFERENCE_TEMPERATURE


def _median_times(path, f, n: int, ft: float) -> np.ndarray:
    """Nominal read times [s] of a per-device ``/time`` (N, T): its attr ``nominal`` when given,
    else the per-column median (exact up to 2**24 values, else of every k-th device)."""
    d = f["time"]
    if "nominal" in d.attrs:
        nominal = np.asarray(d.attrs["nominal"], dtype=np.float64).reshape(-1)
        if nominal.shape != (d.shape[1],):
            raise MeasurementFormatError(path, "/time.attrs['nominal']", f"shape {nominal.shape}"
                                         f": expected ({d.shape[1]},)", "one nominal time per "
                                         "column of /time")
        return _to_si(nominal, ft)
    step = max(1, -(-(n * d.shape[1]) // 2**24))
    try:
        rows = d[::step] if step > 1 else d[()]
    except OSError as exc:
        raise MeasurementFormatError(path, "/time", f"cannot read the data ({exc})",
                                     "the file is truncated or damaged") from None
    rows = _to_si(np.asarray(rows, dtype=np.float64), ft)
    check_read_times(path, "/time", rows)
    return np.median(rows, axis=0)


#: dask array name -> the _H5Slice behind it, for the direct (dask-free) streaming path.
_LAZY_SOURCES: dict = {}


def _raw_layout(dset: h5py.Dataset):
    """Where the rows of an unfiltered dataset lie in its file: ``(rows per block, byte offsets
    of the blocks)``, or None when the data must go through HDF5 (filters, compression,
    non-native byte order, chunks that split a row, unallocated storage)."""
    dcpl = dset.id.get_create_plist()
    if dcpl.get_nfilters() or not dset.dtype.isnative or dset.shape[0] == 0:
        return None
    if dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        return None if offset is None else (dset.shape[0], np.array([offset], np.int64))
    if dcpl.get_layout() != h5py.h5d.CHUNKED or tuple(dset.chunks[1:]) != dset.shape[1:] or \
            not hasattr(dset.id, "chunk_iter"):
        return None
    rows = dset.chunks[0]
    offsets = np.full(-(-dset.shape[0] // rows), -1, np.int64)

    def visit(info):
        if info.filter_mask == 0:
            offsets[info.chunk_offset[0] // rows] = info.byte_offset

    dset.id.chunk_iter(visit)
    return None if (offsets < 0).any() else (rows, offsets)


class _H5Slice:
    """A lazily read HDF5 dataset: opens the file for each slice (safe for dask threads).

    ``read_into`` reads rows straight from the file with ``os.preadv`` when the data are stored
    raw (no filters, native byte order, whole rows per chunk): the GIL is released during the
    read, so several threads read and compute at once, and nothing is copied twice.
    """

    def __init__(self, path: str, name: str, shape, dtype, factor: float = 1.0, layout=None,
                 file_dtype=None, convert=None):
        self.path, self.name = path, name
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.factor = factor
        # raw reads only when the file holds the values as they are served (bytes 0/1 are
        # bools: a one-byte /valid checked 0/1 when opened)
        same = file_dtype is None or np.dtype(file_dtype) == self.dtype or (
            self.dtype == np.bool_ and np.dtype(file_dtype).itemsize == 1)
        self.layout = layout if same and convert is None else None
        self.convert = convert  # file values -> served values (e.g. /valid 0/1 -> bool)
        self.checked = False  # values checked when the file was opened
        self.levels = None  # the distinct values (g_target), found when the file was opened

    def _unreadable(self, exc: OSError) -> MeasurementFormatError:
        return MeasurementFormatError(self.path, self.name, f"cannot read the data ({exc})",
                                      "the file is truncated or damaged; copy or export it again")

    def __getitem__(self, key):
        try:
            with h5py.File(self.path, "r") as f:
                out = f[self.name][key]
        except OSError as exc:
            raise self._unreadable(exc) from None
        if self.convert is not None:
            return self.convert(out)
        if self.factor != 1.0:
            out = _to_si(out, self.factor)
        return np.asarray(out).astype(self.dtype, copy=False)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows ``start:stop`` [SI] into the first rows of ``out`` (reused memory, no copy)."""
        view = out[:stop - start]
        if self.factor != 1.0 or self.convert is not None:
            view[...] = self[start:stop]
            return view
        if self.layout is None:
            try:
                with h5py.File(self.path, "r") as f:
                    f[self.name].read_direct(view, np.s_[start:stop])
            except OSError as exc:
                raise self._unreadable(exc) from None
            return view
        rows, offsets = self.layout
        row_bytes = view.itemsize * int(np.prod(self.shape[1:]))
        dest = memoryview(view.reshape(-1)).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            row = start
            while row < stop:
                block, first = divmod(row, rows)
                end = min(stop, (block + 1) * rows)
                want = (end - row) * row_bytes
                a = (row - start) * row_bytes
                got = os.preadv(fd, [dest[a:a + want]], int(offsets[block]) + first * row_bytes)
                if got != want:
                    raise MeasurementFormatError(
                        self.path, self.name, f"rows {row}:{end} end early ({got} of {want} "
                        "bytes)", "the file is truncated; copy or export it again")
                row = end
        finally:
            os.close(fd)
        return view


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise MeasurementFormatError(path, "file", "not an HDF5 file",
                                     f"convert the measurements to the HDF5 schema ({_DOC})")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        what = "truncated file" if "truncated" in str(exc) else f"cannot be opened ({exc})"
        raise MeasurementFormatError(path, "file", what,
                                     "the file is incomplete or damaged; copy or export it "
                                     "again") from None


def read_measurements(path, chunk_devices: int | None = None,
                      check_values: bool | None = None) -> xr.Dataset:
    """Open a PCM measurement campaign (HDF5, docs/measurement-format.md) lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file (schema version 1 or 2).
    chunk_devices : int, optional
        Devices per dask chunk of ``g``; default about 16 MiB per chunk.
    check_values : bool, optional
        Scan all of ``g`` (and per-device read times) now for inf, negative values and times
        that do not increase, and count missing reads and dead devices (one pass over the
        file). Default: only when ``g`` is under 1 GiB; larger files are checked chunk by chunk
        by whatever consumes them (the fits do). ``g_target``, ``/time`` (T,), ``/temperature``
        and ``/valid`` are always checked.

    Returns
    -------
    xarray.Dataset
        dims ``device`` (N), ``time`` (T), ``repeat`` (R); ``g_target(device)`` [S] (dask);
        ``g(device, time, repeat)`` [S] backed by a dask array, NaN = read not taken;
        coordinate ``time`` [s] (the nominal times: for a per-device ``/time`` its attr
        ``nominal`` or the per-column median); optional ``read_time(device, time)`` [s] (dask,
        from a per-device ``/time``), ``temperature(time)`` [K], ``valid(device)`` (bool, dask);
        the
        root attributes with ``g_max`` [S], ``t0`` [s], ``t_read`` [s],
        ``reference_temperature`` [K] (root ``temperature``, else 300 K) in SI units,
        ``schema_version``, ``source_file`` (the absolute path read) and, when the values were
        scanned, ``n_missing_reads``, ``n_dead_devices``, ``n_invalid_devices``
        (see :func:`read_counts` for the breakdown per device and time).

    Raises
    ------
    MeasurementFormatError
        (a ValueError) naming the file, the field and the fix: not an HDF5 file, truncated file,
        missing dataset, wrong shape or dtype, inf, negative conductance, targets above g_max,
        read times not increasing, missing or unknown units.
    FileNotFoundError
        When ``path`` does not exist.
    """
    import dask.array as da

    path = os.path.abspath(os.fspath(path))
    with _open(path) as f:
        for name, ndims in _REQUIRED.items():
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise MeasurementFormatError(path, f"/{name}", "missing dataset",
                                             f"write /{name} with {ndims[0]} dimension(s) "
                                             f"({_DOC})")
            if f[name].ndim not in ndims:
                want = " or ".join(str(d) for d in ndims)
                raise MeasurementFormatError(path, f"/{name}", f"wrong shape {f[name].shape}: "
                                             f"expected {want} dimension(s)", _DOC)
            _check_dtype(path, f"/{name}", f[name].dtype)
        n, gshape = f["g_target"].shape[0], f["g"].shape
        t_n = f["time"].shape[-1]
        if gshape[0] != n or gshape[1] != t_n:
            raise MeasurementFormatError(
                path, "/g", f"wrong shape {gshape}: expected (N={n}, T={t_n}, R) from /g_target "
                "and /time", "store g as (device, time, repeat)")
        if f["time"].ndim == 2 and f["time"].shape[0] != n:
            raise MeasurementFormatError(path, "/time", f"wrong shape {f['time'].shape}: "
                                         f"expected (T,) or (N={n}, T)", "one row of read "
                                         "times per device, or one row for all")
        if n == 0 or t_n == 0 or gshape[2] == 0:
            raise MeasurementFormatError(path, "/g", f"empty shape {gshape}",
                                         "a campaign needs devices, times and reads")
        attrs = {k: _clean_attr(v) for k, v in f.attrs.items()}
        schema = attrs.get("schema")
        if schema is not None and schema != SCHEMA:
            raise MeasurementFormatError(path, "attrs['schema']", f"unknown schema {schema!r}",
                                         f"expected {SCHEMA!r}")
        version = _schema_version(path, attrs.get("schema_version", 1), SCHEMA_VERSION)
        g_max = root_quantity(path, attrs, "g_max", CONDUCTANCE_UNITS, True)
        t0 = root_quantity(path, attrs, "t0", TIME_UNITS, True)
        t_read = root_quantity(path, attrs, "t_read", TIME_UNITS, False)
        t_ref = _reference_temperature(path, attrs)
        fg_t = _unit_factor(path, "/g_target", f["g_target"].attrs.get("units"),
                            CONDUCTANCE_UNITS)
        fg = _unit_factor(path, "/g", f["g"].attrs.get("units"), CONDUCTANCE_UNITS)
        ft = _unit_factor(path, "/time", f["time"].attrs.get("units"), TIME_UNITS)
        try:
            per_device = f["time"].ndim == 2
            time = (_median_times(path, f, n, ft) if per_device
                    else _to_si(f["time"][()].astype(np.float64), ft))
            temperature = valid = None
            if "temperature" in f:
                d = f["temperature"]
                if d.shape != (t_n,):
                    raise MeasurementFormatError(path, "/temperature", f"wrong shape {d.shape}: "
                                                 f"expected (T={t_n},)", "one temperature per "
                                                 "read time: the interval that ends with it")
                temperature = _to_kelvin(path, "/temperature", d[()], d.attrs.get("units"))
            if "valid" in f:
                valid = _valid_source(path, f["valid"], n)
        except OSError as exc:
            raise MeasurementFormatError(path, "/g_target", f"cannot read the data ({exc})",
                                         "the file is truncated or damaged") from None
        gdtype, hchunks = f["g"].dtype, f["g"].chunks
        layout = _raw_layout(f["g"])
        tshape, tdtype = f["time"].shape, f["time"].dtype
        tlayout = _raw_layout(f["time"]) if per_device else None
        target_src = _H5Slice(path, "g_target", (n,), gdtype, fg_t, _raw_layout(f["g_target"]),
                              file_dtype=f["g_target"].dtype)
    _scan_targets(target_src, g_max)
    _check_time(path, "/time", time)
    n_rep = gshape[2]
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(t_n, n_rep, gdtype.itemsize)
        if hchunks:  # align with the file's own chunks
            chunk_devices = max(hchunks[0], (chunk_devices // hchunks[0]) * hchunks[0])
    chunk_devices = int(min(max(1, chunk_devices), n))
    mtime = os.stat(path).st_mtime_ns
    key = hashlib.sha1(f"{path}{mtime}{chunk_devices}".encode()).hexdigest()
    src = _H5Slice(path, "g", gshape, gdtype, fg, layout)
    g = da.from_array(src, chunks=(chunk_devices, t_n, n_rep), lock=False, asarray=True,
                      name=f"aimc-g-{key}", meta=np.empty((0, 0, 0), gdtype))
    _LAZY_SOURCES[g.name] = src
    # g_target and valid stream like g (one number per device: larger chunks)
    vector_chunk = int(min(n, max(chunk_devices, VECTOR_CHUNK_DEVICES)))
    gt = da.from_array(target_src, chunks=(vector_chunk,), lock=False, asarray=True,
                       name=f"aimc-gt-{key}", meta=np.empty((0,), gdtype))
    _LAZY_SOURCES[gt.name] = target_src
    if valid is not None:
        valid_src = valid
        valid = da.from_array(valid_src, chunks=(vector_chunk,), lock=False, asarray=True,
                              name=f"aimc-valid-{key}", meta=np.empty((0,), bool))
        _LAZY_SOURCES[valid.name] = valid_src
    data_vars = {
        "g_target": (("device",), gt, {"units": "S", "long_name": "target conductance"}),
        "g": (("device", "time", "repeat"), g,
              {"units": "S", "long_name": "conductance read after programming (NaN: not read)"}),
    }
    tsrc = None
    if per_device:
        tsrc = _H5Slice(path, "time", tshape, tdtype, ft, tlayout)
        rt = da.from_array(tsrc, chunks=(chunk_devices, t_n), lock=False, asarray=True,
                           name=f"aimc-t-{key}", meta=np.empty((0, 0), tdtype))
        _LAZY_SOURCES[rt.name] = tsrc
        data_vars["read_time"] = (("device", "time"), rt,
                                  {"units": "s", "long_name": "read time of each device"})
    if temperature is not None:
        data_vars["temperature"] = (("time",), temperature, {
            "units": "K", "long_name": "temperature of the interval ending with the read"})
    if valid is not None:
        data_vars["valid"] = (("device",), valid, {"long_name": "device valid (False: drop)"})
    if check_values is None:
        check_values = g.nbytes <= 2**30
    attrs.update(g_max=g_max, g_max_units="S", t0=t0, t0_units="s", source_file=path,
                 reference_temperature=t_ref, reference_temperature_units="K")
    if t_read is not None:
        attrs.update(t_read=t_read, t_read_units="s")
    attrs.setdefault("schema", SCHEMA)
    attrs["schema_version"] = version
    ds = xr.Dataset(
        data_vars=data_vars,
        # No coordinate on ``device`` (the index is the device number): an int64 index would
        # cost 8 bytes per device of memory that does not stream.
        coords={
            "time": ("time", time, {"units": "s", "long_name": "time since end of programming"}),
            "repeat": np.arange(n_rep),
        },
        attrs=attrs,
    )
    if check_values:
        counts = read_counts(ds, chunk_devices)
        ds.attrs.update(n_missing_reads=counts.n_missing, n_dead_devices=counts.dead.size,
                        n_invalid_devices=counts.invalid.size)
    return ds


#: Devices per chunk of the per-device vectors (``g_target``, ``valid``) when scanned alone.
VECTOR_CHUNK_DEVICES = 2**22
#: Most distinct targets :func:`target_levels` keeps while scanning (beyond: no levels).
_MAX_LEVELS = 2**20


def _valid_source(path, d: h5py.Dataset, n: int) -> "_H5Slice":
    """``/valid`` (N,) bool or 0/1 integers as a lazy bool source, checked chunk by chunk now."""
    if d.shape != (n,):
        raise MeasurementFormatError(path, "/valid", f"wrong shape {d.shape}: expected (N={n},)",
                                     "one flag per device")
    dtype = d.dtype

    def to_bool(v):
        v = np.asarray(v)
        if v.dtype != np.bool_:
            if not np.issubdtype(v.dtype, np.integer) or not np.isin(v, (0, 1)).all():
                raise MeasurementFormatError(path, "/valid", f"values of dtype {dtype} that are "
                                             "not 0/1", "store bool or 0 (drop) / 1 (keep)")
            v = v != 0
        return v

    if dtype != np.bool_ and not np.issubdtype(dtype, np.integer):
        to_bool(np.zeros(1, dtype))  # raises naming the dtype
    src = _H5Slice(path, "valid", (n,), bool, convert=to_bool)
    if dtype != np.bool_:
        for start in range(0, n, VECTOR_CHUNK_DEVICES):
            src[start:min(n, start + VECTOR_CHUNK_DEVICES)]
    if dtype.itemsize == 1 and dtype.isnative:  # checked 0/1: its bytes are bools
        src = _H5Slice(path, "valid", (n,), bool, layout=_raw_layout(d), file_dtype=dtype)
    src.checked = True
    return src


def _run_heads(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``values`` (NaN dropped): the first value of each run of
    equal values, then np.unique of those (fast when equal targets are stored together)."""
    if values.size == 0:
        return values
    heads = values[np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])]
    return np.unique(heads[~np.isnan(heads)])


def _scan_targets(src: "_H5Slice", g_max: float) -> None:
    """Check ``/g_target`` chunk by chunk (finite, >= 0, <= g_max) and note its distinct
    values on ``src`` (None when there are more than _MAX_LEVELS)."""
    n = src.shape[0]
    top = 0.0
    levels = np.zeros(0, src.dtype)
    buf = np.empty(min(n, VECTOR_CHUNK_DEVICES), src.dtype)
    for start in range(0, n, VECTOR_CHUNK_DEVICES):
        chunk = src.read_into(start, min(n, start + VECTOR_CHUNK_DEVICES), buf)
        top = max(top, check_conductances(src.path, "/g_target", chunk, offset=start))
        if levels is not None:
            levels = np.union1d(levels, _run_heads(chunk))
            if levels.size > _MAX_LEVELS:
                levels = None
    _check_targets(src.path, "/g_target", np.array([top]), g_max)
    src.levels, src.checked = levels, True


def target_levels(ds: xr.Dataset, chunk_devices: int | None = None) -> np.ndarray:
    """The sorted distinct targets [S] of a campaign (NaN excluded), in ``g_target``'s dtype.

    For a Dataset from :func:`read_measurements` they were found when the file was opened;
    otherwise ``g_target`` is scanned chunk by chunk (memory independent of the devices).
    """
    src = _LAZY_SOURCES.get(getattr(ds["g_target"].data, "name", None))
    if src is not None and src.levels is not None:
        return src.levels.copy()
    n = ds.sizes["device"]
    read = device_chunk_reader(ds, "g_target")
    step = max(VECTOR_CHUNK_DEVICES, int(chunk_devices or 0))
    levels = np.zeros(0, ds["g_target"].dtype)
    for start in range(0, n, step):
        levels = np.union1d(levels, _run_heads(np.asarray(read(start, min(n, start + step)))))
    return levels


def _checked_source(ds: xr.Dataset, name: str) -> bool:
    """True when ``ds[name]`` streams from a file whose values were checked when opened."""
    src = _LAZY_SOURCES.get(getattr(ds[name].data, "name", None))
    return src is not None and src.checked


def _check_targets(path, field: str, g_target: np.ndarray, g_max: float) -> None:
    """Targets must not exceed g_max (a relative target x = g/g_max above 1 means a unit error
    or a wrong g_max)."""
    top = float(np.max(g_target)) if g_target.size else 0.0
    if top > g_max * (1.0 + 1e-5):
        raise MeasurementFormatError(
            path, field, f"targets up to {top:.4g} S exceed g_max = {g_max:.4g} S",
            "check the units of the targets and attrs['g_max'] / attrs['g_max_units']")


def check_campaign(ds: xr.Dataset, where: str) -> tuple[dict, dict]:
    """Validate a campaign Dataset's structure; returns (unit factors, root attrs)."""
    for name, dims in (("g_target", ("device",)), ("g", ("device", "time", "repeat"))):
        if name not in ds:
            raise MeasurementFormatError(where, name, "missing variable",
                                         f"the Dataset needs {name}{dims} ({_DOC})")
        if ds[name].dims != dims:
            raise MeasurementFormatError(where, name, f"wrong dims {ds[name].dims}",
                                         f"expected {dims}")
        _check_dtype(where, name, ds[name].dtype)
    if "time" not in ds.coords:
        raise MeasurementFormatError(where, "time", "missing coordinate",
                                     "add coords time [s] for the read times")
    factors = {
        "g_target": _unit_factor(where, "g_target", ds["g_target"].attrs.get("units"),
                                 CONDUCTANCE_UNITS),
        "g": _unit_factor(where, "g", ds["g"].attrs.get("units"), CONDUCTANCE_UNITS),
        "time": _unit_factor(where, "time", ds["time"].attrs.get("units"), TIME_UNITS),
    }
    for name, dims, units in (("read_time", ("device", "time"), "s"),
                              ("temperature", ("time",), "K"), ("valid", ("device",), None)):
        if name not in ds:
            continue
        if ds[name].dims != dims:
            raise MeasurementFormatError(where, name, f"wrong dims {ds[name].dims}",
                                         f"expected {dims}")
        got = ds[name].attrs.get("units", units)
        if units is not None and got != units:
            raise MeasurementFormatError(where, name, f"units {got!r}",
                                         f"a campaign Dataset holds {name} in {units} (SI)")
    if "read_time" in ds:
        _check_dtype(where, "read_time", ds["read_time"].dtype)
    if "temperature" in ds:
        temp = np.asarray(ds["temperature"].values, dtype=np.float64)
        if not np.all(np.isfinite(temp)) or np.any(temp <= 0):
            raise MeasurementFormatError(where, "temperature", "temperatures must be finite "
                                         "and above 0 K", "store kelvin")
    if "valid" in ds and ds["valid"].dtype != np.bool_:
        raise MeasurementFormatError(where, "valid", f"dtype {ds['valid'].dtype}",
                                     "a bool mask (False: drop the device)")
    g_max = root_quantity(where, ds.attrs, "g_max", CONDUCTANCE_UNITS, True)
    root_quantity(where, ds.attrs, "t0", TIME_UNITS, True)
    root_quantity(where, ds.attrs, "t_read", TIME_UNITS, False)
    if not _checked_source(ds, "g_target"):  # chunk by chunk: memory independent of N
        n = ds.sizes["device"]
        read = device_chunk_reader(ds, "g_target")
        for start in range(0, n, VECTOR_CHUNK_DEVICES):
            g_target = np.asarray(read(start, min(n, start + VECTOR_CHUNK_DEVICES)))
            check_conductances(where, "g_target", g_target, offset=start)
            _check_targets(where, "g_target", g_target * factors["g_target"], g_max)
    _check_time(where, "time", np.asarray(ds["time"].values, dtype=np.float64))
    return factors, dict(ds.attrs)


def field_name(ds: xr.Dataset, name: str) -> str:
    """How error messages name variable ``name``: its HDF5 path (``/g``; ``read_time`` is
    ``/time``) for a Dataset read from a file, else the variable name."""
    if "source_file" not in ds.attrs:
        return name
    return "/time" if name == "read_time" else f"/{name}"


def has_v2_features(ds: xr.Dataset) -> bool:
    """True when a campaign Dataset needs schema version 2 apart from missing reads: per-device
    read times, temperatures or a valid mask."""
    return any(name in ds for name in ("read_time", "temperature", "valid"))


def device_chunk_reader(ds: xr.Dataset, name: str = "g"):
    """A function ``read(start, stop, out=None) -> ndarray`` giving ``ds[name][start:stop]``
    (``g`` [S] by default; ``read_time`` [s], ``g_target`` [S] and ``valid`` also stream).

    For a Dataset straight from :func:`read_measurements` it reads the file with h5py directly
    (no dask scheduling per chunk; safe to call from several threads), into ``out`` when given
    (an array of shape (>= stop - start, ...) and the dtype of ``ds[name]``, reused from chunk to
    chunk: no fresh memory per chunk); otherwise it slices ``ds[name]`` (computing a dask array
    chunk). The result may be a view of ``out``. Values are not checked.
    """
    data = ds[name].data
    src = _LAZY_SOURCES.get(getattr(data, "name", None))
    if src is not None and src.shape == tuple(data.shape):
        def read_file(start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
            if out is None or out.dtype != src.dtype or out.shape[1:] != src.shape[1:] or \
                    not out.flags.c_contiguous or out.shape[0] < stop - start:
                return src[start:stop]
            return src.read_into(start, stop, out)
        return read_file

    def read(start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        g = data[start:stop]
        if hasattr(g, "compute"):
            g = g.compute(scheduler="sync")
        return np.asarray(g)
    return read


def campaign_chunk_devices(ds: xr.Dataset, chunk_devices: int | None = None) -> int:
    """Devices per streamed chunk: ``chunk_devices`` if given, else the dask chunking of ``g``,
    else about 16 MiB of ``g``."""
    if chunk_devices is None:
        chunks = getattr(ds["g"].data, "chunks", None)
        chunk_devices = (chunks[0][0] if chunks else
                         default_chunk_devices(ds.sizes["time"], ds.sizes["repeat"],
                                               ds["g"].dtype.itemsize))
    return max(1, int(chunk_devices))


def iter_device_arrays(ds: xr.Dataset, chunk_devices: int | None = None,
                       check: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, g[start:stop])`` of a campaign as numpy arrays, chunk by chunk.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign, lazy or in memory (see :func:`device_chunk_reader`).
    chunk_devices : int, optional
        Devices per chunk; default the dask chunking of ``g``, or about 16 MiB of ``g``.
    check : bool
        Check each chunk for inf and negative values (NaN is a read not taken).

    Yields
    ------
    (int, int, ndarray (stop - start, T, R)) : device range and its reads [S]
    """
    where = ds.attrs.get("source_file", "<Dataset>")
    n = ds.sizes["device"]
    chunk_devices = campaign_chunk_devices(ds, chunk_devices)
    read = device_chunk_reader(ds)
    for start in range(0, n, chunk_devices):
        stop = min(n, start + chunk_devices)
        g = read(start, stop)
        if check:
            check_conductances(where, field_name(ds, "g"), g, offset=start, allow_nan=True)
        yield start, stop, g


def iter_device_chunks(source, chunk_devices: int | None = None,
                       check: bool = True) -> Iterator[xr.Dataset]:
    """Yield a campaign in loaded device chunks (numpy-backed Datasets), for streaming work.

    Parameters
    ----------
    source : xarray.Dataset or path
        A campaign (lazy or in memory) or the path of a campaign file.
    chunk_devices : int, optional
        Devices per chunk; default the dask chunking of ``g``, or about 16 MiB of ``g``.
    check : bool
        Check each chunk for inf and negative values (NaN is a read not taken).

    Yields
    ------
    xarray.Dataset
        ``source.isel(device=slice(start, stop))`` with ``g`` loaded; conductances [S], times [s].
    """
    ds = source if isinstance(source, xr.Dataset) else read_measurements(
        source, chunk_devices=chunk_devices, check_values=False)
    for start, stop, g in iter_device_arrays(ds, chunk_devices, check):
        part = ds.isel(device=slice(start, stop))
        yield part.assign(g=(part["g"].dims, g, part["g"].attrs))


def write_measurements(ds: xr.Dataset, path, chunk_devices: int | None = None,
                       compression: str | None = None, progress: bool = False, *,
                       overwrite: bool = False) -> None:
    """Write a campaign Dataset to HDF5 atomically (temporary file in the same folder, then rename).

    The file is schema version 2 when the Dataset uses its features (NaN for reads not taken,
    ``read_time``, ``temperature``, ``valid``), else version 1 (readable by older versions).

    The output is checked first (:func:`aimc_device.io.check_output`): it may not be the file the
    Dataset was read from, nor an existing file of another kind (a device card, ...) unless
    ``overwrite``; a simulated campaign (``technology`` ending in "(simulated)") does not replace
    a measured one either; its folder must be writable.

    No HDF5 object carries a creation time: the same Dataset and settings give the same file,
    byte for byte.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign in the schema (as from :func:`aimc_device.pcm.simulate_campaign` or
        :func:`read_measurements`); ``g`` and ``read_time`` may be dask arrays, written chunk by
        chunk.
    path : str or os.PathLike
        Destination; replaced only once the whole file is written.
    chunk_devices : int, optional
        Devices per HDF5 chunk and per write; default about 16 MiB of ``g``.
    compression : str, optional
        h5py compression filter for ``g`` ("gzip", "lzf"); none by default (fastest reads).
    progress : bool
        Show a tqdm progress bar.
    overwrite : bool
        Replace an existing file of another kind (never the campaign's own source file).

    Raises
    ------
    MeasurementFormatError
        When the Dataset breaks the schema (nothing is written then).
    OutputRefusedError
        When ``path`` is the Dataset's source file or an existing file of another kind.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset (a campaign), got {type(ds).__name__}")
    if chunk_devices is not None:
        chunk_devices = check_int(chunk_devices, "chunk_devices", lo=1)
    path = os.path.abspath(os.fspath(path))
    _, attrs = check_campaign(ds, "<Dataset>")
    n, t_n, n_rep = ds.sizes["device"], ds.sizes["time"], ds.sizes["repeat"]
    gdtype = ds["g"].dtype
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(t_n, n_rep, gdtype.itemsize)
    chunk_devices = int(min(max(1, chunk_devices), n))
    per_device = "read_time" in ds
    with atomic_output(path, campaign_kind(attrs), inputs=attrs.get("source_file"),
                       overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema"] = SCHEMA
        for key, value in attrs.items():
            if key in _DERIVED_ATTRS or value is None:
                continue
            if isinstance(value, (str, bool, int, float, np.generic)):
                f.attrs[key] = value
        vectors = {"g_target": ds["g_target"].dtype}
        if "valid" in ds:
            vectors["valid"] = bool
        for name, dtype in vectors.items():  # chunk by chunk: memory independent of N
            vset = f.create_dataset(name, shape=(n,), dtype=dtype, track_times=False)
            read_v = device_chunk_reader(ds, name)
            for start in range(0, n, VECTOR_CHUNK_DEVICES):
                stop = min(n, start + VECTOR_CHUNK_DEVICES)
                vset[start:stop] = np.asarray(read_v(start, stop), dtype=dtype)
        f["g_target"].attrs["units"] = ds["g_target"].attrs["units"]
        nominal = np.asarray(ds["time"].values, dtype=np.float64)
        if per_device:
            tdtype = ds["read_time"].dtype
            tset = f.create_dataset("time", shape=(n, t_n), dtype=tdtype,
                                    chunks=(min(chunk_devices, max(1, 2**20 // (8 * t_n))), t_n),
                                    track_times=False)
            tset.attrs["nominal"] = nominal
        else:
            f.create_dataset("time", data=nominal, track_times=False)
        f["time"].attrs["units"] = ds["time"].attrs["units"]
        if "temperature" in ds:
            f.create_dataset("temperature",
                             data=np.asarray(ds["temperature"].values, dtype=np.float64),
                             track_times=False)
            f["temperature"].attrs["units"] = "K"
        hchunk = min(chunk_devices, default_chunk_devices(t_n, n_rep, gdtype.itemsize,
                                                          2**20))
        dset = f.create_dataset("g", shape=(n, t_n, n_rep), dtype=gdtype,
                                chunks=(hchunk, t_n, n_rep), compression=compression,
                                track_times=False)
        dset.attrs["units"] = ds["g"].attrs["units"]
        starts = range(0, n, chunk_devices)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"writing {os.path.basename(path)}", unit="chunk",
                          disable=None)
        missing = False
        read_g = device_chunk_reader(ds)
        read_t = device_chunk_reader(ds, "read_time") if per_device else None
        for start in starts:
            stop = min(n, start + chunk_devices)
            block = read_g(start, stop)
            check_conductances("<Dataset>", "g", block, offset=start, allow_nan=True)
            missing = missing or bool(np.isnan(block).any())
            dset[start:stop] = block
            if read_t is not None:
                times = np.asarray(read_t(start, stop))
                check_read_times("<Dataset>", "read_time", times.astype(np.float64), start)
                tset[start:stop] = times
        v2 = missing or has_v2_features(ds)
        f.attrs["schema_version"] = 2 if v2 else 1


@dataclass
class ReadCounts:
    """Missing reads, dead and invalid devices of a campaign (from :func:`read_counts`).

    Attributes
    ----------
    missing_per_device : ndarray (N,) int, reads not taken (NaN) per device, over times and
        repeats
    missing_per_time : ndarray (T,) int, reads not taken at each time, over devices and repeats
    dead : ndarray of int, devices whose reads are all NaN or ~0 S (below NEAR_ZERO * g_max)
    invalid : ndarray of int, devices marked False in ``valid``
    n_reads : int, N x T x R
    """

    missing_per_device: np.ndarray
    missing_per_time: np.ndarray
    dead: np.ndarray
    invalid: np.ndarray
    n_reads: int

    @property
    def n_missing(self) -> int:
        """Reads not taken, in all."""
        return int(self.missing_per_time.sum())

    def summary(self) -> str:
        """One line: missing reads (per time), dead and invalid devices."""
        per_time = ", ".join(str(int(v)) for v in self.missing_per_time)
        return (f"{self.n_missing} of {self.n_reads} reads missing ({per_time} per time); "
                f"{self.dead.size} dead device(s); {self.invalid.size} marked invalid")


def read_counts(ds: xr.Dataset, chunk_devices: int | None = None) -> ReadCounts:
    """Count missing reads per device and per time, dead and invalid devices, in one pass.

    The pass also checks every value (inf, negative conductance, per-device read times that do
    not increase) and raises naming the file, field and index.

    Parameters
    ----------
    ds : xarray.Dataset, a campaign (lazy or in memory); conductances [S]
    chunk_devices : int, optional, devices per chunk

    Returns
    -------
    ReadCounts
    """
    where = ds.attrs.get("source_file", "<Dataset>")
    n, t_n = ds.sizes["device"], ds.sizes["time"]
    g_max = float(ds.attrs["g_max"])
    per_device = np.zeros(n, np.int32)
    per_time = np.zeros(t_n, np.int64)
    dead = []
    read_t = device_chunk_reader(ds, "read_time") if "read_time" in ds else None
    for start, stop, g in iter_device_arrays(ds, chunk_devices, check=True):
        miss = np.isnan(g)
        per_device[start:stop] = miss.sum(axis=(1, 2))
        per_time += miss.sum(axis=(0, 2))
        with np.errstate(invalid="ignore"):
            gone = miss | (g < NEAR_ZERO * g_max)
        dead.append(np.flatnonzero(gone.reshape(stop - start, -1).all(axis=1)) + start)
        if read_t is not None:
            check_read_times(where, field_name(ds, "read_time"),
                              np.asarray(read_t(start, stop), dtype=np.float64), start)
    invalid = np.zeros(0, np.int64)
    if "valid" in ds:
        read_v = device_chunk_reader(ds, "valid")
        step = VECTOR_CHUNK_DEVICES
        invalid = np.concatenate([np.flatnonzero(~np.asarray(read_v(a, min(n, a + step)))) + a
                                  for a in range(0, n, step)])
    return ReadCounts(per_device, per_time, np.concatenate(dead) if dead else np.zeros(0, int),
                      invalid, int(n * t_n * ds.sizes["repeat"]))


#: Exclusion reasons by code (0: kept), in the order they are tested.
EXCLUSION_REASONS = {1: "valid", 2: "index", 3: "dead", 4: "stuck", 5: "outside"}
_REASON_TEXT = {
    "valid": "marked invalid (/valid)",
    "index": "excluded by index",
    "dead": "dead (all reads missing or ~0 S)",
    "stuck": "stuck (reads do not change and sit at ~0 or ~g_max)",
    "outside": "a read outside the allowed range",
}


@dataclass(frozen=True)
class DeviceExclusion:
    """Devices to drop before a fit: index ranges and rules.

    Built by :meth:`parse` from a comma-separated spec such as ``"0-9,17,stuck,dead"``:

    - ``I`` or ``I-J``: device I, or devices I to J inclusive (0-based);
    - ``dead``: every read NaN or below NEAR_ZERO * g_max;
    - ``stuck``: reads that do not change (span <= STUCK_SPAN * g_max over all times and
      repeats) and sit at ~0 or ~g_max (mean within STUCK_EDGE * g_max of either);
    - ``outside:LO:HI``: any read below LO or above HI, each a number with an optional unit
      (``S``, ``mS``, ``uS``, ``nS``; default S), e.g. ``outside:0.1uS:30uS``.

    Devices marked False in a campaign's ``valid`` are always dropped.
    """

    spec: str = ""
    ranges: tuple = ()
    dead: bool = False
    stuck: bool = False
    outside: tuple | None = None

    @classmethod
    def parse(cls, spec) -> "DeviceExclusion":
        """A DeviceExclusion from a spec string, a list of indices or rules, None or itself."""
        if spec is None:
            return cls()
        if isinstance(spec, DeviceExclusion):
            return spec
        tokens = ([t.strip() for t in spec.split(",")] if isinstance(spec, str)
                  else [str(t).strip() for t in spec])
        ranges, kw = [], {"dead": False, "stuck": False, "outside": None}
        for tok in tokens:
            if not tok:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
                if hi < lo:
                    raise ValueError(f"exclude: range {tok!r} runs backwards; write LOW-HIGH")
                ranges.append((lo, hi + 1))
            elif tok in ("dead", "stuck"):
                kw[tok] = True
            elif tok.startswith("outside:"):
                parts = tok.split(":")[1:]
                if len(parts) != 2:
                    raise ValueError(f"exclude: {tok!r}: write outside:LO:HI, e.g. "
                                     "outside:0.1uS:30uS")
                lo, hi = (_conductance_value(p, tok) for p in parts)
                if not lo < hi:
                    raise ValueError(f"exclude: {tok!r}: LO must be below HI")
                kw["outside"] = (lo, hi)
            else:
                raise ValueError(f"exclude: unknown item {tok!r}; use device indices (0-9,17), "
                                 "dead, stuck or outside:LO:HI")
        text = spec if isinstance(spec, str) else ",".join(tokens)
        return cls(spec=text, ranges=tuple(sorted(ranges)), **kw)

    @property
    def needs_reads(self) -> bool:
        """True when a rule looks at the reads (dead, stuck, outside)."""
        return self.dead or self.stuck or self.outside is not None

    def is_empty(self) -> bool:
        return not self.ranges and not self.needs_reads

    def check_indices(self, n: int, where: str = "<Dataset>") -> None:
        """Raise when an index range starts beyond the N devices."""
        for lo, hi in self.ranges:
            if lo >= n:
                raise ValueError(f"{where}: exclude: device {lo} does not exist (the campaign "
                                 f"has {n} devices, 0-{n - 1})")

    def codes(self, start: int, g: np.ndarray | None, g_max: float,
              valid: np.ndarray | None = None) -> np.ndarray:
        """Reason code per device of a chunk (0: kept; see EXCLUSION_REASONS).

        Parameters
        ----------
        start : int, index of the chunk's first device
        g : ndarray (n, T, R) or None, the chunk's reads [S] (needed by the rules)
        g_max : float [S]
        valid : ndarray (n,) bool, optional
        """
        n = g.shape[0] if g is not None else valid.shape[0]
        out = np.zeros(n, np.uint8)
        if valid is not None:
            out[~valid] = 1
        for lo, hi in self.ranges:
            a, b = max(lo - start, 0), min(hi - start, n)
            if a < b:
                sl = out[a:b]
                sl[sl == 0] = 2
        if self.needs_reads:
            flat = g.reshape(n, -1)
            with np.errstate(invalid="ignore"), _nan_warnings_off():
                if self.dead:
                    gone = (np.isnan(flat) | (flat < NEAR_ZERO * g_max)).all(axis=1)
                    out[(out == 0) & gone] = 3
                if self.stuck:
                    lo_, hi_ = np.nanmin(flat, axis=1), np.nanmax(flat, axis=1)
                    mean = np.nanmean(flat, axis=1)
                    edge = (mean <= STUCK_EDGE * g_max) | (mean >= (1 - STUCK_EDGE) * g_max)
                    still = (hi_ - lo_) <= STUCK_SPAN * g_max
                    out[(out == 0) & still & edge] = 4
                if self.outside is not None:
                    lo_, hi_ = self.outside
                    bad = ((flat < lo_) | (flat > hi_)).any(axis=1)
                    out[(out == 0) & bad] = 5
        return out


def _conductance_value(text: str, token: str) -> float:
    m = re.fullmatch(r"([-+0-9.eE]+)\s*([a-zA-Zµ]*)", text.strip())
    unit = (m.group(2) or "S") if m else None
    if m is None or unit not in CONDUCTANCE_UNITS:
        raise ValueError(f"exclude: {token!r}: {text!r} is not a conductance (a number with an "
                         f"optional unit of {list(CONDUCTANCE_UNITS)})")
    try:
        return float(m.group(1)) * CONDUCTANCE_UNITS[unit]
    except ValueError:
        raise ValueError(f"exclude: {token!r}: {text!r} is not a number") from None


class _nan_warnings_off:
    """Silence numpy's "All-NaN slice" / "Mean of empty slice" warnings inside a block."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


#: Runs of dropped devices an ExclusionRecord keeps per reason (beyond: counted only, so that
#: its memory does not grow with the file).
MAX_RUNS = 4096


@dataclass
class ExclusionRecord:
    """Which devices were dropped and why: counts per reason, and the first MAX_RUNS runs of
    indices per reason.

    Add each chunk's codes (:meth:`DeviceExclusion.codes`) in chunk order with :meth:`add`.
    """

    runs: dict = field(default_factory=lambda: {r: [] for r in EXCLUSION_REASONS.values()})
    n_dropped: dict = field(default_factory=lambda: {r: 0 for r in EXCLUSION_REASONS.values()})
    runs_left_out: dict = field(
        default_factory=lambda: {r: 0 for r in EXCLUSION_REASONS.values()})
    _last_end: dict = field(default_factory=dict, repr=False)

    def add(self, start: int, codes: np.ndarray) -> None:
        """Record a chunk's reason codes; ``start`` is its first device."""
        # A bool mask first: numpy's nonzero is ~10x faster on bool than on uint8. Few devices
        # are dropped; the reasons are sorted out among them only.
        dropped = np.flatnonzero(codes != 0)
        if dropped.size == 0:
            return
        dropped_codes = codes[dropped]
        for code, reason in EXCLUSION_REASONS.items():
            idx = dropped[dropped_codes == code]
            if idx.size == 0:
                continue
            self.n_dropped[reason] += int(idx.size)
            brk = np.flatnonzero(np.diff(idx) != 1)
            firsts = np.concatenate([[idx[0]], idx[brk + 1]]) + start
            lasts = np.concatenate([idx[brk], [idx[-1]]]) + start + 1
            runs = self.runs[reason]
            if self.runs_left_out[reason]:  # no more runs kept: count the new ones
                joins = int(firsts[0] == self._last_end.get(reason, -1))
                self.runs_left_out[reason] += firsts.size - joins
            else:
                for a, b in zip(firsts.tolist(), lasts.tolist()):
                    if runs and runs[-1][1] == a:
                        runs[-1][1] = b
                    elif len(runs) < MAX_RUNS:
                        runs.append([a, b])
                    else:
                        self.runs_left_out[reason] += 1
                        self._last_end[reason] = b
                        break_at = int(np.searchsorted(firsts, a)) + 1
                        self.runs_left_out[reason] += firsts.size - break_at
                        break
            self._last_end[reason] = int(lasts[-1])

    def counts(self) -> dict:
        """reason -> devices dropped for it."""
        return dict(self.n_dropped)

    @property
    def n_excluded(self) -> int:
        return sum(self.counts().values())

    def devices(self, reason: str, max_runs: int = 20) -> str:
        """The devices dropped for ``reason`` as index ranges ("0-9,17"), shortened."""
        runs = self.runs[reason]
        text = ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs[:max_runs])
        more = len(runs) - min(len(runs), max_runs) + self.runs_left_out[reason]
        if more:
            text += f",... ({more} more ranges)"
        return text

    def mask(self, n: int) -> np.ndarray:
        """(n,) bool, True for every device dropped.

        Raises
        ------
        ValueError
            When more than MAX_RUNS runs of a reason were dropped (only the first are kept).
        """
        if any(self.runs_left_out.values()):
            raise ValueError(f"ExclusionRecord.mask: more than {MAX_RUNS} runs of dropped "
                             "devices for one reason; only the first are kept")
        out = np.zeros(n, bool)
        for runs in self.runs.values():
            for a, b in runs:
                out[a:b] = True
        return out

    def summary(self) -> str:
        """One line: how many devices were dropped, for which reason, which ones."""
        parts = [f"{c} {_REASON_TEXT[r]} ({self.devices(r)})"
                 for r, c in self.counts().items() if c]
        return (f"{self.n_excluded} device(s) dropped: " + "; ".join(parts)) if parts \
            else "no device dropped"

    def to_dict(self) -> dict:
        """reason -> {"count", "devices"} for reasons with dropped devices."""
        return {r: {"count": c, "devices": self.devices(r)} for r, c in self.counts().items() if c}


def file_sha256(path, block_bytes: int = 8 * 2**20) -> str:
    """SHA-256 hex digest of a file, read in blocks of ``block_bytes`` [B] (flat memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
    return h.hexdigest()
