"""``aimc-device campaign`` and ``aimc-device fit``: virtual campaigns and device-model fits."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ._types import POSITIVE_INT, SEED, add_device_option, read_times

_FORCE_HELP = ("replace OUTPUT even when it holds another kind of file (a measurement campaign, "
               "a device card, ...); an input is never replaced")


def register(subparsers) -> None:
    """Add the ``campaign`` and ``fit`` commands to the ``aimc-device`` parser."""
    p = subparsers.add_parser(
        "campaign", help="simulate a measurement campaign (HDF5) from a device model",
        description="Simulate a measurement campaign from a preset or a device card of either "
                    "family and write it in the HDF5 schema of docs/measurement-format.md.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="campaign file to write")
    add_device_option(p, "rasch2023", aliases=("--preset",))
    p.add_argument("--levels", type=POSITIVE_INT, default=20,
                   help="target levels over (0, g_max]")
    p.add_argument("--devices-per-level", type=POSITIVE_INT, default=2000)
    p.add_argument("--times", type=read_times, default=None,
                   help="comma-separated read times after programming [s]; default "
                        "1,10,100,1000,10000,86400")
    p.add_argument("--repeats", type=POSITIVE_INT, default=8, help="repeated reads per time")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (same seed, same file)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=_campaign)

    p = subparsers.add_parser(
        "fit", help="fit a device model to a measurement campaign, choosing the family",
        description="Fit both device-model families (the PCM model of the paper and the "
                    "empirical family of measured distributions) to an HDF5 campaign, test "
                    "each on held-out devices, and save the one the data support (or the one "
                    "--family names) as a device card with its provenance.")
    p.add_argument("campaign", metavar="CAMPAIGN.h5")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.h5", help="device card to write")
    p.add_argument("--family", choices=("auto", "pcm", "empirical"), default="auto",
                   help="auto (default): fit both, keep the PCM family unless the hold-out test "
                        "rejects it beyond chance and the empirical family does better; pcm or "
                        "empirical: fit and keep that family")
    p.add_argument("--plot", metavar="FIG.png",
                   help="also save a plot of measured against predicted distributions per level "
                        "and time (and the PCM fit's curves)")
    p.add_argument("--clip", choices=("fit", "fixed"), default="fit",
                   help="drift clip bounds of the PCM fit: fit the lower one (default) or keep "
                        "the prior's")
    p.add_argument("--prior", default="rasch2023",
                   help="preset or device card giving start values and conventions, and the "
                        "components the data do not identify (e.g. the read noise with one "
                        "read per time at two times; marked 'from prior' in the card)")
    p.add_argument("--exclude", metavar="SPEC", default=None,
                   help="devices to drop: comma-separated indices or ranges (0-9,17) and rules "
                        "dead, stuck, outside:LO:HI (e.g. outside:0.1uS:30uS); stated in the "
                        "card's provenance")
    p.add_argument("--activation-energy", type=float, metavar="EV", default=None,
                   help="activation energy of the temperature acceleration [eV]; default: "
                        "fitted when the campaign has bakes at two or more temperatures, else "
                        "the campaign's attribute activation_energy")
    p.add_argument("--reference-temperature", type=float, metavar="K", default=None,
                   help="reference temperature of the fitted model [K]; default the campaign's")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the hold-out test (its sample, split and draws)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=_fit)


def _plot_format(path: str) -> str:
    """The figure format of ``path``'s extension (png without one), checked before a fit."""
    from matplotlib.figure import Figure

    from . import UserError

    ext = os.path.splitext(path)[1][1:].lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if ext not in supported:
        raise UserError(f"--plot {path}: unknown figure format {ext!r}; use one of "
                        f"{', '.join(sorted(supported))}")
    return ext


