"""The write-back queue (``device_edits``): the typed edit, its statuses and every allowed
transition (one table), and the queue, one method per transition. SQLAlchemy stays in the store.

::

    pending --claim--> in_flight --succeed--> succeeded
       ^                   |  \\--conflict--> conflict --retry/cancel
       |                   |   \\--fail-----> failed   --retry/cancel
       +--release / retry_later / hold--+
    pending, failed, conflict --cancel--> cancelled --retry--> pending
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import Connection, Select, Text, and_, cast, func, insert, literal, or_, select, update

from syncd.errors import ClaimLostError, ConfigError
from syncd.models import Device, change_row, history_values, one_line, parse_timestamp, preview, same_json
from syncd.store.details import RestrictionsAnswer, write_answers
from syncd.store.dialect import dialect_for
from syncd.store.schema import UTCDateTime, device_edits
from syncd.store.store import PageWriter, Store
from syncd.store.translate import translated


class EditStatus(StrEnum):
    """Where an edit is in its life (``device_edits.status``)."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CONFLICT = "conflict"
    CANCELLED = "cancelled"


S = EditStatus
# Every change of an edit's status: the statuses it may come from, and the one it goes to.
TRANSITIONS: dict[str, tuple[frozenset[EditStatus], EditStatus]] = {
    "claim": (frozenset({S.PENDING, S.IN_FLIGHT}), S.IN_FLIGHT),  # in_flight: its claimer's lease ran out
    "release": (frozenset({S.IN_FLIGHT}), S.PENDING),  # handed back untouched, the attempt not counted
    "succeed": (frozenset({S.IN_FLIGHT}), S.SUCCEEDED),
    "conflict": (frozenset({S.IN_FLIGHT}), S.CONFLICT),
    "fail": (frozenset({S.IN_FLIGHT}), S.FAILED),
    "retry_later": (frozenset({S.IN_FLIGHT}), S.PENDING),  # a transient failure: due again later
    "hold": (frozenset({S.IN_FLIGHT}), S.PENDING),  # not pushed now (a cap), the attempt not counted
    "retry": (frozenset({S.FAILED, S.CONFLICT, S.CANCELLED}), S.PENDING),  # an operator queues it again
    "cancel": (frozenset({S.PENDING, S.FAILED, S.CONFLICT}), S.CANCELLED),  # an operator drops it
}


@dataclass(frozen=True, slots=True)
class Edit:
    """One ``device_edits`` row, typed. A value the database holds but syncd cannot read (SQL can
    write anything into SQLite) is None and named in ``unreadable``."""

    id: int
    device_id: str
    org_id: str | None
    action: str
    payload: Any
    base: Any
    base_updated_at: datetime | None
    status: EditStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    remote: Any
    claimed_by: str | None
    claimed_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    applied_at: datetime | None
    requested_by: str | None
    sent_at: datetime | None = None
    credential_pointers: tuple[str, ...] = ()  # JSON Pointers (anything else a row holds is dropped)
    recheck: bool = False  # claimed again after its claimer's lease ran out
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SendCap:
    """At most ``limit`` edits of ``action`` sent within ``window`` (a write whose outcome is not
    known counts: it may have applied)."""

    action: str
    limit: int
    window: timedelta


@dataclass(frozen=True, slots=True)
class Held:
    """A send the cap refused: ``count`` sent within the window, the next slot in ``wait``."""

    count: int
    wait: timedelta


class UnreadablePayload(str):
    """A payload that is not valid JSON (only possible on SQLite, via plain SQL)."""


