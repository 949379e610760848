"""The write path against OpenApp as an attacker plays it, and against careless rows and operators:
real `syncd` processes (run-once, edit, door-restrictions, edits, reconcile-once) and a stateful
stub on loopback, on SQLite and PostgreSQL. One test per class of issue 17:

1. access changes do what the operator meant (add / remove never change whether a door is
   restricted; entity ids are ULIDs; sizes are capped);
2. the delete cap holds when answers are lost, with two reconcilers at once, and whatever the
   hosts' clocks say (PostgreSQL);
3. a server's JSON Schema is data: no reference is fetched, no check runs for ever, credentials
   are found wherever the schema puts them and no message quotes one;
4. one bad edit (or answer) never stops the others, and nothing ends in a traceback.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from sqlalchemy import insert, select, update

from syncd.simulator.world import iso, make_ulid
from syncd.store import Store
from syncd.store.edits import Edit, EditQueue
from syncd.store.schema import device_edits, metadata_definitions

from .conftest import API_KEY
from .loopback import JsonHandler, LoopbackServer
from .test_secrets import dump_database

ORG = "01HORG00000000000000000000"
KEY_ENV = "SYNCD_TEST_API_KEY"
E1, E2, E3 = "01HENT00000000000000000001", "01HENT00000000000000000002", "01HENT00000000000000000003"
DEVICE = re.compile(r"/api/v1/devices/([0-7][0-9A-HJKMNP-TV-Z]{25})(/door-restrictions|/metadata-definition)?")
SECONDS_LIMIT = 60  # no process may run longer: a hang fails the test
OVERFLOWING_DATE = "Wed, 21 Oct 99999999999999999999 07:28:00 GMT"

SIP = {
    "type": "object",
    "properties": {"password": {"type": "string", "format": "password"}, "user": {"type": "string"}},
}
# Credentials where pydantic and hand-written schemas put them: $ref/$defs, allOf, items,
# additionalProperties, patternProperties, anyOf.
CREDENTIAL_SCHEMA = {
    "$defs": {"Sip": SIP},
    "type": "object",
    "properties": {
        "kind": {"type": "string"},
        "sip": {"$ref": "#/$defs/Sip"},
        "relays": {"type": "array", "items": {"allOf": [{"$ref": "#/$defs/Sip"}]}},
        "extra": {"type": "object", "additionalProperties": {"type": "string", "writeOnly": True}},
        "keys": {"type": "object", "patternProperties": {"^k": {"type": "string", "format": "password"}}},
        "pin": {"anyOf": [{"type": "string", "format": "password", "maxLength": 500}, {"type": "null"}]},
        "box": {"$ref": "#/$defs/Box"},
    },
    "required": ["kind"],
}
CREDENTIAL_SCHEMA["$defs"]["Box"] = {**SIP, "maxProperties": 2}  # type: ignore[index]
SECRETS = [f"s3cr3t-{name}-{'x' * 12}" for name in ("sip", "relay", "extra", "key", "pin", "box")]


def credential_places(metadata: dict[str, Any]) -> list[str]:
    """Where CREDENTIAL_SCHEMA puts credentials in ``metadata`` (written out, for the stub)."""
    places = [f"/{name}/password" for name in ("sip", "box") if isinstance(metadata.get(name), dict)]
    places = [p for p in places if "password" in metadata[p.split("/")[1]]]
    relays = metadata.get("relays") if isinstance(metadata.get("relays"), list) else []
    places += [
        f"/relays/{i}/password" for i, relay in enumerate(relays) if isinstance(relay, dict) and "password" in relay
    ]
    for name, prefix in (("extra", ""), ("keys", "k")):
        if isinstance(metadata.get(name), dict):
            places += [f"/{name}/{key}" for key in metadata[name] if key.startswith(prefix)]
    return places + (["/pin"] if "pin" in metadata else [])


def allof_bomb(depth: int = 40) -> dict[str, Any]:
    """A 2 KB schema whose references apply 2**depth subschemas at one place."""
    defs: dict[str, Any] = {
        f"a{i}": {"allOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"$ref": f"#/$defs/a{i + 1}"}]} for i in range(depth)
    }
    defs[f"a{depth}"] = {"type": "object"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


@dataclass
class StubDevice:
    id: str
    integration: str
    metadata: Any
    deleted: bool = False
    external_id: str | None = None
    credentials: set[str] = field(default_factory=set)

    def body(self) -> dict[str, Any]:
        stamp = iso(datetime(2025, 1, 1, tzinfo=UTC))
        return {
            "id": self.id,
            "org_id": ORG,
            "integration_id": self.integration,
            "name": {"en": f"Door {self.id[-4:]}"},
            "external_id": self.external_id,
            "device_metadata": self.metadata,
            "credentials_set": sorted(self.credentials),
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": stamp if self.deleted else None,
        }


class WriteStub(LoopbackServer):
    """OpenApp's write side, played by an attacker: a stateful loopback server whose answers a test
    sets (live door lists, schemas, lost or slow answers, errors that quote what was sent)."""

    def __init__(self) -> None:
        self.rng = random.Random(17)
        self.devices: dict[str, StubDevice] = {}
        self.restrictions: dict[str, list[str]] = {}
        self.schemas: dict[str, Any] = {}
        self.requests: list[tuple[str, str]] = []
        self.fetched: list[str] = []  # requests for what a schema refers to: must stay empty
        self.lose_delete_answers = False
        self.delete_delay = 0.0
        self.update_errors: dict[str, bytes] = {}  # device id -> a 422 body for update_device
        self.busy: dict[str, str] = {}  # device id or "list" -> a Retry-After sent once with a 503
        self.lock = threading.Lock()
        super().__init__(self._handler())

    def add(self, integration: str, metadata: Any, **fields: Any) -> str:
        device_id = make_ulid(1_700_000_000_000 + len(self.devices), self.rng)
        self.devices[device_id] = StubDevice(device_id, integration, metadata, **fields)
        return device_id

    def writes(self, method: str) -> list[str]:
        return [path for m, path in self.requests if m == method]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(JsonHandler):
            def body(self) -> Any:
                return orjson.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

            def handle_one(self) -> None:
                with stub.lock:
                    stub.requests.append((self.command, self.path))
                split = urlsplit(self.path)
                if not split.path.startswith("/api/v1/"):
                    stub.fetched.append(self.path)  # a schema's reference, followed: never
                    if split.path == "/never":
                        stub.stopping.wait(30)
                    self.send(200, {"type": "object"})
                    return
                if split.path == "/api/v1/devices":
                    self.list(parse_qs(split.query))
                    return
                match = DEVICE.fullmatch(split.path)
                device = stub.devices.get(match.group(1)) if match else None
                if device is None:
                    self.send(404, {"message": "Device not found", "error_code": "not_found"})
                    return
                hint = stub.busy.pop(device.id, None)
                if hint is not None:
                    self.send(503, {"message": "busy"}, {"Retry-After": hint})
                    return
                route = {"/door-restrictions": self.restrictions, "/metadata-definition": self.definition}
                route.get(match.group(2) or "", self.device)(device)  # type: ignore[union-attr]

            def list(self, query: dict[str, list[str]]) -> None:
                hint = stub.busy.pop("list", None)
                if hint is not None:
                    self.send(503, {"message": "busy"}, {"Retry-After": hint})
                    return
                offset, limit = int(query["offset"][-1]), int(query["limit"][-1])
                ordered = [stub.devices[i].body() for i in sorted(stub.devices)]
                self.send(200, ordered[offset : offset + limit])

            def device(self, device: StubDevice) -> None:
                if self.command == "GET":
                    self.send(200, device.body())
                elif self.command == "DELETE":
                    time.sleep(stub.delete_delay)
                    device.deleted = True
                    if stub.lose_delete_answers:
                        self.close_connection = True  # applied, and the answer is lost
                        return
                    self.send(200, device.body())
                elif self.command == "PUT":
                    changes = self.body()
                    if device.id in stub.update_errors:
                        self.send(422, stub.update_errors[device.id])
                        return
                    if "external_id" in changes:
                        device.external_id = changes["external_id"]
                    if "device_metadata" in changes:
                        device.metadata = self.visible(device, changes["device_metadata"])
                    self.send(200, device.body())
                else:
                    self.send(405, {"message": "not here"})

            def visible(self, device: StubDevice, metadata: dict[str, Any]) -> dict[str, Any]:
                """What OpenApp shows of written metadata: its credentials kept aside (the places
                CREDENTIAL_SCHEMA gives them), named in credentials_set; a null clears one."""
                shown = orjson.loads(orjson.dumps(metadata))
                for pointer in credential_places(shown):
                    *parents, last = pointer.split("/")[1:]
                    holder = shown
                    for part in parents:
                        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
                    value = holder.pop(last)
                    (device.credentials.add if value is not None else device.credentials.discard)(pointer)
                return shown

            def restrictions(self, device: StubDevice) -> None:
                if self.command == "PUT":
                    body = self.body()
                    stub.restrictions[device.id] = list(body.get("apartment_entity_ids", []))
                self.send(200, {"apartment_entity_ids": stub.restrictions.get(device.id, [])})

            def definition(self, device: StubDevice) -> None:
                schema = stub.schemas.get(device.integration, {"type": "object"})
                self.send(200, {"provider_type": "acme", "schema": schema, "data": device.metadata})

            do_GET = do_PUT = do_DELETE = do_POST = handle_one

        return Handler


def write_config(tmp_path: Path, stub: WriteStub, database_url: str, writeback: str = "") -> Path:
    path = tmp_path / "syncd.toml"
    path.write_text(
        f'[api]\nbase_url = "{stub.url}"\napi_key_env = "{KEY_ENV}"\n'
        "[api.retry]\nmax_attempts = 3\nbase_delay = 0.01\nmax_delay = 0.05\ndeadline = 20\n\n"
        f'[database]\nurl = "{database_url}"\n\n'
        f"[writeback]\nbase_delay = 0.01\nmax_delay = 0.05\n{writeback}\n"
        f'[logging]\nlevel = "debug"\n\n[[orgs]]\nid = "{ORG}"\n'
    )
    return path


def syncd(
    config: Path, *args: str, env: dict[str, str] | None = None, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """``syncd ARGS --config CONFIG`` as a process (``prelude``: Python run first, in that process)."""
    code = f"{prelude}\nimport sys, runpy\nsys.argv[0] = 'syncd'\nrunpy.run_module('syncd', run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--config", str(config)],
        env={**os.environ, KEY_ENV: API_KEY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=SECONDS_LIMIT,
        check=False,
    )


def started(config: Path, *args: str) -> subprocess.Popen[str]:
    code = "import sys, runpy\nsys.argv[0] = 'syncd'\nrunpy.run_module('syncd', run_name='__main__')"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--config", str(config)],
        env={**os.environ, KEY_ENV: API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def mirror(config: Path) -> None:
    result = syncd(config, "run-once")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def queue_sql(database_url: str, rows: list[tuple[str, str, Any]]) -> list[int]:
    store = Store(database_url)
    try:
        with store.engine.begin() as conn:
            return [
                int(
                    conn.execute(
                        insert(device_edits)
                        .values(device_id=device_id, action=action, payload=payload)
                        .returning(device_edits.c.id)
                    ).scalar_one()
                )
                for device_id, action, payload in rows
            ]
    finally:
        store.close()


def edits(database_url: str) -> dict[int, Edit]:
    store = Store(database_url)
    try:
        return {e.id: e for e in EditQueue(store).find()}
    finally:
        store.close()


def no_traceback(*results: subprocess.CompletedProcess[str]) -> None:
    for result in results:
        assert "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]


@pytest.fixture
def stub() -> Iterator[WriteStub]:
    with WriteStub() as server:
        yield server


# -- 1. access changes do what the operator meant -----------------------------------------------------


def test_add_and_remove_never_change_whether_a_door_is_restricted(
    tmp_path: Path, database_url: str, stub: WriteStub
) -> None:
    portal = {"kind": "virtual_access_portal"}
    shrinking, opened, closed, explicit, emptied = (stub.add("01HINT0000000000000000000P", portal) for _ in range(5))
    stub.restrictions.update({shrinking: [E1, E2], opened: [E1], closed: [], explicit: [E1], emptied: [E1, E2]})
    config = write_config(tmp_path, stub, database_url)
    mirror(config)

    # Against the mirror: refused when queued (exit 2), nothing queued.
    refused = [
        syncd(config, "door-restrictions", opened, "--remove", E1),
        syncd(config, "door-restrictions", closed, "--add", E3),
        syncd(config, "door-restrictions", shrinking, "--add", "not a ulid"),
        syncd(config, "door-restrictions", shrinking, "--add", "../../x?y=1"),
        syncd(config, "door-restrictions", shrinking, "--add", E1.lower()),
        syncd(config, "door-restrictions", shrinking, "--set"),  # an empty $ENTITIES: not "let everyone in"
    ]
    assert [r.returncode for r in refused] == [2] * len(refused), [r.stderr for r in refused]
    assert "anyone could open it" in refused[0].stderr and "--unrestrict" in refused[0].stderr
    assert "lock everyone else out" in refused[1].stderr and "--set" in refused[1].stderr
    assert all("is not an entity id" in r.stderr for r in refused[2:5])
    assert "--unrestrict" in refused[5].stderr
    assert edits(database_url) == {}

    # Queued while the mirror allowed them; meanwhile OpenApp's live list changed their meaning.
    ok = [
        syncd(config, "door-restrictions", shrinking, "--remove", E2),
        syncd(config, "door-restrictions", opened, "--add", E3, "--yes"),  # E3: never seen on a door yet
        syncd(config, "door-restrictions", explicit, "--unrestrict"),
        syncd(config, "door-restrictions", emptied, "--remove", E2),
    ]
    assert [r.returncode for r in ok] == [0, 0, 0, 0], [r.stderr for r in ok]
    stub.restrictions[shrinking] = [E2]  # removing E2 now leaves nobody: anyone could open it
    stub.restrictions[opened] = []  # adding E3 now locks everyone but E3 out
    stub.restrictions[emptied] = []  # anyone may open it, E2 included: removing E2 is not "done"
    by_sql = queue_sql(
        database_url,
        [
            (shrinking, "door_restrictions", {"add": ["not a ulid"]}),
            (shrinking, "door_restrictions", {"add": ["../../x?y=1"]}),
            (
                shrinking,
                "door_restrictions",
                {"entity_ids": [make_ulid(1_800_000_000_000 + i, stub.rng) for i in range(100_000)]},
            ),
            (closed, "door_restrictions", {"add": []}),
        ],
    )
    result = syncd(config, "reconcile-once")
    no_traceback(result)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    final = edits(database_url)
    remove, add, unrestrict, not_done = (final[i] for i in sorted(final)[:4])
    assert remove.status == "failed" and "anyone could open it" in (remove.last_error or "")
    assert "nothing was sent" in (remove.last_error or "") and "OpenApp lists 1" in (remove.last_error or "")
    assert add.status == "failed" and "lock everyone else out" in (add.last_error or "")
    assert unrestrict.status == "succeeded" and stub.restrictions[explicit] == []  # said explicitly: done
    assert not_done.status == "failed" and "Removing cannot shut them out" in (not_done.last_error or "")
    assert [final[i].status for i in by_sql] == ["failed"] * 4
    assert "is not an entity id" in (final[by_sql[0]].last_error or "")
    assert "is not an entity id" in (final[by_sql[1]].last_error or "")
    assert "more than an edit may be" in (final[by_sql[2]].last_error or "")
    assert "name no entity" in (final[by_sql[3]].last_error or "")
    assert stub.writes("PUT") == [f"/api/v1/devices/{explicit}/door-restrictions"]  # the only write
    assert stub.restrictions[shrinking] == [E2] and stub.restrictions[opened] == []


# -- 2. the delete cap holds whatever happens ---------------------------------------------------------


def test_lost_answers_count_against_the_delete_cap(tmp_path: Path, database_url: str, stub: WriteStub) -> None:
    doomed = [stub.add("01HINT0000000000000000000D", {"kind": "door_controller"}) for _ in range(30)]
    config = write_config(tmp_path, stub, database_url, "max_deletes_per_hour = 20\n")
    mirror(config)
    queue_sql(database_url, [(d, "delete", None) for d in doomed])
    stub.lose_delete_answers = True  # OpenApp applies every DELETE; no answer comes back
    first = syncd(config, "reconcile-once")
    time.sleep(0.2)  # the retries' backoff (writeback.max_delay 0.05 s)
    second = syncd(config, "reconcile-once")
    no_traceback(first, second)
    assert len(stub.writes("DELETE")) == 20, first.stdout + first.stderr[-3000:]
    assert sum(d.deleted for d in stub.devices.values()) == 20
    statuses = Counter(e.status for e in edits(database_url).values())
    assert statuses == Counter(succeeded=20, pending=10)  # found applied on the second look; 10 held
    held = [e for e in edits(database_url).values() if e.status == "pending"]
    assert all("held: 20 soft deletes sent in the last hour" in (e.last_error or "") for e in held)


def test_two_reconcilers_at_once_never_overshoot_the_cap(tmp_path: Path, database_url: str, stub: WriteStub) -> None:
    doomed = [stub.add("01HINT0000000000000000000D", {"kind": "door_controller"}) for _ in range(4)]
    config = write_config(tmp_path, stub, database_url, "max_deletes_per_hour = 1\nbatch_size = 1\n")
    mirror(config)
    queue_sql(database_url, [(d, "delete", None) for d in doomed])
    stub.delete_delay = 1.0  # both reconcilers are busy at once
    procs = [started(config, "reconcile-once") for _ in range(2)]
    outputs = [p.communicate(timeout=SECONDS_LIMIT) for p in procs]
    assert all("Traceback" not in out + err for out, err in outputs), outputs
    assert len(stub.writes("DELETE")) == 1, outputs
    statuses = Counter(e.status for e in edits(database_url).values())
    assert statuses == Counter(succeeded=1, pending=3)


# A process whose clock runs two hours ahead: every "now" syncd takes of this host.
CLOCK_AHEAD = """
import datetime as _dt
import syncd.models as _models
import syncd.store.dialect as _dialect
_real = _models.utcnow
_models.utcnow = lambda: _real() + _dt.timedelta(hours=2)

