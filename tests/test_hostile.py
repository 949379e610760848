"""syncd against a hostile OpenApp: a stub on loopback serves crafted answers to a real `syncd run-once`.

Per case: the ordinary devices are all mirrored (where the attack leaves the list readable), no
request leaves the documented routes, nothing is pushed, memory and time stay bounded, and the API
key never appears in stdout, stderr (debug logs included) or the database. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from sqlalchemy import insert, select

from syncd.simulator.world import iso, make_ulid
from syncd.store import Store
from syncd.store.edits import EditQueue
from syncd.store.schema import device_edits, devices, door_restrictions, metadata_definitions, portal_restrictions

from .conftest import API_KEY
from .loopback import JsonHandler, LoopbackServer
from .test_secrets import dump_database

ORG = "01HORG00000000000000000000"
KEY_ENV = "SYNCD_TEST_API_KEY"
GOOD = 450  # ordinary devices: three pages of 200
DEVICE_PATH = re.compile(r"/api/v1/devices/[0-7][0-9A-HJKMNP-TV-Z]{25}")
ULID_PATH = re.compile(DEVICE_PATH.pattern + "(/door-restrictions|/metadata-definition)?")
DEFINITION = orjson.dumps({"provider_type": "acme", "schema": {"type": "object"}, "data": {}, "credentials_set": []})
# What a lying server answers to get_door_restrictions (one per portal) and get_device_metadata_definition.
LYING_RESTRICTIONS = [
    b'{"apartment_entity_ids": ["01HENT00000000000000000001", "evil\\u001b[31m"]}',
    b'{"apartment_entity_ids": "everyone"}',
    b'{"apartment_entity_ids": ["A"], "listing_entity_ids": ["B"]}',
    b"<html><body>maintenance</body></html>",
    b'{"listing_entity_ids": ["nul\\u0000"]}',
    b'{"listing_entity_ids": [' + b",".join(b'"%d"' % i for i in range(100_001)) + b"]}",
]
LYING_DEFINITION = b'{"provider_type": "x\\n\\u001b[2J", "schema": {"type": "object"}, "data": {}}'
RSS_LIMIT_MB = 250  # a normal run of this size peaks near 60 MB; a 1 GB bomb would be far above
SECONDS_LIMIT = 40


def ordinary_devices(n: int = GOOD) -> list[dict[str, Any]]:
    rng = random.Random(7)
    stamp = iso(datetime(2025, 1, 1, tzinfo=UTC))
    out = []
    for i in range(n):
        out.append(
            {
                "id": make_ulid(1_700_000_000_000 + i, rng),
                "org_id": ORG,
                "integration_id": "01HINT0000000000000000000A",
                "name": {"value": {"en": f"Door {i}"}},
                "external_id": None,
                "device_metadata": {"kind": "door_controller", "n": i},
                "zone_id": None,
                "created_at": stamp,
                "updated_at": stamp,
                "deleted_at": None,
            }
        )
    return sorted(out, key=lambda d: d["id"])


GOOD_DEVICES = ordinary_devices()


_ITEM_IDS = random.Random(8)


def item(**fields: Any) -> dict[str, Any]:
    """A device like the ordinary ones, with an id of its own and ``fields`` on top."""
    return {**GOOD_DEVICES[0], "id": make_ulid(1_800_000_000_000, _ITEM_IDS), **fields}


def nested(depth: int) -> bytes:
    """A device whose metadata is ``depth`` arrays deep, as JSON (too deep for orjson to write)."""
    head = orjson.dumps(item())[:-1]
    return head + b', "device_metadata": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


@dataclass
class Case:
    """A crafted server: ``extra`` items spliced into the list (dicts, or raw JSON bytes), or a ``behaviour``."""

    name: str
    extra: list[Any] = field(default_factory=list)
    exit_code: int = 1
    unreadable: int = 0
    error: str = ""
    all_mirrored: bool = True
    behaviour: str = ""  # trickle | gzip_bomb | endless | wrong_answer | hostile_error
    seed_mirror: list[str] = field(default_factory=list)  # ids written into the mirror first (an older syncd)
    config: str = ""
    duplicates: int = 0
    detail_failures: tuple[int, int] = (0, 0)  # door restrictions, metadata definitions


CASES = [
    Case(
        "ids that are paths, queries or not ULIDs",
        extra=[
            item(id=f"ok/../{GOOD_DEVICES[5]['id']}"),
            item(id="../../admin"),
            item(id="a?x=1"),
            item(id=f"01HK153X00%2F..%2F{GOOD_DEVICES[6]['id']}"),
            item(id=GOOD_DEVICES[7]["id"].lower()),
            item(id=GOOD_DEVICES[8]["id"][:-1] + "\n"),
            item(id=GOOD_DEVICES[9]["id"] + "\u0007"),
            item(id="0" * 27),
            item(id=42),
        ],
        unreadable=9,
        error="is not an OpenApp device id",
    ),
    Case(
        "metadata nested deeper than JSON readers go",
        extra=[nested(2000), nested(300)],
        unreadable=2,
        error="depth limit exceeded",
    ),
    Case(
        "invalid UTF-8 and a lone surrogate in strings",
        extra=[
            b'{"id": "01HK153X0038NZ3ZA2MABNBN61", "org_id": "' + ORG.encode() + b'", "name": "caf\xe9"}',
            b'{"id": "01HK153X0038NZ3ZA2MABNBN62", "org_id": "' + ORG.encode() + b'", "name": "\\ud800"}',
        ],
        unreadable=2,
        error="not readable JSON",
    ),
    Case(
        "NUL characters, over-long ids, overflowing timestamps",
        extra=[
            item(name={"en": "nul\u0000door"}),
            item(device_metadata={"k\u0000ey": 1}),
            item(zone_id="z" * 65),
            item(integration_id="i" * 300),
            item(updated_at="9999-12-31T23:00:00-05:00"),
            item(created_at="0001-01-01T00:00:00+01:00"),
            item(integration_id={"not": "an id"}),
        ],
        unreadable=7,
        error="NUL character",
    ),
    Case("very large metadata", extra=[item(device_metadata={"blob": "x" * 3_000_000})], exit_code=0),
    Case(
        "duplicates within and across pages",
        extra=[GOOD_DEVICES[0], GOOD_DEVICES[0], GOOD_DEVICES[300]],
        exit_code=0,
        duplicates=3,
    ),
    Case(
        "mirror rows with hostile ids from an older syncd",
        seed_mirror=["ok/../" + GOOD_DEVICES[1]["id"], "../../admin", "a?x=1", "01hk153x0000000000000nx1st"],
        exit_code=0,
    ),
    Case(
        "get_device answers about another device",
        seed_mirror=["01HK153X0000000000000NX1ST"],
        behaviour="wrong_answer",
        error="could not be confirmed",
    ),
    Case(
        "a gzip bomb as a page",
        behaviour="gzip_bomb",
        error="larger than api.max_response_size",
        all_mirrored=False,
    ),
    Case(
        "an answer that trickles a byte at a time",
        behaviour="trickle",
        error="no complete answer within",
        all_mirrored=False,
        config="request_timeout = 2\n",
    ),
    Case(
        "a list without end",
        behaviour="endless",
        error="kept sending full pages",
        all_mirrored=False,
        config="[sync]\nmax_pages = 25\n",
    ),
    Case(
        "error bodies with line breaks, NUL characters and terminal escapes",
        behaviour="hostile_error",
        error="HTTP 500 (x\\ny): boom\\nSECOND\\x00 \\x1b[31m",
        all_mirrored=False,
    ),
    Case(
        "door restrictions and metadata definitions that lie",
        extra=[item(device_metadata={"kind": "virtual_access_portal"}) for _ in LYING_RESTRICTIONS],
        behaviour="lying_details",
        exit_code=0,
        error="6 request(s) for door restrictions failed",
        detail_failures=(6, 1),
    ),
    Case(
        "one huge string beside one unreadable device",
        extra=[
            item(device_metadata={"blob": "y" * 12_000_000}),
            b'{"id": "01HK153X0038NZ3ZA2MABNBN61", "org_id": "' + ORG.encode() + b'", "name": "\xff"}',
        ],
        unreadable=1,
        error="not readable JSON",
    ),
]


class HostileServer(LoopbackServer):
    """A loopback HTTP server playing OpenApp with a crafted ``case``; records every request."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.requests: list[tuple[str, str]] = []
        self.lies = 0
        self.listed = self._list_items(case)
        self.bomb = self._bomb() if case.behaviour == "gzip_bomb" else b""
        super().__init__(self._handler())

    @staticmethod
    def _list_items(case: Case) -> list[bytes]:
        items = [orjson.dumps(d) for d in GOOD_DEVICES]
        for n, extra in enumerate(case.extra):  # spread over the pages, none at the very start
            encoded = extra if isinstance(extra, bytes) else orjson.dumps(extra)
            items.insert(150 + 40 * n, encoded)
        return items

    @staticmethod
    @functools.cache
    def _bomb() -> bytes:
        deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = b"0" * (1 << 20)
        return b"".join(deflate.compress(zeros) for _ in range(1024)) + deflate.flush()  # 1 GiB -> ~1 MB

    def page(self, offset: int, limit: int) -> bytes:
        if self.case.behaviour == "endless":
            rng = random.Random(offset)
            return orjson.dumps([item(id=make_ulid(1_700_000_000_000 + offset + i, rng)) for i in range(limit)])
        return b"[" + b",".join(self.listed[offset : offset + limit]) + b"]"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                split = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(split.query).items()}
                if split.path == "/api/v1/devices":
                    offset, limit = int(query.get("offset", 0)), int(query.get("limit", 50))
                    behaviour = server.case.behaviour
                    if behaviour == "gzip_bomb" and offset == 200:
                        self.send(200, server.bomb, {"Content-Encoding": "gzip"})
                    elif behaviour == "trickle" and offset == 200:
                        self.trickle()
                    elif behaviour == "hostile_error" and offset == 200:
                        body = b'{"message": "boom\\nSECOND\\u0000 \\u001b[31m", "error_code": "x\\ny"}'
                        self.send(500, body)
                    else:
                        self.send(200, server.page(offset, limit))
                    return
                if DEVICE_PATH.fullmatch(split.path) and server.case.behaviour == "wrong_answer":
                    self.send(200, orjson.dumps(GOOD_DEVICES[3]))  # a device, but not the one asked for
                    return
                lying = server.case.behaviour == "lying_details"
                if split.path.endswith("/door-restrictions") and lying:
                    server.lies += 1
                    self.send(200, LYING_RESTRICTIONS[(server.lies - 1) % len(LYING_RESTRICTIONS)])
                    return
                if split.path.endswith("/metadata-definition"):
                    self.send(200, LYING_DEFINITION if lying else DEFINITION)
                    return
                self.send(404, b'{"message": "Device not found", "error_code": "not_found"}')

            def trickle(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client hung up
                    for _ in range(600):  # at most 5 minutes; the client gives up long before
                        if server.stopping.is_set():
                            return
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.5)

            def _refuse(self) -> None:
                server.requests.append((self.command, self.path))
                self.send(405, b'{"message": "not here"}')

            do_PUT = do_POST = do_DELETE = do_PATCH = _refuse

        return Handler


