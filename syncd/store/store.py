"""Reads and writes of the mirror. SQLAlchemy errors become :class:`StoreError` here."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import Executable

from syncd.errors import ConfigError, SchemaOutdatedError, StoreError
from syncd.models import Device, one_line
from syncd.store.locks import OrgLocks
from syncd.store.schema import RUN_COUNTERS, SCHEMA_REVISION, UTCDateTime, device_changes, devices, sync_runs


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


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
        hint = ""
        if "unable to open database file" in detail:
            hint = " (does the SQLite file's folder exist, and may this user write in it? `syncd check-config` tells)"
        raise StoreError(f"database error while {action}: {detail[:300]}{hint}") from exc


# What a page comparison needs to know of an already mirrored device: ``(fingerprint, state,
# stale)``, stale meaning last seen before the caller's resolution. A plain sequence, as the
# driver hands it over: building an object per device costs more than the comparison it serves.
KnownDevice = Sequence[Any]


# Waits before each try of a run's bookkeeping after a failure: about 8 s, a PostgreSQL restart.
BOOKKEEPING_RETRIES = (0.5, 2.0, 5.0)


class Store:
    """The mirror database (SQLite file or PostgreSQL).

    ``read_only``: for commands that only look (``syncd status``). Every transaction is read-only;
    on SQLite the file is opened read-only, so it is never created and never write-locked.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = normalise_url(url)
        self.read_only = read_only
        try:
            parsed = make_url(self.url)
        except ArgumentError as exc:
            raise ConfigError(f"database.url {redact_url(url)!r} is not usable: {exc}") from None
        sqlite_path = None
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database
            if not database or database == ":memory:" or database.startswith("file:"):
                raise ConfigError(
                    "database.url: use a SQLite file (sqlite:///path/to/syncd.db), not an in-memory database"
                )
            sqlite_path = Path(database).resolve()
            if read_only:
                if not sqlite_path.exists():
                    raise SchemaOutdatedError(
                        f"there is no mirror at {sqlite_path} yet: run `syncd run-once` (or `syncd db upgrade`)"
                    )
                uri = f"file:{quote(str(sqlite_path))}?mode=ro"  # quoted: a '#' or '?' in the path is a name
                parsed = parsed.set(database=uri, query={"uri": "true"})
        elif parsed.get_backend_name() == "postgresql":
            # UTC sessions: timestamps near year 1 or 9999 stay in range whatever the server's TimeZone.
            options = "-c timezone=UTC" + (" -c default_transaction_read_only=on" if read_only else "")
            connect_args["options"] = options
        try:
            self.engine: Engine = create_engine(
                parsed,
                json_serializer=_json_dumps,
                json_deserializer=orjson.loads,
                pool_pre_ping=sqlite_path is None,  # a server connection can drop; a file cannot
                connect_args=connect_args,
            )
        except (ArgumentError, ImportError, ValueError) as exc:
            raise ConfigError(f"database.url {redact_url(url)!r} is not usable: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            _tune_sqlite(self.engine, read_only)
        elif self.engine.dialect.name != "postgresql":
            raise ConfigError(f"database.url: unsupported database {self.engine.dialect.name!r}")
        self.locks = OrgLocks(self.engine, sqlite_path)
        # SQLite has one writer at a time. Threads of this process queue here for their turn instead
        # of in SQLite's busy handler, which sleeps up to 100 ms between tries.
        self._write_turn: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if sqlite_path is not None else contextlib.nullcontext()
        )
        # Results of runs that could not be recorded when they ended; written before the next run starts.
        self._unrecorded: dict[int, dict[str, Any]] = {}
        self._unrecorded_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    @staticmethod
    def check_access(url: str) -> None:
        """ConfigError (or StoreError) naming what keeps syncd from using the mirror at ``url``: for
        SQLite a missing or read-only directory or file (checked, nothing is created), for PostgreSQL
        a server it cannot reach or log in to."""
        parsed = make_url(normalise_url(url))
        if parsed.get_backend_name() == "sqlite":
            path = Path(parsed.database or "").resolve()
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
            return
        store = Store(url)
        try:
            with _translated(f"connecting to {redact_url(store.url)}"), store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            store.close()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    # -- schema ----------------------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision``."""
        from syncd.store import migrate  # Alembic is only loaded when there is something to migrate

        with _translated("upgrading the schema"), self.engine.begin() as conn:
            migrate.upgrade(conn, revision)

    def schema_revision(self) -> str | None:
        """The schema revision the database is at (None for an empty database)."""
        with _translated(f"connecting to {redact_url(self.url)}"), self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def prepare(self, auto_upgrade: bool) -> None:
        """Make sure the schema is current: upgrade it, or refuse to run on an old one.

        A read-only store never upgrades: it names what to run instead.
        """
        head = SCHEMA_REVISION  # a constant, so that a current database never loads Alembic
        current = self.schema_revision()
        if current == head:
            return
        if self.read_only or not auto_upgrade:
            where = redact_url(self.url)
            state = f"is at schema {current}" if current else "has no schema yet"
            why = "" if self.read_only else " and database.auto_upgrade is off"
            raise SchemaOutdatedError(
                f"the mirror {where} {state}, this syncd needs {head}{why}: run `syncd db upgrade`"
                + (" (or `syncd run-once`)" if self.read_only and not current else "")
            )
        self.upgrade()

    # -- runs ------------------------------------------------------------------------------

    def start_run(self, org_id: str, trigger: str, instance: str, now: datetime) -> tuple[int, int]:
        """Open a ``running`` row; earlier ``running`` rows of the org are marked ``aborted``.

        Returns the new run id and how many stale runs were closed. Results of runs of this process
        that could not be recorded when they ended are written first, so no run of a live process
        is taken for an interrupted one.
        """
        with self._unrecorded_lock:
            unrecorded = dict(self._unrecorded)
        with _translated("starting a run"), self.engine.begin() as conn:
            for run_id, values in unrecorded.items():
                conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(values))
            stale = conn.execute(
                update(sync_runs)
                .where(sync_runs.c.org_id == org_id, sync_runs.c.status == "running")
                .values(
                    status="aborted",
                    finished_at=now,
                    error="interrupted: the syncd process running the pass ended before it finished",
                )
            ).rowcount
            run_id = conn.execute(
                insert(sync_runs)
                .values(org_id=org_id, trigger=trigger, instance=instance, started_at=now, status="running")
                .returning(sync_runs.c.id)
            ).scalar_one()
        with self._unrecorded_lock:
            for recorded in unrecorded:
                self._unrecorded.pop(recorded, None)
        return int(run_id), stale

    def finish_run(self, run_id: int, status: str, now: datetime, error: str | None = None) -> None:
        """Close a run with its final status.

        The database may just have failed (perhaps why the pass did), so this is tried again on
        fresh connections for a few seconds. If it still fails, the result is kept and written
        before this process starts its next run, and StoreError says what happened.
        """
        # The error may quote a server; whatever it holds, it must not be what makes the write fail.
        values = {"status": status, "finished_at": now, "error": None if error is None else one_line(error, 2000)}
        for delay in (*BOOKKEEPING_RETRIES, None):
            try:
                with _translated("recording the end of a run"), self.engine.begin() as conn:
                    conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(values))
                return
            except StoreError:
                if delay is None:
                    with self._unrecorded_lock:
                        self._unrecorded[run_id] = values
                    raise
                time.sleep(delay)

    def has_succeeded(self, org_id: str) -> bool:
        """Whether any pass of the org has succeeded (before that, passes load the baseline)."""
        query = select(sync_runs.c.id).where(sync_runs.c.org_id == org_id, sync_runs.c.status == "succeeded")
        with _translated("reading runs"), self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def last_success_size(self, org_id: str) -> int | None:
        """How many devices the newest successful pass of the org saw (None: none has succeeded).
        Only a successful pass counts: a failed one may have seen a server that never stopped."""
        seen = (
            select(sync_runs.c.devices_seen)
            .where(sync_runs.c.org_id == org_id, sync_runs.c.status == "succeeded")
            .order_by(sync_runs.c.id.desc())
            .limit(1)
        )
        with _translated("reading runs"), self.engine.connect() as conn:
            size = conn.execute(seen).scalar()
        return None if size is None else int(size)

    def run(self, run_id: int) -> dict[str, Any]:
        """One sync_runs row as a dict."""
        with _translated("reading a run"), self.engine.connect() as conn:
            return dict(conn.execute(select(sync_runs).where(sync_runs.c.id == run_id)).mappings().one())

    # -- devices ---------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One connection for a series of transactions (a pass's pages): checked out, and on
        PostgreSQL pinged, once rather than for every page."""
        with _translated(f"connecting to {redact_url(self.url)}"), self.engine.connect() as conn:
            yield Session(conn, self._write_turn)

    @contextmanager
    def writer(self) -> Iterator[PageWriter]:
        """One transaction for a page's writes: all of it commits, or none of it."""
        with self.session() as session, session.writer() as writer:
            yield writer

    @contextmanager
    def reader(self) -> Iterator[PageReader]:
        """A read-only transaction (on SQLite it does not wait for writers)."""
        with self.session() as session, session.reader() as reader:
            yield reader

    def live_ids_except(
        self, org_id: str, seen: set[str], integration_id: str | None = None, device_kind: str | None = None
    ) -> list[str]:
        """Ids of the org's non-purged devices (within the filters) that are not in ``seen``.

        Rows are streamed, so only the ids not seen are held in memory.
        """
        query = select(devices.c.id).where(devices.c.org_id == org_id, devices.c.state != "purged")
        if integration_id:
            query = query.where(devices.c.integration_id == integration_id)
        if device_kind:
            query = query.where(devices.c.device_metadata["kind"].as_string() == device_kind)
        with _translated("listing devices"), self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=5000).execute(query).scalars()
            return [device_id for device_id in rows if device_id not in seen]

    def state_counts(self, org_id: str | None = None) -> dict[str, dict[str, int]]:
        """``{org_id: {state: count}}`` over the whole mirror, or one org."""
        query = select(devices.c.org_id, devices.c.state, func.count()).group_by(devices.c.org_id, devices.c.state)
        if org_id is not None:
            query = query.where(devices.c.org_id == org_id)
        counts: dict[str, dict[str, int]] = {}
        with _translated("counting devices"), self.engine.connect() as conn:
            for org, state, count in conn.execute(query):
                counts.setdefault(org, {})[state] = int(count)
        return counts

    def last_successes(self) -> dict[str, datetime]:
        """When each org's newest successful pass finished."""
        query = (
            select(sync_runs.c.org_id, func.max(sync_runs.c.finished_at, type_=UTCDateTime()))
            .where(sync_runs.c.status == "succeeded")
            .group_by(sync_runs.c.org_id)
        )
        with _translated("reading runs"), self.engine.connect() as conn:
            return {str(org_id): finished for org_id, finished in conn.execute(query)}

    def org_overview(self) -> dict[str, dict[str, Any]]:
        """Per org: ``last_run`` (the newest sync_runs row), ``last_success`` (when the newest successful
        pass finished) and ``devices`` (counts by state)."""
        newest = select(func.max(sync_runs.c.id)).group_by(sync_runs.c.org_id)
        overview: dict[str, dict[str, Any]] = {}
        with _translated("reading the status"), self.engine.connect() as conn:
            for row in conn.execute(select(sync_runs).where(sync_runs.c.id.in_(newest))).mappings():
                overview.setdefault(row["org_id"], {})["last_run"] = dict(row)
        for org_id, finished in self.last_successes().items():
            overview.setdefault(org_id, {})["last_success"] = finished
        for org_id, by_state in self.state_counts().items():
            overview.setdefault(org_id, {})["devices"] = by_state
        return overview

    def device(self, device_id: str) -> dict[str, Any] | None:
        """One mirrored device row as a dict, or None."""
        with _translated("reading a device"), self.engine.connect() as conn:
            row = conn.execute(select(devices).where(devices.c.id == device_id)).mappings().one_or_none()
            return dict(row) if row else None

    def devices_of(self, org_id: str) -> list[dict[str, Any]]:
        """Every mirrored device row of an org, by id."""
        query = select(devices).where(devices.c.org_id == org_id).order_by(devices.c.id)
        with _translated("reading devices"), self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def changes(self, org_id: str | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
        """device_changes rows, oldest first, optionally for one org or run."""
        query = select(device_changes).order_by(device_changes.c.id)
        if org_id is not None:
            query = query.where(device_changes.c.org_id == org_id)
        if run_id is not None:
            query = query.where(device_changes.c.run_id == run_id)
        with _translated("reading changes"), self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]


