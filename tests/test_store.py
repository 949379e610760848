"""Schema and migrations, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from syncd.errors import ConfigError, SchemaOutdatedError, StoreError
from syncd.store import Store, migrate
from syncd.store.migrate import head_revision
from syncd.store.schema import SCHEMA_REVISION, metadata


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
    with pytest.raises(StoreError, match="database error while writing devices"), store.writer() as writer:
        writer.add_changes(
            [
                {
                    "device_id": "nope",
                    "org_id": "o",
                    "run_id": None,
                    "observed_at": datetime.now(UTC),
                    "change": "exploded",
                    "diff": None,
                }
            ]
        )  # violates the CHECK (and the foreign key)


def test_unusable_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="not usable"):
        Store("nosuchdb://x")


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