def details_believed(database_url: str) -> list[Any]:
    """What the mirror took from door-restrictions and metadata-definition answers other than the
    one honest definition."""
    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            kept = list(conn.execute(select(door_restrictions)))
            kept += list(conn.execute(select(portal_restrictions).where(portal_restrictions.c.raw.is_not(None))))
            kept += [
                row
                for row in conn.execute(select(metadata_definitions))
                if row.json_schema is not None and row.provider_type != "acme"
            ]
        return kept
    finally:
        store.close()


def seed_mirror(database_url: str, ids: list[str]) -> None:
    store = Store(database_url)
    store.upgrade()
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        for device_id in ids:
            conn.execute(
                insert(devices).values(
                    id=device_id,
                    org_id=ORG,
                    name={"en": "planted"},
                    state="active",
                    first_seen_at=now,
                    last_seen_at=now,
                    last_changed_at=now,
                    fingerprint="0" * 32,
                    raw={"id": device_id, "org_id": ORG},
                )
            )
    store.close()


# `python -m syncd` that writes its own peak RSS (VmHWM: since exec, unlike ru_maxrss, which a forked
# child inherits from the large test process) to a file when it exits.
MEASURED = """
import atexit, re, runpy, sys
peak = sys.argv.pop(1)

def report():
    with open("/proc/self/status") as status, open(peak, "w") as out:
        out.write(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1))

atexit.register(report)
sys.argv[0] = "syncd"
runpy.run_module("syncd", run_name="__main__")
"""