class Session:
    """Transactions on one held connection; see :meth:`Store.session`."""

    def __init__(self, conn: Connection, write_turn: contextlib.AbstractContextManager[Any]) -> None:
        self._conn = conn
        self._write_turn = write_turn

    @contextmanager
    def reader(self) -> Iterator[PageReader]:
        """A read-only transaction (on SQLite it does not wait for writers)."""
        self._conn.execution_options(syncd_read_only=True)
        try:
            with _translated("reading devices"), self._conn.begin():
                yield PageReader(self._conn)
        finally:
            self._conn.execution_options(syncd_read_only=False)

    @contextmanager
    def writer(self, durable: bool = True) -> Iterator[PageWriter]:
        """One transaction for a page's writes: all of it commits, or none of it.

        ``durable=False`` (PostgreSQL): the commit does not wait for the WAL flush. A crash of the
        database server can then lose the newest transactions, each whole; for a page of a pass
        that only means the next pass finds and writes those changes again.
        """
        with self._write_turn, _translated("writing devices"), self._conn.begin():
            if not durable and self._conn.dialect.name == "postgresql":
                self._conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield PageWriter(self._conn)


class PageReader:
    """The reads one page of a pass needs, inside one open transaction.

    This is the hot path of a pass, so it speaks the driver's SQL directly: values are encoded
    once by :class:`_Codec` instead of through SQLAlchemy's per-value type processing.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._codec = _Codec.for_dialect(conn.dialect.name)

    def known(self, ids: Collection[str], seen_before: datetime) -> dict[str, KnownDevice]:
        """``{id: (fingerprint, state, stale)}`` of those ids already mirrored; ``stale`` when last
        seen before ``seen_before``."""
        if not ids:
            return {}
        c = self._codec
        where = f"FROM devices WHERE {c.id_in(ids)}"
        params = (c.time(seen_before), *c.id_params(ids))
        if c.sqlite:
            # One JSON object instead of a row per device: the sqlite3 module gives the GIL away at
            # every row it steps through, and getting it back behind busy threads is what costs.
            sql = f"SELECT json_group_object(id, json_array(fingerprint, state, last_seen_at < ?)) {where}"
            known: dict[str, KnownDevice] = orjson.loads(self._conn.exec_driver_sql(sql, params).scalar_one())
            return known
        sql = f"SELECT id, fingerprint, state, last_seen_at < %s {where}"
        return {row[0]: row[1:] for row in self._conn.exec_driver_sql(sql, params)}

    def previous(self, ids: Collection[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """``{id: (raw, state)}`` as mirrored now, to describe what a change changed."""
        if not ids:
            return {}
        c = self._codec
        rows = self._conn.exec_driver_sql(
            f"SELECT id, raw, state FROM devices WHERE {c.id_in(ids)}", c.id_params(ids)
        ).fetchall()
        return {row[0]: (c.unjson(row[1]), row[2]) for row in rows}


class PageWriter(PageReader):
    """The statements that write one page, inside one open transaction."""

    def execute(self, statement: Executable) -> None:
        """Run one Core statement in this transaction."""
        self._conn.execute(statement)

    def insert_devices(self, new: Sequence[Device], now: datetime) -> None:
        """Add devices seen for the first time."""
        if new:
            c = self._codec
            stamp = c.time(now)
            if c.sqlite:  # the write time is bound once per statement (as ?1), not three times a row
                c.insert(self._conn, c.insert_device_sql, [c.device_values(d) for d in new], lead=(stamp,))
            else:
                self._copy(c.insert_device_sql, [(stamp, stamp, stamp, *c.device_values(d)) for d in new])

    def _copy(self, copy_sql: str, rows: list[tuple[Any, ...]]) -> None:
        """PostgreSQL: load rows with COPY, much cheaper than INSERTs for both sides.

        COPY is psycopg's own API, beneath SQLAlchemy, so driver errors are translated here.
        """
        driver: Any = self._conn.connection.dbapi_connection
        try:
            with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
        except self._conn.dialect.loaded_dbapi.Error as exc:
            detail = " ".join(str(exc).split())
            raise StoreError(f"database error while writing devices: {detail[:300]}") from exc

    def update_devices(self, changed: Sequence[Device], now: datetime) -> None:
        """Rewrite devices whose content changed (un-purging them if they had been purged)."""
        if changed:
            c = self._codec
            stamp = c.time(now)
            self._conn.exec_driver_sql(
                c.update_device_sql, [(stamp, stamp, *c.device_values(d)[1:], d.id) for d in changed]
            )

    def refresh_devices(self, devices: Sequence[Device], now: datetime) -> None:
        """Store a new serialisation of unchanged content: the payload and its fingerprint."""
        if devices:
            c = self._codec
            stamp = c.time(now)
            self._conn.exec_driver_sql(
                c.refresh_device_sql, [(d.raw_json, d.fingerprint, stamp, d.id) for d in devices]
            )

    def touch(self, ids: Collection[str], seen_at: datetime) -> None:
        """Move ``last_seen_at`` forward for unchanged devices."""
        if ids:
            c = self._codec
            self._conn.exec_driver_sql(
                f"UPDATE devices SET last_seen_at = {c.p} WHERE {c.id_in(ids)}",
                (c.time(seen_at), *c.id_params(ids)),
            )

    def mark_purged(self, device_id: str, at: datetime) -> None:
        """Record that OpenApp no longer has this device."""
        self._conn.execute(
            update(devices).where(devices.c.id == device_id).values(state="purged", purged_at=at, last_changed_at=at)
        )

    def add_changes(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append device_changes rows (device_id, org_id, run_id, observed_at, change, diff)."""
        if rows:
            c = self._codec
            values = [
                (
                    r["device_id"],
                    r["org_id"],
                    r["run_id"],
                    c.time(r["observed_at"]),
                    r["change"],
                    c.json(r["diff"]),
                    r.get("source", "sync"),
                    r.get("edit_id"),
                )
                for r in rows
            ]
            c.insert(self._conn, c.insert_change_sql, values)

    def bump_run(self, run_id: int, counters: Mapping[str, int]) -> None:
        """Add to a run's counters (committed with the page they describe)."""
        bumps = [(name, n) for name, n in counters.items() if n and name in RUN_COUNTERS]
        if bumps:
            p = self._codec.p
            sets = ", ".join(f"{name} = {name} + {p}" for name, _ in bumps)
            self._conn.exec_driver_sql(f"UPDATE sync_runs SET {sets} WHERE id = {p}", (*(n for _, n in bumps), run_id))


