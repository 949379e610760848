"""What a pass reads beyond list_devices, as the mirror keeps it: door restrictions of portals
(``portal_restrictions``, ``door_restrictions``) and metadata definitions (``metadata_definitions``).

Which portals and integrations are due to be asked is decided here, from what the pass's scan saw
and this org's rows (never by scanning the org's devices again); what each answer changes (rows,
and a ``restrictions`` history row when a portal's list changed) is written here, a batch of
answers per transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from syncd.models import DoorRestrictions, HistoryRow, MetadataDefinition, history_row, one_line
from syncd.store.schema import (
    device_changes,
    devices,
    door_access_intervals,
    door_restrictions,
    metadata_definitions,
    portal_restrictions,
)
from syncd.store.store import PageWriter, Session, Store
from syncd.vocab import ChangeKind, DeviceState, RestrictionStatus

# portal_restrictions.status after an answer
ANSWERED = (RestrictionStatus.OK, RestrictionStatus.NOT_FOUND, RestrictionStatus.NOT_A_PORTAL)


@dataclass(frozen=True, slots=True)
class DuePortal:
    """A portal whose restrictions are to be asked for."""

    device_id: str
    fingerprint: str  # the device's fingerprint now; stored with the answer
    answered: bool  # an earlier answer exists (else this is the portal's first)
    failures: int = 0  # failed attempts in a row so far


@dataclass(frozen=True, slots=True)
class RestrictionsAnswer:
    """The outcome of asking one portal: ``ok`` with its restrictions, ``not_a_portal`` (400),
    ``not_found`` (404), or ``failed`` (with ``error`` and the failures in a row; the previous
    restrictions stay)."""

    device_id: str
    fingerprint: str
    status: RestrictionStatus
    next_fetch_at: datetime
    restrictions: DoorRestrictions | None = None
    error: str | None = None
    failures: int = 0


# The portal_restrictions columns that say whether a portal is due (see _due and PortalRestrictions.due).
DUE_COLUMNS = ("device_id", "org_id", "status", "attempted_at", "next_fetch_at", "device_fingerprint", "failures")


class PortalRestrictions:
    """``portal_restrictions`` and ``door_restrictions``, for the pass that asks about portals."""

    def __init__(self, store: Store, session: Session | None = None) -> None:
        """``session``: a pass's, so that its writes go through the connection holding the org's lock."""
        self.store = store
        self.session = session

    def due(
        self, org_id: str, now: datetime, portals: Mapping[str, str], saw: Callable[[Collection[str]], set[str]]
    ) -> list[DuePortal]:
        """Of ``portals`` (the active portals a pass saw, with their fingerprints): those never
        answered, changed since the last answer, or whose ``next_fetch_at`` has come. Likewise the
        devices the pass's scan took (``saw``: which of some ids it took) that were asked before but
        no longer say they are portals, until OpenApp answers that they are not (400). New and
        changed ones first, portals that failed last time after all others (oldest attempt first)."""
        rows = self._asked(org_id)
        candidates = dict(portals)
        former = [
            device_id
            for device_id, asked in rows.items()
            if device_id not in portals
            and asked.status != RestrictionStatus.NOT_A_PORTAL
            and asked.state == DeviceState.ACTIVE
        ]
        for device_id in saw(former):
            candidates[device_id] = rows[device_id].now_fingerprint
        due = [
            entry
            for device_id, fingerprint in candidates.items()
            if (entry := _due(rows.get(device_id), device_id, fingerprint, now))
        ]
        due.sort(key=lambda item: item[0])
        return [portal for _, portal in due]

    def due_among(self, org_id: str, now: datetime, portals: Mapping[str, str]) -> list[DuePortal]:
        """Of ``portals`` (some active portals a pass's scan has just seen, with their fingerprints),
        those due by the rules of :meth:`due`, but none that failed last time: those are asked after
        all others, once the scan is over. One indexed read."""
        rows = self._asked(org_id, portals)
        due = [
            entry
            for device_id, fingerprint in portals.items()
            if (entry := _due(rows.get(device_id), device_id, fingerprint, now)) and not entry[1].failures
        ]
        due.sort(key=lambda item: item[0])
        return [portal for _, portal in due]

    def _asked(self, org_id: str, ids: Collection[str] | None = None) -> dict[str, Any]:
        """The org's portal_restrictions rows (only those of ``ids``, when given), with the device's
        fingerprint and state now, by device id."""
        p, d = portal_restrictions, devices
        # Only what deciding needs: decoding every portal's last answer (its raw JSON, its other
        # timestamps) took ~40% of these reads in a no-change re-sync of 19,000 portals.
        query = select(*(p.c[name] for name in DUE_COLUMNS), d.c.fingerprint.label("now_fingerprint"), d.c.state)
        query = query.join(d, d.c.id == p.c.device_id)
        # Some ids: looked up by them alone, their org checked here. With the org in the WHERE
        # clause too, SQLite's planner walks the org's index instead, every row of the org's
        # portals for each batch: quadratic, 30 ms a batch of 50 at 19,000 portals.
        query = query.where(p.c.org_id == org_id) if ids is None else query.where(p.c.device_id.in_(list(ids)))
        with self.store.reading("finding portals due for their door restrictions") as conn:
            return {row.device_id: row for row in conn.execute(query) if row.org_id == org_id}

    def mirrored_list(self, device_id: str) -> list[str] | None:
        """The entities a portal is restricted to by OpenApp's last answer (sorted; empty: not
        restricted), or None when the mirror holds no answer of it."""
        p = portal_restrictions
        query = select(p.c.status).where(p.c.device_id == device_id)
        with self.store.reading("reading door restrictions") as conn:
            status = conn.execute(query).scalar()
        return self.entities(device_id) if status == RestrictionStatus.OK else None

    def entities(self, device_id: str) -> list[str]:
        """The entities a portal is restricted to, as mirrored (sorted)."""
        query = select(door_restrictions.c.entity_id).where(door_restrictions.c.device_id == device_id)
        with self.store.reading("reading door restrictions") as conn:
            return sorted(conn.execute(query).scalars())

    def unseen_entities(self, org_id: str, entity_ids: Collection[str]) -> list[str]:
        """Those of ``entity_ids`` (well-formed ids) the mirror never saw on a portal of ``org_id``:
        on none now (``door_restrictions``) and in none of its access history
        (``door_access_intervals``), in the order given. Two indexed reads."""
        wanted = list(dict.fromkeys(entity_ids))
        r, a = door_restrictions, door_access_intervals
        now = select(r.c.entity_id).where(r.c.org_id == org_id, r.c.entity_id.in_(wanted))
        ever = select(a.c.entity_id).where(a.c.org_id == org_id, a.c.entity_id.in_(wanted))
        with self.store.reading("reading door restrictions") as conn:
            seen = set(conn.execute(now.union(ever)).scalars())
        return [e for e in wanted if e not in seen]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per org: ``portals`` asked about, how many are ``restricted``, and ``entities`` (grants)."""
        p, r = portal_restrictions, door_restrictions
        portals = select(p.c.org_id, func.count(), func.count().filter(p.c.restricted.is_(True))).group_by(p.c.org_id)
        grants = select(r.c.org_id, func.count()).group_by(r.c.org_id)
        with self.store.reading("counting door restrictions") as conn:
            summary = {
                org_id: {"portals": int(n), "restricted": int(restricted), "entities": 0}
                for org_id, n, restricted in conn.execute(portals)
            }
            for org_id, n in conn.execute(grants):
                summary.setdefault(org_id, {"portals": 0, "restricted": 0, "entities": 0})["entities"] = int(n)
        return summary

    def newest_changes(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``restrictions`` rows of device_changes, newest first."""
        query = (
            select(device_changes)
            .where(device_changes.c.change == ChangeKind.RESTRICTIONS)
            .order_by(device_changes.c.id.desc())
            .limit(limit)
        )
        with self.store.reading("reading changes") as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def record(self, org_id: str, run_id: int, now: datetime, answers: Sequence[RestrictionsAnswer]) -> int:
        """Write a batch of answers in one transaction; returns how many portals' lists changed
        (each also gets a ``restrictions`` row in device_changes, with the old and new lists)."""
        if not answers:
            return 0
        with (self.session or self.store).writer(action="writing door restrictions") as writer:
            return write_answers(writer, org_id, now, answers, run_id=run_id)


def _due(row: Any, device_id: str, fingerprint: str, now: datetime) -> tuple[tuple[Any, ...], DuePortal] | None:
    """``(order, portal)`` when the portal is due (``row``: its portal_restrictions row, if any), else None.
    New and changed ones first, those that failed last time after all others (oldest attempt first)."""
    if row is None:
        return (0, False, "", device_id), DuePortal(device_id, fingerprint, False)
    same = row.device_fingerprint == fingerprint
    failing = row.failures > 0
    if (same or failing) and row.next_fetch_at > now:
        return None  # a portal backing off after failures waits, changed or not (at most an interval)
    order = (int(failing), same, str(row.attempted_at) if failing else "", device_id)
    return order, DuePortal(device_id, fingerprint, row.status in ANSWERED, row.failures)


def write_answers(
    writer: PageWriter,
    org_id: str,
    now: datetime,
    answers: Sequence[RestrictionsAnswer],
    *,
    run_id: int | None = None,
    edit_id: int | None = None,
    provenance: Mapping[str, str | None] | None = None,
) -> int:
    """Write answers inside the caller's transaction: of a pass (``run_id``) or of a local edit
    that set them (``edit_id``; its history row is marked ``local_edit`` and carries the edit's
    ``provenance``: ``requested_by``, ``approved_by``). Returns how many lists changed."""
    conn = writer.connection
    ids = [a.device_id for a in answers]
    changes: list[HistoryRow] = []
    new_rows: list[dict[str, Any]] = []
    entity_rows: list[dict[str, Any]] = []
    p, r = portal_restrictions, door_restrictions
    before = conn.execute(select(p.c.device_id, p.c.status, p.c.fetched_at).where(p.c.device_id.in_(ids))).all()
    previous = {device_id: status for device_id, status, _ in before}
    checked_at = {device_id: fetched_at for device_id, _, fetched_at in before}
    held: dict[str, set[str]] = {device_id: set() for device_id in ids}
    for device_id, entity_id in conn.execute(select(r.c.device_id, r.c.entity_id).where(r.c.device_id.in_(ids))):
        held[device_id].add(entity_id)
    for answer in answers:
        old_status = previous.get(answer.device_id)
        values, gone, added, change = _plan(answer, now, old_status, held[answer.device_id])
        if old_status is None:
            new_rows.append({**NEW_ROW, **values, "device_id": answer.device_id, "org_id": org_id})
        else:
            conn.execute(update(p).where(p.c.device_id == answer.device_id).values(values))
        if gone:
            conn.execute(delete(r).where(r.c.device_id == answer.device_id, r.c.entity_id.in_(gone)))
        entity_rows += ({"device_id": answer.device_id, "entity_id": e, "org_id": org_id, "since": now} for e in added)
        if change is not None:
            diff = {"door_restrictions": change}
            changes.append(
                history_row(
                    answer.device_id,
                    org_id,
                    now,
                    ChangeKind.RESTRICTIONS,
                    diff,
                    None,
                    run_id=run_id,
                    edit_id=edit_id,
                    provenance=provenance,
                )
            )
    if new_rows:
        conn.execute(insert(p), new_rows)
    if entity_rows:
        conn.execute(insert(r), entity_rows)
        writer.grew(r.name, len(entity_rows))
    writer.add_history(changes)
    opened = _record_access(conn, org_id, now, answers, checked_at, run_id=run_id, edit_id=edit_id)
    writer.grew(door_access_intervals.name, opened)
    return len(changes)


ANYONE = None  # the key of a portal's "anyone may pass" interval among its entity ids


def _record_access(
    conn: Connection,
    org_id: str,
    now: datetime,
    answers: Sequence[RestrictionsAnswer],
    checked_at: Mapping[str, datetime | None],
    *,
    run_id: int | None,
    edit_id: int | None,
) -> int:
    """Move door_access_intervals on to what the answers say: close what is no longer so, confirm
    what still is, open what is new (returns how many were opened). An answer that said nothing
    (failed, 404) moves nothing."""
    who: dict[str, set[str | None]] = {}
    for answer in answers:
        if answer.status == RestrictionStatus.OK:
            assert answer.restrictions is not None
            who[answer.device_id] = set(answer.restrictions.entity_ids) or {ANYONE}
        elif answer.status == RestrictionStatus.NOT_A_PORTAL:
            who[answer.device_id] = set()  # nobody passes through what is not a door
    if not who:
        return 0
    a = door_access_intervals
    is_open = a.c.valid_to.is_(None)
    current = conn.execute(select(a.c.id, a.c.device_id, a.c.entity_id).where(a.c.device_id.in_(who), is_open)).all()
    ended = [row.id for row in current if row.entity_id not in who[row.device_id]]
    if ended:
        conn.execute(update(a).where(a.c.id.in_(ended)).values(valid_to=now, to_run_id=run_id, to_edit_id=edit_id))
    conn.execute(update(a).where(a.c.device_id.in_(who), is_open).values(last_confirmed_at=now))
    held: dict[str, set[str | None]] = {device_id: set() for device_id in who}
    for row in current:
        held[row.device_id].add(row.entity_id)
    opened = [
        {
            "org_id": org_id,
            "device_id": device_id,
            "entity_id": entity_id,
            "anyone": entity_id is ANYONE,
            "valid_from": now,
            "valid_to": None,
            "changed_after": checked_at.get(device_id),
            "last_confirmed_at": now,
            "from_run_id": run_id,
            "from_edit_id": edit_id,
            "to_run_id": None,
            "to_edit_id": None,
        }
        for device_id, entities in who.items()
        for entity_id in sorted(entities - held[device_id], key=lambda e: e or "")
    ]
    if opened:
        conn.execute(insert(a), opened)
    return len(opened)


# A new portal_restrictions row: every column a plan does not set is NULL (one executemany for a batch).
NEW_ROW: dict[str, Any] = {c.name: None for c in portal_restrictions.columns} | {"failures": 0}


def _plan(
    answer: RestrictionsAnswer, now: datetime, old_status: str | None, held: set[str]
) -> tuple[dict[str, Any], set[str], list[str], dict[str, Any] | None]:
    """What one answer writes: the portal_restrictions values, the entities gone and added, and the
    ``{"old": ..., "new": ...}`` of a changed list (else None). A list is null for a device that is
    not a portal (400). A portal's first answer has nothing to compare with: no history row."""
    values: dict[str, Any] = {
        "attempted_at": now,
        "next_fetch_at": answer.next_fetch_at,
        "failures": answer.failures,
    }
    if answer.status == RestrictionStatus.FAILED:
        # What the mirror holds (and what the last answer said) stays; only the attempt is recorded.
        values["last_error"] = one_line(answer.error or "failed", 2000)
        if old_status is None:
            values["status"] = RestrictionStatus.FAILED
        return values, set(), [], None
    values.update(status=answer.status, fetched_at=now, device_fingerprint=answer.fingerprint, last_error=None)
    if answer.status == RestrictionStatus.NOT_FOUND:  # gone since the scan: what the mirror holds stays
        return values, set(), [], None
    new: list[str] | None = None
    if answer.status == RestrictionStatus.OK:
        assert answer.restrictions is not None
        new = list(answer.restrictions.entity_ids)
        values.update(
            restricted=bool(new), entity_count=len(new), body_key=answer.restrictions.key, raw=answer.restrictions.raw
        )
    else:  # not_a_portal
        values.update(restricted=None, entity_count=None, raw=None, last_error=answer.error)
    wanted = set(new or ())
    gone, added = held - wanted, sorted(wanted - held)
    answered_before = old_status in ANSWERED
    old = None if old_status == RestrictionStatus.NOT_A_PORTAL else sorted(held)
    if not answered_before:
        if new is not None:
            values["changed_at"] = now  # the first list
        return values, gone, added, None
    if old == (None if new is None else sorted(new)):
        return values, gone, added, None
    values["changed_at"] = now
    return values, gone, added, {"old": old, "new": new}


@dataclass(frozen=True, slots=True)
class DueIntegration:
    """An integration whose provider's metadata definition is to be asked for, and the device to ask."""

    integration_id: str
    device_id: str
    failures: int = 0  # failed attempts in a row so far


@dataclass(frozen=True, slots=True)
class DefinitionAnswer:
    """The outcome of asking one integration's device: a definition, or ``error`` (and the failures in a row)."""

    integration_id: str
    device_id: str
    next_fetch_at: datetime
    definition: MetadataDefinition | None = None
    error: str | None = None
    failures: int = 0
    schema_problem: str | None = None  # why the definition's schema cannot be used (None: it can)


class MetadataDefinitions:
    """``metadata_definitions``: each integration's provider's JSON Schema of device_metadata."""

    def __init__(self, store: Store, session: Session | None = None) -> None:
        """``session``: a pass's, so that its writes go through the connection holding the org's lock."""
        self.store = store
        self.session = session

    def due(self, org_id: str, now: datetime, integrations: Mapping[str, str]) -> list[DueIntegration]:
        """Of ``integrations`` (integration id -> the device to ask, from a pass), those never asked
        about or whose ``next_fetch_at`` has come; ones that failed last time after the others."""
        m = metadata_definitions
        query = select(m.c.integration_id, m.c.next_fetch_at, m.c.failures).where(m.c.org_id == org_id)
        with self.store.reading("finding integrations due for their metadata definition") as c:
            rows = {row.integration_id: row for row in c.execute(query)}
        due = []
        for integration_id, device_id in integrations.items():
            row = rows.get(integration_id)
            if row is None or row.next_fetch_at <= now:
                failures = row.failures if row is not None else 0
                due.append(DueIntegration(integration_id, device_id, failures))
        return sorted(due, key=lambda item: (item.failures > 0, item.integration_id))

    def for_integration(self, org_id: str, integration_id: str) -> dict[str, Any] | None:
        """The mirrored definition of an integration's provider, or None."""
        m = metadata_definitions
        query = select(m).where(m.c.org_id == org_id, m.c.integration_id == integration_id)
        with self.store.reading("reading metadata definitions") as conn:
            row = conn.execute(query).mappings().one_or_none()
            return dict(row) if row else None

    def record(self, org_id: str, now: datetime, answers: Sequence[DefinitionAnswer]) -> list[str]:
        """Write the answers in one transaction; returns the integrations whose schema changed
        (from an earlier, different one)."""
        m = metadata_definitions
        changed: list[str] = []
        with (self.session or self.store).transaction("writing metadata definitions") as conn:
            for answer in answers:
                key = (m.c.org_id == org_id) & (m.c.integration_id == answer.integration_id)
                old = conn.execute(select(m.c.fingerprint).where(key)).one_or_none()
                values: dict[str, Any] = {
                    "attempted_at": now,
                    "next_fetch_at": answer.next_fetch_at,
                    "device_id": answer.device_id,
                    "failures": answer.failures,
                }
                definition = answer.definition
                if definition is None:
                    values["last_error"] = one_line(answer.error or "failed", 2000)
                else:
                    values.update(
                        provider_type=definition.provider_type,
                        json_schema=definition.schema,
                        fingerprint=definition.fingerprint,
                        raw=definition.raw,
                        fetched_at=now,
                        last_error=None,
                        schema_problem=None if answer.schema_problem is None else one_line(answer.schema_problem, 2000),
                    )
                    if old is None or old.fingerprint != definition.fingerprint:
                        values["changed_at"] = now
                        if old is not None and old.fingerprint is not None:
                            changed.append(answer.integration_id)
                if old is None:
                    conn.execute(insert(m).values(org_id=org_id, integration_id=answer.integration_id, **values))
                else:
                    conn.execute(update(m).where(key).values(values))
        return changed
