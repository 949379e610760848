"""What commands print: tables, and progress lines on a terminal."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from syncd.errors import ConfigError
from syncd.store import Store
from syncd.store.details import PortalRestrictions
from syncd.store.edits import Edit
from syncd.store.schema import RUN_COUNTERS
from syncd.sync import PassOutcome
from syncd.vocab import DeviceState, EditAction, EditStatus, PassStatus

SUMMARY_COLUMNS = tuple(c for c in RUN_COUNTERS if not c.endswith(("requests", "failures")))
DETAIL_FAILURES = {"restriction_failures": "door restrictions", "definition_failures": "metadata definitions"}
# What the payload line of an edit says it does, by the edit's status.
PAYLOAD_VERBS = {EditStatus.PENDING: "queued", EditStatus.IN_FLIGHT: "pushing", EditStatus.SUCCEEDED: "applied"}
# A command's passes that count as ok: succeeded, or skipped (another syncd ran the org's pass).
PASSED = (PassStatus.SUCCEEDED, PassStatus.SKIPPED)
REQUESTER_WIDTH = 20  # the `by` column of `syncd edits` (the whole table stays within about 120 columns)


class Progress:
    """Per-org progress lines on a terminal: while an org's pass runs, its pages and devices at least
    every ``every`` seconds (also while it waits for a slow page), and a final line when it ends."""

    def __init__(self, stream: TextIO, every: float = 1.0) -> None:
        self.stream = stream
        self.every = every
        self._running: dict[str, list[float]] = {}  # org -> [pages, devices, started, printed]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._ticker.join(timeout=5)

    def update(self, org_id: str, pages: int, devices: int) -> None:
        """A pass of ``org_id`` has read ``pages`` pages, ``devices`` devices."""
        now = time.monotonic()
        with self._lock:
            state = self._running.setdefault(org_id, [0, 0, now, 0.0])
            state[0], state[1] = pages, devices
            if now - state[3] >= self.every:
                self._print(org_id, state, now)

    def done(self, outcome: PassOutcome) -> None:
        """The org's pass ended: its final line."""
        with self._lock:
            self._running.pop(outcome.org_id, None)
            print(
                f"  {outcome.org_id}: {outcome.status}: {outcome.counts['pages']:,} pages, "
                f"{outcome.counts['devices_seen']:,} devices in {outcome.seconds:.1f}s",
                file=self.stream,
                flush=True,
            )

    def _tick(self) -> None:
        while not self._closed.wait(self.every / 4):
            now = time.monotonic()
            with self._lock:
                for org_id, state in self._running.items():
                    if now - state[3] >= self.every:
                        self._print(org_id, state, now)

    def _print(self, org_id: str, state: list[float], now: float) -> None:
        state[3] = now
        pages, devices, started = int(state[0]), int(state[1]), state[2]
        print(f"  {org_id}: {pages:,} pages, {devices:,} devices ({now - started:.0f}s)", file=self.stream, flush=True)


# The per-org table of a pass, as it fits a 120-column terminal; `--wide` shows every counter.
NARROW_COLUMNS = ("pages", "devices_seen", "created", "updated", "deleted", "restored", "purged")
CHANGE_COUNTERS = ("created", "updated", "deleted", "restored", "purged")
# Counters of devices a pass could not take, named below the narrow table when not zero.
DEVICE_TROUBLE = {"rejected": "rejected", "unreadable": "unreadable", "duplicates": "duplicate"}


def print_summary(outcomes: list[PassOutcome], out: TextIO, wide: bool = False) -> None:
    """The end-of-command table: one row per org (the counters that fit 120 columns, or with
    ``wide`` every one), then any errors and what the narrow table leaves out."""
    columns = SUMMARY_COLUMNS if wide else NARROW_COLUMNS
    headers = ("org", "status", *(c.replace("devices_seen", "devices") for c in columns), "seconds")
    rows = [(o.org_id, o.status, *(f"{o.counts[c]:,}" for c in columns), f"{o.seconds:.1f}") for o in outcomes]
    table(headers, rows, out)
    for o in outcomes:
        if o.error:
            print(f"{o.org_id}: {o.status}: {o.error}", file=out)
        trouble = [f"{o.counts[c]:,} {what}" for c, what in DEVICE_TROUBLE.items() if o.counts[c] and not wide]
        if trouble:
            print(f"{o.org_id}: devices not taken: {', '.join(trouble)} (see the log; every counter: --wide)", file=out)
        for counter, what in DETAIL_FAILURES.items():
            if o.counts[counter]:
                print(
                    f"{o.org_id}: {o.counts[counter]} request(s) for {what} failed; the mirror keeps what it had "
                    "and asks again next pass (see the log)",
                    file=out,
                )


