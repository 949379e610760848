"""The store writes one way (issue 20, item 4).

On SQLite every write, and every transaction that takes SQLite's write lock (``BEGIN IMMEDIATE``),
happens in the process's turn to write (``Store._write_turn``): threads queue there instead of in
SQLite's busy handler. A representative workload (migrations, passes with purges and details,
edits through every transition of the table, approvals, reports, run bookkeeping) runs with the
engine watched; any such statement run while its thread is not in the turn is a breach.
"""

from __future__ import annotations

import ast
import re
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, update

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.edits import queue_edit
from syncd.models import utcnow
from syncd.reconcile import Reconciler
from syncd.simulator import Fault, Simulator, World
from syncd.store import Store
from syncd.store.edits import TRANSITIONS, EditQueue, SendCap
from syncd.store.reports import Reports
from syncd.store.schema import portal_restrictions
from syncd.sync import OrgPass, PassOptions
from syncd.vocab import EditStatus

from .test_details import E1, portals
from .test_writeback import FAST, ORGS

STORE = Path(__file__).resolve().parent.parent / "syncd" / "store"
NEEDS = ("delete", "door_restrictions")
# Statements that write, or that take SQLite's write lock.
WRITING = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|BEGIN\s+IMMEDIATE)\b", re.IGNORECASE)


@dataclass
class Breach:
    statement: str  # its first words
    where: str  # the innermost syncd function that ran it

    def __str__(self) -> str:
        return f"{self.statement} in {self.where}"


@dataclass
class Watch:
    """Every writing statement run outside the write turn, while not paused."""

    breaches: list[Breach] = field(default_factory=list)
    paused: bool = False

    @contextmanager
    def pause(self) -> Iterator[None]:
        """The test's own set-up writes (not syncd's)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


class OwnedTurn:
    """The store's write turn, knowing which thread is in it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.owner: int | None = None

    def __enter__(self) -> None:
        self.inner.__enter__()
        self.owner = threading.get_ident()

    def __exit__(self, *exc: object) -> Any:
        self.owner = None
        return self.inner.__exit__(*exc)


def watch(store: Store) -> Watch:
    """Watch ``store`` (before any session of it is opened: sessions keep the turn they were given)."""
    turn = OwnedTurn(store._write_turn)
    store._write_turn = turn
    seen = Watch()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if seen.paused or not WRITING.match(statement) or turn.owner == threading.get_ident():
            return
        frames = [f for f in traceback.extract_stack() if "/syncd/" in f.filename and f.name != "_on_begin"]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
        seen.breaches.append(Breach(" ".join(statement.split()[:3]), where))

    event.listen(store.engine, "before_cursor_execute", record)
    return seen


