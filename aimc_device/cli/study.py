"""``aimc-device study``, ``aimc-device sensitivity`` and ``aimc-device demo``."""
from __future__ import annotations

import argparse

from ._types import FRACTION, LEVELS, POSITIVE_INT, SEED, WORKLOAD_NAMES, add_device_option

_FORCE_HELP = ("replace result files in --out even when they hold another kind of file (a "
               "measurement campaign, a device card, ...); an input is never replaced")

def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--workload", choices=WORKLOAD_NAMES,
                   default="cnn")
    add_device_option(p, None, aliases=("--device-model",))
    p.add_argument("--out", default=out_default, metavar="DIR",
                   help=f"folder for checkpoints, results (.nc), table and plot; default "
                        f"{out_default}")
    p.add_argument("--quick", action="store_true", help="reduced settings (seconds)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of everything (default 0)")
    p.add_argument("--hwa-epochs", type=POSITIVE_INT, default=None,
                   help="HWA fine-tuning epochs (>= 1)")
    p.add_argument("--distill", action="store_true", help="distil from the FP model in HWA")
    p.add_argument("--all-analog", action="store_true",
                   help="put every layer on analog tiles (default: the workload's first and last "
                        "layers stay digital)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="Dask scheduler address of an existing cluster, or 'synchronous'; "
                        "default a local cluster of 2 worker processes ('study --quick': "
                        "synchronous)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)


def register(subparsers) -> None:
    """Add ``study``, ``sensitivity`` and ``demo`` to the ``aimc-device`` parser."""
    p = subparsers.add_parser(
        "study", help="train FP, map directly and HWA-train, evaluate over time (Table 3)",
        description="The paper's study on one workload: FP training, direct mapping and HWA "
                    "fine-tuning, evaluation at 1 s, 1 h, 1 day, 1 year with repeats; writes "
                    "<workload>-study.nc/.txt/.png to --out and resumes from checkpoints there.")
    _common(p, "study-out")
    p.add_argument("--repeats", type=POSITIVE_INT, default=None,
                   help="evaluation repeats (default 25, 5 with --quick)")
    p.set_defaults(func=_study)

    p = subparsers.add_parser(
        "sensitivity", help="one nonideality at a time up to eps_M = 20 %% (Fig. 4)",
        description="Scale each nonideality alone until the MVM error reaches --max-mvm-error "
                    "and measure the loss of A*(1 h) of the HWA-trained model.")
    _common(p, "study-out")
    p.add_argument("--repeats", type=POSITIVE_INT, default=10,
                   help="repeats per setting (default 10)")
    p.add_argument("--levels", type=LEVELS, default=5,
                   help="MVM-error levels, the standard model included (>= 2, default 5)")
    p.add_argument("--max-mvm-error", type=FRACTION, default=0.20,
                   help="top of the sweep, a fraction in (0, 1] (default 0.20 = 20 %%)")
    p.add_argument("--nonidealities", default=None,
                   help="comma-separated subset, e.g. 'ADC,output noise'; default all")
    p.set_defaults(func=_sensitivity)

    p = subparsers.add_parser(
        "demo", help="campaign -> fit -> device card -> study of the CNN (the main demo)",
        description="Simulate a measurement campaign (the reference PCM campaign by default), "
                    "fit it choosing the device-model family, save the device card and run the "
                    "study on the CNN with it; prints the table and writes the plot.")
    p.add_argument("--out", default="demo-out", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="small and fast (under a minute)")
    p.add_argument("--technology", choices=("pcm", "rram"), default="pcm",
                   help="pcm (default): a campaign simulated from --device; rram: the synthetic "
                        "RRAM-like campaign (one read per time, a bake, dead cells, missing "
                        "reads)")
    add_device_option(p, None, what="device model the pcm campaign is simulated from")
    p.add_argument("--family", choices=("auto", "pcm", "empirical"), default="auto",
                   help="device-model family of the fit (default auto: chosen by the hold-out "
                        "test, see aimc-device fit --help)")
    p.add_argument("--campaign", default=None, metavar="FILE.h5",
                   help="fit this campaign instead of simulating one")
    p.add_argument("--repeats", type=POSITIVE_INT, default=None)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--scheduler", default=None, metavar="ADDR")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(func=_demo)


def _device(arg):
    return arg if arg is not None else "rasch2023"


def _demo_device(args: argparse.Namespace):
    from . import UserError

    given = [f for f, v in (("--device", args.device), ("--technology rram",
                                                         args.technology == "rram"),
                            ("--campaign", args.campaign)) if v]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give one source of the campaign")
    return args.device


def _study(args: argparse.Namespace) -> int:
    from ..study import run_study

    run_study(args.workload, device=_device(args.device), repeats=args.repeats,
              out_dir=args.out, seed=args.seed, quick=args.quick, hwa_epochs=args.hwa_epochs,
              distill=args.distill, scheduler=args.scheduler, progress=not args.no_progress,
              digital_layers=() if args.all_analog else None, overwrite=args.force,
              command=args.command_line)
    print(f"wrote {args.out}/{args.workload}-study.nc, .txt and .png")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from ..study import run_sensitivity

    names = ([n.strip() for n in args.nonidealities.split(",") if n.strip()]
             if args.nonidealities else None)
    run_sensitivity(args.workload, device=_device(args.device), nonidealities=names,
                    max_mvm_error=args.max_mvm_error, n_levels=args.levels,
                    repeats=args.repeats, out_dir=args.out, seed=args.seed, quick=args.quick,
                    hwa_epochs=args.hwa_epochs, distill=args.distill, scheduler=args.scheduler,
                    progress=not args.no_progress,
                    digital_layers=() if args.all_analog else None, overwrite=args.force,
                    command=args.command_line)
    print(f"wrote {args.out}/{args.workload}-sensitivity.nc, .txt and .png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..study import run_demo

    device = _demo_device(args)
    run_demo(args.out, quick=args.quick, campaign=args.campaign, seed=args.seed,
             repeats=args.repeats, scheduler=args.scheduler, progress=not args.no_progress,
             overwrite=args.force, technology=args.technology, device=device,
             family=args.family, command=args.command_line)
    print(f"wrote {args.out}/cnn-study.nc, .txt and .png")
    return 0
