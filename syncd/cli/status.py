"""``syncd status``: per-org health of the mirror, usable as a monitoring check; ``syncd runs``: past passes."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from syncd import health
from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_command,
    config_option,
    count,
    duration,
    load,
    prepared_store,
)
from syncd.cli.output import iso, print_runs, print_status
from syncd.store.edits import EditQueue
from syncd.vocab import DeviceState


def add_commands(commands: Commands) -> None:
    """``status`` and ``runs``."""
    p = add_command(
        commands,
        "status",
        "per-org health of the mirror; exit 1 if an org has no recent success",
        "Per configured org: the last pass (start, duration, result), the age of the last success, devices by "
        "state and the last error; then the edit queue by status. Exit 0 when every org had a successful pass "
        "within --max-age, 1 otherwise, so it serves as a monitoring check. It only reads: SQLite is opened "
        "read-only and no API key is needed.",
        "syncd status --config /etc/syncd/config.toml",
        "syncd status --json --max-age 1h",
    )
    config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--max-age",
        type=duration,
        metavar="DURATION",
        help="oldest acceptable last success (default: twice the org's interval, at least 5m)",
    )
    p.set_defaults(handler=cmd_status)

    p = add_command(
        commands,
        "runs",
        "past passes from sync_runs, newest first",
        "The passes syncd made (the sync_runs table), newest first: when each started, who started it "
        "(run-once, the daemon), how it ended, how long it took, what it counted, and the error of each that "
        "failed. Use it to see when an org started failing and why, or how long passes take. It only reads.",
        "syncd runs --last 5",
        "syncd runs --org 01HORG00000000000000000000 --failed",
        "syncd runs --format json | jq '.[0].status'",
    )
    config_option(p)
    p.add_argument("--org", metavar="ORG", help="only this org's passes")
    p.add_argument("--last", type=count, default=20, metavar="N", help="the N newest passes (default 20)")
    p.add_argument("--failed", action="store_true", help="only passes that failed or were aborted")
    p.add_argument("--wide", action="store_true", help="every counter in the table")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    p.set_defaults(handler=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    """Past passes, newest first."""
    config = load(args, with_key=False)
    with prepared_store(config, read_only=True) as store:
        rows = store.runs(args.org, args.last, args.failed)
    if args.format == "json":
        shown = [{k: iso(v) if isinstance(v, datetime) else v for k, v in row.items()} for row in rows]
        print(json.dumps(shown, indent=2))
    elif rows:
        print_runs(rows, sys.stdout, wide=args.wide)
    else:
        print("no passes" + (f" of {args.org}" if args.org else "") + (" failed" if args.failed else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Report every configured org; exit 1 unless each had a successful pass within its max age.

    Reads only: the mirror is opened read-only, and no API key is needed.
    """
    config = load(args, with_key=False)
    with prepared_store(config, read_only=True) as store:
        overview = store.org_overview()
        edit_counts = EditQueue(store).counts()
    now = datetime.now(UTC)
    report = []
    for org in config.orgs:
        info = overview.get(org.id, {})
        max_age = args.max_age if args.max_age is not None else health.max_age(config.interval(org))
        report.append(_org_report(org.id, org.name, info, max_age, now))
    if args.json:
        print(json.dumps({"orgs": report, "edits": edit_counts, "ok": all(r["ok"] for r in report)}, indent=2))
    else:
        print_status(report, sys.stdout)
        queue = ", ".join(f"{n} {s}" for s, n in sorted(edit_counts.items())) or "empty"
        print(f"edit queue: {queue}")
    return EXIT_OK if all(r["ok"] for r in report) else EXIT_FAILED


def _org_report(org_id: str, name: str | None, info: dict[str, Any], max_age: float, now: datetime) -> dict[str, Any]:
    last_run = info.get("last_run") or {}
    success = info.get("last_success")
    age = (now - success).total_seconds() if success else None
    finished = last_run.get("finished_at")
    return {
        "org_id": org_id,
        "name": name,
        "ok": health.healthy(success, now, max_age),
        "last_pass_started_at": iso(last_run.get("started_at")),
        "last_pass_seconds": round((finished - last_run["started_at"]).total_seconds(), 1) if finished else None,
        "last_pass_status": last_run.get("status"),
        "last_success_at": iso(success),
        "last_success_age_seconds": round(age) if age is not None else None,
        "max_age_seconds": max_age,
        "devices": {s: info.get("devices", {}).get(s, 0) for s in DeviceState},
        "last_error": last_run.get("error"),
    }
