"""Several instances on one PostgreSQL (issue 17, section 5): a shared schedule row in the future is
stale, not recent; a pass whose org lock's database session ended stops before it writes anything
more. SQLite keeps its file locks: nothing there can be lost."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, func, insert, select
from structlog.testing import capture_logs

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.errors import LockLostError
from syncd.models import utcnow
from syncd.passes import locked_pass
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store
from syncd.store.details import DefinitionAnswer, MetadataDefinitions, PortalRestrictions
from syncd.store.locks import lock_key
from syncd.store.schema import device_changes, devices, metadata_definitions, org_schedule, portal_restrictions
from syncd.sync import OrgPass, PassOptions

from .conftest import API_KEY
from .test_cli import KEY_ENV, run_cli, runs, write_config
from .test_daemon import in_process_daemon, running, wait_for
from .test_sync import assert_mirror_matches

LOST = "the database session holding the lock of org"


# -- helpers ---------------------------------------------------------------------------------------


def admin(url: str) -> psycopg.Connection[Any]:
    """A connection of the test's own (the 'other session' that terminates syncd's)."""
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def lock_holders(url: str, org_id: str) -> list[int]:
    """Backend pids holding the org's advisory lock, from pg_locks."""
    key = lock_key(org_id) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows a bigint key as two oids
    with admin(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND classid::bigint = %s AND objid::bigint = %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def terminate_lock_holder(url: str, org_id: str) -> int:
    """Terminate the session holding the org's lock, and wait until it is gone; its pid."""
    (pid,) = lock_holders(url, org_id)
    with admin(url) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
    return pid


def set_schedule(store: Store, org_id: str, ahead: timedelta, instance: str = "gone-host:4242") -> None:
    """An org_schedule row whose pass started ``ahead`` of now (by this host's clock, as a hand edit would)."""
    with store.engine.begin() as conn:
        conn.execute(delete(org_schedule).where(org_schedule.c.org_id == org_id))
        conn.execute(insert(org_schedule).values(org_id=org_id, pass_started_at=utcnow() + ahead, instance=instance))


def schedule_row(store: Store, org_id: str) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(org_schedule).where(org_schedule.c.org_id == org_id)).one()


def count(store: Store, table: Any, *where: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


@pytest.fixture
def pg_store(postgres_database: str) -> Iterator[Store]:
    """A migrated, empty PostgreSQL mirror."""
    with admin(postgres_database) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    store = Store(postgres_database)
    store.upgrade()
    yield store
    store.close()


# -- the shared schedule ----------------------------------------------------------------------------


def test_a_scheduled_pass_claimed_in_the_future_is_taken_over(store: Store) -> None:
    """A start later than the database's clock now (a clock set back, a hand edit, an instance that
    is gone) is stale: the next daemon claims the org, and from then on the claim holds as usual."""
    org = "01HORG00000000000000000000"
    set_schedule(store, org, timedelta(hours=1))
    assert store.claim_scheduled_pass(org, 60, "a:1") == 0.0
    if store.dialect == "sqlite":  # one daemon per file: nothing is shared, the row is not read
        return
    row = schedule_row(store, org)
    assert row.instance == "a:1" and abs((row.pass_started_at - utcnow()).total_seconds()) < 30
    assert 59 < store.claim_scheduled_pass(org, 60, "b:2") <= 60  # a fresh claim holds the others back
    set_schedule(store, org, timedelta(seconds=5))  # a little ahead is in the future too
    assert store.claim_scheduled_pass(org, 60, "b:2") == 0.0
    set_schedule(store, org, timedelta(seconds=-10))  # ten seconds ago: recent, as before
    assert 49 < store.claim_scheduled_pass(org, 60, "b:2") <= 50


def test_an_org_scheduled_an_hour_ahead_still_gets_its_passes(sim: Simulator, world: World, database_url: str) -> None:
    org, other = list(world.orgs)
    store = Store(database_url)
    store.upgrade()
    set_schedule(store, org, timedelta(hours=1))
    daemon = in_process_daemon(sim, database_url, [org, other], interval=1.0)
    thread = running(daemon)
    try:
        wait_for(
            lambda: len([r for r in runs(store) if r["org_id"] == org and r["status"] == "succeeded"]) >= 3,
            timeout=30,
            what="three scheduled passes of the org claimed an hour ahead",
        )
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
    assert all(r["trigger"] == "scheduled" for r in runs(store))
    if store.dialect == "postgresql":
        assert schedule_row(store, org).instance == daemon.instance  # taken over
    assert_mirror_matches(store, world, org)
    store.close()


# -- the org's lock -------------------------------------------------------------------------------


def test_a_lease_says_whether_the_lock_was_taken(store: Store) -> None:
    org = "01HORG00000000000000000000"
    taken, refused = threading.Event(), []
    with store.locks.org(org) as lease:
        assert lease and not lease.lost
        lease.check()

        def other() -> None:
            with store.locks.org(org) as second:
                refused.append(not second)
            taken.set()

        threading.Thread(target=other).start()
        assert taken.wait(10) and refused == [True]
        if store.dialect == "sqlite":  # flock: the kernel holds it for the process, nothing to lose
            assert lease.connection is None
        else:  # the lock is held by the session the pass writes through
            pid = lease.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()  # type: ignore[union-attr]
            lease.connection.commit()  # type: ignore[union-attr]
            assert lock_holders(store.url, org) == [pid]
            with store.session(lease) as session, session.transaction("testing") as conn:
                assert conn is lease.connection
    if store.dialect == "postgresql":
        assert lock_holders(store.url, org) == []


def test_a_lost_lock_stops_every_write_and_never_reconnects(pg_store: Store) -> None:
    store, org = pg_store, "01HORG00000000000000000000"
    answer = DefinitionAnswer("01HINT00000000000000000000", "01HDEV00000000000000000000", utcnow(), error="x")
    with store.locks.org(org) as lease, store.session(lease) as session:
        with session.writer(durable=False):  # a statement (SET LOCAL) on the lock's session: it works
            pass
        pid = terminate_lock_holder(store.url, org)
        for _ in range(3):  # the first use finds out; every later one knows
            with pytest.raises(LockLostError, match="terminating connection due to administrator command"):
                with session.writer(durable=False):
                    pass
        with pytest.raises(LockLostError, match=re.escape(f"{LOST} {org} ended")):
            MetadataDefinitions(store, session).record(org, utcnow(), [answer])
        with pytest.raises(LockLostError, match="nothing more of it was written"), session.reader():
            pass
        assert lease.lost and lock_holders(store.url, org) == []
        with store.locks.org(org) as other:  # another pass may take the org now
            assert other
        assert lease.connection is not None and lease.connection.invalidated  # not reconnected to a lockless session
    assert count(store, metadata_definitions) == 0
    assert pid not in lock_holders(store.url, org)


def make_pass(client: OpenAppClient, store: Store, org: str, **kwargs: Any) -> OrgPass:
    return OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings(), stop=threading.Event(), **kwargs))