def run_syncd(config: Path, command: str = "run-once") -> tuple[int, str, str, float, float]:
    """``syncd COMMAND`` as a process: exit code, stdout, stderr, seconds, peak RSS in MB."""
    started = time.monotonic()
    peak = config.parent / "peak-rss"
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED, str(peak), command, "--config", str(config)],
        env={**os.environ, KEY_ENV: API_KEY},
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails the test, it does not stall the suite
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, int(peak.read_text()) / 1024


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_server(case: Case, tmp_path: Path, database_url: str) -> None:
    if case.seed_mirror:
        seed_mirror(database_url, case.seed_mirror)
    with HostileServer(case) as server:
        config = tmp_path / "syncd.toml"
        api_extra, _, rest = case.config.partition("[")
        config.write_text(
            f'[api]\nbase_url = "{server.url}"\napi_key_env = "{KEY_ENV}"\n{api_extra}'
            "[api.retry]\nmax_attempts = 2\nbase_delay = 0.01\nmax_delay = 0.05\ndeadline = 20\n\n"
            f'[database]\nurl = "{database_url}"\n[logging]\nlevel = "debug"\n'
            + (f"[{rest}" if rest else "")
            + f'[[orgs]]\nid = "{ORG}"\n'
        )
        code, out, err, seconds, rss = run_syncd(config)
        requests = list(server.requests)

    assert code == case.exit_code, out + err[-3000:]
    assert seconds < SECONDS_LIMIT and rss < RSS_LIMIT_MB, (seconds, rss)
    assert case.error in out, out
    assert "\x1b" not in out and "\x00" not in out  # server text reaches the terminal escaped
    for method, path in requests:  # only the documented routes, only reads
        assert method == "GET", (method, path)
        assert urlsplit(path).path == "/api/v1/devices" or ULID_PATH.fullmatch(urlsplit(path).path), path
    for planted in case.seed_mirror:
        if not ULID_PATH.fullmatch(f"/api/v1/devices/{planted}"):
            assert not any(planted in path for _, path in requests)

    store = Store(database_url)
    try:
        rows = {r["id"]: r for r in store.devices_of(ORG)}
        run = store.run(max(r["id"] for r in _runs(store)))
    finally:
        store.close()
    if case.all_mirrored:
        for device in GOOD_DEVICES:
            assert rows[device["id"]]["raw"] == device
            assert rows[device["id"]]["state"] == "active"
    for planted in case.seed_mirror:  # nothing is purged on an answer it cannot trust
        assert rows[planted]["state"] == "active"
    assert not any(r["state"] == "purged" for r in rows.values())
    assert run["unreadable"] == case.unreadable and run["duplicates"] == case.duplicates
    assert (run["restriction_failures"], run["definition_failures"]) == case.detail_failures
    assert not details_believed(database_url)  # nothing a lying answer said was kept
    assert (run["status"] == "succeeded") == (case.exit_code == 0)
    if case.unreadable:
        assert "position" in run["error"]
    if run["error"]:
        assert run["error"].isprintable()  # one line, whatever the server sent
    # A first pass: a baseline ('observed', once per device it stored), and no false history.
    history = store_changes(database_url)
    assert all(c["change"] == "observed" for c in history)
    observed = [c["device_id"] for c in history]
    assert len(observed) == len(set(observed)) and set(observed) <= rows.keys() - set(case.seed_mirror)
    for text in (out, err, dump_database(database_url)):
        assert API_KEY not in text