# What a device's content fills, in the order of _Codec.device_values.
_CONTENT_COLUMNS = (
    "id",
    "org_id",
    "integration_id",
    "zone_id",
    "external_id",
    "name",
    "device_metadata",
    "created_at",
    "updated_at",
    "deleted_at",
    "purge_at",
    "hard_delete_at",
    "state",
    "fingerprint",
    "raw",
)
_JSON_COLUMNS = frozenset({"name", "device_metadata", "raw", "diff"})
SQLITE_ROWS_PER_INSERT = 500  # 500 x 15 values stays far below SQLite's 32,766 bound parameters


@dataclass(frozen=True)
class _Codec:
    """Driver-level placeholders and value encoding for one dialect.

    SQLite stores timestamps as UTC text in SQLAlchemy's format (so Core reads them back) and JSON
    as text; PostgreSQL takes timestamps as UTC text marked ``+00:00`` (or aware datetimes) and
    JSON text cast to jsonb.
    """

    sqlite: bool
    p: str
    insert_device_sql: str  # an INSERT on SQLite, a COPY on PostgreSQL
    update_device_sql: str
    refresh_device_sql: str
    insert_change_sql: str

    @classmethod
    @cache
    def for_dialect(cls, name: str) -> _Codec:
        sqlite = name == "sqlite"
        p = "?" if sqlite else "%s"

        def slot(column: str) -> str:
            return f"{p}::jsonb" if column in _JSON_COLUMNS and not sqlite else p

        # New devices: the write time fills the first three columns. SQLite binds it once (?1) in
        # multi-row INSERTs; PostgreSQL loads them with COPY.
        insert_columns = f"first_seen_at, last_seen_at, last_changed_at, {', '.join(_CONTENT_COLUMNS)}"
        insert_device = (
            f"INSERT INTO devices ({insert_columns}) VALUES (?1, ?1, ?1, {', '.join(['?'] * len(_CONTENT_COLUMNS))})"
            if sqlite
            else f"COPY devices ({insert_columns}) FROM STDIN"
        )
        update_device = (
            f"UPDATE devices SET purged_at = NULL, last_seen_at = {p}, last_changed_at = {p}, "
            f"{', '.join(f'{col} = {slot(col)}' for col in _CONTENT_COLUMNS[1:])} WHERE id = {p}"
        )
        refresh_device = f"UPDATE devices SET raw = {slot('raw')}, fingerprint = {p}, last_seen_at = {p} WHERE id = {p}"
        change_columns = ("device_id", "org_id", "run_id", "observed_at", "change", "diff", "source", "edit_id")
        insert_change = (
            f"INSERT INTO device_changes ({', '.join(change_columns)}) "
            f"VALUES ({', '.join(slot(col) for col in change_columns)})"
        )
        return cls(sqlite, p, insert_device, update_device, refresh_device, insert_change)

    def insert(self, conn: Connection, sql: str, rows: list[tuple[Any, ...]], lead: tuple[Any, ...] = ()) -> None:
        """INSERT many rows. On SQLite as multi-row VALUES statements, stepped once each, rather than
        one step per row (each step gives the GIL away; see PageReader.known); ``lead`` are values
        every row refers to by number (?1, ?2, ...), bound once per statement."""
        if not self.sqlite:
            conn.exec_driver_sql(sql, rows)
            return
        head, _, row_slots = sql.partition(" VALUES ")
        for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
            chunk = rows[start : start + SQLITE_ROWS_PER_INSERT]
            values = ", ".join([row_slots] * len(chunk))
            conn.exec_driver_sql(f"{head} VALUES {values}", (*lead, *(v for row in chunk for v in row)))

    def id_in(self, ids: Collection[str]) -> str:
        """``id`` is one of ``ids`` (bound by :meth:`id_params`). On PostgreSQL one array parameter,
        so the statement text stays the same and the server prepares it once."""
        return f"id IN ({', '.join(['?'] * len(ids))})" if self.sqlite else "id = ANY(%s)"

    def id_params(self, ids: Collection[str]) -> tuple[Any, ...]:
        return tuple(ids) if self.sqlite else (list(ids),)

    def time(self, value: datetime | None) -> Any:
        if value is None or not self.sqlite:
            return value
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        # SQLAlchemy's SQLite format, "YYYY-MM-DD HH:MM:SS.ffffff" (isoformat is 3x faster than strftime).
        return value.isoformat(" ", "microseconds")[:26]

    @staticmethod
    def json(value: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    @staticmethod
    def unjson(value: Any) -> Any:
        return orjson.loads(value) if isinstance(value, str | bytes) else value

    def device_values(self, d: Device) -> tuple[Any, ...]:
        """A device's content in _CONTENT_COLUMNS order."""
        # PostgreSQL: the same UTC text, marked as UTC for timestamptz.
        lifecycle = d.lifecycle if self.sqlite else tuple(None if t is None else t + "+00:00" for t in d.lifecycle)
        return (
            d.id,
            d.org_id,
            d.integration_id,
            d.zone_id,
            d.external_id,
            self.json(d.name),
            self.json(d.device_metadata),
            *lifecycle,
            d.state,
            d.fingerprint,
            d.raw_json,
        )


def _tune_sqlite(engine: Engine, read_only: bool) -> None:
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
            cursor.execute("PRAGMA wal_autocheckpoint=10000")  # checkpoint every ~40 MB of WAL, not every 4 MB
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        reading = read_only or conn.get_execution_options().get("syncd_read_only", False)
        conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")
