"""``aimc-device requirements``: the spec sheet of a workload on a device card."""
from __future__ import annotations

import argparse

from ._types import (FRACTION, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED,
                     WORKLOAD_NAMES, int_type, read_times)

_TIMES = "3600,86400,31536000"


def register(subparsers) -> None:
    """Add ``requirements`` to the ``aimc-device`` parser."""
    from ..study.requirements import KNOBS

    p = subparsers.add_parser(
        "requirements", help="how good must devices and periphery be to keep A* >= target",
        description="For each knob (device statistics as scale factors of the card, periphery "
                    "settings), the limit at which the HWA-trained network still meets the "
                    "target A* at each time for --coverage of programming repeats; prints "
                    "the spec sheet and writes <workload>-requirements.nc/.txt/.png to --out.")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="cnn")
    p.add_argument("--device", "--device-model", dest="device", metavar="CARD.h5",
                   default="rasch2023", help="device card (from `aimc-device fit`) or preset "
                                             "name; default rasch2023")
    p.add_argument("--target", type=FRACTION, default=0.99,
                   help="normalised accuracy A* to meet, in (0, 1] (default 0.99)")
    p.add_argument("--coverage", type=FRACTION, default=0.9,
                   help="fraction of programming repeats at or above the target (default 0.9)")
    p.add_argument("--times", type=read_times, default=read_times(_TIMES), metavar="T1,T2,...",
                   help=f"times after programming [s] (default {_TIMES}: 1 h, 1 d, 1 y)")
    p.add_argument("--knobs", default=None,
                   help=f"comma-separated subset of: {', '.join(KNOBS)}; default all")
    p.add_argument("--min-repeats", type=int_type(2), default=4,
                   help="programming repeats per value searched, at first (default 4)")
    p.add_argument("--max-repeats", type=int_type(2), default=16,
                   help="at most, where the decision is close (default 16)")
    p.add_argument("--rtol", type=POSITIVE_FLOAT, default=0.1,
                   help="relative precision of a limit (default 0.1)")
    p.add_argument("--retrain", action="store_true",
                   help="HWA-train again at every value searched (default: trained once)")
    p.add_argument("--calibration", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="plausible device models drawn from the card's fit covariance, to "
                        "split the spread of A* into calibration and programming (default 0)")
    p.add_argument("--out", default="requirements-out", metavar="DIR",
                   help="folder for checkpoints and results; default requirements-out")
    p.add_argument("--quick", action="store_true", help="the workload's reduced settings")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--hwa-epochs", type=POSITIVE_INT, default=None)
    p.add_argument("--distill", action="store_true",
                   help="distil from the FP model in HWA training (as `study --distill`)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="Dask scheduler address of an existing cluster, or 'synchronous'; "
                        "default a local cluster of 2 worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true",
                   help="replace result files in --out even when they hold another kind of "
                        "file; an input is never replaced")
    p.set_defaults(func=_requirements)


def _requirements(args: argparse.Namespace) -> int:
    from ..study import requirements
    from . import UserError

    knobs = ([k.strip() for k in args.knobs.split(",") if k.strip()] if args.knobs else None)
    if args.max_repeats < args.min_repeats:
        raise UserError(f"--max-repeats {args.max_repeats}: must be >= --min-repeats "
                        f"{args.min_repeats}")
    if args.coverage >= 1.0:
        raise UserError("--coverage 1: give a fraction below 1 (e.g. 0.9)")
    requirements(args.workload, device=args.device, target=args.target, times=args.times,
                 knobs=knobs, coverage=args.coverage, min_repeats=args.min_repeats,
                 max_repeats=args.max_repeats, rtol=args.rtol, retrain=args.retrain,
                 calibration_samples=args.calibration, out_dir=args.out, seed=args.seed,
                 quick=args.quick, hwa_epochs=args.hwa_epochs, scheduler=args.scheduler,
                 progress=not args.no_progress, overwrite=args.force,
                 command=args.command_line, distill=args.distill)
    print(f"wrote {args.out}/{args.workload}-requirements.nc, .txt and .png")
    return 0
