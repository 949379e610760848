"""``syncd report``: questions about the past, answered from the mirror's history (read-only).

``report as-of`` prints the fleet (or, with ``--door-access``, who could pass each portal) as of a
time; ``report door-access`` prints the access periods of one portal or one entity. Every answer
names its observation window: what the mirror knows, it knows as of when a pass looked.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from syncd.cli.args import EXIT_OK, Commands, add_command, config_option, load, org_ids, prepared_store
from syncd.cli.output import table
from syncd.errors import ConfigError
from syncd.models import is_device_id, is_entity_id, parse_timestamp
from syncd.store.reports import AccessInterval, DeviceAsOf, ObservationWindow, Reports
from syncd.vocab import DeviceState

FORMATS = ("table", "csv", "json")
DEVICE_COLUMNS = ("org_id", "device_id", "state", "name", "zone_id", "integration_id", "external_id", "since", "change")
ACCESS_COLUMNS = (
    "org_id",
    "portal_id",
    "entity_id",
    "access",
    "from",
    "to",
    "changed_after",
    "last_confirmed_at",
    "from_run_id",
    "from_edit_id",
    "to_run_id",
    "to_edit_id",
)
ACCESS_TABLE = ("org_id", "portal_id", "entity_id", "from", "to", "changed_after", "last_confirmed_at")


def moment(text: str) -> datetime:
    """A time argument: ISO 8601 (``2026-03-03``, ``2026-03-03T17:00:00+01:00``); without an offset, UTC."""
    try:
        parsed = parse_timestamp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}; use ISO 8601, e.g. 2026-03-03T17:00:00Z") from None
    if parsed is None:
        raise argparse.ArgumentTypeError("a time is required, e.g. 2026-03-03T17:00:00Z")
    return parsed


def add_commands(commands: Commands) -> None:
    """``report as-of`` and ``report door-access``."""
    report = add_command(
        commands,
        "report",
        "the fleet and door access at a past time, from the mirror's history",
        "Answer questions about the past from the mirror's history (read-only; no API key needed): "
        "`report as-of` prints the fleet, or who could pass each portal, as of a time; `report door-access` "
        "prints the periods in which an entity could pass a portal.",
        "syncd report as-of --at 2026-03-31T23:59:59Z",
        "syncd report door-access --entity 01HENT00000000000000000000 --from 2026-03-01 --to 2026-03-04",
    )
    reports = report.add_subparsers(metavar="REPORT")

    p = add_command(
        reports,
        "as-of",
        "every device (or who could pass each portal) as of a time",
        "Print the fleet as the mirror saw it at a time: each device in the version it had then "
        "(soft-deleted ones as 'deleted'; purged ones only with --include-purged). With --door-access, print "
        "who could pass each portal then instead: one row per entity on its list, or one 'anyone' row for a "
        "portal that let anyone through. The observation window (on stderr for a table; in the rows of csv "
        "and json) bounds the answer: the state is as seen by the last successful pass before the time, and "
        "a change made between that pass and the next one shows from when the next pass saw it.",
        "syncd report as-of --at 2026-03-31T23:59:59Z --org 01HORG00000000000000000000 --format csv",
        "syncd report as-of --at '2026-03-03 17:00+01:00' --door-access --format json",
    )
    config_option(p)
    p.add_argument("--at", type=moment, required=True, metavar="TIME", help="ISO 8601; UTC when no offset is given")
    p.add_argument("--org", metavar="ORG_ID", help="only this configured org (default: every configured org)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--door-access", action="store_true", help="who could pass each portal, instead of the fleet")
    p.add_argument("--include-purged", action="store_true", help="also devices purged by then (state 'purged')")
    p.set_defaults(handler=cmd_as_of)

    p = add_command(
        reports,
        "door-access",
        "when an entity could pass a portal: the periods of one portal or of one entity",
        "Print the access periods of one portal (each entity on its list, and the periods in which it let "
        "anyone through), or of one entity (each portal whose list held it, and the periods in which portals "
        "of its orgs let anyone through), overlapping --from/--to. 'from' and 'to' are when syncd saw a "
        "period begin and end; it began after 'changed_after' and ended after 'last_confirmed_at'.",
        "syncd report door-access --portal 01HPRT00000000000000000000 --from 2026-03-01 --to 2026-03-04",
        "syncd report door-access --entity 01HENT00000000000000000000 --format json",
    )
    config_option(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--portal", metavar="DEVICE_ID", help="the portal (a device id)")
    which.add_argument("--entity", metavar="ENTITY_ID", help="the apartment / listing (an entity id)")
    p.add_argument("--from", dest="start", type=moment, metavar="TIME", help="periods still open at or after this")
    p.add_argument("--to", dest="end", type=moment, metavar="TIME", help="periods begun at or before this")
    p.add_argument("--org", metavar="ORG_ID", help="only this configured org")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.set_defaults(handler=cmd_door_access)


def cmd_as_of(args: argparse.Namespace) -> int:
    """The fleet, or the door access, as of ``--at``."""
    config = load(args, with_key=False)
    orgs = _orgs(args, config)
    with prepared_store(config, read_only=True) as store:
        reports = Reports(store)
        windows = reports.windows(args.at, orgs)
        if args.door_access:
            intervals = [i for i in reports.door_access_as_of(args.at, args.org) if i.org_id in orgs]
            _print_access(intervals, windows, args.format, sys.stdout)
            return EXIT_OK
        fleet = [
            d
            for d in reports.devices_as_of(args.at, args.org)
            if d.org_id in orgs and (args.include_purged or d.state != DeviceState.PURGED)
        ]
    rows = [_device_row(d, windows[d.org_id]) for d in fleet]
    if args.format == "table":
        _print_windows(windows.values(), sys.stderr)
        table(
            DEVICE_COLUMNS, [[_cell(row[c]) for c in DEVICE_COLUMNS] for row in rows], sys.stdout, len(DEVICE_COLUMNS)
        )
        print(f"{len(rows):,} devices", file=sys.stderr)
    else:
        _write(rows, windows.values(), args.format, sys.stdout)
    return EXIT_OK


def cmd_door_access(args: argparse.Namespace) -> int:
    """The access periods of a portal or an entity."""
    if args.portal is not None and not is_device_id(args.portal):
        raise ConfigError(f"--portal {args.portal!r} is not a device id (a ULID)")
    if args.entity is not None and not is_entity_id(args.entity):
        raise ConfigError(f"--entity {args.entity!r} is not an entity id (a ULID)")
    if args.start and args.end and args.start > args.end:
        raise ConfigError("--from is after --to")
    config = load(args, with_key=False)
    orgs = _orgs(args, config)
    with prepared_store(config, read_only=True) as store:
        reports = Reports(store)
        intervals = [
            i
            for i in reports.door_access(
                portal=args.portal, entity=args.entity, start=args.start, end=args.end, org_id=args.org
            )
            if i.org_id in orgs
        ]
        if args.entity is not None and not args.org and not reports.entity_orgs(args.entity):
            print(
                f"syncd: {args.entity} was never on a portal's list in the mirror "
                "(with --org, the portals of that org open to anyone are shown)",
                file=sys.stderr,
            )
        windows = reports.windows(args.end or datetime.now(UTC), {i.org_id for i in intervals})
    _print_access(intervals, windows, args.format, sys.stdout)
    return EXIT_OK


def _orgs(args: argparse.Namespace, config: Any) -> frozenset[str]:
    configured = org_ids(config)
    if args.org is None:
        return configured
    if args.org not in configured:
        raise ConfigError(f"--org {args.org}: not a configured org")
    return frozenset({args.org})


def _device_row(device: DeviceAsOf, window: ObservationWindow) -> dict[str, Any]:
    return {
        "org_id": device.org_id,
        "device_id": device.device_id,
        "state": device.state,
        "name": _name(device.name),
        "zone_id": device.zone_id,
        "integration_id": device.integration_id,
        "external_id": device.external_id,
        "since": device.valid_from,
        "change": device.change,
        "device_metadata": device.device_metadata,
        "window_from": window.observed_from,
        "window_to": window.observed_to,
    }


def _access_row(interval: AccessInterval, window: ObservationWindow | None) -> dict[str, Any]:
    return {
        "org_id": interval.org_id,
        "portal_id": interval.device_id,
        "entity_id": interval.entity_id,
        "access": "anyone" if interval.anyone else "listed",
        "from": interval.valid_from,
        "to": interval.valid_to,
        "changed_after": interval.changed_after,
        "last_confirmed_at": interval.last_confirmed_at,
        "from_run_id": interval.from_run_id,
        "from_edit_id": interval.from_edit_id,
        "to_run_id": interval.to_run_id,
        "to_edit_id": interval.to_edit_id,
        "window_from": window.observed_from if window else None,
        "window_to": window.observed_to if window else None,
    }


def _print_access(
    intervals: Sequence[AccessInterval], windows: dict[str, ObservationWindow], form: str, out: TextIO
) -> None:
    rows = [_access_row(i, windows.get(i.org_id)) for i in intervals]
    if form != "table":
        _write(rows, windows.values(), form, out)
        return
    _print_windows(windows.values(), sys.stderr)
    cells = [[_cell(row[c] if c != "entity_id" or row[c] else "(anyone)") for c in ACCESS_TABLE] for row in rows]
    table(ACCESS_TABLE, cells, out, len(ACCESS_TABLE))
    print(f"{len(rows):,} periods", file=sys.stderr)


def _print_windows(windows: Iterable[ObservationWindow], out: TextIO) -> None:
    for w in windows:
        before = (
            f"last pass before: run {w.from_run_id} from {_text(w.observed_from)}"
            if w.from_run_id
            else ("no pass had succeeded by then")
        )
        after = f"next pass: run {w.to_run_id} until {_text(w.observed_to)}" if w.to_run_id else "no pass since"
        print(f"{w.org_id} at {_text(w.at)}: {before}; {after}", file=out)


def _write(rows: list[dict[str, Any]], windows: Iterable[ObservationWindow], form: str, out: TextIO) -> None:
    if form == "json":
        document = {
            "windows": [
                {
                    "org_id": w.org_id,
                    "at": _text(w.at),
                    "from": _text(w.observed_from),
                    "to": _text(w.observed_to),
                    "from_run_id": w.from_run_id,
                    "to_run_id": w.to_run_id,
                }
                for w in windows
            ],
            "rows": [{k: _text(v) if isinstance(v, datetime) else v for k, v in row.items()} for row in rows],
        }
        json.dump(document, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return
    columns = list(rows[0]) if rows else []
    writer = csv.writer(out)
    if columns:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv(row[c]) for c in columns])


def _name(name: dict[str, str] | None) -> str | None:
    if not name:
        return None
    return name.get("en") or next(iter(sorted(name.items())))[1]


def _text(value: datetime | None) -> str | None:
    """Full precision, so a time printed can be asked about again."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _text(value) or ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)
