"""PCM measurement campaigns in HDF5 <-> ``xarray.Dataset``, read lazily by device chunks.

The schema (docs/measurement-format.md) in short:

- ``/g_target`` (N,) target conductance, attr ``units`` (S, mS, uS or nS);
- ``/g`` (N, T, R) conductance read R times at each of T times after programming, attr ``units``;
- ``/time`` (T,) read times after the end of programming, strictly increasing, attr ``units``
  (s, ms, us, ns, min, h or d);
- root attrs ``g_max`` and ``t0`` with ``g_max_units`` and ``t0_units``; optional ``t_read`` (with
  ``t_read_units``), ``technology``, ``temperature`` (with ``temperature_units``), ``date``,
  ``source``; ``schema = "aimc-device/pcm-campaign"`` and ``schema_version = 1``.

:func:`read_measurements` returns a Dataset whose ``g`` is a dask array that reads the file one
device chunk at a time, so files larger than memory can be processed; everything in it is in SI
units (siemens, seconds). :func:`iter_device_chunks` yields loaded device chunks for streaming fits.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator

import h5py
import numpy as np
import xarray as xr

from ._atomic import atomic_output
from ._errors import MeasurementFormatError

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "CONDUCTANCE_UNITS", "TIME_UNITS",
    "read_measurements", "write_measurements", "iter_device_chunks", "iter_device_arrays",
    "device_chunk_reader",
    "file_sha256",
    "default_chunk_devices",
]

SCHEMA = "aimc-device/pcm-campaign"
SCHEMA_VERSION = 1
#: Accepted conductance units and their factor to siemens.
CONDUCTANCE_UNITS = {"S": 1.0, "mS": 1e-3, "uS": 1e-6, "µS": 1e-6, "nS": 1e-9}
#: Accepted time units and their factor to seconds.
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0,
              "h": 3600.0, "d": 86400.0}
TEMPERATURE_UNITS = ("K", "degC")
_REQUIRED = {"g_target": 1, "g": 3, "time": 1}
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


def _check_finite(path, field: str, arr: np.ndarray, offset: int = 0) -> None:
    """Raise naming the first NaN or inf; ``offset`` is added to the device (first) index."""
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), arr.shape)
        idx = (idx[0] + offset,) + tuple(idx[1:])
        raise MeasurementFormatError(
            path, field, f"NaN or inf at index {tuple(int(i) for i in idx)}",
            "remove or re-measure those devices; every value must be finite")


def _check_conductance(path, field: str, arr: np.ndarray, offset: int = 0) -> None:
    """Finite and >= 0; ``offset`` is the first device of a chunk (for the message)."""
    arr = np.asarray(arr)
    # One cheap reduction first; locate the culprit only when something is wrong.
    lo = arr.min(initial=0.0) if arr.size else 0.0
    if not np.isfinite(lo) or not np.isfinite(arr.max(initial=0.0)):
        _check_finite(path, field, arr, offset)
    if lo < 0:
        idx = np.unravel_index(int(np.argmin(arr)), arr.shape)
        idx = (idx[0] + offset,) + tuple(idx[1:])
        raise MeasurementFormatError(
            path, field, f"negative conductance {float(lo):.3g} at index "
            f"{tuple(int(i) for i in idx)}", "conductances are >= 0; clip the reads at 0 or "
            "check the sign convention and units")


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


def _root_quantity(path, attrs, name: str, table: dict, required: bool) -> float | None:
    if name not in attrs:
        if required:
            raise MeasurementFormatError(path, f"attrs['{name}']", "missing root attribute",
                                         f"add it with attrs['{name}_units'] ({_DOC})")
        return None
    factor = _unit_factor(path, f"attrs['{name}_units']", attrs.get(f"{name}_units"), table)
    try:
        value = float(np.asarray(attrs[name]).reshape(()))
    except (TypeError, ValueError):
        raise MeasurementFormatError(path, f"attrs['{name}']", "not a single number",
                                     "store a scalar") from None
    if not np.isfinite(value) or value <= 0:
        raise MeasurementFormatError(path, f"attrs['{name}']", f"{value!r} is not a positive "
                                     "finite number", "store a positive value")
    return float(_to_si(value, factor))


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

    def __init__(self, path: str, name: str, shape, dtype, factor: float = 1.0, layout=None):
        self.path, self.name = path, name
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.factor = factor
        self.layout = layout

    def _unreadable(self, exc: OSError) -> MeasurementFormatError:
        return MeasurementFormatError(self.path, self.name, f"cannot read the data ({exc})",
                                      "the file is truncated or damaged; copy or export it again")

    def __getitem__(self, key):
        try:
            with h5py.File(self.path, "r") as f:
                out = f[self.name][key]
        except OSError as exc:
            raise self._unreadable(exc) from None
        if self.factor != 1.0:
            out = _to_si(out, self.factor).astype(self.dtype, copy=False)
        return out

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows ``start:stop`` [SI] into the first rows of ``out`` (reused memory, no copy)."""
        view = out[:stop - start]
        if self.factor != 1.0:
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
        The HDF5 file.
    chunk_devices : int, optional
        Devices per dask chunk of ``g``; default about 16 MiB per chunk.
    check_values : bool, optional
        Scan all of ``g`` now for NaN, inf and negative values (one pass over the file). Default:
        only when ``g`` is under 1 GiB; larger files are checked chunk by chunk by whatever
        consumes them (the fits do). ``g_target`` and ``time`` are always checked.

    Returns
    -------
    xarray.Dataset
        dims ``device`` (N), ``time`` (T), ``repeat`` (R); ``g_target(device)`` [S];
        ``g(device, time, repeat)`` [S] backed by a dask array; coordinate ``time`` [s]; the
        root attributes with ``g_max`` [S], ``t0`` [s], ``t_read`` [s] in SI units, plus
        ``source_file`` (the absolute path read).

    Raises
    ------
    MeasurementFormatError
        (a ValueError) naming the file, the field and the fix: not an HDF5 file, truncated file,
        missing dataset, wrong shape or dtype, NaN or inf, negative conductance, read times not
        increasing, missing or unknown units.
    FileNotFoundError
        When ``path`` does not exist.
    """
    import dask.array as da

    path = os.path.abspath(os.fspath(path))
    with _open(path) as f:
        for name, ndim in _REQUIRED.items():
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise MeasurementFormatError(path, f"/{name}", "missing dataset",
                                             f"write /{name} with {ndim} dimension(s) ({_DOC})")
            if f[name].ndim != ndim:
                raise MeasurementFormatError(path, f"/{name}", f"wrong shape {f[name].shape}: "
                                             f"expected {ndim} dimension(s)", _DOC)
            _check_dtype(path, f"/{name}", f[name].dtype)
        n, t_n = f["g_target"].shape[0], f["time"].shape[0]
        gshape = f["g"].shape
        if gshape[0] != n or gshape[1] != t_n:
            raise MeasurementFormatError(
                path, "/g", f"wrong shape {gshape}: expected (N={n}, T={t_n}, R) from /g_target "
                "and /time", "store g as (device, time, repeat)")
        if n == 0 or t_n == 0 or gshape[2] == 0:
            raise MeasurementFormatError(path, "/g", f"empty shape {gshape}",
                                         "a campaign needs devices, times and reads")
        attrs = {k: _clean_attr(v) for k, v in f.attrs.items()}
        schema = attrs.get("schema")
        if schema is not None and schema != SCHEMA:
            raise MeasurementFormatError(path, "attrs['schema']", f"unknown schema {schema!r}",
                                         f"expected {SCHEMA!r}")
        version = attrs.get("schema_version", SCHEMA_VERSION)
        if int(version) > SCHEMA_VERSION:
            raise MeasurementFormatError(path, "attrs['schema_version']",
                                         f"version {version} is newer than this reader "
                                         f"({SCHEMA_VERSION})", "update aimc-device")
        g_max = _root_quantity(path, attrs, "g_max", CONDUCTANCE_UNITS, True)
        t0 = _root_quantity(path, attrs, "t0", TIME_UNITS, True)
        t_read = _root_quantity(path, attrs, "t_read", TIME_UNITS, False)
        fg_t = _unit_factor(path, "/g_target", f["g_target"].attrs.get("units"),
                            CONDUCTANCE_UNITS)
        fg = _unit_factor(path, "/g", f["g"].attrs.get("units"), CONDUCTANCE_UNITS)
        ft = _unit_factor(path, "/time", f["time"].attrs.get("units"), TIME_UNITS)
        try:
            g_target = _to_si(f["g_target"][()], fg_t)
            time = _to_si(f["time"][()].astype(np.float64), ft)
        except OSError as exc:
            raise MeasurementFormatError(path, "/g_target", f"cannot read the data ({exc})",
                                         "the file is truncated or damaged") from None
        gdtype, hchunks = f["g"].dtype, f["g"].chunks
        layout = _raw_layout(f["g"])
    _check_conductance(path, "/g_target", g_target)
    _check_time(path, "/time", time)
    n_rep = gshape[2]
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(t_n, n_rep, gdtype.itemsize)
        if hchunks:  # align with the file's own chunks
            chunk_devices = max(hchunks[0], (chunk_devices // hchunks[0]) * hchunks[0])
    chunk_devices = int(min(max(1, chunk_devices), n))
    src = _H5Slice(path, "g", gshape, gdtype, fg, layout)
    mtime = os.stat(path).st_mtime_ns
    name = f"aimc-g-{hashlib.sha1(f'{path}{mtime}{chunk_devices}'.encode()).hexdigest()}"
    g = da.from_array(src, chunks=(chunk_devices, t_n, n_rep), lock=False, asarray=True,
                      name=name, meta=np.empty((0, 0, 0), gdtype))
    _LAZY_SOURCES[name] = src
    if check_values is None:
        check_values = g.nbytes <= 2**30
    if check_values:
        for start in range(0, n, chunk_devices):
            _check_conductance(path, "/g", src[start:start + chunk_devices], offset=start)
    attrs.update(g_max=g_max, g_max_units="S", t0=t0, t0_units="s", source_file=path)
    if t_read is not None:
        attrs.update(t_read=t_read, t_read_units="s")
    attrs.setdefault("schema", SCHEMA)
    attrs["schema_version"] = int(version)
    return xr.Dataset(
        data_vars={
            "g_target": (("device",), g_target.astype(gdtype, copy=False),
                         {"units": "S", "long_name": "target conductance"}),
            "g": (("device", "time", "repeat"), g,
                  {"units": "S", "long_name": "conductance read after programming"}),
        },
        # No coordinate on ``device`` (the index is the device number): an int64 index would
        # cost 8 bytes per device of memory that does not stream.
        coords={
            "time": ("time", time, {"units": "s", "long_name": "time since end of programming"}),
            "repeat": np.arange(n_rep),
        },
        attrs=attrs,
    )


def _check_dataset(ds: xr.Dataset, where: str) -> tuple[dict, dict]:
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
    for name in ("g_max", "t0"):
        _root_quantity(where, ds.attrs, name, CONDUCTANCE_UNITS if name == "g_max"
                       else TIME_UNITS, True)
    _root_quantity(where, ds.attrs, "t_read", TIME_UNITS, False)
    _check_conductance(where, "g_target", np.asarray(ds["g_target"].values))
    _check_time(where, "time", np.asarray(ds["time"].values, dtype=np.float64))
    return factors, dict(ds.attrs)


def device_chunk_reader(ds: xr.Dataset):
    """A function ``read(start, stop, out=None) -> ndarray`` giving ``g[start:stop]`` [S].

    For a Dataset straight from :func:`read_measurements` it reads the file with h5py directly
    (no dask scheduling per chunk; safe to call from several threads), into ``out`` when given
    (an array of shape (>= stop - start, T, R) and the dtype of ``ds["g"]``, reused from chunk to
    chunk: no fresh memory per chunk); otherwise it slices ``ds["g"]`` (computing a dask array
    chunk). The result may be a view of ``out``. Values are not checked.
    """
    data = ds["g"].data
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
        Check each chunk for NaN, inf and negative values.

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
            _check_conductance(where, "g", g, offset=start)
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
        Check each chunk for NaN, inf and negative values.

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
                       compression: str | None = None, progress: bool = False) -> None:
    """Write a campaign Dataset to HDF5 atomically (temporary file in the same folder, then rename).

    No HDF5 object carries a creation time: the same Dataset and settings give the same file,
    byte for byte.

    Parameters
    ----------
    ds : xarray.Dataset
        A campaign in the schema (as from :func:`aimc_device.pcm.simulate_campaign` or
        :func:`read_measurements`); ``g`` may be a dask array, written chunk by chunk.
    path : str or os.PathLike
        Destination; replaced only once the whole file is written.
    chunk_devices : int, optional
        Devices per HDF5 chunk and per write; default about 16 MiB of ``g``.
    compression : str, optional
        h5py compression filter for ``g`` ("gzip", "lzf"); none by default (fastest reads).
    progress : bool
        Show a tqdm progress bar.

    Raises
    ------
    MeasurementFormatError
        When the Dataset breaks the schema (nothing is written then).
    """
    path = os.path.abspath(os.fspath(path))
    _, attrs = _check_dataset(ds, "<Dataset>")
    n, t_n, n_rep = ds.sizes["device"], ds.sizes["time"], ds.sizes["repeat"]
    gdtype = ds["g"].dtype
    if chunk_devices is None:
        chunk_devices = default_chunk_devices(t_n, n_rep, gdtype.itemsize)
    chunk_devices = int(min(max(1, chunk_devices), n))
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in attrs.items():
            if key in ("schema", "schema_version", "source_file") or value is None:
                continue
            if isinstance(value, (str, bool, int, float, np.generic)):
                f.attrs[key] = value
        f.create_dataset("g_target", data=np.asarray(ds["g_target"].values), track_times=False)
        f["g_target"].attrs["units"] = ds["g_target"].attrs["units"]
        f.create_dataset("time", data=np.asarray(ds["time"].values, dtype=np.float64),
                         track_times=False)
        f["time"].attrs["units"] = ds["time"].attrs["units"]
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
        for start in starts:
            stop = min(n, start + chunk_devices)
            block = ds["g"].data[start:stop]
            if hasattr(block, "compute"):
                block = block.compute(scheduler="sync")
            block = np.asarray(block)
            _check_conductance("<Dataset>", "g", block, offset=start)
            dset[start:stop] = block


def file_sha256(path, block_bytes: int = 8 * 2**20) -> str:
    """SHA-256 hex digest of a file, read in blocks of ``block_bytes`` [B] (flat memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
    return h.hexdigest()
