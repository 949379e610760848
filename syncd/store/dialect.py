"""Each database's own SQL and settings, one class each: the hot path of a pass, and everything
else only one database has (locks, the shared schedule, a migration's guard). No other module of
the store speaks SQL of one database.

A :class:`Dialect` offers the same statements on SQLite and PostgreSQL (which devices of a page
are known, their previous payloads, inserting, rewriting and touching devices, change rows, run
counters) and the engine set-up each database needs; :func:`dialect_for` picks one, once per
store. The column lists come from :mod:`syncd.store.schema`, so the statements follow the tables.

The statements speak the driver's SQL directly: values are encoded once, here, instead of
through SQLAlchemy's per-value type processing (bench/bench_sync.py measured the difference).
Timestamps arrive as syncd's canonical UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``, see
:func:`syncd.models.utc_text`) or aware datetimes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy import URL, ColumnElement, Connection, Engine, Select, Table, event, false, func, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

from syncd.errors import ConfigError, SchemaOutdatedError
from syncd.models import Device, HistoryRow, PageRecord
from syncd.store.schema import RUN_COUNTERS, JSONDoc, UTCDateTime, device_changes, devices

# Columns of `devices` that record what syncd saw, not what OpenApp said.
BOOKKEEPING_COLUMNS = ("purged_at", "first_seen_at", "last_seen_at", "last_changed_at")
# What a device's content fills, in table order: the order of Dialect.device_values.
CONTENT_COLUMNS = tuple(c.name for c in devices.columns if c.name not in BOOKKEEPING_COLUMNS)
CHANGE_COLUMNS = tuple(c.name for c in device_changes.columns if c.name != "id")
TIME_COLUMNS = frozenset(c.name for c in device_changes.columns if isinstance(c.type, UTCDateTime))
JSON_COLUMNS = frozenset(
    c.name for table in (devices, device_changes) for c in table.columns if isinstance(c.type, JSONDoc)
)

# What a page comparison needs to know of an already mirrored device: ``(fingerprint, state,
# stale)``, stale meaning last seen before the caller's resolution. A plain sequence, as the
# driver hands it over: building an object per device costs more than the comparison it serves.
KnownDevice = Sequence[Any]


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for a name (PostgreSQL advisory locks take bigint)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class Dialect:
    """The statements of a page, for one database; see the module docstring."""

    name: str
    p: str  # the driver's placeholder
    pre_ping = True  # a server connection can drop; a file cannot
    one_writer = False  # one write transaction at a time: this process's writers take turns
    shares_schedule = False  # several daemons share the database, and with it the passes' schedule
    keeps_statistics = False  # the store analyzes the tables a pass grows (syncd.store.statistics)

    def __init__(self) -> None:
        content = CONTENT_COLUMNS[1:]  # all but the id
        self.update_device_sql = (
            f"UPDATE devices SET purged_at = NULL, last_seen_at = {self.p}, last_changed_at = {self.p}, "
            f"{', '.join(f'{col} = {self.slot(col)}' for col in content)} WHERE id = {self.p}"
        )
        self.refresh_device_sql = (
            f"UPDATE devices SET raw = {self.slot('raw')}, fingerprint = {self.p}, last_seen_at = {self.p} "
            f"WHERE id = {self.p}"
        )
        self.insert_change_sql = (
            f"INSERT INTO device_changes ({', '.join(CHANGE_COLUMNS)}) "
            f"VALUES ({', '.join(self.slot(col) for col in CHANGE_COLUMNS)})"
        )
        # Where a change row has values to encode, decided once (a first pass after a baseline can
        # write a change row for every device): the positions of its timestamps and of its JSON.
        self._change_times = tuple(i for i, col in enumerate(CHANGE_COLUMNS) if col in TIME_COLUMNS)
        self._change_jsons = tuple(i for i, col in enumerate(CHANGE_COLUMNS) if col in JSON_COLUMNS)

    # -- engine ---------------------------------------------------------------------------------

    def engine_url(self, url: URL, read_only: bool, create: bool = True) -> tuple[URL, dict[str, Any]]:
        """The URL and driver arguments to open ``url`` with (``read_only``: for looking only;
        ``create``: a database that is not there yet may be made)."""
        return url, {}

    def tune(self, engine: Engine, read_only: bool) -> None:
        """Settings every connection of ``engine`` gets."""

    def lock_base(self, url: URL) -> Path | None:
        """The SQLite file whose ``.locks`` folder holds the org locks (None: the database locks)."""
        return None

    def needs_connection_check(self, url: URL) -> bool:
        """Check what can be checked without connecting (ConfigError naming it); whether a
        connection must be tried too (see :meth:`syncd.store.store.Store.check_access`)."""
        return True

    def unreadable_time(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        """Rows whose time in ``column`` the database itself cannot read (the database refuses them)."""
        return false()

    def lock_for_claim(self, query: Select[Any], table: Table) -> Select[Any]:
        """The write-back queue's claim, as this database keeps concurrent claimers apart."""
        return query

    def serialise(self, conn: Connection, name: str) -> None:
        """Let one transaction at a time, of every syncd sharing the database, past this point until
        it ends (SQLite: its write transactions already are one at a time, across processes)."""

    def database_now(self, conn: Connection) -> datetime:
        """Now, on the database's clock (SQLite: this machine's, where the file is)."""
        return datetime.now(UTC)

    @contextlib.contextmanager
    def page_transaction(self, conn: Connection, durable: bool) -> Any:
        """Settings of one page's transaction (see :meth:`syncd.store.store.Session.writer`)."""
        yield

    def guard_migration(self, conn: Connection, key: int, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
        """Inside a migration's transaction: one migrator at a time, and bounded waits
        (see :func:`syncd.store.migrate.guard`)."""

    def try_lock(self, conn: Connection, key: int) -> bool:
        """Take the session lock ``key`` on ``conn`` if it is free (databases with :meth:`lock_base` None)."""
        raise NotImplementedError

    def unlock(self, conn: Connection, key: int) -> None:
        """Release the session lock ``key`` taken by :meth:`try_lock`."""
        raise NotImplementedError

    def claim_scheduled_pass(self, conn: Connection, org_id: str, interval: float, instance: str) -> float:
        """See :meth:`syncd.store.store.Store.claim_scheduled_pass` (only when ``shares_schedule``)."""
        raise NotImplementedError

    def release_scheduled_pass(self, conn: Connection, org_id: str, instance: str) -> None:
        """See :meth:`syncd.store.store.Store.release_scheduled_pass` (only when ``shares_schedule``)."""
        raise NotImplementedError

    # -- values ---------------------------------------------------------------------------------

    def slot(self, column: str) -> str:
        """The placeholder for a value of ``column``."""
        return self.p

    def time(self, value: datetime | None) -> Any:
        """A timestamp as the driver takes it."""
        return value

    def lifecycle(self, device: Device) -> tuple[Any, ...]:
        """A device's lifecycle timestamps (canonical UTC text) as the driver takes them."""
        return device.lifecycle

    @staticmethod
    def json(value: Any) -> str | None:
        """A JSON column's value as text."""
        return None if value is None else orjson.dumps(value).decode()

    @staticmethod
    def unjson(value: Any) -> Any:
        """A JSON column's value as read: text (or a bare number on SQLite) to the JSON value."""
        return orjson.loads(value) if isinstance(value, str | bytes) else value

    def device_values(self, d: Device) -> tuple[Any, ...]:
        """A device's content in CONTENT_COLUMNS order (a test holds the two together)."""
        return (
            d.id,
            d.org_id,
            d.integration_id,
            d.zone_id,
            d.external_id,
            self.json(d.name),
            self.json(d.device_metadata),
            self.json(d.credentials_set),
            d.has_credentials,
            *self.lifecycle(d),
            d.state,
            d.fingerprint,
            d.raw_json,
        )

    def id_in(self, ids: Collection[str]) -> str:
        """``id`` is one of ``ids`` (bound by :meth:`id_params`)."""
        raise NotImplementedError

    def id_params(self, ids: Collection[str]) -> tuple[Any, ...]:
        """The parameters of :meth:`id_in`."""
        raise NotImplementedError

    # -- statements -----------------------------------------------------------------------------

    def known(
        self, conn: Connection, ids: Collection[str], seen_before: datetime
    ) -> tuple[dict[str, KnownDevice], datetime | None]:
        """``{id: (fingerprint, state, stale)}`` of those ids already mirrored, and the oldest
        ``last_seen_at`` among them that is not stale (None: none)."""
        raise NotImplementedError

    def previous(self, conn: Connection, ids: Collection[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """``{id: (raw, state)}`` as mirrored now."""
        rows = conn.exec_driver_sql(
            f"SELECT id, raw, state FROM devices WHERE {self.id_in(ids)}", self.id_params(ids)
        ).fetchall()
        return {row[0]: (self.unjson(row[1]), row[2]) for row in rows}

    def insert_devices(self, conn: Connection, new: Sequence[Device], now: datetime) -> None:
        """Add devices seen for the first time (the write time fills their bookkeeping columns)."""
        raise NotImplementedError

    def update_devices(self, conn: Connection, changed: Sequence[Device], now: datetime) -> None:
        """Rewrite devices whose content changed (un-purging them if they had been purged)."""
        stamp = self.time(now)
        conn.exec_driver_sql(
            self.update_device_sql, [(stamp, stamp, *self.device_values(d)[1:], d.id) for d in changed]
        )

    def refresh_devices(self, conn: Connection, same: Sequence[Device], now: datetime) -> None:
        """Store a new serialisation of unchanged content: the payload and its fingerprint."""
        stamp = self.time(now)
        conn.exec_driver_sql(self.refresh_device_sql, [(d.raw_json, d.fingerprint, stamp, d.id) for d in same])

    def touch(self, conn: Connection, ids: Collection[str], seen_at: datetime) -> None:
        """Move ``last_seen_at`` forward for unchanged devices."""
        conn.exec_driver_sql(
            f"UPDATE devices SET last_seen_at = {self.p} WHERE {self.id_in(ids)}",
            (self.time(seen_at), *self.id_params(ids)),
        )

    def add_history(self, conn: Connection, rows: Sequence[HistoryRow]) -> None:
        """Append device_changes rows."""
        self.insert_many(conn, self.insert_change_sql, self.history_values(rows))

    def history_values(self, rows: Sequence[HistoryRow]) -> list[tuple[Any, ...]]:
        """device_changes rows as the driver takes them (a HistoryRow is in CHANGE_COLUMNS order)."""
        times, jsons, json = self._change_times, self._change_jsons, self.json
        encoded: dict[datetime, Any] = {}  # the rows of a page share one time: each is encoded once
        values = []
        for row in rows:
            out = list(row)
            for i in times:
                moment = out[i]
                if moment is not None:
                    text = encoded.get(moment)
                    if text is None:
                        text = encoded[moment] = self.time(moment)
                    out[i] = text
            for i in jsons:
                out[i] = json(out[i])
            values.append(tuple(out))
        return values

    def insert_many(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run an INSERT for many rows."""
        conn.exec_driver_sql(sql, rows)

    def analyze(self, conn: Connection, table: str, lock_timeout_ms: int) -> None:
        """Refresh the planner's statistics of a table (where :attr:`keeps_statistics`)."""
        raise NotImplementedError

    def analyzed_rows(self, conn: Connection, table: str) -> float | None:
        """The table's rows as of its last statistics (where :attr:`keeps_statistics`)."""
        raise NotImplementedError

    def bump_run(self, conn: Connection, run_id: int, counters: Mapping[str, int]) -> None:
        """Add to a run's counters."""
        bumps = [(name, n) for name, n in counters.items() if n and name in RUN_COUNTERS]
        if bumps:
            sets = ", ".join(f"{name} = {name} + {self.p}" for name, _ in bumps)
            conn.exec_driver_sql(f"UPDATE sync_runs SET {sets} WHERE id = {self.p}", (*(n for _, n in bumps), run_id))

    def record_pages(
        self, conn: Connection, org_id: str, scope: str, generation: int, run_id: int, pages: Sequence[PageRecord]
    ) -> None:
        """Remember list pages compared whole, not settled yet (each replaces what its offset held)."""
        p = self.p
        conn.exec_driver_sql(
            "INSERT INTO list_pages (org_id, page_offset, scope, digest, generation, run_id, settled, seen_since, "
            f"item_count, total, first_id, summary) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, FALSE, {p}, {p}, {p}, {p}, "
            f"{p}) "
            "ON CONFLICT (org_id, page_offset) DO UPDATE SET scope = excluded.scope, digest = excluded.digest, "
            "generation = excluded.generation, run_id = excluded.run_id, settled = FALSE, "
            "seen_since = excluded.seen_since, item_count = excluded.item_count, total = excluded.total, "
            "first_id = excluded.first_id, summary = excluded.summary",
            [
                (
                    org_id,
                    r.offset,
                    scope,
                    r.shape.digest,
                    generation,
                    run_id,
                    self.time(r.seen_since),
                    r.shape.count,
                    r.shape.total,
                    r.shape.first_id,
                    r.summary,
                )
                for r in pages
            ],
        )

    def settle_pages(self, conn: Connection, org_id: str, run_id: int) -> None:
        """Trust the list pages a run recorded."""
        conn.exec_driver_sql(
            f"UPDATE list_pages SET settled = TRUE WHERE org_id = {self.p} AND run_id = {self.p}", (org_id, run_id)
        )

    def bump_generation(self, conn: Connection, org_id: str) -> None:
        """Retire the org's list pages: its devices were written otherwise than by a page's compare."""
        conn.exec_driver_sql(f"DELETE FROM list_pages WHERE org_id = {self.p}", (org_id,))
        conn.exec_driver_sql(
            f"INSERT INTO org_generations (org_id, generation) VALUES ({self.p}, 1) "
            "ON CONFLICT (org_id) DO UPDATE SET generation = org_generations.generation + 1",
            (org_id,),
        )


# PostgreSQL: history rows from this many on are loaded with COPY (a page of a baseline pass), fewer
# with one INSERT.
COPY_FROM_ROWS = 50
SQLITE_ROWS_PER_INSERT = 500  # 500 x 17 values stays far below SQLite's 32,766 bound parameters


class SQLiteDialect(Dialect):
    """SQLite: timestamps as UTC text (SQLAlchemy's own format, so Core reads them back), JSON as text."""

    name = "sqlite"
    p = "?"
    pre_ping = False
    one_writer = True

    def __init__(self) -> None:
        super().__init__()
        # New devices: the write time fills the first three columns, bound once per statement (?1).
        columns = f"first_seen_at, last_seen_at, last_changed_at, {', '.join(CONTENT_COLUMNS)}"
        self.insert_device_sql = (
            f"INSERT INTO devices ({columns}) VALUES (?1, ?1, ?1, {', '.join(['?'] * len(CONTENT_COLUMNS))})"
        )

    def engine_url(self, url: URL, read_only: bool, create: bool = True) -> tuple[URL, dict[str, Any]]:
        database = url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ConfigError("database.url: use a SQLite file (sqlite:///path/to/syncd.db), not an in-memory database")
        if create and not read_only:
            return url, {}
        path = Path(database).resolve()
        if not path.exists():
            raise SchemaOutdatedError(f"there is no mirror at {path} yet: run `syncd run-once` (or `syncd db upgrade`)")
        # Read-only: never write-locked; either way never created (mode=rw fails on a file that went
        # away since). Quoted: a '#' or '?' in the path is a name.
        mode = "ro" if read_only else "rw"
        return url.set(database=f"file:{quote(str(path))}?mode={mode}", query={"uri": "true"}), {}

    def tune(self, engine: Engine, read_only: bool) -> None:
        """WAL, a busy timeout, foreign keys, and BEGIN IMMEDIATE so concurrent writers queue up
        instead of failing on a read-to-write lock upgrade. A read-only store only ever reads."""

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=60000")
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA wal_autocheckpoint=10000")  # every ~40 MB of WAL, not every 4 MB
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            reading = read_only or conn.get_execution_options().get("syncd_read_only", False)
            conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    def lock_base(self, url: URL) -> Path | None:
        return Path(url.database or "").resolve()

    def needs_connection_check(self, url: URL) -> bool:
        """The folder and the file are checked (nothing is created); no connection is needed."""
        path = Path(url.database or "").resolve()
        folder = path.parent
        if not folder.is_dir():
            raise ConfigError(f"database.url: the folder {folder} of the SQLite mirror does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"database.url: this user cannot write in {folder}, where the SQLite mirror and its -wal "
                "and -shm files live (give it write permission, or point database.url elsewhere)"
            )
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"database.url: this user cannot read and write {path}")
        return False

    def unreadable_time(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        """SQLite stores anything a hand-written row holds; what it cannot read as a time."""
        return column.is_not(None) & func.datetime(column).is_(None)

    def time(self, value: datetime | None) -> Any:
        if value is None:
            return None
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        # SQLAlchemy's SQLite format, "YYYY-MM-DD HH:MM:SS.ffffff" (isoformat is 3x faster than strftime).
        return value.isoformat(" ", "microseconds")[:26]

    def id_in(self, ids: Collection[str]) -> str:
        return f"id IN ({', '.join(['?'] * len(ids))})"

    def id_params(self, ids: Collection[str]) -> tuple[Any, ...]:
        return tuple(ids)

    def known(
        self, conn: Connection, ids: Collection[str], seen_before: datetime
    ) -> tuple[dict[str, KnownDevice], datetime | None]:
        # One JSON object instead of a row per device: the sqlite3 module gives the GIL away at
        # every row it steps through, and getting it back behind busy threads is what costs.
        sql = (
            "SELECT json_group_object(id, json_array(fingerprint, state, last_seen_at < ?1)), "
            f"min(CASE WHEN last_seen_at >= ?1 THEN last_seen_at END) FROM devices WHERE {self.id_in(ids)}"
        )
        found, oldest = conn.exec_driver_sql(sql, (self.time(seen_before), *self.id_params(ids))).one()
        known: dict[str, KnownDevice] = orjson.loads(found)
        return known, None if oldest is None else datetime.fromisoformat(oldest).replace(tzinfo=UTC)

    def insert_devices(self, conn: Connection, new: Sequence[Device], now: datetime) -> None:
        self.insert_many(conn, self.insert_device_sql, [self.device_values(d) for d in new], lead=(self.time(now),))

    def insert_many(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]], lead: tuple[Any, ...] = ()) -> None:
        """Multi-row VALUES statements, stepped once each rather than once per row (each step gives
        the GIL away; see :meth:`known`); ``lead`` are values every row refers to by number (?1, ...)."""
        head, _, row_slots = sql.partition(" VALUES ")
        for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
            chunk = rows[start : start + SQLITE_ROWS_PER_INSERT]
            values = ", ".join([row_slots] * len(chunk))
            conn.exec_driver_sql(f"{head} VALUES {values}", (*lead, *(v for row in chunk for v in row)))


class PostgresDialect(Dialect):
    """PostgreSQL: timestamps as UTC text marked ``+00:00`` (or aware datetimes), JSON text cast to
    jsonb; new devices loaded with COPY; id lists as one array parameter."""

    name = "postgresql"
    p = "%s"
    shares_schedule = True
    keeps_statistics = True  # see syncd.store.statistics

    def __init__(self) -> None:
        super().__init__()
        columns = f"first_seen_at, last_seen_at, last_changed_at, {', '.join(CONTENT_COLUMNS)}"
        self.insert_device_sql = f"COPY devices ({columns}) FROM STDIN"
        self.copy_change_sql = f"COPY device_changes ({', '.join(CHANGE_COLUMNS)}) FROM STDIN"

    def engine_url(self, url: URL, read_only: bool, create: bool = True) -> tuple[URL, dict[str, Any]]:
        # UTC sessions: timestamps near year 1 or 9999 stay in range whatever the server's TimeZone.
        options = "-c timezone=UTC" + (" -c default_transaction_read_only=on" if read_only else "")
        return url, {"options": options}

    @contextlib.contextmanager
    def page_transaction(self, conn: Connection, durable: bool) -> Any:
        """``durable=False``: the commit does not wait for the WAL flush (this transaction only)."""
        if not durable:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        yield

    def guard_migration(self, conn: Connection, key: int, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
        """A transaction-level advisory lock, and lock and statement timeouts for this transaction."""
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        conn.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"))
        conn.execute(text(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}"))

    def try_lock(self, conn: Connection, key: int) -> bool:
        """A session advisory lock: held until released or the session ends."""
        return bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())

    def unlock(self, conn: Connection, key: int) -> None:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    def claim_scheduled_pass(self, conn: Connection, org_id: str, interval: float, instance: str) -> float:
        """``org_schedule``, on the database's clock."""
        last = conn.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM clock_timestamp() - pass_started_at), instance FROM org_schedule "
                "WHERE org_id = :org_id"
            ),
            {"org_id": org_id},
        ).first()
        # A start in the future (a clock set back, a hand edit) is stale, not recent: taken over.
        if last is not None and last[0] is not None and last[1] != instance and 0 <= float(last[0]) < interval:
            return interval - float(last[0])
        conn.execute(
            text(
                "INSERT INTO org_schedule (org_id, pass_started_at, instance) "
                "VALUES (:org_id, clock_timestamp(), :instance) ON CONFLICT (org_id) DO UPDATE "
                "SET pass_started_at = EXCLUDED.pass_started_at, instance = EXCLUDED.instance"
            ),
            {"org_id": org_id, "instance": instance},
        )
        return 0.0

    def release_scheduled_pass(self, conn: Connection, org_id: str, instance: str) -> None:
        conn.execute(
            text("UPDATE org_schedule SET pass_started_at = NULL WHERE org_id = :org_id AND instance = :instance"),
            {"org_id": org_id, "instance": instance},
        )

    def slot(self, column: str) -> str:
        return f"{self.p}::jsonb" if column in JSON_COLUMNS else self.p

    def lock_for_claim(self, query: Select[Any], table: Table) -> Select[Any]:
        """``FOR UPDATE SKIP LOCKED``: several daemons never claim the same edit."""
        return query.with_for_update(skip_locked=True, of=table)

    def serialise(self, conn: Connection, name: str) -> None:
        """A transaction-level advisory lock: held until the transaction ends, whatever ends it."""
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (advisory_key(name),))

    def database_now(self, conn: Connection) -> datetime:
        """``clock_timestamp()``: one clock for every host sharing the database."""
        moment: datetime = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
        return moment.astimezone(UTC)

    def lifecycle(self, device: Device) -> tuple[Any, ...]:
        return tuple(None if t is None else t + "+00:00" for t in device.lifecycle)  # the same UTC text, marked

    def id_in(self, ids: Collection[str]) -> str:
        # One array parameter: the statement text stays the same and the server prepares it once.
        return "id = ANY(%s)"

    def id_params(self, ids: Collection[str]) -> tuple[Any, ...]:
        return (list(ids),)

    def known(
        self, conn: Connection, ids: Collection[str], seen_before: datetime
    ) -> tuple[dict[str, KnownDevice], datetime | None]:
        sql = f"SELECT id, fingerprint, state, last_seen_at FROM devices WHERE {self.id_in(ids)}"
        known: dict[str, KnownDevice] = {}
        oldest: datetime | None = None
        for device_id, fingerprint, state, last_seen in conn.exec_driver_sql(sql, self.id_params(ids)):
            stale = last_seen < seen_before
            known[device_id] = (fingerprint, state, stale)
            if not stale and (oldest is None or last_seen < oldest):
                oldest = last_seen
        return known, oldest

    def insert_devices(self, conn: Connection, new: Sequence[Device], now: datetime) -> None:
        """COPY: much cheaper than INSERTs for both sides."""
        self._copy(conn, self.insert_device_sql, ((now, now, now, *self.device_values(d)) for d in new))

    def add_history(self, conn: Connection, rows: Sequence[HistoryRow]) -> None:
        """COPY for a page's worth (a baseline pass records every device), INSERT for a few."""
        if len(rows) < COPY_FROM_ROWS:
            super().add_history(conn, rows)
        else:
            self._copy(conn, self.copy_change_sql, self.history_values(rows))

    def analyze(self, conn: Connection, table: str, lock_timeout_ms: int) -> None:
        """ANALYZE one of syncd's tables (its name is ours, never input), not waiting for its lock
        longer than ``lock_timeout_ms`` (a VACUUM or another daemon's ANALYZE holds it)."""
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        conn.exec_driver_sql(f"ANALYZE {table}")

    def analyzed_rows(self, conn: Connection, table: str) -> float | None:
        """The table's rows as of its last ANALYZE (negative or None: never analyzed)."""
        found = conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table})
        rows = found.scalar_one_or_none()
        return None if rows is None else float(rows)

    def _copy(self, conn: Connection, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """COPY ... FROM STDIN: psycopg's own API, beneath SQLAlchemy, so its errors are wrapped as
        SQLAlchemy's for the one translation."""
        driver: Any = conn.connection.dbapi_connection
        dbapi = conn.dialect.loaded_dbapi
        try:
            with driver.cursor() as cursor, cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
        except dbapi.Error as exc:
            raise DBAPIError.instance(sql, None, exc, dbapi.Error) from exc


@cache
def dialect_for(name: str) -> Dialect:
    """The dialect of a database by SQLAlchemy's name for it (ConfigError for one syncd does not use)."""
    if name == "sqlite":
        return SQLiteDialect()
    if name == "postgresql":
        return PostgresDialect()
    raise ConfigError(f"database.url: unsupported database {name!r}")
