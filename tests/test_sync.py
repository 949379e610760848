"""A pass of one org, end to end: simulator over loopback HTTP -> real SQLite and PostgreSQL."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import delete, select, update

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.errors import StoreError
from syncd.models import (
    HISTORY_FIELDS,
    LIFECYCLE_FIELDS,
    PageRecord,
    PageShape,
    encode,
    history_row,
    normalise_name,
    parse_timestamp,
    utcnow,
)
from syncd.passes import locked_pass
from syncd.simulator import Fault, Simulator, World
from syncd.simulator.world import PROVIDER_SCHEMAS
from syncd.store import Store
from syncd.store.schema import devices, door_restrictions, list_pages, metadata_definitions, portal_restrictions
from syncd.sync import OrgPass, PageWrites, PassOptions, PassOutcome, PreparedPage, UnchangedPages
from syncd.sync import scan as scan_module
from syncd.sync.scan import Scan
from syncd.sync.unchanged import PageSummary

from .conftest import API_KEY, FAST_RETRY, Syncer, api_settings


def assert_mirror_matches(store: Store, world: World, org: str) -> None:
    """Field by field: every device OpenApp has is mirrored exactly; every other one is purged."""
    truth = {d["id"]: d for d in world.ground_truth(org)}
    rows = {r["id"]: r for r in store.devices_of(org)}
    live = {i: r for i, r in rows.items() if r["state"] != "purged"}
    assert sorted(live) == sorted(truth)
    for device_id, raw in truth.items():
        row = live[device_id]
        assert row["raw"] == raw
        for column in ("org_id", "integration_id", "zone_id", "external_id", "device_metadata"):
            assert row[column] == raw.get(column), column
        assert row["name"] == normalise_name(raw["name"])
        stamps = raw.get("metadata") or {}
        for column in LIFECYCLE_FIELDS:
            assert row[column] == parse_timestamp(raw.get(column) or stamps.get(column)), column
        assert row["state"] == ("deleted" if row["deleted_at"] else "active")
    for device_id, row in rows.items():
        if device_id not in truth:
            assert row["state"] == "purged" and row["purged_at"] is not None
    assert_details_match(store, world, org)


class Details:
    """Reads of the door restrictions and metadata definitions in the mirror, for assertions."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def entities(self, device_id: str) -> list[str]:
        query = select(door_restrictions.c.entity_id).where(door_restrictions.c.device_id == device_id)
        with self.store.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    def row(self, device_id: str) -> dict[str, Any]:
        query = select(portal_restrictions).where(portal_restrictions.c.device_id == device_id)
        with self.store.engine.connect() as conn:
            return dict(conn.execute(query).mappings().one())

    def definitions(self, org_id: str) -> dict[str, dict[str, Any]]:
        query = select(metadata_definitions).where(metadata_definitions.c.org_id == org_id)
        with self.store.engine.connect() as conn:
            return {row["integration_id"]: dict(row) for row in conn.execute(query).mappings()}


def assert_details_match(store: Store, world: World, org: str) -> None:
    """Every active portal's door restrictions, every device's credentials_set and every
    integration's metadata definition are mirrored as OpenApp has them."""
    restrictions = Details(store)
    definitions = restrictions.definitions(org)
    sim_org = world.orgs[org]
    for device_id, row in ((r["id"], r) for r in store.devices_of(org) if r["state"] == "active"):
        device = sim_org.devices[device_id]
        assert row["credentials_set"] == world.device(org, device_id)["credentials_set"]
        assert row["has_credentials"] is bool(device.credentials)
        if device.kind == "virtual_access_portal":
            assert restrictions.entities(device_id) == sorted(device.restrictions), device_id
            assert restrictions.row(device_id)["status"] == "ok"
        provider = sim_org.providers[device.integration_id]
        assert definitions[device.integration_id]["provider_type"] == provider
        assert definitions[device.integration_id]["json_schema"] == PROVIDER_SCHEMAS[provider]


