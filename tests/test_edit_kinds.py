"""Write-back of every kind of edit (soft delete, door restrictions, schema-checked metadata) and
the rules every kind shares: field-level conflicts, lost answers, credentials that are never
echoed. Simulator over loopback HTTP -> real SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from syncd.api import OpenAppClient
from syncd.cli import main
from syncd.config import WritebackSettings
from syncd.edits import (
    CAP_WINDOW,
    KINDS,
    REDACTED,
    EditKind,
    EditProblem,
    HoldRule,
    Outcome,
    Reading,
    Remote,
    queue_edit,
)
from syncd.errors import ConfigError
from syncd.health import AuthGate
from syncd.models import parse_device
from syncd.reconcile import Reconciler
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store
from syncd.store.edits import EditQueue, SendCap
from syncd.vocab import HoldReason

from .conftest import API_KEY
from .test_cli import KEY_ENV, write_config
from .test_details import E1, E2, E3, portals, restriction_changes
from .test_sync import Details
from .test_writeback import FAST, ORGS, active, edit, reconciler

SECRET = "s3cr3t-sip-password-value"


def until_done(rec: Reconciler, store: Store, ids: list[int], seconds: float = 20) -> Counter[str]:
    """Run the reconciler until none of the edits is pending or in flight; the results summed."""
    total: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        total += rec.run_once()
        if all(edit(store, i).status not in ("pending", "in_flight") for i in ids):
            break
        time.sleep(0.05)
    return total


def of_provider(world: World, org: str, provider: str, deleted: bool = False) -> str:
    return next(
        d["id"]
        for d in world.ground_truth(org)
        if world.orgs[org].providers[d["integration_id"]] == provider and bool(d["deleted_at"]) == deleted
    )


def insert_edit(store: Store, device_id: str, action: str, payload: Any) -> int:
    with store.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO device_edits (device_id, action, payload) VALUES (:d, :a, :p)"),
            {"d": device_id, "a": action, "p": None if payload is None else orjson.dumps(payload).decode()},
        )
    return max(e.id for e in EditQueue(store).find())


# -- soft delete ---------------------------------------------------------------------------------------


def test_soft_delete_reaches_openapp_and_the_mirror(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "delete", None, "ops", ORGS)
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert world.device(mirrored, device)["deleted_at"] is not None
    assert store.device(device)["state"] == "deleted"
    change = next(c for c in store.changes(mirrored) if c["edit_id"] == edit_id)
    assert (change["change"], change["source"]) == ("deleted", "local_edit")
    with pytest.raises(ConfigError, match="already soft-deleted"):
        queue_edit(store, device, "delete", None, "ops", ORGS)
    again = insert_edit(store, device, "delete", None)  # by SQL: idempotent, nothing pushed
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert edit(store, again).status == "succeeded" and len(sim.requests("delete_device")) == 1


def test_a_delete_of_a_purged_device_fails(wb_client: OpenAppClient, store: Store, world: World, mirrored: str) -> None:
    device = active(world, mirrored)
    edit_id = queue_edit(store, device, "delete", None, "ops", ORGS)
    world.purge_device(mirrored, device)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    assert "purged" in (edit(store, edit_id).last_error or "")


def test_deletes_beyond_the_hourly_cap_wait(
    sim: Simulator,
    wb_client: OpenAppClient,
    store: Store,
    world: World,
    mirrored: str,
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [queue_edit(store, active(world, mirrored, n), "delete", None, "ops", ORGS) for n in range(5)]
    rec = reconciler(wb_client, store, max_deletes_per_hour=2)
    assert rec.run_once() == Counter(succeeded=2, held=3)
    assert len(sim.requests("delete_device")) == 2
    held = [edit(store, i) for i in ids[2:]]
    assert all(
        e.status == "pending" and e.attempts == 0 and "max_deletes_per_hour" in (e.last_error or "") for e in held
    )
    assert all(e.held_by is HoldReason.SEND_CAP for e in held)  # data, not only text
    first = edit(store, ids[0]).applied_at
    assert all(e.next_attempt_at is not None and e.next_attempt_at >= first + timedelta(minutes=59) for e in held)
    assert rec.run_once() == Counter()  # not due before the hour is up
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = write_config(tmp_path, sim, database_url, [mirrored])
    assert main(["edits", "--config", str(config), "--status", "pending"]) == 0
    assert "held    held: 2 soft deletes sent in the last hour" in capsys.readouterr().out
    with store.engine.begin() as conn:  # "held" is read from held_by, not from the message's text
        conn.execute(text("UPDATE device_edits SET held_by = NULL WHERE id = :i"), {"i": ids[2]})
    assert main(["edits", "--config", str(config), "--status", "pending"]) == 0
    out = capsys.readouterr().out
    assert f"  {ids[2]}: error   held: 2 soft deletes" in out and f"  {ids[3]}: held    held: 2" in out


@dataclass(frozen=True, slots=True)
class Relabel:
    """The payload of a kind the reconciler has never heard of."""

    external_id: str


class RelabelKind(EditKind[Relabel]):
    """A new kind, as ARCHITECTURE.md's worked example adds one: it sets external_id, at most one
    send per hour. (device_edits' CHECK constraint knows only the shipped actions: it stands in for
    restore here.)"""

    action = "restore"
    usage = '{"external_id": "..."}'

    def validate(self, raw: object) -> Relabel:
        if not isinstance(raw, dict) or not isinstance(raw.get("external_id"), str):
            raise EditProblem(f"a relabel needs {self.usage}")
        return Relabel(raw["external_id"])

    def applied(self, payload: Relabel, remote: Remote) -> bool:
        return remote.device.external_id == payload.external_id

    def hold_rule(self, settings: WritebackSettings) -> HoldRule:
        return HoldRule(SendCap(self.action, 1, CAP_WINDOW), "max_relabels_per_hour", "relabels")

    def push(self, payload: Relabel, remote: Remote, reading: Reading) -> Outcome:
        changes = {"external_id": payload.external_id}
        return Outcome(parse_device(reading.client.update_device(reading.org_id, reading.device_id, changes)))

    def describe(self, payload: Relabel) -> str:
        return f"relabel {payload.external_id}"


def test_a_new_kind_needs_no_reconciler_change(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler knows no kind: a kind it never saw is parsed, pushed, mirrored and held by its
    own hold rule."""
    monkeypatch.setitem(KINDS, "restore", RelabelKind())
    first, second = (active(world, mirrored, n) for n in range(2))
    ids = [insert_edit(store, device, "restore", {"external_id": f"label-{device}"}) for device in (first, second)]
    bad = insert_edit(store, first, "restore", {"external_id": 7})
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1, held=1, failed=1)
    done, held = edit(store, ids[0]), edit(store, ids[1])
    assert done.status == "succeeded" and (store.device(first) or {})["external_id"] == f"label-{first}"
    assert [c["source"] for c in store.changes() if c["edit_id"] == done.id] == ["local_edit"]
    assert held.status == "pending" and held.held_by is HoldReason.SEND_CAP
    assert "held: 1 relabels sent in the last hour reach writeback.max_relabels_per_hour" in (held.last_error or "")
    assert edit(store, bad).last_error == 'a relabel needs {"external_id": "..."}'
    assert len(sim.requests("update_device")) == 1


