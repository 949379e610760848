"""Door restrictions and metadata definitions in the mirror: simulator over loopback HTTP -> real
SQLite and PostgreSQL (the rules are in syncd/details.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text, update

from syncd import details as details_module
from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.errors import StoreError
from syncd.models import utcnow
from syncd.simulator import Fault, Simulator, World
from syncd.simulator.world import PROVIDER_SCHEMAS, SimError
from syncd.store import Store
from syncd.store.schema import metadata_definitions, portal_restrictions
from syncd.sync import OrgPass, PassOptions

from .conftest import API_KEY, Syncer, api_settings
from .test_sync import Details, assert_details_match, assert_mirror_matches

PORTAL = "virtual_access_portal"
E1, E2, E3 = "01HENT00000000000000000001", "01HENT00000000000000000002", "01HENT00000000000000000003"


def portals(world: World, org: str, active: bool = True) -> list[str]:
    return [
        d["id"]
        for d in world.ground_truth(org)
        if d["device_metadata"].get("kind") == PORTAL and (not active or not d["deleted_at"])
    ]


def restriction_changes(store: Store, org: str) -> list[dict[str, Any]]:
    return [c for c in store.changes(org) if c["change"] == "restrictions"]


def make_due(store: Store, device_ids: list[str] | None = None) -> None:
    """Time passes: the portals' refresh comes due (as if sync.door_restrictions_interval went by)."""
    statement = update(portal_restrictions).values(next_fetch_at=utcnow() - timedelta(seconds=1))
    if device_ids is not None:
        statement = statement.where(portal_restrictions.c.device_id.in_(device_ids))
    with store.engine.begin() as conn:
        conn.execute(statement)


def sql(store: Store, query: str, **params: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(query), params)]


