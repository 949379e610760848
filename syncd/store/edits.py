"""The write-back queue (``device_edits``): the typed edit, its statuses and every allowed
transition (one table), and the queue, one method per transition. SQLAlchemy stays in the store.

::

    awaiting_approval --approve--> pending   (--reject--> rejected, --expire/cancel--> cancelled)
          ^                           |
          +-------await_approval------+  (a kind that needs an approval it has not got)
    pending --claim--> in_flight --succeed--> succeeded
       ^                   |  \\--conflict--> conflict --retry/cancel
       |                   |   \\--fail-----> failed   --retry/cancel
       +--release / retry_later / hold--+
    pending, failed, conflict, awaiting_approval --cancel--> cancelled --retry--> pending
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Text,
    and_,
    cast,
    func,
    insert,
    literal,
    or_,
    outerjoin,
    select,
    true,
    update,
)

from syncd.errors import ClaimLostError, ConfigError
from syncd.models import Device, history_row, one_line, parse_timestamp, preview, same_json
from syncd.store.details import RestrictionsAnswer, write_answers
from syncd.store.dialect import dialect_for
from syncd.store.schema import UTCDateTime, device_edits, devices
from syncd.store.store import PageWriter, Store
from syncd.vocab import ChangeKind, EditSource, EditStatus, HoldReason

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
    "cancel": (frozenset({S.PENDING, S.FAILED, S.CONFLICT, S.AWAITING_APPROVAL}), S.CANCELLED),  # an operator drops it
    # Two-person approval (writeback.require_approval lists the edit's kind):
    # a pending edit of such a kind without an approval (inserted by SQL, retried, or the configuration
    # changed) waits; in_flight: its claimer's lease ran out before it was sent.
    "await_approval": (frozenset({S.PENDING, S.IN_FLIGHT}), S.AWAITING_APPROVAL),
    # another person approves (pending: one not yet seen awaiting); an approval made in SQL moves it too
    "approve": (frozenset({S.AWAITING_APPROVAL, S.PENDING}), S.PENDING),
    "reject": (frozenset({S.AWAITING_APPROVAL, S.PENDING}), S.REJECTED),  # another person says no: for good
    "expire": (frozenset({S.AWAITING_APPROVAL}), S.CANCELLED),  # no approval within writeback.approval_ttl
}
# An edit that may still be pushed: a later edit of the same device waits behind it.
UNFINISHED = (S.PENDING.value, S.IN_FLIGHT.value, S.AWAITING_APPROVAL.value)


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
    requested_via: str = EditSource.SQL
    requested_at: datetime | None = None
    approval_requested_at: datetime | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    rejected_by: str | None = None
    rejected_at: datetime | None = None
    reason: str | None = None
    held_by: HoldReason | None = None  # set with the last_error of a hold, cleared with the next one written
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


@dataclass(frozen=True, slots=True)
class Approvals:
    """What one enforcement of the approval rules changed: edits moved to ``awaiting`` approval,
    edits approved in SQL moved to ``approved`` (pending), and the ids of those that ``expired``."""

    awaiting: int = 0
    approved: int = 0
    expired: tuple[int, ...] = ()


def person(who: str | None) -> str:
    """The person a ``requested_by`` / ``approved_by`` names: ``alice@ops-1`` (the CLI's user@host)
    and ``alice`` (a PostgreSQL role) are the same person. Migration 0009's ``syncd_person`` is the
    same rule in SQL."""
    text = (who or "").strip()
    user, at, _ = text.rpartition("@")
    return (user if at else text).lower()


class UnreadablePayload(str):
    """A payload that is not valid JSON (only possible on SQLite, via plain SQL)."""


class EditQueue:
    """``device_edits``, for the CLI and the reconciler: one method per transition."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._dialect = dialect_for(store.dialect)

    # -- reading and queuing -----------------------------------------------------------------------

    def add(self, values: dict[str, Any], *, awaiting_approval: bool = False) -> int:
        """Insert an edit (``pending``, or ``awaiting_approval`` from now on the database's clock);
        returns its id."""
        if awaiting_approval:
            values = {
                **values,
                "status": S.AWAITING_APPROVAL.value,
                "approval_requested_at": func.current_timestamp(),
            }
        with self.store.transaction("queuing an edit") as conn:
            return int(conn.execute(insert(device_edits).values(values).returning(device_edits.c.id)).scalar_one())

    def get(self, edit_id: int) -> Edit | None:
        """One edit, or None."""
        with self.store.reading("reading an edit") as conn:
            row = conn.execute(_readable().where(device_edits.c.id == edit_id)).mappings().one_or_none()
            return _edit(row) if row else None

    def find(self, status: str | None = None, device_id: str | None = None) -> list[Edit]:
        """Edits, oldest first, optionally of one status and/or device."""
        query = _readable().order_by(device_edits.c.id)
        if status:
            query = query.where(device_edits.c.status == status)
        if device_id:
            query = query.where(device_edits.c.device_id == device_id)
        with self.store.reading("listing edits") as conn:
            return [_edit(row) for row in conn.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        """Edits by status."""
        query = select(device_edits.c.status, func.count()).group_by(device_edits.c.status)
        with self.store.reading("counting edits") as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    def oldest_pending(self) -> datetime | None:
        """When the oldest pending edit was queued (None when none is)."""
        query = select(func.min(device_edits.c.created_at)).where(device_edits.c.status == S.PENDING.value)
        with self.store.reading("reading edits") as conn:
            return conn.execute(query).scalar()

    def awaiting_approval(self) -> dict[str, tuple[int, float]]:
        """Per org (the mirror's org of the device, else the row's; ``""``: neither): edits awaiting
        approval, and how long the oldest has waited in seconds, on the database's clock."""
        e = device_edits
        org = func.coalesce(devices.c.org_id, e.c.org_id, "")
        query = (
            select(org, func.count(), func.min(e.c.approval_requested_at, type_=UTCDateTime()))
            .select_from(outerjoin(e, devices, devices.c.id == e.c.device_id))
            .where(e.c.status == S.AWAITING_APPROVAL.value)
            .group_by(org)
        )
        with self.store.reading("reading edits") as conn:
            now = self._dialect.database_now(conn)
            return {
                str(org_id): (int(n), max(0.0, (now - since).total_seconds()) if since else 0.0)
                for org_id, n, since in conn.execute(query)
            }

    # -- an operator's transitions -----------------------------------------------------------------

    def retry(self, edit_id: int, now: datetime, needs_approval: Collection[str] = ()) -> str:
        """Queue a failed, conflicting or cancelled edit again, its attempts reset; returns the status
        it had (ConfigError for an edit that does not exist or cannot be retried). A conflict's
        retry means "push it anyway": OpenApp's values it conflicted with become its base. An edit
        of a kind in ``needs_approval`` needs a new approval: it awaits one again."""
        values: dict[str, Any] = {
            "attempts": 0,
            "next_attempt_at": None,
            "last_error": None,
            "remote": None,
            "reason": None,
        }
        edit = self.get(edit_id)
        if edit is not None and edit.status is S.CONFLICT and isinstance(edit.remote, dict):
            seen = {f: v["remote"] for f, v in edit.remote.items() if isinstance(v, dict) and "remote" in v}
            values["base"] = {**(edit.base if isinstance(edit.base, dict) else {}), **seen}
        renewed = edit is not None and edit.action in needs_approval
        if renewed:
            values.update(approved_by=None, approved_at=None)
        with self.store.transaction("updating an edit") as conn:
            was = self._operator(conn, "retry", edit_id, now, values)
            if renewed:
                database_now = self._dialect.database_now(conn)
                _move(conn, edit_id, "await_approval", now, {"approval_requested_at": database_now})
        return was

    def cancel(self, edit_id: int, now: datetime, payload: Any = None) -> str:
        """Drop a pending, failed, conflicting or awaiting edit; returns the status it had.
        ``payload``: what to keep instead of its payload (its credential values redacted, once it
        was sent)."""
        with self.store.transaction("updating an edit") as conn:
            return self._operator(conn, "cancel", edit_id, now, {} if payload is None else {"payload": payload})

    def approve(self, edit_id: int, approver: str, now: datetime, needs_approval: Collection[str]) -> str:
        """Record ``approver``'s approval (``approved_at`` on the database's clock): the edit is
        pending, to be pushed. ConfigError when it does not await an approval (its kind is not in
        ``needs_approval``, it is approved already, or its status is another) or when the approver
        is the person who requested it. Returns the status it had."""
        with self.store.transaction("approving an edit") as conn:
            edit = self._undecided(conn, edit_id, "approve", needs_approval)
            if person(approver) == person(edit.requested_by):
                raise ConfigError(
                    f"edit {edit_id} was requested by {edit.requested_by}: it needs the approval of another "
                    "person (two-person rule)"
                )
            values = {"approved_by": approver, "approved_at": self._dialect.database_now(conn)}
            return self._operator(conn, "approve", edit_id, now, values, device_edits.c.approved_at.is_(None))

    def reject(self, edit_id: int, rejecter: str, reason: str, now: datetime, needs_approval: Collection[str]) -> str:
        """Record ``rejecter``'s refusal with its ``reason``: the edit is ``rejected`` for good.
        ConfigError as for :meth:`approve` (the requester withdraws an edit with cancel instead)."""
        with self.store.transaction("rejecting an edit") as conn:
            edit = self._undecided(conn, edit_id, "reject", needs_approval)
            if person(rejecter) == person(edit.requested_by):
                raise ConfigError(
                    f"edit {edit_id} was requested by {edit.requested_by}: the requester withdraws it with "
                    f"`syncd edits cancel {edit_id}`; a rejection is another person's"
                )
            values = {
                "rejected_by": rejecter,
                "rejected_at": self._dialect.database_now(conn),
                "reason": one_line(reason, 2000),
            }
            return self._operator(conn, "reject", edit_id, now, values, device_edits.c.approved_at.is_(None))

    def _undecided(self, conn: Connection, edit_id: int, event: str, needs_approval: Collection[str]) -> Edit:
        """The edit, if it awaits a person's decision (ConfigError naming why it does not)."""
        row = conn.execute(_readable().where(device_edits.c.id == edit_id)).mappings().one_or_none()
        if row is None:
            raise ConfigError(f"there is no edit {edit_id}")
        edit = _edit(row)
        if edit.approved_at is not None:
            when = edit.approved_at.isoformat(timespec="seconds")
            raise ConfigError(f"edit {edit_id} was approved already, by {edit.approved_by} at {when}")
        if edit.status is S.PENDING and edit.action not in needs_approval:
            raise ConfigError(
                f"edit {edit_id} needs no approval: writeback.require_approval does not list {edit.action}"
            )
        if edit.status not in TRANSITIONS[event][0]:
            raise ConfigError(f"edit {edit_id} is {edit.status.value}; {event} works on edits awaiting approval")
        return edit

    def _operator(
        self,
        conn: Connection,
        event: str,
        edit_id: int,
        now: datetime,
        values: dict[str, Any],
        *where: ColumnElement[bool],
    ) -> str:
        allowed = TRANSITIONS[event][0]
        status = conn.execute(select(device_edits.c.status).where(device_edits.c.id == edit_id)).scalar()
        if status is None:
            raise ConfigError(f"there is no edit {edit_id}")
        if not _move(conn, edit_id, event, now, values, *where):
            names = ", ".join(s.value for s in EditStatus if s in allowed)
            raise ConfigError(f"edit {edit_id} is {status}; {event} works on {names} edits")
        return str(status)

    # -- the approval rules, enforced by every reconciler round ------------------------------------

    def enforce_approval(self, needs_approval: Collection[str], ttl: timedelta, lease: timedelta) -> Approvals:
        """Apply the approval rules to the whole queue, on the database's clock: an edit of a kind in
        ``needs_approval`` without an approval awaits one (pending, or in flight with its lease run
        out); one approved in SQL is pending; one that awaited longer than ``ttl`` is cancelled with
        the reason. (The claim never takes an unapproved edit of such a kind either.)"""
        e = device_edits
        with self.store.transaction("enforcing approvals") as conn:
            now = self._dialect.database_now(conn)
            since = func.coalesce(e.c.approval_requested_at, e.c.requested_at)
            late = and_(e.c.approved_at.is_(None), since < now - ttl)
            expired = [
                row.id for row in conn.execute(select(e.c.id).where(e.c.status == S.AWAITING_APPROVAL.value, late))
            ]
            if expired:
                reason = (
                    f"cancelled: nobody approved it within writeback.approval_ttl ({_duration(ttl)}); "
                    "`syncd edits retry ID` asks for an approval again"
                )
                _apply(conn, "expire", now, {"reason": reason}, late, e.c.id.in_(expired))
            approved = _apply(
                conn, "approve", now, {}, e.c.status == S.AWAITING_APPROVAL.value, e.c.approved_at.is_not(None)
            )
            awaiting = 0
            if needs_approval:
                lease_over = or_(e.c.claimed_at.is_(None), e.c.claimed_at < now - lease)
                awaiting = _apply(
                    conn,
                    "await_approval",
                    now,
                    {"approval_requested_at": now},
                    e.c.action.in_(list(needs_approval)),
                    e.c.approved_at.is_(None),
                    or_(e.c.status == S.PENDING.value, lease_over),
                )
        return Approvals(awaiting, approved, tuple(expired))

    # -- the reconciler's transitions --------------------------------------------------------------

    def claim(
        self, now: datetime, lease: timedelta, limit: int, instance: str, needs_approval: Collection[str] = ()
    ) -> list[Edit]:
        """Mark due edits ``in_flight`` for this instance and return them.

        Due: ``pending`` with ``next_attempt_at`` passed, and no older unfinished edit of the same
        device (edits to one device apply in the order queued); or ``in_flight`` with an expired
        lease (its claimer died: ``recheck``). Never an edit of a kind in ``needs_approval`` that
        has no approval, whatever its status says (a row inserted by SQL as ``pending``). On
        PostgreSQL ``FOR UPDATE SKIP LOCKED`` keeps concurrent reconcilers from claiming the same edit.
        """
        e = device_edits
        older = device_edits.alias("older")
        blocked = (
            select(literal(1))
            .where(older.c.device_id == e.c.device_id, older.c.id < e.c.id, older.c.status.in_(UNFINISHED))
            .exists()
        )
        # A time written by hand that the database cannot read makes its row due, so it fails clearly.
        unreadable = self._dialect.unreadable_time(e.c.next_attempt_at)
        when = or_(e.c.next_attempt_at.is_(None), e.c.next_attempt_at <= now, unreadable)
        due = and_(e.c.status == S.PENDING.value, when, ~blocked)
        allowed: ColumnElement[bool] = true()
        if needs_approval:
            allowed = or_(e.c.action.not_in(list(needs_approval)), e.c.approved_at.is_not(None))
        with self.store.transaction("claiming edits") as conn:
            database_now = self._dialect.database_now(conn)  # leases: one clock for every host
            expired = e.c.claimed_at < database_now - lease
            stale = and_(e.c.status == S.IN_FLIGHT.value, or_(e.c.claimed_at.is_(None), expired))
            query = select(e.c.id, e.c.status).where(or_(due, stale), allowed).order_by(e.c.id).limit(limit)
            query = self._dialect.lock_for_claim(query, e)
            picked = {row.id: row.status == S.IN_FLIGHT for row in conn.execute(query)}
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
            with self.store.transaction("releasing edits") as conn:
                for edit_id in ids:
                    _move(conn, edit_id, "release", now, {"attempts": device_edits.c.attempts - 1})

    def succeed(
        self,
        edit: Edit,
        now: datetime,
        *,
        device: Device | None = None,
        change: tuple[ChangeKind, dict[str, Any]] | None = None,
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
            provenance = {"requested_by": edit.requested_by, "approved_by": edit.approved_by}
            if device is not None:
                _mirror_device(writer, edit.id, device, change, now, provenance)
            if restrictions is not None and device is not None:
                write_answers(writer, device.org_id, now, [restrictions], edit_id=edit.id, provenance=provenance)

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
            _mirror_device(writer, edit.id, device, None, now, {})

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
        with self.store.transaction("failing an edit") as conn:
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
        with self.store.transaction("rescheduling an edit") as conn:
            _move(conn, edit.id, "retry_later", now, values)

    def hold(self, edit: Edit, now: datetime, until: datetime, reason: str, credentials: Iterable[str] = ()) -> None:
        """Not pushed now: its kind's cap on sends is reached (``held_by`` send_cap, ``reason`` in
        its last error); due again at ``until``; the attempt is not counted."""
        values = {
            "next_attempt_at": until,
            "last_error": one_line(reason, 2000),
            "held_by": HoldReason.SEND_CAP.value,
            "attempts": device_edits.c.attempts - 1,
        }
        _note_credentials(values, edit, credentials)
        with self.store.transaction("holding an edit") as conn:
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


def _move(
    conn: Connection, edit_id: int, event: str, now: datetime, values: Mapping[str, Any], *where: ColumnElement[bool]
) -> bool:
    """Apply one transition of :data:`TRANSITIONS` to an edit in its allowed statuses (and ``where``);
    False when the edit is not in one of them (another reconciler or an operator moved it meanwhile)."""
    return bool(_apply(conn, event, now, values, device_edits.c.id == edit_id, *where))


def _apply(conn: Connection, event: str, now: datetime, values: Mapping[str, Any], *where: ColumnElement[bool]) -> int:
    """Apply one transition of :data:`TRANSITIONS` to every edit in its allowed statuses that
    matches ``where``; how many it moved."""
    allowed, target = TRANSITIONS[event]
    e = device_edits
    changed = {**values, "status": target.value, "updated_at": now}
    if "last_error" in values:  # a hold's reason goes with its message: another message ends the hold
        changed.setdefault("held_by", None)
    if target is not S.IN_FLIGHT:
        changed.update(claimed_at=None)
    statement = update(e).where(e.c.status.in_([s.value for s in allowed]), *where).values(changed)
    return int(conn.execute(statement).rowcount)


def _duration(span: timedelta) -> str:
    """``7d``, ``36h``, ``90m``, ``45s``: the largest whole unit."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _rebase_later_edits(conn: Connection, edit: Edit, rebase: Mapping[str, tuple[Any, Any]], now: datetime) -> None:
    e = device_edits
    later = conn.execute(
        select(e.c.id, cast(e.c.base, Text)).where(
            e.c.device_id == edit.device_id,
            e.c.id > edit.id,
            e.c.status.in_((S.PENDING.value, S.AWAITING_APPROVAL.value)),
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
    writer: PageWriter,
    edit_id: int,
    device: Device,
    change: tuple[ChangeKind, dict[str, Any]] | None,
    now: datetime,
    provenance: Mapping[str, str | None],
) -> None:
    if writer.previous([device.id]):
        writer.update_devices([device], now)
    else:
        writer.insert_devices([device], now)
    writer.bump_generation(device.org_id)  # the list pages recorded before do not show this write
    if change is not None:
        kind, diff = change
        writer.add_history(
            [
                history_row(
                    device.id,
                    device.org_id,
                    now,
                    kind,
                    diff,
                    device,
                    edit_id=edit_id,
                    provenance=provenance,
                )
            ]
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
    values["held_by"] = HoldReason(values["held_by"]) if values["held_by"] else None
    pointers = values["credential_pointers"]
    values["credential_pointers"] = tuple(
        p for p in (pointers if isinstance(pointers, list) else ()) if isinstance(p, str) and p.startswith("/")
    )
    return Edit(**values, recheck=recheck, unreadable=tuple(unreadable))
