"""The ``syncd`` command line.

Exit codes: 0 success, 1 a pass or command failed, 2 bad configuration or usage, 130 a second Ctrl-C.

::

    __init__   main(): parse, run the command, map errors to exit codes and one-line messages
    parser     the argument parser; each command module adds its own subcommands
    args       argument types, --config, and loading the configuration
    run        run-once, run (the daemon)
    status     status
    edits      edit, restore, edits (retry, cancel), reconcile-once
    report     report as-of, report door-access (the past, from the mirror's history)
    admin      check-config, db upgrade / current
    playground simulate, demo
    output     tables and progress lines
    signals    SIGTERM / SIGINT for the commands that run passes or edits
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from syncd.cli.args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from syncd.cli.parser import build_parser
from syncd.errors import ConfigError, SyncdError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``syncd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"syncd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncdError as exc:
        print(f"syncd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # a second Ctrl-C: what was committed stays, the rest is redone next time
        print("syncd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
