"""The ``aimc-device`` command.

Each group of subcommands lives in its own module and registers itself with ``add_parser``;
imports of the heavy layers happen inside the command functions so that ``--help`` is quick.
Errors a user can cause (a bad file, a bad setting) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each define ``register(subparsers)``.
_COMMAND_MODULES = ("device", "crossbar", "study")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="aimc-device",
        description="PCM device models, crossbar simulation and hardware-aware training "
                    "(Rasch et al., Nat. Commun. 14, 5282, 2023).")
    parser.add_argument("--version", action="version", version=f"aimc-device {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a command group not written yet
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError, KeyError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"aimc-device {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
