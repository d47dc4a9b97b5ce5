"""``aimc-device mvm-error``: the MVM error of Eq. 20 per nonideality, in total and over time.

References
----------
.. [1] M. J. Rasch et al., Nat. Commun. 14, 5282 (2023), Eq. 20.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ._types import NON_NEGATIVE_FLOAT, POSITIVE_INT, SEED


def _parse_value(text: str):
    """A --set value: JSON (numbers, true/false, null), Python's True/False/None, else the
    plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"none": None, "None": None, "True": True, "False": False}.get(text, text)


def _config(settings):
    from . import UserError
    from ..crossbar import CrossbarConfig

    names = {f.name for f in dataclasses.fields(CrossbarConfig)}
    changes = {}
    for item in settings or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write field=value, e.g. --set out_noise=0.08")
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in names:
            raise UserError(f"--set {key}: CrossbarConfig has no such field; fields: "
                            f"{', '.join(sorted(names))}")
        changes[key] = _parse_value(value.strip())
    return CrossbarConfig(**changes)


def cmd_mvm_error(args) -> int:
    from ..crossbar import EVALUATION_TIMES, mvm_error, mvm_error_breakdown

    cfg = _config(args.set)
    device = None if args.device in ("none", "None") else args.device
    if args.t is not None:
        eps = mvm_error(cfg, device=device, t=args.t, rng=args.seed, n_inputs=args.n_inputs)
        print(f"eps_M at t = {args.t:g} s: {100 * eps:.2f} %")
        return 0
    rows = mvm_error_breakdown(cfg, device=device, rng=args.seed, times=EVALUATION_TIMES,
                               n_inputs=args.n_inputs)
    print(f"MVM error eps_M (Eq. 20), 512 x 512, w ~ N(0, 0.246), x ~ U(-1, 1), "
          f"{args.n_inputs} inputs, seed {args.seed}, device {device}")
    print(f"{'nonideality':28s} {'eps_M [%]':>9s}")
    for name, eps in rows.items():
        print(f"{name:28s} {100 * eps:9.2f}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mvm-error", help="MVM error (Eq. 20) of the crossbar model per nonideality and over time",
        description="Relative MVM error eps_M of the paper's 512 x 512 test case: each "
                    "nonideality alone, the periphery, the total with PCM devices, and the total "
                    "at 1 s, 1 h, 1 day and 1 year after programming with drift compensation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--t", type=NON_NEGATIVE_FLOAT, default=None,
                   help="only the total error at this time after programming [s]")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="change a CrossbarConfig field (repeatable), e.g. --set out_bits=6")
    p.add_argument("--device", default="rasch2023",
                   help="PCM preset name, or 'none' for ideal devices")
    p.add_argument("--seed", type=SEED, default=0, help="seed of test case, devices and noise")
    p.add_argument("--n-inputs", type=POSITIVE_INT, default=1000, help="inputs of the test case")
    p.set_defaults(func=cmd_mvm_error)
