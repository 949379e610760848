"""What an operator meets in the first hour: options honoured wherever they are given, mirrors only
where the configuration says and only by the commands that make one, no traceback for a user action,
messages that say what to do, and help that shows how."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.cli import main
from syncd.cli.parser import build_parser, command_parsers
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store

from .conftest import API_KEY
from .test_cli import KEY_ENV, run_cli, runs, write_config

# Commands that may make a mirror where there is none (demo too, which reads no configuration file).
CREATORS = {("run-once",), ("run",), ("db", "upgrade")}
# What makes each command's own arguments valid, so that only the mirror can be what it refuses.
VALID_ARGUMENTS = {
    ("edit",): ["--name", "en=Front door"],
    ("delete",): ["--yes"],
    ("door-restrictions",): ["--unrestrict"],
    ("edits", "reject"): ["--reason", "not this door"],
    ("report", "as-of"): ["--at", "2026-03-03"],
    ("report", "door-access"): ["--portal", "01HPRT00000000000000000000"],
}


def leaf_commands() -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that does something (a group such as `db` alone only prints its help)."""
    for path, parser in command_parsers(build_parser()):
        if parser.get_default("handler"):
            yield path, parser


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    """A value for each positional argument a command needs (its first choice, else 1: parsed as an
    edit id or a device id alike)."""
    values = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction) or action.nargs in ("?", "*"):
            continue
        values.append(str(next(iter(action.choices))) if action.choices else "1")
    return values


def reads_config(parser: argparse.ArgumentParser) -> bool:
    return parser.get_default("reads_config") is True


def positions(path: tuple[str, ...], rest: list[str], option: list[str]) -> list[list[str]]:
    """``option`` before the command, after each name of its path, and after its arguments."""
    placed = [[*option, *path, *rest]]
    placed += [[*path[: i + 1], *option, *path[i + 1 :], *rest] for i in range(len(path))]
    placed.append([*path, *rest, *option])
    return placed


def test_the_walk_finds_every_command() -> None:
    found = {path for path, _ in leaf_commands()}
    assert {("run-once",), ("status",), ("edits",), ("edits", "cancel"), ("db", "current"), ("simulate",)} <= found
    assert ("db",) not in found  # a group without an action of its own


