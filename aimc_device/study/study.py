"""The paper's workflow: train FP, map directly or fine-tune hardware-aware, evaluate over time.

docs/model.md sections 8-9 (Rasch et al. 2023): the floating-point model is trained with the
workload's recipe; the *direct mapping* baseline is the same model converted to analog tiles
with input ranges calibrated on a few training batches and no retraining; the *HWA* model is
fine-tuned from it with device noise in the forward pass (:class:`aimc_device.nn.AnalogOptimizer`
around SGD). Both are programmed and evaluated at 1 s, 1 h, 1 day and 1 year after programming,
``repeats`` times with new device draws, as independent Dask tasks.

Every phase of training writes an atomic checkpoint after each epoch; a run that was killed
resumes from the last one and ends with the same numbers as an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import xarray as xr

from .. import __version__
from .. import nn as ann
from .._checks import check_bool, check_int
from ..crossbar import CrossbarConfig
from ..io import model_to_dict, resolve_device_model
from ..workloads import QUICK, Workload, epoch_seed, get_workload, scoped_seed
from . import _dask
from ._checkpoint import atomic_save, fingerprint, load_checkpoint
from ._tasks import ModelSpec, evaluate_task
from ._validate import check_recipe, check_times, device_inputs, workload_name
from .report import (check_outputs, format_table, hardware_description, plot_study,
                     write_outputs)

__all__ = ["run_study", "prepare_models", "PreparedModels", "resolve_device", "VARIANTS",
           "HWA_EPOCHS", "HWA_NOISE_SCALE", "hwa_recipe", "TIME_LABELS"]

#: Model variants of a study, in table order.
VARIANTS = ("fp", "direct", "hwa")
#: Default HWA fine-tuning epochs per workload (full recipe); ``quick`` runs use 2.
HWA_EPOCHS = {"cnn": 10, "deepcnn": 10, "lstm": 10, "transformer": 6}
#: Training-noise scale of the default HWA recipe per workload (1 elsewhere). The deep plain
#: CNN's error compounds over 15 analog convolutions; it is trained with 3x the device's
#: programming noise, as the paper scales its training noise per network
#: (``benchmarks/hwa_ablation.py`` measures the recipe with noise scale 1).
HWA_NOISE_SCALE = {"deepcnn": 3.0}
#: Labels of the paper's evaluation times (Table 3).
TIME_LABELS = {1.0: "1 s", 3600.0: "1 h", 86400.0: "1 d", 31536000.0: "1 y"}

# Streams of epoch_seed(seed, epoch, stream) used here (the workloads use 0 and 1 for FP).
_S_HWA_SHUFFLE, _S_HWA_TORCH, _S_HWA_TILES, _S_CALIB = 2, 3, 4, 5


def resolve_device(device) -> tuple:
    """A device model and its provenance from a model of either family, a preset name or a
    device card's path (:func:`aimc_device.io.resolve_device_model`; None: the "rasch2023"
    preset).

    Returns
    -------
    (PCMModel or EmpiricalModel, dict)
        The model and its provenance (card path and sha256 and the card's own provenance, or
        the preset's name and citation).
    """
    return resolve_device_model(device, default="rasch2023", provenance=True)


@dataclass
class PreparedModels:
    """The trained models of one study, ready for evaluation.

    Attributes
    ----------
    workload : Workload
    fp_model : torch.nn.Module, the floating-point model (eval mode)
    specs : dict variant -> ModelSpec, the analog models ("direct", "hwa")
    fp_error, chance_error : float, test errors (fractions)
    device : PCMModel or EmpiricalModel
    device_provenance : dict
    cfg : CrossbarConfig
    settings : dict, every setting of the recipe (JSON-serialisable)
    timings : dict, wall time of each phase [s]
    """

    workload: Workload
    fp_model: torch.nn.Module
    specs: dict
    fp_error: float
    chance_error: float
    device: object
    device_provenance: dict
    cfg: CrossbarConfig
    settings: dict
    timings: dict = field(default_factory=dict)


def _reseed_tiles(model, seed: int, epoch: int) -> None:
    """Give every analog tile's training-noise generators a fresh stream from (seed, epoch).

    This makes the noise of an HWA epoch a function of (seed, epoch) alone, so a run resumed
    from a checkpoint draws exactly what an uninterrupted one draws.
    """
    ann.reseed(model, [int(seed), int(epoch)], key=[_S_HWA_TILES])


def hwa_recipe(workload: str) -> ann.HWAConfig:
    """The default HWA settings of ``workload``'s study: :class:`aimc_device.nn.HWAConfig` with
    the noise scale of :data:`HWA_NOISE_SCALE`."""
    return ann.HWAConfig(noise_scale=HWA_NOISE_SCALE.get(workload, 1.0))


def _calibration_batches(wl: Workload, seed: int, n: int) -> list:
    train, _ = wl.load_data()
    gen = torch.Generator().manual_seed(epoch_seed(seed, 0, _S_CALIB))
    loader = torch.utils.data.DataLoader(train, batch_size=wl.batch_size, shuffle=True,
                                         generator=gen)
    out = []
    for i, (x, _) in enumerate(loader):
        if i >= n:
            break
        out.append(x)
    return out


def _train_fp(wl: Workload, seed: int, ckpt: str, settings: dict, progress: bool,
              on_epoch_end: Callable | None) -> torch.nn.Module:
    model = wl.build_model(seed=seed)
    ck = load_checkpoint(ckpt, settings)
    start, opt_state, sched_state = 0, None, None
    if ck is not None:
        model.load_state_dict(ck["model"])
        start, opt_state, sched_state = ck["epoch"] + 1, ck["optimizer"], ck["scheduler"]
    if start >= wl.epochs:
        return model.eval()

    def cb(epoch, model, opt, sched, loss):
        atomic_save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "loss": float(loss),
                     "settings": json.dumps(settings, sort_keys=True, default=str)}, ckpt)
        if on_epoch_end is not None:
            on_epoch_end("fp", epoch)

    return wl.train_fp(model, seed=seed, progress=progress, start_epoch=start,
                       optimizer_state=opt_state, scheduler_state=sched_state, on_epoch_end=cb)


def _train_hwa(wl: Workload, analog, teacher, hwa: ann.HWAConfig, epochs: int, lr: float,
               seed: int, ckpt: str, settings: dict, progress: bool,
               on_epoch_end: Callable | None) -> list[float]:
    """HWA fine-tuning built from AnalogOptimizer; each epoch's randomness from (seed, epoch)."""
    from tqdm.auto import tqdm

    train, _ = wl.load_data()
    steps = -(-len(train) // wl.batch_size)
    opt = torch.optim.SGD(ann.hwa_param_groups(analog, lr, hwa), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    aopt = ann.AnalogOptimizer(opt, analog, hwa, steps_per_epoch=steps)
    ck = load_checkpoint(ckpt, settings)
    start, history = 0, []
    if ck is not None:
        analog.load_state_dict(ck["model"])
        aopt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, history = ck["epoch"] + 1, list(ck["history"])
    bar = tqdm(range(start, epochs), desc=f"{wl.name} HWA", disable=not progress,
               initial=start, total=epochs, leave=False)
    for epoch in bar:
        _reseed_tiles(analog, seed, epoch)
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, _S_HWA_SHUFFLE))
        loader = torch.utils.data.DataLoader(train, batch_size=wl.batch_size, shuffle=True,
                                             generator=gen)
        ann.train_mode(analog, hwa)
        total, count = 0.0, 0
        with scoped_seed(epoch_seed(seed, epoch, _S_HWA_TORCH)):
            for x, y in loader:
                aopt.zero_grad()
                loss = ann.hwa_loss(analog(x), x, y, wl.task_loss, teacher, hwa)
                loss.backward()
                aopt.step()
                sched.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
        aopt.epoch_end()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        atomic_save({"epoch": epoch, "model": analog.state_dict(),
                     "optimizer": aopt.state_dict(), "scheduler": sched.state_dict(),
                     "history": history,
                     "settings": json.dumps(settings, sort_keys=True, default=str)}, ckpt)
        if on_epoch_end is not None:
            on_epoch_end("hwa", epoch)
    bar.close()
    analog.eval()
    return history


def prepare_models(workload: str | Workload = "cnn", device=None, cfg: CrossbarConfig | None = None,
                   out_dir="study-out", seed: int = 0, quick: bool = False,
                   hwa_epochs: int | None = None, hwa_lr: float = 0.01,
                   hwa: ann.HWAConfig | None = None, distill: bool = False,
                   calibration_batches: int = 10, workload_kwargs: dict | None = None,
                   progress: bool = True, on_epoch_end: Callable | None = None,
                   digital_layers=None) -> PreparedModels:
    """Train (or load) the FP model, map it directly, fine-tune it HWA; no evaluation.

    Parameters are those of :func:`run_study`; the checkpoints live in ``out_dir/checkpoints``
    under a name that carries a digest of the settings, so another recipe never resumes from
    them.
    """
    check_recipe(workload, device, cfg, out_dir, seed, quick, hwa_epochs, hwa_lr, hwa, distill,
                 calibration_batches, workload_kwargs, digital_layers, progress, on_epoch_end)
    t0 = time.perf_counter()
    if isinstance(workload, Workload):
        wl_name, wl_kwargs = workload.name, {"quick": workload.quick}
        wl_kwargs.update({k: getattr(workload, k) for k in workload.__dataclass_fields__
                          if not k.startswith("_") and k != "quick"})
    else:
        wl_name, wl_kwargs = str(workload), {"quick": bool(quick), **(workload_kwargs or {})}
    wl = get_workload(wl_name, **wl_kwargs)
    cfg = cfg if cfg is not None else CrossbarConfig()
    dev, dev_prov = resolve_device(device)
    hwa = hwa or hwa_recipe(wl.name)
    if hwa_epochs is None:
        hwa_epochs = 2 if wl.quick else HWA_EPOCHS.get(wl.name, 5)
    digital = tuple(wl.digital_layers if digital_layers is None else digital_layers)
    fp_settings = {"workload": wl_name, "workload_kwargs": wl_kwargs, "seed": int(seed),
                   "epochs": wl.epochs, "package_version": __version__}
    if wl.quick:  # the values the quick settings resolved to, not only the flag
        fp_settings["quick_settings"] = {k: getattr(wl, k)
                                         for k in sorted(QUICK.get(wl_name, {}))}
    hwa_settings = {**fp_settings, "cfg": cfg.to_dict(), "device": model_to_dict(dev),
                    "hwa": asdict(hwa), "hwa_epochs": int(hwa_epochs), "hwa_lr": float(hwa_lr),
                    "distill": bool(distill), "digital": list(digital),
                    "calibration_batches": int(calibration_batches)}
    ckdir = os.path.join(os.fspath(out_dir), "checkpoints")
    fp_ck = os.path.join(ckdir, f"{wl_name}-fp-{fingerprint(fp_settings)}.pt")
    hwa_ck = os.path.join(ckdir, f"{wl_name}-hwa-{fingerprint(hwa_settings)}.pt")
    timings = {}

    fp_model = _train_fp(wl, seed, fp_ck, fp_settings, progress, on_epoch_end)
    fp_error = float(wl.evaluate(fp_model))
    timings["fp_training_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    batches = _calibration_batches(wl, seed, calibration_batches)
    direct = ann.convert(fp_model, cfg, dev, digital=digital, rng=seed)
    ann.init_input_ranges(direct, batches, cap=hwa.input_range_cap)  # docs/model.md 9: alpha only
    direct.eval()
    analog = copy.deepcopy(direct)
    teacher = copy.deepcopy(fp_model).eval() if distill else None
    _train_hwa(wl, analog, teacher, hwa, int(hwa_epochs), float(hwa_lr), seed, hwa_ck,
               hwa_settings, progress, on_epoch_end)
    timings["hwa_training_s"] = time.perf_counter() - t1
    specs = {name: ModelSpec.from_model(wl_name, wl_kwargs, seed, cfg, dev, digital, m)
             for name, m in (("direct", direct), ("hwa", analog))}
    return PreparedModels(wl, fp_model, specs, fp_error, float(wl.chance_error), dev, dev_prov,
                          cfg, hwa_settings, timings)


def run_study(workload: str | Workload = "cnn", device=None, cfg: CrossbarConfig | None = None,
              repeats: int | None = None, times=ann.PAPER_TIMES, out_dir="study-out",
              seed: int = 0,
              quick: bool = False, hwa_epochs: int | None = None, hwa_lr: float = 0.01,
              hwa: ann.HWAConfig | None = None, distill: bool = False,
              calibration_batches: int = 10, workload_kwargs: dict | None = None,
              digital_layers=None, scheduler=None, progress: bool = True, on_epoch_end: Callable | None = None,
              plot: bool = True, verbose: bool = True, overwrite: bool = False,
              command: str | None = None) -> xr.Dataset:
    """Run the paper's study on one workload and return (and save) the results.

    Parameters
    ----------
    workload : {"cnn", "deepcnn", "lstm", "transformer"} or Workload
        The network and its data (:mod:`aimc_device.workloads`).
    device : PCMModel, EmpiricalModel, preset name, path of a device card (.h5) or None
        Device statistics (either family) for training noise and programming; default the
        "rasch2023" preset.
        A card's provenance is recorded in the result's attrs.
    cfg : CrossbarConfig, optional
        Crossbar periphery; default the paper's standard model.
    repeats : int, optional
        Programming + evaluation repeats with new device draws (default 25, as in [1]; 5 when
        ``quick``).
    times : sequence of float
        Times after programming [s]; default 1 s, 1 h, 1 day, 1 year.
    out_dir : str or os.PathLike
        Folder for checkpoints, ``<workload>-study.nc``, ``<workload>-study.png`` and
        ``<workload>-study.txt``.
    seed : int
        Seed of everything: model initialisation, FP and HWA training, calibration batches and
        each evaluation task (keyed by (seed, variant, repeat)).
    quick : bool
        The workload's quick demonstration settings (:data:`aimc_device.workloads.QUICK`,
        the ``--quick`` option of the command line).
    hwa_epochs : int, optional
        HWA fine-tuning epochs; default :data:`HWA_EPOCHS` (2 when quick).
    hwa_lr : float
        Peak learning rate of HWA fine-tuning (SGD, momentum 0.9, cosine schedule).
    hwa : aimc_device.nn.HWAConfig, optional
        Noise scale and ramp, clipping, input ranges, output scales, BatchNorm, distillation
        settings; default :func:`hwa_recipe` of the workload.
    distill : bool
        Distil from the FP model during HWA training (docs/model.md section 8).
    calibration_batches : int
        Training batches used to calibrate the input ranges (both variants).
    workload_kwargs : dict, optional
        Overrides of the workload's fields (``epochs``, sizes, ...).
    digital_layers : sequence of str, optional
        Layers kept in floating point; default the workload's ``digital_layers`` (usually the
        first and the last); ``()`` puts every layer on analog tiles.
    scheduler : None, str or distributed.Client
        Where the evaluation tasks run: None, a LocalCluster of 2 processes (``quick``: in
        this process, as "synchronous"); "synchronous"
        (in this process, one task after the other); an address "tcp://host:8786" of an
        existing Dask cluster; or a Client.
    progress : bool
        Progress bars.
    on_epoch_end : callable(phase, epoch), optional
        Called after each checkpoint (phase "fp" or "hwa"); raising stops the run, which
        resumes from that checkpoint when called again.
    plot : bool
        Write the PNG plot.
    verbose : bool
        Print the table.
    overwrite : bool
        Replace existing ``<workload>-study.*`` files even when they hold another kind of file
        (a measurement campaign, a device card); by default such files are refused, before
        anything is trained. Results of an earlier study are replaced either way.
    command : str, optional
        The command that ran this study, kept in the result's ``command`` attribute and shown
        on its figure with :func:`~aimc_device.study.report.hardware_description` (default:
        the Python call).

    Returns
    -------
    xarray.Dataset
        ``error(variant, time, repeat)`` (fraction), ``error_mean``, ``error_sem``,
        ``normalized_accuracy(variant, time, repeat)`` and its ``_mean``/``_sem``; scalars
        ``fp_error`` and ``chance_error``; attrs with every setting, the crossbar config, the
        device model and its provenance.

    References
    ----------
    .. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Table 3 and Methods.
    """
    is_quick = bool(quick or getattr(workload, "quick", False))
    if repeats is None:
        repeats = 5 if is_quick else 25
    check_int(repeats, "repeats", lo=1)
    if scheduler is None and is_quick:
        scheduler = "synchronous"
    times = check_times(times)
    check_bool(plot, "plot")
    check_bool(verbose, "verbose")
    check_recipe(workload, device, cfg, out_dir, seed, quick, hwa_epochs, hwa_lr, hwa, distill,
                 calibration_batches, workload_kwargs, digital_layers, progress, on_epoch_end)
    stem = os.path.join(os.fspath(out_dir), f"{workload_name(workload)}-study")
    check_outputs(stem, plot, inputs=device_inputs(device), overwrite=overwrite)
    prep = prepare_models(workload, device, cfg, out_dir, seed, quick, hwa_epochs, hwa_lr, hwa,
                          distill, calibration_batches, workload_kwargs, progress, on_epoch_end,
                          digital_layers)
    t0 = time.perf_counter()
    specs = [prep.specs["direct"], prep.specs["hwa"]]
    calls = [(vi, (int(seed), vi + 1, r), times) for vi in range(2) for r in range(repeats)]
    results = _dask.compute(evaluate_task, specs, calls, scheduler=scheduler,
                            progress=progress, desc=f"{prep.workload.name} evaluation")
    prep.timings["evaluation_s"] = time.perf_counter() - t0
    err = np.empty((len(VARIANTS), len(times), repeats))
    err[0] = prep.fp_error
    for (vi, (_, _, r), _), res in zip(calls, results):
        err[vi + 1, :, r] = res
    ds = _to_dataset(err, times, prep, repeats, seed, scheduler)
    ds.attrs["command"] = command or (f"aimc_device.study.run_study({prep.workload.name!r}, "
                                      f"seed={seed}, quick={is_quick}, distill={distill})")
    ds.attrs["hardware"] = hardware_description()
    write_outputs(ds, stem, format_table, plot_study if plot else None, verbose,
                  inputs=device_inputs(device), overwrite=overwrite)
    return ds


def _to_dataset(err, times, prep: PreparedModels, repeats, seed, scheduler) -> xr.Dataset:
    fp, chance = prep.fp_error, prep.chance_error
    a = ann.normalized_accuracy(err, fp, chance)
    sem = ann.standard_error
    labels = [TIME_LABELS.get(t, f"{t:g} s") for t in times]
    dims = ("variant", "time", "repeat")
    ds = xr.Dataset(
        {"error": (dims, err, {"units": "1", "long_name": "test error (fraction)"}),
         "error_mean": (dims[:2], err.mean(axis=-1)),
         "error_sem": (dims[:2], sem(err), {"long_name": "standard error of the mean"}),
         "normalized_accuracy": (dims, a, {"long_name": "A* = 1 - (err - err_FP) / "
                                                        "(err_chance - err_FP)"}),
         "normalized_accuracy_mean": (dims[:2], a.mean(axis=-1)),
         "normalized_accuracy_sem": (dims[:2], sem(a)),
         "fp_error": ((), fp), "chance_error": ((), chance)},
        coords={"variant": list(VARIANTS),
                "time": ("time", np.asarray(times), {"units": "s",
                                                     "long_name": "time after programming"}),
                "time_label": ("time", labels), "repeat": np.arange(repeats)},
        attrs={"title": f"aimc-device study: {prep.workload.name}",
               "workload": prep.workload.name, "repeats": int(repeats), "seed": int(seed),
               "seed_scheme": "task (variant v, repeat r) draws from "
                              "numpy.random.SeedSequence([seed, v, r]), v: 1 direct, 2 hwa",
               "settings": json.dumps(prep.settings, sort_keys=True, default=str),
               "crossbar_config": json.dumps(prep.cfg.to_dict(), default=str),
               "device_model": json.dumps(model_to_dict(prep.device), default=str),
               "device_provenance": json.dumps(prep.device_provenance, default=str),
               "fp_error": fp, "chance_error": chance,
               "timings": json.dumps(prep.timings),
               "scheduler": _dask.scheduler_label(scheduler),
               "package_version": __version__, "torch_version": str(torch.__version__),
               "references": "M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Table 3"})
    return ds