class EditQueue:
    """``device_edits``, for the CLI and the reconciler: one method per transition."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine = store.engine
        self._dialect = dialect_for(store.dialect)

    # -- reading and queuing -----------------------------------------------------------------------

    def add(self, values: dict[str, Any]) -> int:
        """Insert an edit (``pending``); returns its id."""
        with translated("queuing an edit"), self._engine.begin() as conn:
            return int(conn.execute(insert(device_edits).values(values).returning(device_edits.c.id)).scalar_one())

    def get(self, edit_id: int) -> Edit | None:
        """One edit, or None."""
        with translated("reading an edit"), self._engine.connect() as conn:
            row = conn.execute(_readable().where(device_edits.c.id == edit_id)).mappings().one_or_none()
            return _edit(row) if row else None

    def find(self, status: str | None = None, device_id: str | None = None) -> list[Edit]:
        """Edits, oldest first, optionally of one status and/or device."""
        query = _readable().order_by(device_edits.c.id)
        if status:
            query = query.where(device_edits.c.status == status)
        if device_id:
            query = query.where(device_edits.c.device_id == device_id)
        with translated("listing edits"), self._engine.connect() as conn:
            return [_edit(row) for row in conn.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        """Edits by status."""
        query = select(device_edits.c.status, func.count()).group_by(device_edits.c.status)
        with translated("counting edits"), self._engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    def oldest_pending(self) -> datetime | None:
        """When the oldest pending edit was queued (None when none is)."""
        query = select(func.min(device_edits.c.created_at)).where(device_edits.c.status == "pending")
        with translated("reading edits"), self._engine.connect() as conn:
            return conn.execute(query).scalar()

    # -- an operator's transitions -----------------------------------------------------------------

    def retry(self, edit_id: int, now: datetime) -> str:
        """Queue a failed, conflicting or cancelled edit again, its attempts reset; returns the status
        it had (ConfigError for an edit that does not exist or cannot be retried). A conflict's
        retry means "push it anyway": OpenApp's values it conflicted with become its base."""
        values: dict[str, Any] = {"attempts": 0, "next_attempt_at": None, "last_error": None, "remote": None}
        edit = self.get(edit_id)
        if edit is not None and edit.status is S.CONFLICT and isinstance(edit.remote, dict):
            seen = {f: v["remote"] for f, v in edit.remote.items() if isinstance(v, dict) and "remote" in v}
            values["base"] = {**(edit.base if isinstance(edit.base, dict) else {}), **seen}
        return self._operator("retry", edit_id, now, values)

    def cancel(self, edit_id: int, now: datetime, payload: Any = None) -> str:
        """Drop a pending, failed or conflicting edit; returns the status it had. ``payload``: what
        to keep instead of its payload (its credential values redacted, once it was sent)."""
        return self._operator("cancel", edit_id, now, {} if payload is None else {"payload": payload})

    def _operator(self, event: str, edit_id: int, now: datetime, values: dict[str, Any]) -> str:
        allowed = TRANSITIONS[event][0]
        with translated("updating an edit"), self._engine.begin() as conn:
            status = conn.execute(select(device_edits.c.status).where(device_edits.c.id == edit_id)).scalar()
            if status is None:
                raise ConfigError(f"there is no edit {edit_id}")
            if not _move(conn, edit_id, event, now, values):
                names = ", ".join(s.value for s in EditStatus if s in allowed)
                raise ConfigError(f"edit {edit_id} is {status}; {event} works on {names} edits")
        return str(status)

    # -- the reconciler's transitions --------------------------------------------------------------

    def claim(self, now: datetime, lease: timedelta, limit: int, instance: str) -> list[Edit]:
        """Mark due edits ``in_flight`` for this instance and return them.

        Due: ``pending`` with ``next_attempt_at`` passed, and no older unfinished edit of the same
        device (edits to one device apply in the order queued); or ``in_flight`` with an expired
        lease (its claimer died: ``recheck``). On PostgreSQL ``FOR UPDATE SKIP LOCKED`` keeps
        concurrent reconcilers from claiming the same edit.
        """
        e = device_edits
        older = device_edits.alias("older")
        blocked = (
            select(literal(1))
            .where(
                older.c.device_id == e.c.device_id, older.c.id < e.c.id, older.c.status.in_(("pending", "in_flight"))
            )
            .exists()
        )
        # A time written by hand that the database cannot read makes its row due, so it fails clearly.
        unreadable = self._dialect.unreadable_time(e.c.next_attempt_at)
        when = or_(e.c.next_attempt_at.is_(None), e.c.next_attempt_at <= now, unreadable)
        due = and_(e.c.status == "pending", when, ~blocked)
        with translated("claiming edits"), self._engine.begin() as conn:
            database_now = self._dialect.database_now(conn)  # leases: one clock for every host
            expired = e.c.claimed_at < database_now - lease
            stale = and_(e.c.status == "in_flight", or_(e.c.claimed_at.is_(None), expired))
            query = select(e.c.id, e.c.status).where(or_(due, stale)).order_by(e.c.id).limit(limit)
            query = self._dialect.lock_for_claim(query, e)
            picked = {row.id: row.status == "in_flight" for row in conn.execute(query)}
            if not picked:
                return []
            conn.execute(
                update(e)
                .where(e.c.id.in_(picked))
                .values(
                    status=S.IN_FLIGHT.value,
                    claimed_at=database_now,
                    claimed_by=instance,
                    attempts=e.c.attempts + 1,
                    updated_at=now,
                )
            )
            rows = conn.execute(_readable().where(e.c.id.in_(picked)).order_by(e.c.id)).mappings()
            return [_edit(row, recheck=picked[row["id"]]) for row in rows]

    def release(self, edit_ids: Iterable[int], now: datetime) -> None:
        """Hand claimed edits back untouched (the attempt is not counted)."""
        ids = list(edit_ids)
        if ids:
            with translated("releasing edits"), self._engine.begin() as conn:
                for edit_id in ids:
                    _move(conn, edit_id, "release", now, {"attempts": device_edits.c.attempts - 1})

    def succeed(
        self,
        edit: Edit,
        now: datetime,
        *,
        device: Device | None = None,
        change: tuple[str, dict[str, Any]] | None = None,
        restrictions: RestrictionsAnswer | None = None,
        rebase: Mapping[str, tuple[Any, Any]] | None = None,
        payload: Any = None,
        credentials: Iterable[str] = (),
    ) -> None:
        """The edit is done; in the same transaction the mirror takes OpenApp's answer.

        ``device``: the device as OpenApp now has it (``change``: ``(kind, diff)`` of the history row
        marked as a local edit). ``restrictions``: a portal's new door restrictions. ``rebase``:
        ``{field: (value before, value now)}``: later pending edits of the device queued on the value
        before get the value now as their base, so this edit is no conflict for them. ``payload``:
        what to keep instead of the payload pushed (credential values redacted).
        """
        values: dict[str, Any] = {"applied_at": now, "last_error": None, "last_status_code": 200, "remote": None}
        _note_credentials(values, edit, credentials)
        if payload is not None:
            values["payload"] = payload
        with self.store.writer() as writer:
            _move(writer.connection, edit.id, "succeed", now, values)
            if rebase:
                _rebase_later_edits(writer.connection, edit, rebase, now)
            if device is not None:
                _mirror_device(writer, edit.id, device, change, now)
            if restrictions is not None and device is not None:
                write_answers(writer.connection, device.org_id, now, [restrictions], edit_id=edit.id)

    def conflict(
        self,
        edit: Edit,
        now: datetime,
        message: str,
        fields: dict[str, Any],
        device: Device,
        credentials: Iterable[str] = (),
    ) -> None:
        """OpenApp changed what the edit sets since it was queued: nothing was pushed. ``fields``:
        per conflicting field its ``base``, ``remote`` and ``queued`` values. The mirror takes the device.
        ``credentials`` (here and in the other transitions): credential pointers found in its
        payload, recorded with the edit so that output masks them whatever the schema says later."""
        values = {"last_error": one_line(message, 2000), "remote": fields, "base_updated_at": device.updated_at}
        _note_credentials(values, edit, credentials)
        with self.store.writer() as writer:
            _move(writer.connection, edit.id, "conflict", now, values)
            _mirror_device(writer, edit.id, device, None, now)

    def fail(
        self,
        edit: Edit,
        now: datetime,
        reason: str,
        status_code: int | None = None,
        *,
        credentials: Iterable[str] = (),
        payload: Any = None,
    ) -> None:
        """The edit cannot be done (``reason``: one line, and it may quote a server). ``payload``:
        what to keep instead of the payload (its credential values redacted, once it was sent)."""
        values: dict[str, Any] = {"last_error": one_line(reason, 2000), "last_status_code": status_code}
        _note_credentials(values, edit, credentials)
        if payload is not None:
            values["payload"] = payload
        with translated("failing an edit"), self._engine.begin() as conn:
            _move(conn, edit.id, "fail", now, values)

    def retry_later(
        self,
        edit: Edit,
        now: datetime,
        at: datetime,
        error: str,
        status_code: int | None,
        credentials: Iterable[str] = (),
    ) -> None:
        """A transient failure: the edit is due again at ``at``."""
        values = {"next_attempt_at": at, "last_error": one_line(error, 2000), "last_status_code": status_code}
        _note_credentials(values, edit, credentials)
        with translated("rescheduling an edit"), self._engine.begin() as conn:
            _move(conn, edit.id, "retry_later", now, values)

    def hold(self, edit: Edit, now: datetime, until: datetime, reason: str, credentials: Iterable[str] = ()) -> None:
        """Not pushed now (``reason``, e.g. a cap), due again at ``until``; the attempt is not counted."""
        values = {
            "next_attempt_at": until,
            "last_error": one_line(reason, 2000),
            "attempts": device_edits.c.attempts - 1,
        }
        _note_credentials(values, edit, credentials)
        with translated("holding an edit"), self._engine.begin() as conn:
            _move(conn, edit.id, "hold", now, values)

    def sending(self, edit: Edit, cap: SendCap | None = None, credentials: Iterable[str] = ()) -> Held | None:
        """Record, before the request goes out, that the edit's write is being sent (``sent_at``, on
        the database's clock), with the ``credentials`` pointers it carries; or, when ``cap`` counts
        ``cap.limit`` other edits of its action sent within ``cap.window``, record nothing and say how
        long to wait. Count and record are one step for every syncd sharing the database (PostgreSQL:
        a lock for the transaction; SQLite: its one writer), so two reconcilers never both take the
        last slot. ClaimLostError when the edit is no longer this claimer's to send."""
        e = device_edits
        with self.store.transaction("recording a write about to be sent") as conn:
            if cap is not None:
                self._dialect.serialise(conn, f"syncd:sends:{cap.action}")
            now = self._dialect.database_now(conn)
            if cap is not None:
                count, first = conn.execute(
                    select(func.count(), func.min(e.c.sent_at, type_=UTCDateTime())).where(
                        e.c.action == cap.action, e.c.sent_at > now - cap.window, e.c.id != edit.id
                    )
                ).one()
                if count >= cap.limit:
                    return Held(int(count), max(timedelta(0), (first or now) + cap.window - now))
            values: dict[str, Any] = {"sent_at": now}
            _note_credentials(values, edit, credentials)
            sent = conn.execute(
                update(e)
                .where(e.c.id == edit.id, e.c.status == S.IN_FLIGHT.value, e.c.claimed_by == edit.claimed_by)
                .values(values)
            ).rowcount
            if not sent:
                raise ClaimLostError(f"edit {edit.id} is no longer claimed by this reconciler; it was not sent")
        return None


