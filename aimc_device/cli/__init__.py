"""The ``aimc-device`` command.

Each group of subcommands lives in its own module and registers itself with ``add_parser``;
imports of the heavy layers happen inside the command functions so that ``--help`` is quick.
Errors a user can cause (a bad file, a bad option or setting) print one line and exit with
status 2. Ctrl-C (SIGINT) ends any command with one line ("aimc-device fit: interrupted") and
exit status 130, SIGTERM likewise with 143; files being written are removed, nothing is
half-written.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import threading

# Modules that each define ``register(subparsers)``.
_COMMAND_MODULES = ("device", "crossbar", "study", "requirements")


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that files being written are cleaned up."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
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


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run ``aimc-device`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0: done; 2: an error the user can fix (one line on stderr); 130: interrupted by Ctrl-C;
    143: terminated by SIGTERM.
    """
    name = "aimc-device"
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a bad option (its line is printed)
            return exc.code if isinstance(exc.code, int) else 2
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        name = f"aimc-device {args.command}"
        # The command line as typed, kept in results and shown on their figures.
        args.command_line = "aimc-device " + shlex.join(sys.argv[1:] if argv is None else argv)
        try:
            return int(args.func(args) or 0)
        except (UserError, FileNotFoundError, ValueError, KeyError, OSError,
                MemoryError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, MemoryError):
                msg = f"not enough memory for these settings ({msg})"
            print(f"{name}: error: {msg}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 143
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