def test_first_sync_equals_ground_truth(sync: Syncer, store: Store, world: World, org: str) -> None:
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["created"] == 450
    assert outcome.counts["pages"] == 3
    assert_mirror_matches(store, world, org)
    run = store.run(outcome.run_id)
    assert (run["status"], run["devices_seen"], run["created"], run["pages"]) == ("succeeded", 450, 450, 3)
    assert run["finished_at"] >= run["started_at"]
    # A baseline, not news: each device's first version is recorded as 'observed', with its values.
    baseline = store.changes(org)
    assert {c["change"] for c in baseline} == {"observed"} and len(baseline) == 450
    mirrored = {r["id"]: r for r in store.devices_of(org)}
    for row in baseline:
        device = mirrored[row["device_id"]]
        assert [row[f] for f in HISTORY_FIELDS] == [device[f] for f in HISTORY_FIELDS]
        assert row["observed_at"] == device["first_seen_at"] and row["run_id"] == outcome.run_id
    assert all(r["first_seen_at"] == r["last_changed_at"] for r in store.devices_of(org))
    deleted = [r for r in store.devices_of(org) if r["state"] == "deleted"]
    assert deleted and all(r["deleted_at"] for r in deleted)


def test_tolerant_parsing_of_names_and_timestamps(store: Store) -> None:
    world = World(seed=5, name_style="mixed", timestamps="metadata")
    org = world.seed(1, 300)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim, OpenAppClient(api_settings(sim)) as client:
        outcome = Syncer(client, store)(org)
    assert outcome.status == "succeeded", outcome.error
    assert_mirror_matches(store, world, org)
    rows = store.devices_of(org)
    assert any("und" in r["name"] for r in rows) and any("en" in r["name"] for r in rows)
    assert any(r["state"] == "deleted" for r in rows)


def test_second_pass_without_changes_writes_nothing(sync: Syncer, store: Store, org: str) -> None:
    sync(org)
    before = store.devices_of(org)
    outcome = sync(org)
    assert outcome.status == "succeeded"
    assert outcome.counts["unchanged"] == 450
    assert sum(outcome.counts[k] for k in ("created", "updated", "deleted", "restored", "purged")) == 0
    run = store.run(outcome.run_id)  # counters held back by pages that wrote nothing are all committed
    assert (run["pages"], run["devices_seen"], run["unchanged"], run["updated"]) == (3, 450, 450, 0)
    assert store.devices_of(org) == before
    assert store.changes(run_id=outcome.run_id) == []


def test_the_same_content_serialised_differently_is_renewed_not_recorded(
    sync: Syncer, store: Store, world: World, org: str
) -> None:
    # As a mirror written by an older syncd (sorted keys, another digest) looks to this one.
    sync(org)
    before = {r["id"]: r for r in store.devices_of(org)}
    rewritten = sorted(before)[:50]
    with store.writer() as writer:
        for device_id in rewritten:
            resorted = dict(sorted(before[device_id]["raw"].items()))
            writer.execute(update(devices).where(devices.c.id == device_id).values(raw=resorted, fingerprint="0" * 32))
        writer.execute(delete(list_pages))  # an older syncd recorded no pages
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["unchanged"] == 450 and outcome.counts["updated"] == 0
    assert store.changes(run_id=outcome.run_id) == []
    after = {r["id"]: r for r in store.devices_of(org)}
    served = {d["id"]: d for d in world.ground_truth(org)}
    for device_id in rewritten:
        assert after[device_id]["fingerprint"] == encode(served[device_id])[1]
        assert after[device_id]["last_changed_at"] == before[device_id]["last_changed_at"]
        assert after[device_id]["raw"] == before[device_id]["raw"]


