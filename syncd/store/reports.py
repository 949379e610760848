"""As-of reports: the fleet and who could pass which portal at a past time, from the mirror's history.

The mirror knows what its passes observed, when they observed it: ``device_changes`` rows record the
device after each change (``device_versions`` is the view of them), ``door_access_intervals`` the
periods in which an entity was on a portal's list or the portal let anyone through. Each answer
carries its observation window: the start of the org's last successful pass that had finished by
the time asked about, and the end of its first successful pass that started after it. What changed
between those two moments is shown as of when a pass saw it (README, "As-of reports").

On PostgreSQL the same questions are SQL functions (``syncd_devices_as_of``,
``syncd_door_access_as_of``, migration 0010); a test holds them and these queries to one answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, literal, or_, select, true

from syncd.store.schema import UTCDateTime, device_changes, devices, door_access_intervals, sync_runs
from syncd.store.store import Store
from syncd.vocab import RunStatus


@dataclass(frozen=True, slots=True)
class ObservationWindow:
    """What bounds an answer about ``at`` in one org: the last successful pass that had finished by
    then (its start) and the first successful pass that started after it (its end; None: none yet)."""

    org_id: str
    at: datetime
    observed_from: datetime | None  # None: no pass had succeeded by then; the answer is a partial view
    observed_to: datetime | None
    from_run_id: int | None
    to_run_id: int | None


@dataclass(frozen=True, slots=True)
class DeviceAsOf:
    """A device as the mirror last saw it at or before the time asked about."""

    device_id: str
    org_id: str
    state: str
    name: dict[str, str] | None
    zone_id: str | None
    integration_id: str | None
    external_id: str | None
    device_metadata: Any
    valid_from: datetime  # when a pass (or a pushed edit) first saw this version
    change: str  # the history row that began it: observed, created, updated, deleted, restored, purged
    change_id: int


@dataclass(frozen=True, slots=True)
class AccessInterval:
    """A period in which ``entity_id`` was on a portal's list, or (``anyone``) the portal let anyone through."""

    org_id: str
    device_id: str
    entity_id: str | None
    anyone: bool
    valid_from: datetime
    valid_to: datetime | None  # None: still so at the portal's last check
    changed_after: datetime | None  # the check before valid_from saw it otherwise (None: no check before)
    last_confirmed_at: datetime  # the last check that saw it so (the end came after this)
    from_run_id: int | None
    from_edit_id: int | None
    to_run_id: int | None
    to_edit_id: int | None


class Reports:
    """Read-only questions about the past, on either database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def devices_as_of(self, at: datetime, org_id: str | None = None) -> list[DeviceAsOf]:
        """Every device first seen by ``at``, in its version at ``at`` (purged ones as ``purged``),
        by org and id. One index probe per device (``device_changes (device_id, observed_at)``)."""
        d, c = devices, device_changes
        probe = device_changes.alias("probe")
        version = (
            select(probe.c.id)
            .where(probe.c.device_id == d.c.id, probe.c.state.is_not(None), probe.c.observed_at <= _moment(at))
            .order_by(probe.c.observed_at.desc(), probe.c.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        query = (
            select(
                d.c.id.label("device_id"),
                d.c.org_id,
                c.c.state,
                c.c.name,
                c.c.zone_id,
                c.c.integration_id,
                c.c.external_id,
                c.c.device_metadata,
                c.c.observed_at.label("valid_from"),
                c.c.change,
                c.c.id.label("change_id"),
            )
            .select_from(d.join(c, c.c.id == version))
            .where(d.c.first_seen_at <= _moment(at), _in_org(d.c.org_id, org_id))
            .order_by(d.c.org_id, d.c.id)
        )
        with self.store.reading("reading devices as of a time") as conn:
            return [DeviceAsOf(**row) for row in conn.execute(query).mappings()]

    def door_access_as_of(self, at: datetime, org_id: str | None = None) -> list[AccessInterval]:
        """Every access interval that held at ``at``: who could pass each portal then."""
        a = door_access_intervals
        query = _intervals().where(
            a.c.valid_from <= _moment(at),
            or_(a.c.valid_to.is_(None), a.c.valid_to > _moment(at)),
            _in_org(a.c.org_id, org_id),
        )
        return self._intervals(query)

    def door_access(
        self,
        *,
        portal: str | None = None,
        entity: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        org_id: str | None = None,
    ) -> list[AccessInterval]:
        """The access intervals of one portal, or of one entity (with the periods in which portals of
        its orgs let anyone through), that overlap ``[start, end]`` (open on a side left None)."""
        if (portal is None) == (entity is None):
            raise ValueError("door_access: name a portal or an entity")
        a = door_access_intervals
        if portal is not None:
            who: ColumnElement[bool] = a.c.device_id == portal
        else:
            orgs = select(a.c.org_id).where(a.c.entity_id == entity).distinct().scalar_subquery()
            anyone_in = a.c.org_id == org_id if org_id is not None else a.c.org_id.in_(orgs)
            who = or_(a.c.entity_id == entity, and_(a.c.anyone, anyone_in))
        query = _intervals().where(
            who,
            _in_org(a.c.org_id, org_id),
            a.c.valid_from <= _moment(end) if end is not None else true(),
            or_(a.c.valid_to.is_(None), a.c.valid_to > _moment(start)) if start is not None else true(),
        )
        return self._intervals(query)

    def windows(self, at: datetime, org_ids: Iterable[str]) -> dict[str, ObservationWindow]:
        """The observation window of an answer about ``at``, for each org."""
        with self.store.reading("reading passes") as conn:
            return {org_id: _window(conn, org_id, at) for org_id in sorted(set(org_ids))}

    def entity_orgs(self, entity: str) -> list[str]:
        """The orgs in which the entity was ever on a portal's list."""
        a = door_access_intervals
        query = select(a.c.org_id).where(a.c.entity_id == entity).distinct().order_by(a.c.org_id)
        with self.store.reading("reading door access") as conn:
            return list(conn.execute(query).scalars())

    def _intervals(self, query: Select[Any]) -> list[AccessInterval]:
        with self.store.reading("reading door access") as conn:
            return [AccessInterval(**row) for row in conn.execute(query).mappings()]


def _intervals() -> Select[Any]:
    a = door_access_intervals
    return select(*(col for col in a.c if col.name != "id")).order_by(
        a.c.org_id, a.c.device_id, a.c.valid_from, a.c.anyone.desc(), a.c.entity_id
    )


def _window(conn: Connection, org_id: str, at: datetime) -> ObservationWindow:
    r = sync_runs
    ok = and_(r.c.org_id == org_id, r.c.status == RunStatus.SUCCEEDED)
    before = conn.execute(
        select(r.c.id, r.c.started_at).where(ok, r.c.finished_at <= _moment(at)).order_by(r.c.finished_at.desc())
    ).first()
    after = conn.execute(
        select(r.c.id, r.c.finished_at).where(ok, r.c.started_at > _moment(at)).order_by(r.c.started_at)
    ).first()
    return ObservationWindow(
        org_id,
        at,
        before.started_at if before else None,
        after.finished_at if after else None,
        before.id if before else None,
        after.id if after else None,
    )


def _moment(at: datetime) -> ColumnElement[datetime]:
    """A time as the database compares it (UTC text on SQLite)."""
    return literal(at, UTCDateTime())


def _in_org(column: ColumnElement[str], org_id: str | None) -> ColumnElement[bool]:
    return column == org_id if org_id is not None else true()


__all__ = ["AccessInterval", "DeviceAsOf", "ObservationWindow", "Reports"]