def _note_credentials(values: dict[str, Any], edit: Edit, credentials: Iterable[str]) -> None:
    """Add the pointers of ``credentials`` the edit does not record yet to the ``values`` written."""
    found = set(credentials) - set(edit.credential_pointers)
    if found:
        values["credential_pointers"] = sorted({*edit.credential_pointers, *found})


def _move(conn: Connection, edit_id: int, event: str, now: datetime, values: Mapping[str, Any]) -> bool:
    """Apply one transition of :data:`TRANSITIONS` to an edit in its allowed statuses; False when
    the edit is not in one of them (another reconciler or an operator moved it meanwhile)."""
    allowed, target = TRANSITIONS[event]
    e = device_edits
    changed = {**values, "status": target.value, "updated_at": now}
    if target is not S.IN_FLIGHT:
        changed.update(claimed_at=None)
    statement = update(e).where(e.c.id == edit_id, e.c.status.in_([s.value for s in allowed])).values(changed)
    return bool(conn.execute(statement).rowcount)


def _rebase_later_edits(conn: Connection, edit: Edit, rebase: Mapping[str, tuple[Any, Any]], now: datetime) -> None:
    e = device_edits
    later = conn.execute(
        select(e.c.id, cast(e.c.base, Text)).where(
            e.c.device_id == edit.device_id, e.c.id > edit.id, e.c.status == "pending"
        )
    ).all()
    for edit_id, text in later:
        try:
            base = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(base, dict):
            continue
        moved = {f: new for f, (old, new) in rebase.items() if f in base and same_json(base[f], old)}
        if moved:
            conn.execute(update(e).where(e.c.id == edit_id).values(base={**base, **moved}, updated_at=now))