def test_changes_between_passes_are_all_recorded(sync: Syncer, store: Store, world: World, org: str) -> None:
    sync(org)
    truth = world.ground_truth(org)
    active = [d["id"] for d in truth if not d["deleted_at"]]
    deleted = [d["id"] for d in truth if d["deleted_at"]]
    world.update_device(org, active[0], {"name": {"en": "Renamed gate"}})
    world.update_device(org, active[1], {"zone_id": world.orgs[org].zones[0], "external_id": "ext-new"})
    world.delete_device(org, active[2])
    world.delete_device(org, active[3])
    world.restore_device(org, deleted[0])
    world.purge_device(org, active[4])
    world.purge_device(org, deleted[1])
    created = [world.create_device(org) for _ in range(3)]

    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    counts = {k: outcome.counts[k] for k in ("created", "updated", "deleted", "restored", "purged")}
    assert counts == {"created": 3, "updated": 2, "deleted": 2, "restored": 1, "purged": 2}
    assert_mirror_matches(store, world, org)

    changes = {(c["device_id"], c["change"]): c for c in store.changes(run_id=outcome.run_id)}
    assert set(changes) == {
        (active[0], "updated"),
        (active[1], "updated"),
        (active[2], "deleted"),
        (active[3], "deleted"),
        (deleted[0], "restored"),
        (active[4], "purged"),
        (deleted[1], "purged"),
        *((c, "created") for c in created),
    }
    rename = changes[(active[0], "updated")]["diff"]
    assert rename["name"]["new"] == {"value": {"en": "Renamed gate"}}
    assert "updated_at" in rename and "state" not in rename
    assert changes[(active[2], "deleted")]["diff"]["state"] == {"old": "active", "new": "deleted"}
    assert changes[(deleted[0], "restored")]["diff"]["state"] == {"old": "deleted", "new": "active"}
    assert changes[(active[4], "purged")]["diff"] == {"state": {"old": "active", "new": "purged"}}
    assert store.device(active[4])["purged_at"] is not None
    assert store.device(active[4])["raw"]["id"] == active[4]  # the last known payload is kept


@pytest.mark.parametrize("ahead", [1, 4])
def test_inserts_and_purges_during_a_scan_never_cause_a_false_purge(
    sim: Simulator, store: Store, world: World, org: str, ahead: int
) -> None:
    """Offsets shift both ways mid-scan. One page at a time the outcome is exact; with pages asked
    ahead the churn lands between pages already asked, so the purge of the device that is really
    gone may come one pass later; a false purge never."""
    client = OpenAppClient(api_settings(sim, page_concurrency=ahead))
    sync = Syncer(client, store)
    sync(org)
    ids = world.ids(org)
    truly_gone = ids[420]

    def churn(w: World) -> None:  # right before page 2: shift offsets both ways, purge one unseen device
        for _ in range(3):
            w.create_device(org, before=ids[150])
        for device_id in (ids[10], ids[20]):
            w.purge_device(org, device_id)
        w.purge_device(org, truly_gone)

    world.during_scan(org, 200, churn)
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    existing = set(world.ids(org))
    falsely_purged = [r["id"] for r in store.devices_of(org) if r["state"] == "purged" and r["id"] in existing]
    assert falsely_purged == []
    if ahead == 1:
        assert store.device(truly_gone)["state"] == "purged"
    first = outcome.counts

    outcome = sync(org)  # one more pass reflects everything
    assert outcome.status == "succeeded"
    assert first["created"] + outcome.counts["created"] == 3
    assert first["purged"] + outcome.counts["purged"] == 3
    assert store.device(truly_gone)["state"] == "purged"
    assert_mirror_matches(store, world, org)
    client.close()


@pytest.mark.parametrize("ahead", [1, 4])
def test_devices_hidden_by_a_shift_are_confirmed_not_purged(
    sim: Simulator, store: Store, world: World, org: str, ahead: int
) -> None:
    client = OpenAppClient(api_settings(sim, page_concurrency=ahead))
    sync = Syncer(client, store)
    sync(org)
    ids = world.ids(org)
    world.during_scan(org, 200, lambda w: [w.purge_device(org, i) for i in ids[5:8]])
    world.during_scan(org, 400, lambda w: [w.purge_device(org, i) for i in ids[250:252]])
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    if ahead == 1:  # 5 devices slid past the scan's offsets; each was fetched by id and found alive
        assert outcome.counts["purged"] == 0
    # Pages asked together meet the purges in either order: a device purged before its page was
    # served is rightly purged; one that slid past is confirmed alive. Never a false purge.
    existing = set(world.ids(org))
    assert all(r["state"] != "purged" for r in store.devices_of(org) if r["id"] in existing)
    sync(org)
    assert_mirror_matches(store, world, org)
    client.close()


