"""Checks of settings where they enter the package: type and range, with the argument's name.

Each function returns the value in its plain Python type (``int``, ``float``, ``bool``) or raises
``TypeError`` (wrong type) or ``ValueError`` (out of range) with a message that names the argument
and says what is allowed. They are cheap (no scans of data) and shared by every layer.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_float", "check_bool", "check_instance", "check_choice",
           "check_reiterable", "int_range_text", "float_range_text"]


def int_range_text(lo: int | None = None, hi: int | None = None) -> str:
    """'an integer >= 1', 'an integer between 2 and 24', ... for messages."""
    if lo is not None and hi is not None:
        return f"an integer between {lo} and {hi}"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"


def float_range_text(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                     hi_open: bool = False) -> str:
    """'a finite number > 0', 'a number in (0, 1]', ... for messages."""
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (bounds optional); bools and non-integral floats refused.

    An integral float (3.0) is accepted; ``name`` is the argument's name in the message.
    """
    what = int_range_text(lo, hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} = {value!r}: give {what}, not a {type(value).__name__}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name} = {value!r}: give {what}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} = {v}: give {what}")
    return v


def check_float(value, name: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a float within the bounds (open or closed); NaN always refused, infinity
    unless ``allow_inf``."""
    what = float_range_text(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} = {value!r}: give {what}, not a {type(value).__name__}")
    v = float(value)
    bad = math.isnan(v) or (math.isinf(v) and not allow_inf)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        raise ValueError(f"{name} = {value!r}: give {what}")
    return v


def check_bool(value, name: str) -> bool:
    """``value`` as a bool: True/False (numpy bools included), nothing else."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} = {value!r}: give True or False, not a {type(value).__name__}")


def check_instance(value, name: str, types, what: str, allow_none: bool = False):
    """``value`` itself when it is an instance of ``types`` (or None when allowed); else a
    TypeError naming the argument, ``what`` it should be and what it is."""
    if (value is None and allow_none) or isinstance(value, types):
        return value
    extra = " or None" if allow_none else ""
    raise TypeError(f"{name}: expected {what}{extra}, got {type(value).__name__}")


def check_choice(value, name: str, choices) -> object:
    """``value`` when it is one of ``choices``; else a ValueError listing them."""
    try:
        ok = value in tuple(choices)
    except (TypeError, ValueError):  # an unhashable value, an array
        ok = False
    if not ok:
        raise ValueError(f"{name} = {value!r}: choose one of {list(choices)}")
    return value


def check_reiterable(data, name: str, why: str):
    """``data`` itself when it can be iterated more than once (a list, a DataLoader, ...).

    A one-shot iterator (a generator, ``iter(list)``, ``map(...)``) is refused with a TypeError:
    read a second time it yields nothing. ``why`` says who reads it more than once. The check
    is an isinstance test; nothing is iterated.
    """
    import collections.abc

    if data is None or isinstance(data, (str, bytes)) or not isinstance(
            data, collections.abc.Iterable):
        raise TypeError(f"{name}: expected an iterable of batches (a list or a DataLoader), got "
                        f"{type(data).__name__}")
    if isinstance(data, collections.abc.Iterator):
        raise TypeError(f"{name}: a one-shot iterator ({type(data).__name__}) can be read only "
                        f"once, but {why}; pass a list or a DataLoader")
    return data