def test_every_sqlite_write_is_in_the_write_turn(
    tmp_path: Path, sim: Simulator, world: World, client: OpenAppClient, wb_client: OpenAppClient
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mirror.db'}")
    seen = watch(store)
    try:
        _workload(store, sim, world, client, wb_client, seen)
    finally:
        store.close()
    by_site = Counter(b.where for b in seen.breaches)
    assert not by_site, f"{len(seen.breaches)} writes outside the write turn, by function: {dict(by_site)}"


def _workload(
    store: Store, sim: Simulator, world: World, client: OpenAppClient, wb_client: OpenAppClient, seen: Watch
) -> None:
    store.upgrade()  # DDL
    org = next(iter(world.orgs))

    def sync(**kwargs: Any) -> Any:
        outcome = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings(), **kwargs)).run()
        assert outcome.status == "succeeded", outcome.error
        return outcome

    # Passes: the baseline (devices, history, door restrictions, definitions), then changes and purges,
    # with every portal's restrictions due again.
    sync()
    live = [d["id"] for d in world.ground_truth(org) if not d["deleted_at"]]
    doors = [p for p in portals(world, org) if world.orgs[org].devices[p].restrictions]
    live = [d for d in live if d not in doors]
    world.update_device(org, live[0], {"name": {"en": "Renamed"}})
    world.delete_device(org, live[1])
    world.purge_device(org, live[2])
    world.set_door_restrictions(org, doors[1], {"apartment_entity_ids": [E1]})
    with seen.pause(), store.engine.begin() as conn:
        conn.execute(update(portal_restrictions).values(next_fetch_at=utcnow() - timedelta(seconds=1)))
    outcome = sync()
    assert outcome.counts["purged"] == 1 and outcome.counts["updated"] == 1
    assert store.claim_scheduled_pass(org, 60, "test:1") == 0.0
    store.release_scheduled_pass(org, "test:1")
    sim.inject(Fault(status=500, operation="list_devices", times=None))
    failed = OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings())).run()
    sim.clear_faults()
    assert failed.status == "failed"

    # Edits, pushed by a reconciler: succeed (a device, door restrictions), hold (the delete cap),
    # conflict, fail; approvals and a rejection by an operator.
    queue = EditQueue(store)
    now = datetime.now(UTC)
    pushed = queue_edit(store, live[3], "update", {"external_id": "x-1"}, "alice@ops", ORGS, NEEDS)
    door = queue_edit(store, doors[0], "door_restrictions", {"add": [E1]}, "alice@ops", ORGS, NEEDS)
    deletes = [queue_edit(store, d, "delete", None, "alice@ops", ORGS, NEEDS) for d in live[4:6]]
    for edit_id in (door, *deletes):
        assert queue.approve(edit_id, "bob@ops", now, NEEDS) == "awaiting_approval"
    conflicting = queue_edit(store, live[6], "update", {"external_id": "x-2"}, "alice@ops", ORGS, NEEDS)
    world.update_device(org, live[6], {"external_id": "theirs"})
    failing = queue_edit(store, live[7], "update", {"external_id": "x-3"}, "alice@ops", ORGS, NEEDS)
    world.purge_device(org, live[7])
    rejected = queue_edit(store, live[8], "delete", None, "alice@ops", ORGS, NEEDS)
    settings = replace(FAST, require_approval=NEEDS, max_deletes_per_hour=1)
    rec = Reconciler(wb_client, store, settings, "test:1", ORGS)
    assert rec.run_once() == Counter(succeeded=3, conflict=1, failed=1, held=1)
    assert queue.reject(rejected, "bob@ops", "no", now, NEEDS) == "awaiting_approval"

    # The operator's and the queue's other transitions, each once.
    assert queue.retry(conflicting, now, NEEDS) == "conflict"
    assert queue.cancel(conflicting, now) == "pending"
    waiting = queue_edit(store, live[9], "delete", None, "alice@ops", ORGS)  # pending: needs none yet
    approvals = queue.enforce_approval(NEEDS, timedelta(days=1), timedelta(minutes=1))
    assert approvals.awaiting == 1  # await_approval
    assert queue.enforce_approval(NEEDS, timedelta(0), timedelta(minutes=1)).expired == (waiting,)  # expire
    later = queue_edit(store, live[10], "update", {"external_id": "x-4"}, "alice@ops", ORGS)
    (claimed,) = queue.claim(now, timedelta(minutes=1), 10, "test:1", NEEDS)
    queue.release([claimed.id], now)
    (claimed,) = queue.claim(now, timedelta(minutes=1), 10, "test:1", NEEDS)
    assert queue.sending(claimed, SendCap("update", 100, timedelta(hours=1))) is None
    queue.retry_later(claimed, now, now, "503", 503)
    statuses = {e.id: e.status for e in queue.find()}
    assert statuses[pushed] is statuses[door] is EditStatus.SUCCEEDED
    assert statuses[failing] is EditStatus.FAILED and statuses[rejected] is EditStatus.REJECTED
    assert statuses[conflicting] is EditStatus.CANCELLED and statuses[later] is EditStatus.PENDING
    assert sorted(statuses[d] for d in deletes) == [EditStatus.PENDING, EditStatus.SUCCEEDED]  # one held
    assert set(TRANSITIONS) == {
        "claim", "release", "succeed", "conflict", "fail", "retry_later", "hold", "retry", "cancel",
        "await_approval", "approve", "reject", "expire",
    }  # fmt: skip  # each of them was taken above: a new one belongs here too

    # Reports and the status read; then run bookkeeping by hand.
    reports = Reports(store)
    assert reports.devices_as_of(utcnow(), org)
    assert reports.door_access_as_of(utcnow(), org)
    assert reports.door_access(entity=E1)
    assert reports.windows(utcnow(), [org])[org].from_run_id is not None
    assert store.org_overview()[org]["devices"]
    run_id, stale = store.start_run(org, "run-once", "test:1", utcnow())
    assert stale == 0
    store.finish_run(run_id, "succeeded", utcnow())


# SQL, settings or checks of one database. schema.py's column types may adapt to the database they
# are bound for (SQLAlchemy hands them its dialect), and say nothing else of one database.
ONE_DATABASE = re.compile(
    r"on_conflict|ON CONFLICT|\bpg_|SKIP LOCKED|with_for_update|\bCOPY\b|::jsonb|"
    r"clock_timestamp|EXTRACT\(EPOCH|SET LOCAL|PRAGMA|json_group_object|\bANY\(|BEGIN IMMEDIATE|"
    r"dialect\.name\s*[!=]=|\.dialect\s*[!=]=|with_variant",
)
TYPE_ADAPTATIONS = {"schema.py": {"dialect.name ==", "dialect.name !=", "with_variant"}}


def test_sql_of_one_database_lives_in_the_dialect_classes() -> None:
    found = []
    for path in sorted(STORE.glob("*.py")):
        if path.name in ("dialect.py", "seen.py"):  # seen.py: a scratch SQLite file, whatever the mirror
            continue
        allowed = TYPE_ADAPTATIONS.get(path.name, set())
        source = path.read_text()
        prose = {  # docstrings name the databases
            number
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for number in range(node.lineno, (node.end_lineno or node.lineno) + 1)
        }
        for number, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            if number not in prose:
                found += [f"{path.name}:{number}: {m.group()}" for m in ONE_DATABASE.finditer(code)]
        found = [f for f in found if f.rpartition(": ")[2] not in allowed or not f.startswith(path.name)]
    assert found == [], "\n".join(found)


def test_connections_and_translation_are_opened_one_way() -> None:
    """store.py opens connections (Store.reading, Store.transaction, Session) and locks.py the org
    lock's own; every other module of the store asks them, so each statement is translated, and each
    write is in the write turn, without a block of its own."""
    found = []
    for path in sorted(STORE.glob("*.py")):
        if path.name in ("store.py", "locks.py", "translate.py"):
            continue
        text = path.read_text()
        found += [f"{path.name}: {m.group()}" for m in re.finditer(r"engine\.(connect|begin)\(|\btranslated\(", text)]
    assert found == []
