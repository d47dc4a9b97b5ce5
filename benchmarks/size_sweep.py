"""Direct mapping (and optionally HWA training) across network sizes of a workload.

For each size of a workload (a list of ``key=value`` settings of its fields), trains the
floating-point model with the workload's recipe (seed 0, torch on one thread), maps it directly
to analog tiles as the study does (:func:`aimc_device.study.study.prepare_models`: input ranges
from 10 training batches, the ``rasch2023`` preset, standard ``CrossbarConfig()``, global drift
compensation) and programs it ``--repeats`` times with the study's task keys (seed, 1, r),
evaluating at 1 s, 1 h, 1 d and 1 y. The FP checkpoint is written where ``run_study`` with the
same ``--out``, seed and workload settings looks for it, so a study of a size of the sweep
starts from the same FP model.

    python benchmarks/size_sweep.py --workload lstm --sizes "layers=1,hidden=64" \\
        "layers=2,hidden=128" --repeats 3 --out sweep-out

With ``--hwa`` each size is also HWA fine-tuned by the study's own phase
(:func:`~aimc_device.study.study.prepare_models`, from the same FP checkpoint) with the
workload's recipe (:func:`~aimc_device.study.study.hwa_recipe`) changed by ``--hwa-set``, and
evaluated with the study's task keys (seed, 2, r), a second row per size:

    python benchmarks/size_sweep.py --workload lstm --sizes "pixels_per_step=1" --hwa \
        --distill --hwa-set noise_scale=3 --repeats 5 --out sweep-out

Appends one JSON line per size to ``<out>/<workload>-sweep.jsonl`` and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time

import numpy as np
import torch

from aimc_device import __version__
from aimc_device import nn as ann
from aimc_device.crossbar import CrossbarConfig
from aimc_device.study._checkpoint import fingerprint
from aimc_device.study._tasks import ModelSpec, evaluate_task
from aimc_device.study.study import (_calibration_batches, _train_fp, hwa_recipe,
                                     prepare_models, resolve_device)
from aimc_device.workloads import get_workload

TIMES = (1.0, 3600.0, 86400.0, 31536000.0)
LABELS = ("1 s", "1 h", "1 d", "1 y")


def parse_size(text: str) -> dict:
    """``"layers=2,hidden=128"`` -> ``{"layers": 2, "hidden": 128}`` (int, float or str)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value.strip()
    return out


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _evaluate(spec, variant: int, seed: int, repeats: int, fp_error: float,
              chance: float) -> dict:
    """Errors and A* (mean, sem) of ``repeats`` programmings with the keys (seed, variant, r)."""
    t0, c0 = time.perf_counter(), _cpu_s()
    err = np.array([evaluate_task(spec, (int(seed), variant, r), TIMES) for r in range(repeats)])
    a = ann.normalized_accuracy(err, fp_error, chance)
    return {"error": err.tolist(), "a_star_mean": a.mean(axis=0).tolist(),
            "a_star_sem": ann.standard_error(a.T).tolist(),
            "eval_wall_s": time.perf_counter() - t0, "eval_cpu_s": _cpu_s() - c0}


def hwa_one(workload: str, size: dict, repeats: int, seed: int, out_dir: str,
            all_analog: bool, progress: bool, hwa_set: dict, distill: bool,
            hwa_epochs: int | None, hwa_lr: float) -> dict:
    """Direct mapping and HWA fine-tuning of one size by the study's phases."""
    t0, c0 = time.perf_counter(), _cpu_s()
    hwa = dataclasses.replace(hwa_recipe(workload), **hwa_set)
    prep = prepare_models(workload, out_dir=out_dir, seed=seed, hwa_epochs=hwa_epochs,
                          hwa_lr=hwa_lr, hwa=hwa, distill=distill, workload_kwargs=size,
                          progress=progress, digital_layers=() if all_analog else None)
    train_s, train_cpu = time.perf_counter() - t0, _cpu_s() - c0
    base = {"workload": workload, "size": size, "all_analog": all_analog, "seed": seed,
            "repeats": repeats, "params": sum(p.numel() for p in prep.fp_model.parameters()),
            "fp_error": prep.fp_error, "chance_error": prep.chance_error,
            "package_version": __version__}
    rows = []
    for v, name in ((1, "direct"), (2, "hwa")):
        r = {**base, "variant": name, "fp_wall_s": train_s if v == 2 else 0.0,
             "fp_cpu_s": train_cpu if v == 2 else 0.0,
             **_evaluate(prep.specs[name], v, seed, repeats, prep.fp_error, prep.chance_error)}
        if v == 2:
            r.update(hwa=dataclasses.asdict(hwa), distill=distill,
                     hwa_epochs=prep.settings["hwa_epochs"], hwa_lr=hwa_lr,
                     timings=prep.timings)
        r["load_average"] = os.getloadavg()[0]
        rows.append(r)
    return rows


