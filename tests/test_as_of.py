"""As-of reports against the simulator: random histories (create, rename, move zone, soft delete,
restore, purge, door-restriction changes) with passes in between; at every pass time, and between
passes, the as-of fleet and access list equal the simulator's state at that pass, on both databases.
"""

from __future__ import annotations

import json
import random
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from syncd.api import OpenAppClient
from syncd.cli import main
from syncd.config import OrgSettings, SyncSettings
from syncd.models import normalise_name
from syncd.simulator import Simulator, World
from syncd.simulator.world import make_ulid
from syncd.store import Store
from syncd.store.reports import Reports
from syncd.sync import OrgPass, PassOptions

from .conftest import API_KEY, api_settings, postgres_admin_url

ENTITIES = [make_ulid(1_700_000_000_000 + n, random.Random(n)) for n in range(5)]
PICK = st.integers(0, 10**6)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("rename"), PICK, st.text("abcxyz", min_size=1, max_size=6)),
        st.tuples(st.just("zone"), PICK, st.integers(-1, 4)),
        st.tuples(st.just("delete"), PICK),
        st.tuples(st.just("restore"), PICK),
        st.tuples(st.just("purge"), PICK),
        st.tuples(st.just("create")),
        st.tuples(st.just("restrict"), PICK, st.lists(st.sampled_from(ENTITIES), max_size=3)),
        st.tuples(st.just("pass")),
        st.tuples(st.just("pass")),
    ),
    min_size=1,
    max_size=24,
)


