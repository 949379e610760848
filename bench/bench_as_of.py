#!/usr/bin/env python3
"""Benchmark the as-of reports on a mirror with a long history, on SQLite and on PostgreSQL.

For each database (SQLite, and PostgreSQL when --postgres-url or $SYNCD_BENCH_POSTGRES_URL is set)
it builds a mirror of 1 org x 100,000 devices (2% door portals) through real passes: OrgPass in this
process against the simulator on loopback, a baseline pass and then --passes (20) passes, with churn
applied to the simulator's world between them. Each churn round renames 2%, moves 1.5% to another
zone, soft-deletes 1% and restores 0.5% of the devices (5% in all), creates 0.1% and purges 0.05%,
and gives 10% of the portals a new door-restriction list; every portal is made due before each pass
(next_fetch_at in the past), so every changed list is seen. The build is timed (per pass and in all).

Then, at T = just after the middle pass and at T = now, it times (median, min and max of --repeat):
  - Reports.devices_as_of(T, org): the whole answer as Python objects;
  - the same SQL as reports runs it, wrapped in count(*) (the database's share of that);
  - PostgreSQL only: SELECT count(*) FROM syncd_devices_as_of(T, org);
  - Reports.door_access_as_of(T, org);
  - for comparison, the current fleet: SELECT count(*) FROM devices WHERE org_id = ..., and
    Store.devices_of(org) (the current rows as Python dicts);
and prints the ratios as-of / current read, the device_changes row count and the plan of the
as-of query (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL, of the SQL reports sends and of
the function), with one line saying whether it uses ix_device_changes_device_id_observed_at.
On PostgreSQL the mirror is ANALYZEd before the reads, as autovacuum keeps a live one. The
throw-away databases are dropped at the end.

    .venv/bin/python bench/bench_as_of.py [--postgres-url postgresql://postgres@127.0.0.1/test]
        [--devices N] [--passes N] [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event, text

from syncd.api import OpenAppClient
from syncd.config import ApiSettings, OrgSettings, Secret, SyncSettings
from syncd.simulator import Simulator, World
from syncd.simulator.world import make_ulid
from syncd.store import Store
from syncd.store.reports import Reports
from syncd.sync import OrgPass, PassOptions

KEY = "bench-" + uuid.uuid4().hex
INDEX = "ix_device_changes_device_id_observed_at"
# Churn per round, as shares of the org's devices (restrictions: of its portals).
RENAME, MOVE, DELETE, RESTORE, CREATE, PURGE, RESTRICT = 0.02, 0.015, 0.01, 0.005, 0.001, 0.0005, 0.10
ENTITIES = [make_ulid(1_700_000_000_000 + n, random.Random(n)) for n in range(50)]


@dataclass
class Build:
    seconds: float = 0.0  # passes and churn together
    pass_seconds: list[float] = field(default_factory=list)
    churn_seconds: float = 0.0
    changes: int = 0  # changes applied to the world
    middle: datetime | None = None  # just after the middle pass


@dataclass
class Timing:
    label: str
    seconds: list[float]
    rows: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@contextmanager
def fresh_store(kind: str, workdir: Path, pg_url: str | None) -> Iterator[Store]:
    """A new migrated mirror (a SQLite file, or a PostgreSQL database of its own), removed afterwards."""
    if kind == "sqlite":
        store = Store(f"sqlite:///{workdir / f'asof-{uuid.uuid4().hex[:6]}.db'}")
        try:
            store.upgrade()
            yield store
        finally:
            store.close()
        return
    assert pg_url
    name = f"syncd_bench_asof_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store = Store(pg_url.rsplit("/", 1)[0] + "/" + name)
    try:
        store.upgrade()
        yield store
    finally:
        store.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def churn(world: World, org: str, rng: random.Random) -> int:
    """One round of changes in the simulator; returns how many were made."""
    devices = world.orgs[org].devices
    ids = world.ids(org)
    size = len(ids)
    made = 0
    zones = world.orgs[org].zones
    for device_id in rng.sample(ids, int(size * RENAME)):
        world.update_device(org, device_id, {"name": {"en": f"Renamed {rng.getrandbits(32):08x}"}})
        made += 1
    for device_id in rng.sample(ids, int(size * MOVE)):
        world.update_device(org, device_id, {"zone_id": zones[rng.randrange(len(zones))]})
        made += 1
    active = [i for i in ids if devices[i].deleted_at is None]
    deleted = [i for i in ids if devices[i].deleted_at is not None]  # before this round's deletes
    for device_id in rng.sample(active, int(size * DELETE)):
        world.delete_device(org, device_id)
        made += 1
    for device_id in rng.sample(deleted, min(len(deleted), int(size * RESTORE))):
        world.restore_device(org, device_id)
        made += 1
    for _ in range(int(size * CREATE)):
        world.create_device(org)
        made += 1
    purgeable = [i for i in ids if devices[i].kind != "virtual_access_portal"]
    for device_id in rng.sample(purgeable, int(size * PURGE)):
        world.purge_device(org, device_id)
        made += 1
    portals = [i for i in world.ids(org) if devices[i].kind == "virtual_access_portal"]
    for device_id in rng.sample(portals, int(len(portals) * RESTRICT)):
        entities = rng.sample(ENTITIES, rng.randrange(4))  # an empty list: anyone may pass
        world.set_door_restrictions(org, device_id, {"listing_entity_ids": entities})
        made += 1
    return made


def build(store: Store, devices: int, passes: int) -> tuple[str, Build]:
    """Mirror a simulated org through a baseline pass and ``passes`` passes with churn between them."""
    world = World(seed=20)
    (org,) = world.seed(orgs=1, devices_per_org=devices, portal_fraction=0.02)
    world.add_key(KEY)
    rng = random.Random(20)
    result = Build()
    started = time.perf_counter()
    with Simulator(world, log_size=1000) as sim, OpenAppClient(ApiSettings(base_url=sim.url, api_key=Secret(KEY))) as c:
        for n in range(passes + 1):
            if n:
                churned = time.perf_counter()
                result.changes += churn(world, org, rng)
                result.churn_seconds += time.perf_counter() - churned
            with store.engine.begin() as conn:  # every portal due, so each changed list is read
                conn.execute(text("UPDATE portal_restrictions SET next_fetch_at = :t"), {"t": "2000-01-01"})
            began = time.perf_counter()
            outcome = OrgPass(c, store, PassOptions(OrgSettings(org), SyncSettings(), allow_mass_purge=True)).run()
            result.pass_seconds.append(time.perf_counter() - began)
            if outcome.status != "succeeded":
                raise SystemExit(f"pass {n} {outcome.status}: {outcome.error}")
            if n == passes // 2:
                result.middle = datetime.now(UTC)
            print(f"  pass {n:>2}: {result.pass_seconds[-1]:6.1f} s", file=sys.stderr, flush=True)
    result.seconds = time.perf_counter() - started
    return org, result


def timed(label: str, repeat: int, run: Callable[[], int]) -> Timing:
    run()  # warm: the first read pages the tables in
    seconds, rows = [], 0
    for _ in range(repeat):
        began = time.perf_counter()
        rows = run()
        seconds.append(time.perf_counter() - began)
    return Timing(label, seconds, rows)


def captured_sql(store: Store, call: Callable[[], object]) -> tuple[str, Any]:
    """The last statement (and its parameters, in the driver's style) that ``call`` sent."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    return sent[-1]


def count_rows(read: Callable[[datetime, str], list[Any]], at: datetime, org: str) -> int:
    """Rows of a report, read whole (every row built as its dataclass)."""
    return len(read(at, org))


def scalar(store: Store, sql: str, params: Any = None) -> int:
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql(sql, params if params is not None else ()).scalar_one())


