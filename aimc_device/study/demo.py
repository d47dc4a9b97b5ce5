"""The main demo: campaign -> fitted device model -> study of the CNN with that model.

1. simulate a measurement campaign: the reference PCM campaign from the "rasch2023" statistics
   (or from another device model, ``device=``), or the synthetic RRAM-like campaign
   (``technology="rram"``: one read per time, a bake, dead cells, missing reads); or use a
   campaign file given by the caller, such as a shipped calibration file;
2. fit it with :func:`aimc_device.fit.fit_device` (both device-model families, the one the
   hold-out test supports kept) and save the device card with its provenance;
3. run :func:`aimc_device.study.run_study` on the CNN with the fitted card;
4. print the table and write the plot.
"""
from __future__ import annotations

import os
import time

from .._checks import check_bool, check_instance, check_int
from ..fit import fit_device
from ..io import (CARD_SCHEMA, SIMULATED_CAMPAIGN, check_folder, check_output,
                  read_measurements, resolve_device_model, save_device_model,
                  write_measurements)
from ..pcm import simulate_campaign, simulate_rram_campaign
from .report import check_outputs
from .study import run_study

__all__ = ["run_demo", "TECHNOLOGIES"]

#: Campaigns the demo simulates.
TECHNOLOGIES = ("pcm", "rram")


def _simulate(technology: str, device, quick: bool, seed: int):
    """The demo's campaign: (Dataset, description)."""
    if technology == "rram":
        ds = simulate_rram_campaign(levels=16 if quick else 31,
                                    devices_per_level=200 if quick else 1000, rng=seed)
        # what the generator knows and a lab does not: the truth of each cell and its times
        ds = ds.drop_vars([v for v in ("dead", "equivalent_time") if v in ds])
        ds.attrs["source"] = f"aimc-device demo campaign (synthetic RRAM-like, seed {seed})"
        return ds, "the synthetic RRAM-like campaign"
    model = resolve_device_model(device, default="rasch2023")
    ds = simulate_campaign(model, levels=10 if quick else 20,
                           devices_per_level=200 if quick else 2000, repeats=4 if quick else 8,
                           rng=seed, name=f"aimc-device demo campaign ({model.name}, seed {seed})")
    return ds, f"the reference campaign ({model.name})"


def run_demo(out_dir="demo-out", quick: bool = False, campaign=None, seed: int = 0,
             repeats: int | None = None, scheduler=None, progress: bool = True,
             verbose: bool = True, overwrite: bool = False, technology: str = "pcm",
             device=None, family: str = "auto", command: str | None = None):
    """Run the demo end to end; returns the study Dataset.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Where the campaign, the device card, checkpoints, table and plot go.
    quick : bool
        A small campaign, the CNN's quick settings and 3 repeats (under a minute).
    campaign : str, optional
        An existing campaign file (HDF5) to fit instead of simulating one.
    seed : int
        Seed of the campaign simulation, the fit's hold-out test and the study.
    repeats : int, optional
        Evaluation repeats (default 25, quick 3).
    scheduler : as in :func:`run_study` (default: a LocalCluster; quick: synchronous)
    progress, verbose : bool
    overwrite : bool
        Replace files of another kind at the demo's output names (``campaign.h5``,
        ``device_model.h5``, ``cnn-study.*``); by default they are refused before anything runs.
    technology : {"pcm", "rram"}
        The simulated campaign: "pcm", simulated from ``device``; "rram", the synthetic
        RRAM-like campaign of :func:`aimc_device.pcm.simulate_rram_campaign` (16 levels x 200
        devices quick, 31 x 1000 otherwise).
    device : PCMModel, EmpiricalModel, preset name or device card path, optional
        The model the "pcm" campaign is simulated from; default the "rasch2023" preset.
    family : {"auto", "pcm", "empirical"}
        The family of the fit (:func:`aimc_device.fit.fit_device`).
    command : str, optional
        The command that ran the demo (kept in the study result and shown on its figure).

    Returns
    -------
    xarray.Dataset, the study result.
    """
    check_instance(out_dir, "out_dir", (str, os.PathLike), "a folder path (str or os.PathLike)")
    check_bool(quick, "quick")
    check_instance(campaign, "campaign", (str, os.PathLike), "the path of a campaign file",
                   allow_none=True)
    check_int(seed, "seed", lo=0)
    if repeats is not None:
        check_int(repeats, "repeats", lo=1)
    check_bool(progress, "progress")
    check_bool(verbose, "verbose")
    if technology not in TECHNOLOGIES:
        raise ValueError(f"technology = {technology!r}: choose one of {list(TECHNOLOGIES)}")
    if family not in ("auto", "pcm", "empirical"):
        raise ValueError(f"family = {family!r}: choose 'auto', 'pcm' or 'empirical'")
    if device is not None and technology != "pcm":
        raise ValueError(f"device: the {technology} campaign is simulated by its own generator; "
                         "give device= with technology='pcm'")
    resolve_device_model(device, default="rasch2023")  # a bad device fails before anything runs
    out_dir = os.fspath(out_dir)
    inputs = [os.fspath(campaign)] if campaign is not None else []
    if campaign is not None and not os.path.isfile(campaign):
        raise FileNotFoundError(f"{os.fspath(campaign)}: no such file")
    check_folder(out_dir, create=True)
    if os.path.isdir(out_dir):  # every output, before anything is simulated or fitted
        if campaign is None:
            check_output(os.path.join(out_dir, "campaign.h5"), SIMULATED_CAMPAIGN,
                         overwrite=overwrite)
        check_output(os.path.join(out_dir, "device_model.h5"), CARD_SCHEMA, inputs=inputs,
                     overwrite=overwrite)
        check_outputs(os.path.join(out_dir, "cnn-study"), inputs=inputs, overwrite=overwrite)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if campaign is None:
        campaign = os.path.join(out_dir, "campaign.h5")
        ds, what = _simulate(technology, device, quick, seed)
        write_measurements(ds, campaign, overwrite=overwrite)
        if verbose:
            print(f"simulated {what} -> {campaign}")
    model, report = fit_device(read_measurements(campaign), family=family, prior="rasch2023",
                               seed=seed, name="demo-fit")
    card = os.path.join(out_dir, "device_model.h5")
    prov = dict(report.provenance)
    prov["source_file"] = os.path.abspath(campaign)
    prov["command"] = command or (f"aimc_device.study.run_demo(quick={quick}, seed={seed}, "
                                  f"technology={technology!r}, family={family!r})")
    save_device_model(model, card, provenance=prov, uncertainty=report.parameter_covariance(),
                      overwrite=overwrite)
    if verbose:
        print(report.summary())
        print(f"fitted device model ({report.family} family) -> {card} "
              f"({time.perf_counter() - t0:.1f} s)")
    if scheduler is None and quick:
        scheduler = "synchronous"
    return run_study("cnn", device=card, repeats=repeats or (3 if quick else 25),
                     out_dir=out_dir, seed=seed, quick=quick, scheduler=scheduler,
                     progress=progress, verbose=verbose, overwrite=overwrite,
                     command=prov["command"])