class _Ahead(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return _dt.datetime.now(tz) + _dt.timedelta(hours=2)

_dialect.datetime = _Ahead
"""


def test_the_delete_cap_uses_the_databases_clock(tmp_path: Path, postgres_database: str, stub: WriteStub) -> None:
    import psycopg

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    doomed = [stub.add("01HINT0000000000000000000D", {"kind": "door_controller"}) for _ in range(6)]
    config = write_config(tmp_path, stub, postgres_database, "max_deletes_per_hour = 2\n")
    mirror(config)
    queue_sql(postgres_database, [(d, "delete", None) for d in doomed])
    here = syncd(config, "reconcile-once")
    ahead = syncd(config, "reconcile-once", prelude=CLOCK_AHEAD)  # its held edits look due to it
    no_traceback(here, ahead)
    assert len(stub.writes("DELETE")) == 2, ahead.stdout + ahead.stderr[-3000:]
    assert Counter(e.status for e in edits(postgres_database).values()) == Counter(succeeded=2, pending=4)


# -- 3. server-supplied schemas are data ----------------------------------------------------------------


def test_schemas_are_never_fetched_from_nor_run_for_ever(tmp_path: Path, database_url: str, stub: WriteStub) -> None:
    bad = {
        "01HINT00000000000000000REM": {"$ref": f"{stub.origin}/evil.json"},
        "01HINT00000000000000000NEV": {"type": "object", "properties": {"x": {"$ref": f"{stub.origin}/never"}}},
        "01HINT00000000000000000F1E": {"$ref": "file:///etc/hostname"},
        "01HINT00000000000000000A11": allof_bomb(),
        "01HINT00000000000000000B1G": {"type": "object", "description": "x" * 300_000},
        "01HINT00000000000000000DAN": {"$ref": "#/$defs/missing"},
        "01HINT00000000000000000SEF": {"$defs": {"me": {"$ref": "#/$defs/me"}}, "$ref": "#/$defs/me"},
    }
    regex = "01HINT00000000000000000RGX"
    stub.schemas.update(bad)
    stub.schemas[regex] = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}}}
    devices = {integration: stub.add(integration, {"kind": "door_controller"}) for integration in [*bad, regex]}
    good = stub.add("01HINT0000000000000000000G", {"kind": "door_controller"})
    config = write_config(tmp_path, stub, database_url)
    mirror(config)

    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            query = select(metadata_definitions.c.integration_id, metadata_definitions.c.schema_problem)
            marked = {row[0]: row[1] for row in conn.execute(query)}
    finally:
        store.close()
    assert all(marked[integration] for integration in bad), marked  # unusable, and said why
    assert "outside the schema" in marked["01HINT00000000000000000REM"]
    assert "cycle" in marked["01HINT00000000000000000SEF"] and "too complex" in marked["01HINT00000000000000000A11"]
    assert marked[regex] is None  # only running it shows the pattern's cost

    began = time.monotonic()
    refused = syncd(config, "edit", devices["01HINT00000000000000000REM"], "--metadata-json", '{"kind": "door"}')
    assert refused.returncode == 2 and "syncd never fetches a schema reference" in refused.stderr
    assert time.monotonic() - began < 10

    queue_sql(
        database_url,
        [
            (device, "update", {"device_metadata": {"kind": "door", "code": "a" * 40 + "!"}})
            for device in devices.values()
        ]
        + [(good, "update", {"external_id": "after the bad ones"})],
    )
    began = time.monotonic()
    result = syncd(config, "reconcile-once")
    seconds = time.monotonic() - began
    no_traceback(result)
    assert result.returncode == 1 and seconds < 30, (seconds, result.stderr[-3000:])
    assert stub.fetched == []  # not a URL, not a file: nothing a schema refers to was asked for
    final = list(edits(database_url).values())
    assert [e.status for e in final] == ["failed"] * len(devices) + ["succeeded"]
    assert all("nothing was sent" in (e.last_error or "") for e in final[:-1])
    assert "took longer than" in (final[-2].last_error or "")  # the pattern: stopped by the deadline
    assert stub.devices[good].external_id == "after the bad ones"
    assert not [path for method, path in stub.requests if method == "PUT" and good not in path]


def test_credentials_are_found_wherever_the_schema_puts_them_and_never_quoted(
    tmp_path: Path, database_url: str, stub: WriteStub
) -> None:
    integration = "01HINT0000000000000000CRED"
    stub.schemas[integration] = CREDENTIAL_SCHEMA
    everywhere, dropped, quoted, boxed = (stub.add(integration, {"kind": "door"}) for _ in range(4))
    unmarked = stub.add("01HINT000000000000000PLAIN", {"kind": "door"})  # its schema marks no credential
    config = write_config(tmp_path, stub, database_url)
    mirror(config)
    sip, relay, extra, key, pin, box = SECRETS
    metadata = {
        "kind": "door",
        "sip": {"password": sip, "user": "u"},
        "relays": [{"user": "r0"}, {"password": relay}],
        "extra": {"token": extra},
        "keys": {"k1": key},
        "pin": pin,
    }
    box_metadata = {"kind": "door", "box": {"password": box, "user": "u", "x": 1}}  # too many properties
    long_secret = "L" + "0123456789" * 40
    outputs = [
        syncd(config, "edit", everywhere, "--metadata-json", orjson.dumps(metadata).decode()),
        syncd(config, "edit", boxed, "--metadata-json", orjson.dumps(box_metadata).decode()),
    ]
    assert [r.returncode for r in outputs] == [0, 2], [r.stderr for r in outputs]
    assert "'maxProperties' rule" in outputs[1].stderr  # refused when queued, the object not quoted
    # OpenApp refuses one edit with a 422 that quotes its 400-character credential.
    stub.update_errors[quoted] = orjson.dumps({"message": f"pin {long_secret} is not accepted", "error_code": "bad"})
    queue_sql(
        database_url,
        [
            (quoted, "update", {"device_metadata": {"kind": "door", "pin": long_secret}}),
            (boxed, "update", {"device_metadata": box_metadata}),
        ],
    )
    outputs.append(syncd(config, "edits"))
    # OpenApp's answer names a credential the schema never marked (nothing could say it was one
    # before): masked once pushed all the same.
    queue_sql(database_url, [(unmarked, "update", {"device_metadata": {"sip": {"password": sip}}})])
    outputs.append(syncd(config, "reconcile-once"))

    # Queued while the schema marks sip/password; then the mirrored schema stops saying so.
    outputs.append(
        syncd(
            config,
            "edit",
            dropped,
            "--metadata-json",
            orjson.dumps({"kind": "door", "sip": {"password": sip}}).decode(),
        )
    )
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    store = Store(database_url)
    try:
        plain = orjson.loads(orjson.dumps(CREDENTIAL_SCHEMA).replace(b'"format":"password"', b'"format":"text"'))
        with store.engine.begin() as conn:
            conn.execute(update(metadata_definitions).values(json_schema=plain))
    finally:
        store.close()
    outputs += [syncd(config, "edits"), syncd(config, "reconcile-once"), syncd(config, "edits")]
    no_traceback(*outputs)

    final = {e.device_id: e for e in edits(database_url).values()}
    assert final[everywhere].status == "succeeded" and final[dropped].status == "succeeded"
    assert stub.devices[everywhere].credentials == {
        "/sip/password",
        "/relays/1/password",
        "/extra/token",
        "/keys/k1",
        "/pin",
    }
    assert set(final[everywhere].payload["credentials_redacted"]) == stub.devices[everywhere].credentials
    assert final[dropped].payload["device_metadata"]["sip"]["password"] == "********"  # the union is masked
    assert final[unmarked].status == "succeeded" and stub.devices[unmarked].credentials == {"/sip/password"}
    assert final[unmarked].payload["device_metadata"]["sip"]["password"] == "********"
    assert final[unmarked].credential_pointers == ("/sip/password",)
    assert final[quoted].status == "failed" and "HTTP 422 (bad)" in (final[quoted].last_error or "")
    assert final[boxed].status == "failed" and "'maxProperties' rule" in (final[boxed].last_error or "")
    printed = "\n".join(r.stdout + r.stderr for r in outputs)  # every log line and listing
    for secret in (*SECRETS, long_secret[:40], long_secret[-40:]):
        assert secret not in printed, secret
    kept = dump_database(database_url)  # pushed (refused or not): redacted; the unsent one is kept for a retry
    for secret in (sip, relay, extra, key, pin, long_secret[:40], long_secret[-40:]):
        assert secret not in kept, secret
    assert final[boxed].payload["device_metadata"]["box"]["password"] == box
    assert "/box/password" in final[boxed].credential_pointers  # masked by `syncd edits` whatever the schema says


# -- 4. one edit never stops the others -----------------------------------------------------------------


def test_one_bad_edit_or_answer_never_stops_the_others(tmp_path: Path, database_url: str, stub: WriteStub) -> None:
    stub.schemas["01HINT00000000000000000DAN"] = {"$ref": "#/$defs/missing"}
    stub.schemas["01HINT00000000000000000SEF"] = {"$ref": "#"}
    stub.schemas["01HINT0000000000000000CRED"] = CREDENTIAL_SCHEMA
    dangling = stub.add("01HINT00000000000000000DAN", {"kind": "door"})
    selfish = stub.add("01HINT00000000000000000SEF", {"kind": "door"})
    scalar = stub.add("01HINT0000000000000000CRED", {"kind": "door", "sip": "a scalar where an object belongs"})
    busy = stub.add("01HINT0000000000000000000G", {"kind": "door_controller"})
    good = stub.add("01HINT0000000000000000000G", {"kind": "door_controller"})
    config = write_config(tmp_path, stub, database_url)
    stub.busy["list"] = OVERFLOWING_DATE  # a list page first: ignored, ordinary backoff
    mirror(config)
    ids = queue_sql(
        database_url,
        [
            (dangling, "update", {"device_metadata": {"kind": "door"}}),
            (selfish, "update", {"device_metadata": {"kind": "door"}}),
            (scalar, "update", {"clear_credentials": ["/sip/password"]}),
            (busy, "update", {"external_id": "busy"}),
            (good, "update", {"external_id": "unrelated"}),
        ],
    )
    stub.busy[busy] = OVERFLOWING_DATE
    result = syncd(config, "reconcile-once")
    no_traceback(result)
    assert result.returncode == 1
    final = edits(database_url)
    assert [final[i].status for i in ids] == ["failed", "failed", "failed", "pending", "succeeded"]
    assert "points to nothing" in (final[ids[0]].last_error or "")
    assert "cycle" in (final[ids[1]].last_error or "")
    assert "no object there" in (final[ids[2]].last_error or "")
    assert "HTTP 503" in (final[ids[3]].last_error or "")  # retried later, with the usual backoff
    assert stub.devices[good].external_id == "unrelated"