def test_config_is_honoured_in_every_position_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command that reads the configuration reads the file --config names, wherever --config
    stands, and never $SYNCD_CONFIG then; a command that reads none refuses --config anywhere."""
    monkeypatch.setenv("SYNCD_CONFIG", str(tmp_path / "from-the-environment.toml"))
    monkeypatch.setenv(KEY_ENV, API_KEY)
    checked = 0
    for path, parser in leaf_commands():
        rest = [*positionals(parser), *VALID_ARGUMENTS.get(path, [])]
        for n, placed in enumerate(positions(path, rest, ["--config", str(tmp_path / "given-%d.toml")])):
            argv = [a.replace("%d", str(n)) for a in placed]
            if reads_config(parser):
                assert main(argv) == 2, argv
                err = capsys.readouterr().err
                assert f"config file {tmp_path}/given-{n}.toml does not exist" in err, (argv, err)
                assert "from-the-environment" not in err
            else:
                with pytest.raises(SystemExit) as refused:
                    main(argv)
                assert refused.value.code == 2, argv
                assert "--config" in capsys.readouterr().err
            checked += 1
    assert checked >= 40


def test_logging_options_are_taken_in_every_position_by_every_command() -> None:
    parser = build_parser()
    for path, command in leaf_commands():
        option = ["--log-level", "debug", "--log-format", "json"]
        for argv in positions(path, [*positionals(command), *VALID_ARGUMENTS.get(path, [])], option):
            args = parser.parse_args(argv)
            assert (args.log_level, args.log_format) == ("debug", "json"), argv
        rest = [*positionals(command), *VALID_ARGUMENTS.get(path, [])]
        later = parser.parse_args(["--log-level", "error", *path, *rest, "--log-level", "debug"])
        assert later.log_level == "debug"  # the one nearest the end wins, as with any option
        assert "log_level" not in vars(parser.parse_args([*path, *rest]))


def test_logging_options_override_the_file(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", list(world.orgs)[:1])
    config.write_text(config.read_text() + '\n[logging]\nlevel = "error"\nformat = "console"\n')
    assert main(["--log-level", "info", "run-once", "--config", str(config), "--log-format", "json"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert any('"level": "info"' in line and "pass succeeded" in line for line in lines), lines


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


# -- where the mirror is, and who may make one ---------------------------------------------------------


def test_a_relative_sqlite_path_is_the_configuration_files_folders(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    config = write_config(folder, sim, "sqlite:///mirror.db", list(world.orgs)[:1])
    monkeypatch.chdir(elsewhere)
    assert main(["run-once", "--config", str(config)]) == 0
    assert (folder / "mirror.db").exists() and not list(elsewhere.iterdir())
    assert main(["edits", "--config", "../etc/syncd.toml"]) == 0
    assert main(["status", "--config", "../etc/syncd.toml"]) == 0
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_only_the_commands_that_make_a_mirror_make_one(
    kind: str,
    tmp_path: Path,
    sim: Simulator,
    world: World,
    key_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Every other command refuses a missing mirror (an absent SQLite file, an empty PostgreSQL
    database), in one line, and leaves nothing behind, wherever it is run from."""
    url = "sqlite:///mirror.db" if kind == "sqlite" else request.getfixturevalue("database_url_pg")
    config = write_config(tmp_path, sim, url, list(world.orgs)[:1])
    monkeypatch.chdir(tmp_path.parent)
    refusing = [(path, parser) for path, parser in leaf_commands() if reads_config(parser) and path not in CREATORS]
    assert ("edits",) in [path for path, _ in refusing]
    for path, parser in refusing:
        argv = [*path, *positionals(parser), *VALID_ARGUMENTS.get(path, []), "--config", str(config)]
        code = main(argv)
        err = capsys.readouterr().err
        assert not (tmp_path / "mirror.db").exists(), argv
        assert not any(p.name.startswith("mirror.db") for p in tmp_path.parent.iterdir()), argv
        if path == ("check-config",):
            assert code == 0  # checks where the mirror would be; makes nothing
            continue
        if path == ("db", "current") and kind == "postgresql":
            assert code == 0  # says the database is empty
            continue
        assert code != 0, argv
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "yet" in err and "syncd run-once" in err, (argv, err)
    if kind == "postgresql":
        store = Store(url, read_only=True)
        assert store.schema_revision() is None  # no command laid a schema
        store.close()
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert main(["edits", "--config", str(config)]) == 0


