"""Ablation of the HWA recipe: each ingredient switched off in turn, A*(1 h) and A*(1 y).

From the study's HWA recipe (:func:`aimc_device.study.study.hwa_recipe`, distillation from the
floating-point model, the study's epochs and learning rate), one ingredient at a time is put
back to what it is without it; every variant is fine-tuned from the same floating-point model
(its checkpoint is shared) and programmed ``--repeats`` times with the same device draws
(common random numbers: task seeds (seed, variant, repeat) use the same repeat keys). Direct
mapping is the first row, for reference.

    python benchmarks/hwa_ablation.py --workload deepcnn --repeats 25 --out ablation-out

Writes ``<out>/<workload>-ablation.txt`` (the table, with the command and the machine) and
``<out>/<workload>-ablation.nc`` (every repeat).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import numpy as np
import xarray as xr

from aimc_device import nn as ann
from aimc_device.study import _dask
from aimc_device.study._tasks import evaluate_task
from aimc_device.study.report import save_dataset
from aimc_device.study.study import hwa_recipe, prepare_models

TIMES = (3600.0, 31536000.0)
LABELS = ("1 h", "1 y")

#: key -> (row name, HWAConfig changes, study changes), each switching one ingredient off.
VARIANTS = {
    "recipe": ("HWA recipe", {}, {}),
    "noise1": ("noise scale 1 (device noise)", dict(noise_scale=1.0), {}),
    "noise0": ("no weight noise", dict(noise_scale=0.0), {}),
    "noramp": ("no noise ramp", dict(ramp_epochs=0.0), {}),
    "bnbatch": ("BatchNorm batch statistics", dict(batchnorm="batch"), {}),
    "scales": ("output scales at the weights' rate", dict(out_scale_lr=1.0), {}),
    "ranges": ("input ranges fixed", dict(input_range_lr=0.0, alpha_decay=0.0), {}),
    "nodistill": ("no distillation", {}, dict(distill=False)),
}


def run_ablation(workload: str = "deepcnn", repeats: int = 25, seed: int = 0,
                 out_dir: str = "ablation-out", variants=None, scheduler=None,
                 quick: bool = False, progress: bool = True) -> xr.Dataset:
    """Train every variant, evaluate it at 1 h and 1 y, return A* per (variant, time, repeat)."""
    keys = list(VARIANTS) if variants is None else list(variants)
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown}: choose from {list(VARIANTS)}")
    base = hwa_recipe(workload)
    trained, fp_error, chance, direct = {}, None, None, None
    timings = {}
    for key in keys:  # trained in the order given
        name, hwa_changes, study_changes = VARIANTS[key]
        t0 = time.perf_counter()
        kw = dict(distill=True, **study_changes)
        prep = prepare_models(workload, out_dir=out_dir, seed=seed, quick=quick,
                              hwa=dataclasses.replace(base, **hwa_changes), progress=progress,
                              **kw)
        timings[name] = time.perf_counter() - t0
        fp_error, chance, direct = prep.fp_error, prep.chance_error, prep.specs["direct"]
        trained[key] = prep.specs["hwa"]
    order = [k for k in VARIANTS if k in trained]  # table order
    specs = [direct] + [trained[k] for k in order]
    names = ["direct mapping"] + [VARIANTS[k][0] for k in order]
    # the same task key for the same repeat in every variant: common device draws
    calls = [(v, (int(seed), 2, r), TIMES) for v in range(len(specs)) for r in range(repeats)]
    res = _dask.compute(evaluate_task, specs, calls, scheduler=scheduler, progress=progress,
                        desc=f"{workload} ablation")
    err = np.empty((len(specs), len(TIMES), repeats))
    for (v, (_, _, r), _), e in zip(calls, res):
        err[v, :, r] = e
    a = ann.normalized_accuracy(err, fp_error, chance)
    return xr.Dataset(
        {"normalized_accuracy": (("variant", "time", "repeat"), a),
         "error": (("variant", "time", "repeat"), err)},
        coords={"variant": names, "time": list(TIMES), "time_label": ("time", list(LABELS)),
                "repeat": np.arange(repeats)},
        attrs={"workload": workload, "seed": seed, "repeats": repeats, "fp_error": fp_error,
               "chance_error": chance, "training_s": str(timings)})


def format_ablation(ds: xr.Dataset, command: str) -> str:
    a = ds["normalized_accuracy"].values * 100
    n = a.shape[-1]
    lines = [f"{ds.attrs['workload']}: A* [%] (mean +- sem over {n} repeats, the same device "
             f"draws for every row, seed {ds.attrs['seed']}); FP error "
             f"{ds.attrs['fp_error'] * 100:.2f} %",
             f"{'variant':38s}" + "".join(f"{'A* ' + lab:>18s}" for lab in LABELS),
             "-" * (38 + 18 * len(LABELS))]
    for i, name in enumerate(ds["variant"].values):
        cells = [f"{a[i, k].mean():9.2f} +- {a[i, k].std(ddof=1) / np.sqrt(n):4.2f}"
                 for k in range(a.shape[1])]
        lines.append(f"{name:38s}" + "".join(f"{c:>18s}" for c in cells))
    lines += ["", f"command: {command}",
              f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"{platform.python_implementation()} {platform.python_version()}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="deepcnn")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ablation-out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)}, trained in this "
                        f"order; default all")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ds = run_ablation(args.workload, args.repeats, args.seed, args.out, quick=args.quick,
                      scheduler=args.scheduler, progress=not args.no_progress,
                      variants=None if args.variants is None else args.variants.split(","))
    stem = os.path.join(args.out, f"{args.workload}-ablation")
    save_dataset(ds, stem + ".nc")
    table = format_ablation(ds, "python benchmarks/hwa_ablation.py " + " ".join(
        sys.argv[1:] if argv is None else argv))
    with open(stem + ".txt", "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
