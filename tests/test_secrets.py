"""The API key never appears in logs, exceptions, reprs, the database or process arguments."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

from syncd.api import OpenAppClient
from syncd.config import load_config
from syncd.errors import AuthError
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store

from .conftest import API_KEY, api_settings
from .test_cli import KEY_ENV, run_cli, write_config


def dump_database(url: str) -> str:
    """Every value in every table, as text."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return "\n".join(conn.iterdump())
    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row) for t in tables for row in conn.execute(f'SELECT t::text FROM "{t}" t'))


def test_key_is_absent_from_logs_database_and_process_arguments(tmp_path: Path, database_url: str) -> None:
    world = World(seed=11)
    org_ok, org_denied = world.seed(2, 600)
    world.add_key(API_KEY, orgs=[org_ok])  # the second org answers 403
    with Simulator(world) as sim:
        sim.inject(Fault(status=503, times=2))  # the first matching fault applies
        sim.inject(Fault(status=429, retry_after="1", times=1))
        sim.inject(Fault(kind="slow", delay=0.15, operation="list_devices", times=None))
        config = write_config(tmp_path, sim, database_url, [org_ok, org_denied], extra='[logging]\nlevel = "debug"\n')
        proc = run_cli("run-once", "--config", str(config), env={KEY_ENV: API_KEY})
        cmdlines = []
        while proc.poll() is None and len(cmdlines) < 20:
            cmdlines.append(Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace"))
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # the denied org failed
    assert "retrying" in err and "HTTP 403" in out  # the logs did cover the failures
    assert cmdlines and not any(API_KEY in c for c in cmdlines)
    assert API_KEY not in out and API_KEY not in err
    dump = dump_database(database_url)
    assert org_ok in dump
    assert API_KEY not in dump


def test_key_is_absent_from_exceptions_and_reprs(sim: Simulator, world: World, org: str, tmp_path: Path) -> None:
    world.keys.clear()
    with OpenAppClient(api_settings(sim)) as client, pytest.raises(AuthError) as caught:
        client.get_device(org, world.ids(org)[0])
    error = caught.value
    text = " ".join([str(error), repr(error), repr(error.__cause__), repr(error.__context__), repr(client)])
    assert API_KEY not in text
    config_file = tmp_path / "c.toml"
    config_file.write_text(f'[api]\nbase_url = "{sim.url}"\napi_key_env = "K"\n[[orgs]]\nid = "o"\n')
    config = load_config(config_file, {"K": API_KEY})
    assert API_KEY not in repr(config) and API_KEY not in str(config)
    assert API_KEY not in repr(Store(f"sqlite:///{tmp_path}/x.db"))
    assert os.environ.get(KEY_ENV) != API_KEY  # tests pass the key to children only