def test_the_cli_asks_before_a_delete(
    sim: Simulator,
    store: Store,
    world: World,
    mirrored: str,
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = str(write_config(tmp_path, sim, database_url, [mirrored]))
    device = active(world, mirrored)
    assert main(["delete", device, "--config", config]) == 2  # not a terminal, no --yes
    assert "confirm with --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["delete", device, "--config", config]) == 1 and EditQueue(store).find() == []
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["delete", device, "--config", config]) == 0
    assert main(["delete", active(world, mirrored, 1), "--yes", "--config", config]) == 0
    assert [e.action for e in EditQueue(store).find()] == ["delete", "delete"]


# -- door restrictions --------------------------------------------------------------------------------


def test_door_restrictions_set_add_and_remove(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    portal = portals(world, mirrored)[0]
    set_id = queue_edit(store, portal, "door_restrictions", {"entity_ids": [E2, E1]}, "ops", ORGS)
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert world.orgs[mirrored].devices[portal].restrictions == [E1, E2]
    assert Details(store).entities(portal) == [E1, E2]
    change = restriction_changes(store, mirrored)[-1]
    assert (change["source"], change["edit_id"]) == ("local_edit", set_id)
    assert change["diff"]["door_restrictions"]["new"] == [E1, E2]
    # Somebody else lets E3 in meanwhile: --add / --remove work on OpenApp's list, not the mirror's.
    queue_edit(store, portal, "door_restrictions", {"add": ["01HENT00000000000000000009"], "remove": [E1]}, "ops", ORGS)
    world.set_door_restrictions(mirrored, portal, {"apartment_entity_ids": [E1, E2, E3]})
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert world.orgs[mirrored].devices[portal].restrictions == [E2, E3, "01HENT00000000000000000009"]
    again = insert_edit(store, portal, "door_restrictions", {"add": [E2]})  # already so: nothing pushed
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert edit(store, again).status == "succeeded" and len(sim.requests("set_door_restrictions")) == 2


def test_door_restrictions_only_for_portals(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    gate = next(
        d["id"] for d in world.ground_truth(mirrored) if d["device_metadata"]["kind"] == "gate" and not d["deleted_at"]
    )
    with pytest.raises(ConfigError, match="only for virtual_access_portal devices"):
        queue_edit(store, gate, "door_restrictions", {"entity_ids": [E1]}, "ops", ORGS)
    edit_id = insert_edit(store, gate, "door_restrictions", {"entity_ids": [E1]})
    before = len(sim.log)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    assert "nothing was sent" in (edit(store, edit_id).last_error or "")
    assert sim.requests()[before:] == []  # the mirror knows it is a gate
    # The mirror says portal, OpenApp no longer does: its 400 answer fails the edit, nothing is put.
    portal = portals(world, mirrored)[0]
    world.orgs[mirrored].devices[portal].kind = "gate"
    edit_id = insert_edit(store, portal, "door_restrictions", {"add": [E1]})
    before = len(sim.log)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    assert "virtual_access_portal" in (edit(store, edit_id).last_error or "")
    assert [r.operation for r in sim.requests()[before:]] == ["get_door_restrictions"]
    for bad, problem in [
        ({"entity_ids": [E1], "add": [E2]}, "not both"),
        ({"add": [E1], "remove": [E1]}, "both added and removed"),
        ({"entity_ids": "E1"}, "must be a list"),
        ({"entity_ids": ["a\u001b"]}, "not an entity id"),
        ({}, "need a payload"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            queue_edit(store, portals(world, mirrored)[0], "door_restrictions", bad, "ops", ORGS)


@pytest.mark.parametrize(
    ("answered_with", "forced", "sent"),
    [
        ("listing_entity_ids", "auto", "listing_entity_ids"),
        ("apartment_entity_ids", "auto", "apartment_entity_ids"),
        ("listing_entity_ids", "apartment_entity_ids", "apartment_entity_ids"),
    ],
)
def test_the_body_key_is_the_one_openapp_uses_unless_forced(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str, answered_with: Any, forced: str, sent: str
) -> None:
    world.restrictions_key = answered_with
    bodies: list[dict[str, Any]] = []
    original = world.set_door_restrictions

    def recording(org_id: str, device_id: str, body: Any) -> bytes:
        bodies.append(body)
        return original(org_id, device_id, body)

    world.set_door_restrictions = recording  # type: ignore[method-assign]
    queue_edit(store, portals(world, mirrored)[0], "door_restrictions", {"entity_ids": [E1]}, "ops", ORGS)
    assert reconciler(wb_client, store, door_restrictions_key=forced).run_once() == Counter(succeeded=1)
    assert bodies == [{sent: [E1]}]


# -- conflicts by field ---------------------------------------------------------------------------------


def test_conflicts_are_decided_field_by_field(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    device, portal = active(world, mirrored), portals(world, mirrored)[1]
    # Another field changed remotely: no conflict.
    quiet = queue_edit(store, device, "update", {"external_id": "ours"}, "ops", ORGS)
    world.update_device(mirrored, device, {"name": {"en": "Renamed by someone"}})
    # The same field changed remotely, to another value: a conflict, with the three values.
    loud = queue_edit(store, active(world, mirrored, 1), "update", {"external_id": "ours-too"}, "ops", ORGS)
    world.update_device(mirrored, active(world, mirrored, 1), {"external_id": "theirs"})
    # The same field changed remotely to the edit's own value: done, not a conflict.
    same = queue_edit(store, active(world, mirrored, 2), "update", {"external_id": "agreed"}, "ops", ORGS)
    world.update_device(mirrored, active(world, mirrored, 2), {"external_id": "agreed"})
    # A portal's list changed remotely: a conflict of the whole-list edit.
    listed = queue_edit(store, portal, "door_restrictions", {"entity_ids": [E1]}, "ops", ORGS)
    world.set_door_restrictions(mirrored, portal, {"apartment_entity_ids": [E3]})
    results = reconciler(wb_client, store).run_once()
    assert results == Counter(succeeded=2, conflict=2)
    assert edit(store, quiet).status == "succeeded" and edit(store, same).status == "succeeded"
    conflict = edit(store, loud)
    assert conflict.remote == {
        "external_id": {"base": conflict.base["external_id"], "remote": "theirs", "queued": "ours-too"}
    }
    assert edit(store, listed).remote["entity_ids"]["remote"] == [E3]
    assert [r.device_id for r in sim.requests("update_device")] == [device]


def test_a_second_edit_queued_on_the_same_base_is_no_conflict(
    wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    portal = portals(world, mirrored)[2]
    first = queue_edit(store, portal, "door_restrictions", {"entity_ids": [E1]}, "ops", ORGS)
    second = queue_edit(store, portal, "door_restrictions", {"entity_ids": [E1, E2]}, "ops", ORGS)
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=2)
    assert [edit(store, i).status for i in (first, second)] == ["succeeded", "succeeded"]
    assert world.orgs[mirrored].devices[portal].restrictions == [E1, E2]


# -- lost answers, every write kind -----------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["delete_device", "set_door_restrictions"])
def test_lost_answers_of_every_write_kind_are_not_conflicts(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str, operation: str
) -> None:
    if operation == "delete_device":
        ids = [queue_edit(store, active(world, mirrored, n), "delete", None, "ops", ORGS) for n in range(6)]
    else:
        ids = [
            queue_edit(store, p, "door_restrictions", {"entity_ids": [E1, E2]}, "ops", ORGS)
            for p in portals(world, mirrored)[:6]
        ]
    sim.inject(Fault(kind="lost", operation=operation, times=None, rate=0.5))
    results = until_done(reconciler(wb_client, store, max_deletes_per_hour=100), store, ids)
    assert results["conflict"] == 0 and [edit(store, i).status for i in ids] == ["succeeded"] * 6
    assert any(r.status == 0 for r in sim.requests(operation))  # answers were lost
    assert len(sim.requests(operation)) == 6  # and none was pushed twice


# -- metadata: the provider's schema, credentials -----------------------------------------------------------


def test_metadata_that_breaks_the_providers_schema_is_not_sent(
    sim: Simulator,
    wb_client: OpenAppClient,
    sync: Any,
    store: Store,
    world: World,
    mirrored: str,
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shelly = of_provider(world, mirrored, "shelly_cloud")
    bad = {"device_metadata": {**world.device(mirrored, shelly)["device_metadata"], "relay": 9}}
    edit_id = insert_edit(store, shelly, "update", bad)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    error = edit(store, edit_id).last_error or ""
    assert "device_metadata/relay: 9 is greater than the maximum of 3" in error and "nothing was sent" in error
    assert sim.requests("update_device") == []
    with pytest.raises(ConfigError, match="relay"):  # the CLI checks it when it queues, against the mirror
        queue_edit(store, shelly, "update", bad, "ops", ORGS)
    good = {"device_metadata": {**world.device(mirrored, shelly)["device_metadata"], "relay": 2}}
    queue_edit(store, shelly, "update", good, "ops", ORGS)
    assert reconciler(wb_client, store).run_once() == Counter(succeeded=1)
    assert world.device(mirrored, shelly)["device_metadata"]["relay"] == 2


def test_credentials_are_kept_cleared_only_when_said_and_never_echoed(
    sim: Simulator,
    wb_client: OpenAppClient,
    store: Store,
    world: World,
    mirrored: str,
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = of_provider(world, mirrored, "akuvox")
    visible = world.device(mirrored, device)["device_metadata"]
    monkeypatch.setenv(KEY_ENV, API_KEY)
    config = str(write_config(tmp_path, sim, database_url, [mirrored]))
    caplog.set_level(logging.DEBUG)
    with_secret = orjson.dumps({**visible, "sip_password": SECRET}).decode()
    assert main(["edit", device, "--metadata-json", with_secret, "--config", config]) == 0
    assert main(["reconcile-once", "--config", config]) == 0
    assert world.orgs[mirrored].devices[device].credentials == {"sip_password": SECRET}
    assert store.device(device)["credentials_set"] == ["/sip_password"]
    stored = EditQueue(store).find(device_id=device)[-1]
    assert stored.payload["device_metadata"]["sip_password"] == REDACTED  # redacted once pushed
    # An edit that leaves the credential out keeps it.
    assert (
        main(["edit", device, "--metadata-json", orjson.dumps({**visible, "room": "12"}).decode(), "--config", config])
        == 0
    )
    assert main(["reconcile-once", "--config", config]) == 0
    assert world.orgs[mirrored].devices[device].credentials == {"sip_password": SECRET}
    # An explicit null clears it only when the edit says so.
    nulled = {"device_metadata": {**visible, "room": "12", "sip_password": None}}
    edit_id = insert_edit(store, device, "update", nulled)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    assert "clear_credentials" in (edit(store, edit_id).last_error or "")
    assert world.orgs[mirrored].devices[device].credentials == {"sip_password": SECRET}
    assert main(["edit", device, "--clear-credential", "sip_password", "--config", config]) == 0
    assert main(["reconcile-once", "--config", config]) == 0
    assert world.orgs[mirrored].devices[device].credentials == {}
    assert main(["edits", "--config", config]) == 0
    out, err = capsys.readouterr()
    everything = out + err + caplog.text + str([e.payload for e in EditQueue(store).find()])
    assert SECRET not in everything


def test_a_401_pauses_every_kind(wb_client: OpenAppClient, store: Store, world: World, mirrored: str) -> None:
    portal = next(p for p in portals(world, mirrored) if world.orgs[mirrored].devices[p].restrictions)
    ids = [
        queue_edit(store, active(world, mirrored, 5), "delete", None, "ops", ORGS),
        queue_edit(store, portal, "door_restrictions", {"add": [E1]}, "ops", ORGS),
    ]
    world.keys.clear()
    now = [1000.0]
    rec = Reconciler(wb_client, store, FAST, "test:1", ORGS, auth=AuthGate(clock=lambda: now[0]))
    assert rec.run_once() == Counter(paused=1)
    assert all(edit(store, i).status == "pending" and edit(store, i).attempts == 0 for i in ids)
    world.add_key(API_KEY)
    now[0] += 30.0
    assert rec.run_once() == Counter(succeeded=2)


def test_a_refused_edit_keeps_openapps_message(
    sim: Simulator, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    body = b'{"message": "Device has open alarms", "error_code": "has_alarms"}'
    sim.inject(Fault(status=422, operation="delete_device", times=1, body=body))
    edit_id = queue_edit(store, active(world, mirrored), "delete", None, "ops", ORGS)
    assert reconciler(wb_client, store).run_once() == Counter(failed=1)
    row = edit(store, edit_id)
    assert row.last_status_code == 422 and "HTTP 422 (has_alarms): Device has open alarms" in (row.last_error or "")
