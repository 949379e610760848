"""``syncd run-once`` and ``syncd run``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time

from syncd.api import OpenAppClient
from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_command,
    config_option,
    config_path,
    count,
    load,
    logging_overrides,
    prepared_store,
    seconds,
)
from syncd.cli.output import PASSED, Progress, outcomes_json, print_summary, print_totals
from syncd.cli.signals import daemon_signals, stop_on_signals
from syncd.config import Config, OrgSettings
from syncd.passes import passes_at_once, run_once, select_orgs, tune_for_bulk_work
from syncd.store import Store
from syncd.sync import PassOutcome


def add_commands(commands: Commands) -> None:
    """``run-once`` and ``run``."""
    p = add_command(
        commands,
        "run-once",
        "mirror every configured (or each named) org once, then exit",
        "One pass of every configured org (or of each --org), sync.concurrency at a time: every device is "
        "read from OpenApp and the mirror is brought in line (created, updated, soft-deleted, restored, "
        "purged), migrating the database first. Ends with a table per org and a totals line; exit 0 when "
        "every org succeeded or was skipped (another syncd was syncing it), 1 otherwise. Ctrl-C finishes "
        "the current page and stops; a second Ctrl-C stops at once.",
        "syncd run-once --config /etc/syncd/config.toml",
        "syncd run-once --org 01HORG00000000000000000000 --wide",
        "syncd run-once --format json | jq '.totals'",
    )
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
    p.add_argument("--wide", action="store_true", help="every counter in the table (wider than 120 columns)")
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table (default) or json: each org's pass with every counter, and the totals, for scripts",
    )
    p.set_defaults(handler=cmd_run_once)

    p = add_command(
        commands,
        "run",
        "run as a daemon: every org on its schedule (systemd: Type=notify)",
        "The daemon: every org on its interval (sync.interval, jittered; on PostgreSQL shared by every daemon "
        "of the mirror), failing orgs backed off, queued edits pushed every writeback.interval, a Prometheus "
        "endpoint if metrics.listen is set. SIGHUP reloads the configuration; SIGTERM or Ctrl-C stop after "
        "the current page. Meant for systemd (deploy/syncd.service).",
        "syncd run --config /etc/syncd/config.toml",
        "syncd run --log-level debug --log-format console",
    )
    config_option(p)
    p.set_defaults(handler=cmd_run)


def cmd_run_once(args: argparse.Namespace) -> int:
    """One pass of every configured (or each named) org."""
    config = load(args)
    orgs = select_orgs(config, args.org)
    tune_for_bulk_work(passes_at_once(config, orgs))
    started = time.monotonic()
    with (
        prepared_store(config, create=True) as store,
        stop_on_signals("finishing the current page, then stopping") as stop,
        OpenAppClient(config.api, stop=stop) as client,
    ):
        outcomes = run_passes(config, orgs, store, client, stop, args.allow_mass_purge, args.wait, args.max_pages)
    seconds = time.monotonic() - started
    if args.format == "json":
        print(json.dumps(outcomes_json(outcomes, seconds), indent=2))
    else:
        print_summary(outcomes, sys.stdout, wide=args.wide)
        print_totals(outcomes, seconds, sys.stdout)
    return EXIT_OK if all(o.status in PASSED for o in outcomes) else EXIT_FAILED


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