def test_a_first_pass_mirrors_restrictions_definitions_and_credentials(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    portal_ids = portals(world, org)
    world.set_door_restrictions(org, portal_ids[0], {"apartment_entity_ids": [E1, E2]})
    world.set_door_restrictions(org, portal_ids[1], {"apartment_entity_ids": [E2]})
    world.set_door_restrictions(org, portal_ids[2], {"apartment_entity_ids": []})
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["restriction_requests"] == len(portal_ids) == len(sim.requests("get_door_restrictions"))
    assert outcome.counts["definition_requests"] == len(world.orgs[org].integrations)
    assert outcome.counts["restrictions"] == 0  # a first list has nothing to compare with: no history
    assert_mirror_matches(store, world, org)

    # The report questions, in plain SQL over the view.
    let_through = sql(
        store,
        "SELECT portal_id FROM portal_access WHERE portal_state = 'active' AND (entity_id = :e OR NOT restricted)",
        e=E2,
    )
    expected = {p for p in portal_ids if E2 in world.orgs[org].devices[p].restrictions}
    expected |= {p for p in portal_ids if not world.orgs[org].devices[p].restrictions}
    assert {row[0] for row in let_through} == expected and portal_ids[0] in expected
    who = sql(store, "SELECT entity_id, portal_name FROM portal_access WHERE portal_id = :p", p=portal_ids[0])
    assert sorted(row[0] for row in who) == [E1, E2]
    assert {row[1] for row in who} == {world.orgs[org].devices[portal_ids[0]].name["en"]}
    unrestricted = sql(store, "SELECT restricted, entity_id FROM portal_access WHERE portal_id = :p", p=portal_ids[2])
    assert [(bool(r), e) for r, e in unrestricted] == [(False, None)]
    with_credentials = sql(store, "SELECT count(*) FROM device_report WHERE org_id = :o AND has_credentials", o=org)
    assert with_credentials[0][0] == sum(1 for d in world.orgs[org].devices.values() if d.credentials)


def test_changed_restrictions_are_history(sim: Simulator, sync: Syncer, store: Store, world: World, org: str) -> None:
    portal, other = portals(world, org)[:2]
    world.set_door_restrictions(org, portal, {"apartment_entity_ids": [E1, E2]})
    sync(org)
    since = dict(sql(store, "SELECT entity_id, since FROM door_restrictions WHERE device_id = :p", p=portal))

    world.set_door_restrictions(org, portal, {"apartment_entity_ids": [E2, E3]})  # E1 out, E3 in
    world.update_device(org, portal, {"external_id": "moved"})  # the device changed: asked at once
    outcome = sync(org)
    assert outcome.counts["restrictions"] == 1 and outcome.counts["restriction_requests"] == 1
    [change] = restriction_changes(store, org)
    assert (change["device_id"], change["run_id"]) == (portal, outcome.run_id)
    assert change["diff"] == {"door_restrictions": {"old": [E1, E2], "new": [E2, E3]}}
    kept = dict(sql(store, "SELECT entity_id, since FROM door_restrictions WHERE device_id = :p", p=portal))
    assert sorted(kept) == [E2, E3] and kept[E2] == since[E2]  # E2 kept its date

    world.set_door_restrictions(org, other, {"apartment_entity_ids": [E1]})  # the device does not change
    assert sync(org).counts["restriction_requests"] == 0  # within the interval: not asked
    make_due(store, [other])
    outcome = sync(org)
    assert outcome.counts["restriction_requests"] == 1 and outcome.counts["restrictions"] == 1
    assert restriction_changes(store, org)[-1]["diff"]["door_restrictions"]["new"] == [E1]
    assert_details_match(store, world, org)


def test_a_resync_inside_the_interval_asks_nothing_more(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    before = len(sim.log)
    outcome = sync(org)
    assert outcome.counts["unchanged"] == 450
    asked = {r.operation for r in sim.requests()[before:]}
    assert asked == {"list_devices"}  # no door-restrictions and no metadata-definition request


def test_first_refreshes_are_spread_over_an_interval(sync: Syncer, store: Store, world: World, org: str) -> None:
    started = utcnow()
    sync(org)
    rows = Details(store)
    offsets = sorted((rows.row(p)["next_fetch_at"] - started).total_seconds() for p in portals(world, org))
    hour = SyncSettings().door_restrictions_interval
    assert hour <= offsets[0] and offsets[-1] < 2 * hour + 60
    assert offsets[-1] - offsets[0] > 0.6 * hour  # not all at once


def test_portals_due_among_a_batch_go_by_the_rows_of_the_org_asked_about(
    sync: Syncer, store: Store, world: World
) -> None:
    first, second = list(world.orgs)
    sync(first)
    sync(second)  # every portal of both orgs just asked: none due
    mine, theirs = portals(world, first)[:3], portals(world, second)[:2]
    restrictions = details_module.PortalRestrictions(store)
    batch = {device_id: store.device(device_id)["fingerprint"] for device_id in mine + theirs}
    due = restrictions.due_among(first, utcnow(), batch)
    # Another org's row says nothing about this org: its portals count as never asked here.
    assert sorted(p.device_id for p in due) == sorted(theirs)


def test_an_org_without_portals_asks_no_restrictions(store: Store, client: OpenAppClient, world: World) -> None:
    bare = World(seed=4)
    org = bare.seed(1, 300, portal_fraction=0.0)[0]
    bare.add_key(API_KEY)
    with Simulator(bare, strict_query=True) as sim, OpenAppClient(api_settings(sim)) as own:
        outcome = OrgPass(own, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        assert outcome.status == "succeeded"
        assert sim.requests("get_door_restrictions") == [] and outcome.counts["restriction_requests"] == 0
        # An org configured for one integration without portals asks none either.
        shelly = next(i for i, p in bare.orgs[org].providers.items() if p == "shelly_cloud")
        filtered = OrgPass(own, store, PassOptions(OrgSettings(org, integration_id=shelly), SyncSettings())).run()
        assert filtered.status == "succeeded" and sim.requests("get_door_restrictions") == []


def test_a_portal_that_is_no_longer_one_or_gone_does_not_fail_the_pass(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    turned, vanished = portals(world, org)[:2]
    world.set_door_restrictions(org, turned, {"apartment_entity_ids": [E1]})
    world.set_door_restrictions(org, vanished, {"apartment_entity_ids": [E2]})
    sync(org)
    metadata = {**world.orgs[org].devices[turned].device_metadata, "kind": "gate"}
    world.update_device(org, turned, {"device_metadata": metadata})  # now answers 400
    world.update_device(org, vanished, {"external_id": "x"})
    sim.inject(Fault(status=404, operation="get_door_restrictions", times=None, body=b'{"message": "gone"}'))
    outcome = sync(org)  # both changed, so both are asked; both answer 404
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["restriction_requests"] == 2 and outcome.counts["restriction_failures"] == 0
    sim.clear_faults()
    rows = Details(store)
    assert rows.row(vanished)["status"] == "not_found" and rows.entities(vanished) == [E2]  # kept

    make_due(store, [turned])
    outcome = sync(org)
    assert outcome.status == "succeeded"
    assert rows.row(turned)["status"] == "not_a_portal" and rows.entities(turned) == []
    assert restriction_changes(store, org)[-1]["diff"] == {"door_restrictions": {"old": [E1], "new": None}}
    assert sql(store, "SELECT count(*) FROM portal_access WHERE entity_id = :e", e=E1) == [(0,)]


def test_failed_fetches_keep_the_old_restrictions_and_are_asked_next_pass(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    portal_ids = portals(world, org)
    world.set_door_restrictions(org, portal_ids[0], {"apartment_entity_ids": [E1]})
    sync(org)
    world.set_door_restrictions(org, portal_ids[0], {"apartment_entity_ids": [E2]})
    make_due(store)
    gate = next(d["id"] for d in world.ground_truth(org) if d["device_metadata"]["kind"] == "gate")
    world.purge_device(org, gate)  # purge detection must not suffer from what follows
    sim.inject(Fault(status=503, operation="get_door_restrictions", times=None))
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["purged"] == 1
    # Five failures in a row (each after the client's retries): OpenApp is failing, the rest wait.
    assert outcome.counts["restriction_failures"] == outcome.counts["restriction_requests"] == 5
    rows = Details(store)
    assert rows.entities(portal_ids[0]) == [E1]  # kept
    assert rows.row(portal_ids[0])["status"] == "ok" and "HTTP 503" in rows.row(portal_ids[0])["last_error"]
    run = store.run(outcome.run_id)
    assert (run["restriction_failures"], run["restriction_requests"], run["status"]) == (5, 5, "succeeded")

    sim.clear_faults()
    outcome = sync(org)  # every portal is due still
    assert outcome.counts["restriction_requests"] == len(portal_ids) and outcome.counts["restriction_failures"] == 0
    assert rows.entities(portal_ids[0]) == [E2] and rows.row(portal_ids[0])["last_error"] is None


def test_a_transient_fault_is_retried_within_the_request(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sim.inject(Fault(status=503, operation="get_door_restrictions", times=2))
    sim.inject(Fault(kind="reset", operation="get_device_metadata_definition", times=1))
    outcome = sync(org)
    assert outcome.counts["restriction_failures"] == 0 and outcome.counts["definition_failures"] == 0
    assert_details_match(store, world, org)


def test_a_refused_key_ends_the_reads_at_once(sim: Simulator, sync: Syncer, store: Store, org: str) -> None:
    sim.inject(Fault(status=403, operation="get_door_restrictions", times=None))
    sim.inject(Fault(status=403, operation="get_device_metadata_definition", times=None))
    outcome = sync(org)
    assert outcome.status == "succeeded"
    assert outcome.counts["restriction_requests"] == 1 == outcome.counts["definition_requests"]
    assert len(sim.requests("get_door_restrictions")) == 1


def test_deleted_and_purged_portals_keep_their_restrictions(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    deleted, purged = portals(world, org)[:2]
    world.set_door_restrictions(org, deleted, {"apartment_entity_ids": [E1]})
    world.set_door_restrictions(org, purged, {"apartment_entity_ids": [E2]})
    sync(org)
    world.delete_device(org, deleted)
    world.purge_device(org, purged)
    before = len(sim.log)
    outcome = sync(org)
    assert outcome.counts["deleted"] == 1 and outcome.counts["purged"] == 1
    assert "get_door_restrictions" not in {r.operation for r in sim.requests()[before:]}
    states = dict(
        sql(store, "SELECT entity_id, portal_state FROM portal_access WHERE portal_id IN (:a, :b)", a=deleted, b=purged)
    )
    assert states == {E1: "deleted", E2: "purged"}


@pytest.mark.parametrize("style", ["list", "bool"])
@pytest.mark.parametrize("key", ["apartment_entity_ids", "listing_entity_ids"])
def test_both_contract_variants_are_mirrored(store: Store, style: Any, key: Any) -> None:
    world = World(seed=6, credentials_style=style, restrictions_key=key)
    org = world.seed(1, 200)[0]
    world.add_key(API_KEY)
    portal = portals(world, org)[0]
    world.set_door_restrictions(org, portal, {key: [E3]})
    with Simulator(world, strict_query=True) as sim, OpenAppClient(api_settings(sim)) as client:
        assert Syncer(client, store)(org).status == "succeeded"
    assert_mirror_matches(store, world, org)
    row = Details(store).row(portal)
    assert row["body_key"] == key and row["raw"] == {key: [E3]}  # as received
    sample = next(r for r in store.devices_of(org) if r["has_credentials"])
    assert isinstance(sample["credentials_set"], list if style == "list" else bool)


def test_metadata_definitions_are_refreshed_daily_or_for_a_new_integration(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    definitions = Details(store)
    first = definitions.definitions(org)
    assert set(first) == set(world.orgs[org].integrations)
    assert all(row["fingerprint"] and row["last_error"] is None for row in first.values())
    fresh = world.add_org("01HORG00000000000000000077")  # an integration the org did not have
    new_integration = fresh.integrations[0]
    world.orgs[org].integrations.append(new_integration)
    world.orgs[org].providers[new_integration] = fresh.providers[new_integration]
    world.create_device(org, {"org_id": org, "integration_id": new_integration, "name": "New kind of device"})
    outcome = sync(org)
    assert outcome.counts["definition_requests"] == 1  # only the new integration
    assert set(definitions.definitions(org)) == set(first) | {new_integration}

    shelly = next(i for i, p in world.orgs[org].providers.items() if p == "shelly_cloud")
    PROVIDER_SCHEMAS["shelly_cloud"]["properties"]["relay"]["maximum"] = 7  # the provider's schema moves on
    try:
        with store.engine.begin() as conn:
            conn.execute(update(metadata_definitions).values(next_fetch_at=utcnow() - timedelta(hours=1)))
        outcome = sync(org)
        assert outcome.counts["definition_requests"] == len(world.orgs[org].integrations)
        now = definitions.definitions(org)
        assert now[shelly]["fingerprint"] != first[shelly]["fingerprint"]
        assert now[shelly]["changed_at"] > first[shelly]["changed_at"]
        assert now[shelly]["json_schema"]["properties"]["relay"]["maximum"] == 7
    finally:
        PROVIDER_SCHEMAS["shelly_cloud"]["properties"]["relay"]["maximum"] = 3


def test_details_can_be_switched_off(sim: Simulator, client: OpenAppClient, store: Store, org: str) -> None:
    settings = SyncSettings(door_restrictions=False, metadata_definitions=False)
    outcome = OrgPass(client, store, PassOptions(OrgSettings(org), settings)).run()
    assert outcome.status == "succeeded"
    assert {r.operation for r in sim.requests()} == {"list_devices"}


def test_an_integration_filter_asks_only_its_own_portals(
    sim: Simulator, client: OpenAppClient, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)  # the whole org first: its portals are mirrored
    make_due(store)
    shelly = next(i for i, p in world.orgs[org].providers.items() if p == "shelly_cloud")
    before = len(sim.log)
    outcome = OrgPass(client, store, PassOptions(OrgSettings(org, integration_id=shelly), SyncSettings())).run()
    assert outcome.status == "succeeded"
    assert "get_door_restrictions" not in {r.operation for r in sim.requests()[before:]}


def test_portals_that_keep_failing_never_hold_up_the_others(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    broken = set(sorted(portals(world, org))[:3])  # the lowest ids: first in line by id
    answer = world.door_restrictions

    def failing(device_id: str) -> bytes:
        if device_id in broken:
            raise SimError(503, "this portal's controller is unreachable", "door_unreachable")
        return answer(device_id)

    world.door_restrictions = failing  # type: ignore[method-assign]
    first = sync(org)  # three unreachable doors are not OpenApp failing: the others are asked too
    assert first.counts["restriction_failures"] == 3
    assert first.counts["restriction_requests"] == len(portals(world, org))
    make_due(store, sorted(set(portals(world, org)) - broken))
    before = len(sim.log)
    second = sync(org)  # after one failure they are asked again, after all the others
    assert second.counts["restriction_requests"] == len(portals(world, org))
    asked = [r.device_id for r in sim.requests("get_door_restrictions")[before:]]
    first_asked = {device_id: asked.index(device_id) for device_id in set(asked)}
    others = len(first_asked) - len(broken)
    # Last in line: each is first asked after all others but those asked at the same time.
    at_once = sync.client.budget.max_concurrency
    assert min(first_asked[device_id] for device_id in broken) >= others - (at_once - 1)
    assert len(asked) == others + 3 * 6  # each broken one tried six times by the client
    rows = Details(store)
    for device_id in broken:
        row = rows.row(device_id)
        assert row["failures"] == 2 and row["status"] == "failed"
        assert (row["next_fetch_at"] - utcnow()).total_seconds() > 50  # backing off: 60 s, 120 s ... 1 h
    third = sync(org)
    assert third.counts["restriction_requests"] == 0  # nothing due: the broken ones wait


def test_a_list_after_a_404_or_a_400_is_history(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    portal = portals(world, org)[0]
    world.set_door_restrictions(org, portal, {"apartment_entity_ids": []})  # not restricted
    sync(org)
    sim.inject(Fault(status=404, operation="get_door_restrictions", times=1))
    make_due(store, [portal])
    sync(org)
    assert Details(store).row(portal)["status"] == "not_found"
    world.set_door_restrictions(org, portal, {"apartment_entity_ids": [E1]})
    make_due(store, [portal])
    sync(org)
    assert restriction_changes(store, org)[-1]["diff"] == {"door_restrictions": {"old": [], "new": [E1]}}
    sim.inject(Fault(status=400, operation="get_door_restrictions", times=1))
    make_due(store, [portal])
    sync(org)
    world.set_door_restrictions(org, portal, {"apartment_entity_ids": [E2]})
    make_due(store, [portal])
    sync(org)
    assert [c["diff"]["door_restrictions"] for c in restriction_changes(store, org)][-2:] == [
        {"old": [E1], "new": None},
        {"old": None, "new": [E2]},
    ]


def test_answers_are_written_before_they_pile_up(
    sync: Syncer, store: Store, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for device_id in portals(world, org)[:6]:
        world.set_door_restrictions(org, device_id, {"apartment_entity_ids": [E1, E2, E3]})
    monkeypatch.setattr(details_module, "BATCH_ENTITIES", 7)  # two portals of three entities, and a third
    batches: list[int] = []
    record = details_module.PortalRestrictions.record

    def counted(self: Any, org_id: str, run_id: int, now: Any, answers: Any) -> int:
        batches.append(len(answers))
        return record(self, org_id, run_id, now, answers)

    monkeypatch.setattr(details_module.PortalRestrictions, "record", counted)
    assert sync(org).status == "succeeded"
    assert max(batches) < details_module.BATCH and sum(batches) == len(portals(world, org))
    assert_details_match(store, world, org)


def test_a_fault_in_one_phase_spares_the_other_and_the_pass(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise StoreError("database error while writing door restrictions: disk full")

    monkeypatch.setattr(details_module.PortalRestrictions, "record", broken)
    outcome = sync(org)
    assert outcome.status == "succeeded" and outcome.counts["definition_requests"] == len(world.orgs[org].integrations)

    def bug(self: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(details_module.DetailReads, "run", bug)
    assert sync(org).status == "succeeded"  # the scan and purge detection stand


SEQUENTIAL: dict[str, Any] = {"page_size": 20, "page_concurrency": 1}  # the scan as 75 pages, one at a time


def large_world() -> World:
    """One org of 1,500 devices, a fifth of them portals (300)."""
    w = World(seed=7)
    w.seed(orgs=1, devices_per_org=1500, portal_fraction=0.2)
    w.add_key(API_KEY)
    return w


def test_door_restrictions_are_asked_while_the_scan_reads_on(store: Store) -> None:
    world = large_world()
    org = next(iter(world.orgs))
    with Simulator(world, strict_query=True) as sim, OpenAppClient(api_settings(sim, **SEQUENTIAL)) as client:
        outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        assert outcome.status == "succeeded", outcome.error
        asked = sim.requests("get_door_restrictions")
        last_page = max(r.started for r in sim.requests("list_devices"))
        during = [r for r in asked if r.started < last_page]
        # Each portal asked once in the pass, many before the scan's last page was asked for.
        assert sorted(r.device_id for r in asked) == sorted(portals(world, org))
        assert outcome.counts["restriction_requests"] == len(asked) == len(portals(world, org))
        assert len(during) >= details_module.CHECK // 2
        assert_details_match(store, world, org)
        again = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        assert again.counts["restriction_requests"] == 0  # all answered: nothing due inside the interval


def test_a_fault_while_the_scan_reads_on_leaves_the_rest_for_after_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = large_world()
    org = next(iter(world.orgs))
    calls = 0
    due_among = details_module.PortalRestrictions.due_among

    def failing_once_some_were_asked(self: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StoreError("database error while finding portals due for their door restrictions: disk I/O error")
        return due_among(self, *args)

    monkeypatch.setattr(details_module.PortalRestrictions, "due_among", failing_once_some_were_asked)
    # 75 pages one after the other: the second check (at about the 25th page) comes while the scan goes on.
    with Simulator(world, strict_query=True) as sim, OpenAppClient(api_settings(sim, **SEQUENTIAL)) as client:
        outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
        assert outcome.status == "succeeded", outcome.error
        assert calls == 2  # no more asking during the scan after the fault
        asked = [r.device_id for r in sim.requests("get_door_restrictions")]
        assert sorted(asked) == sorted(portals(world, org))  # the rest asked after the scan, none twice
        assert_details_match(store, world, org)
