"""Reads and writes of the mirror. SQLAlchemy errors become :class:`StoreError` here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from syncd.errors import ConfigError, SchemaOutdatedError, StoreError
from syncd.store import migrate
from syncd.store.schema import RUN_COUNTERS, device_changes, devices, sync_runs

UPDATABLE_COLUMNS = (
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
    "purged_at",
    "last_seen_at",
    "last_changed_at",
    "fingerprint",
    "raw",
)


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
        raise StoreError(f"database error while {action}: {detail[:300]}") from exc


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """What a page comparison needs to know about an already mirrored device."""

    fingerprint: str
    state: str
    last_seen_at: datetime


class Store:
    """The mirror database (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        try:
            self.engine: Engine = create_engine(
                self.url, json_serializer=_json_dumps, json_deserializer=orjson.loads, pool_pre_ping=True
            )
        except (ArgumentError, ImportError, ValueError) as exc:
            raise ConfigError(f"database.url {redact_url(url)!r} is not usable: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            _tune_sqlite(self.engine)
        elif self.engine.dialect.name != "postgresql":
            raise ConfigError(f"database.url: unsupported database {self.engine.dialect.name!r}")

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

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
        with _translated("upgrading the schema"), self.engine.begin() as conn:
            migrate.upgrade(conn, revision)

    def schema_revision(self) -> str | None:
        """The schema revision the database is at."""
        with _translated(f"connecting to {redact_url(self.url)}"), self.engine.connect() as conn:
            return migrate.current_revision(conn)

    def prepare(self, auto_upgrade: bool) -> None:
        """Make sure the schema is current: upgrade it, or refuse to run on an old one."""
        head = migrate.head_revision()
        if self.schema_revision() == head:
            return
        if not auto_upgrade:
            raise SchemaOutdatedError(
                f"the database schema is not at {head} and database.auto_upgrade is off: run `syncd db upgrade`"
            )
        self.upgrade()

    # -- runs ------------------------------------------------------------------------------

    def start_run(self, org_id: str, trigger: str, instance: str, now: datetime) -> tuple[int, int]:
        """Open a ``running`` row; earlier ``running`` rows of the org are marked ``aborted``.

        Returns the new run id and how many stale runs were closed.
        """
        with _translated("starting a run"), self.engine.begin() as conn:
            stale = conn.execute(
                update(sync_runs)
                .where(sync_runs.c.org_id == org_id, sync_runs.c.status == "running")
                .values(
                    status="aborted", finished_at=now, error="interrupted: the process ended before the pass finished"
                )
            ).rowcount
            run_id = conn.execute(
                insert(sync_runs)
                .values(org_id=org_id, trigger=trigger, instance=instance, started_at=now, status="running")
                .returning(sync_runs.c.id)
            ).scalar_one()
        return int(run_id), stale

    def finish_run(self, run_id: int, status: str, now: datetime, error: str | None = None) -> None:
        """Close a run with its final status."""
        with _translated("finishing a run"), self.engine.begin() as conn:
            conn.execute(
                update(sync_runs).where(sync_runs.c.id == run_id).values(status=status, finished_at=now, error=error)
            )

    def run(self, run_id: int) -> dict[str, Any]:
        """One sync_runs row as a dict."""
        with _translated("reading a run"), self.engine.connect() as conn:
            return dict(conn.execute(select(sync_runs).where(sync_runs.c.id == run_id)).mappings().one())

    # -- devices ---------------------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator[PageWriter]:
        """One transaction for a page's writes: all of it commits, or none of it."""
        with _translated("writing devices"), self.engine.begin() as conn:
            yield PageWriter(conn)

    def count_live(self, org_id: str) -> int:
        """Mirrored devices of an org that are not purged."""
        with _translated("counting devices"), self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(devices)
                    .where(devices.c.org_id == org_id, devices.c.state != "purged")
                ).scalar_one()
            )

    def live_ids_except(
        self, org_id: str, seen: set[str], integration_id: str | None = None, device_kind: str | None = None
    ) -> list[str]:
        """Ids of the org's non-purged devices (within the filters) that are not in ``seen``.

        Rows are streamed, so only the ids not seen are held in memory.
        """
        query = select(devices.c.id, devices.c.device_metadata if device_kind else devices.c.id).where(
            devices.c.org_id == org_id, devices.c.state != "purged"
        )
        if integration_id:
            query = query.where(devices.c.integration_id == integration_id)
        missing = []
        with _translated("listing devices"), self.engine.connect() as conn:
            for device_id, extra in conn.execution_options(yield_per=5000).execute(query):
                if device_id in seen:
                    continue
                if device_kind and not (isinstance(extra, dict) and extra.get("kind") == device_kind):
                    continue
                missing.append(device_id)
        return missing

    def state_counts(self) -> dict[str, dict[str, int]]:
        """``{org_id: {state: count}}`` over the whole mirror."""
        query = select(devices.c.org_id, devices.c.state, func.count()).group_by(devices.c.org_id, devices.c.state)
        counts: dict[str, dict[str, int]] = {}
        with _translated("counting devices"), self.engine.connect() as conn:
            for org_id, state, count in conn.execute(query):
                counts.setdefault(org_id, {})[state] = int(count)
        return counts

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


