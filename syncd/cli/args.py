"""Argument types, the options every command takes, and loading the configuration and the mirror."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

from syncd import logs
from syncd.cli.signals import interrupts_deferred
from syncd.config import Config, LogFormat, LogLevel, load_config, parse_duration
from syncd.store import Store

DEFAULT_CONFIG = "/etc/syncd/config.toml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_READER_GONE = 128 + signal.SIGPIPE  # as a tool killed by SIGPIPE would exit

Commands = Any  # argparse's _SubParsersAction: the object each command module adds its subcommands to


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; the examples as written, one per line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(
    commands: Commands, name: str, summary: str, description: str, *examples: str
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in the list of commands, and in its own ``--help`` a paragraph
    saying what it does and when to use it, then examples."""
    return commands.add_parser(  # type: ignore[no-any-return]
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=_HelpFormatter,
    )


# Options a command takes before or after its name, at any depth (`syncd --config C edits cancel 1`,
# `syncd edits --config C cancel 1`, `syncd edits cancel 1 --config C`). Their default is SUPPRESS
# everywhere: a parser below leaves a value given further up alone instead of resetting it.
def config_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` (a command that reads the configuration file)."""
    if "--config" in parser._option_string_actions:
        return
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"configuration file (default: $SYNCD_CONFIG or {DEFAULT_CONFIG})",
    )
    parser.set_defaults(reads_config=True)


def logging_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` and ``--log-format`` (every command; they override the file's [logging])."""
    if "--log-level" in parser._option_string_actions:
        return
    parser.add_argument(
        "--log-level",
        choices=get_args(LogLevel),
        default=argparse.SUPPRESS,
        help="log this much and more (overrides logging.level)",
    )
    parser.add_argument(
        "--log-format",
        choices=get_args(LogFormat),
        default=argparse.SUPPRESS,
        help="log lines readable (console), as JSON, or auto: readable on a terminal (overrides logging.format)",
    )


def config_path(args: argparse.Namespace) -> Path:
    """The configuration file a command reads: --config, else $SYNCD_CONFIG, else the default."""
    return Path(getattr(args, "config", None) or os.environ.get("SYNCD_CONFIG") or DEFAULT_CONFIG)


def load(args: argparse.Namespace, with_key: bool = True) -> Config:
    """The configuration, with the command line's logging options in force, and logging set up by it;
    ``with_key=False`` for commands that never call the API (they need no key)."""
    config = with_logging_options(load_config(config_path(args), with_key=with_key), args)
    logs.configure(config.logging.format, config.logging.level)
    return config


def logging_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [logging] settings the command line overrides."""
    given = {"format": getattr(args, "log_format", None), "level": getattr(args, "log_level", None)}
    return {name: value for name, value in given.items() if value is not None}


def with_logging_options(config: Config, args: argparse.Namespace) -> Config:
    """``config`` with ``--log-level`` / ``--log-format`` in place of the file's values."""
    return config.with_logging(logging_overrides(args))


def configure_logging(args: argparse.Namespace, fmt: LogFormat = "auto", level: LogLevel = "info") -> None:
    """Logging of a command that reads no configuration file: its defaults, or the command line's."""
    overrides = logging_overrides(args)
    logs.configure(overrides.get("format", fmt), overrides.get("level", level))


def org_ids(config: Config) -> frozenset[str]:
    """The configured org ids."""
    return frozenset(org.id for org in config.orgs)


@contextmanager
def prepared_store(
    config: Config, read_only: bool = False, prepare: bool = True, create: bool = False
) -> Iterator[Store]:
    """The mirror, its schema current (or upgraded, as ``database.auto_upgrade`` says; never when
    ``read_only``; left as it is when not ``prepare``: ``syncd db``), closed after.

    Only a command given ``create`` (run-once, run, db upgrade, demo) makes a mirror where there is
    none; the others refuse, naming the command that makes one. A command that writes is first told
    what keeps it from writing there, as ``syncd check-config`` says it.
    """
    connect = not read_only and Store.check_location(config.database.url)
    store = Store(config.database.url, read_only=read_only, create=create)
    try:
        if connect:  # on the store's own engine: one connection, not a second engine's too
            store.check_connection()
        if prepare:
            store.prepare(config.database.auto_upgrade and not read_only)
        yield store
    finally:
        with interrupts_deferred():  # a Ctrl-C in the middle would leave connections half closed
            store.close()


def _ranged(kind: Callable[[str], Any], low: float, high: float | None, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low or (high is not None and not value <= high):  # NaN is neither
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


port = _ranged(int, 0, 65535, "a port number (0-65535)")
count = _ranged(int, 1, None, "a whole number of at least 1")
fraction = _ranged(float, 0.0, 1.0, "a fraction between 0 and 1")
seconds = _ranged(float, 0.0, None, "a number of seconds (0 or more)")
latency = _ranged(float, 0.0, 30_000.0, "a latency in milliseconds (0-30000)")


def duration(text: str) -> float:
    """A duration argument: ``90``, ``90s``, ``15m``, ``1h30m``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def edit_id(text: str) -> int:
    """An edit id argument."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an edit id (a number)")
    return int(text)
