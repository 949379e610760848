"""Pages compared whole before are taken without comparing them again (syncd.sync.unchanged), and
nothing the mirror should show is lost by it: on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from syncd.api import OpenAppClient
from syncd.api import client as client_module
from syncd.config import OrgSettings, SyncSettings
from syncd.edits import queue_edit
from syncd.models import PageRecord, PageShape, utcnow
from syncd.simulator import Simulator, World
from syncd.store import Store
from syncd.store.schema import list_pages, metadata_definitions, org_generations, portal_restrictions
from syncd.sync import unchanged as unchanged_module
from syncd.sync.unchanged import PageSummary, UnchangedPages

from .conftest import Syncer, api_settings
from .test_sync import assert_mirror_matches
from .test_writeback import ORGS, active, reconciler

PAGES = 3  # the world fixture's 450 devices an org, at 200 a page


def record(offset: int, digest: str, seen_since: datetime, ids: list[str] | None = None) -> PageRecord:
    """A page compared whole, as a pass records it."""
    ids = ids if ids is not None else [f"device-at-{offset}"]
    return PageRecord(offset, PageShape(digest, len(ids), None, ids[0]), seen_since, PageSummary(ids, {}, {}).encode())


def generation(store: Store, org: str) -> int:
    with store.engine.connect() as conn:
        found = conn.execute(select(org_generations.c.generation).where(org_generations.c.org_id == org)).scalar()
    return found or 0


def recorded_pages(store: Store, org: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(list_pages).where(list_pages.c.org_id == org)).scalar_one()


def test_a_re_sync_takes_unchanged_pages_and_compares_the_changed_one(
    sync: Syncer, store: Store, world: World, org: str
) -> None:
    first = sync(org)
    assert first.counts["pages_unchanged"] == 0 and recorded_pages(store, org) == PAGES
    again = sync(org)
    assert again.status == "succeeded", again.error
    assert again.counts["pages_unchanged"] == PAGES
    assert (again.counts["devices_seen"], again.counts["unchanged"], again.counts["pages"]) == (450, 450, PAGES)
    assert store.changes(run_id=again.run_id) == []
    world.update_device(org, world.ids(org)[300], {"name": {"en": "Renamed on page 2"}})
    changed = sync(org)
    assert changed.counts["pages_unchanged"] == PAGES - 1 and changed.counts["updated"] == 1
    assert_mirror_matches(store, world, org)
    assert sync(org).counts["pages_unchanged"] == PAGES  # the changed page, recorded again


def test_a_purge_retires_the_orgs_pages(sync: Syncer, store: Store, world: World, org: str) -> None:
    sync(org)
    before = generation(store, org)
    world.purge_device(org, world.ids(org)[10])
    purged = sync(org)
    assert purged.counts["purged"] == 1 and generation(store, org) == before + 1
    after = sync(org)  # every page is compared: none was recorded under the new generation
    assert after.counts["pages_unchanged"] == 0 and after.counts["unchanged"] == 449
    assert_mirror_matches(store, world, org)
    assert sync(org).counts["pages_unchanged"] == PAGES


def test_a_pushed_edit_retires_the_orgs_pages(
    wb_client: OpenAppClient, sync: Syncer, store: Store, world: World, mirrored: str
) -> None:
    org = mirrored
    before = generation(store, org)
    queue_edit(store, active(world, org), "update", {"external_id": "ext-pushed"}, "ops", ORGS)
    assert reconciler(wb_client, store).run_once()["succeeded"] == 1
    assert generation(store, org) > before  # the mirror took the edit's answer outside any list page
    after = sync(org)
    assert after.counts["pages_unchanged"] == 0 and after.counts["updated"] == 0
    assert_mirror_matches(store, world, org)


def test_a_device_confirmed_on_its_own_retires_the_orgs_pages(
    sim: Simulator, store: Store, world: World, org: str
) -> None:
    with OpenAppClient(api_settings(sim, page_concurrency=1)) as client:
        sync = Syncer(client, store)
        sync(org)
        before, ids = generation(store, org), world.ids(org)

        # Right before the second page: devices of the first one go, the list slides back under the
        # scan, and the devices at the start of the second page are missed; purge detection finds
        # them, one of them changed: written on its own, not as a list page's device.
        def shift(w: World) -> None:
            w.update_device(org, ids[200], {"name": {"en": "Changed while hidden"}})
            for device_id in ids[5:8]:
                w.purge_device(org, device_id)

        world.during_scan(org, 200, shift)
        hidden = sync(org)
        assert (hidden.counts["purged"], hidden.counts["updated"]) == (0, 1)
        assert generation(store, org) == before + 1
        after = sync(org)
        assert after.counts["pages_unchanged"] == 0 and after.counts["purged"] == 3
        assert_mirror_matches(store, world, org)


def test_pages_are_compared_again_when_their_devices_are_due_a_last_seen(
    client: OpenAppClient, store: Store, org: str
) -> None:
    hourly = Syncer(client, store, SyncSettings(last_seen_resolution=3600))
    hourly(org)
    assert hourly(org).counts["pages_unchanged"] == PAGES
    seen = {r["id"]: r["last_seen_at"] for r in store.devices_of(org)}
    quick = Syncer(client, store, SyncSettings(last_seen_resolution=0.5))
    time.sleep(0.6)
    due = quick(org)
    assert due.counts["pages_unchanged"] == 0  # every page compared: each device's last sight was due
    assert all(r["last_seen_at"] > seen[r["id"]] for r in store.devices_of(org))
    assert quick(org).counts["pages_unchanged"] == PAGES  # just seen: not due again yet


def test_a_page_with_an_unreadable_device_is_never_taken_unchanged(
    sync: Syncer, store: Store, world: World, org: str
) -> None:
    sync(org)
    world.update_device(org, world.ids(org)[5], {"external_id": "nul\u0000"})  # cannot be stored
    for _ in range(2):
        outcome = sync(org)
        assert outcome.status == "failed" and outcome.counts["unreadable"] == 1
        assert outcome.counts["pages_unchanged"] == PAGES - 1  # the first page is read device by device each time


def test_recorded_pages_are_asked_for_in_order_a_batch_at_a_time(
    store: Store, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unchanged_module, "RECORDS_READ", 2)
    now = utcnow()
    run_id, _ = store.start_run(org, "run-once", "test", now)
    with store.session() as session:

        def pages(org_settings: OrgSettings | None = None, page_size: int = 200) -> UnchangedPages:
            return UnchangedPages(session, org_settings or OrgSettings(org), page_size, 3600, run_id)

        writing = pages()
        for offset in (0, 200, 400, 800, 1000):
            writing.compared(record(offset, f"d{offset}", now))
        writing.compared(record(1200, "d1200", now - timedelta(hours=2)))  # its devices are due a sight
        with session.writer() as writer:
            writing.write_into(writer)
        assert not pages().recorded(0, "d0", now)  # recorded, not settled: the pass may yet meet a shift
        writing.settle()
        with session.writer() as writer:
            writing.write_into(writer)
        reading = pages()
        assert set(reading.shapes) == {0, 200, 400, 800, 1000}  # the stale one is read when it comes
        asked = {offset: reading.recorded(offset, f"d{offset}", now) for offset in range(0, 1400, 200)}
        assert {offset for offset, summary in asked.items() if summary} == {0, 200, 400, 800, 1000}
        assert asked[400] == PageSummary(["device-at-400"], {}, {})
        assert not pages().recorded(0, "another body", now)
        assert not pages(page_size=100).recorded(0, "d0", now)
        assert not pages(OrgSettings(org, integration_id="01HK153X00FVA1WBZBH50MRD1W")).recorded(0, "d0", now)
        with session.writer() as writer:
            writer.bump_generation(org)
        assert not pages().recorded(0, "d0", now)
    assert recorded_pages(store, org) == 0  # a bump deletes what it retires


def test_a_page_listing_a_device_this_pass_wrote_is_compared(
    store: Store, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unchanged_module, "WRITTEN_KEPT", 3)
    run_id, _ = store.start_run(org, "run-once", "test", utcnow())
    with store.session() as session:
        pages = UnchangedPages(session, OrgSettings(org), 200, 3600, run_id)
        pages.compared(record(0, "d0", utcnow()))
        pages.settle()
        with session.writer() as writer:
            pages.write_into(writer)
        pages = UnchangedPages(session, OrgSettings(org), 200, 3600, run_id)
        pages.wrote(["A", "B"])
        assert pages.lists_written(["B", "C"]) and not pages.lists_written(["C", "D"])
        assert pages.recorded(0, "d0", utcnow())
        pages.wrote(["C", "D"])  # more than it keeps: from now on no page is taken
        assert pages.lists_written(["E"]) and not pages.recorded(0, "d0", utcnow())


def test_a_pass_cut_short_leaves_its_pages_untrusted(sync: Syncer, store: Store, org: str) -> None:
    stop = threading.Event()
    cut = sync(org, stop=stop, on_progress=lambda org_id, pages, seen: pages == 2 and stop.set())
    assert cut.status == "aborted" and recorded_pages(store, org) == 2
    whole = sync(org)
    assert whole.status == "succeeded" and whole.counts["pages_unchanged"] == 0
    assert sync(org).counts["pages_unchanged"] == PAGES


def test_a_re_sync_reads_no_unchanged_page(
    sync: Syncer, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync(org)
    read: list[bytes] = []
    real = client_module.read_page
    # (Offsets past the end, asked ahead, are empty pages: read, and of no interest here.)
    monkeypatch.setattr(client_module, "read_page", lambda body: (body != b"[]" and read.append(body)) or real(body))
    again = sync(org)
    assert again.counts["pages_unchanged"] == PAGES and read == []  # not even parsed as JSON
    world.update_device(org, world.ids(org)[300], {"name": {"en": "Renamed on page 2"}})
    changed = sync(org)
    assert changed.counts["pages_unchanged"] == PAGES - 1 and len(read) == 1
    assert b"Renamed on page 2" in read[0]


def test_portals_and_integrations_of_unchanged_pages_are_still_asked_about(
    sim: Simulator, sync: Syncer, store: Store, world: World, org: str
) -> None:
    first = sync(org)
    assert first.counts["restriction_requests"] > 0 and first.counts["definition_requests"] > 0
    again = sync(org)
    assert again.counts["pages_unchanged"] == PAGES and again.counts["restriction_requests"] == 0
    with store.engine.begin() as conn:  # time passes: every portal and integration is due again
        conn.execute(update(portal_restrictions).values(next_fetch_at=utcnow() - timedelta(seconds=1)))
        conn.execute(update(metadata_definitions).values(next_fetch_at=utcnow() - timedelta(seconds=1)))
    due = sync(org)
    assert due.counts["pages_unchanged"] == PAGES  # taken by their records, yet every portal was known
    assert due.counts["restriction_requests"] == first.counts["restriction_requests"]
    assert due.counts["definition_requests"] == first.counts["definition_requests"]


def test_a_summary_not_written_by_syncd_is_not_taken(sync: Syncer, store: Store, world: World, org: str) -> None:
    sync(org)
    with store.engine.begin() as conn:
        conn.execute(update(list_pages).where(list_pages.c.page_offset == 200).values(summary=b'[["a"], {}, {}]'))
    outcome = sync(org)
    assert outcome.status == "succeeded" and outcome.counts["pages_unchanged"] == PAGES - 1
    assert outcome.counts["devices_seen"] == 450 and outcome.counts["purged"] == 0
    assert_mirror_matches(store, world, org)
    assert sync(org).counts["pages_unchanged"] == PAGES  # recorded again, as compared


@pytest.mark.parametrize(
    "stored",
    [
        b"not json",
        b"{}",
        b'[["A"], {}]',
        b'[["A", "B"], {}, {}]',  # two ids for a page of one
        b"[[1], {}, {}]",
        b'[["A"], {"P": 1}, {}]',
        b'[["A"], {}, []]',
        b'[["A"], [], {}]',
    ],
)
def test_a_summary_is_read_only_as_syncd_writes_it(stored: bytes) -> None:
    assert PageSummary.decode(stored, 1) is None


def test_a_summary_reads_back_as_written() -> None:
    summary = PageSummary(["A", "B"], {"B": "f"}, {"I": "A"})
    assert PageSummary.decode(summary.encode(), 2) == summary