class PageWriter:
    """The statements one page of a pass needs, inside one open transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def known(self, ids: Iterable[str]) -> dict[str, KnownDevice]:
        """Fingerprint, state and last sighting of those ids that are already mirrored."""
        query = select(devices.c.id, devices.c.fingerprint, devices.c.state, devices.c.last_seen_at).where(
            devices.c.id.in_(list(ids))
        )
        return {row[0]: KnownDevice(row[1], row[2], row[3]) for row in self._conn.execute(query)}

    def previous(self, ids: Iterable[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """``{id: (raw, state)}`` as mirrored now, to describe what a change changed."""
        query = select(devices.c.id, devices.c.raw, devices.c.state).where(devices.c.id.in_(list(ids)))
        return {row[0]: (row[1], row[2]) for row in self._conn.execute(query)}

    def insert_devices(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add devices seen for the first time."""
        if rows:
            self._conn.execute(insert(devices), rows)

    def update_devices(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite changed devices (each row carries every updatable column plus ``id``)."""
        if rows:
            stmt = (
                update(devices)
                .where(devices.c.id == bindparam("b_id"))
                .values({name: bindparam(name) for name in UPDATABLE_COLUMNS})
            )
            self._conn.execute(stmt, [{"b_id": row["id"], **{k: row[k] for k in UPDATABLE_COLUMNS}} for row in rows])

    def touch(self, ids: list[str], seen_at: datetime) -> None:
        """Move ``last_seen_at`` forward for unchanged devices."""
        if ids:
            self._conn.execute(update(devices).where(devices.c.id.in_(ids)).values(last_seen_at=seen_at))

    def mark_purged(self, device_id: str, at: datetime) -> None:
        """Record that OpenApp no longer has this device."""
        self._conn.execute(
            update(devices).where(devices.c.id == device_id).values(state="purged", purged_at=at, last_changed_at=at)
        )

    def add_changes(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append device_changes rows."""
        if rows:
            self._conn.execute(insert(device_changes), rows)

    def bump_run(self, run_id: int, counters: Mapping[str, int]) -> None:
        """Add to a run's counters (committed with the page they describe)."""
        values = {name: sync_runs.c[name] + n for name, n in counters.items() if n and name in RUN_COUNTERS}
        if values:
            self._conn.execute(update(sync_runs).where(sync_runs.c.id == run_id).values(values))


def _tune_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, foreign keys, and BEGIN IMMEDIATE so concurrent writers queue up
    instead of failing on a read-to-write lock upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