def test_a_pass_that_loses_its_lock_mid_scan_fails_once_and_writes_no_more_pages(
    client: OpenAppClient, pg_store: Store, world: World, org: str
) -> None:
    store = pg_store

    def after_page(_org: str, pages: int, _seen: int) -> None:
        if pages == 1:  # the first page is committed: end the lock's session
            terminate_lock_holder(store.url, org)

    with capture_logs() as logs:
        outcome = locked_pass(make_pass(client, store, org, on_progress=after_page))
    assert outcome.status == "failed" and isinstance(outcome.exception, LockLostError)
    assert (outcome.error or "").startswith(f"{LOST} {org} ended (terminating connection due to administrator")
    assert "\n" not in (outcome.error or "")
    run = store.run(outcome.run_id)  # type: ignore[arg-type]
    assert run["status"] == "failed" and run["error"] == outcome.error
    assert run["pages"] == 1 and count(store, devices) == 200  # the page committed before stays; none after
    failed = [e for e in logs if e["event"] == "pass failed"]
    assert len(failed) == 1 and failed[0]["error"] == outcome.error  # logged once
    assert not [e for e in logs if e.get("exc_info") or e["log_level"] in ("error", "critical")]
    assert lock_holders(store.url, org) == []
    again = locked_pass(make_pass(client, store, org))
    assert again.status == "succeeded", again.error
    assert_mirror_matches(store, world, org)


