"""Write-back: queued local edits reach OpenApp (the simulator) and come back into the mirror."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from syncd.api import OpenAppClient
from syncd.cli import main
from syncd.config import WritebackSettings
from syncd.edits import queue_edit
from syncd.errors import ConfigError
from syncd.health import AuthGate
from syncd.reconcile import Reconciler
from syncd.simulator import Fault, SimError, Simulator, World
from syncd.simulator.world import org_id_for
from syncd.store import Store
from syncd.store.edits import EditQueue

from .conftest import API_KEY, FAST_RETRY, Syncer, api_settings
from .test_cli import KEY_ENV, run_cli, write_config

ORGS = frozenset(org_id_for(i) for i in range(2))  # the orgs of the `world` fixture
FAST = WritebackSettings(interval=0.2, max_attempts=5, base_delay=0.05, max_delay=0.2, lease_timeout=60)


def reconciler(client: OpenAppClient, store: Store, **settings: Any) -> Reconciler:
    return Reconciler(client, store, replace(FAST, **settings), "test:1", ORGS)


def active(world: World, org: str, n: int = 0) -> str:
    return [d["id"] for d in world.ground_truth(org) if not d["deleted_at"]][n]


def edit(store: Store, edit_id: int) -> dict[str, Any]:
    row = EditQueue(store).get(edit_id)
    assert row is not None
    return row


def test_rename_zone_metadata_and_restore_reach_openapp_and_the_mirror(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    org = mirrored
    device = active(world, org)
    deleted = next(d["id"] for d in world.ground_truth(org) if d["deleted_at"])
    zone = world.orgs[org].zones[1]
    metadata = {**world.device(org, active(world, org, 2))["device_metadata"], "kind": "gate"}
    ids = [
        queue_edit(store, device, "update", {"name": {"en": "Lobby door"}}, "alice@ops", ORGS),
        queue_edit(store, active(world, org, 1), "update", {"zone_id": zone}, "alice@ops", ORGS),
        queue_edit(store, active(world, org, 2), "update", {"device_metadata": metadata}, "bob@ops", ORGS),
        queue_edit(store, deleted, "restore", None, "bob@ops", ORGS),
    ]
    results = reconciler(wb_client, store).run_once()
    assert results == Counter(succeeded=4)
    assert world.device(org, device)["name"] == {"value": {"en": "Lobby door"}}
    assert world.device(org, active(world, org, 1))["zone_id"] == zone
    assert world.device(org, active(world, org, 2))["device_metadata"] == metadata
    assert world.device(org, deleted)["deleted_at"] is None
    assert store.device(device)["name"] == {"en": "Lobby door"}
    assert store.device(active(world, org, 1))["zone_id"] == zone
    assert store.device(deleted)["state"] == "active"
    for edit_id in ids:
        row = edit(store, edit_id)
        assert row.status == "succeeded" and row.applied_at is not None and row.attempts == 1
    local = [c for c in store.changes(org) if c["source"] == "local_edit"]
    assert {(c["device_id"], c["change"]) for c in local} == {
        (device, "updated"),
        (active(world, org, 1), "updated"),
        (active(world, org, 2), "updated"),
        (deleted, "restored"),
    }
    assert all(c["edit_id"] in ids and c["run_id"] is None for c in local)
    # The next pass sees the pushed state as unchanged.
    outcome = Syncer(wb_client, store)(org)
    assert outcome.counts["updated"] == 0 and outcome.counts["restored"] == 0


def test_429_with_retry_after_then_success(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "ext-1"}, "ops", ORGS)
    sim.inject(Fault(status=429, retry_after="1", operation="update_device", times=1))
    rec = reconciler(wb_client, store)
    assert rec.run_once() == Counter(retrying=1)
    row = edit(store, edit_id)
    assert row.status == "pending" and row.last_status_code == 429
    assert 0.5 < (row.next_attempt_at - row.updated_at).total_seconds() <= 1.01
    assert rec.run_once() == Counter()  # not due yet
    time.sleep(1.05)
    assert rec.run_once() == Counter(succeeded=1)
    assert edit(store, edit_id).attempts == 2
    assert len(sim.requests("update_device")) == 2


def test_a_burst_of_503_then_success_after_backoff(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "ext-2"}, "ops", ORGS)
    sim.inject(Fault(status=503, operation="update_device", times=3))
    rec = reconciler(wb_client, store)
    deadline = time.monotonic() + 10
    while edit(store, edit_id).status != "succeeded" and time.monotonic() < deadline:
        rec.run_once()
        time.sleep(0.02)
    row = edit(store, edit_id)
    assert row.status == "succeeded" and row.attempts == 4
    assert [r.status for r in sim.requests("update_device")] == [503, 503, 503, 200]


def test_attempts_run_out(sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "ext-3"}, "ops", ORGS)
    sim.inject(Fault(status=502, operation="update_device", times=None))
    rec = reconciler(wb_client, store, max_attempts=2, base_delay=0.01, max_delay=0.01)
    for _ in range(20):
        rec.run_once()
        if edit(store, edit_id).status == "failed":
            break
        time.sleep(0.02)
    row = edit(store, edit_id)
    assert row.status == "failed" and "gave up after 2 attempts" in row.last_error


@pytest.mark.parametrize(("status", "message"), [(422, "Device has entities"), (400, "Bad zone id")])
def test_permanent_errors_fail_at_once_with_the_message_kept(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str, status: int, message: str
) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "x"}, "ops", ORGS)
    body = orjson.dumps({"message": message, "error_code": "nope", "correlationId": "c-9"})
    sim.inject(Fault(status=status, operation="update_device", times=None, body=body))
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    row = edit(store, edit_id)
    assert row.status == "failed" and row.last_status_code == status and row.attempts == 1
    assert message in row.last_error and "nope" in row.last_error


def test_a_concurrent_remote_change_is_a_conflict_and_nothing_is_pushed(
    sim: Simulator,
    wb_client: OpenAppClient,
    store: Store,
    world: World,
    mirrored: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "update", {"name": {"en": "Ours"}}, "ops", ORGS)
    world.update_device(mirrored, device, {"name": {"en": "Theirs"}})
    assert reconciler(wb_client, store).run_once() == Counter(conflict=1)
    assert sim.requests("update_device") == []
    row = edit(store, edit_id)
    assert row.status == "conflict"
    assert row.remote["name"] == {"base": {"en": "Side portal 0"}, "remote": {"en": "Theirs"}, "queued": {"en": "Ours"}}
    assert store.device(device)["name"] == {"en": "Theirs"}  # the mirror learnt the remote change
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = write_config(tmp_path, sim, database_url, [mirrored])
    assert main(["edits", "--config", str(config), "--status", "conflict"]) == 0
    out = capsys.readouterr().out
    assert '"Ours"' in out and '"Theirs"' in out and "edits retry" in out
    assert main(["edits", "retry", str(edit_id), "--config", str(config)]) == 0
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)  # retry pushes over it
    assert world.device(mirrored, device)["name"] == {"value": {"en": "Ours"}}


def test_force_policy_pushes_over_a_remote_change(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    queue_edit(store, device, "update", {"name": {"en": "Ours"}}, "ops", ORGS)
    world.update_device(mirrored, device, {"name": {"en": "Theirs"}})
    assert reconciler(wb_client, store, conflict_policy="force").run_once() == Counter(succeeded=1)


def test_two_edits_to_one_device_apply_in_order(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    first = queue_edit(store, device, "update", {"name": {"en": "First"}}, "ops", ORGS)
    second = queue_edit(store, device, "update", {"name": {"en": "Second"}}, "ops", ORGS)
    third = queue_edit(store, active(world, mirrored, 1), "update", {"external_id": "other"}, "ops", ORGS)
    assert reconciler(wb_client, store, batch_size=1).run_once() == Counter(succeeded=3)
    puts = [r.device_id for r in sim.requests("update_device")]
    assert puts == [device, device, active(world, mirrored, 1)]
    assert world.device(mirrored, device)["name"] == {"value": {"en": "Second"}}
    assert [edit(store, i).status for i in (first, second, third)] == ["succeeded"] * 3


def test_restore_of_an_already_active_device_succeeds(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    deleted = next(d["id"] for d in world.ground_truth(mirrored) if d["deleted_at"])
    edit_id = queue_edit(store, deleted, "restore", None, "ops", ORGS)
    world.restore_device(mirrored, deleted)  # somebody else was quicker
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert sim.requests("restore_device") == []
    assert edit(store, edit_id).status == "succeeded"
    assert store.device(deleted)["state"] == "active"


def test_restore_answered_422_is_confirmed_with_a_get(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    deleted = next(d["id"] for d in world.ground_truth(mirrored) if d["deleted_at"])
    edit_id = queue_edit(store, deleted, "restore", None, "ops", ORGS)
    # The restore lands, but the answer says 422 "not soft-deleted" (a retried restore looks like this).
    original = sim._dispatch

    def restore_then_422(operation: str, device_id: str | None, *args: Any) -> bytes:
        if operation == "restore_device":
            original(operation, device_id, *args)
            raise SimError(422, "Device is not soft-deleted", "not_soft_deleted")
        return original(operation, device_id, *args)

    sim._dispatch = restore_then_422  # type: ignore[method-assign]
    before = len(sim.log)
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert [r.operation for r in sim.requests()[before:]] == [
        "get_device",
        "restore_device",
        "get_device",
    ]
    assert edit(store, edit_id).status == "succeeded"


def test_purged_device_fails_the_edit(wb_client: OpenAppClient, store: Store, world: World, mirrored: str) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "update", {"external_id": "x"}, "ops", ORGS)
    world.purge_device(mirrored, device)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    row = edit(store, edit_id)
    assert "purged" in row.last_error and row.last_status_code == 404


def test_a_401_pauses_without_burning_attempts(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    ids = [
        queue_edit(store, active(world, mirrored, n), "update", {"external_id": f"e{n}"}, "ops", ORGS) for n in range(3)
    ]
    world.keys.clear()
    now = [1000.0]
    rec = Reconciler(wb_client, store, FAST, "test:1", ORGS, auth=AuthGate(clock=lambda: now[0]))
    assert rec.run_once() == Counter(paused=1)
    assert rec.run_once() == Counter()  # paused: nothing is tried
    assert all(edit(store, i).status == "pending" and edit(store, i).attempts == 0 for i in ids)
    world.add_key(API_KEY)
    assert rec.run_once() == Counter()  # still paused until the pause runs out
    now[0] += 30.0
    assert rec.run_once() == Counter(succeeded=3)
    assert not rec.auth.paused


def test_sql_inserted_edits_work_and_a_malformed_one_fails_alone(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    good, other = active(world, mirrored, 0), active(world, mirrored, 1)
    rows = [
        (good, "update", '{"name": {"en": "From SQL"}}'),
        (other, "update", '{"colour": "red"}'),
        ("01HK153X0000000000000NX1ST", "update", '{"external_id": "x"}'),
        (other, "update", '{"zone_id": 42}'),
        (other, "restore", None),  # not soft-deleted: succeeds as already active
    ]
    if store.dialect == "sqlite":
        rows.append((other, "update", "this is not json"))
    with store.engine.begin() as conn:
        for device_id, action, payload in rows:
            conn.execute(
                text("INSERT INTO device_edits (device_id, action, payload) VALUES (:d, :a, :p)"),
                {"d": device_id, "a": action, "p": payload},
            )
    results = reconciler(wb_client, store).run_once()
    edits = {r.id: r for r in EditQueue(store).find()}
    by_order = [edits[i] for i in sorted(edits)]
    assert by_order[0].status == "succeeded" and world.device(mirrored, good)["name"] == {"value": {"en": "From SQL"}}
    assert by_order[0].org_id is None and by_order[0].created_at is not None  # defaults filled the rest
    assert by_order[1].status == "failed" and "unknown field(s) 'colour'" in by_order[1].last_error
    assert by_order[2].status == "failed" and "unknown device" in by_order[2].last_error
    assert by_order[3].status == "failed" and "zone_id must be a string" in by_order[3].last_error
    assert by_order[4].status == "succeeded"
    if store.dialect == "sqlite":
        assert by_order[5].status == "failed" and "not a JSON object" in by_order[5].last_error
    assert results["succeeded"] == 2


def test_a_reconciler_killed_between_push_and_bookkeeping(
    tmp_path: Path,
    sim: Simulator,
    world: World,
    store: Store,
    database_url: str,
    mirrored: str,
    wb_client: OpenAppClient,
) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "update", {"name": {"en": "Exactly once"}}, "ops", ORGS)
    sim.inject(Fault(kind="slow_reply", delay=3, operation="update_device", times=1))
    config = write_config(tmp_path, sim, database_url, [mirrored])
    proc = run_cli("reconcile-once", "--config", str(config), env={KEY_ENV: API_KEY})
    try:
        deadline = time.monotonic() + 30
        while world.device(mirrored, device)["name"] != {"value": {"en": "Exactly once"}}:
            assert time.monotonic() < deadline, "the push never arrived"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert edit(store, edit_id).status == "in_flight"
    sim.clear_faults()
    rec = reconciler(wb_client, store, lease_timeout=0.3)
    assert rec.run_once() == Counter()  # the lease has not expired yet
    time.sleep(0.4)
    assert rec.run_once() == Counter(succeeded=1)
    deadline = time.monotonic() + 10  # the killed client's request is logged when its slow reply ends
    while not sim.requests("update_device") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sim.requests("update_device")) == 1  # pushed exactly once
    row = edit(store, edit_id)
    assert row.status == "succeeded" and row.attempts == 2
    assert len([c for c in store.changes(mirrored) if c["edit_id"] == edit_id]) == 1
    assert store.device(device)["name"] == {"en": "Exactly once"}


OTHER_WRITES = ("delete_device", "restore_device", "set_door_restrictions")


ENTITIES = ("01HENT0000000000000000000A", "01HENT0000000000000000000B")


def test_two_reconcilers_on_postgresql_push_every_edit_exactly_once(
    postgres_database: str, sim: Simulator, world: World, org: str
) -> None:
    """Every kind of edit, claimed by two reconcilers at once: each is pushed once, in order per device."""
    import psycopg

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    stores = [Store(postgres_database) for _ in range(2)]
    stores[0].upgrade()
    with OpenAppClient(api_settings(sim)) as client:
        Syncer(client, stores[0])(org)
    truth = world.ground_truth(org)
    live = [d for d in truth if not d["deleted_at"]]
    portals = [d["id"] for d in live if d["device_metadata"]["kind"] == "virtual_access_portal"]
    restricted = [p for p in portals if world.orgs[org].devices[p].restrictions]  # add keeps them restricted
    others = [d["id"] for d in live if d["id"] not in portals]
    devices, doomed = others[:30], others[30:35]
    revived = [d["id"] for d in truth if d["deleted_at"]][:5]
    assert len(restricted) >= 3 and len(revived) == 5
    expected: Counter[str] = Counter()
    for n, device in enumerate(devices):
        for k in range(1 + n % 3):  # one to three edits per device
            queue_edit(stores[0], device, "update", {"external_id": f"{device[-4:]}-{k}"}, "ops", ORGS)
            expected[device] += 1
    writes: Counter[tuple[str, str]] = Counter()
    for device in doomed:
        queue_edit(stores[0], device, "delete", None, "ops", ORGS)
        writes["delete_device", device] += 1
    for device in revived:
        queue_edit(stores[0], device, "restore", None, "ops", ORGS)
        writes["restore_device", device] += 1
    for device in restricted[:3]:
        for entity in ENTITIES:
            queue_edit(stores[0], device, "door_restrictions", {"add": [entity]}, "ops", ORGS)
            writes["set_door_restrictions", device] += 1
    sim.inject(Fault(kind="slow", delay=0.01, operation="update_device", times=None))
    results: list[Counter[str]] = []

    def work(store: Store, name: str) -> None:
        with OpenAppClient(api_settings(sim, retry=replace(FAST_RETRY, max_attempts=1))) as client:
            rec = Reconciler(client, store, replace(FAST, batch_size=3), name, ORGS)
            total: Counter[str] = Counter()
            for _ in range(200):
                got = rec.run_once()
                total.update(got)
                if not got and not any(r.status in ("pending", "in_flight") for r in EditQueue(store).find()):
                    break
            results.append(total)

    threads = [threading.Thread(target=work, args=(s, f"r{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    pushes = Counter(r.device_id for r in sim.requests("update_device"))
    assert pushes == expected
    others_pushed = Counter((r.operation, r.device_id) for r in sim.log if r.operation in OTHER_WRITES)
    assert others_pushed == writes
    assert all(r.status == "succeeded" for r in EditQueue(stores[0]).find())
    total = sum(expected.values()) + sum(writes.values())
    assert all(results) and sum(r["succeeded"] for r in results) == total
    assert all(world.device(org, d)["deleted_at"] for d in doomed)
    assert not any(world.device(org, d)["deleted_at"] for d in revived)
    assert all(set(ENTITIES) <= set(world.orgs[org].devices[p].restrictions) for p in restricted[:3])
    assert all(world.device(org, d)["external_id"] == f"{d[-4:]}-{expected[d] - 1}" for d in devices)
    for s in stores:
        s.close()


def test_cli_edit_restore_and_queue_management(
    tmp_path: Path,
    sim: Simulator,
    world: World,
    store: Store,
    database_url: str,
    mirrored: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = str(write_config(tmp_path, sim, database_url, [mirrored]))
    device = active(world, mirrored)
    deleted = next(d["id"] for d in world.ground_truth(mirrored) if d["deleted_at"])
    before = store.device(device)["name"]
    assert main(["edit", device, "--name", "fr=Porte", "--clear-zone", "--config", config]) == 0
    assert re.search(r"queued edit \d+: update", capsys.readouterr().out)
    queued = EditQueue(store).find(device_id=device)[0]
    assert queued.payload == {"name": {**before, "fr": "Porte"}, "zone_id": None}
    assert queued.requested_by and "@" in queued.requested_by
    assert main(["restore", deleted, "--config", config]) == 0
    for args, message in [
        (["edit", "01HK153X0000000000000NX1ST", "--external-id", "x"], "not in the mirror"),
        (["edit", f"ok/../{device}", "--external-id", "pwned"], "is not an OpenApp device id"),
        (["edit", device], "nothing to change"),
        (["edit", device, "--metadata-json", "{broken"], "not valid JSON"),
        (["edit", device, "--name", "Porte"], "use LOCALE=TEXT"),
        (["restore", device], "not soft-deleted"),
        (["edits", "cancel", "999"], "there is no edit 999"),
    ]:
        assert main([*args, "--config", config]) == 2, args
        assert message in capsys.readouterr().err
    assert main(["reconcile-once", "--config", config]) == 0
    assert "2 succeeded" in capsys.readouterr().out
    assert world.device(mirrored, device)["zone_id"] is None
    assert main(["edits", "cancel", str(queued.id), "--config", config]) == 2  # succeeded edits stay
    assert "succeeded; cancel works on pending, failed, conflict" in capsys.readouterr().err
    assert main(["edits", "--config", config, "--device", device]) == 0
    assert "succeeded" in capsys.readouterr().out


def test_queue_edit_validates(store: Store, world: World, mirrored: str) -> None:
    device = active(world, mirrored)
    with pytest.raises(ConfigError, match="unknown field"):
        queue_edit(store, device, "update", {"colour": "red"}, "ops", ORGS)
    with pytest.raises(ConfigError, match="name is not a localized string"):
        queue_edit(store, device, "update", {"name": 5}, "ops", ORGS)


@contextmanager
def _store(url: str) -> Iterator[Store]:
    store = Store(url)
    store.prepare(auto_upgrade=True)
    try:
        yield store
    finally:
        store.close()


def test_the_daemon_pushes_queued_edits(tmp_path: Path, sim: Simulator, world: World, mirrored: str) -> None:
    from syncd.config import Config, DatabaseSettings, OrgSettings
    from syncd.daemon import Daemon
    from syncd.notify import Notifier

    db = f"sqlite:///{tmp_path}/d.db"
    with _store(db) as store, OpenAppClient(api_settings(sim)) as client:
        Syncer(client, store)(mirrored)
        edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "via-daemon"}, "ops", ORGS)
    config = Config(
        api=api_settings(sim),
        database=DatabaseSettings(url=db),
        orgs=(OrgSettings(mirrored),),
        writeback=replace(FAST, interval=0.2),
    )
    daemon = Daemon(config, notifier=Notifier({}))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while world.device(mirrored, active(world, mirrored))["external_id"] != "via-daemon":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
    with _store(db) as store:
        assert edit(store, edit_id).status == "succeeded"


def test_sql_queued_edits_never_choose_their_org_or_path(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    other_org = next(o for o in world.orgs if o != mirrored)
    device = active(world, mirrored, 0)
    rows = [
        (device, other_org, '{"external_id": "via the wrong org"}'),  # says org B; the mirror says org A
        (device, "01HORGNOTCONFIGURED0000000", '{"external_id": "x"}'),
        (f"ok/../{device}", None, '{"external_id": "pwned"}'),
        ("../../admin", None, '{"external_id": "pwned"}'),
        (device, None, orjson.dumps({"device_metadata": {"blob": "x" * (1024 * 1024)}}).decode()),
    ]
    if store.dialect == "sqlite":  # PostgreSQL refuses such a row itself
        rows.append((device, None, '{"name": {"en": "nul\\u0000"}}'))
    with store.engine.begin() as conn:
        for device_id, org_id, payload in rows:
            conn.execute(
                text("INSERT INTO device_edits (device_id, org_id, payload) VALUES (:d, :o, :p)"),
                {"d": device_id, "o": org_id, "p": payload},
            )
    before = len(sim.log)
    results = reconciler(wb_client, store).run_once()
    assert results == Counter(failed=len(rows))
    assert sim.requests()[before:] == []  # nothing was sent
    errors = [r.last_error for r in EditQueue(store).find()]
    assert f"is not the device's org ('{mirrored}' in the mirror); nothing was sent" in errors[0]
    assert "not the device's org" in errors[1]
    assert "is not an OpenApp device id" in errors[2] and "is not an OpenApp device id" in errors[3]
    assert "more than an edit may be" in errors[4]
    if store.dialect == "sqlite":
        assert "NUL character" in errors[5]
    assert world.device(mirrored, device)["external_id"] != "via the wrong org"


def test_an_edit_of_an_org_no_longer_configured_fails_unsent(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    edit_id = queue_edit(store, active(world, mirrored), "update", {"external_id": "late"}, "ops", ORGS)
    others = frozenset(ORGS - {mirrored})
    results = Reconciler(wb_client, store, FAST, "test:1", others).run_once()
    assert results == Counter(failed=1)
    assert "is not configured in this syncd; nothing was sent" in edit(store, edit_id).last_error
    assert sim.requests("get_device") == [] and sim.requests("update_device") == []
    with pytest.raises(ConfigError, match="which is not configured"):
        queue_edit(store, active(world, mirrored), "update", {"external_id": "x"}, "ops", others)


def test_a_time_the_database_cannot_read_fails_its_edit_alone(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    good, other = active(world, mirrored, 0), active(world, mirrored, 1)
    rows = [(other, "base_updated_at"), (other, "next_attempt_at"), (good, None)]
    for device_id, column in rows:
        extra = f", {column}" if column else ""
        insert_edit = text(
            f"INSERT INTO device_edits (device_id, payload{extra}) VALUES (:d, :p{', :t' if column else ''})"
        )
        values = {"d": device_id, "p": '{"external_id": "from SQL"}', "t": "not a time"}
        if column and store.dialect == "postgresql":  # timestamptz refuses the row itself
            with pytest.raises(DBAPIError, match="invalid input syntax"), store.engine.begin() as conn:
                conn.execute(insert_edit, values)
            continue
        with store.engine.begin() as conn:
            conn.execute(insert_edit, values)
    results = reconciler(wb_client, store).run_once()
    edits = EditQueue(store).find()
    if store.dialect == "postgresql":
        assert [e.status for e in edits] == ["succeeded"]
        return
    assert [e.status for e in edits] == ["failed", "failed", "succeeded"]  # SQLite takes anything: syncd checks
    assert "base_updated_at 'not a time' is not a timestamp" in edits[0].last_error
    assert "next_attempt_at 'not a time' is not a timestamp" in edits[1].last_error
    assert results == Counter(failed=2, succeeded=1)


def test_reconcile_once_stops_a_read_in_flight_on_sigterm(tmp_path: Path, world: World) -> None:
    org = next(iter(world.orgs))
    with Simulator(world) as sim:
        config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org])
        config.write_text(config.read_text().replace("[api.retry]", "request_timeout = 120\n\n[api.retry]"))
        proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        assert proc.wait(timeout=60) == 0
        assert main(["edit", active(world, org), "--external-id", "x", "--config", str(config)]) == 0
        sim.inject(Fault(kind="slow_reply", delay=30.0, operation="get_device", times=None))
        proc = run_cli("reconcile-once", "--config", str(config), env={KEY_ENV: API_KEY})
        store = Store(f"sqlite:///{tmp_path}/m.db")
        wait_until = time.monotonic() + 30  # claimed: its GET goes out next, and is answered 30 s later
        while time.monotonic() < wait_until and EditQueue(store).find()[0].status != "in_flight":
            time.sleep(0.05)
        store.close()
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5, err
    assert "1 stopped" in out and "1 pending" in out  # handed back untouched, for the next round


@pytest.mark.parametrize("operation", ["update_device", "restore_device"])
def test_lost_answers_are_not_conflicts(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str, operation: str
) -> None:
    """The server applies a write and the connection drops before its answer: the next attempt
    finds the edit's effect in OpenApp, calls it done and pushes nothing more."""
    if operation == "update_device":
        devices = [active(world, mirrored, n) for n in range(10)]
        ids = [
            queue_edit(store, d, "update", {"name": {"en": f"Renamed {n}"}}, "ops", ORGS) for n, d in enumerate(devices)
        ]
    else:
        devices = [d["id"] for d in world.ground_truth(mirrored) if d["deleted_at"]][:10]
        ids = [queue_edit(store, d, "restore", None, "ops", ORGS) for d in devices]
    sim.inject(Fault(kind="lost", operation=operation, times=None, rate=0.5))
    rec = reconciler(wb_client, store)
    deadline = time.monotonic() + 20
    while any(edit(store, i).status != "succeeded" for i in ids) and time.monotonic() < deadline:
        assert rec.run_once()["conflict"] == 0
        time.sleep(0.05)
    assert [edit(store, i).status for i in ids] == ["succeeded"] * 10
    lost = [r for r in sim.requests(operation) if r.status == 0]
    assert lost  # the fault fired
    assert len(sim.requests(operation)) == 10 + 0  # each edit was pushed once: a lost one is not pushed again
