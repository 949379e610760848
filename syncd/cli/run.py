"""``syncd run-once`` and ``syncd run``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading

from syncd.api import OpenAppClient
from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    config_option,
    config_path,
    count,
    load,
    logging_overrides,
    prepared_store,
    seconds,
)
from syncd.cli.output import Progress, print_summary
from syncd.cli.signals import daemon_signals, stop_on_signals
from syncd.config import Config, OrgSettings
from syncd.passes import passes_at_once, run_once, select_orgs, tune_for_bulk_work
from syncd.store import Store
from syncd.sync import PassOutcome


def add_commands(commands: Commands) -> None:
    """``run-once`` and ``run``."""
    p = commands.add_parser("run-once", help="mirror every configured (or each named) org once, then exit")
    config_option(p)
    p.add_argument("--org", action="append", metavar="ORG", help="only this org (repeatable)")
    p.add_argument(
        "--allow-mass-purge",
        action="store_true",
        help="confirm purging more than sync.max_purge_fraction of an org's devices",
    )
    p.add_argument(
        "--max-pages",
        type=count,
        metavar="N",
        help="read at most N list pages per org in this pass, instead of the limit derived from the org's "
        "last successful pass (to confirm that an org really grew that much)",
    )
    p.add_argument(
        "--wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="if another syncd is syncing an org, wait up to this long for it (default: skip the org at once)",
    )
    p.set_defaults(handler=cmd_run_once)

    p = commands.add_parser("run", help="run as a daemon: every org on its schedule (systemd: Type=notify)")
    config_option(p)
    p.set_defaults(handler=cmd_run)


def cmd_run_once(args: argparse.Namespace) -> int:
    """One pass of every configured (or each named) org."""
    config = load(args)
    orgs = select_orgs(config, args.org)
    tune_for_bulk_work(passes_at_once(config, orgs))
    with (
        prepared_store(config, create=True) as store,
        stop_on_signals("finishing the current page, then stopping") as stop,
        OpenAppClient(config.api, stop=stop) as client,
    ):
        outcomes = run_passes(config, orgs, store, client, stop, args.allow_mass_purge, args.wait, args.max_pages)
    print_summary(outcomes, sys.stdout)
    return EXIT_OK if all(o.status in ("succeeded", "skipped") for o in outcomes) else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon, until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    from syncd.daemon import Daemon

    config = load(args)
    Store.check_access(config.database.url)  # what keeps it from writing there, as check-config says it
    tune_for_bulk_work(passes_at_once(config, config.orgs))
    daemon = Daemon(config, config_path(args), logging_overrides(args))
    with daemon_signals(daemon):
        return daemon.run()


def run_passes(
    config: Config,
    orgs: list[OrgSettings],
    store: Store,
    client: OpenAppClient,
    stop: threading.Event,
    allow_mass_purge: bool = False,
    lock_wait: float = 0.0,
    max_pages: int | None = None,
) -> list[PassOutcome]:
    """The passes of ``orgs``, with progress lines when stderr is a terminal."""
    progress = Progress(sys.stderr) if sys.stderr.isatty() else None
    with progress or contextlib.nullcontext():
        return run_once(
            config,
            orgs,
            store=store,
            client=client,
            allow_mass_purge=allow_mass_purge,
            max_pages=max_pages,
            lock_wait=lock_wait,
            stop=stop,
            on_progress=progress.update if progress else None,
            on_done=progress.done if progress else None,
        )
