"""What a pass reads beyond list_devices, as the mirror keeps it: door restrictions of portals
(``portal_restrictions``, ``door_restrictions``) and metadata definitions (``metadata_definitions``).

Which portals and integrations are due to be asked is decided here, in SQL, from the mirrored
devices; what each answer changes (rows, and a ``restrictions`` history row when a portal's list
changed) is written here, a batch of answers per transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from syncd.models import DoorRestrictions, MetadataDefinition, one_line
from syncd.store.schema import (
    device_changes,
    devices,
    door_restrictions,
    metadata_definitions,
    portal_restrictions,
)
from syncd.store.store import Store
from syncd.store.translate import translated


@dataclass(frozen=True, slots=True)
class DuePortal:
    """A portal whose restrictions are to be asked for."""

    device_id: str
    fingerprint: str  # the device's fingerprint now; stored with the answer
    answered: bool  # an earlier answer exists (else this is the portal's first)


@dataclass(frozen=True, slots=True)
class RestrictionsAnswer:
    """The outcome of asking one portal: ``ok`` with its restrictions, ``not_a_portal`` (400),
    ``not_found`` (404), or ``failed`` (with ``error``; the previous restrictions stay)."""

    device_id: str
    fingerprint: str
    status: str
    next_fetch_at: datetime
    restrictions: DoorRestrictions | None = None
    error: str | None = None


class PortalRestrictions:
    """``portal_restrictions`` and ``door_restrictions``, for the pass that asks about portals."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def due(self, org_id: str, now: datetime, portals: Mapping[str, str]) -> list[DuePortal]:
        """Of ``portals`` (the active portals a pass saw, with their fingerprints): those never
        answered, changed since the last answer, or whose ``next_fetch_at`` has come. Likewise
        devices asked before that no longer say they are portals, until OpenApp answers that they
        are not (400). New and changed ones first. Reads only this org's ``portal_restrictions``
        rows and, for former portals, their devices: no scan of the org's devices."""
        p, d = portal_restrictions, devices
        with translated("finding portals due for their door restrictions"), self.store.engine.connect() as conn:
            rows = {
                row.device_id: row
                for row in conn.execute(
                    select(p.c.device_id, p.c.status, p.c.device_fingerprint, p.c.next_fetch_at).where(
                        p.c.org_id == org_id
                    )
                )
            }
            former = [i for i, row in rows.items() if i not in portals and row.status != "not_a_portal"]
            candidates = dict(portals)
            if former:
                query = select(d.c.id, d.c.fingerprint).where(d.c.id.in_(former), d.c.state == "active")
                candidates.update(conn.execute(query).all())
        due = []
        for device_id, fingerprint in candidates.items():
            row = rows.get(device_id)
            if row is None or row.device_fingerprint != fingerprint or row.next_fetch_at <= now:
                answered = row is not None and row.status != "failed"
                due.append(
                    (row is not None and row.device_fingerprint == fingerprint, device_id, fingerprint, answered)
                )
        due.sort()  # new and changed first, then by id
        return [DuePortal(device_id, fingerprint, answered) for _, device_id, fingerprint, answered in due]

    def entities(self, device_id: str) -> list[str]:
        """The entities a portal is restricted to, as mirrored (sorted)."""
        query = select(door_restrictions.c.entity_id).where(door_restrictions.c.device_id == device_id)
        with translated("reading door restrictions"), self.store.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    def row(self, device_id: str) -> dict[str, Any] | None:
        """A portal's ``portal_restrictions`` row, or None."""
        query = select(portal_restrictions).where(portal_restrictions.c.device_id == device_id)
        with translated("reading door restrictions"), self.store.engine.connect() as conn:
            found = conn.execute(query).mappings().one_or_none()
            return dict(found) if found else None

    def summary(self) -> dict[str, dict[str, int]]:
        """Per org: ``portals`` asked about, how many are ``restricted``, and ``entities`` (grants)."""
        p, r = portal_restrictions, door_restrictions
        portals = select(p.c.org_id, func.count(), func.count().filter(p.c.restricted.is_(True))).group_by(p.c.org_id)
        grants = select(r.c.org_id, func.count()).group_by(r.c.org_id)
        with translated("counting door restrictions"), self.store.engine.connect() as conn:
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
            .where(device_changes.c.change == "restrictions")
            .order_by(device_changes.c.id.desc())
            .limit(limit)
        )
        with translated("reading changes"), self.store.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def record(self, org_id: str, run_id: int, now: datetime, answers: Sequence[RestrictionsAnswer]) -> int:
        """Write a batch of answers in one transaction; returns how many portals' lists changed
        (each also gets a ``restrictions`` row in device_changes, with the old and new lists)."""
        if not answers:
            return 0
        ids = [a.device_id for a in answers]
        changes: list[dict[str, Any]] = []
        p, r = portal_restrictions, door_restrictions
        with self.store.transaction("writing door restrictions") as conn:
            previous = {
                row.device_id: row.status
                for row in conn.execute(
                    select(portal_restrictions.c.device_id, portal_restrictions.c.status).where(
                        portal_restrictions.c.device_id.in_(ids)
                    )
                )
            }
            held: dict[str, set[str]] = {device_id: set() for device_id in ids}
            query = select(door_restrictions.c.device_id, door_restrictions.c.entity_id).where(
                door_restrictions.c.device_id.in_(ids)
            )
            for device_id, entity_id in conn.execute(query):
                held[device_id].add(entity_id)
            new_rows: list[dict[str, Any]] = []
            entity_rows: list[dict[str, Any]] = []
            for answer in answers:
                old_status = previous.get(answer.device_id)
                held_now = held[answer.device_id]
                values, gone, added, change = _plan(answer, now, old_status, held_now)
                if old_status is None:
                    new_rows.append({**NEW_ROW, **values, "device_id": answer.device_id, "org_id": org_id})
                else:
                    conn.execute(update(p).where(p.c.device_id == answer.device_id).values(values))
                if gone:
                    conn.execute(delete(r).where(r.c.device_id == answer.device_id, r.c.entity_id.in_(gone)))
                entity_rows += (
                    {"device_id": answer.device_id, "entity_id": e, "org_id": org_id, "since": now} for e in added
                )
                if change is not None:
                    changes.append(
                        {
                            "device_id": answer.device_id,
                            "org_id": org_id,
                            "run_id": run_id,
                            "observed_at": now,
                            "change": "restrictions",
                            "diff": {"door_restrictions": change},
                        }
                    )
            if new_rows:
                conn.execute(insert(p), new_rows)
            if entity_rows:
                conn.execute(insert(r), entity_rows)
            if changes:
                conn.execute(insert(device_changes), changes)
        return len(changes)


