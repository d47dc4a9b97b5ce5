"""Safe file output: nothing the package writes can replace an input or a file of another kind.

Every file the package writes goes through :func:`atomic_output`:

1. The destination is checked (:func:`check_output`, which writers also call on their own before
   a long computation starts): its folder exists, is a folder and is writable (a probe file is
   created and removed); it is not the same file as any input (same device and inode, so also
   through symbolic and hard links); it is a regular file or absent; and an existing non-empty
   destination holds the same kind of file as the one being written (a device card replaces a
   device card, never a measurement campaign), unless the caller passes ``overwrite=True``
   (``--force`` on the command line). The same file as an input is refused even then.
2. The data go to a temporary file in the destination folder named
   ``.NAME.aimc-tmp-HOST-PID-RANDOM.EXT`` (HOST: a digest of the host name, PID: the writer's
   process id, EXT: the destination's extension, so that writers that pick a format by extension
   still do), created with the usual ``0666 & ~umask`` permissions.
3. On success the temporary file is renamed over the destination (atomic on POSIX); on any
   exception, Ctrl-C included, it is removed. A writer killed outright (SIGKILL) cannot clean
   up: the next write into the same folder removes every such temporary file whose writer process
   on this host no longer exists (:func:`remove_stale_temporaries`).

A symbolic link at the destination is replaced by the new file (its target is left alone).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import zipfile

__all__ = ["atomic_output", "check_output", "check_folder", "file_kind", "describe_kind",
           "remove_stale_temporaries", "save_figure", "write_text", "OutputRefusedError",
           "KIND_NETCDF", "KIND_CHECKPOINT", "KIND_FIGURE", "KIND_TEXT", "KIND_CONFIG",
           "KIND_CONFIG_JSON", "KIND_HDF5", "KIND_DATA"]

# Kinds of files. HDF5 files with a ``schema`` root attribute are of the kind named by it
# (``aimc-device/pcm-campaign``, ``aimc-device/pcm-device-card``, ...); the others are these.
KIND_NETCDF = "NetCDF"
KIND_CHECKPOINT = "torch checkpoint"
KIND_FIGURE = "figure"
KIND_TEXT = "text"
KIND_CONFIG = "CrossbarConfig (HDF5)"
KIND_CONFIG_JSON = "CrossbarConfig (JSON)"
KIND_HDF5 = "HDF5"
KIND_DATA = "data"

_FIGURE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"%PDF", b"\xff\xd8\xff", b"%!PS", b"GIF8", b"II*\0",
                 b"MM\0*")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_TAG = ".aimc-tmp-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.aimc-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-"
                     r"[0-9a-f]{8}(?:\.[^.]*)?$")


class OutputRefusedError(FileExistsError):
    """An output path that is an input, or an existing file of another kind: not replaced.

    The message names the output (and the input) and the way out (another path, or
    ``overwrite=True`` / ``--force`` for a file of another kind).
    """


def _abspath(path) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a file path (str or os.PathLike), got "
                        f"{type(path).__name__}") from None
    return os.path.abspath(os.fsdecode(p))


# ------------------------------------------------------------------------- kinds of files
def _hdf5_kind(path: str) -> str:
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema")
            if isinstance(schema, bytes):
                schema = schema.decode("utf-8", "replace")
            elif isinstance(schema, np.ndarray) and schema.size == 1:
                schema = str(schema.reshape(()).item())
            if isinstance(schema, str) and schema:
                from .measurements import SCHEMA, campaign_kind

                return campaign_kind(f.attrs) if schema == SCHEMA else schema
            if "_NCProperties" in f.attrs:
                return KIND_NETCDF
            members = list(f.values())
            if members and all(isinstance(m, h5py.Group) and m.attrs.get("kind") in (
                    "CrossbarConfig", b"CrossbarConfig") for m in members):
                return KIND_CONFIG
            if all(name in f for name in ("g_target", "g", "time")):
                from .measurements import campaign_kind

                return campaign_kind(f.attrs)  # a campaign without the optional schema attr
    except Exception:  # noqa: BLE001 - a damaged or exotic HDF5 file is still "an HDF5 file"
        pass
    return KIND_HDF5


def _text_kind(path: str, head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not only a character cut at the end of the head
            return KIND_DATA
        text = head[:exc.start].decode("utf-8")
    stripped = text.lstrip()
    if stripped.startswith(("<svg", "<?xml")) and "<svg" in text:
        return KIND_FIGURE
    if stripped.startswith("{") and os.path.getsize(path) <= 2**20:
        try:
            with open(path, encoding="utf-8") as fh:
                obj = json.load(fh)
            if isinstance(obj, dict) and obj.get("kind") == "CrossbarConfig":
                return KIND_CONFIG_JSON
        except (OSError, ValueError):
            pass
    return KIND_TEXT


def file_kind(path) -> str | None:
    """What an existing file holds, as a kind string; None for an empty or absent file.

    HDF5: the root ``schema`` attribute when there is one (a measurement campaign without it is
    recognised by its datasets; a simulated one is a kind of its own,
    ``aimc_device.io.SIMULATED_CAMPAIGN``), else NetCDF, CrossbarConfig or plain HDF5. Otherwise
    a torch checkpoint, a figure (PNG, PDF, JPEG, SVG, EPS, ...), a text file or binary data.

    Parameters
    ----------
    path : str or os.PathLike
    """
    path = _abspath(path)
    try:
        if os.path.getsize(path) == 0:
            return None
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    import h5py

    if h5py.is_hdf5(path):
        return _hdf5_kind(path)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return KIND_DATA
        return KIND_CHECKPOINT if any(n.endswith("data.pkl") for n in names) else KIND_DATA
    if head.startswith(_FIGURE_MAGIC):
        return KIND_FIGURE
    if b"\0" in head:
        return KIND_DATA
    return _text_kind(path, head)


def describe_kind(kind: str | None) -> str:
    """A kind string in words, for messages ("a measurement campaign", "a device card", ...)."""
    from .device_card import CARD_SCHEMA
    from .measurements import SCHEMA, SIMULATED_CAMPAIGN

    names = {SCHEMA: f"a measurement campaign ({SCHEMA})",
             SIMULATED_CAMPAIGN: f"a simulated campaign ({SCHEMA})",
             CARD_SCHEMA: f"a device card ({CARD_SCHEMA})", KIND_NETCDF: "a NetCDF file",
             KIND_CHECKPOINT: "a training checkpoint", KIND_FIGURE: "a figure",
             KIND_TEXT: "a text file", KIND_CONFIG: "a CrossbarConfig (HDF5)",
             KIND_CONFIG_JSON: "a CrossbarConfig (JSON)", KIND_HDF5: "an HDF5 file",
             KIND_DATA: "binary data", None: "nothing"}
    return names.get(kind, f"an HDF5 file of schema {kind!r}")


# ------------------------------------------------------------------------- temporary files
def _temp_name(path: str) -> str:
    folder, base = os.path.split(path)
    ext = os.path.splitext(base)[1]
    return os.path.join(folder, f".{base}{_TMP_TAG}{_HOST}-{os.getpid()}-"
                                f"{secrets.token_hex(4)}{ext}")


def _new_temp(path: str, who: str) -> str:
    """Create an empty temporary file beside ``path`` (0666 & ~umask); errors name ``who``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            msg = (f"{who}: cannot write into the folder {os.path.dirname(path)} "
                   f"({exc.strerror or exc}); choose a writable folder")
            raise (PermissionError(msg) if isinstance(exc, PermissionError) else OSError(msg)) \
                from None
        os.close(fd)
        return tmp
    raise FileExistsError(f"{who}: no free temporary file name in {os.path.dirname(path)}")


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (zombies count as gone)."""
    if os.name != "posix":  # no cheap, harmless liveness probe: assume it runs
        return True
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(folder) -> list[str]:
    """Remove the temporary files of writers on this host that no longer run.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    list of str, the names removed.
    """
    folder = _abspath(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name) if _TMP_TAG in name else None
        if m is None or m["host"] != _HOST or _process_exists(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


# ------------------------------------------------------------------------- checks
def _check_folder_exists(folder: str, who: str, create: bool) -> str:
    """The folder to probe for writing: ``folder``, or its nearest existing parent when it is
    to be created."""
    if os.path.isdir(folder):
        return folder
    if os.path.exists(folder):
        raise NotADirectoryError(f"{who}: cannot write: {folder} is not a folder")
    if not create:
        raise FileNotFoundError(f"{who}: cannot write: the folder {folder} does not exist; "
                                "create it first")
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{who}: cannot create the folder {folder}: {parent} is not a "
                                 "folder")
    return parent


def check_folder(folder, create: bool = False) -> str:
    """Check that files can be written into ``folder`` (before a long computation).

    Parameters
    ----------
    folder : str or os.PathLike
    create : bool
        The folder will be created: it may be absent when its nearest existing parent is a
        writable folder.

    Returns
    -------
    str, the absolute path of the folder.

    Raises
    ------
    FileNotFoundError, NotADirectoryError, PermissionError or OSError
        Naming the folder and the reason.
    """
    folder = _abspath(folder)
    probe_dir = _check_folder_exists(folder, folder, create)
    os.unlink(_new_temp(os.path.join(probe_dir, ".aimc-probe"), folder))
    return folder


def _inputs(inputs) -> list[str]:
    if inputs is None or isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    out = []
    for p in inputs:
        if isinstance(p, (str, bytes, os.PathLike)) and os.fspath(p):
            out.append(os.fsdecode(os.fspath(p)))
    return out


def _check_destination(path: str, kind: str, inputs, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; give the name of a file to write")
    if not os.path.lexists(path):
        return
    for inp in _inputs(inputs):
        try:
            same = os.path.samefile(path, inp)
        except (OSError, ValueError):
            continue
        if same:
            raise OutputRefusedError(
                f"{path}: is the same file as the input {inp}; writing would destroy the "
                "input: choose another output path")
    if os.path.exists(path) and not os.path.isfile(path):
        raise OutputRefusedError(f"{path}: is not a regular file (a device, pipe or socket); "
                                 "choose another output path")
    if overwrite:
        return
    existing = file_kind(path)
    if existing is None or existing == kind:
        return
    raise OutputRefusedError(
        f"{path}: exists and holds {describe_kind(existing)}, not {describe_kind(kind)}; not "
        "replaced: choose another output path, or pass overwrite=True (on the command line: "
        "--force) to replace it")


def check_output(path, kind: str, *, inputs=(), overwrite: bool = False) -> str:
    """Check an output path before anything is computed or written; return it absolute.

    Parameters
    ----------
    path : str or os.PathLike
        The file to be written.
    kind : str
        What will be written: a schema (``aimc_device.io.SCHEMA``, ``CARD_SCHEMA``) or one of the
        ``KIND_*`` constants; an existing file of the same kind may be replaced.
    inputs : path or sequence of paths
        Files the computation reads; the output may not be any of them (same inode).
    overwrite : bool
        Replace an existing file of another kind too.

    Raises
    ------
    OutputRefusedError
        The output is an input, not a regular file, or an existing file of another kind
        (without ``overwrite``).
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError
        The folder is missing, not a folder or not writable; the path is a folder.
    """
    path = _abspath(path)
    folder = _check_folder_exists(os.path.dirname(path), path, create=False)
    _check_destination(path, kind, inputs, overwrite)
    os.unlink(_new_temp(os.path.join(folder, os.path.basename(path)), path))
    return path


# ------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_output(path, kind: str, *, inputs=(), overwrite: bool = False):
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The checks of :func:`check_output` run first (and again just before the rename, since a
    long write leaves time for the destination to change); stale temporary files of dead
    writers in the folder are removed. On any exception (KeyboardInterrupt included) the
    temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike, the destination file
    kind, inputs, overwrite : as in :func:`check_output`

    Yields
    ------
    str, the temporary file (empty; it has the destination's extension).
    """
    path = _abspath(path)
    _check_folder_exists(os.path.dirname(path), path, create=False)
    _check_destination(path, kind, inputs, overwrite)
    remove_stale_temporaries(os.path.dirname(path))
    tmp = _new_temp(path, path)
    try:
        yield tmp
        _check_destination(path, kind, inputs, overwrite)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str, kind: str = KIND_TEXT, *, inputs=(),
               overwrite: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    with atomic_output(path, kind, inputs=inputs, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def save_figure(fig, path, *, inputs=(), overwrite: bool = False, **savefig_kwargs) -> None:
    """Save a matplotlib figure through :func:`atomic_output`; the format follows the
    extension of ``path`` (PNG without one)."""
    ext = os.path.splitext(os.fspath(path))[1][1:].lower()
    with atomic_output(path, KIND_FIGURE, inputs=inputs, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format=ext or "png", **savefig_kwargs)
