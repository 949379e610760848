"""`syncd run`, `syncd status`, metrics, locks, sd_notify and the systemd units."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from syncd import health
from syncd.cli import main
from syncd.config import Config, DatabaseSettings, MetricsSettings, OrgSettings, SyncSettings
from syncd.daemon import Daemon
from syncd.errors import AlreadyRunningError
from syncd.notify import Notifier
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store

from .conftest import API_KEY, FAST_RETRY, api_settings
from .test_cli import KEY_ENV, run_cli, runs, write_config
from .test_sync import assert_mirror_matches

ROOT = Path(__file__).parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


class FakeSystemd:
    """A NOTIFY_SOCKET that records every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def saw(self, field: str) -> bool:
        return any(field in m.splitlines() for m in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def test_notifier_speaks_the_sd_notify_protocol(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled and notifier.watchdog_interval == 2.0
    notifier.ready("3 orgs")
    notifier.watchdog()
    notifier.stopping("bye")
    notifier.close()
    assert systemd.drain() == ["READY=1\nSTATUS=3 orgs", "WATCHDOG=1", "STOPPING=1\nSTATUS=bye"]


def test_a_notify_socket_nobody_reads_never_blocks(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path)})
    started = time.monotonic()
    for _ in range(5000):  # far more than the socket buffers
        notifier.status("x" * 200)
    assert time.monotonic() - started < 5
    notifier.close()


def test_notifier_is_silent_without_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("nobody listens")  # no error
    other_pid = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None  # the watchdog is meant for another process