def test_rate_limits_bursts_and_resets_still_end_in_a_correct_mirror(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sim.inject(Fault(status=429, retry_after="1", times=1, operation="list_devices"))
    sim.inject(Fault(status=503, times=3, skip=1, operation="list_devices"))
    sim.inject(Fault(kind="reset", times=2, skip=2, operation="list_devices"))
    sim.inject(Fault(status=504, times=2, operation="get_device"))
    sync(org)
    world.purge_device(org, world.ids(org)[100])
    outcome = sync(org)
    assert outcome.status == "succeeded", outcome.error
    assert_mirror_matches(store, world, org)
    statuses = [r.status for r in sim.requests()]
    assert statuses.count(429) == 1 and statuses.count(503) == 3 and statuses.count(0) == 2
    assert statuses.count(504) == 2


def test_unauthorised_pass_fails_clearly_and_changes_nothing(
    sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    before = store.devices_of(org)
    world.update_device(org, world.ids(org)[0], {"name": {"en": "changed"}})
    world.keys.clear()  # the key was revoked
    outcome = sync(org)
    assert outcome.status == "failed"
    assert "HTTP 401" in (outcome.error or "") and "API key" in (outcome.error or "")
    assert store.devices_of(org) == before
    assert store.changes(run_id=outcome.run_id) == []
    assert store.run(outcome.run_id)["status"] == "failed"


def test_mass_purge_is_refused_until_confirmed(sync: Syncer, store: Store, world: World, org: str) -> None:
    sync(org)
    for device_id in world.ids(org)[:60]:  # 13% of 450, above the 10% default
        world.purge_device(org, device_id)
    outcome = sync(org)
    assert outcome.status == "failed"
    assert "60 of 450" in (outcome.error or "") and "--allow-mass-purge" in (outcome.error or "")
    assert all(r["state"] != "purged" for r in store.devices_of(org))
    outcome = sync(org, allow_mass_purge=True)
    assert outcome.status == "succeeded" and outcome.counts["purged"] == 60
    assert_mirror_matches(store, world, org)


def test_an_empty_scan_never_purges_the_org(sync: Syncer, store: Store, world: World, org: str) -> None:
    sync(org)
    for device_id in world.ids(org):
        world.purge_device(org, device_id)
    outcome = sync(org)
    assert outcome.status == "failed" and "returned no devices" in (outcome.error or "")
    assert all(r["state"] != "purged" for r in store.devices_of(org))


def test_purge_fraction_is_configurable(client: Any, store: Store, world: World, org: str) -> None:
    sync = Syncer(client, store, SyncSettings(max_purge_fraction=0.5))
    sync(org)
    for device_id in world.ids(org)[:60]:
        world.purge_device(org, device_id)
    assert sync(org).counts["purged"] == 60


def test_a_device_of_another_org_is_rejected(sync: Syncer, store: Store, world: World, org: str) -> None:
    other = next(o for o in world.orgs if o != org)
    intruder_id = world.ids(other)[0]
    world.orgs[org].devices[intruder_id] = world.orgs[other].devices[intruder_id]
    bisect.insort(world.orgs[org].ids, intruder_id)
    outcome = sync(org)
    assert outcome.status == "succeeded"
    assert outcome.counts["rejected"] == 1 and store.run(outcome.run_id)["rejected"] == 1
    assert store.device(intruder_id) is None
    assert len(store.devices_of(org)) == 450


def test_unreadable_device_is_reported_and_the_rest_is_kept(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    world.purge_device(org, world.ids(org)[300])
    world.update_device(org, world.ids(org)[10], {"name": {"en": "still written"}})
    page = world.ground_truth(org)[:200]
    del page[3]["id"]
    sim.inject(Fault(status=200, body=orjson.dumps(page), operation="list_devices", times=1))
    outcome = sync(org)
    assert outcome.status == "failed"
    assert "position 3" in (outcome.error or "") and "missing or empty 'id'" in (outcome.error or "")
    assert outcome.counts["purged"] == 0  # an incomplete scan never purges
    assert outcome.counts["updated"] == 1  # the rest of the page was written
    assert store.device(world.ids(org)[10])["name"] == {"en": "still written"}


def test_stopping_aborts_the_pass_and_the_next_one_completes(client: Any, store: Store, world: World, org: str) -> None:
    stop = threading.Event()
    outcome = Syncer(client, store)(org, stop=stop, on_progress=lambda org_id, pages, seen: stop.set())
    assert outcome.status == "aborted"
    assert outcome.counts["pages"] == 1
    assert len(store.devices_of(org)) == 200  # the committed page is valid data
    assert Syncer(client, store)(org).status == "succeeded"
    assert_mirror_matches(store, world, org)


def test_a_stale_running_row_is_closed_by_the_next_pass(sync: Syncer, store: Store, org: str) -> None:
    crashed, _ = store.start_run(org, "run-once", "elsewhere:1", utcnow())
    outcome = sync(org)
    assert outcome.status == "succeeded"
    stale = store.run(crashed)
    assert stale["status"] == "aborted" and "interrupted" in stale["error"]


def test_last_seen_is_refreshed_only_after_the_resolution(client: Any, store: Store, org: str) -> None:
    Syncer(client, store)(org)
    first = {r["id"]: r["last_seen_at"] for r in store.devices_of(org)}
    Syncer(client, store, SyncSettings(last_seen_resolution=0))(org)
    later = {r["id"]: r["last_seen_at"] for r in store.devices_of(org)}
    assert all(later[i] > first[i] for i in first)


def test_org_filters_are_applied_and_scope_purge_detection(
    sim: Simulator, client: Any, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)  # the whole org first; later passes are filtered
    integration = next(i for i, provider in world.orgs[org].providers.items() if provider == "openapp_virtual")
    portal = OrgSettings(org, integration_id=integration, device_kind="virtual_access_portal")
    in_scope = [
        d["id"]
        for d in world.ground_truth(org)
        if d["integration_id"] == integration and d["device_metadata"]["kind"] == "virtual_access_portal"
    ]
    world.purge_device(org, in_scope[0])
    world.update_device(org, in_scope[1], {"name": {"en": "Portal rewritten"}})
    outcome = OrgPass(client, store, PassOptions(portal, SyncSettings())).run()
    assert outcome.status == "succeeded", outcome.error
    assert outcome.counts["devices_seen"] == len(in_scope) - 1
    assert outcome.counts["purged"] == 1 and outcome.counts["updated"] == 1  # nothing out of scope was touched
    assert len(sim.requests("get_device")) == 1  # only the one in-scope device missing was confirmed
    assert store.device(in_scope[0])["state"] == "purged"


def test_a_page_that_fails_to_commit_takes_its_counts_with_it(store: Store, org: str) -> None:
    now = utcnow()
    run_id, _ = store.start_run(org, "run-once", "test", now)
    broken = history_row("01HK153X0038NZ3ZA2MABNBN61", org, now, "restrictions", {}, None, run_id=run_id)  # no device
    with store.session() as session:
        unchanged = UnchangedPages(session, OrgSettings(org), 200, 86400, run_id)
        writes = PageWrites(session, unchanged, progress_interval=3600)
        writes.submit(PreparedPage(run_id, now, [], [], [], [], [], Counter(pages=1, unchanged=200)))  # held back
        summary = PageSummary([], {}, {}).encode()
        unchanged.compared(PageRecord(200, PageShape("digest", 0, None, None), now, summary))  # compared whole
        with pytest.raises(StoreError, match="database error while writing devices"):
            writes.submit(PreparedPage(run_id, now, [], [], [], [], [broken], Counter(pages=1, updated=1)))
        writes.flush()
    run = store.run(run_id)
    assert (run["pages"], run["unchanged"], run["updated"]) == (1, 200, 0)
    assert store.changes() == []
    with store.engine.connect() as conn:
        assert conn.execute(select(list_pages)).all() == []  # nor is the page recorded


def test_an_interrupted_first_pass_leaves_a_baseline_not_history(
    client: Any, store: Store, world: World, org: str
) -> None:
    stop = threading.Event()
    first = Syncer(client, store)(org, stop=stop, on_progress=lambda org_id, pages, seen: stop.set())
    assert first.status == "aborted" and len(store.devices_of(org)) == 200
    second = Syncer(client, store)(org)
    assert second.status == "succeeded" and second.counts["created"] == 250
    # The baseline lasts until a pass of the org has succeeded: every device is 'observed', once.
    changes = store.changes(org)
    assert {c["change"] for c in changes} == {"observed"} and len({c["device_id"] for c in changes}) == 450 == len(
        changes
    )
    new = world.create_device(org)
    third = Syncer(client, store)(org)
    assert [(c["device_id"], c["change"]) for c in store.changes(run_id=third.run_id)] == [(new, "created")]


def test_a_pass_ends_at_its_deadline(sim: Simulator, store: Store, world: World, org: str) -> None:
    sim.inject(Fault(kind="slow", delay=1.5, operation="list_devices", times=None))  # pages are asked 4 at once
    with OpenAppClient(api_settings(sim)) as client:
        started = time.monotonic()
        outcome = Syncer(client, store, SyncSettings(pass_timeout=1.0))(org)
    assert time.monotonic() - started < 3
    assert outcome.status == "failed" and "sync.pass_timeout" in (outcome.error or "")
    assert outcome.counts["purged"] == 0


def test_a_list_far_longer_than_the_org_is_cut_off(
    sim: Simulator, client: Any, store: Store, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Syncer(client, store)(org).status == "succeeded"  # 450 devices: 3 pages
    monkeypatch.setattr(scan_module, "PAGE_GROWTH_MARGIN", 1)  # 10 x 3 + 1 pages from now on
    for _ in range(31 * 200 - 450):
        world.create_device(org)
    for attempt in range(2):  # a cut-off pass does not raise the limit of the next: only a success does
        before = len(sim.requests("list_devices"))
        outcome = Syncer(client, store)(org)
        assert outcome.status == "failed", attempt
        assert "kept sending full pages: stopped after 31 pages" in (outcome.error or "")
        assert f"syncd run-once --org {org} --max-pages N" in (outcome.error or "")
        asked = len(sim.requests("list_devices")) - before
        ahead = client.settings.page_concurrency  # the one page more that showed it, and those asked with it
        assert 31 + 1 <= asked <= 31 + ahead
        assert outcome.counts["purged"] == 0
        # the pages asked ahead were waited for when the pass ended, though its error is still held
        assert not [t.name for t in threading.enumerate() if t.name.startswith("page")]
    confirmed = Syncer(client, store)(org, max_pages=100)  # an operator confirms the org really grew
    assert confirmed.status == "succeeded" and confirmed.counts["devices_seen"] == 31 * 200
    assert Syncer(client, store)(org).status == "succeeded"  # and the limit follows the new size
    settings = SyncSettings(max_pages=5)  # the hard limit applies to first passes too
    other = next(o for o in world.orgs if o != org)
    assert Syncer(client, store, settings)(other).status == "succeeded"  # 3 pages
    for _ in range(1000):
        world.create_device(other)
    assert "stopped after 5 pages" in (Syncer(client, store, settings)(other).error or "")


def test_a_stop_during_a_retry_after_wait_aborts_the_pass(sim: Simulator, store: Store, org: str) -> None:
    stop = threading.Event()
    sim.inject(Fault(status=429, retry_after="30", operation="list_devices", skip=1, times=None))
    settings = api_settings(sim, retry=replace(FAST_RETRY, max_retry_after=60.0, deadline=120.0))
    with OpenAppClient(settings, stop=stop) as client:
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        outcome = Syncer(client, store)(org, stop=stop)
    assert time.monotonic() - started < 3
    assert outcome.status == "aborted" and outcome.exception is None  # stopped, not failed
    assert store.run(outcome.run_id)["status"] == "aborted"


def test_an_unbelievable_purge_check_costs_only_its_device(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    gone, also_gone = world.ids(org)[10], world.ids(org)[20]
    world.purge_device(org, gone)
    world.purge_device(org, also_gone)
    imposter = orjson.dumps(world.ground_truth(org)[0])
    sim.inject(Fault(status=200, body=imposter, operation="get_device", times=1))
    outcome = sync(org)
    assert outcome.status == "failed" and "could not be confirmed" in (outcome.error or "")
    assert "it was not believed" in (outcome.error or "")
    states = {d: store.device(d)["state"] for d in (gone, also_gone)}  # type: ignore[index]
    assert sorted(states.values()) == ["active", "purged"]  # the other check still counted
    assert store.device(world.ids(org)[0])["raw"] == world.ground_truth(org)[0]  # type: ignore[index]


def test_only_a_scheduled_pass_that_ran_holds_its_org_for_the_interval(
    client: Any, store: Store, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a scheduled pass claims its org for the interval; one that was stopped or never
    began gives the claim back, so the next daemon's timer runs one. (SQLite: nothing is shared.)"""

    def scheduled(org: str, instance: str) -> PassOutcome:
        options = PassOptions(OrgSettings(org), SyncSettings(), instance=instance, stop=threading.Event())
        org_pass = OrgPass(client, store, options)
        return locked_pass(org_pass, spacing=60)

    stopped_org, unstarted_org = list(world.orgs)[:2]
    with monkeypatch.context() as patch:
        patch.setattr(Scan, "run", lambda self: False)  # stopped during its scan
        assert scheduled(stopped_org, "a:1").status == "aborted"
    with monkeypatch.context() as patch:
        patch.setattr(store, "start_run", failing_start_run)
        unstarted = scheduled(unstarted_org, "a:1")
    assert unstarted.status == "failed" and unstarted.run_id is None and "database is down" in (unstarted.error or "")
    for org in (stopped_org, unstarted_org):
        assert scheduled(org, "b:2").status == "succeeded", org  # neither was held
        held = scheduled(org, "a:1")
        if store.dialect == "postgresql":
            assert held.status == "skipped" and held.due_in is not None and 59 < held.due_in <= 60
        else:
            assert held.status == "succeeded"


def failing_start_run(*args: Any) -> Any:
    raise StoreError("starting a run: the database is down")


STATES = ("active", "deleted", "purged")


def test_the_device_gauges_follow_the_mirror_counted_once_when_nothing_was_purged(
    sync: Syncer, store: Store, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``syncd_devices`` per state after each pass: a pass with nothing to purge counts the org's
    devices once (the purge check's count serves the gauges), one that purged counts again."""

    def gauges() -> dict[str, int]:
        return {s: int(REGISTRY.get_sample_value("syncd_devices", {"org_id": org, "state": s}) or 0) for s in STATES}

    def mirrored() -> dict[str, int]:
        return {s: sum(1 for r in store.devices_of(org) if r["state"] == s) for s in STATES}

    counted: list[str | None] = []
    real = store.state_counts

    def counting(org_id: str | None = None) -> dict[str, dict[str, int]]:
        counted.append(org_id)
        return real(org_id)

    monkeypatch.setattr(store, "state_counts", counting)
    sync(org)
    world.delete_device(org, world.ids(org)[0])
    assert sync(org).counts["deleted"] == 1
    assert gauges() == mirrored() and len(counted) == 2 and gauges()["deleted"] >= 1
    counted.clear()
    world.purge_device(org, world.ids(org)[1])
    assert sync(org).counts["purged"] == 1
    assert gauges() == mirrored() and gauges()["purged"] == 1
    assert len(counted) == 2  # the purge check's count, then the gauges' after the purge