def totals(outcomes: Sequence[PassOutcome], seconds: float) -> dict[str, Any]:
    """What the passes of one command came to: orgs ok (succeeded or skipped) and failed (failed or
    aborted), devices seen, device changes written, and the command's wall time."""
    return {
        "orgs_ok": sum(o.status in PASSED for o in outcomes),
        "orgs_failed": sum(o.status not in PASSED for o in outcomes),
        "orgs_skipped": sum(o.status == PassStatus.SKIPPED for o in outcomes),
        "devices": sum(o.counts["devices_seen"] for o in outcomes),
        "changes": sum(o.counts[c] for o in outcomes for c in CHANGE_COUNTERS),
        "seconds": round(seconds, 1),
    }


def print_totals(outcomes: Sequence[PassOutcome], seconds: float, out: TextIO) -> None:
    """The last line of run-once: orgs ok/failed, devices, changes, seconds."""
    t = totals(outcomes, seconds)
    skipped = f" ({t['orgs_skipped']} skipped)" if t["orgs_skipped"] else ""
    print(
        f"total: {t['orgs_ok']} org(s) ok{skipped}, {t['orgs_failed']} failed; {t['devices']:,} devices, "
        f"{t['changes']:,} changes; {t['seconds']:.1f}s",
        file=out,
    )


def outcomes_json(outcomes: Sequence[PassOutcome], seconds: float) -> dict[str, Any]:
    """run-once's result for scripts: each org's pass with every counter, and the totals."""
    orgs = [
        {
            "org_id": o.org_id,
            "status": o.status,
            "run_id": o.run_id,
            "started_at": iso(o.started_at),
            "finished_at": iso(o.finished_at),
            "seconds": round(o.seconds, 3),
            "counts": {c: o.counts[c] for c in RUN_COUNTERS},
            "error": o.error,
        }
        for o in outcomes
    ]
    return {"orgs": orgs, "totals": totals(outcomes, seconds)}


def print_runs(rows: Sequence[dict[str, Any]], out: TextIO, wide: bool = False) -> None:
    """Past passes (``syncd runs``), newest first, and the error of each that failed."""
    columns = SUMMARY_COLUMNS if wide else NARROW_COLUMNS
    lines = [
        (
            str(r["id"]),
            r["org_id"],
            r["trigger"],
            iso(r["started_at"]) or "-",
            r["status"],
            f"{(r['finished_at'] - r['started_at']).total_seconds():.1f}" if r["finished_at"] else "-",
            *(f"{r[c]:,}" for c in columns),
        )
        for r in rows
    ]
    headers = ("id", "org", "trigger", "started", "status", "seconds", *(c.replace("_seen", "") for c in columns))
    table(headers, lines, out, text_columns=5)
    for r in rows:
        if r["error"]:
            print(f"  {r['id']}: {r['error']}", file=out)


def print_problems(error: ConfigError, out: TextIO) -> None:
    """A configuration or usage error: one line, or, when there are several problems, one per line."""
    if len(error.problems) < 2:
        print(f"syncd: error: {error}", file=out)
        return
    where = f"{error.where}: " if error.where else ""
    print(f"syncd: error: {where}{len(error.problems)} problems:", file=out)
    for problem in error.problems:
        print(f"  - {problem}", file=out)


def print_door_restrictions(store: Store, out: TextIO) -> None:
    """Per org: portals mirrored, how many restrict who may pass, and the newest restriction changes."""
    restrictions = PortalRestrictions(store)
    summary = restrictions.summary()
    if not summary:
        return
    print("\nDoor restrictions (portal_access):", file=out)
    rows = [(org_id, str(s["portals"]), str(s["restricted"]), str(s["entities"])) for org_id, s in summary.items()]
    table(("org", "portals", "restricted", "entity grants"), rows, out, text_columns=1)
    for change in restrictions.newest_changes(5):
        diff = change["diff"]["door_restrictions"]
        print(f"  {change['device_id']}: {diff['old']} -> {diff['new']}", file=out)


def print_status(report: list[dict[str, Any]], out: TextIO) -> None:
    """The human table of ``syncd status``."""
    rows = [
        (
            r["org_id"],
            "OK" if r["ok"] else "STALE",
            r["last_pass_started_at"] or "never",
            f"{r['last_pass_seconds']}" if r["last_pass_seconds"] is not None else "-",
            r["last_pass_status"] or "-",
            age(r["last_success_age_seconds"]),
            *(str(r["devices"][s]) for s in DeviceState),
        )
        for r in report
    ]
    headers = ("org", "health", "last pass", "seconds", "result", "last success", *DeviceState)
    table(headers, rows, out, text_columns=5)
    for r in report:
        if r["last_error"]:
            print(f"{r['org_id']}: last error: {r['last_error']}", file=out)


