"""The write-back queue (``device_edits``): queue, claim, finish. SQLAlchemy stays in the store."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Select, Text, and_, cast, func, insert, literal, or_, select, update

from syncd.errors import ConfigError
from syncd.models import Device, one_line, parse_timestamp, preview
from syncd.store.dialect import dialect_for
from syncd.store.schema import UTCDateTime, device_edits
from syncd.store.store import Store
from syncd.store.translate import translated

RETRYABLE_STATUSES = ("failed", "conflict", "cancelled")  # what `syncd edits retry` queues again
CANCELLABLE_STATUSES = ("pending", "failed", "conflict")  # what `syncd edits cancel` drops


class EditQueue:
    """``device_edits`` rows, for the CLI and the reconciler."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine = store.engine
        self._dialect = dialect_for(store.dialect)

    def add(self, values: dict[str, Any]) -> int:
        """Insert an edit; returns its id."""
        with translated("queuing an edit"), self._engine.begin() as conn:
            return int(conn.execute(insert(device_edits).values(values).returning(device_edits.c.id)).scalar_one())

    def get(self, edit_id: int) -> dict[str, Any] | None:
        """One edit as a dict, or None."""
        with translated("reading an edit"), self._engine.connect() as conn:
            row = conn.execute(_readable().where(device_edits.c.id == edit_id)).mappings().one_or_none()
            return _decoded(row) if row else None

    def find(self, status: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
        """Edits, oldest first, optionally of one status and/or device."""
        query = _readable().order_by(device_edits.c.id)
        if status:
            query = query.where(device_edits.c.status == status)
        if device_id:
            query = query.where(device_edits.c.device_id == device_id)
        with translated("listing edits"), self._engine.connect() as conn:
            return [_decoded(row) for row in conn.execute(query).mappings()]

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

    def retry(self, edit_id: int, now: datetime) -> str:
        """Queue a failed, conflicting or cancelled edit again, its attempts reset; returns the status
        it had (ConfigError for an edit that does not exist or cannot be retried)."""
        values = {"status": "pending", "attempts": 0, "next_attempt_at": None, "last_error": None}
        return self._transition(edit_id, "retry", RETRYABLE_STATUSES, {**values, "updated_at": now})

    def cancel(self, edit_id: int, now: datetime) -> str:
        """Drop a pending, failed or conflicting edit; returns the status it had."""
        return self._transition(edit_id, "cancel", CANCELLABLE_STATUSES, {"status": "cancelled", "updated_at": now})

    def _transition(self, edit_id: int, change: str, allowed: Sequence[str], values: dict[str, Any]) -> str:
        with translated("updating an edit"), self._engine.begin() as conn:
            status = conn.execute(select(device_edits.c.status).where(device_edits.c.id == edit_id)).scalar()
            if status is None:
                raise ConfigError(f"there is no edit {edit_id}")
            updated = conn.execute(
                update(device_edits)
                .where(device_edits.c.id == edit_id, device_edits.c.status.in_(allowed))
                .values(values)
            ).rowcount
        if not updated:
            raise ConfigError(f"edit {edit_id} is {status}; {change} works on {', '.join(allowed)} edits")
        return str(status)

    def claim(self, now: datetime, lease_cutoff: datetime, limit: int, instance: str) -> list[dict[str, Any]]:
        """Mark due edits ``in_flight`` for this instance and return them (with ``recheck``).

        Due: ``pending`` with ``next_attempt_at`` passed, and no older unfinished edit of the same
        device (edits to one device apply in the order queued); or ``in_flight`` with an expired
        lease (its claimer died: ``recheck`` is True). On PostgreSQL ``FOR UPDATE SKIP LOCKED`` keeps
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
        stale = and_(e.c.status == "in_flight", or_(e.c.claimed_at.is_(None), e.c.claimed_at < lease_cutoff))
        query = select(e.c.id, e.c.status).where(or_(due, stale)).order_by(e.c.id).limit(limit)
        query = self._dialect.lock_for_claim(query, e)
        with translated("claiming edits"), self._engine.begin() as conn:
            picked = {row.id: row.status == "in_flight" for row in conn.execute(query)}
            if not picked:
                return []
            conn.execute(
                update(e)
                .where(e.c.id.in_(picked))
                .values(
                    status="in_flight", claimed_at=now, claimed_by=instance, attempts=e.c.attempts + 1, updated_at=now
                )
            )
            rows = conn.execute(_readable().where(e.c.id.in_(picked)).order_by(e.c.id)).mappings()
            return [{**_decoded(row), "recheck": picked[row["id"]]} for row in rows]

    def release(self, edit_ids: Iterable[int], now: datetime) -> None:
        """Hand claimed edits back untouched (the attempt is not counted)."""
        ids = list(edit_ids)
        if ids:
            e = device_edits
            with translated("releasing edits"), self._engine.begin() as conn:
                conn.execute(
                    update(e)
                    .where(e.c.id.in_(ids), e.c.status == "in_flight")
                    .values(
                        status="pending", attempts=e.c.attempts - 1, claimed_at=None, claimed_by=None, updated_at=now
                    )
                )

    def finish(
        self,
        edit_id: int,
        values: dict[str, Any],
        now: datetime,
        device: Device | None = None,
        change: tuple[str, dict[str, Any] | None] | None = None,
        rebase_from: datetime | None = None,
    ) -> None:
        """Record an attempt's result; with ``device``, update the mirror in the same transaction.

        ``change``: ``(kind, diff)`` of a device_changes row marked as a local edit.
        ``rebase_from``: the remote ``updated_at`` this edit overwrote. Later pending edits of the
        device queued on that state (or an older one) are re-based onto ``device.updated_at``, so
        this edit's own change does not count as a conflict for them.
        """
        e = device_edits
        if values.get("last_error"):  # it may quote a server: one line, and nothing a database refuses
            values = {**values, "last_error": one_line(values["last_error"], 2000)}
        with self.store.writer() as writer:
            writer.execute(update(e).where(e.c.id == edit_id).values({**values, "updated_at": now, "claimed_at": None}))
            if device is not None and rebase_from is not None and device.updated_at is not None:
                writer.execute(
                    update(e)
                    .where(
                        e.c.device_id == device.id,
                        e.c.id > edit_id,
                        e.c.status == "pending",
                        e.c.base_updated_at >= rebase_from,
                    )
                    .values(base_updated_at=device.updated_at)
                )
            if device is not None:
                if writer.previous([device.id]):
                    writer.update_devices([device], now)
                else:
                    writer.insert_devices([device], now)
            if change is not None and device is not None:
                kind, diff = change
                writer.add_changes(
                    [
                        {
                            "device_id": device.id,
                            "org_id": device.org_id,
                            "run_id": None,
                            "observed_at": now,
                            "change": kind,
                            "diff": diff,
                            "source": "local_edit",
                            "edit_id": edit_id,
                        }
                    ]
                )


class UnreadablePayload(str):
    """A payload that is not valid JSON (only possible on SQLite, via plain SQL)."""


_AS_TEXT = ("payload", "remote", *(c.name for c in device_edits.c if isinstance(c.type, UTCDateTime)))


def _readable() -> Select[Any]:
    """device_edits with the JSON and time columns as text, so one bad row (SQL writes anything into
    SQLite) cannot break a read of many; :func:`_decoded` reads them."""
    e = device_edits
    return select(*(cast(c, Text).label(c.name) if c.name in _AS_TEXT else c for c in e.c))


def _decoded(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An edit as a dict. A value that cannot be read is None, named in ``unreadable``
    (a payload that is not JSON stays an :class:`UnreadablePayload`)."""
    values = dict(row)
    values["unreadable"] = []
    for column in ("payload", "remote"):
        text = values[column]
        if text is None:
            continue
        try:
            values[column] = orjson.loads(text)
        except orjson.JSONDecodeError:
            values[column] = UnreadablePayload(text)
    for column in _AS_TEXT[2:]:
        text = values[column]
        try:
            values[column] = parse_timestamp(text)
        except ValueError:
            values[column] = None
            values["unreadable"].append(f"{column} {preview(text)} is not a timestamp")
    return values
