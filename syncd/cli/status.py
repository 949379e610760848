"""``syncd status``: per-org health of the mirror, usable as a monitoring check."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from syncd import health
from syncd.cli.args import EXIT_FAILED, EXIT_OK, Commands, config_option, duration, load, prepared_store
from syncd.cli.output import iso, print_status
from syncd.models import DEVICE_STATES
from syncd.store.edits import EditQueue


def add_commands(commands: Commands) -> None:
    """``status``."""
    p = commands.add_parser("status", help="per-org health of the mirror; exit 1 if an org has no recent success")
    config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--max-age",
        type=duration,
        metavar="DURATION",
        help="oldest acceptable last success (default: twice the org's interval, at least 5m)",
    )
    p.set_defaults(handler=cmd_status)


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
        "devices": {s: info.get("devices", {}).get(s, 0) for s in DEVICE_STATES},
        "last_error": last_run.get("error"),
    }
