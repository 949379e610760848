"""Schema and migrations, on both databases."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from syncd.errors import ConfigError, SchemaOutdatedError, StoreError
from syncd.models import HistoryRow, history_row
from syncd.store import Store, migrate
from syncd.store import store as store_module
from syncd.store.migrate import head_revision
from syncd.store.schema import SCHEMA_REVISION, metadata

from .conftest import PG_ENV, Syncer


def test_migrations_and_models_agree(database_url: str) -> None:
    store = Store(database_url)
    store.upgrade()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []
    assert store.schema_revision() == head_revision()
    store.close()


def test_the_schema_revision_constant_is_the_newest_migration() -> None:
    assert head_revision() == SCHEMA_REVISION


def test_downgrade_to_empty_and_back(database_url: str) -> None:
    store = Store(database_url)
    store.upgrade()
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "base")
    assert store.schema_revision() is None
    store.upgrade()
    assert store.schema_revision() == head_revision()
    store.close()


def test_prepare_refuses_an_old_schema_unless_allowed(database_url: str) -> None:
    store = Store(database_url)
    with pytest.raises(SchemaOutdatedError, match="syncd db upgrade"):
        store.prepare(auto_upgrade=False)
    store.prepare(auto_upgrade=True)
    store.prepare(auto_upgrade=False)  # now current
    store.close()


def test_timestamps_round_trip_as_aware_utc(store: Store) -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    run_id, _ = store.start_run("org", "run-once", "host:1", local)
    started = store.run(run_id)["started_at"]
    assert started == local and started.tzinfo == UTC


def test_database_errors_become_store_errors(store: Store) -> None:
    nobody = history_row("01HK153X0038NZ3ZA2MABNBN61", "o", datetime.now(UTC), "restrictions", {}, None)
    with pytest.raises(StoreError, match="database error while writing devices"), store.writer() as writer:
        writer.add_history([nobody])  # violates the foreign key: no such device


def test_unusable_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unsupported database 'nosuchdb'"):
        Store("nosuchdb://x")
    with pytest.raises(ConfigError, match="not usable"):
        Store("::not a url::")


def test_page_transactions_may_skip_the_wal_flush_and_nothing_else_does(postgres_database: str) -> None:
    store = Store(postgres_database)

    def synchronous_commit(durable: bool) -> str:
        with store.session() as session, session.writer(durable=durable) as writer:
            return str(writer._conn.exec_driver_sql("SHOW synchronous_commit").scalar())

    try:
        assert synchronous_commit(durable=False) == "off"
        assert synchronous_commit(durable=True) == "on"  # SET LOCAL ended with the page's transaction
    finally:
        store.close()


@contextmanager
def database_down(database_url: str, seconds: float | None) -> Iterator[None]:
    """PostgreSQL refuses connections to the database and drops those it has, as during a restart;
    it takes them again after ``seconds`` (None: at the end of the block)."""
    admin = os.environ[PG_ENV].replace("postgresql+psycopg://", "postgresql://")
    name = database_url.rsplit("/", 1)[1]

    def allow() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    timer = threading.Timer(seconds, allow) if seconds is not None else None
    if timer:
        timer.start()
    try:
        yield
    finally:
        if timer:
            timer.join()
        allow()


def test_a_pass_cut_off_by_a_database_restart_keeps_its_error_and_its_record(
    postgres_database: str, client: Any, world: Any, org: str
) -> None:
    store = Store(postgres_database)
    store.upgrade()
    cut = ExitStack()

    def restart_after_the_first_page(org_id: str, pages: int, seen: int) -> None:
        if pages == 1:
            cut.enter_context(database_down(postgres_database, seconds=1.0))

    try:
        outcome = Syncer(client, store)(org, on_progress=restart_after_the_first_page)
        cut.close()
        assert outcome.status == "failed" and "database error" in (outcome.error or "")
        run = store.run(outcome.run_id)  # recorded once the database took connections again
        assert (run["status"], run["error"]) == ("failed", outcome.error)
        assert Syncer(client, store)(org).status == "succeeded"
    finally:
        cut.close()
        store.close()


def test_a_result_that_cannot_be_recorded_is_written_before_the_next_run(
    postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "BOOKKEEPING_RETRIES", (0.05,))
    store = Store(postgres_database)
    store.upgrade()
    try:
        run_id, _ = store.start_run("org", "run-once", "host:1", datetime.now(UTC))
        with database_down(postgres_database, seconds=None), pytest.raises(StoreError):
            store.finish_run(run_id, "failed", datetime.now(UTC), "the original error")
        assert store.run(run_id)["status"] == "running"
        store.start_run("org", "run-once", "host:1", datetime.now(UTC))
        run = store.run(run_id)
        assert (run["status"], run["error"]) == ("failed", "the original error")  # not "interrupted"
    finally:
        store.close()


def test_a_read_only_store_never_creates_writes_or_locks(tmp_path: Path) -> None:
    path = tmp_path / "mirror.db"
    with pytest.raises(SchemaOutdatedError, match="no mirror at"):
        Store(f"sqlite:///{path}", read_only=True)
    assert not path.exists()
    writer = Store(f"sqlite:///{path}")
    writer.upgrade()
    reader = Store(f"sqlite:///{path}", read_only=True)
    try:
        with writer.writer():  # a writer holds SQLite's write lock...
            started = time.monotonic()
            reader.prepare(auto_upgrade=False)
            assert reader.org_overview() == {}  # ...and the reader does not wait for it
            assert time.monotonic() - started < 2
        with pytest.raises(StoreError, match="readonly"):
            reader.start_run("org", "run-once", "host:1", datetime.now(UTC))
    finally:
        reader.close()
        writer.close()


def test_a_read_only_store_names_the_command_for_an_old_schema(database_url: str) -> None:
    Store(database_url).close()
    if database_url.startswith("sqlite"):
        Path(database_url.removeprefix("sqlite:///")).touch()
    reader = Store(database_url, read_only=True)
    try:
        with pytest.raises(SchemaOutdatedError) as caught:
            reader.prepare(auto_upgrade=True)
        assert "run `syncd db upgrade`" in str(caught.value) and "auto_upgrade is off" not in str(caught.value)
    finally:
        reader.close()


def test_a_read_only_store_takes_odd_paths_as_names(tmp_path: Path) -> None:
    odd = tmp_path / "mirror #1.db"  # '#' would end the path in the read-only URI were it not quoted
    writer = Store(f"sqlite:///{odd}")
    writer.upgrade()
    writer.close()
    reader = Store(f"sqlite:///{odd}", read_only=True)
    try:
        reader.prepare(auto_upgrade=False)  # the schema is found: it is this file that was opened
        assert reader.org_overview() == {}
    finally:
        reader.close()
    assert {p.name for p in tmp_path.iterdir()} <= {odd.name, f"{odd.name}-wal", f"{odd.name}-shm"}


def test_the_fast_path_follows_the_schema(database_url: str) -> None:
    # The page statements take their columns from schema.py; device_values must fill them in order.
    from syncd.models import parse_device
    from syncd.store.dialect import CONTENT_COLUMNS, dialect_for

    raw = {
        "id": "01HK153X0038NZ3ZA2MABNBN61",
        "org_id": "org-a",
        "integration_id": "int-b",
        "zone_id": "zone-c",
        "external_id": "ext-d",
        "name": {"en": "Door"},
        "device_metadata": {"kind": "gate"},
        "credentials_set": ["/auth_key"],
        "created_at": "2024-01-01T00:00:01.000000Z",
        "updated_at": "2024-01-01T00:00:02.000000Z",
        "deleted_at": "2024-01-01T00:00:03.000000Z",
        "purge_at": "2024-01-01T00:00:04.000000Z",
        "hard_delete_at": "2024-01-01T00:00:05.000000Z",
    }
    device = parse_device(raw)
    store = Store(database_url)
    store.upgrade()
    try:
        dialect = dialect_for(store.dialect)
        assert len(dialect.device_values(device)) == len(CONTENT_COLUMNS)
        with store.writer() as writer:
            writer.insert_devices([device], datetime.now(UTC))
        row = store.device(device.id)
        assert row is not None
        for column in CONTENT_COLUMNS:
            expected = getattr(device, column) if column != "raw" else device.raw
            assert row[column] == expected, column
    finally:
        store.close()


def test_history_rows_follow_the_schema(database_url: str) -> None:
    # A HistoryRow is the driver's row of device_changes: its fields are the table's columns, in order.
    from syncd.models import HISTORY_FIELDS, parse_device
    from syncd.store.dialect import CHANGE_COLUMNS, COPY_FROM_ROWS

    assert HistoryRow._fields == CHANGE_COLUMNS and HistoryRow._fields[-len(HISTORY_FIELDS) :] == HISTORY_FIELDS
    raw = {"id": "01HK153X0038NZ3ZA2MABNBN61", "org_id": "org-a", "integration_id": "int-b", "zone_id": "zone-c"}
    raw |= {"external_id": "ext-d", "name": {"en": "Door"}, "device_metadata": {"kind": "gate", "n": [1.5, None]}}
    device = parse_device(raw)
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    store = Store(database_url)
    store.upgrade()
    try:
        with store.writer() as writer:
            writer.insert_devices([device], now)
            edited = history_row(
                device.id,
                "org-a",
                now,
                "updated",
                {"zone_id": {"old": "z", "new": "zone-c"}},
                device,
                edit_id=7,
                provenance={"requested_by": "ann", "approved_by": "bob"},
            )
            mirrored = {**writer.history_values(device.id), "state": "purged"}
            purged = history_row(
                device.id, "org-a", now, "purged", {"state": {"old": "active", "new": "purged"}}, mirrored
            )
            writer.add_history([edited])  # one row: an INSERT
            writer.add_history([purged] * COPY_FROM_ROWS)  # a page's worth: COPY on PostgreSQL
        rows = store.changes("org-a")
        assert len(rows) == 1 + COPY_FROM_ROWS
        for written, read in ((edited, rows[0]), (purged, rows[-1])):
            assert {column: read[column] for column in CHANGE_COLUMNS} == written._asdict()
    finally:
        store.close()


def test_a_scheduled_pass_is_claimed_once_per_interval_on_postgresql(store: Store) -> None:
    org = "01HORG00000000000000000000"
    assert store.claim_scheduled_pass(org, 60, "a:1") == 0.0
    again = store.claim_scheduled_pass(org, 60, "b:2")
    if store.dialect == "sqlite":  # one daemon per file: nothing to share
        assert again == 0.0
        return
    assert 59 < again <= 60  # another daemon: due in about a minute, by the database's clock
    assert store.claim_scheduled_pass(org, 60, "a:1") == 0.0  # its own timer spaces a daemon's passes
    assert store.claim_scheduled_pass(org, 60, "b:2") > 59  # and that pass is the last one now
    assert store.claim_scheduled_pass("01HORG00000000000000000001", 60, "b:2") == 0.0  # per org
    store.release_scheduled_pass(org, "b:2")  # not b's claim: nothing changes
    assert store.claim_scheduled_pass(org, 60, "b:2") > 0
    store.release_scheduled_pass(org, "a:1")  # a's pass was stopped: it does not count
    assert store.claim_scheduled_pass(org, 60, "b:2") == 0.0
    time.sleep(0.05)
    assert store.claim_scheduled_pass(org, 0.01, "a:1") == 0.0  # its interval has passed


def test_a_migration_behind_a_long_reader_gives_up_instead_of_hanging(postgres_database: str) -> None:
    """PostgreSQL: a migration that cannot get its table lock in time fails (nothing half-done), and
    only one migrator runs at a time: the second waits for the first's advisory lock."""
    store = Store(postgres_database)
    store.upgrade()
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0009")
    plain = postgres_database.replace("postgresql+psycopg://", "postgresql://")
    failures: list[BaseException] = []

    def migrate_behind_the_reader() -> None:
        try:
            with store_module.translated("upgrading the schema"), store.engine.begin() as conn:
                migrate.upgrade(conn, lock_timeout_ms=300)
        except BaseException as exc:
            failures.append(exc)

    with psycopg.connect(plain) as reader:
        reader.execute("SELECT count(*) FROM device_changes")  # a report's transaction holds its table
        attempt = threading.Thread(target=migrate_behind_the_reader)
        attempt.start()
        attempt.join(timeout=10)  # without the timeout it would wait for the reader: bounded here
        reader.rollback()
    attempt.join(timeout=30)
    assert len(failures) == 1 and isinstance(failures[0], StoreError) and "lock timeout" in str(failures[0])
    assert store.schema_revision() == "0009"  # the failed upgrade left nothing behind
    with psycopg.connect(plain, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (migrate.UPGRADE_LOCK_KEY,))  # another migrator
        done = threading.Event()
        upgrade = threading.Thread(target=lambda: (store.upgrade(), done.set()))
        upgrade.start()
        assert not done.wait(1.0)  # it waits its turn
        other.execute("SELECT pg_advisory_unlock(%s)", (migrate.UPGRADE_LOCK_KEY,))
        upgrade.join(timeout=60)
    assert done.is_set() and store.schema_revision() == SCHEMA_REVISION
    store.close()