def sweep_one(workload: str, size: dict, repeats: int, seed: int, out_dir: str,
              all_analog: bool, progress: bool) -> dict:
    """FP error, direct-mapping errors and A* of one size (see the module docstring)."""
    wl_kwargs = {"quick": False, **size}
    wl = get_workload(workload, **wl_kwargs)
    t0, c0 = time.perf_counter(), _cpu_s()
    # the study's FP checkpoint name (prepare_models), so that run_study resumes from it
    fp_settings = {"workload": workload, "workload_kwargs": wl_kwargs, "seed": int(seed),
                   "epochs": wl.epochs, "package_version": __version__}
    ckpt = os.path.join(out_dir, "checkpoints", f"{workload}-fp-{fingerprint(fp_settings)}.pt")
    fp_model = _train_fp(wl, seed, ckpt, fp_settings, progress, None)
    fp_error = float(wl.evaluate(fp_model))
    fp_s, fp_cpu = time.perf_counter() - t0, _cpu_s() - c0
    cfg = CrossbarConfig()
    dev, _ = resolve_device(None)
    digital = () if all_analog else tuple(wl.digital_layers)
    direct = ann.convert(fp_model, cfg, dev, digital=digital, rng=seed)
    ann.init_input_ranges(direct, _calibration_batches(wl, seed, 10),
                          cap=hwa_recipe(workload).input_range_cap)
    direct.eval()
    spec = ModelSpec.from_model(workload, wl_kwargs, seed, cfg, dev, digital, direct)
    chance = float(wl.chance_error)
    return {"workload": workload, "size": size, "all_analog": all_analog, "seed": seed,
            "repeats": repeats, "params": sum(p.numel() for p in fp_model.parameters()),
            "fp_error": fp_error, "chance_error": chance, "variant": "direct",
            "fp_wall_s": fp_s, "fp_cpu_s": fp_cpu,
            **_evaluate(spec, 1, seed, repeats, fp_error, chance),
            "package_version": __version__, "load_average": os.getloadavg()[0]}


def format_row(r: dict) -> str:
    size = ",".join(f"{k}={v}" for k, v in r["size"].items()) or "default"
    cells = "".join(f"{100 * m:7.1f}+-{100 * s:4.1f}"
                    for m, s in zip(r["a_star_mean"], r["a_star_sem"]))
    if r.get("variant") == "hwa":
        size = "  HWA " + ",".join(f"{k}={v}" for k, v in r["hwa_set"].items()) \
            + (" distill" if r["distill"] else "")
    return (f"{size:34s}{'all' if r['all_analog'] else 'mid':>5s}{r['params']:>9d}"
            f"{r['fp_error'] * 100:7.2f}{cells}{r['fp_wall_s']:8.0f}{r['eval_wall_s']:7.0f}")


HEADER = (f"{'size':34s}{'anlg':>5s}{'params':>9s}{'FP %':>7s}"
          + "".join(f"{'A* ' + lab:>13s}" for lab in LABELS) + f"{'FP s':>8s}{'ev s':>7s}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", required=True)
    p.add_argument("--sizes", nargs="+", default=[""],
                   help='workload settings per size, e.g. "layers=2,hidden=128"')
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-analog", action="store_true", help="no digital layers")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="sweep-out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--hwa", action="store_true", help="also HWA fine-tune each size")
    p.add_argument("--hwa-set", default="", help='HWAConfig changes, e.g. "noise_scale=3"')
    p.add_argument("--distill", action="store_true")
    p.add_argument("--hwa-epochs", type=int, default=None)
    p.add_argument("--hwa-lr", type=float, default=0.01)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.workload}-sweep.jsonl")
    print(f"{args.workload}: A* [%] (mean +- sem over {args.repeats} repeats), direct mapping; "
          f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}")
    print(HEADER)
    for text in args.sizes:
        if args.hwa:
            hwa_set = parse_size(args.hwa_set)
            rows = hwa_one(args.workload, parse_size(text), args.repeats, args.seed, args.out,
                           args.all_analog, not args.no_progress, hwa_set, args.distill,
                           args.hwa_epochs, args.hwa_lr)
            rows[1]["hwa_set"] = hwa_set
        else:
            rows = [sweep_one(args.workload, parse_size(text), args.repeats, args.seed,
                              args.out, args.all_analog, not args.no_progress)]
        for r in rows:
            with open(path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(format_row(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
