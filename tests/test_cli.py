"""The command line, in-process and as real processes (kill mid-pass, simulate, secrets)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncd.cli import main
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store
from syncd.store.schema import SCHEMA_REVISION

from .conftest import API_KEY, Syncer
from .test_sync import assert_mirror_matches

KEY_ENV = "SYNCD_TEST_API_KEY"


def write_config(
    tmp_path: Path, sim: Simulator, database_url: str, orgs: list[str], extra: str = "", api: str = ""
) -> Path:
    """``extra``: tables after ``[database]``; ``api``: more keys of ``[api]``."""
    org_tables = "".join(f'[[orgs]]\nid = "{o}"\n' for o in orgs)
    path = tmp_path / "syncd.toml"
    path.write_text(
        f'[api]\nbase_url = "{sim.url}"\napi_key_env = "{KEY_ENV}"\n{api}\n'
        "[api.retry]\nbase_delay = 0.01\nmax_delay = 0.05\n\n"
        f'[database]\nurl = "{database_url}"\n\n{extra}\n{org_tables}'
    )
    return path


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


def test_run_once_mirrors_every_org_and_prints_a_summary(
    tmp_path: Path, sim: Simulator, world: World, database_url: str, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, database_url, list(world.orgs))
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"STATUS\s+PAGES\s+DEVICES\s+CREATED", out)
    for org in world.orgs:
        assert re.search(rf"{org}\s+succeeded\s+3\s+450\s+450", out)
    store = Store(database_url)
    for org in world.orgs:
        assert_mirror_matches(store, world, org)
    store.close()


def test_run_once_exits_1_when_an_org_fails(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org_a, org_b = list(world.orgs)
    sim.inject(Fault(status=403, org_id=org_b, times=None))
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org_a, org_b])
    assert main(["run-once", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"{org_a}\s+succeeded", out)
    assert f"{org_b}: failed: list_devices: HTTP 403" in out


def test_run_once_named_orgs_and_usage_errors(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org_a, org_b = list(world.orgs)
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org_a, org_b])
    assert main(["run-once", "--config", str(config), "--org", org_b]) == 0
    out = capsys.readouterr().out
    assert org_b in out and org_a not in out
    assert main(["run-once", "--config", str(config), "--org", "01HNOPE"]) == 2
    assert "--org 01HNOPE: not in the configuration" in capsys.readouterr().err
    assert main(["run-once", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["run-once", "--bogus"])
    assert caught.value.code == 2


def test_mass_purge_needs_the_flag(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org = next(iter(world.orgs))
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org])
    assert main(["run-once", "--config", str(config)]) == 0
    for device_id in world.ids(org)[:100]:
        world.purge_device(org, device_id)
    assert main(["run-once", "--config", str(config)]) == 1
    assert "--allow-mass-purge" in capsys.readouterr().out
    assert main(["run-once", "--config", str(config), "--allow-mass-purge"]) == 0
    assert re.search(rf"{org}\s+succeeded(\s+\d+){{6}}\s+100\s", capsys.readouterr().out)  # purged


def test_check_config_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[api]\nbase_url = "nope"\napi_key_env = "UNSET_X"\npage_size = 999\n')
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"syncd: error: {path}: 4 problems:" in err
    assert err.count("\n  - ") == 4


def test_check_config_ok(tmp_path: Path, key_env: None, sim: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", ["A", "B"])
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "2: A, B" in out
    assert not (tmp_path / "m.db").exists()  # checked, not created


def test_check_config_checks_where_the_mirror_lives(
    tmp_path: Path, key_env: None, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, "postgresql://syncd:pw@db.invalid/syncd", ["A"])
    assert main(["check-config", "--config", str(config)]) == 1  # the file is fine; the database is not
    err = capsys.readouterr().err
    assert "the configuration is valid, but the database cannot be used now" in err
    assert "database error while connecting to postgresql+psycopg://syncd:***@db.invalid/syncd" in err
    assert ":pw@" not in err
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/nowhere/m.db", ["A"])
    assert main(["check-config", "--config", str(config)]) == 2
    assert f"the folder {tmp_path}/nowhere of the SQLite mirror does not exist" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() != 0:  # root may write anywhere: the check then rightly passes
        config = write_config(tmp_path, sim, f"sqlite:///{locked}/m.db", ["A"])
        assert main(["check-config", "--config", str(config)]) == 2
        assert f"this user cannot write in {locked}" in capsys.readouterr().err


def test_db_upgrade_and_current(
    tmp_path: Path, sim: Simulator, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", ["A"], extra="")
    assert main(["db", "current", "--config", str(config)]) == 1  # no mirror yet: it makes none
    assert f"there is no mirror at {tmp_path}/m.db yet" in capsys.readouterr().err
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"empty -> {SCHEMA_REVISION}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert "already at" in capsys.readouterr().out


def test_auto_upgrade_off_refuses_an_empty_database(
    tmp_path: Path, sim: Simulator, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", ["A"])
    config.write_text(config.read_text().replace('/m.db"\n', '/m.db"\nauto_upgrade = false\n'))
    assert main(["run-once", "--config", str(config)]) == 1
    assert "syncd db upgrade" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--db", str(tmp_path / "demo.db"), "--orgs", "2", "--devices", "300"]) == 0
    out = capsys.readouterr().out
    assert "Pass 2: only the changes are written" in out
    # created 2, updated 4 (3 renamed, 1 portal moved), deleted 2, restored 1, purged 1
    assert re.search(r"01HORG00000000000000000000\s+succeeded\s+2\s+301\s+2\s+4\s+2\s+1\s+1\s", out)
    assert "Door restrictions (portal_access):" in out and "01HENTDEM0NEWTENANT0000000" in out
    with sqlite3.connect(tmp_path / "demo.db") as db:
        assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 602
        assert db.execute("SELECT count(*) FROM device_changes WHERE change = 'restrictions'").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM metadata_definitions").fetchone()[0] == 8
        assert db.execute("SELECT count(DISTINCT portal_id) FROM portal_access").fetchone()[0] > 0


def test_demo_stopped_during_the_first_pass_runs_no_second(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd", "demo", "--db", str(tmp_path / "demo.db"), "--orgs", "1", "--devices", "60000"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1].strip() != "Pass 1: full mirror":
            line = proc.stdout.readline()
            assert line, f"the demo ended early: {''.join(lines)}"
            lines.append(line)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    assert "aborted" in out and "Pass 2" not in out
    assert "SIGINT: finishing the current page, then stopping" in err


def run_cli(*args: str, env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncd", *args],
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[call-overload]
    )


def test_a_killed_pass_is_followed_by_a_correct_one(tmp_path: Path, database_url: str) -> None:
    world = World(seed=9)
    org = world.seed(1, 2000)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow", delay=0.3, operation="list_devices", times=None))
        config = write_config(tmp_path, sim, database_url, [org])
        store = Store(database_url)
        store.upgrade()
        proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                so_far = runs(store)
                if so_far and so_far[-1]["pages"] >= 3:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the pass never got going")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        killed = runs(store)[-1]
        assert killed["status"] == "running" and 3 <= killed["pages"] < 10
        assert len(store.devices_of(org)) == killed["pages"] * 200  # whole pages only
        sim.clear_faults()
        from syncd.api import OpenAppClient

        from .conftest import api_settings

        with OpenAppClient(api_settings(sim)) as client:
            outcome = Syncer(client, store)(org)
        assert outcome.status == "succeeded"
        assert store.run(killed["id"])["status"] == "aborted"
        assert outcome.counts["created"] == 2000 - killed["pages"] * 200
        assert_mirror_matches(store, world, org)
        store.close()


def runs(store: Store) -> list[dict[str, object]]:
    from sqlalchemy import select

    from syncd.store.schema import sync_runs

    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(sync_runs).order_by(sync_runs.c.id)).mappings()]


def test_sigterm_stops_run_once_cleanly(tmp_path: Path) -> None:
    world = World(seed=9)
    org = world.seed(1, 2000)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow", delay=0.2, operation="list_devices", times=None))
        db = f"sqlite:///{tmp_path}/m.db"
        config = write_config(tmp_path, sim, db, [org])
        store = Store(db)
        store.upgrade()
        proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (runs(store) and runs(store)[-1]["pages"] >= 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1  # the org did not finish
        assert "SIGTERM" in err
        assert re.search(rf"{org}\s+aborted", out)
        run = runs(store)[-1]
        assert run["status"] == "aborted" and run["finished_at"] is not None
        assert len(store.devices_of(org)) == run["pages"] * 200
        store.close()


def test_simulate_serves_until_sigterm(tmp_path: Path) -> None:
    proc = run_cli("simulate", "--port", "0", "--orgs", "2", "--devices", "50", env={"SYNCD_API_KEY": "sim-key"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"serving (http://127\.0\.0\.1:\d+/api/v1)", line)
        assert url, line
        import httpx

        r = httpx.get(
            f"{url.group(1)}/devices",
            headers={"X-API-Key": "sim-key", "X-Org": "01HORG00000000000000000001"},
            params={"include_deleted": "true", "only_deleted": "false", "include_metadata": "true"},
        )
        assert r.status_code == 200 and len(r.json()) == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "simulator stopped" in out


def test_simulate_needs_a_key(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCD_API_KEY", raising=False)
    assert main(["simulate", "--port", "0"]) == 2
    assert "SYNCD_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--port", "70000"])


def test_reconcile_once_exits_1_when_the_key_is_refused(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org = next(iter(world.orgs))
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org])
    assert main(["run-once", "--config", str(config)]) == 0
    device = world.ids(org)[0]
    assert main(["edit", device, "--external-id", "x", "--config", str(config)]) == 0
    world.keys.clear()
    capsys.readouterr()
    assert main(["reconcile-once", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "rejected the API key" in captured.err and "1 pending" in captured.out


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]])
def test_a_stop_interrupts_a_request_that_trickles(tmp_path: Path, signals: list[signal.Signals]) -> None:
    world = World(seed=9)
    org = world.seed(1, 1000)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow_reply", delay=30.0, operation="list_devices", skip=1, times=None))
        db = f"sqlite:///{tmp_path}/m.db"
        config = write_config(tmp_path, sim, db, [org], extra="")
        config.write_text(config.read_text().replace("[api.retry]", "request_timeout = 120\n\n[api.retry]"))
        store = Store(db)
        store.upgrade()
        proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        wait_for_page = time.monotonic() + 30
        while time.monotonic() < wait_for_page and len(sim.requests("list_devices")) < 1:
            time.sleep(0.05)
        time.sleep(0.5)  # the second page's request is in flight, its answer 30 s away
        started = time.monotonic()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5, err
        assert proc.returncode in (1, 130), err
        if proc.returncode == 1:  # stopped cleanly before the second signal: a summary
            assert re.search(rf"{org}\s+aborted", out)
        run = runs(store)[-1]
        assert run["status"] in ("aborted", "running")  # a run left running is closed by the next pass
        store.close()


def test_run_once_max_pages_confirms_a_grown_org(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org = next(iter(world.orgs))
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org], extra="[sync]\nmax_pages = 2\n")
    assert main(["run-once", "--config", str(config)]) == 1  # 450 devices are 3 pages
    assert f"syncd run-once --org {org} --max-pages N" in capsys.readouterr().out
    assert main(["run-once", "--config", str(config), "--max-pages", "3"]) == 0
    with pytest.raises(SystemExit) as caught:
        main(["run-once", "--config", str(config), "--max-pages", "0"])
    assert caught.value.code == 2


# -- clear errors where tracebacks were -------------------------------------------------------------


def busy_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def test_a_busy_port_is_one_line_not_a_traceback(
    tmp_path: Path, sim: Simulator, world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, port = busy_port()
    try:
        monkeypatch.setenv("SYNCD_API_KEY", "k")
        assert main(["simulate", "--port", str(port), "--orgs", "1", "--devices", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
        config = write_config(
            tmp_path,
            sim,
            f"sqlite:///{tmp_path}/m.db",
            list(world.orgs),
            extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
        )
        proc = run_cli("run", "--config", str(config), env={KEY_ENV: API_KEY})
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert f"metrics.listen 127.0.0.1:{port}: cannot listen there" in err and "Traceback" not in err
    finally:
        holder.close()


def test_a_base_url_without_the_api_prefix_is_named(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", list(world.orgs)[:1])
    config.write_text(config.read_text().replace(sim.url, sim.url.removesuffix("/api/v1")))
    assert main(["run-once", "--config", str(config)]) == 1
    assert "api.base_url is probably wrong: it must end in /api/v1" in capsys.readouterr().out


def test_demo_starts_afresh_and_never_takes_another_mirror(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "demo.db"
    for run in range(2):
        assert main(["demo", "--db", str(db), "--orgs", "1", "--devices", "200"]) == 0
        out = capsys.readouterr().out
        assert ("earlier demo there was replaced" in out) == (run == 1)
        first_pass = out.split("Pass 2")[0]
        assert re.search(r"01HORG00000000000000000000\s+succeeded\s+2\s+200\s+200\s+0\s+0\s+0\s+0\s+0", first_pass)
    other = tmp_path / "other.db"
    other.write_text("not a mirror")
    assert main(["demo", "--db", str(other)]) == 2
    assert "is not a demo's mirror" in capsys.readouterr().err
    assert other.read_text() == "not a mirror"


def test_edit_refuses_metadata_that_is_not_an_object_and_edits_says_what_an_edit_did(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org = next(iter(world.orgs))
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [org])
    assert main(["run-once", "--config", str(config)]) == 0
    device = world.ids(org)[0]
    assert main(["edit", device, "--metadata-json", "[1]", "--config", str(config)]) == 2
    assert "device_metadata must be a JSON object" in capsys.readouterr().err
    assert main(["edit", device, "--external-id", "x-1", "--config", str(config)]) == 0
    assert main(["edits", "--config", str(config)]) == 0
    assert re.search(r"1: queued\s+update external_id: \{\"external_id\": \"x-1\"\}", capsys.readouterr().out)
    assert main(["reconcile-once", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["edits", "--config", str(config)]) == 0
    assert re.search(r"1: applied\s+update external_id: \{\"external_id\": \"x-1\"\}", capsys.readouterr().out)


def test_progress_lines_come_every_second_while_a_page_is_slow_and_end_with_the_final_counts() -> None:
    import io
    from collections import Counter
    from datetime import UTC, datetime, timedelta

    from syncd.cli.output import Progress
    from syncd.sync import PassOutcome

    out = io.StringIO()
    with Progress(out, every=0.2) as progress:
        progress.update("org-a", 0, 0)
        progress.update("org-a", 1, 200)  # within the period: not printed at once
        time.sleep(0.5)  # a slow page: the line comes anyway, with what is known
        started = datetime.now(UTC)
        outcome = PassOutcome(
            "org-a", 1, "succeeded", started, started + timedelta(seconds=2), Counter(pages=11, devices_seen=2000)
        )
        progress.done(outcome)
        time.sleep(0.3)  # nothing more once it is done
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  org-a: 0 pages, 0 devices")
    assert any(line.startswith("  org-a: 1 pages, 200 devices") for line in lines[1:-1])
    assert lines[-1] == "  org-a: succeeded: 11 pages, 2,000 devices in 2.0s"


def test_the_program_loads_with_the_collector_off_and_runs_with_it_tuned() -> None:
    """The ``syncd`` program imports the command line with the collector off (at CPython's default
    its young collections ran ~130 times over the ~90,000 objects the imports make), then runs with
    it on, tuned for passes, the modules it loaded frozen."""
    probe = (
        "import gc, sys\n"
        "young = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and young.append(info['generation']))\n"
        "from syncd.program import YOUNG_COLLECTION_THRESHOLD, console\n"
        "sys.argv = ['syncd', '--version']\n"
        "try:\n"
        "    console()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert gc.isenabled() and gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD, gc.get_threshold()\n"
        "print(len(young), gc.get_freeze_count())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    collections, frozen = map(int, done.stdout.split()[-2:])
    assert collections <= 5, f"{collections} collections while the program loaded"
    assert frozen > 10_000