def daemon_env(systemd: FakeSystemd) -> dict[str, str]:
    return {KEY_ENV: API_KEY, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"}


def test_daemon_lifecycle_sigterm_mid_pass_and_restart(tmp_path: Path, database_url: str, systemd: FakeSystemd) -> None:
    world = World(seed=21)
    orgs = world.seed(3, 1400)
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow", delay=0.08, operation="list_devices", times=None))
        # One page at a time: a pass lasts long enough (7 x 80 ms) to be caught in the middle.
        config = write_config(
            tmp_path, sim, database_url, orgs, extra='[sync]\ninterval = "2s"\n', api="page_concurrency = 1\n"
        )
        store = Store(database_url)
        store.upgrade()
        proc = run_cli("run", "--config", str(config), env=daemon_env(systemd))
        try:
            wait_for(lambda: systemd.saw("READY=1"), what="READY=1")
            wait_for(
                lambda: {r["org_id"] for r in runs(store) if r["status"] == "succeeded"} == set(orgs),
                what="a first pass of every org",
            )
            wait_for(lambda: systemd.saw("WATCHDOG=1"), what="WATCHDOG=1")
            assert any(m.startswith("STATUS=3 orgs") for m in systemd.drain())
            busy = wait_for(
                lambda: [r for r in runs(store) if r["status"] == "running" and r["pages"] >= 1],
                what="a pass in progress",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert systemd.saw("STOPPING=1")
        assert "daemon stopped" in err
        interrupted = next(r for r in runs(store) if r["id"] == busy[0]["id"])
        assert interrupted["status"] == "aborted" and interrupted["finished_at"] is not None
        assert not [r for r in runs(store) if r["status"] == "running"]
        assert all(r["trigger"] == "scheduled" for r in runs(store))

        for device_id in world.ids(orgs[0])[:5]:  # the world moves on while syncd is down
            world.purge_device(orgs[0], device_id)
        seen = len(runs(store))
        proc = run_cli("run", "--config", str(config), env=daemon_env(systemd))
        try:
            wait_for(
                lambda: {r["org_id"] for r in runs(store)[seen:] if r["status"] == "succeeded"} == set(orgs),
                what="passes after the restart",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        assert proc.returncode == 0
        for org in orgs:
            assert_mirror_matches(store, world, org)
        store.close()


def test_sighup_reloads_and_rejects_a_broken_config(tmp_path: Path, sim: Simulator, world: World) -> None:
    org_a, org_b = list(world.orgs)
    db = f"sqlite:///{tmp_path}/m.db"
    config = write_config(tmp_path, sim, db, [org_a], extra='[sync]\ninterval = "1s"\n')
    proc = run_cli("run", "--config", str(config), env={KEY_ENV: API_KEY})
    store = Store(db)
    try:
        wait_for(
            lambda: (
                Path(f"{tmp_path}/m.db").exists()
                and store.schema_revision()
                and any(r["org_id"] == org_a and r["status"] == "succeeded" for r in runs(store))
            ),
            what="org A",
        )
        good = config.read_text()
        config.write_text(good + "[[orgs]]\nbogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        config.write_text(good + f'[[orgs]]\nid = "{org_b}"\n[logging]\nlevel = "debug"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(r["org_id"] == org_b and r["status"] == "succeeded" for r in runs(store)), what="the added org"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "configuration reload rejected" in err and "orgs[1].id is required" in err
    assert "configuration reloaded" in err
    assert '"event": "pass started"' in err  # a DEBUG line: the new logging level applies
    store.close()


def in_process_daemon(
    sim: Simulator, database_url: str, orgs: list[str], clock: health.Clock | None = None, **sync: Any
) -> Daemon:
    config = Config(
        api=api_settings(sim, retry=replace(FAST_RETRY, max_attempts=1)),
        database=DatabaseSettings(url=database_url),
        orgs=tuple(OrgSettings(o) for o in orgs),
        sync=SyncSettings(**{"interval": 1.0, **sync}),
        metrics=MetricsSettings(listen=("127.0.0.1", 0)),
    )
    return Daemon(config, notifier=Notifier({}), clock=clock)


def running(daemon: Daemon) -> threading.Thread:
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return thread


class FakeClock:
    """Wall and monotonic time that move only when the test moves them."""

    def __init__(self) -> None:
        self.start = datetime.now(UTC)
        self.seconds = 0.0

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds)

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@contextlib.contextmanager
def driven_daemon(
    sim: Simulator, database_url: str, orgs: list[str], clock: FakeClock, **sync: Any
) -> Iterator[Daemon]:
    """A daemon on ``clock`` whose jobs are scheduled (the scheduler paused) and run by the test,
    one ``daemon._job(org)`` at a time: its wiring of the Board and the AuthGate, without waiting."""
    daemon = in_process_daemon(sim, database_url, orgs, health.Clock(clock.now, clock.monotonic), **sync)
    try:
        daemon.store.prepare(daemon.config.database.auto_upgrade)
        for org in daemon.config.orgs:
            daemon._schedule(org, first=True)
        daemon.scheduler.start(paused=True)
        yield daemon
    finally:
        if daemon.scheduler.running:
            daemon.scheduler.shutdown(wait=False)
        daemon._close()


def next_pass_in(daemon: Daemon, org: str, clock: FakeClock) -> float:
    job = daemon.scheduler.get_job(f"org:{org}")
    assert job is not None
    return float((job.next_run_time - clock.now()).total_seconds())


def test_failing_org_backs_off_without_stopping_the_others(tmp_path: Path, sim: Simulator, world: World) -> None:
    """A failing org's next pass moves by the Board's backoff (doubling from the 1 s interval, at
    most failure_backoff_max); the healthy org's schedule is left alone; each transition is told once."""
    org_a, org_b = list(world.orgs)
    sim.inject(Fault(status=503, org_id=org_b, times=None))
    clock = FakeClock()
    with (
        capture_logs() as logs,
        driven_daemon(sim, f"sqlite:///{tmp_path}/m.db", [org_a, org_b], clock, failure_backoff_max=4.0) as daemon,
    ):
        a_first = daemon.scheduler.get_job(f"org:{org_a}").next_run_time
        waits = []
        for _ in range(4):
            daemon._job(org_a)
            daemon._job(org_b)
            waits.append(next_pass_in(daemon, org_b, clock))
            clock.advance(max(waits[-1], 1.0))
        assert daemon.status_line().startswith("2 orgs: 1 ok, 1 stale, 1 failing")
        sim.clear_faults()
        daemon._job(org_b)
        a_last = daemon.scheduler.get_job(f"org:{org_a}").next_run_time
    assert waits[0] <= 0.1 and waits[1:] == [2.0, 4.0, 4.0]  # the 2nd failure waits 2 s, then 4 s: the cap
    assert a_last == a_first  # the healthy org's passes keep the interval's pace (the daemon never moved them)
    started = [e for e in logs if e["event"] == "org started failing"]
    assert len(started) == 1 and started[0]["org_id"] == org_b
    backing_off = [(e["failures"], e["next_pass_in_seconds"]) for e in logs if e["event"] == "backing off"]
    assert backing_off == [(2, 2), (3, 4), (4, 4)]
    assert [e["after_failures"] for e in logs if e["event"] == "org recovered"] == [4]
    ok_a = [e for e in logs if e["event"] == "pass succeeded" and e.get("org_id") == org_a]
    assert len(ok_a) == 4
    assert len([r for r in sim.requests("list_devices", org_b) if r.offset == 0]) == 5  # one per pass


def test_a_401_pauses_all_syncing_with_one_error_per_interval(tmp_path: Path, sim: Simulator, world: World) -> None:
    """While the key is rejected, one probe per interval reaches OpenApp (one error line each), the
    other orgs wait, and the first accepted probe resumes every org."""
    orgs = list(world.orgs)
    world.keys.clear()
    clock = FakeClock()
    with capture_logs() as logs, driven_daemon(sim, f"sqlite:///{tmp_path}/m.db", orgs, clock, interval=1.0) as daemon:
        for _ in range(16):  # 4 s, every org's job every 0.25 s
            for org in orgs:
                daemon._job(org)
            clock.advance(0.25)
        rejected = [e for e in logs if e["event"] == "OpenApp rejected the API key: all syncing is paused"]
        list_requests = len(sim.requests("list_devices"))
        assert "PAUSED" in daemon.status_line()
        world.add_key(API_KEY)
        clock.advance(1.0)
        for org in orgs:
            daemon._job(org)
        assert "PAUSED" not in daemon.status_line()
    assert len(rejected) == 4  # one per interval (at 0, 1, 2 and 3 s), not one per org per tick
    assert list_requests == len(rejected)  # only the probes reached the API while paused
    assert len([e for e in logs if e["event"].startswith("OpenApp accepted the API key again")]) == 1
    assert {e.get("org_id") for e in logs if e["event"] == "pass succeeded"} == set(orgs)


def test_metrics_endpoint(tmp_path: Path, sim: Simulator, world: World) -> None:
    org = next(iter(world.orgs))
    daemon = in_process_daemon(sim, f"sqlite:///{tmp_path}/m.db", [org])
    thread = running(daemon)
    try:
        wait_for(lambda: daemon._metrics is not None and daemon.board.totals().get("succeeded", 0) >= 1, what="a pass")
        assert daemon._metrics is not None
        body = httpx.get(f"http://127.0.0.1:{daemon._metrics.port}/metrics").text
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
    assert re.search(rf'syncd_org_last_success_timestamp_seconds{{org_id="{org}"}} 1\.\d+e\+09', body)
    assert re.search(rf'syncd_devices{{org_id="{org}",state="active"}} \d+', body)
    created = re.search(rf'syncd_device_changes_total{{change="created",org_id="{org}"}} (\d+)\.0', body)
    assert created and int(created.group(1)) >= 450  # counters are per process; other tests count too
    assert 'syncd_http_requests_total{operation="list_devices",status="200"}' in body
    assert "syncd_pass_duration_seconds_bucket" in body and "process_resident_memory_bytes" in body


def test_a_second_daemon_on_one_sqlite_file_refuses(tmp_path: Path, sim: Simulator, world: World) -> None:
    db = f"sqlite:///{tmp_path}/m.db"
    first = in_process_daemon(sim, db, list(world.orgs))
    thread = running(first)
    try:
        wait_for(lambda: first.scheduler.running, what="first daemon")
        second = in_process_daemon(sim, db, list(world.orgs))
        with pytest.raises(AlreadyRunningError, match="another syncd daemon already uses this SQLite database"):
            second.run()
    finally:
        first.request_stop()
        thread.join(timeout=30)


def test_run_once_skips_or_waits_for_a_busy_org(
    tmp_path: Path,
    sim: Simulator,
    world: World,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    org_a, org_b = list(world.orgs)
    config = write_config(tmp_path, sim, database_url, [org_a, org_b])
    other = Store(database_url)  # stands in for another syncd process holding org A
    other.upgrade()
    holder_ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.locks.org(org_a) as acquired:
            assert acquired
            holder_ready.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holder_ready.wait(10)
    try:
        if database_url.startswith("sqlite"):  # record locks are per process: prove it across processes
            proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
        else:
            assert main(["run-once", "--config", str(config)]) == 0
            out = capsys.readouterr().out
        assert re.search(rf"{org_a}\s+skipped", out) and re.search(rf"{org_b}\s+succeeded", out)
        threading.Timer(1.0, release.set).start()
        assert main(["run-once", "--config", str(config), "--wait", "20"]) == 0
        assert re.search(rf"{org_a}\s+succeeded", capsys.readouterr().out)
    finally:
        release.set()
        holder.join(timeout=10)
        other.close()


def test_status_reports_and_exit_codes(
    tmp_path: Path, sim: Simulator, world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    org_a, org_b = list(world.orgs)
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org_a, org_b])
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 1  # nothing synced yet
    assert "never" in capsys.readouterr().out
    assert main(["run-once", "--config", str(config), "--org", org_a]) == 0
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--json"]) == 1  # org B still never synced
    report = json.loads(capsys.readouterr().out)
    by_org = {r["org_id"]: r for r in report["orgs"]}
    assert by_org[org_a]["ok"] and not by_org[org_b]["ok"] and not report["ok"]
    assert by_org[org_a]["last_pass_status"] == "succeeded"
    assert sum(by_org[org_a]["devices"].values()) == 450
    sim.inject(Fault(status=500, org_id=org_b, times=None))
    main(["run-once", "--config", str(config)])
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert (
        re.search(rf"{org_b}\s+STALE\s+\S+\s+[\d.]+\s+failed", out)
        and f"{org_b}: last error: list_devices: HTTP 500" in out
    )
    sim.clear_faults()
    main(["run-once", "--config", str(config)])
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 0
    time.sleep(1.1)
    assert main(["status", "--config", str(config), "--max-age", "1s"]) == 1


def test_report_views(store: Store, sync: Any, world: World, org: str) -> None:
    from sqlalchemy import text

    sync(org)
    device_id = world.ids(org)[0]
    world.update_device(org, device_id, {"name": {"de": "Nur Deutsch"}})
    sync(org)
    with store.engine.connect() as conn:
        names = dict(conn.execute(text("SELECT id, name FROM device_report WHERE org_id = :o"), {"o": org}).all())
        summary = conn.execute(
            text("SELECT active, deleted, purged, last_success, last_status FROM org_summary WHERE org_id = :o"),
            {"o": org},
        ).one()
        recent = conn.execute(
            text("SELECT change, count(*) FROM recent_changes WHERE org_id = :o GROUP BY change"), {"o": org}
        ).all()
        kinds = {k for (k,) in conn.execute(text("SELECT DISTINCT kind FROM device_report"))}
    assert names[device_id] == "Nur Deutsch"  # no English name: the first locale
    assert all(isinstance(n, str) and n for n in names.values())
    assert summary[0] + summary[1] == 450 and summary[2] == 0 and summary[3] is not None
    assert summary[4] == "succeeded"
    assert dict(recent) == {"updated": 1}  # the first pass was a baseline
    assert "virtual_access_portal" in kinds


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "syncd"
    names = []
    for unit in (ROOT / "deploy").glob("*.[st]*"):
        if unit.suffix in (".service", ".timer"):
            (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/syncd/bin/syncd", str(executable)))
            names.append(str(tmp_path / unit.name))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in (ROOT / "deploy" / "syncd.service").read_text()
    for service in ("syncd.service", "syncd-run-once.service"):  # a runaway is stopped by the kernel
        assert re.search(r"^MemoryMax=\d+[KMG]$", (ROOT / "deploy" / service).read_text(), re.MULTILINE)


def test_systemd_units_name_their_documentation_and_the_timer_means_what_it_says() -> None:
    for unit in sorted((ROOT / "deploy").glob("*.[st]*")):
        if unit.suffix in (".service", ".timer"):
            assert re.search(r"^Documentation=https?://\S+README\.md$", unit.read_text(), re.MULTILINE), unit.name
    timer = (ROOT / "deploy" / "syncd-run-once.timer").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", timer, re.MULTILINE))
    # Persistent= acts on OnCalendar= only: beside monotonic timers alone it would promise a catch-up
    # that never happens.
    assert "Persistent" not in settings or "OnCalendar" in settings
    assert settings["OnUnitInactiveSec"] == "15min" and "OnBootSec" in settings


INTERVAL = 2  # seconds, for the three daemons


def test_three_daemons_share_thirty_orgs_on_postgresql(tmp_path: Path, postgres_database: str) -> None:
    """Three daemons, one PostgreSQL, 30 orgs: the orgs are split (about one complete scan per org per
    interval between them, measured from the simulator's request log), passes of an org never
    overlap, and the orgs of a daemon that was killed are scanned again."""
    import psycopg

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    world = World(seed=30)
    orgs = world.seed(30, 250)
    world.add_key(API_KEY)
    store = Store(postgres_database)
    store.upgrade()
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow", delay=0.05, operation="list_devices", times=None))
        config = write_config(
            tmp_path, sim, postgres_database, orgs, extra=f'[sync]\ninterval = "{INTERVAL}s"\nconcurrency = 4\n'
        )
        daemons = [run_cli("run", "--config", str(config), env={KEY_ENV: API_KEY}) for _ in range(3)]
        try:
            wait_for(
                lambda: {r["org_id"] for r in runs(store) if r["status"] == "succeeded"} == set(orgs),
                timeout=60,
                what="every org synced",
            )
            steady_from = time.monotonic()
            time.sleep(3 * INTERVAL)
            steady_to = time.monotonic()
            daemons[0].send_signal(signal.SIGKILL)
            daemons[0].communicate(timeout=30)
            killed_at = time.time()
            wait_for(
                lambda: (
                    {
                        r["org_id"]
                        for r in runs(store)
                        if r["status"] == "succeeded" and r["finished_at"].timestamp() > killed_at + 1
                    }
                    == set(orgs)
                ),
                timeout=60,
                what="every org fresh after a daemon died",
            )
        finally:
            for proc in daemons[1:]:
                proc.send_signal(signal.SIGTERM)
            for proc in daemons[1:]:
                proc.communicate(timeout=60)
        log = sim.requests("list_devices")
    assert all(p.returncode == 0 for p in daemons[1:])
    instances = {r.user_agent for r in log}
    assert len(instances) == 3  # all three took part
    steady_scans = 0
    for org in orgs:  # passes of one org never overlap: each pass is one instance's run of pages
        requests = sorted((r for r in log if r.org_id == org), key=lambda r: r.started)
        windows: list[tuple[float, float, str, set[int | None]]] = []  # start, end, instance, offsets
        for r in requests:  # a pass's pages are asked several at once, not always offset 0 first
            if not windows or windows[-1][2] != r.user_agent or r.offset in windows[-1][3]:
                windows.append((r.started, r.finished, r.user_agent, {r.offset}))
            else:
                start, end, agent, offsets = windows[-1]
                windows[-1] = (start, max(end, r.finished), agent, offsets | {r.offset})
        killed = f":{daemons[0].pid})"
        for (_, end, agent, _), (start, _, _, _) in itertools.pairwise(windows):
            # The killed instance's lock went with its connection, while the simulator may still have
            # been answering its last request: only its windows may end after the next one starts.
            assert end <= start or killed in agent, f"{org}: overlapping passes"
        steady_scans += sum(1 for start, _, _, _ in windows if steady_from <= start < steady_to)
    per_interval = steady_scans / len(orgs) / ((steady_to - steady_from) / INTERVAL)
    assert per_interval <= 1.2, f"{per_interval:.2f} complete scans per org per interval with three daemons"
    store.close()


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_report_role_reads_but_cannot_write(postgres_database: str, client: Any, org: str) -> None:
    import psycopg

    from .conftest import Syncer

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    store = Store(postgres_database)
    store.upgrade()
    Syncer(client, store)(org)
    store.close()
    reader = f"report_{os.getpid()}"
    script = ROOT / "deploy" / "postgresql-report-role.sql"
    try:
        result = subprocess.run(
            [
                "psql",
                postgres_database,
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                f"reader={reader}",
                "-v",
                "password='s3cret-pw'",
                "-f",
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        as_reader = postgres_database.replace("postgresql://postgres@", f"postgresql://{reader}:s3cret-pw@")
        with psycopg.connect(as_reader) as conn:
            assert conn.execute("SELECT count(*) FROM device_report").fetchone() == (450,)
            assert conn.execute("SELECT count(*) FROM org_summary").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM devices")
    finally:
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'syncd_reports'").fetchone():
                conn.execute("DROP OWNED BY syncd_reports CASCADE")
            conn.execute(f'DROP ROLE IF EXISTS "{reader}"')
            conn.execute("DROP ROLE IF EXISTS syncd_reports")


def test_status_needs_no_key_and_creates_nothing(
    tmp_path: Path, sim: Simulator, world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    db = tmp_path / "m.db"
    config = write_config(tmp_path, sim, f"sqlite:///{db}", list(world.orgs))
    assert main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "no mirror at" in err and "syncd run-once" in err and "auto_upgrade" not in err
    assert not db.exists()
    assert main(["db", "upgrade", "--config", str(config)]) == 0  # needs no key either
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 1  # nothing synced yet, but it answers
    assert "never" in capsys.readouterr().out


def test_sigterm_while_passes_wait_on_retry_after_aborts_them_without_alarm(tmp_path: Path, world: World) -> None:
    with Simulator(world) as sim:
        sim.inject(Fault(status=429, retry_after="30", operation="list_devices", times=None))
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[api]\nbase_url = "{sim.url}"\napi_key_env = "{KEY_ENV}"\n'
            "[api.retry]\nmax_retry_after = 60\ndeadline = 120\n"
            f'[database]\nurl = "sqlite:///{tmp_path}/m.db"\n[logging]\nformat = "json"\n'
            + "".join(f'[[orgs]]\nid = "{org}"\n' for org in world.orgs)
        )
        proc = run_cli("run", "--config", str(config), env={KEY_ENV: API_KEY})
        # The first 429's Retry-After holds every request of the process: one org waits to retry,
        # the other waits before it sends anything.
        wait_for(lambda: len(sim.requests("list_devices")) >= 1, what="an org waiting on Retry-After")
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - started < 10
    assert "org started failing" not in err and '"level": "error"' not in err, err
    store = Store(f"sqlite:///{tmp_path}/m.db")
    try:
        assert {r["status"] for r in runs(store)} == {"aborted"}
    finally:
        store.close()


def test_an_org_removed_while_its_pass_ran_leaves_no_series(tmp_path: Path, sim: Simulator, world: World) -> None:
    from prometheus_client import REGISTRY

    from syncd.sync import PassOutcome

    org_a, org_b = list(world.orgs)
    daemon = in_process_daemon(sim, f"sqlite:///{tmp_path}/m.db", [org_a, org_b])
    try:
        removed = daemon.config.orgs[1]
        daemon.config = replace(daemon.config, orgs=daemon.config.orgs[:1])  # as a reload leaves it
        now = datetime.now(UTC)
        daemon._after(removed, PassOutcome(org_b, 1, "failed", now, now, error="boom"))  # its last pass ends
        assert REGISTRY.get_sample_value("syncd_org_failing", {"org_id": org_b}) in (None, 0.0)
        assert daemon.board.totals() == {}
    finally:
        daemon._close()