def print_edits(edits: Sequence[tuple[Edit, Any, str]], out: TextIO) -> None:
    """The queue as a table (who requested each edit, when and how), then per edit what it does
    and sets (credentials masked), its approval or rejection, and for a conflict the base, remote
    and queued value of each conflicting field."""
    lines = [
        (
            str(e.id),
            e.device_id,
            e.action,
            e.status.value,
            minute(e.requested_at or e.created_at),
            e.requested_via,
            clipped(e.requested_by or "-", REQUESTER_WIDTH),
            str(e.attempts),
        )
        for e, _, _ in edits
    ]
    headers = ("id", "device", "action", "status", "requested", "via", "by", "tries")
    table(headers, lines, out, text_columns=7)
    for e, payload, what in edits:
        for line in (*_payload_lines(e, payload, what), *_approval_lines(e), *_attempt_lines(e)):
            print(f"  {e.id}: {line}", file=out)


def _payload_lines(e: Edit, payload: Any, what: str) -> list[str]:
    """What the edit does (and sets, credentials masked), by its status: queued, pushing, applied."""
    verb = PAYLOAD_VERBS.get(e.status, "wanted")
    if payload:
        return [f"{verb:<8}{what}: {json.dumps(payload, ensure_ascii=False)}"]
    return [] if e.action == EditAction.UPDATE else [f"{verb:<8}{what}"]


def _attempt_lines(e: Edit) -> list[str]:
    """When a pending edit is tried next, a conflict's base, remote and queued values, and the last
    error (``held`` when the edit waits for its kind's cap on sends)."""
    lines = []
    if e.status is EditStatus.PENDING and e.next_attempt_at is not None:
        answer = f" (last answer: HTTP {e.last_status_code})" if e.last_status_code else ""
        lines.append(f"{'next':<8}attempt at {iso(e.next_attempt_at)}{answer}")
    if e.status is EditStatus.CONFLICT and isinstance(e.remote, dict):
        lines.extend(_conflict_lines(e.remote))
    if e.last_error and e.status is not EditStatus.SUCCEEDED:
        held = e.status is EditStatus.PENDING and e.held_by is not None
        lines.append(f"{'held' if held else 'error':<8}{e.last_error}")
    return lines


def _conflict_lines(fields: dict[str, Any]) -> list[str]:
    lines = []
    for name, values in sorted(fields.items()):
        if isinstance(values, dict):
            lines.append(f"{name}:")
            for label in ("base", "remote", "queued"):
                shown = json.dumps(values.get(label), ensure_ascii=False, default=str)
                lines.append(f"  {label:<7}{shown}")
    return lines


def _approval_lines(e: Edit) -> list[str]:
    """An edit's approval, rejection or wait for one, and why it ended unsent."""
    lines = []
    if e.status is EditStatus.AWAITING_APPROVAL:
        since = iso(e.approval_requested_at) or "?"
        lines.append(
            f"{'awaits':<8}approval since {since}: `syncd edits approve {e.id}` by another person than "
            f"{e.requested_by}, or `syncd edits reject {e.id} --reason ...`"
        )
    if e.approved_at is not None:
        lines.append(f"{'approved':<8} by {e.approved_by} at {iso(e.approved_at)}")
    if e.rejected_at is not None:
        lines.append(f"{'rejected':<8} by {e.rejected_by} at {iso(e.rejected_at)}: {e.reason}")
    elif e.reason:
        lines.append(f"{'reason':<8}{e.reason}")
    return lines


def print_state_counts(counts: dict[str, dict[str, int]], out: TextIO) -> None:
    """Devices by state per org."""
    rows = [(org, *(str(by_state.get(s, 0)) for s in DeviceState)) for org, by_state in sorted(counts.items())]
    table(("org", *DeviceState), rows, out)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, text_columns: int = 2) -> None:
    """Left-aligned text columns first, then right-aligned numbers."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line([h.upper() for h in headers]).rstrip(), file=out)
    for row in rows:
        print(line(row).rstrip(), file=out)


def age(seconds: int | None) -> str:
    """``42s ago``, ``5m ago``, ``3h ago``, ``2d ago`` or ``never``."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def iso(moment: datetime | None) -> str | None:
    """``YYYY-MM-DDTHH:MM:SSZ``, or None."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def minute(moment: datetime | None) -> str:
    """``YYYY-MM-DD HH:MM`` (UTC), or ``-``."""
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


def clipped(text: str, width: int) -> str:
    """``text``, cut to ``width`` characters with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"
