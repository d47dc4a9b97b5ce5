"""Argument types of the ``aimc-device`` options: each parses and range-checks one value; and
the ``--device`` option every command that uses a device model shares.

A bad value ends the command with one line naming the option and what it accepts, and exit
status 2 (argparse's handling of :class:`argparse.ArgumentTypeError`).
"""
from __future__ import annotations

import argparse
import math

from .._checks import check_float, check_int, float_range_text, int_range_text

#: The ``--workload`` choices: the names of :data:`aimc_device.workloads.WORKLOADS` (written
#: out so that ``--help`` does not import torch; a test keeps the two equal).
WORKLOAD_NAMES = ("cnn", "deepcnn", "lstm", "transformer")

__all__ = ["WORKLOAD_NAMES", "int_type", "float_type", "POSITIVE_INT", "NON_NEGATIVE_INT", "SEED", "LEVELS",
           "POSITIVE_FLOAT", "NON_NEGATIVE_FLOAT", "FRACTION", "read_times",
           "add_device_option"]


def int_type(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (either bound optional)."""
    what = int_range_text(lo, hi)

    def parse(text: str) -> int:
        try:
            return check_int(int(text), "value", lo, hi)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what
    return parse


def float_type(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False):
    """An argparse type: a finite number within the bounds (open or closed)."""
    what = float_range_text(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            return check_float(float(text), "value", lo, hi, lo_open=lo_open, hi_open=hi_open)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = what
    return parse


POSITIVE_INT = int_type(1)
NON_NEGATIVE_INT = int_type(0)
#: Seeds: what numpy's SeedSequence accepts as one entropy word and a tensor index can hold.
SEED = int_type(0, 2**63 - 1)
#: Levels of a sensitivity sweep: the standard model and at least one more.
LEVELS = int_type(2)
POSITIVE_FLOAT = float_type(0.0, lo_open=True)
NON_NEGATIVE_FLOAT = float_type(0.0)
#: A fraction in (0, 1], e.g. an MVM error of 0.2 (20 %).
FRACTION = float_type(0.0, 1.0, lo_open=True)


def read_times(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated read times [s], finite, >= 0, strictly increasing."""
    what = "comma-separated times [s], finite, >= 0 and strictly increasing, e.g. 1,10,100"
    try:
        times = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give {what}") from None
    if not times or any(not math.isfinite(t) or t < 0 for t in times) or any(
            b <= a for a, b in zip(times, times[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: give {what}")
    return times


read_times.__name__ = "read times"


def add_device_option(p: argparse.ArgumentParser, default: str | None, aliases=(),
                      what: str = "device model") -> None:
    """The ``--device PRESET|CARD.h5`` option (older spellings in ``aliases`` do the same)."""
    p.add_argument("--device", *aliases, dest="device", metavar="PRESET|CARD.h5",
                   default=default,
                   help=f"{what}: a PCM preset name or a device card of either family (from "
                        f"`aimc-device fit`); default {default or 'rasch2023'}"
                        + (f" ({', '.join(aliases)}: the same)" if aliases else ""))