def plan(store: Store, sql: str, params: Any) -> list[str]:
    explain = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(explain + sql, params).all()
    return [row[-1] if store.dialect == "sqlite" else row[0] for row in rows]


def function_plan(store: Store, at: datetime, org: str) -> list[str]:
    """The plan PostgreSQL runs for syncd_devices_as_of: EXPLAIN of a call (a LANGUAGE sql STABLE
    set-returning function is inlined into the calling query, so its body's plan shows)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("EXPLAIN SELECT count(*) FROM syncd_devices_as_of(:at, :org)"), {"at": at, "org": org}
        ).all()
    return [row[0] for row in rows]


def measure(kind: str, workdir: Path, pg_url: str | None, devices: int, passes: int, repeat: int) -> None:
    print(f"\n{kind}: 1 org x {devices:,} devices, baseline pass + {passes} passes of churn", flush=True)
    with fresh_store(kind, workdir, pg_url) as store:
        org, b = build(store, devices, passes)
        print(
            f"  build: {b.seconds:.1f} s in all ({b.seconds / 60:.1f} min): baseline pass {b.pass_seconds[0]:.1f} s, "
            f"churn passes median {statistics.median(b.pass_seconds[1:]):.1f} s (min "
            f"{min(b.pass_seconds[1:]):.1f}, max {max(b.pass_seconds[1:]):.1f}), churning the world "
            f"{b.churn_seconds:.1f} s ({b.changes:,} changes)",
            flush=True,
        )
        assert b.middle is not None
        if store.dialect == "postgresql":  # statistics, as autovacuum keeps them on a live mirror
            with store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        reports = Reports(store)
        changes = scalar(store, "SELECT count(*) FROM device_changes")
        current = scalar(store, "SELECT count(*) FROM devices")
        intervals = scalar(store, "SELECT count(*) FROM door_access_intervals")
        print(
            f"  device_changes: {changes:,} rows ({changes / current:.1f} per device; {current:,} devices in the "
            f"mirror); door_access_intervals: {intervals:,} rows",
            flush=True,
        )
        style = "?" if store.dialect == "sqlite" else "%(org)s"
        org_param: Any = (org,) if store.dialect == "sqlite" else {"org": org}
        timings: list[Timing] = [
            timed(
                "current: count(*) FROM devices",
                repeat,
                lambda: scalar(store, f"SELECT count(*) FROM devices WHERE org_id = {style}", org_param),
            ),
            timed("current: Store.devices_of (rows)", repeat, lambda: len(store.devices_of(org))),
        ]
        plans: dict[str, list[str]] = {}
        for name, at in (("middle", b.middle), ("now", datetime.now(UTC))):
            sql, params = captured_sql(store, partial(reports.devices_as_of, at, org))
            plans[f"reports' SQL, T={name}"] = plan(store, sql, params)
            as_of_reads: dict[str, Callable[[], int]] = {
                f"devices_as_of(T={name}) (rows)": partial(count_rows, reports.devices_as_of, at, org),
                f"its SQL in count(*), T={name}": partial(scalar, store, f"SELECT count(*) FROM ({sql}) AS q", params),
            }
            if store.dialect == "postgresql":
                plans[f"syncd_devices_as_of, T={name}"] = function_plan(store, at, org)
                function = "SELECT count(*) FROM syncd_devices_as_of(%(at)s, %(org)s)"
                as_of_reads[f"count(*) FROM syncd_devices_as_of(T={name})"] = partial(
                    scalar, store, function, {"at": at, "org": org}
                )
            as_of_reads[f"door_access_as_of(T={name}) (rows)"] = partial(count_rows, reports.door_access_as_of, at, org)
            timings += [timed(label, repeat, read) for label, read in as_of_reads.items()]
        count_read, rows_read = timings[0].median, timings[1].median
        print(f"  {'query':<44} {'rows':>8} {'median s':>9} {'min s':>8} {'max s':>8} {'x count(*)':>10} {'x rows':>7}")
        for t in timings:
            print(
                f"  {t.label:<44} {t.rows:>8,} {t.median:>9.3f} {min(t.seconds):>8.3f} {max(t.seconds):>8.3f} "
                f"{t.median / count_read:>10.1f} {t.median / rows_read:>7.2f}",
                flush=True,
            )
        print(f"  (median of {repeat} after one warm-up; x count(*) / x rows: over the two current-fleet reads)")
        for label, lines in plans.items():
            uses = any(INDEX in line for line in lines)
            print(f"  plan, {label}: {'USES' if uses else 'does NOT use'} {INDEX}")
            if label.endswith("T=middle"):  # T=now plans the same way; its line above says so
                for line in lines:
                    print(f"      {line}")
        slow = [t for t in timings if "as_of" in t.label and t.median > 3.0]
        if slow:
            print(f"  SLOW (> 3 s): {', '.join(t.label for t in slow)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default=os.environ.get("SYNCD_BENCH_POSTGRES_URL"))
    parser.add_argument("--quick", action="store_true", help="10,000 devices instead of 100,000, to try the script")
    parser.add_argument("--devices", type=int, help="devices in the org (default 100,000; --quick 10,000)")
    parser.add_argument("--passes", type=int, default=20, help="passes of churn after the baseline (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query; median, min, max (default 5)")
    args = parser.parse_args()
    from syncd import logs

    logs.configure("json", "warning")  # the passes run in this process
    devices = args.devices or (10_000 if args.quick else 100_000)
    print(f"Python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs, --repeat {args.repeat}")
    kinds = ["sqlite"] + (["postgresql"] if args.postgres_url else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            measure(kind, Path(tmp), args.postgres_url, devices, args.passes, args.repeat)


if __name__ == "__main__":
    main()