def test_details_written_after_the_lock_is_lost_are_not_written(
    client: OpenAppClient, pg_store: Store, world: World, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Door restrictions and metadata definitions are written through the lock's connection too."""
    store = pg_store
    record = PortalRestrictions.record
    terminated: list[int] = []

    def terminated_first(self: PortalRestrictions, *args: Any) -> int:
        if not terminated:  # the lock's session ends just before the first batch of door restrictions
            terminated.append(terminate_lock_holder(store.url, args[0]))
        return record(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(PortalRestrictions, "record", terminated_first)
        outcome = locked_pass(make_pass(client, store, org))
    assert outcome.status == "failed" and isinstance(outcome.exception, LockLostError), outcome.error
    assert terminated and count(store, portal_restrictions) == 0 and count(store, metadata_definitions) == 0
    assert count(store, devices) == len(world.ids(org))  # the scan before was whole
    assert locked_pass(make_pass(client, store, org)).status == "succeeded"
    assert_mirror_matches(store, world, org)


def test_a_daemon_pass_that_loses_its_lock_is_a_failure_like_any_other(
    sim: Simulator, world: World, pg_store: Store, org: str
) -> None:
    """The daemon counts it as a failed pass (the org's failures, and its backoff, grow as for any
    failure), logs it once, and the next pass of the org runs as usual."""
    store = pg_store

    def end_the_lock_session(_world: World) -> None:
        terminate_lock_holder(store.url, org)

    daemon = in_process_daemon(sim, store.url, [org], interval=1.0, failure_backoff_max=3.0)
    with capture_logs() as logs:
        thread = running(daemon)
        try:
            wait_for(lambda: daemon.board.totals().get("succeeded", 0) >= 1, what="a first pass")
            world.during_scan(org, 200, end_the_lock_session)
            wait_for(lambda: any(e["event"] == "org recovered" for e in logs), what="recovery after the lost lock")
        finally:
            daemon.request_stop()
            thread.join(timeout=30)
    failed = [e for e in logs if e["event"] == "pass failed"]
    assert len(failed) == 1 and LOST in failed[0]["error"]
    started = [e for e in logs if e["event"] == "org started failing"]
    assert len(started) == 1 and started[0]["error"] == failed[0]["error"]
    assert daemon.board.totals().get("failed") == 1
    recovered = [e for e in logs if e["event"] == "org recovered"]
    assert recovered[0]["after_failures"] == 1
    assert not [e for e in logs if e.get("exc_info") or e["event"] == "pass crashed"]
    assert_mirror_matches(store, world, org)


# -- real processes ---------------------------------------------------------------------------------


def test_run_once_whose_lock_session_is_terminated_stops_and_a_second_run_once_takes_over(
    tmp_path: Path, pg_store: Store
) -> None:
    """A real `syncd run-once` mid-pass; its lock's backend terminated (as an idle timeout, a proxy
    or a failover would); a second `run-once` then: the first fails with one clear line and writes
    nothing more from that moment, the second succeeds, the mirror is exact."""
    store, url = pg_store, pg_store.url
    world = World(seed=17)
    org = world.seed(1, 3000)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        config = write_config(tmp_path, sim, url, [org], api="page_concurrency = 1\n")
        baseline = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        assert baseline.wait(120) == 0
        moved = world.ids(org)[::3]
        for device_id in moved:  # every page of the next pass writes changes
            world.update_device(org, device_id, {"external_id": f"moved-{device_id}"})
        sim.inject(Fault(kind="slow", delay=0.25, operation="list_devices", times=None))  # 15 pages: ~4 s
        procs = [run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})]
        try:
            run = wait_for(
                lambda: next((r for r in runs(store)[1:] if int(r["pages"]) >= 3), None),  # type: ignore[call-overload]
                what="the first pass mid-scan",
            )
            terminate_lock_holder(url, org)
            terminated_at = utcnow()
            # The slow pages were only there to catch the first pass mid-scan: the rest of it (to its
            # next write, refused) and the second pass (15 pages, ~4 s more) need not wait on them.
            sim.clear_faults()
            # From here on nothing of the first pass may commit: what it had written is final.
            written = store.run(run["id"])
            changes = count(store, device_changes, device_changes.c.run_id == run["id"])
            procs.append(run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY}))
            first, second = procs
            out2, err2 = second.communicate(timeout=120)
            out1, err1 = first.communicate(timeout=120)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    assert second.returncode == 0, out2 + err2
    assert re.search(rf"{org}\s+succeeded", out2)
    assert first.returncode == 1, out1 + err1
    assert "Traceback" not in err1 and "Traceback" not in err2
    lost = [line for line in err1.splitlines() if LOST in line]
    assert len(lost) == 1 and "pass failed" in lost[0], err1  # one log line
    assert re.search(rf"{org}\s+failed", out1)
    first_run = store.run(run["id"])
    assert first_run["status"] == "failed", first_run
    assert first_run["error"].startswith(f"{LOST} {org} ended")
    assert "nothing more of it was written" in first_run["error"]
    # The first pass wrote nothing after its lock was gone: its counters and history rows stand as
    # they were at that moment (the second pass wrote the rest of the changes).
    for counter in ("pages", "devices_seen", "updated"):
        assert first_run[counter] == written[counter], counter
    assert count(store, device_changes, device_changes.c.run_id == run["id"]) == changes
    second_run = runs(store)[-1]
    assert second_run["id"] != run["id"] and second_run["status"] == "succeeded"
    assert second_run["started_at"] >= terminated_at  # type: ignore[operator]  # never writing at the same time
    assert 0 < changes < len(moved)
    assert changes + count(store, device_changes, device_changes.c.run_id == second_run["id"]) == len(moved)
    assert lock_holders(url, org) == []
    assert_mirror_matches(store, world, org)
