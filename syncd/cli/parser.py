"""The argument parser: the top level here, each command's options in its own module."""

from __future__ import annotations

import argparse

from syncd import __version__
from syncd.cli import admin, edits, playground, report, run, status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="syncd", description="Keep a local SQL mirror of OpenApp devices.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND")
    for module in (run, status, edits, report, admin, playground):
        module.add_commands(commands)
    return parser
