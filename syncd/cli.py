"""The ``syncd`` command line. Exit codes: 0 success, 1 a pass or command failed, 2 bad config or usage."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import structlog

from syncd import __version__, health, logs
from syncd.api import OpenAppClient
from syncd.config import ApiSettings, Config, DatabaseSettings, OrgSettings, Secret, load_config, parse_duration
from syncd.errors import ConfigError, SyncdError
from syncd.passes import instance_name, passes_at_once, run_once, select_orgs, tune_for_bulk_work, writeback_client
from syncd.reconcile import Reconciler, queue_edit, requester
from syncd.store import Store, redact_url
from syncd.store.edits import EditQueue
from syncd.store.schema import EDIT_STATUSES, RUN_COUNTERS
from syncd.sync import PassOutcome

DEFAULT_CONFIG = "/etc/syncd/config.toml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
log = structlog.get_logger("syncd")


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="syncd", description="Keep a local SQL mirror of OpenApp devices.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="PATH", help=f"configuration file (default: $SYNCD_CONFIG or {DEFAULT_CONFIG})"
        )

    p = sub.add_parser("run-once", help="mirror every configured (or each named) org once, then exit")
    config_option(p)
    p.add_argument("--org", action="append", metavar="ORG", help="only this org (repeatable)")
    p.add_argument(
        "--allow-mass-purge",
        action="store_true",
        help="confirm purging more than sync.max_purge_fraction of an org's devices",
    )
    p.add_argument(
        "--max-pages",
        type=_count,
        metavar="N",
        help="read at most N list pages per org in this pass, instead of the limit derived from the org's "
        "last successful pass (to confirm that an org really grew that much)",
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="if another syncd is syncing an org, wait up to this long for it (default: skip the org at once)",
    )
    p.set_defaults(handler=cmd_run_once)

    p = sub.add_parser("run", help="run as a daemon: every org on its schedule (systemd: Type=notify)")
    config_option(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("status", help="per-org health of the mirror; exit 1 if an org has no recent success")
    config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--max-age",
        type=_duration,
        metavar="DURATION",
        help="oldest acceptable last success (default: twice the org's interval, at least 5m)",
    )
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("edit", help="queue a change of a device, to be pushed to OpenApp")
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument(
        "--name",
        action="append",
        metavar="LOCALE=TEXT",
        help="set the name in one locale (repeatable); other locales are kept",
    )
    zone = p.add_mutually_exclusive_group()
    zone.add_argument("--zone-id", metavar="ZONE", help="move the device to this zone")
    zone.add_argument("--clear-zone", action="store_true", help="take the device out of its zone")
    p.add_argument("--external-id", metavar="ID", help="set the external id")
    p.add_argument("--metadata-json", metavar="JSON", help="replace device_metadata with this JSON")
    p.set_defaults(handler=cmd_edit)

    p = sub.add_parser("restore", help="queue the restore of a soft-deleted device")
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("edits", help="list queued edits; `edits retry ID`, `edits cancel ID`")
    config_option(p)
    p.add_argument("--status", choices=EDIT_STATUSES, help="only edits with this status")
    p.add_argument("--device", metavar="DEVICE_ID", help="only edits of this device")
    p.set_defaults(handler=cmd_edits)
    edits_sub = p.add_subparsers(metavar="ACTION")
    for name, helptext in (
        ("retry", "queue a failed, conflicting or cancelled edit again"),
        ("cancel", "drop a pending, failed or conflicting edit"),
    ):
        q = edits_sub.add_parser(name, help=helptext)
        config_option(q)
        q.add_argument("edit_id", type=_edit_id, metavar="ID")
        q.set_defaults(handler=cmd_edits_change, change=name)

    p = sub.add_parser("reconcile-once", help="push every due queued edit once, then exit")
    config_option(p)
    p.set_defaults(handler=cmd_reconcile_once)

    p = sub.add_parser("check-config", help="validate the configuration and report every problem")
    config_option(p)
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser("db", help="database maintenance")
    db_sub = p.add_subparsers(metavar="ACTION")
    q = db_sub.add_parser("upgrade", help="apply schema migrations")
    config_option(q)
    q.set_defaults(handler=cmd_db_upgrade)
    q = db_sub.add_parser("current", help="show the schema revision of the database")
    config_option(q)
    q.set_defaults(handler=cmd_db_current)
    p.set_defaults(handler=None)

    p = sub.add_parser("simulate", help="serve the built-in OpenApp simulator on loopback")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--orgs", type=_count, default=1, help="organisations to seed (default 1)")
    p.add_argument("--devices", type=_count, default=1000, help="devices per org (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the generated data (default 1)")
    p.add_argument("--deleted-fraction", type=_fraction, default=0.05, help="share seeded soft-deleted (0.05)")
    p.add_argument(
        "--api-key-env",
        default="SYNCD_API_KEY",
        metavar="NAME",
        help="environment variable holding the key to accept (default SYNCD_API_KEY)",
    )
    p.add_argument(
        "--name-style",
        choices=("value", "map", "string", "mixed"),
        default="value",
        help="how names are rendered: the spec's {value:{...}}, a plain map, a string, or mixed",
    )
    p.add_argument(
        "--timestamps",
        choices=("top", "metadata", "both"),
        default="both",
        help="where lifecycle timestamps appear (default both)",
    )
    p.add_argument("--error-rate", type=_fraction, default=0.0, help="fraction of requests answered 503")
    p.add_argument("--rate-limit-rate", type=_fraction, default=0.0, help="fraction of requests answered 429")
    p.add_argument("--retry-after", default="1", help="Retry-After sent with injected 429s (default 1)")
    p.add_argument("--reset-rate", type=_fraction, default=0.0, help="fraction of connections reset")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added latency per request in milliseconds")
    p.set_defaults(handler=cmd_simulate)

    p = sub.add_parser("demo", help="mirror the built-in simulator into a SQLite file and report (no setup needed)")
    p.add_argument("--db", default="syncd-demo.db", metavar="PATH", help="SQLite file (default syncd-demo.db)")
    p.add_argument("--orgs", type=_count, default=3, help="organisations (default 3)")
    p.add_argument("--devices", type=_count, default=2000, help="devices per org (default 2000)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.set_defaults(handler=cmd_demo)
    return parser


# -- commands ----------------------------------------------------------------------------------


def cmd_run_once(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.configure(config.logging.format, config.logging.level)
    orgs = select_orgs(config, args.org)
    tune_for_bulk_work(passes_at_once(config, orgs))
    store = Store(config.database.url)
    try:
        store.prepare(config.database.auto_upgrade)
        with (
            stop_on_signals("finishing the current page, then stopping") as stop,
            OpenAppClient(config.api, stop=stop) as client,
        ):
            outcomes = _run_passes(config, orgs, store, client, stop, args.allow_mass_purge, args.wait, args.max_pages)
    finally:
        store.close()
    print_summary(outcomes, sys.stdout)
    return EXIT_OK if all(o.status in ("succeeded", "skipped") for o in outcomes) else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from syncd.daemon import Daemon

    path = _config_path(args)
    config = load_config(path)
    logs.configure(config.logging.format, config.logging.level)
    tune_for_bulk_work(passes_at_once(config, config.orgs))
    daemon = Daemon(config, path)
    handlers = {
        signal.SIGTERM: lambda signum, frame: daemon.request_stop(),
        signal.SIGINT: lambda signum, frame: daemon.request_stop(),
        signal.SIGHUP: lambda signum, frame: daemon.request_reload(),
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return daemon.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    store = Store(config.database.url, read_only=True)
    try:
        store.prepare(auto_upgrade=False)
        overview = store.org_overview()
        edit_counts = EditQueue(store).counts()
    finally:
        store.close()
    now = datetime.now(UTC)
    report = []
    for org in config.orgs:
        info = overview.get(org.id, {})
        last_run = info.get("last_run") or {}
        success = info.get("last_success")
        max_age = args.max_age if args.max_age is not None else health.max_age(config.interval(org))
        age = (now - success).total_seconds() if success else None
        finished = last_run.get("finished_at")
        report.append(
            {
                "org_id": org.id,
                "name": org.name,
                "ok": age is not None and age <= max_age,
                "last_pass_started_at": _iso(last_run.get("started_at")),
                "last_pass_seconds": round((finished - last_run["started_at"]).total_seconds(), 1)
                if finished
                else None,
                "last_pass_status": last_run.get("status"),
                "last_success_at": _iso(success),
                "last_success_age_seconds": round(age) if age is not None else None,
                "max_age_seconds": max_age,
                "devices": {s: info.get("devices", {}).get(s, 0) for s in ("active", "deleted", "purged")},
                "last_error": last_run.get("error"),
            }
        )
    if args.json:
        print(json.dumps({"orgs": report, "edits": edit_counts, "ok": all(r["ok"] for r in report)}, indent=2))
    else:
        print_status(report, sys.stdout)
        queue = ", ".join(f"{n} {s}" for s, n in sorted(edit_counts.items())) or "empty"
        print(f"edit queue: {queue}")
    return EXIT_OK if all(r["ok"] for r in report) else EXIT_FAILED


def cmd_edit(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    payload: dict[str, Any] = {}
    with _prepared_store(config) as store:
        if args.name:
            current = (store.device(args.device_id) or {}).get("name") or {}
            payload["name"] = {**current, **dict(_locale_text(item) for item in args.name)}
        if args.zone_id is not None or args.clear_zone:
            payload["zone_id"] = None if args.clear_zone else args.zone_id
        if args.external_id is not None:
            payload["external_id"] = args.external_id
        if args.metadata_json is not None:
            try:
                payload["device_metadata"] = json.loads(args.metadata_json)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--metadata-json is not valid JSON: {exc}") from None
        if not payload:
            raise ConfigError(
                "nothing to change: give --name, --zone-id/--clear-zone, --external-id or --metadata-json"
            )
        edit_id = queue_edit(store, args.device_id, "update", payload, requester(), _org_ids(config))
    print(f"queued edit {edit_id}: update {args.device_id} {json.dumps(payload, ensure_ascii=False)}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    with _prepared_store(config) as store:
        edit_id = queue_edit(store, args.device_id, "restore", None, requester(), _org_ids(config))
    print(f"queued edit {edit_id}: restore {args.device_id}")
    return EXIT_OK


def cmd_edits(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    with _prepared_store(config) as store:
        rows = EditQueue(store).find(args.status, args.device)
    print_edits(rows, sys.stdout)
    return EXIT_OK


def cmd_edits_change(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    now = datetime.now(UTC)
    with _prepared_store(config) as store:
        queue = EditQueue(store)
        edit = queue.get(args.edit_id)
        if edit is None:
            raise ConfigError(f"there is no edit {args.edit_id}")
        if args.change == "retry":
            allowed = ("failed", "conflict", "cancelled")
            values = {
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": None,
                "last_error": None,
                "updated_at": now,
            }
        else:
            allowed = ("pending", "failed", "conflict")
            values = {"status": "cancelled", "updated_at": now}
        if not queue.transition(args.edit_id, allowed, values):
            raise ConfigError(
                f"edit {args.edit_id} is {edit['status']}; {args.change} works on {', '.join(allowed)} edits"
            )
    print(f"edit {args.edit_id}: {edit['status']} -> {values['status']}")
    return EXIT_OK


def cmd_reconcile_once(args: argparse.Namespace) -> int:
    config = _load(args)
    logs.configure(config.logging.format, config.logging.level)
    with (
        _prepared_store(config) as store,
        stop_on_signals("finishing the current edit, then stopping") as stop,
        writeback_client(config, stop) as client,
    ):
        reconciler = Reconciler(client, store, config.writeback, instance_name(), _org_ids(config), stop)
        results = reconciler.run_once()
        counts = EditQueue(store).counts()
    done = ", ".join(f"{n} {kind}" for kind, n in sorted(results.items())) or "nothing was due"
    print(f"reconcile: {done}; queue now: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"))
    if results["paused"]:
        print("reconcile: OpenApp rejected the API key; the edits not attempted stay pending", file=sys.stderr)
    return EXIT_FAILED if results["failed"] or results["conflict"] or results["paused"] else EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: OK")
    api = config.api
    print(f"  api       {api.base_url} (auth header: {api.auth_header}, page size {api.page_size})")
    print(f"  database  {redact_url(config.database.url)}")
    print(f"  orgs      {len(config.orgs)}: {', '.join(o.id for o in config.orgs)}")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    logs.configure(config.logging.format, config.logging.level)
    store = Store(config.database.url)
    try:
        before = store.schema_revision()
        store.upgrade()
        after = store.schema_revision()
    finally:
        store.close()
    print(f"schema: {before or 'empty'} -> {after}" if before != after else f"schema already at {after}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    config = _load(args, with_key=False)
    store = Store(config.database.url)
    try:
        print(store.schema_revision() or "empty (run `syncd db upgrade`)")
    finally:
        store.close()
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from syncd.simulator import Fault, Simulator, World
    from syncd.simulator.server import LOOPBACK

    key = os.environ.get(args.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"set the environment variable {args.api_key_env} to the API key the simulator accepts")
    if args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host}: the simulator binds loopback only (127.0.0.1, ::1, localhost)")
    world = World(seed=args.seed, name_style=args.name_style, timestamps=args.timestamps)
    org_ids = world.seed(args.orgs, args.devices, args.deleted_fraction)
    world.add_key(key)
    sim = Simulator(world, host=args.host, port=args.port, seed=args.seed)
    if args.latency_ms:
        sim.inject(Fault(kind="slow", delay=args.latency_ms / 1000, times=None))
    if args.error_rate:
        sim.inject(Fault(status=503, rate=args.error_rate, times=None))
    if args.rate_limit_rate:
        sim.inject(Fault(status=429, retry_after=args.retry_after, rate=args.rate_limit_rate, times=None))
    if args.reset_rate:
        sim.inject(Fault(kind="reset", rate=args.reset_rate, times=None))
    print(f"OpenApp simulator serving {sim.url}", flush=True)
    print(
        f"  {args.orgs} org(s) x {args.devices} devices: {', '.join(org_ids[:5])}"
        + (" ..." if len(org_ids) > 5 else ""),
        flush=True,
    )
    with stop_on_signals("stopping the simulator") as stop:

        def stop_when_signalled() -> None:
            stop.wait()
            sim.stop()

        threading.Thread(target=stop_when_signalled, daemon=True).start()
        sim.serve_forever()
    print(f"simulator stopped after {len(sim.log)} requests", flush=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from syncd.simulator import Simulator, World

    logs.configure("console" if sys.stderr.isatty() else "json", "warning")
    world = World(seed=args.seed, name_style="mixed")
    org_ids = world.seed(args.orgs, args.devices)
    key = secrets.token_urlsafe(24)
    world.add_key(key)
    db = Path(args.db).resolve()
    print(f"syncd demo: the built-in OpenApp simulator ({args.orgs} orgs x {args.devices} devices) -> {db}\n")
    with Simulator(world) as sim:
        config = Config(
            api=ApiSettings(base_url=sim.url, api_key=Secret(key)),
            database=DatabaseSettings(url=f"sqlite:///{db}"),
            orgs=tuple(OrgSettings(org_id) for org_id in org_ids),
        )
        store = Store(config.database.url)
        try:
            store.prepare(auto_upgrade=True)
            with (
                stop_on_signals("finishing the current page, then stopping") as stop,
                OpenAppClient(config.api, stop=stop) as client,
            ):
                print("Pass 1: full mirror")
                outcomes = _run_passes(config, list(config.orgs), store, client, stop)
                print_summary(outcomes, sys.stdout)
                if not stop.is_set():  # stopped during pass 1: no second pass
                    _demo_changes(world, org_ids[0])
                    print(
                        f"\nOpenApp changed meanwhile (org {org_ids[0]}): 3 renamed, 2 soft-deleted, 1 restored, "
                        "1 purged, 2 created.\nPass 2: only the changes are written"
                    )
                    outcomes += _run_passes(config, list(config.orgs), store, client, stop)
                    print_summary(outcomes[len(org_ids) :], sys.stdout)
            print("\nThe mirror now holds (devices by state):")
            print_state_counts(store.state_counts(), sys.stdout)
            print(f'\nQuery it yourself: sqlite3 {db} "SELECT change, count(*) FROM device_changes GROUP BY change"')
        finally:
            store.close()
    return EXIT_OK if all(o.status == "succeeded" for o in outcomes) else EXIT_FAILED


# -- helpers -----------------------------------------------------------------------------------


def _demo_changes(world: Any, org_id: str) -> None:
    ids = world.ids(org_id)
    for device_id in ids[10:13]:
        world.update_device(org_id, device_id, {"name": {"en": f"Renamed {device_id[-4:]}"}})
    for device_id in ids[20:22]:
        world.delete_device(org_id, device_id)
    deleted = next(d["id"] for d in world.ground_truth(org_id) if d.get("deleted_at") and d["id"] not in ids[20:22])
    world.restore_device(org_id, deleted)
    world.purge_device(org_id, ids[30])
    world.create_device(org_id)
    world.create_device(org_id)


def _run_passes(
    config: Config,
    orgs: list[OrgSettings],
    store: Store,
    client: OpenAppClient,
    stop: threading.Event,
    allow_mass_purge: bool = False,
    lock_wait: float = 0.0,
    max_pages: int | None = None,
) -> list[PassOutcome]:
    progress = Progress(sys.stderr) if sys.stderr.isatty() else None
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
    )


@contextmanager
def stop_on_signals(what: str) -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the yielded event; a second SIGINT interrupts at once.

    The previous handlers are restored on exit.
    """
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print(f"syncd: {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Progress:
    """Per-org progress lines on a terminal, at most one per org every two seconds."""

    def __init__(self, stream: TextIO, every: float = 2.0) -> None:
        self.stream = stream
        self.every = every
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, org_id: str, pages: int, devices: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(org_id, 0.0) < self.every:
                return
            self._last[org_id] = now
        print(f"  {org_id}: {pages} pages, {devices} devices", file=self.stream, flush=True)


SUMMARY_COLUMNS = tuple(c for c in RUN_COUNTERS if c != "requests")


def print_summary(outcomes: list[PassOutcome], out: TextIO) -> None:
    """The end-of-command table: one row per org, then any errors."""
    headers = ("org", "status", *(c.replace("devices_seen", "devices") for c in SUMMARY_COLUMNS), "seconds")
    rows = [(o.org_id, o.status, *(str(o.counts[c]) for c in SUMMARY_COLUMNS), f"{o.seconds:.1f}") for o in outcomes]
    _table(headers, rows, out)
    for o in outcomes:
        if o.error:
            print(f"{o.org_id}: {o.status}: {o.error}", file=out)


def print_status(report: list[dict[str, Any]], out: TextIO) -> None:
    """The human table of ``syncd status``."""
    rows = []
    for r in report:
        rows.append(
            (
                r["org_id"],
                "OK" if r["ok"] else "STALE",
                r["last_pass_started_at"] or "never",
                f"{r['last_pass_seconds']}" if r["last_pass_seconds"] is not None else "-",
                r["last_pass_status"] or "-",
                _age(r["last_success_age_seconds"]),
                *(str(r["devices"][s]) for s in ("active", "deleted", "purged")),
            )
        )
    _table(
        ("org", "health", "last pass", "seconds", "result", "last success", "active", "deleted", "purged"),
        rows,
        out,
        text_columns=5,
    )
    for r in report:
        if r["last_error"]:
            print(f"{r['org_id']}: last error: {r['last_error']}", file=out)


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def print_edits(rows: list[dict[str, Any]], out: TextIO) -> None:
    """The queue as a table, with what each edit sets and, on a conflict, what OpenApp has."""
    table = [
        (
            str(r["id"]),
            r["device_id"],
            r["action"],
            r["status"],
            str(r["attempts"]),
            _iso(r["next_attempt_at"]) or "-",
            str(r["last_status_code"] or "-"),
            _iso(r["created_at"]) or "-",
            r["requested_by"] or "-",
        )
        for r in rows
    ]
    _table(
        ("id", "device", "action", "status", "attempts", "next attempt", "last code", "created", "by"),
        table,
        out,
        text_columns=4,
    )
    for r in rows:
        if r["payload"]:
            print(f"  {r['id']}: queued  {json.dumps(r['payload'], ensure_ascii=False)}", file=out)
        if r["remote"]:
            print(f"  {r['id']}: remote  {json.dumps(r['remote'], ensure_ascii=False, default=str)}", file=out)
        if r["last_error"] and r["status"] != "succeeded":
            print(f"  {r['id']}: error   {r['last_error']}", file=out)


def print_state_counts(counts: dict[str, dict[str, int]], out: TextIO) -> None:
    """Devices by state per org."""
    rows = [
        (org, *(str(by_state.get(s, 0)) for s in ("active", "deleted", "purged")))
        for org, by_state in sorted(counts.items())
    ]
    _table(("org", "active", "deleted", "purged"), rows, out)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, text_columns: int = 2) -> None:
    """Left-aligned text columns first, then right-aligned numbers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line([h.upper() for h in headers]).rstrip(), file=out)
    for row in rows:
        print(line(row).rstrip(), file=out)


@contextmanager
def _prepared_store(config: Config) -> Iterator[Store]:
    store = Store(config.database.url)
    try:
        store.prepare(config.database.auto_upgrade)
        yield store
    finally:
        store.close()


def _locale_text(item: str) -> tuple[str, str]:
    locale, sep, text = item.partition("=")
    if not sep or not locale.strip() or not text:
        raise ConfigError(f"--name {item!r}: use LOCALE=TEXT, e.g. --name en='Front door'")
    return locale.strip(), text


def _edit_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an edit id (a number)")
    return int(text)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("SYNCD_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace, with_key: bool = True) -> Config:
    """The configuration; ``with_key=False`` for commands that never call the API (they need no key)."""
    return load_config(_config_path(args), with_key=with_key)


def _org_ids(config: Config) -> frozenset[str]:
    return frozenset(org.id for org in config.orgs)


def _positive(kind: Callable[[str], Any], low: float, high: float | None, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_port = _positive(int, 0, 65535, "a port number (0-65535)")
_count = _positive(int, 1, None, "a whole number of at least 1")
_fraction = _positive(float, 0.0, 1.0, "a fraction between 0 and 1")
_seconds = _positive(float, 0.0, None, "a number of seconds (0 or more)")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
