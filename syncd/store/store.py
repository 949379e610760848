"""Reads and writes of the mirror. Database errors become :class:`StoreError` (in :mod:`.translate`);
each database's own SQL and settings are in :mod:`.dialect`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine, func, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.sql import ColumnElement, Executable

from syncd.errors import ConfigError, SchemaOutdatedError, StoreError
from syncd.models import HISTORY_FIELDS, Device, HistoryRow, PageRecord, PageShape, one_line
from syncd.store.dialect import Dialect, KnownDevice, dialect_for
from syncd.store.locks import OrgLease, OrgLocks
from syncd.store.schema import (
    SCHEMA_REVISION,
    UTCDateTime,
    device_changes,
    devices,
    door_access_intervals,
    list_pages,
    org_generations,
    sync_runs,
)
from syncd.store.statistics import PlannerStatistics
from syncd.store.translate import translated
from syncd.vocab import DeviceState, RunStatus, RunTrigger

__all__ = ["KnownDevice", "PageReader", "PageWriter", "Session", "Store", "normalise_url", "redact_url"]


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (SQLAlchemy would pick psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# Waits before each try of a run's bookkeeping after a failure: about 8 s, a PostgreSQL restart.
BOOKKEEPING_RETRIES = (0.5, 2.0, 5.0)


class Store:
    """The mirror database (SQLite file or PostgreSQL).

    ``read_only``: for commands that only look (``syncd status``). Every transaction is read-only;
    on SQLite the file is opened read-only, so it is never created and never write-locked.
    ``create=False``: a mirror that is not there is refused (SchemaOutdatedError), not made: no SQLite
    file is created, and :meth:`prepare` does not lay a schema on an empty database.
    """

    def __init__(self, url: str, *, read_only: bool = False, create: bool = True) -> None:
        self.url = normalise_url(url)
        self.read_only = read_only
        self.create = create and not read_only
        try:
            parsed = make_url(self.url)
        except ArgumentError as exc:
            raise ConfigError(f"database.url {redact_url(url)!r} is not usable: {exc}") from None
        self._dialect: Dialect = dialect_for(parsed.get_backend_name())
        engine_url, connect_args = self._dialect.engine_url(parsed, read_only, self.create)
        try:
            self.engine: Engine = create_engine(
                engine_url,
                json_serializer=_json_dumps,
                json_deserializer=orjson.loads,
                pool_pre_ping=self._dialect.pre_ping,
                connect_args=connect_args,
            )
        except (ArgumentError, ImportError, ValueError) as exc:
            raise ConfigError(f"database.url {redact_url(url)!r} is not usable: {exc}") from None
        self._dialect.tune(self.engine, read_only)
        sqlite_path = self._dialect.lock_base(parsed)
        self.locks = OrgLocks(self.engine, self._dialect, sqlite_path)
        # SQLite has one writer at a time. Threads of this process queue here for their turn instead
        # of in SQLite's busy handler, which sleeps up to 100 ms between tries: every write, and
        # every transaction that takes SQLite's write lock, is in this turn (Store.transaction,
        # Session.writer / transaction); reads are not (Store.reading, Session.reader).
        self._write_turn: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._dialect.one_writer else contextlib.nullcontext()
        )
        self.statistics = PlannerStatistics(self._dialect) if self._dialect.keeps_statistics else None
        # Results of runs that could not be recorded when they ended; written before the next run starts.
        self._unrecorded: dict[int, dict[str, Any]] = {}
        self._unrecorded_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    @classmethod
    def check_access(cls, url: str) -> None:
        """ConfigError (or StoreError) naming what keeps syncd from using the mirror at ``url``: for
        SQLite a missing or read-only directory or file (checked, nothing is created), for PostgreSQL
        a server it cannot reach or log in to."""
        if not cls.check_location(url):
            return
        store = cls(url)
        try:
            store.check_connection()
        finally:
            store.close()

    @staticmethod
    def check_location(url: str) -> bool:
        """The part of :meth:`check_access` done without connecting (SQLite: the folder and the
        file); whether a connection must be tried too (:meth:`check_connection`)."""
        parsed = make_url(normalise_url(url))
        return dialect_for(parsed.get_backend_name()).needs_connection_check(parsed)

    def check_connection(self) -> None:
        """StoreError naming why this store cannot connect; the connection stays in its pool."""
        with self.reading(f"connecting to {redact_url(self.url)}") as conn:
            conn.execute(text("SELECT 1"))

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._dialect.name

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    # -- schema ----------------------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision``."""
        from syncd.store import migrate  # Alembic is only loaded when there is something to migrate

        with self.transaction("upgrading the schema") as conn:
            migrate.upgrade(conn, revision)

    def schema_revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        with self.reading(f"connecting to {redact_url(self.url)}") as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def prepare(self, auto_upgrade: bool) -> None:
        """Make sure the schema is current: upgrade it, or refuse to run on an old one.

        A read-only store never upgrades, nor does a store not allowed to ``create`` lay a schema on
        an empty database: each names what to run instead.
        """
        head = SCHEMA_REVISION  # a constant, so that a current database never loads Alembic
        current = self.schema_revision()
        if current == head:
            return
        if self.read_only or not auto_upgrade or not (current or self.create):
            where = redact_url(self.url)
            state = f"is at schema {current}" if current else "has no schema yet"
            switched_off = not auto_upgrade and not self.read_only
            why = " and database.auto_upgrade is off" if switched_off else ""
            raise SchemaOutdatedError(
                f"the mirror {where} {state}, this syncd needs {head}{why}: run `syncd db upgrade`"
                + ("" if current or switched_off else " (or `syncd run-once`)")
            )
        self.upgrade()

    # -- runs ------------------------------------------------------------------------------

    def start_run(self, org_id: str, trigger: RunTrigger, instance: str, now: datetime) -> tuple[int, int]:
        """Open a ``running`` row; earlier ``running`` rows of the org are marked ``aborted``.

        Returns the new run id and how many stale runs were closed. Results of runs of this process
        that could not be recorded when they ended are written first, so no run of a live process
        is taken for an interrupted one.
        """
        with self._unrecorded_lock:
            unrecorded = dict(self._unrecorded)
        with self.transaction("starting a run") as conn:
            for run_id, values in unrecorded.items():
                conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(values))
            stale = conn.execute(
                update(sync_runs)
                .where(sync_runs.c.org_id == org_id, sync_runs.c.status == RunStatus.RUNNING)
                .values(
                    status=RunStatus.ABORTED,
                    finished_at=now,
                    error="interrupted: the syncd process running the pass ended before it finished",
                )
            ).rowcount
            run_id = conn.execute(
                insert(sync_runs)
                .values(org_id=org_id, trigger=trigger, instance=instance, started_at=now, status=RunStatus.RUNNING)
                .returning(sync_runs.c.id)
            ).scalar_one()
        with self._unrecorded_lock:
            for recorded in unrecorded:
                self._unrecorded.pop(recorded, None)
        return int(run_id), stale

    def finish_run(self, run_id: int, status: RunStatus, now: datetime, error: str | None = None) -> None:
        """Close a run with its final status.

        The database may just have failed (perhaps why the pass did), so this is tried again on
        fresh connections for a few seconds. If it still fails, the result is kept and written
        before this process starts its next run, and StoreError says what happened.
        """
        # The error may quote a server; whatever it holds, it must not be what makes the write fail.
        values = {"status": status, "finished_at": now, "error": None if error is None else one_line(error, 2000)}
        for delay in (*BOOKKEEPING_RETRIES, None):
            try:
                with self.transaction("recording the end of a run") as conn:
                    conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(values))
                return
            except StoreError:
                if delay is None:
                    with self._unrecorded_lock:
                        self._unrecorded[run_id] = values
                    raise
                time.sleep(delay)

    # -- the shared schedule (PostgreSQL) -------------------------------------------------------

    def claim_scheduled_pass(self, org_id: str, interval: float, instance: str) -> float:
        """Call under the org's lock. 0.0: no other daemon started a scheduled pass of the org within
        ``interval`` seconds, by the database's clock, and this one is now recorded as started;
        otherwise the seconds until the org is due. Several daemons sharing a PostgreSQL mirror thus
        run one pass per org per interval between them. A daemon's own last pass does not hold it
        back: its timer already spaces its passes, and the claim is stamped a little after the timer
        fired. A start later than the database's clock now is taken over like one an interval old.
        SQLite has one daemon per file: always 0.0."""
        if not self._dialect.shares_schedule:
            return 0.0
        with self.transaction("claiming a scheduled pass") as conn:
            return self._dialect.claim_scheduled_pass(conn, org_id, interval, instance)

    def release_scheduled_pass(self, org_id: str, instance: str) -> None:
        """A scheduled pass that was stopped does not count: the next daemon whose timer fires runs one."""
        if not self._dialect.shares_schedule:
            return
        with self.transaction("releasing a scheduled pass") as conn:
            self._dialect.release_scheduled_pass(conn, org_id, instance)

    def has_succeeded(self, org_id: str) -> bool:
        """Whether any pass of the org has succeeded (before that, passes load the baseline)."""
        query = select(sync_runs.c.id).where(sync_runs.c.org_id == org_id, sync_runs.c.status == RunStatus.SUCCEEDED)
        with self.reading("reading runs") as conn:
            return conn.execute(query.limit(1)).first() is not None

    def last_success_size(self, org_id: str) -> int | None:
        """How many devices the newest successful pass of the org saw (None: none has succeeded).
        Only a successful pass counts: a failed one may have seen a server that never stopped."""
        seen = (
            select(sync_runs.c.devices_seen)
            .where(sync_runs.c.org_id == org_id, sync_runs.c.status == RunStatus.SUCCEEDED)
            .order_by(sync_runs.c.id.desc())
            .limit(1)
        )
        with self.reading("reading runs") as conn:
            size = conn.execute(seen).scalar()
        return None if size is None else int(size)

    def run(self, run_id: int) -> dict[str, Any]:
        """One sync_runs row as a dict."""
        with self.reading("reading a run") as conn:
            return dict(conn.execute(select(sync_runs).where(sync_runs.c.id == run_id)).mappings().one())

    def runs(self, org_id: str | None = None, last: int = 20, failed: bool = False) -> list[dict[str, Any]]:
        """The ``last`` passes (sync_runs rows), newest first: of one org, or of every org;
        ``failed``: only those that failed or were aborted."""
        query = select(sync_runs).order_by(sync_runs.c.started_at.desc(), sync_runs.c.id.desc()).limit(last)
        if org_id is not None:
            query = query.where(sync_runs.c.org_id == org_id)
        if failed:
            query = query.where(sync_runs.c.status.in_((RunStatus.FAILED, RunStatus.ABORTED)))
        with self.reading("reading past runs") as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- devices ---------------------------------------------------------------------------

    @contextmanager
    def session(self, lease: OrgLease | None = None) -> Iterator[Session]:
        """One connection for a series of transactions (a pass's pages): checked out, and on
        PostgreSQL pinged, once rather than for every page.

        ``lease`` (a pass under its org's lock): on PostgreSQL the session is the lock's own
        connection, so each transaction commits only while the lock is held; once the lock's
        session has ended, every transaction is LockLostError (nothing more is written).
        """
        if lease is not None and lease.connection is not None:
            lease.check()
            yield Session(lease.connection, self._write_turn, self._dialect, lease, self.statistics)  # lease closes it
            return
        with translated(f"connecting to {redact_url(self.url)}"), self.engine.connect() as conn:
            # its transactions say how they write
            yield Session(conn, self._write_turn, self._dialect, statistics=self.statistics)

    @contextmanager
    def writer(self, action: str = "writing devices") -> Iterator[PageWriter]:
        """One transaction for a page's writes: all of it commits, or none of it; a database error
        in it is StoreError naming ``action``."""
        with self.session() as session, session.writer(action=action) as writer:
            yield writer

    @contextmanager
    def transaction(self, action: str) -> Iterator[Connection]:
        """A write transaction for the store's own modules, in this process's turn to write on SQLite;
        a database error in it is StoreError naming ``action``. Every write of the store goes
        through it or through a :class:`Session`'s writer and transaction."""
        with self._write_turn, translated(action), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def reading(self, action: str) -> Iterator[Connection]:
        """A connection for reads only (on SQLite its transactions do not take the write lock, so
        they wait for no writer); a database error in it is StoreError naming ``action``."""
        with translated(action), self.engine.connect() as conn:
            conn.execution_options(syncd_read_only=True)
            yield conn

    def live_ids(self, org_id: str, integration_id: str | None = None, device_kind: str | None = None) -> Iterator[str]:
        """Ids of the org's non-purged devices (within the filters), streamed: read a few thousand
        at a time while the caller goes through them (the connection is held until it has)."""
        query = select(devices.c.id).where(devices.c.org_id == org_id, devices.c.state != DeviceState.PURGED)
        if integration_id:
            query = query.where(devices.c.integration_id == integration_id)
        if device_kind:
            query = query.where(devices.c.device_metadata["kind"].as_string() == device_kind)
        with self.reading("listing devices") as conn:
            yield from conn.execute(query.execution_options(yield_per=5000)).scalars()

    def state_counts(self, org_id: str | None = None) -> dict[str, dict[str, int]]:
        """``{org_id: {state: count}}`` over the whole mirror, or one org."""
        query = select(devices.c.org_id, devices.c.state, func.count()).group_by(devices.c.org_id, devices.c.state)
        if org_id is not None:
            query = query.where(devices.c.org_id == org_id)
        counts: dict[str, dict[str, int]] = {}
        with self.reading("counting devices") as conn:
            for org, state, count in conn.execute(query):
                counts.setdefault(org, {})[state] = int(count)
        return counts

    def last_success(self, org_id: str) -> datetime | None:
        """When the org's newest successful pass finished (None: none has)."""
        query = select(func.max(sync_runs.c.finished_at, type_=UTCDateTime())).where(
            sync_runs.c.org_id == org_id, sync_runs.c.status == RunStatus.SUCCEEDED
        )
        with self.reading("reading runs") as conn:
            return conn.execute(query).scalar()

    def last_successes(self) -> dict[str, datetime]:
        """When each org's newest successful pass finished."""
        query = (
            select(sync_runs.c.org_id, func.max(sync_runs.c.finished_at, type_=UTCDateTime()))
            .where(sync_runs.c.status == RunStatus.SUCCEEDED)
            .group_by(sync_runs.c.org_id)
        )
        with self.reading("reading runs") as conn:
            return {str(org_id): finished for org_id, finished in conn.execute(query)}

    def org_overview(self) -> dict[str, dict[str, Any]]:
        """Per org: ``last_run`` (the newest sync_runs row), ``last_success`` (when the newest successful
        pass finished) and ``devices`` (counts by state)."""
        newest = select(func.max(sync_runs.c.id)).group_by(sync_runs.c.org_id)
        overview: dict[str, dict[str, Any]] = {}
        with self.reading("reading the status") as conn:
            for row in conn.execute(select(sync_runs).where(sync_runs.c.id.in_(newest))).mappings():
                overview.setdefault(row["org_id"], {})["last_run"] = dict(row)
        for org_id, finished in self.last_successes().items():
            overview.setdefault(org_id, {})["last_success"] = finished
        for org_id, by_state in self.state_counts().items():
            overview.setdefault(org_id, {})["devices"] = by_state
        return overview

    def device(self, device_id: str) -> dict[str, Any] | None:
        """One mirrored device row as a dict, or None."""
        with self.reading("reading a device") as conn:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).mappings().one_or_none()
            return dict(row) if row else None

    def devices_of(self, org_id: str) -> list[dict[str, Any]]:
        """Every mirrored device row of an org, by id."""
        query = select(devices).where(devices.c.org_id == org_id).order_by(devices.c.id)
        with self.reading("reading devices") as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def changes(self, org_id: str | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
        """device_changes rows, oldest first, optionally for one org or run."""
        query = select(device_changes).order_by(device_changes.c.id)
        if org_id is not None:
            query = query.where(device_changes.c.org_id == org_id)
        if run_id is not None:
            query = query.where(device_changes.c.run_id == run_id)
        with self.reading("reading changes") as conn:
            return [dict(row) for row in conn.execute(query).mappings()]


class Session:
    """Transactions on one held connection; see :meth:`Store.session`."""

    def __init__(
        self,
        conn: Connection,
        write_turn: contextlib.AbstractContextManager[Any],
        dialect: Dialect,
        lease: OrgLease | None = None,
        statistics: PlannerStatistics | None = None,
    ) -> None:
        self._conn = conn
        self._write_turn = write_turn
        self._dialect = dialect
        self._lease = lease  # set when ``conn`` is the connection holding the org's lock
        self._statistics = statistics  # PostgreSQL's: the tables a write grew may need an ANALYZE

    def _guarded(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Database errors become StoreError naming ``action``; on the lock's connection, one that
        ended the lock's session (and every later use) becomes LockLostError."""
        return self._lease.guarded(action) if self._lease is not None else translated(action)

    @contextmanager
    def reader(self) -> Iterator[PageReader]:
        """A read-only transaction (on SQLite it does not wait for writers)."""
        self._conn.execution_options(syncd_read_only=True)
        try:
            with self._guarded("reading devices"), self._conn.begin():
                yield PageReader(self._conn, self._dialect)
        finally:
            self._conn.execution_options(syncd_read_only=False)

    @contextmanager
    def writer(self, durable: bool = True, action: str = "writing devices") -> Iterator[PageWriter]:
        """One transaction for a page's writes: all of it commits, or none of it (a database error in
        it is StoreError naming ``action``).

        ``durable=False`` (PostgreSQL): the commit does not wait for the WAL flush. A crash of the
        database server can then lose the newest transactions, each whole; for a page of a pass
        that only means the next pass finds and writes those changes again.
        """
        with (
            self._write_turn,
            self._guarded(action),
            self._conn.begin(),
            self._dialect.page_transaction(self._conn, durable),
        ):
            writer = PageWriter(self._conn, self._dialect)
            yield writer
        if self._statistics is not None:
            self._statistics.after_commit(self._conn, writer.inserted)

    @contextmanager
    def transaction(self, action: str) -> Iterator[Connection]:
        """A write transaction on this session's connection for the store's own modules (what a
        pass writes besides its pages), as :meth:`Store.transaction` does on a connection of its own."""
        with self._write_turn, self._guarded(action), self._conn.begin():
            yield self._conn


class PageReader:
    """The reads one page of a pass needs, inside one open transaction (in the dialect's own SQL)."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    def known(self, ids: Collection[str], seen_before: datetime) -> tuple[dict[str, KnownDevice], datetime | None]:
        """``{id: (fingerprint, state, stale)}`` of those ids already mirrored, ``stale`` when last
        seen before ``seen_before``; and the oldest ``last_seen_at`` among them not stale (None: none)."""
        return self._dialect.known(self._conn, ids, seen_before) if ids else ({}, None)

    def generation(self, org_id: str) -> int:
        """The org's generation (see :meth:`PageWriter.bump_generation`)."""
        g = org_generations
        found = self._conn.execute(select(g.c.generation).where(g.c.org_id == org_id)).scalar_one_or_none()
        return found or 0

    def page_shapes(self, org_id: str, scope: str, generation: int, seen_after: datetime) -> dict[int, PageShape]:
        """The settled list pages of the org compared under ``scope`` and ``generation`` whose devices
        were all seen after ``seen_after``: each offset's :class:`PageShape` (a page costs ~300 bytes
        here: 1.5 MB for an org of 1,000,000 devices)."""
        lp = list_pages
        query = select(lp.c.page_offset, lp.c.digest, lp.c.item_count, lp.c.total, lp.c.first_id).where(
            lp.c.seen_since > seen_after, *self._trusted_pages(org_id, scope, generation)
        )
        return {
            offset: PageShape(digest, count, total, first)
            for offset, digest, count, total, first in self._conn.execute(query)
        }

    def page_records(self, org_id: str, scope: str, generation: int, start: int, count: int) -> list[PageRecord]:
        """Up to ``count`` settled list pages of the org compared under ``scope`` and ``generation``,
        from offset ``start`` on, by offset."""
        lp = list_pages
        query = (
            select(
                lp.c.page_offset,
                lp.c.digest,
                lp.c.item_count,
                lp.c.total,
                lp.c.first_id,
                lp.c.seen_since,
                lp.c.summary,
            )
            .where(lp.c.page_offset >= start, *self._trusted_pages(org_id, scope, generation))
            .order_by(lp.c.page_offset)
            .limit(count)
        )
        return [
            PageRecord(offset, PageShape(digest, items, total, first), seen_since, bytes(summary))
            for offset, digest, items, total, first, seen_since, summary in self._conn.execute(query)
        ]

    @staticmethod
    def _trusted_pages(org_id: str, scope: str, generation: int) -> tuple[ColumnElement[bool], ...]:
        lp = list_pages
        return (lp.c.org_id == org_id, lp.c.scope == scope, lp.c.generation == generation, lp.c.settled)

    def previous(self, ids: Collection[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """``{id: (raw, state)}`` as mirrored now, to describe what a change changed."""
        return self._dialect.previous(self._conn, ids) if ids else {}

    def history_values(self, device_id: str) -> dict[str, Any]:
        """The mirrored device's :data:`~syncd.models.HISTORY_FIELDS`, as its history rows record them."""
        columns = [devices.c[name] for name in HISTORY_FIELDS]
        return dict(self._conn.execute(select(*columns).where(devices.c.id == device_id)).mappings().one())


class PageWriter(PageReader):
    """The statements that write one page, inside one open transaction."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        super().__init__(conn, dialect)
        self.inserted: Counter[str] = Counter()  # rows inserted, by table (see syncd.store.statistics)

    def grew(self, table: str, rows: int) -> None:
        """Count rows inserted into ``table``, a table whose lookups by a batch of ids need the
        planner's statistics (devices and device_changes are looked up by their primary keys)."""
        self.inserted[table] += rows

    def execute(self, statement: Executable) -> None:
        """Run one Core statement in this transaction."""
        self._conn.execute(statement)

    @property
    def connection(self) -> Connection:
        """The transaction's connection, for the store's own modules."""
        return self._conn

    def insert_devices(self, new: Sequence[Device], now: datetime) -> None:
        """Add devices seen for the first time."""
        if new:
            self._dialect.insert_devices(self._conn, new, now)

    def update_devices(self, changed: Sequence[Device], now: datetime) -> None:
        """Rewrite devices whose content changed (un-purging them if they had been purged)."""
        if changed:
            self._dialect.update_devices(self._conn, changed, now)

    def refresh_devices(self, same: Sequence[Device], now: datetime) -> None:
        """Store a new serialisation of unchanged content: the payload and its fingerprint."""
        if same:
            self._dialect.refresh_devices(self._conn, same, now)

    def touch(self, ids: Collection[str], seen_at: datetime) -> None:
        """Move ``last_seen_at`` forward for unchanged devices."""
        if ids:
            self._dialect.touch(self._conn, ids, seen_at)

    def mark_purged(self, device_id: str, at: datetime, run_id: int) -> None:
        """Record that OpenApp no longer has this device (a purged portal lets nobody through)."""
        self._conn.execute(
            update(devices)
            .where(devices.c.id == device_id)
            .values(state=DeviceState.PURGED, purged_at=at, last_changed_at=at)
        )
        a = door_access_intervals
        self._conn.execute(
            update(a).where(a.c.device_id == device_id, a.c.valid_to.is_(None)).values(valid_to=at, to_run_id=run_id)
        )

    def add_history(self, rows: Sequence[HistoryRow]) -> None:
        """Append device_changes rows: the one way history is written (pages of a pass, purges,
        door restrictions, pushed edits)."""
        if rows:
            self._dialect.add_history(self._conn, rows)

    def bump_run(self, run_id: int, counters: Mapping[str, int]) -> None:
        """Add to a run's counters (committed with the page they describe)."""
        self._dialect.bump_run(self._conn, run_id, counters)

    def record_pages(self, org_id: str, scope: str, generation: int, run_id: int, pages: Sequence[PageRecord]) -> None:
        """Remember list pages run ``run_id`` compared whole under ``generation`` (see
        :meth:`bump_generation`); not trusted until :meth:`settle_pages`."""
        if pages:
            self._dialect.record_pages(self._conn, org_id, scope, generation, run_id, pages)

    def settle_pages(self, org_id: str, run_id: int) -> None:
        """Trust the list pages run ``run_id`` recorded: its scan read the whole list, no device twice."""
        self._dialect.settle_pages(self._conn, org_id, run_id)

    def bump_generation(self, org_id: str) -> None:
        """Call with every write to an org's devices that is not a list page's compare (a purge, a
        pushed edit, a device confirmed on its own): the list pages recorded until then are not
        trusted any more, since the mirror may no longer hold what they listed."""
        self._dialect.bump_generation(self._conn, org_id)