@pytest.fixture
def database_url_pg(postgres_database: str) -> str:
    import psycopg

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_database


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this user cannot write in (for root, who may write anywhere else: /proc/sys)."""
    if os.geteuid() == 0:
        return Path("/proc/sys")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


def test_run_in_a_read_only_folder_says_what_check_config_says(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = read_only_folder(tmp_path)
    config = write_config(tmp_path, sim, f"sqlite:///{folder}/m.db", list(world.orgs)[:1])
    hint = f"database.url: this user cannot write in {folder}, where the SQLite mirror"
    assert main(["check-config", "--config", str(config)]) == 2
    assert hint in capsys.readouterr().err
    proc = run_cli("run", "--config", str(config), env={KEY_ENV: API_KEY})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and hint in err and "Traceback" not in err, err
    for command in (["run-once"], ["edits"], ["db", "upgrade"]):
        assert main([*command, "--config", str(config)]) == 2
        assert hint in capsys.readouterr().err


def test_configuration_problems_are_one_per_line_in_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[api]\nbase_url = "nope"\napi_key_env = "UNSET_X"\npage_size = 999\n[sync]\nbogus = 1\n[[orgs]]\nid = "A"\n'
    )
    for path_, parser in leaf_commands():
        if not reads_config(parser):
            continue
        argv = [*path_, *positionals(parser), *VALID_ARGUMENTS.get(path_, []), "--config", str(path)]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        header = re.fullmatch(rf"syncd: error: {re.escape(str(path))}: (\d) problems:", err[0])
        assert header, (argv, err)  # 3 for the commands that need no API key, 4 for the others
        assert len(err) == 1 + int(header.group(1)) and all(line.startswith("  - ") for line in err[1:]), err


# -- no traceback for what a user does ------------------------------------------------------------------


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path, sim: Simulator, world: World, key_env: None) -> None:
    """`syncd edits | head`: whatever is left to print goes nowhere; exit 141, as for SIGPIPE."""
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", list(world.orgs)[:1])
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    for command in (["edits"], ["status"], ["db", "current"], ["--help"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "syncd", *command, "--config", str(config)],
                check=False,
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                env={**os.environ, KEY_ENV: API_KEY},
            )
        finally:
            os.close(write)
        assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, (command, proc.stderr)
        assert proc.returncode in (141, 0, 1), (command, proc.returncode)  # status: 1 when stale; --help: 0


def test_ctrl_c_twice_during_run_once_is_one_line(tmp_path: Path) -> None:
    """The second Ctrl-C stops at once, wherever it lands (waiting for a page, writing one, closing
    the mirror): `syncd: interrupted`, exit 130, and never a traceback, whatever a library logs."""
    world = World(seed=9)
    org = world.seed(1, 2000)[0]
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.inject(Fault(kind="slow", delay=0.05, operation="list_devices", times=None))
        db = f"sqlite:///{tmp_path}/m.db"
        config = write_config(tmp_path, sim, db, [org], extra='[logging]\nlevel = "debug"\n')
        store = Store(db)
        store.upgrade()
        for gap in (0.0, 0.01, 0.05, 0.2):
            proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (runs(store) and runs(store)[-1]["status"] == "running"):
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            time.sleep(gap)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            # 1: the pass ended at the first Ctrl-C, before the second; -SIGINT: the second came
            # after syncd had finished (the shell says 130 either way).
            assert proc.returncode in (130, 1, -signal.SIGINT), (gap, proc.returncode, err)
            assert "Traceback" not in err and "Exception" not in err, (gap, err)
            if proc.returncode == 130:
                assert err.rstrip().endswith("syncd: interrupted"), err
        store.close()


def test_an_interrupt_a_library_logs_is_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from syncd import logs

    logs.configure("console", "info")
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception closing connection %r", 1, exc_info=True)
    try:
        raise OSError("disk full")
    except OSError:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception closing connection %r", 2, exc_info=True)
    err = capsys.readouterr().err
    assert "KeyboardInterrupt" not in err and "connection 1" not in err
    assert "connection 2" in err and "disk full" in err  # a real failure is still reported


def test_help_shows_each_command_with_a_paragraph_and_an_example() -> None:
    for path, parser in command_parsers(build_parser()):
        text = parser.format_help()
        assert parser.description and len(parser.description) > 40, path
        examples = text.partition("\nexamples:\n")[2]
        assert re.search(rf"^  (\S+=\S+ )?syncd {' '.join(path)}\b", examples, re.MULTILINE), (path, text)


def test_a_client_that_hangs_up_is_no_traceback_in_the_simulator() -> None:
    """Ctrl-C on a `syncd run-once` leaves the `syncd simulate` terminal quiet."""
    import socket

    proc = run_cli("simulate", "--port", "0", "--devices", "5", "--latency-ms", "300", env={"SYNCD_API_KEY": "k"})
    try:
        assert proc.stdout is not None
        port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))  # type: ignore[union-attr]
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nX-Org: o\r\n\r\n")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.6)  # the answers are written to closed connections
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and "Exception" not in err, err


# -- messages that say what to do, and check-config --online -------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        return int(holder.getsockname()[1])


def test_a_connection_that_cannot_be_made_names_host_port_and_the_setting(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    org = list(world.orgs)[:1]
    port = closed_port()
    for base_url, expected in (
        (f"http://127.0.0.1:{port}/api/v1", f"nothing listens on 127.0.0.1:{port} (connection refused)"),
        (sim.url.replace("http://", "https://"), f"127.0.0.1:{sim.port} answers plain HTTP, not TLS"),
    ):
        config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", org)
        config.write_text(config.read_text().replace(sim.url, base_url))
        assert main(["run-once", "--config", str(config)]) == 1
        out = capsys.readouterr().out
        assert expected in out and f"check api.base_url ({base_url})" in out, out


def test_check_config_online_reports_each_org(
    tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = list(world.orgs)
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", [first, second])
    assert main(["check-config", "--config", str(config)]) == 0
    assert "online check" not in capsys.readouterr().out and not sim.requests()  # offline unless asked
    assert main(["check-config", "--online", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"GET /status\s+ok", out)
    assert re.search(rf"{first}\s+ok: key accepted, org readable, it has devices", out), out
    asked = sim.requests("list_devices")
    assert [r.org_id for r in asked] == [first, second]  # one page each

    assert main(["run-once", "--config", str(config), "--org", first]) == 0
    world.add_key(API_KEY, orgs=[first])  # the key may no longer read the second org
    capsys.readouterr()
    assert main(["check-config", "--online", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"{first}\s+ok: .*; the mirror holds 450", out), out
    assert re.search(rf"{second}\s+org not accessible: list_devices: HTTP 403", out), out

    world.keys.clear()
    assert main(["check-config", "--online", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"{first}\s+key refused: .*HTTP 401", out) and re.search(rf"{second}\s+key refused", out), out


@pytest.mark.parametrize("where", ["path", "port", "tls"])
def test_check_config_online_names_a_wrong_base_url(
    where: str, tmp_path: Path, sim: Simulator, world: World, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = {
        "path": sim.url.removesuffix("/v1"),
        "port": f"http://127.0.0.1:{closed_port()}/api/v1",
        "tls": sim.url.replace("http://", "https://"),
    }[where]
    config = write_config(tmp_path, sim, f"sqlite:///{tmp_path}/m.db", list(world.orgs))
    config.write_text(config.read_text().replace(sim.url, wrong))
    assert main(["check-config", "--online", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    verdict = {"path": "base URL wrong: status: HTTP 404", "port": "base URL wrong", "tls": "TLS failure"}[where]
    assert re.search(rf"GET /status\s+{re.escape(verdict)}", out), out
    assert "the orgs were not asked" in out and "gave up" not in out
    assert not sim.requests("list_devices")


# -- what users of dlt and CloudQuery expect -------------------------------------------------------------


def test_run_once_fits_120_columns_ends_with_totals_and_has_wide_and_json(
    tmp_path: Path, sim: Simulator, world: World, database_url: str, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    orgs = list(world.orgs)
    config = write_config(tmp_path, sim, database_url, orgs)
    assert main(["run-once", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out) <= 120, out
    assert re.fullmatch(r"total: 2 org\(s\) ok, 0 failed; 900 devices, 900 changes; \d+\.\ds", out[-1]), out
    world.delete_device(orgs[0], world.ids(orgs[0])[0])
    assert main(["run-once", "--config", str(config), "--wide"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "UNREADABLE" in out[0] and "RESTRICTIONS" in out[0] and max(len(line) for line in out) > 120
    assert re.fullmatch(r"total: 2 org\(s\) ok, 0 failed; 900 devices, 1 changes; \d+\.\ds", out[-1]), out
    world.keys.clear()
    assert main(["run-once", "--config", str(config), "--format", "json", "--org", orgs[1]]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["totals"] | {"seconds": 0} == {
        "orgs_ok": 0,
        "orgs_failed": 1,
        "orgs_skipped": 0,
        "devices": 0,
        "changes": 0,
        "seconds": 0,
    }
    (org,) = result["orgs"]
    assert org["org_id"] == orgs[1] and org["status"] == "failed" and "HTTP 401" in org["error"]
    assert set(org["counts"]) >= {"pages", "devices_seen", "unreadable", "restriction_failures"}


def test_runs_lists_past_passes(
    tmp_path: Path, sim: Simulator, world: World, database_url: str, key_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    first, second = list(world.orgs)
    config = write_config(tmp_path, sim, database_url, [first, second])
    assert main(["run-once", "--config", str(config)]) == 0
    world.add_key(API_KEY, orgs=[first])
    assert main(["run-once", "--config", str(config)]) == 1
    capsys.readouterr()
    assert main(["runs", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"ID\s+ORG\s+TRIGGER\s+STARTED\s+STATUS\s+SECONDS\s+PAGES\s+DEVICES", lines[0])
    assert len([line for line in lines if re.match(r"\d+\s", line)]) == 4
    assert any(re.search(rf"{second}\s+run-once\s+\S+\s+failed", line) for line in lines)
    assert any("HTTP 403" in line for line in lines if line.startswith("  "))
    assert main(["runs", "--config", str(config), "--failed", "--format", "json"]) == 0
    failed = json.loads(capsys.readouterr().out)
    assert [(r["org_id"], r["status"]) for r in failed] == [(second, "failed")]
    assert main(["runs", "--config", str(config), "--org", first, "--format", "json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [r["org_id"] for r in both] == [first, first] and both[0]["id"] > both[1]["id"]
    assert main(["runs", "--config", str(config), "--org", first, "--last", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == both[:1]
    assert main(["runs", "--config", str(config), "--org", "nobody"]) == 0
    assert capsys.readouterr().out == "no passes of nobody\n"
