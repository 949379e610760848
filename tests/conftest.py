"""Shared fixtures: the simulator over loopback HTTP, and real SQLite / PostgreSQL databases.

PostgreSQL tests take the server from ``SYNCD_TEST_POSTGRES_URL`` (``.ci/run`` sets it) and skip with
that reason when it is unset. Each test gets an empty schema in a database of its own session.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from syncd.api import OpenAppClient
from syncd.config import ApiSettings, Config, DatabaseSettings, OrgSettings, RetryPolicy, Secret, SyncSettings
from syncd.simulator import Simulator, World
from syncd.store import Store
from syncd.sync import OrgPass, PassOptions, PassOutcome

API_KEY = "oa_test_" + "k3y" * 8
PG_ENV = "SYNCD_TEST_POSTGRES_URL"
FAST_RETRY = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, max_retry_after=2.0, deadline=20.0)


def postgres_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for this test session (URL in SQLAlchemy form)."""
    admin = postgres_admin_url()
    if not admin:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    name = f"syncd_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = plain.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mirror.db'}"
    url: str = request.getfixturevalue("postgres_database")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated mirror database."""
    s = Store(database_url)
    s.upgrade()
    yield s
    s.close()


@pytest.fixture
def world() -> World:
    """Two orgs of 450 devices each (three pages at 200), some soft-deleted."""
    w = World(seed=42)
    w.seed(orgs=2, devices_per_org=450)
    w.add_key(API_KEY)
    return w


@pytest.fixture
def sim(world: World) -> Iterator[Simulator]:
    """The simulator serving ``world`` on 127.0.0.1; strict about the query booleans syncd must send."""
    with Simulator(world, strict_query=True) as s:
        yield s


def api_settings(sim: Simulator, **overrides: Any) -> ApiSettings:
    settings = ApiSettings(base_url=sim.url, api_key=Secret(API_KEY), retry=FAST_RETRY, read_timeout=10.0)
    return replace(settings, **overrides)


def make_config(sim: Simulator, database_url: str, **sync: Any) -> Config:
    return Config(
        api=api_settings(sim),
        database=DatabaseSettings(url=database_url),
        orgs=tuple(OrgSettings(o) for o in sim.world.orgs),
        sync=SyncSettings(**sync),
    )


@pytest.fixture
def client(sim: Simulator) -> Iterator[OpenAppClient]:
    """An API client for ``sim`` that retries quickly."""
    with OpenAppClient(api_settings(sim)) as c:
        yield c


class Syncer:
    """Runs passes of one org against the simulator into the store."""

    def __init__(self, client: OpenAppClient, store: Store, settings: SyncSettings | None = None) -> None:
        self.client = client
        self.store = store
        self.settings = settings or SyncSettings()

    def __call__(self, org_id: str, **kwargs: Any) -> PassOutcome:
        return OrgPass(self.client, self.store, PassOptions(OrgSettings(org_id), self.settings, **kwargs)).run()


@pytest.fixture
def sync(client: OpenAppClient, store: Store) -> Syncer:
    return Syncer(client, store)


@pytest.fixture
def org(world: World) -> str:
    return next(iter(world.orgs))


@pytest.fixture
def mirrored(sync: Syncer, org: str) -> str:
    """The org, mirrored once."""
    assert sync(org).status == "succeeded"
    return org


@pytest.fixture
def wb_client(sim: Simulator) -> Iterator[OpenAppClient]:
    """A write-back client for ``sim`` that tries each request once (the reconciler retries)."""
    with OpenAppClient(api_settings(sim, retry=replace(FAST_RETRY, max_attempts=1))) as client:
        yield client


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``main()`` configures logging for the process; undo it so later tests do not write to closed streams."""
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()