@contextmanager
def fresh_store(kind: str, admin: str | None) -> Iterator[Store]:
    """A new migrated mirror: a SQLite file, or a PostgreSQL database of its own."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            store = Store(f"sqlite:///{Path(folder) / 'mirror.db'}")
            store.upgrade()
            try:
                yield store
            finally:
                store.close()
        return
    assert admin is not None
    name = f"syncd_asof_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store = Store(f"{admin.rpartition('/')[0]}/{name}")
    try:
        store.upgrade()
        yield store
    finally:
        store.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply(world: World, org: str, step: tuple[Any, ...]) -> None:
    """One change to the simulator (a change that does not apply to the device picked is skipped)."""
    ids = world.ids(org)
    if not ids and step[0] != "create":
        return
    device = world.orgs[org].devices[ids[step[1] % len(ids)]] if len(step) > 1 else None
    action = step[0]
    if action == "create":
        world.create_device(org)
    elif action == "rename":
        world.update_device(org, device.id, {"name": {"en": step[2]}})
    elif action == "zone":
        zones = world.orgs[org].zones
        world.update_device(org, device.id, {"zone_id": None if step[2] < 0 else zones[step[2]]})
    elif action == "delete":
        world.delete_device(org, device.id)
    elif action == "restore" and device.deleted_at is not None:
        world.restore_device(org, device.id)
    elif action == "purge":
        world.purge_device(org, device.id)
    elif action == "restrict":
        portals = [d for d in world.orgs[org].devices.values() if d.kind == "virtual_access_portal"]
        if portals:
            portal = portals[step[1] % len(portals)]
            world.set_door_restrictions(org, portal.id, {"listing_entity_ids": step[2]})


def fleet_of(world: World, org: str) -> dict[str, tuple[Any, ...]]:
    """The simulator's devices now, as the mirror's history records them."""
    return {
        raw["id"]: (
            "deleted" if raw.get("deleted_at") else "active",
            normalise_name(raw["name"]),
            raw.get("zone_id"),
            raw.get("integration_id"),
            raw.get("external_id"),
            raw.get("device_metadata"),
        )
        for raw in world.ground_truth(org)
    }


def access_of(world: World, org: str) -> dict[str, set[str | None]]:
    """Who may pass each active portal now (None: anyone)."""
    return {
        d.id: set(d.restrictions) or {None}
        for d in world.orgs[org].devices.values()
        if d.kind == "virtual_access_portal" and d.deleted_at is None
    }


def check_history(kind: str, admin: str | None, history: list[tuple[Any, ...]]) -> None:
    world = World(seed=7)
    (org,) = world.seed(orgs=1, devices_per_org=14, deleted_fraction=0.1, portal_fraction=0.3)
    world.add_key(API_KEY)
    with Simulator(world) as sim, OpenAppClient(api_settings(sim)) as client, fresh_store(kind, admin) as store:
        seen: list[tuple[datetime, dict[str, tuple[Any, ...]], dict[str, set[str | None]]]] = []

        def run_pass() -> None:
            with store.engine.begin() as conn:  # every portal's interval has passed: ask each again
                conn.execute(text("UPDATE portal_restrictions SET next_fetch_at = :t"), {"t": "2000-01-01"})
            outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings(), allow_mass_purge=True)).run()
            assert outcome.status == "succeeded", outcome.error
            seen.append((outcome.finished_at, fleet_of(world, org), access_of(world, org)))

        run_pass()
        for step in history:
            run_pass() if step[0] == "pass" else apply(world, org, step)
        run_pass()

        reports = Reports(store)
        gaps = [seen[i][0] + (seen[i + 1][0] - seen[i][0]) / 1000 for i in range(len(seen) - 1)]
        for at, fleet, access in [*seen, *((gap, f, a) for gap, (_, f, a) in zip(gaps, seen, strict=False))]:
            rows = reports.devices_as_of(at, org)
            got = {
                d.device_id: (d.state, d.name, d.zone_id, d.integration_id, d.external_id, d.device_metadata)
                for d in rows
                if d.state != "purged"
            }
            assert got == fleet, at
            intervals = reports.door_access_as_of(at, org)
            held: dict[str, set[str | None]] = {}
            for interval in intervals:
                held.setdefault(interval.device_id, set()).add(interval.entity_id)
            assert {p: held.get(p, set()) for p in access} == access, at
            purged = {d.device_id for d in rows if d.state == "purged"}
            assert not purged & held.keys(), "a purged portal lets nobody through"
            if kind == "postgresql":
                with store.engine.connect() as conn:
                    function = conn.execute(
                        text("SELECT device_id, state, change_id FROM syncd_devices_as_of(:at, :org)"),
                        {"at": at, "org": org},
                    ).all()
                    doors = conn.execute(
                        text("SELECT device_id, entity_id FROM syncd_door_access_as_of(:at, :org)"),
                        {"at": at, "org": org},
                    ).all()
                    windows = conn.execute(
                        text("SELECT DISTINCT window_from, window_to FROM syncd_devices_as_of(:at, :org)"),
                        {"at": at, "org": org},
                    ).all()
                window = reports.windows(at, [org])[org]
                assert windows == [(window.observed_from, window.observed_to)]
                assert sorted(function) == sorted((d.device_id, d.state, d.change_id) for d in rows)
                assert sorted(doors, key=str) == sorted(((i.device_id, i.entity_id) for i in intervals), key=str)
        before = reports.devices_as_of(seen[0][0] - timedelta(days=1), org)
        assert before == []  # nothing is known before the first pass


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps)
def test_as_of_equals_the_simulator_at_every_pass_on_sqlite(history: list[tuple[Any, ...]]) -> None:
    check_history("sqlite", None, history)


@pytest.mark.skipif(not postgres_admin_url(), reason="PostgreSQL tests need SYNCD_TEST_POSTGRES_URL")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps)
def test_as_of_equals_the_simulator_at_every_pass_on_postgresql(history: list[tuple[Any, ...]]) -> None:
    admin = (postgres_admin_url() or "").replace("postgresql+psycopg://", "postgresql://")
    check_history("postgresql", admin, history)


def test_report_commands_print_the_fleet_and_door_access(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI on a mirror with history: the table, csv and json forms, a portal's periods, bad input."""
    world = World(seed=3)
    (org,) = world.seed(orgs=1, devices_per_org=20, portal_fraction=0.5)
    world.add_key(API_KEY)
    db = tmp_path / "mirror.db"
    with Simulator(world) as sim, OpenAppClient(api_settings(sim)) as client:
        store = Store(f"sqlite:///{db}")
        store.upgrade()
        first = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        portal = next(
            d for d in world.orgs[org].devices.values() if d.kind == "virtual_access_portal" and d.deleted_at is None
        )
        world.set_door_restrictions(org, portal.id, {"listing_entity_ids": ENTITIES[:2]})
        victim = next(i for i in world.ids(org) if world.orgs[org].devices[i].deleted_at is None and i != portal.id)
        world.delete_device(org, victim)
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE portal_restrictions SET next_fetch_at = :t"), {"t": "2000-01-01"})
        second = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        store.close()
    config = tmp_path / "syncd.toml"
    config.write_text(
        f'[api]\nbase_url = "http://127.0.0.1:9/api/v1"\n[database]\nurl = "sqlite:///{db}"\n[[orgs]]\nid = "{org}"\n'
    )
    between = first.finished_at + (second.started_at - first.finished_at) / 2
    stamp = between.astimezone(UTC).isoformat()
    capsys.readouterr()  # the passes' log lines
    assert main(["report", "as-of", "--config", str(config), "--at", stamp, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["rows"]) == 20 and document["windows"][0]["from_run_id"] == first.run_id
    assert {r["device_id"]: r["state"] for r in document["rows"]}[victim] == "active"
    now = datetime.now(UTC).isoformat()
    assert main(["report", "as-of", "--config", str(config), "--at", now, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("org_id,device_id,state") and len(lines) == 21
    assert any(line.startswith(f"{org},{victim},deleted") for line in lines)
    assert main(["report", "door-access", "--config", str(config), "--portal", portal.id]) == 0
    out, err = capsys.readouterr()
    assert all(e in out for e in ENTITIES[:2]) and "periods" in err, (out, err)
    with pytest.raises(SystemExit):
        main(["report", "as-of", "--config", str(config), "--at", "yesterday-ish"])
    assert "ISO 8601" in capsys.readouterr().err
    assert main(["report", "door-access", "--config", str(config), "--portal", "../x"]) == 2
    assert "not a device id" in capsys.readouterr().err


def test_history_written_before_the_upgrade_is_rebuilt(database_url: str) -> None:
    """A mirror with history from before 0010 (made here by going down to 0009, which drops what 0010
    records) comes back up with the same device versions, and with door access from its lists."""
    from alembic import command

    from syncd.store import migrate

    world = World(seed=11)
    (org,) = world.seed(orgs=1, devices_per_org=30, portal_fraction=0.3)
    world.add_key(API_KEY)
    store = Store(database_url)
    store.upgrade()
    times = []
    with Simulator(world) as sim, OpenAppClient(api_settings(sim)) as client:
        for round_ in range(4):
            ids = world.ids(org)
            world.update_device(org, ids[round_], {"name": {"en": f"renamed {round_}"}, "zone_id": None})
            world.delete_device(org, ids[round_ + 5])
            world.purge_device(org, ids[round_ + 10])
            world.create_device(org)
            portals = [d for d in world.orgs[org].devices.values() if d.kind == "virtual_access_portal"]
            world.set_door_restrictions(org, portals[round_].id, {"listing_entity_ids": ENTITIES[round_:]})
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE portal_restrictions SET next_fetch_at = :t"), {"t": "2000-01-01"})
            outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings(), allow_mass_purge=True)).run()
            assert outcome.status == "succeeded", outcome.error
            times.append(outcome.finished_at)
    reports = Reports(store)
    fleets = [reports.devices_as_of(at, org) for at in times]
    access_now = {(i.device_id, i.entity_id) for i in reports.door_access_as_of(times[-1], org)}
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0009")
    store.upgrade()
    for at, fleet in zip(times, fleets, strict=True):
        again = reports.devices_as_of(at, org)
        assert [(d.device_id, d.state, d.name, d.zone_id, d.valid_from) for d in again] == [
            (d.device_id, d.state, d.name, d.zone_id, d.valid_from) for d in fleet
        ]
    assert {(i.device_id, i.entity_id) for i in reports.door_access_as_of(times[-1], org)} == access_now
    store.close()
