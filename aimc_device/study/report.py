"""Tables, plots and files of study results (no physics here, only presentation).

Tables follow the shape of Table 3 of Rasch et al. (2023): test error [%] at each time after
programming (mean +- standard error over repeats) and A* at 1 h, 1 day and 1 year.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import textwrap

import numpy as np
import xarray as xr

from ..io import (KIND_FIGURE, KIND_NETCDF, KIND_TEXT, atomic_output, check_folder, check_output,
                  save_figure)
from ._checkpoint import atomic_path

__all__ = ["save_dataset", "load_dataset", "write_outputs", "check_outputs", "format_table",
           "plot_study", "plot_studies", "format_sensitivity_table", "plot_sensitivity",
           "hardware_description", "provenance_line"]

_NAMES = {"fp": "FP", "direct": "direct mapping", "hwa": "HWA-trained"}


def hardware_description() -> str:
    """The machine a result is measured on: CPU model, logical CPUs, torch version and threads.

    Stored in the ``hardware`` attribute of every study, sensitivity and requirements result
    and printed on its figure with the command that produced it.
    """
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} on "
            f"{torch.get_num_threads()} threads")


def provenance_line(ds: xr.Dataset) -> str:
    """``command | hardware`` of a result (the footer of its figure)."""
    command = ds.attrs.get("command") or "command not recorded"
    hardware = ds.attrs.get("hardware") or "hardware not recorded"
    return f"{command} | {hardware}"


def _stamp(fig, lines) -> None:
    """Write the provenance ``lines`` along the bottom of ``fig`` and lay the figure out above."""
    size = 5.5  # [pt]
    width = int(fig.get_figwidth() * 72 / (0.6 * size))  # characters across the figure
    lines = [part for line in dict.fromkeys(lines)
             for part in textwrap.wrap(line, width, break_on_hyphens=False)]
    footer = (len(lines) * 1.4 * size / 72 + 0.05) / fig.get_figheight()  # of the height
    fig.tight_layout(rect=(0, footer, 1, 1))
    fig.text(0.005, 0.004, "\n".join(lines), fontsize=size, color="0.35", ha="left",
             va="bottom")


def _clean_attrs(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if v is None:
            v = "none"
        elif isinstance(v, (bool, np.bool_)):
            v = int(v)
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, str):
            v = str(v)
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, default=str)
        out[k] = v
    return out


def _to_netcdf(ds: xr.Dataset, path: str) -> None:
    ds = ds.copy()
    ds.attrs = _clean_attrs(ds.attrs)
    for name in list(ds.variables):
        ds[name].attrs = _clean_attrs(ds[name].attrs)
    ds.to_netcdf(path, engine="h5netcdf")


def save_dataset(ds: xr.Dataset, path, overwrite: bool = False) -> None:
    """Write ``ds`` as NetCDF-4 through h5netcdf, atomically (temp file + rename).

    Parameters
    ----------
    ds : xarray.Dataset
    path : str or os.PathLike
        Its folder is created when missing; an existing file other than NetCDF (a campaign, a
        device card, ...) is not replaced unless ``overwrite``.
    overwrite : bool
    """
    with atomic_path(path, KIND_NETCDF, overwrite=overwrite) as tmp:
        _to_netcdf(ds, tmp)


def _outputs(stem: str, plot: bool) -> list[tuple[str, str]]:
    out = [(stem + ".nc", KIND_NETCDF), (stem + ".txt", KIND_TEXT)]
    return out + [(stem + ".png", KIND_FIGURE)] if plot else out


def check_outputs(stem, plot: bool = True, inputs=(), overwrite: bool = False) -> None:
    """Check before a study runs that :func:`write_outputs` will be able to write ``stem.*``.

    The folder may be absent (it is created) when its nearest existing parent is writable; an
    existing ``stem.nc`` / ``.txt`` / ``.png`` must be a file of that kind (NetCDF, text, figure)
    unless ``overwrite``, and none may be one of ``inputs``.

    Raises
    ------
    aimc_device.io.OutputRefusedError, or an OSError naming the path and the reason.
    """
    stem = os.path.abspath(os.fspath(stem))
    folder = check_folder(os.path.dirname(stem), create=True)
    if os.path.isdir(folder):
        for path, kind in _outputs(stem, plot):
            check_output(path, kind, inputs=inputs, overwrite=overwrite)


def write_outputs(ds: xr.Dataset, stem: str, table_fn, plot_fn=None,
                  verbose: bool = True, inputs=(), overwrite: bool = False) -> str:
    """Save ``stem.nc``, ``stem.txt`` (the table) and, with ``plot_fn``, ``stem.png``.

    All of them or none: each is written to a temporary file, and they are renamed into place
    once all are complete (see :func:`aimc_device.io.atomic_output`; ``inputs`` and
    ``overwrite`` as there). ``plot_fn(ds, path)`` writes the figure.

    Returns the table text (also printed when ``verbose``).
    """
    stem = os.path.abspath(os.fspath(stem))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    table = table_fn(ds)
    writers = {KIND_NETCDF: lambda tmp: _to_netcdf(ds, tmp),
               KIND_TEXT: lambda tmp: _write_text(tmp, table + "\n"),
               KIND_FIGURE: lambda tmp: plot_fn(ds, tmp)}
    with contextlib.ExitStack() as stack:
        for path, kind in _outputs(stem, plot_fn is not None):
            writers[kind](stack.enter_context(atomic_output(path, kind, inputs=inputs,
                                                            overwrite=overwrite)))
    if verbose:
        print(table)
    return table


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def load_dataset(path) -> xr.Dataset:
    """Read a result written by :func:`save_dataset` (loaded into memory, file closed)."""
    with xr.open_dataset(os.fspath(path), engine="h5netcdf") as ds:
        return ds.load()


def _pct(v) -> str:
    return "   n/a" if not np.isfinite(v) else f"{100 * v:6.2f}"


def format_table(ds: xr.Dataset) -> str:
    """A text table in the shape of the paper's Table 3 for a :func:`run_study` result.

    Rows: FP, direct mapping, HWA-trained. Columns: test error [%] at each time (mean +- sem
    over repeats), then A* [%] at each time after the first.
    """
    times = list(ds["time_label"].values) if "time_label" in ds.coords else [
        f"{t:g} s" for t in ds["time"].values]
    fp, chance = float(ds["fp_error"]), float(ds["chance_error"])
    head = (f"{ds.attrs.get('workload', '')}: test error [%] after programming "
            f"(mean +- sem over {ds.sizes['repeat']} repeats, seed {ds.attrs.get('seed')}); "
            f"FP {100 * fp:.2f} %, chance {100 * chance:.1f} %")
    cols = [f"{'model':<15}"] + [f"{t:>15}" for t in times] + [f"{'A* ' + t:>9}"
                                                              for t in times[1:]]
    lines = [head, " ".join(cols), "-" * len(" ".join(cols))]
    for v in ds["variant"].values:
        m = ds["error_mean"].sel(variant=v).values
        s = ds["error_sem"].sel(variant=v).values
        a = ds["normalized_accuracy_mean"].sel(variant=v).values
        cells = [f"{_NAMES.get(str(v), str(v)):<15}"]
        for mi, si in zip(m, s):
            cells.append(f"{_pct(mi)} +- {100 * si:5.2f}" if np.isfinite(si) and str(v) != "fp"
                         else f"{_pct(mi):>15}")
        cells += [f"{_pct(ai):>9}" for ai in a[1:]]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot_study(ds: xr.Dataset, path, ax=None, overwrite: bool = False) -> None:
    """Plot test accuracy [%] against time after programming for each variant (PNG).

    Parameters
    ----------
    ds : xarray.Dataset from :func:`run_study`
    path : str or None, where to write the figure (None with ``ax``: draw only); written
        atomically, never over a file of another kind unless ``overwrite``
    ax : matplotlib Axes, optional
    overwrite : bool
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=110)
    t = ds["time"].values
    styles = {"direct": ("tab:red", "s"), "hwa": ("tab:blue", "o")}
    for v in ds["variant"].values:
        if str(v) == "fp":
            continue
        c, mk = styles.get(str(v), (None, "^"))
        m = 100 * (1 - ds["error_mean"].sel(variant=v).values)
        s = 100 * ds["error_sem"].sel(variant=v).values
        ax.errorbar(t, m, yerr=np.nan_to_num(s), color=c, marker=mk, capsize=3,
                    label=_NAMES.get(str(v), str(v)))
    ax.axhline(100 * (1 - float(ds["fp_error"])), color="k", ls="--", lw=1, label="FP")
    ax.set_xscale("log")
    ax.set_xticks(t)
    ax.set_xticklabels(list(ds["time_label"].values) if "time_label" in ds.coords else t)
    ax.set_xlabel("time after programming")
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(f"{ds.attrs.get('workload', '')}: {ds.sizes['repeat']} repeats, "
                 f"seed {ds.attrs.get('seed')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if own:
        _stamp(fig, [provenance_line(ds)])
        try:
            if path is not None:
                save_figure(fig, path, overwrite=overwrite)
        finally:
            plt.close(fig)


def format_sensitivity_table(ds: xr.Dataset) -> str:
    """Text table of a :func:`run_sensitivity` result.

    Per nonideality: its knob at the standard value and at the highest level reached, the MVM
    error reached, A*(t) there and its loss against the standard model, and the threshold (MVM
    error and knob value) where A* crosses the iso-accuracy level.
    """
    thr = float(ds.attrs.get("iso_accuracy", 0.99))
    a0 = float(ds["standard_normalized_accuracy"])
    top = f"dA*@{100 * float(ds.attrs.get('max_mvm_error', 0.2)):.0f}%"
    lines = [f"{ds.attrs.get('workload', '')} sensitivity (HWA-trained model, "
             f"A* at t = {ds.attrs.get('time_label', '')}, {ds.sizes['repeat']} repeats, "
             f"seed {ds.attrs.get('seed')}); standard: eps_M {100 * float(ds['standard_mvm_error']):.1f} %, "
             f"A* {100 * a0:.2f} %",
             f"{'nonideality':<18} {'knob':<24} {'standard':>9} {'at max':>9} {'eps_M max':>9} "
             f"{'A* max':>8} {top:>8} {'eps_M@A*=' + f'{100 * thr:.0f}%':>13} "
             f"{'knob@thr':>9}",
             ]
    lines.append("-" * len(lines[1]))
    for n in ds["nonideality"].values:
        sub = ds.sel(nonideality=n)
        eps = sub["mvm_error"].values
        ok = np.isfinite(eps)
        if not ok.any():
            continue
        k = np.flatnonzero(ok)[-1]
        a = float(sub["normalized_accuracy_mean"].values[k])
        lines.append(
            f"{str(n):<18} {str(sub['knob'].values):<24} {float(sub['value'].values[0]):>9.4g} "
            f"{float(sub['value'].values[k]):>9.4g} {100 * eps[k]:>8.1f}% {100 * a:>7.2f}% "
            f"{_loss(sub):>8} {_thr(float(sub['threshold_mvm_error'])):>13} "
            f"{float(sub['threshold_value']):>9.4g}")
    return "\n".join(lines)


def _thr(v: float) -> str:
    return "not reached" if not np.isfinite(v) else f"{100 * v:.2f}%"


def _loss(sub) -> str:
    v = float(sub["loss_at_max_mvm_error"]) if "loss_at_max_mvm_error" in sub else np.nan
    return "n/r" if not np.isfinite(v) else f"{-100 * v:+.2f}%"


def plot_sensitivity(ds: xr.Dataset, path, overwrite: bool = False) -> None:
    """A* against the MVM error for each nonideality, in the manner of the paper's Fig. 4
    (written atomically; never over a file of another kind unless ``overwrite``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=110)
    thr = float(ds.attrs.get("iso_accuracy", 0.99))
    cmap = plt.get_cmap("tab10")
    names, losses = [], []
    top = 100 * float(ds.attrs.get("max_mvm_error", 0.2))
    for i, n in enumerate(ds["nonideality"].values):
        sub = ds.sel(nonideality=n)
        eps = sub["mvm_error"].values
        ok = np.isfinite(eps)
        if not ok.any():
            continue
        a = sub["normalized_accuracy_mean"].values
        s = np.nan_to_num(sub["normalized_accuracy_sem"].values)
        ax.errorbar(100 * eps[ok], 100 * a[ok], yerr=100 * s[ok], marker="o", ms=3,
                    color=cmap(i % 10), label=str(n), capsize=2)
        if "loss_at_max_mvm_error" in ds and np.isfinite(float(sub["loss_at_max_mvm_error"])):
            names.append(str(n))
            losses.append(100 * float(sub["loss_at_max_mvm_error"]))
    ax.axhline(100 * thr, color="k", ls="--", lw=1)
    eps0 = 100 * float(ds["standard_mvm_error"])
    ax.set_xlim(eps0 - 0.5, top + 0.8)  # levels beyond the sweep's top are in the table
    inside = ds["normalized_accuracy_mean"].where(ds["mvm_error"] <= top / 100 + 1e-3)
    lo = float(inside.min()) if np.isfinite(float(inside.min())) else thr
    ax.set_ylim(100 * min(lo, thr) - 1.0, 100 * max(1.0, float(inside.max())) + 0.5)
    ax.set_xlabel("MVM error eps_M [%]")
    ax.set_ylabel(f"A*({ds.attrs.get('time_label', '')}) [%]")
    ax.set_title(f"{ds.attrs.get('workload', '')}: one nonideality at a time", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    order = np.argsort(losses)[::-1]
    bx.barh([names[j] for j in order], [losses[j] for j in order], color="tab:gray")
    bx.invert_yaxis()
    bx.set_xlabel(f"loss of A* at eps_M = {top:.0f} % [%]")
    bx.grid(alpha=0.3, axis="x")
    _stamp(fig, [provenance_line(ds)])
    try:
        save_figure(fig, path, overwrite=overwrite)
    finally:
        plt.close(fig)


def plot_studies(datasets, path, overwrite: bool = False) -> None:
    """Side-by-side accuracy-vs-time panels for several :func:`run_study` results (PNG).

    Parameters
    ----------
    datasets : sequence of xarray.Dataset
    path : str or os.PathLike, written atomically (see :func:`plot_study`)
    overwrite : bool
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    datasets = list(datasets)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), dpi=100,
                             squeeze=False)
    for ds, ax in zip(datasets, axes[0]):
        plot_study(ds, None, ax=ax)
    _stamp(fig, [provenance_line(ds) for ds in datasets])
    try:
        save_figure(fig, path, overwrite=overwrite)
    finally:
        plt.close(fig)