def _mirror_device(
    writer: PageWriter, edit_id: int, device: Device, change: tuple[str, dict[str, Any]] | None, now: datetime
) -> None:
    if writer.previous([device.id]):
        writer.update_devices([device], now)
    else:
        writer.insert_devices([device], now)
    if change is not None:
        kind, diff = change
        writer.add_changes(
            [change_row(device.id, device.org_id, now, kind, diff, history_values(device), edit_id=edit_id)]
        )


_JSON = ("payload", "base", "remote", "credential_pointers")
_AS_TEXT = (*_JSON, *(c.name for c in device_edits.c if isinstance(c.type, UTCDateTime)))


def _readable() -> Select[Any]:
    """device_edits with the JSON and time columns as text, so one bad row (SQL writes anything into
    SQLite) cannot break a read of many; :func:`_edit` reads them."""
    e = device_edits
    return select(*(cast(c, Text).label(c.name) if c.name in _AS_TEXT else c for c in e.c))


def _edit(row: Mapping[Any, Any], recheck: bool = False) -> Edit:
    """A row as an :class:`Edit`. A payload that is not JSON stays an :class:`UnreadablePayload`."""
    values = dict(row)
    unreadable: list[str] = []
    for column in _JSON:
        text = values[column]
        if text is None:
            continue
        try:
            values[column] = orjson.loads(text)
        except orjson.JSONDecodeError:
            values[column] = UnreadablePayload(text) if column == "payload" else None
    for column in _AS_TEXT[len(_JSON) :]:
        text = values[column]
        try:
            values[column] = parse_timestamp(text)
        except ValueError:
            values[column] = None
            unreadable.append(f"{column} {preview(text)} is not a timestamp")
    values["status"] = EditStatus(values["status"])
    pointers = values["credential_pointers"]
    values["credential_pointers"] = tuple(
        p for p in (pointers if isinstance(pointers, list) else ()) if isinstance(p, str) and p.startswith("/")
    )
    return Edit(**values, recheck=recheck, unreadable=tuple(unreadable))