# A new portal_restrictions row: every column a plan does not set is NULL (one executemany for a batch).
NEW_ROW = {c.name: None for c in portal_restrictions.columns}


def _plan(
    answer: RestrictionsAnswer, now: datetime, old_status: str | None, held: set[str]
) -> tuple[dict[str, Any], set[str], list[str], dict[str, Any] | None]:
    """What one answer writes: the portal_restrictions values, the entities gone and added, and the
    ``{"old": ..., "new": ...}`` of a changed list (else None). The first list of a portal has
    nothing to compare with; a portal that is no longer one has none (new: null)."""
    values: dict[str, Any] = {"attempted_at": now, "next_fetch_at": answer.next_fetch_at}
    known_before = old_status == "ok" or bool(held)  # the mirror holds a list to compare with
    new: list[str] | None = None
    if answer.status == "failed":
        # The previous restrictions (and what the last answer said) stay; only the attempt is recorded.
        values["last_error"] = one_line(answer.error or "failed", 2000)
        if old_status is None:
            values["status"] = "failed"
        return values, set(), [], None
    values.update(status=answer.status, fetched_at=now, device_fingerprint=answer.fingerprint, last_error=None)
    if answer.status == "ok":
        assert answer.restrictions is not None
        new = list(answer.restrictions.entity_ids)
        values.update(
            restricted=bool(new), entity_count=len(new), body_key=answer.restrictions.key, raw=answer.restrictions.raw
        )
        if not known_before:
            values["changed_at"] = now  # first list: nothing to compare with, no history row
    elif answer.status == "not_a_portal":
        values.update(restricted=None, entity_count=None, raw=None, last_error=answer.error)
    else:  # not_found: what the mirror holds stays
        return values, set(), [], None
    wanted = set(new or ())
    gone, added = held - wanted, sorted(wanted - held)
    if not (gone or added or (new is None and known_before)):
        return values, gone, added, None
    values["changed_at"] = now
    return values, gone, added, ({"old": sorted(held), "new": new} if known_before else None)


@dataclass(frozen=True, slots=True)
class DueIntegration:
    """An integration whose provider's metadata definition is to be asked for, and the device to ask."""

    integration_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class DefinitionAnswer:
    """The outcome of asking one integration's device: a definition, or ``error``."""

    integration_id: str
    device_id: str
    next_fetch_at: datetime
    definition: MetadataDefinition | None = None
    error: str | None = None


class MetadataDefinitions:
    """``metadata_definitions``: each integration's provider's JSON Schema of device_metadata."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def due(self, org_id: str, now: datetime, integrations: Mapping[str, str]) -> list[DueIntegration]:
        """Of ``integrations`` (integration id -> the device to ask, from a pass), those never asked
        about or whose ``next_fetch_at`` has come."""
        m = metadata_definitions
        query = select(m.c.integration_id, m.c.next_fetch_at).where(m.c.org_id == org_id)
        with translated("finding integrations due for their metadata definition"), self.store.engine.connect() as c:
            next_fetch = dict(c.execute(query).all())
        return [
            DueIntegration(integration_id, device_id)
            for integration_id, device_id in sorted(integrations.items())
            if integration_id not in next_fetch or next_fetch[integration_id] <= now
        ]

    def of(self, org_id: str) -> dict[str, dict[str, Any]]:
        """The org's ``metadata_definitions`` rows by integration id."""
        query = select(metadata_definitions).where(metadata_definitions.c.org_id == org_id)
        with translated("reading metadata definitions"), self.store.engine.connect() as conn:
            return {row["integration_id"]: dict(row) for row in conn.execute(query).mappings()}

    def record(self, org_id: str, now: datetime, answers: Sequence[DefinitionAnswer]) -> list[str]:
        """Write the answers in one transaction; returns the integrations whose schema changed
        (from an earlier, different one)."""
        m = metadata_definitions
        changed: list[str] = []
        with self.store.transaction("writing metadata definitions") as conn:
            for answer in answers:
                key = (m.c.org_id == org_id) & (m.c.integration_id == answer.integration_id)
                old = conn.execute(select(m.c.fingerprint).where(key)).one_or_none()
                values: dict[str, Any] = {
                    "attempted_at": now,
                    "next_fetch_at": answer.next_fetch_at,
                    "device_id": answer.device_id,
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