def test_write_back_against_a_hostile_server(tmp_path: Path, database_url: str) -> None:
    device = GOOD_DEVICES[10]["id"]
    seed_mirror(database_url, [device])
    rows = [
        (device, None),  # a proper edit: but the server answers about another device
        (device, "01HORG00000000000000000001"),  # names another org than the device's
        (f"ok/../{GOOD_DEVICES[11]['id']}", None),
        ("../../admin", None),
        (GOOD_DEVICES[12]["id"] + "?x=1", None),
    ]
    store = Store(database_url)
    with store.engine.begin() as conn:
        for device_id, org_id in rows:
            conn.execute(
                insert(device_edits).values(device_id=device_id, org_id=org_id, payload={"external_id": "pwned"})
            )
    with HostileServer(Case("wrong answers", behaviour="wrong_answer")) as server:
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[api]\nbase_url = "{server.url}"\napi_key_env = "{KEY_ENV}"\n'
            f'[database]\nurl = "{database_url}"\n[logging]\nlevel = "debug"\n[[orgs]]\nid = "{ORG}"\n'
        )
        code, out, err, seconds, rss = run_syncd(config, "reconcile-once")
        requests = list(server.requests)
    try:
        edits = EditQueue(store).find()
    finally:
        store.close()
    assert code == 1 and seconds < SECONDS_LIMIT and rss < RSS_LIMIT_MB, out + err
    assert requests == [("GET", f"/api/v1/devices/{device}?include_deleted=true&include_metadata=true")]
    assert [e.status for e in edits] == ["failed"] * len(rows)  # and nothing was pushed
    assert "it was not believed" in (edits[0].last_error or "")
    assert "is not the device's org" in (edits[1].last_error or "")
    assert all("is not an OpenApp device id" in (e.last_error or "") for e in edits[2:])
    for text in (out, err, dump_database(database_url)):
        assert API_KEY not in text


def _runs(store: Store) -> Iterator[dict[str, Any]]:
    with store.engine.connect() as conn:
        yield from conn.exec_driver_sql("SELECT id FROM sync_runs").mappings()


def store_changes(database_url: str) -> list[dict[str, Any]]:
    store = Store(database_url)
    try:
        return store.changes(ORG)
    finally:
        store.close()
