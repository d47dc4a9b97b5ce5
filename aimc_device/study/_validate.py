"""Checks of the settings of a study, a sensitivity sweep and the demo, before anything runs.

Each raises TypeError or ValueError naming the argument and what is allowed, so that a bad
setting fails at once instead of after hours of training (or, worse, runs and means nothing: a
negative number of HWA epochs would report an untrained model as HWA-trained).
"""
from __future__ import annotations

import math
import os

from .._checks import check_bool, check_float, check_instance, check_int
from ..crossbar import CrossbarConfig
from ..nn import HWAConfig
from ..pcm import PCMModel
from ..workloads import WORKLOADS, Workload

__all__ = ["check_recipe", "check_times", "check_sensitivity", "device_inputs", "workload_name"]


def workload_name(workload) -> str:
    """The registry name of a workload given by name or as a Workload."""
    return workload.name if isinstance(workload, Workload) else str(workload)


def device_inputs(device) -> list[str]:
    """The files a device argument reads (a device card's path), for the output checks."""
    if isinstance(device, (str, os.PathLike)) and os.path.isfile(os.fspath(device)):
        return [os.fspath(device)]
    return []


def check_recipe(workload, device, cfg, out_dir, seed, quick, hwa_epochs, hwa_lr, hwa, distill,
                 calibration_batches, workload_kwargs, digital_layers, progress,
                 on_epoch_end) -> None:
    """Check the arguments of :func:`aimc_device.study.prepare_models` (types and ranges)."""
    check_instance(workload, "workload", (str, Workload), "a workload name "
                   f"({', '.join(sorted(WORKLOADS))}) or a Workload")
    if isinstance(workload, str) and workload not in WORKLOADS:
        raise ValueError(f"workload = {workload!r}: choose one of {sorted(WORKLOADS)}")
    check_instance(device, "device", (PCMModel, str, os.PathLike),
                   "a PCMModel, a preset name or the path of a device card", allow_none=True)
    check_instance(cfg, "cfg", CrossbarConfig, "a CrossbarConfig", allow_none=True)
    check_instance(out_dir, "out_dir", (str, os.PathLike), "a folder path (str or os.PathLike)")
    check_int(seed, "seed", lo=0)
    check_bool(quick, "quick")
    if hwa_epochs is not None:
        check_int(hwa_epochs, "hwa_epochs", lo=1)
    check_float(hwa_lr, "hwa_lr", lo=0.0, lo_open=True)
    check_instance(hwa, "hwa", HWAConfig, "an aimc_device.nn.HWAConfig", allow_none=True)
    check_bool(distill, "distill")
    check_int(calibration_batches, "calibration_batches", lo=1)
    check_instance(workload_kwargs, "workload_kwargs", dict, "a dict of workload fields",
                   allow_none=True)
    if digital_layers is not None:
        if isinstance(digital_layers, (str, bytes)) or not hasattr(digital_layers, "__iter__"):
            raise TypeError(f"digital_layers = {digital_layers!r}: give a list of module names "
                            "(or () for all analog, None for the workload's default)")
        for name in digital_layers:
            check_instance(name, "digital_layers[...]", str, "a module name (str)")
    check_bool(progress, "progress")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end: expected a callable(phase, epoch) or None, got "
                        f"{type(on_epoch_end).__name__}")


def check_times(times, name: str = "times") -> tuple[float, ...]:
    """Times after programming [s] as a tuple of finite, non-negative floats (at least one)."""
    if isinstance(times, (str, bytes)) or not hasattr(times, "__iter__"):
        raise TypeError(f"{name} = {times!r}: give a sequence of times after programming [s]")
    out = tuple(check_float(t, f"{name}[{i}]", lo=0.0) for i, t in enumerate(times))
    if not out:
        raise ValueError(f"{name}: give one or more finite, non-negative times [s]")
    return out


def check_sensitivity(nonidealities, known, max_mvm_error, n_levels, repeats, t, iso_accuracy,
                      test_shape, n_inputs) -> list[str]:
    """Check the sweep settings of :func:`aimc_device.study.run_sensitivity`; return the names."""
    if nonidealities is None:
        names = list(known)
    else:
        if isinstance(nonidealities, (str, bytes)) or not hasattr(nonidealities, "__iter__"):
            raise TypeError(f"nonidealities = {nonidealities!r}: give a list of names from "
                            f"{list(known)}")
        names = list(nonidealities)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"nonidealities: unknown {unknown}; choose from {list(known)}")
        if not names:
            raise ValueError(f"nonidealities: empty; give names from {list(known)} or None for "
                             "all")
    check_float(max_mvm_error, "max_mvm_error", 0.0, 1.0, lo_open=True)
    check_int(n_levels, "n_levels", lo=2)
    check_int(repeats, "repeats", lo=1)
    check_float(t, "t", lo=0.0)
    check_float(iso_accuracy, "iso_accuracy", 0.0, 1.0, lo_open=True)
    if test_shape is not None:
        if isinstance(test_shape, (str, bytes)) or len(tuple(test_shape)) != 2:
            raise ValueError(f"test_shape = {test_shape!r}: give (out, in), two positive "
                             "integers")
        for i, v in enumerate(test_shape):
            check_int(v, f"test_shape[{i}]", lo=1)
    if n_inputs is not None:
        check_int(n_inputs, "n_inputs", lo=1)
    return names


def check_reachable(max_mvm_error: float, eps0: float) -> None:
    """The top of a sensitivity sweep must lie above the standard model's MVM error."""
    if not (math.isfinite(eps0) and max_mvm_error > eps0):
        raise ValueError(f"max_mvm_error = {max_mvm_error:g}: must exceed the MVM error of the "
                         f"standard model ({eps0:.4g}); nothing would be swept")
