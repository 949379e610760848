"""Argument types, the --config option, and loading the configuration and the mirror for a command."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from syncd.config import Config, load_config, parse_duration
from syncd.store import Store

DEFAULT_CONFIG = "/etc/syncd/config.toml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT

Commands = Any  # argparse's _SubParsersAction: the object each command module adds its subcommands to


def config_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH``."""
    parser.add_argument(
        "--config", metavar="PATH", help=f"configuration file (default: $SYNCD_CONFIG or {DEFAULT_CONFIG})"
    )


def config_path(args: argparse.Namespace) -> Path:
    """The configuration file a command reads: --config, else $SYNCD_CONFIG, else the default."""
    return Path(args.config or os.environ.get("SYNCD_CONFIG") or DEFAULT_CONFIG)


def load(args: argparse.Namespace, with_key: bool = True) -> Config:
    """The configuration; ``with_key=False`` for commands that never call the API (they need no key)."""
    return load_config(config_path(args), with_key=with_key)


def org_ids(config: Config) -> frozenset[str]:
    """The configured org ids."""
    return frozenset(org.id for org in config.orgs)


@contextmanager
def prepared_store(config: Config, read_only: bool = False, prepare: bool = True) -> Iterator[Store]:
    """The mirror, its schema current (or upgraded, as ``database.auto_upgrade`` says; never when
    ``read_only``; left as it is when not ``prepare``: ``syncd db``), closed after."""
    store = Store(config.database.url, read_only=read_only)
    try:
        if prepare:
            store.prepare(config.database.auto_upgrade and not read_only)
        yield store
    finally:
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
