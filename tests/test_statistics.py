"""The store analyzes the tables a pass grows (PostgreSQL): when, and never waiting for a lock."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import Connection, create_engine, text

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.simulator import Simulator
from syncd.store import Store
from syncd.store import statistics as statistics_module
from syncd.store.dialect import dialect_for
from syncd.store.statistics import MIN_ROWS, PlannerStatistics
from syncd.store.store import normalise_url
from syncd.sync import OrgPass, PassOptions

from .conftest import api_settings
from .test_details import large_world


@pytest.fixture
def conn(postgres_database: str) -> Iterator[Connection]:
    with psycopg.connect(postgres_database, autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS stats_probe")
        admin.execute("CREATE TABLE stats_probe (id int)")
    engine = create_engine(normalise_url(postgres_database))
    with engine.connect() as connection:
        yield connection
    engine.dispose()


def insert(conn: Connection, rows: int) -> dict[str, int]:
    with conn.begin():
        conn.execute(text("INSERT INTO stats_probe SELECT generate_series(1, :n)"), {"n": rows})
    return {"stats_probe": rows}


def last_analyzed(conn: Connection) -> float:
    with conn.begin():
        found = conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'stats_probe'")).scalar_one()
    return float(found)


def test_a_table_is_analyzed_each_time_it_has_doubled(conn: Connection) -> None:
    stats = PlannerStatistics(dialect_for("postgresql"))
    stats.after_commit(conn, insert(conn, MIN_ROWS - 1))
    assert stats.analyzed["stats_probe"] == 0  # too few rows to be worth it
    stats.after_commit(conn, insert(conn, 1))
    assert stats.analyzed["stats_probe"] == 1
    assert last_analyzed(conn) == MIN_ROWS
    stats.after_commit(conn, insert(conn, MIN_ROWS - 1))
    assert stats.analyzed["stats_probe"] == 1  # not yet as many again as it had then
    stats.after_commit(conn, insert(conn, 1))
    assert stats.analyzed["stats_probe"] == 2
    assert last_analyzed(conn) == 2 * MIN_ROWS
    for _ in range(14):  # 2,000 -> 16,000 rows, a thousand at a time: analyzed at 4,000, 8,000, 16,000
        stats.after_commit(conn, insert(conn, MIN_ROWS))
    assert stats.analyzed["stats_probe"] == 5


def test_a_table_analyzed_before_counts_from_its_size_then(conn: Connection) -> None:
    insert(conn, 5 * MIN_ROWS)
    with conn.begin():
        conn.execute(text("ANALYZE stats_probe"))
    stats = PlannerStatistics(dialect_for("postgresql"))  # a new process: the table had 5,000 rows at its last ANALYZE
    stats.after_commit(conn, insert(conn, 4 * MIN_ROWS))
    assert stats.analyzed["stats_probe"] == 0
    stats.after_commit(conn, insert(conn, MIN_ROWS))
    assert stats.analyzed["stats_probe"] == 1


def test_it_never_waits_for_a_lock_and_the_connection_stays_usable(conn: Connection, postgres_database: str) -> None:
    stats = PlannerStatistics(dialect_for("postgresql"))
    with psycopg.connect(postgres_database) as other:
        other.execute("LOCK TABLE stats_probe IN SHARE UPDATE EXCLUSIVE MODE")  # as a VACUUM would hold it
        started = time.monotonic()
        stats.after_commit(conn, insert(conn, MIN_ROWS))
        assert time.monotonic() - started < 5
        assert stats.analyzed["stats_probe"] == 0
        other.rollback()
    assert insert(conn, 1)  # the connection is usable
    stats.after_commit(conn, insert(conn, 2 * MIN_ROWS))  # tried again once as many rows more came
    assert stats.analyzed["stats_probe"] == 1


def test_a_first_sync_analyzes_the_door_tables_on_postgresql(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statistics_module, "MIN_ROWS", 40)
    world = large_world()  # 300 portals
    org = next(iter(world.orgs))
    with Simulator(world) as sim, OpenAppClient(api_settings(sim, page_size=50)) as client:
        outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
    assert outcome.status == "succeeded", outcome.error
    if store.dialect == "sqlite":
        assert store.statistics is None  # SQLite uses the indexes without statistics
        return
    assert store.statistics is not None
    analyzed = store.statistics.analyzed
    assert 1 <= analyzed["door_access_intervals"] <= 4 and 1 <= analyzed["door_restrictions"] <= 4, analyzed
