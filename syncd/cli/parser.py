"""The argument parser: the top level here, each command's options in its own module."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from syncd import __version__
from syncd.cli import admin, edits, playground, report, run, status
from syncd.cli.args import config_option, logging_options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand.

    The options every command takes (``--log-level``, ``--log-format``, and ``--config`` for those
    that read the configuration) are accepted at any depth: before the command's name, between a
    group's name and its action, or after.
    """
    parser = argparse.ArgumentParser(prog="syncd", description="Keep a local SQL mirror of OpenApp devices.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND")
    for module in (run, status, edits, report, admin, playground):
        module.add_commands(commands)
    _spread_common_options(parser)
    for path, sub in command_parsers(parser):
        sub.set_defaults(command_name=" ".join(path))
    return parser


def subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parsers directly below ``parser``, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def command_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree below ``parser`` (groups and their actions alike), with its path of names."""
    for name, sub in subparsers(parser):
        yield (*path, name), sub
        yield from command_parsers(sub, (*path, name))


def _spread_common_options(parser: argparse.ArgumentParser) -> bool:
    """Give every parser the logging options, and ``--config`` to every parser above a command that
    reads it; whether one below ``parser`` (or itself) does."""
    logging_options(parser)
    own = parser.get_default("reads_config") is True
    below = [_spread_common_options(sub) for _, sub in subparsers(parser)]
    if any(below) and not own:
        config_option(parser)
        parser.set_defaults(reads_config=None)  # only a command itself reads the file, not the group above it
    return own or any(below)