def _campaign(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..io import (SIMULATED_CAMPAIGN, check_output, is_card_path, resolve_device_model,
                      write_measurements)
    from ..pcm import simulate_campaign
    from ..pcm.campaign import DEFAULT_READ_TIMES

    inputs = [args.device] if is_card_path(args.device) else []
    check_output(args.output, SIMULATED_CAMPAIGN, inputs=inputs, overwrite=args.force)
    model = resolve_device_model(args.device, what="--device")
    times = np.asarray(DEFAULT_READ_TIMES if args.times is None else args.times)
    with tqdm(total=2, desc="campaign", unit="step", disable=None) as bar:
        ds = simulate_campaign(model, args.levels, args.devices_per_level, times=times,
                               repeats=args.repeats, rng=args.seed,
                               name=f"aimc-device campaign --device {args.device} --seed "
                                    f"{args.seed}")
        bar.update()
        write_measurements(ds, args.output, overwrite=args.force)
        bar.update()
    print(f"wrote {args.output}: {ds.sizes['device']} devices x {ds.sizes['time']} times x "
          f"{ds.sizes['repeat']} repeats")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from ..fit import fit_device
    from ..io import (CARD_SCHEMA, KIND_FIGURE, atomic_output, check_output, is_card_path,
                      read_measurements, resolve_device_model, save_device_model)
    from ..pcm import PCMModel
    from . import UserError

    # Every output is checked before the fit: not an input, not a file of another kind (unless
    # --force), in a writable folder.
    inputs = [args.campaign] + ([args.prior] if is_card_path(args.prior) else [])
    check_output(args.output, CARD_SCHEMA, inputs=inputs, overwrite=args.force)
    if args.plot:
        fmt = _plot_format(args.plot)
        if os.path.realpath(args.plot) == os.path.realpath(args.output):
            raise UserError(f"--plot {args.plot}: the same file as --output; give two names")
        check_output(args.plot, KIND_FIGURE, inputs=inputs, overwrite=args.force)
    prior = resolve_device_model(args.prior, what="--prior")
    ds = read_measurements(args.campaign)
    model, report = fit_device(ds, family=args.family, prior=prior, clip=args.clip,
                               exclude=args.exclude, activation_energy=args.activation_energy,
                               reference_temperature=args.reference_temperature,
                               seed=args.seed, progress=not args.quiet)
    fig = (report.plot(reference=prior if isinstance(prior, PCMModel) else None)
           if args.plot else None)
    prov = dict(report.provenance)
    prov["source_file"] = os.path.abspath(args.campaign)
    command = [f"aimc-device fit {os.path.basename(args.campaign)} --family {args.family} "
               f"--clip {args.clip} --prior {args.prior} --seed {args.seed}"]
    for flag, value in (("--exclude", args.exclude), ("--activation-energy",
                                                       args.activation_energy),
                        ("--reference-temperature", args.reference_temperature)):
        if value is not None:
            command.append(f"{flag} {value}")
    prov["command"] = " ".join(command)
    if fig is not None:
        # Both files or neither: the plot is renamed into place only once the card is written.
        with atomic_output(args.plot, KIND_FIGURE, inputs=inputs,
                           overwrite=args.force) as tmp_plot:
            fig.savefig(tmp_plot, format=fmt, dpi=100)
            written = save_device_model(model, args.output, provenance=prov,
                                        uncertainty=report.parameter_covariance(),
                                        overwrite=args.force)
    else:
        written = save_device_model(model, args.output, provenance=prov,
                                    uncertainty=report.parameter_covariance(),
                                    overwrite=args.force)
    if not args.quiet:
        print(report.summary())
        print(f"wrote {args.output}: {report.family} family (campaign sha256 "
              f"{written['source_sha256'][:16]}...)")
    for line in _not_identified(report):
        print(f"aimc-device fit: note: {line}", file=sys.stderr)
    return 0


def _not_identified(report) -> list[str]:
    """What the chosen family took from the prior instead of the data."""
    rep = report.reports[report.family]
    if report.family == "pcm":
        return [f"{cf.name} {cf.source}" for cf in rep.components.values() if not cf.identified]
    return [] if rep.read_noise_identified else [f"read noise {rep.read_noise_source}"]
