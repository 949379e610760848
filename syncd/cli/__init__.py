"""The ``syncd`` command line.

Exit codes: 0 success, 1 a pass or command failed, 2 bad configuration or usage, 130 a second Ctrl-C,
141 the reader of the output went away (``syncd edits | head``).

::

    __init__   main(): parse, run the command, map errors to exit codes and one-line messages
    parser     the argument parser; each command module adds its own subcommands
    args       argument types, the options every command takes, loading the configuration and the mirror
    run        run-once, run (the daemon)
    status     status, runs
    edits      edit, restore, delete, door-restrictions, edits (retry, cancel, approve, reject), reconcile-once
    report     report as-of, report door-access (the past, from the mirror's history)
    admin      check-config (and its --online probe), db upgrade / current
    playground simulate, demo
    output     tables and progress lines
    signals    SIGTERM / SIGINT for the commands that run passes or edits
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

from syncd.cli.args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_READER_GONE, EXIT_USAGE
from syncd.cli.output import print_problems
from syncd.cli.parser import build_parser
from syncd.errors import ConfigError, SyncdError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``syncd`` command line: parse ``argv``, run the command, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if "config" in vars(args) and not getattr(args, "reads_config", None):
        parser.error(f"--config: `{args.command_name}` reads no configuration file")
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # here, not at exit: a reader that went away is then seen below
        return code
    except ConfigError as exc:
        print_problems(exc, sys.stderr)
        return EXIT_USAGE
    except SyncdError as exc:
        print(f"syncd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        _drop_output()
        return EXIT_READER_GONE
    except KeyboardInterrupt:  # a second Ctrl-C: what was committed stays, the rest is redone next time
        _interrupted()
        print("syncd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _drop_output() -> None:
    """The reader of stdout went away (``syncd edits | head``): what is left to print goes nowhere,
    so that neither this exit nor the interpreter's last flush reports a broken pipe (as the Python
    documentation recommends, see the ``signal`` module's notes on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _interrupted() -> None:
    """After a second Ctrl-C: a third does not interrupt the way out, and what the interrupt left
    half-closed (a database connection collected later) is not reported as a traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    default_hook = sys.unraisablehook

    def quiet(unraisable: sys.UnraisableHookArgs) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default_hook(unraisable)

    sys.unraisablehook = quiet
