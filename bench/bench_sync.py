#!/usr/bin/env python3
"""Benchmark syncd's passes against the simulator on loopback, as separate processes.

For each database (SQLite, and PostgreSQL when --postgres-url or $SYNCD_BENCH_POSTGRES_URL is set)
and each shape (1 org x 100,000 devices; 10 orgs x 10,000), it reports the first full sync and a
no-change re-sync of `syncd run-once`: wall time, devices/s, HTTP requests, peak RSS of the syncd
process, and the simulator's own serving rate for the same pages (fetched raw, without syncd).
"seconds" and "devices/s" are the whole `syncd run-once` process, start-up (about 0.25-0.35 s before
its first request) included; "in-pass" is from the first pass start to the last pass end recorded in
sync_runs. Each sync figure is the median of --repeat runs (each on a fresh database); peak RSS is
the highest. --scaling runs only the scaling block (issue 21): 1 org x each of --sizes and
--many-orgs on each database, against the bare reference loop and a fetch-and-parse loop
(bench/reference_loop.py), with the ratios both as whole processes and as the pass's own seconds
against the loop's own (start-up left out on both sides).
The simulator makes 2% of the devices door portals (`syncd simulate --portal-fraction`), so every pass
also mirrors door restrictions and metadata definitions, as by default. A separate block measures what
door restrictions add: 1 org x 100,000 devices (about 2,000 portals), synced with
`sync.door_restrictions` off and on in alternation, on fresh databases: the extra requests and seconds
of a first sync and of a no-change re-sync (which, inside the refresh interval, must ask nothing).
Then it pushes 1,000 queued edits of each kind (rename, soft delete, restore, door restrictions
add) through the write-back reconciler (in this process): without faults, with 10% of requests
answered 429 (Retry-After: 1) and with the answers of 20% of the writes lost (applied, then the
connection reset): edits per second, requests per edit, conflicts (none is expected).
With --postgres-url, a daemons block runs first (alone with --only-daemons): --daemons `syncd run`
processes sharing one PostgreSQL, --daemon-orgs ORGSxDEVICES (default 3 on 30 x 250, sync.interval
--daemon-interval 4 s, --daemon-latency-ms added by the simulator): after every org's first sync, a
steady window of --daemon-steady seconds: scans per org per interval, starved orgs, gaps, overlapping
passes, and what one daemon re-syncs per second while busy (what it keeps fresh in 15 minutes); then,
up to 10,000 devices or with --daemon-kill, how soon a SIGKILLed daemon's orgs are scanned again.

    .venv/bin/python bench/bench_sync.py [--postgres-url postgresql://postgres@127.0.0.1/test] [--scaling]
        [--repeat N] [--quick]
    .venv/bin/python bench/bench_sync.py --postgres-url URL --only-daemons --daemon-orgs 1000x1000
        --daemon-interval 180 --daemon-steady 900 [--daemon-latency-ms 50] [--daemons 3]
"""

from __future__ import annotations

import argparse
import compileall
import itertools
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

KEY = "bench-" + uuid.uuid4().hex
SIMULATE = [sys.executable, "-m", "syncd", "simulate", "--port", "0"]
PAGE = 200
WINDOW = 32  # api.page_concurrency's default: the bare window client asks as many pages at once
# list_devices as syncd asks it (bench/reference_loop.py has its own copy: it stands alone)
LIST_PARAMS: dict[str, str | int] = {
    "include_deleted": "true",
    "only_deleted": "false",
    "include_metadata": "true",
    "limit": PAGE,
}


@dataclass
class Measure:
    seconds: float
    devices: int
    requests: int
    pass_seconds: float
    rss_mb: float
    written: int

    @property
    def in_pass_rate(self) -> float:
        return self.devices / self.pass_seconds

    @property
    def rate(self) -> float:
        return self.devices / self.seconds


def start_simulator(orgs: int, devices: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*SIMULATE, "--orgs", str(orgs), "--devices", str(devices), *extra],
        env={**os.environ, "SYNCD_API_KEY": KEY},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    found = re.search(r"serving (\S+)", proc.stdout.readline())
    if not found:
        proc.kill()
        raise SystemExit("the simulator did not start")
    return proc, found.group(1)


def org_ids(orgs: int) -> list[str]:
    return [f"01HORG{i:020d}" for i in range(orgs)]


def serve_rate(url: str, orgs: int) -> float:
    """Devices/s the simulator serves for the same pages, fetched raw with one keep-alive client."""
    total, started = 0, time.perf_counter()
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}) as client:
        for org in org_ids(orgs):
            offset = 0
            while True:
                r = client.get(
                    "/devices",
                    headers={"X-Org": org},
                    params={**LIST_PARAMS, "offset": offset},
                )
                count = r.content.count(b'"org_id"')
                total += count
                offset += PAGE
                if count < PAGE:
                    break
    return total / (time.perf_counter() - started)


def window_fetch(url: str, devices: int, width: int) -> float:
    """Seconds a bare client takes to fetch every list page of the first org, ``width`` requests at a
    time (httpx, one thread each, no parsing): what a re-sync's requests cost at best, on this machine
    against this simulator, whatever syncd does with the answers."""
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    headers = {"X-API-Key": KEY, "X-Org": org_ids(1)[0]}
    with httpx.Client(base_url=url, headers=headers, limits=limits) as client:

        def fetch(offset: int) -> int:
            return len(client.get("/devices", params={**LIST_PARAMS, "offset": offset}).content)

        started = time.perf_counter()
        with ThreadPoolExecutor(width) as pool:
            sizes = list(pool.map(fetch, range(0, devices + 1, PAGE)))
        seconds = time.perf_counter() - started
    if not all(sizes):
        raise SystemExit("the bare window client got an empty answer")
    return seconds


def syncd_child(tree: Path | None = None) -> dict[str, Any]:
    """Popen arguments for a `python -m syncd` child: this tree's syncd, or ``tree``'s (its own code
    first on the path, run from there)."""
    if tree is None:
        return {"env": {**os.environ, "SYNCD_API_KEY": KEY}}
    return {"env": {**os.environ, "SYNCD_API_KEY": KEY, "PYTHONPATH": str(tree)}, "cwd": str(tree)}


@dataclass
class Child:
    """What a child process cost: wall seconds, peak RSS (its own, from wait4) and CPU seconds."""

    seconds: float
    rss_mb: float
    cpu: float
    output: str


# Runs its arguments as a child, then prints the child's exit code, peak RSS (KiB) and CPU seconds. A
# child spawned straight from the bench (vfork, then exec) would inherit the bench's own high-water
# RSS (an in-process simulator's included) as its ru_maxrss; from this small process it does not.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
    "print(f'\\n@launcher {os.waitstatus_to_exitcode(s)} {u.ru_maxrss} {u.ru_utime + u.ru_stime}')"
)


def run_child(command: list[str], tree: Path | None = None) -> Child:
    """Run a child to its end (through LAUNCHER); its wall time, peak RSS and CPU (user + system)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        check=False,
        **syncd_child(tree),
    )
    seconds = time.perf_counter() - started
    output, _, report = proc.stdout.rpartition("\n@launcher ")
    code, max_rss_kb, cpu = report.split()
    if proc.returncode != 0 or code != "0":
        raise SystemExit(f"{' '.join(command[1:4])} failed:\n{output}")
    return Child(seconds, int(max_rss_kb) / 1024, float(cpu), output)


def run_once_child(config: Path, tree: Path | None = None) -> Child:
    """`syncd run-once` as a child."""
    return run_child([sys.executable, "-m", "syncd", "run-once", "--config", str(config)], tree)


def run_once(config: Path, tree: Path | None = None) -> tuple[float, float, str]:
    """Run `syncd run-once` as a child; returns wall seconds, its peak RSS (MB) and its output."""
    child = run_once_child(config, tree)
    return child.seconds, child.rss_mb, child.output


def totals(output: str) -> tuple[int, int, int]:
    """Devices seen, requests (pages + confirmations) and rows written, from the summary table
    (read by its header, so a new counter column does not shift the others)."""
    seen = requests = written = 0
    header: list[str] = []
    for line in output.splitlines():
        cells = line.split()
        if cells[:2] == ["ORG", "STATUS"]:
            header = [c.lower() for c in cells]
        elif header and len(cells) == len(header) and cells[1] == "succeeded":
            row = dict(zip(header, cells, strict=True))
            counts = {k: int(v) for k, v in row.items() if k not in ("org", "status", "seconds")}
            seen += counts["devices"]
            requests += counts["pages"] + counts["purged"]
            written += sum(counts[k] for k in ("created", "updated", "deleted", "restored", "purged"))
    return seen, requests, written


def pass_time(db: str) -> float:
    """Seconds from the first start to the last finish of the newest run-once's passes (no process start-up)."""
    from sqlalchemy import func, select

    from syncd.store import Store
    from syncd.store.schema import sync_runs

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            newest = conn.execute(select(func.max(sync_runs.c.id))).scalar_one()
            orgs = conn.execute(select(func.count(func.distinct(sync_runs.c.org_id)))).scalar_one()
            rows = conn.execute(
                select(sync_runs.c.started_at, sync_runs.c.finished_at).where(sync_runs.c.id > newest - orgs)
            ).all()
    finally:
        store.close()
    return float((max(r.finished_at for r in rows) - min(r.started_at for r in rows)).total_seconds())


def fresh_database(kind: str, workdir: Path, pg_url: str | None) -> str:
    if kind == "sqlite":
        path = workdir / f"bench-{uuid.uuid4().hex[:6]}.db"
        return f"sqlite:///{path}"
    assert pg_url
    name = f"syncd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str, pg_url: str | None) -> None:
    if url.startswith("postgresql") and pg_url:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    elif url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(f"{path}.locks", ignore_errors=True)


def typical(measures: list[Measure]) -> Measure:
    """The run with the median wall time, with the highest peak RSS of all runs."""
    middle = sorted(measures, key=lambda m: m.seconds)[len(measures) // 2]
    return replace(middle, rss_mb=max(m.rss_mb for m in measures))


def write_config(
    path: Path, url: str, db: str, orgs: int, sync: str = "", api: str = "", tree: Path | None = None
) -> None:
    path.write_text(
        f'[api]\nbase_url = "{url}"\napi_key_env = "SYNCD_API_KEY"\n{api}[database]\nurl = "{db}"\n'
        f'[sync]\nconcurrency = 4\n{sync}[logging]\nlevel = "warning"\n'
        + "".join(f'[[orgs]]\nid = "{o}"\n' for o in org_ids(orgs))
    )
    subprocess.run(
        [sys.executable, "-m", "syncd", "db", "upgrade", "--config", str(path)],
        check=True,
        capture_output=True,
        **syncd_child(tree),
    )


def newest_runs(db: str, *columns: str) -> list[int]:
    """Sums of sync_runs counters over the newest run-once's passes."""
    from sqlalchemy import func, select

    from syncd.store import Store
    from syncd.store.schema import sync_runs

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            newest = conn.execute(select(func.max(sync_runs.c.id))).scalar_one()
            orgs = conn.execute(select(func.count(func.distinct(sync_runs.c.org_id)))).scalar_one()
            sums = select(*(func.sum(sync_runs.c[c]) for c in columns)).where(sync_runs.c.id > newest - orgs)
            return [int(v or 0) for v in conn.execute(sums).one()]
    finally:
        store.close()


def portal_count(db: str) -> int:
    from sqlalchemy import func, select

    from syncd.store import Store
    from syncd.store.schema import portal_restrictions

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(portal_restrictions)).scalar_one())
    finally:
        store.close()


def restrictions_scenario(kind: str, workdir: Path, pg_url: str | None, repeat: int, devices: int) -> None:
    """What door restrictions add to a first sync and a no-change re-sync of 1 org: runs with
    sync.door_restrictions off and on alternate, each on a fresh database; medians are compared."""
    sim, url = start_simulator(1, devices)
    seconds: dict[tuple[bool, str], list[float]] = {}
    asked: dict[str, list[int]] = {"first": [], "resync": []}
    portals = 0
    try:
        serve_rate(url, 1)
        for _ in range(repeat):
            for restrictions in (False, True):
                db = fresh_database(kind, workdir, pg_url)
                try:
                    config = workdir / "bench.toml"
                    write_config(config, url, db, 1, f"door_restrictions = {str(restrictions).lower()}\n")
                    for label in ("first", "resync"):
                        took, _, _ = run_once(config)
                        seconds.setdefault((restrictions, label), []).append(took)
                        if restrictions:
                            asked[label].append(newest_runs(db, "restriction_requests")[0])
                    if restrictions:
                        portals = portal_count(db)
                finally:
                    drop_database(db, pg_url)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    for label in ("first", "resync"):
        off, on = statistics.median(seconds[(False, label)]), statistics.median(seconds[(True, label)])
        requests = statistics.median(asked[label])
        print(
            f"door restrictions, {kind} 1 x {devices:,} with {portals:,} portals, {label}: "
            f"+{requests:,.0f} requests, {off:.2f} s -> {on:.2f} s ({on - off:+.2f} s, {on / off:.2f}x; "
            f"median of {repeat})",
            flush=True,
        )
    if any(asked["resync"]):
        print(f"  VIOLATED: a no-change re-sync inside the interval asked for restrictions: {asked['resync']}")
    else:
        print("  a no-change re-sync inside the refresh interval asked for no restrictions (as required)")


def scenario(
    kind: str, orgs: int, devices: int, workdir: Path, pg_url: str | None, repeat: int = 1
) -> dict[str, object]:
    """First sync and re-sync of a fresh database, ``repeat`` times; the median run of each."""
    sim, url = start_simulator(orgs, devices)
    runs: dict[str, list[Measure]] = {"first": [], "resync": []}
    try:
        # The simulator renders each device once and then serves it from memory. Warm it up, so
        # that every run meets the same server and its rendering does not eat the CPU that syncd
        # is measured on (a real OpenApp spends its own CPU, on another machine).
        serve_rate(url, orgs)
        for _ in range(repeat):
            db = fresh_database(kind, workdir, pg_url)
            try:
                config = workdir / "bench.toml"
                write_config(config, url, db, orgs)
                for label in ("first", "resync"):
                    seconds, rss, output = run_once(config)
                    seen, requests, written = totals(output)
                    runs[label].append(Measure(seconds, seen, requests, pass_time(db), rss, written))
            finally:
                drop_database(db, pg_url)
        served = serve_rate(url, orgs)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    return {
        "db": kind,
        "shape": f"{orgs} x {devices:,}",
        "served": served,
        **{label: typical(measures) for label, measures in runs.items()},
    }


DEVICES_ONLY = "door_restrictions = false\nmetadata_definitions = false\n"


def latency_block(workdir: Path, devices: int, repeat: int, latency_ms: float) -> None:
    """1 org x ``devices`` on SQLite with 0 and ``latency_ms`` added to every request: first sync and
    no-change re-sync (medians of ``repeat``), and the bare reference loop at 0 ms beside them."""
    print(f"\nlatency: 1 org x {devices:,} devices, SQLite, medians of {repeat} (whole processes, start-up included)")
    first_at: dict[float, float] = {}
    resync_at: dict[float, float] = {}
    window_at: dict[float, float] = {}
    for latency in (0, latency_ms):
        sim, url = start_simulator(1, devices, "--latency-ms", f"{latency:g}")
        try:
            if not latency:
                serve_rate(url, 1)  # warm the simulator's rendering up (see scenario)
            firsts, resyncs, references, devices_only, windows = [], [], [], [], []
            for _ in range(repeat):
                windows.append(window_fetch(url, devices, WINDOW))
                db = fresh_database("sqlite", workdir, None)
                try:
                    config = workdir / "latency.toml"
                    write_config(config, url, db, 1)
                    firsts.append(run_once(config)[0])
                    resyncs.append(run_once(config)[0])
                finally:
                    drop_database(db, None)
                if not latency:
                    references.append(reference_child(url, workdir).seconds)
                    db = fresh_database("sqlite", workdir, None)
                    try:  # the devices alone, as the reference loop mirrors them
                        write_config(config, url, db, 1, DEVICES_ONLY)
                        devices_only.append(run_once(config)[0])
                    finally:
                        drop_database(db, None)
        finally:
            sim.terminate()
            sim.wait(timeout=30)
        first, resync = statistics.median(firsts), statistics.median(resyncs)
        first_at[latency], resync_at[latency] = first, resync
        window_at[latency] = statistics.median(windows)
        print(
            f"  {latency:>3g} ms per request: first sync {first:.2f} s, no-change re-sync {resync:.2f} s; "
            f"a bare client fetching the same pages {WINDOW} at a time {window_at[latency]:.2f} s",
            flush=True,
        )
        if not latency:
            reference, alone = statistics.median(references), statistics.median(devices_only)
            print(
                f"  bare reference loop (fetch, parse, upsert; one page at a time): {reference:.2f} s; "
                f"syncd's first sync of the devices alone (no door restrictions, no metadata definitions) "
                f"{alone:.2f} s: {alone / reference:.2f}x that (target <= 2); with them {first / reference:.2f}x",
                flush=True,
            )
        else:
            print(
                f"  at {latency:g} ms / at 0 ms: first sync {first / first_at[0]:.2f}x, no-change re-sync "
                f"{resync / resync_at[0]:.2f}x (targets <= 1.5 and <= 1.3); the bare client "
                f"{window_at[latency] / window_at[0]:.2f}x, and {window_at[latency] - window_at[0]:+.2f} s against "
                f"syncd's {resync - resync_at[0]:+.2f} s",
                flush=True,
            )


@dataclass(frozen=True)
class DaemonsShape:
    """What the daemons block runs: the world, the daemons and the windows it measures."""

    orgs: int = 30
    devices: int = 250
    interval: float = 4.0
    steady: float = 24.0
    latency_ms: float = 0.0
    daemons: int = 3
    concurrency: int = 4
    kill: bool | None = None  # None: only for a small world (KILL_UP_TO devices), as it costs 3 intervals

    @property
    def total(self) -> int:
        return self.orgs * self.devices

    @property
    def kills(self) -> bool:
        return self.kill if self.kill is not None else self.total <= KILL_UP_TO


KILL_UP_TO = 10_000
FIRST_PASSES_WITHIN = 3600.0  # seconds the daemons may take to sync every org a first time
FRESH_FOR = 900.0  # the interval the capacity line extrapolates to: 15 minutes


@dataclass(frozen=True)
class Pass:
    """One pass of one org as the simulator saw it: its list pages, from one syncd instance."""

    started: float
    finished: float
    user_agent: str


def passes_by_org(log: list[Any], orgs: list[str]) -> dict[str, list[Pass]]:
    """Each org's passes from the request log (list pages)."""
    pages: dict[str, list[Any]] = {org: [] for org in orgs}
    for r in log:
        if r.org_id in pages:
            pages[r.org_id].append(r)
    return {org: org_passes(requests) for org, requests in pages.items()}


def org_passes(requests: list[Any]) -> list[Pass]:
    """One org's passes: one instance's pages of the org, asked several at once (so not always
    offset 0 first); an offset asked again, or another instance, begins a new pass."""
    passes: list[Pass] = []
    offsets: set[int | None] = set()
    for r in sorted(requests, key=lambda r: r.started):
        if not passes or passes[-1].user_agent != r.user_agent or r.offset in offsets:
            passes.append(Pass(r.started, r.finished, r.user_agent))
            offsets = set()
        else:
            passes[-1] = replace(passes[-1], finished=max(passes[-1].finished, r.finished))
        offsets.add(r.offset)
    return passes


def daemons_config(path: Path, url: str, db: str, orgs: list[str], shape: DaemonsShape) -> None:
    path.write_text(
        f'[api]\nbase_url = "{url}"\napi_key_env = "SYNCD_API_KEY"\n[database]\nurl = "{db}"\n'
        f'[sync]\ninterval = {shape.interval:g}\nconcurrency = {shape.concurrency}\n[logging]\nlevel = "warning"\n'
        + "".join(f'[[orgs]]\nid = "{o}"\n' for o in orgs)
    )


def start_daemons(config: Path, count: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(config)],
            env={**os.environ, "SYNCD_API_KEY": KEY},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def orgs_synced(db: str) -> int:
    """Orgs with at least one finished pass (none while the daemons are still creating the tables)."""
    with psycopg.connect(db) as conn:
        try:
            row = conn.execute("SELECT count(DISTINCT org_id) FROM sync_runs WHERE finished_at IS NOT NULL").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def wait_for_first_passes(db: str, shape: DaemonsShape) -> None:
    """Until every org has been synced once and one more interval has passed (at least two intervals
    from the start: the daemons' timers settled)."""
    started = time.monotonic()
    while orgs_synced(db) < shape.orgs:
        if time.monotonic() - started > FIRST_PASSES_WITHIN:
            raise SystemExit(f"the daemons did not sync every org within {FIRST_PASSES_WITHIN:.0f} s")
        time.sleep(min(1.0, shape.interval / 4))
    synced = time.monotonic()
    print(f"  first sync of every org by the daemons: {synced - started:.1f} s", flush=True)
    time.sleep(max(started + 2 * shape.interval, synced + shape.interval) - synced)


@dataclass(frozen=True)
class Busy:
    """One instance's succeeded passes in a window: devices seen, seconds with a pass running (the
    union of its passes) and the passes' own seconds summed."""

    devices: int
    busy: float
    pass_seconds: float


def busy_by_instance(db: str, since: datetime, until: datetime) -> dict[str, Busy]:
    """Each syncd instance's passes started in [since, until), from sync_runs."""
    from sqlalchemy import select

    from syncd.store import Store
    from syncd.store.schema import sync_runs
    from syncd.vocab import RunStatus

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(sync_runs.c.instance, sync_runs.c.started_at, sync_runs.c.finished_at, sync_runs.c.devices_seen)
                .where(sync_runs.c.started_at >= since, sync_runs.c.started_at < until)
                .where(sync_runs.c.status == RunStatus.SUCCEEDED)
                .order_by(sync_runs.c.started_at)
            ).all()
    finally:
        store.close()
    found: dict[str, Busy] = {}
    ends: dict[str, datetime] = {}
    for r in rows:
        seconds = (r.finished_at - r.started_at).total_seconds()
        # Rows come by start: the union grows by the part of this pass after the instance's latest end.
        end = ends.get(r.instance, r.started_at)
        extra = max((r.finished_at - max(end, r.started_at)).total_seconds(), 0.0)
        ends[r.instance] = max(end, r.finished_at)
        before = found.get(r.instance, Busy(0, 0.0, 0.0))
        found[r.instance] = Busy(before.devices + r.devices_seen, before.busy + extra, before.pass_seconds + seconds)
    return found


def steady_report(
    orgs: list[str], passes: dict[str, list[Pass]], window: tuple[float, float], shape: DaemonsShape
) -> None:
    """Scans per org per interval, starved orgs, gaps between scans, and the devices kept fresh."""
    since, until = window
    intervals = (until - since) / shape.interval
    counts: list[int] = []
    rates: list[float] = []
    gaps: list[float] = []
    shortest: list[float] = []
    for org in orgs:
        starts = [p.started for p in passes[org] if p.started < until]
        inside = [s for s in starts if s >= since]
        counts.append(len(inside))
        if len(inside) > 1:  # from the mean gap between its scans: no rounding at the window's edges
            rates.append(shape.interval * (len(inside) - 1) / (inside[-1] - inside[0]))
        around = starts[len(starts) - len(inside) - 1 :] if len(starts) > len(inside) else inside
        steps = [b - a for a, b in itertools.pairwise(around)]
        gaps.append(max([*steps, until - starts[-1]] if starts else [until - since]))
        shortest.extend(b - a for a, b in itertools.pairwise(inside))
    scanned = sum(1 for c in counts if c)
    print(
        f"  steady window {until - since:.0f} s ({intervals:.1f} intervals): complete scans per org per interval "
        f"mean {sum(counts) / len(orgs) / intervals:.2f}, max {max(rates, default=0.0):.2f} (an org's mean gap, "
        f"noisy under 5 intervals; target <= 1.2, one daemon alone makes 1); starved orgs (never scanned): "
        f"{len(orgs) - scanned} (target 0)",
        flush=True,
    )
    print(
        f"  longest gap between two scans of one org: {max(gaps):.1f} s ({max(gaps) / shape.interval:.2f} intervals), "
        f"shortest {min(shortest, default=float('nan')):.1f} s; devices of the orgs scanned per daemon per "
        f"interval: {scanned * shape.devices / shape.daemons:,.0f}",
        flush=True,
    )


def capacity_report(busy: dict[str, Busy], window: float, shape: DaemonsShape) -> None:
    """What one daemon re-syncs per second while it has a pass running, and what that keeps fresh."""
    if not busy:
        print("  capacity: no succeeded pass in the steady window", flush=True)
        return
    rates = [b.devices / b.busy for b in busy.values() if b.busy > 0]
    per_pass = sum(b.devices for b in busy.values()) / sum(b.pass_seconds for b in busy.values())
    in_flight = sum(b.pass_seconds for b in busy.values()) / sum(b.busy for b in busy.values())
    rate = statistics.mean(rates)
    print(
        f"  capacity: one daemon re-synced {rate:,.0f} devices/s while busy (mean of {len(rates)} daemons, lowest "
        f"{min(rates):,.0f}; busy {sum(b.busy for b in busy.values()) / len(busy) / window:.0%} of the window, "
        f"{in_flight:.1f} passes in flight on average, sync.concurrency {shape.concurrency}; "
        f"one pass alone {per_pass:,.0f} devices/s): at that rate it keeps {rate * FRESH_FOR:,.0f} devices fresh "
        f"at a {FRESH_FOR / 60:.0f}-minute interval; {per_pass * shape.concurrency * FRESH_FOR:,.0f} if "
        f"{shape.concurrency} passes ran at once without slowing each other (latency-bound)",
        flush=True,
    )


def takeover_report(
    orgs: list[str], passes: dict[str, list[Pass]], killed: str, killed_at: float, interval: float
) -> None:
    """How soon the orgs the killed daemon had scanned last were scanned again."""
    takeover: list[float] = []
    for org in orgs:
        before_kill = [p for p in passes[org] if p.started < killed_at]
        if before_kill and killed in before_kill[-1].user_agent:
            after = [p.started for p in passes[org] if p.started >= killed_at]
            takeover.append((after[0] - before_kill[-1].started) if after else float("inf"))
    if takeover:
        print(
            f"  the killed daemon's {len(takeover)} orgs were scanned again {max(takeover):.1f} s at most after "
            f"their last pass (interval {interval:g} s; target: within one interval of the kill)",
            flush=True,
        )


def daemons_block(workdir: Path, pg_url: str, shape: DaemonsShape) -> None:
    """``shape.daemons`` `syncd run` daemons on one PostgreSQL (default 3, 30 orgs x 250 devices):
    in a steady window after every org's first sync, complete scans per org per interval (from the
    simulator's request log), starved orgs, gaps between scans, overlapping passes of an org, and
    each daemon's re-sync rate while busy (from sync_runs); then, for a small world, how soon the
    orgs a SIGKILLed daemon had scanned are scanned again."""
    from syncd.simulator import Simulator, World

    world = World(seed=30)
    orgs = world.seed(shape.orgs, shape.devices, portal_fraction=0.02)  # as `syncd simulate` does
    world.add_key(KEY)
    db = fresh_database("postgresql", workdir, pg_url)
    print(
        f"\n{shape.daemons} daemons, one PostgreSQL, {shape.orgs:,} orgs x {shape.devices:,} devices "
        f"({shape.total:,}), sync.interval {shape.interval:g}s, sync.concurrency {shape.concurrency}, "
        f"{shape.latency_ms:g} ms added per request",
        flush=True,
    )
    killed, killed_at = None, 0.0
    try:
        with Simulator(world, log_size=2_000_000) as sim:
            sim.latency = shape.latency_ms / 1000
            config = workdir / "daemons.toml"
            daemons_config(config, sim.url, db, orgs, shape)
            daemons = start_daemons(config, shape.daemons)
            try:
                wait_for_first_passes(db, shape)
                steady_from, since = time.monotonic(), datetime.now(UTC)
                time.sleep(shape.steady)
                steady_to, until = time.monotonic(), datetime.now(UTC)
                if shape.kills:
                    daemons[0].kill()
                    daemons[0].wait(timeout=30)
                    killed, killed_at = f":{daemons[0].pid})", time.monotonic()
                    time.sleep(3 * shape.interval)
            finally:
                for proc in daemons:
                    proc.terminate()
                for proc in daemons:
                    proc.wait(timeout=60)
            log = sim.requests("list_devices")
            busy = busy_by_instance(db, since, until)
    finally:
        drop_database(db, pg_url)
    passes = passes_by_org(log, orgs)
    overlaps = sum(
        1
        for org in orgs
        for a, b in itertools.pairwise(passes[org])
        if a.finished > b.started and not (killed and killed in a.user_agent)
    )
    steady_report(orgs, passes, (steady_from, steady_to), shape)
    print(f"  overlapping passes of one org: {overlaps} (target 0)", flush=True)
    capacity_report(busy, steady_to - steady_from, shape)
    if killed:
        takeover_report(orgs, passes, killed, killed_at, shape.interval)
    else:
        why = "--no-daemon-kill" if shape.kill is False else f"over {KILL_UP_TO:,} devices; --daemon-kill runs it"
        print(f"  SIGKILL takeover skipped ({why})", flush=True)


def throttled_block(workdir: Path, trees: list[tuple[str, Path | None]], devices: int = 5_000) -> None:
    """1 org on SQLite, `syncd run-once` (each tree's) with and without 20% of requests answered 429
    (Retry-After: 1): requests per second, and whether the mirror is exact at the end."""
    from syncd.simulator import Fault, Simulator, World
    from syncd.store import Store

    print(f"\n20% of requests answered 429 (Retry-After 1 s), 1 org x {devices:,} devices, SQLite", flush=True)
    for (label, rate), (tree_label, tree) in itertools.product((("no 429s", 0.0), ("20% 429s", 0.2)), trees):
        world = World(seed=12)
        (org,) = world.seed(1, devices, portal_fraction=0.02)  # as `syncd simulate` does
        world.add_key(KEY)
        db = fresh_database("sqlite", workdir, None)
        try:
            with Simulator(world, log_size=1_000_000) as sim:
                if rate:
                    sim.inject(Fault(status=429, retry_after="1", rate=rate, times=None))
                config = workdir / "throttled.toml"
                config.write_text(
                    f'[api]\nbase_url = "{sim.url}"\napi_key_env = "SYNCD_API_KEY"\n'
                    f'[api.retry]\nmax_attempts = 20\ndeadline = 600\n[database]\nurl = "{db}"\n'
                    f'[logging]\nlevel = "warning"\n[[orgs]]\nid = "{org}"\n'
                )
                seconds = run_once(config, tree)[0]
                log = list(sim.log)
            store = Store(db)
            try:
                mirrored = {d["id"]: d["raw"] for d in store.devices_of(org) if d["state"] != "purged"}
            finally:
                store.close()
            exact = mirrored == {d["id"]: d for d in world.ground_truth(org)}
        finally:
            drop_database(db, None)
        throttled = sum(1 for r in log if r.status == 429)
        print(
            f"  {label}, {tree_label}: {len(log) / seconds:,.0f} requests/s ({len(log):,} requests, "
            f"{throttled} answered 429, {seconds:.1f} s); mirror exact: {'yes' if exact else 'NO'}",
            flush=True,
        )


def longest_pass(db: str) -> float:
    """Seconds of the longest pass of the newest run-once."""
    from sqlalchemy import func, select

    from syncd.store import Store
    from syncd.store.schema import sync_runs

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            newest = conn.execute(select(func.max(sync_runs.c.id))).scalar_one()
            orgs = conn.execute(select(func.count(func.distinct(sync_runs.c.org_id)))).scalar_one()
            rows = conn.execute(
                select(sync_runs.c.started_at, sync_runs.c.finished_at).where(sync_runs.c.id > newest - orgs)
            ).all()
    finally:
        store.close()
    return float(max((r.finished_at - r.started_at).total_seconds() for r in rows))


def reference_child(url: str, workdir: Path, fetch_only: bool = False) -> Child:
    """bench/reference_loop.py as a child: fetch, parse and upsert into a fresh SQLite file, or fetch
    and parse only."""
    path = workdir / f"reference-{uuid.uuid4().hex[:6]}.db"
    script = str(Path(__file__).with_name("reference_loop.py"))
    try:
        return run_child([sys.executable, script, url, org_ids(1)[0], "--fetch-only" if fetch_only else str(path)])
    finally:
        path.unlink(missing_ok=True)


def loop_seconds(reference: Child) -> float:
    """The reference loop's own seconds, as it printed them (its start-up and imports left out)."""
    return float(reference.output.split()[-1])


@dataclass
class Ratios:
    """A scaling comparison's ratios, one per measurement: whole processes, and the passes' own
    seconds (sync_runs) against the reference loops' own (start-up left out on both sides)."""

    resyncs: list[float] = field(default_factory=list)
    resyncs_in_pass: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    firsts_in_pass: list[float] = field(default_factory=list)

    def add(
        self, resync: Child, resync_pass: float, fetched: Child, first: Child, first_pass: float, reference: Child
    ) -> None:
        """One measurement of each comparison."""
        self.resyncs.append(resync.seconds / fetched.seconds)
        self.resyncs_in_pass.append(resync_pass / loop_seconds(fetched))
        self.firsts.append(first.seconds / reference.seconds)
        self.firsts_in_pass.append(first_pass / loop_seconds(reference))

    def line(self, kind: str, size: int) -> str:
        """The medians, each with what it is the median of."""

        def summary(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}x ({', '.join(f'{r:.2f}' for r in values)})"

        return (
            f"{kind} 1 x {size:,}: re-sync / fetch and parse {summary(self.resyncs)} (target <= 1.2), "
            f"the pass / the loop alone {summary(self.resyncs_in_pass)}; first sync of the devices / reference "
            f"loop {summary(self.firsts)} (target <= 1.5), the pass / the loop alone {summary(self.firsts_in_pass)}"
        )


SCALING_HEADER = f"  {'case':<44} {'seconds':>8} {'devices/s':>10} {'peak RSS MB':>11} {'longest org s':>13}"


def scaling_line(case: str, child: Child, devices: int, longest: float | None = None) -> None:
    longest_text = f"{longest:>13.2f}" if longest is not None else f"{'':>13}"
    print(
        f"  {case:<44} {child.seconds:>8.2f} {devices / child.seconds:>10,.0f} {child.rss_mb:>11.0f} {longest_text}",
        flush=True,
    )


def ratio_pairs(workdir: Path, url: str, kind: str, pg_url: str | None, pairs: int, ratios: Ratios) -> None:
    """``pairs`` alternated pairs of each comparison, every one whole processes: a no-change re-sync
    against fetching and parsing the same pages, and a first sync of the devices alone (on a fresh
    database) against the bare reference loop; added to ``ratios`` in the order measured."""
    resyncs: list[tuple[Child, float, Child]] = []
    db = fresh_database(kind, workdir, pg_url)
    try:
        write_config(workdir / "pairs.toml", url, db, 1, DEVICES_ONLY)
        run_once_child(workdir / "pairs.toml")
        for _ in range(pairs):
            fetched = reference_child(url, workdir, fetch_only=True)
            resync = run_once_child(workdir / "pairs.toml")
            resyncs.append((resync, longest_pass(db), fetched))
    finally:
        drop_database(db, pg_url)
    for resync, resync_pass, fetched in resyncs:
        reference = reference_child(url, workdir)
        db = fresh_database(kind, workdir, pg_url)
        try:
            write_config(workdir / "pairs.toml", url, db, 1, DEVICES_ONLY)
            first = run_once_child(workdir / "pairs.toml")
            ratios.add(resync, resync_pass, fetched, first, longest_pass(db), reference)
        finally:
            drop_database(db, pg_url)


def scaling_block(
    workdir: Path,
    kinds: list[str],
    pg_url: str | None,
    sizes: list[int],
    many_orgs: tuple[int, int] | None,
    pairs: int,
) -> None:
    """How cost grows (issue 21): 1 org x each of ``sizes`` on each database, first sync and no-change
    re-sync (also of the devices alone, which the loops mirror and the ratios use), every figure a child
    process's own (wall seconds, devices/s, peak RSS); the bare reference loop and a fetch-and-parse
    loop at the same sizes; ``many_orgs`` (orgs, devices each) with run-once's default concurrency,
    and its longest org; then the ratios, each the median of ``pairs`` alternated pairs (at the
    smallest size, where pairs are cheap; the single runs above otherwise)."""
    print(
        "\nscaling: whole `syncd run-once` processes (start-up included), one run each, "
        "2% portals unless 'devices only'",
        flush=True,
    )
    print(SCALING_HEADER)
    per_device: dict[tuple[str, int], float] = {}
    ratios: list[str] = []
    for size in sizes:
        sim, url = start_simulator(1, size)
        try:
            serve_rate(url, 1)  # render every device once before the measured runs
            fetched = reference_child(url, workdir, fetch_only=True)
            scaling_line(f"1 x {size:,} fetch and parse only (no database)", fetched, size)
            reference = reference_child(url, workdir)
            scaling_line(f"1 x {size:,} bare reference loop (SQLite)", reference, size)
            for kind in kinds:
                measured: dict[str, Child] = {}
                passes: dict[str, float] = {}  # the pass's own seconds (sync_runs)
                for labels, sync in (
                    (("first sync, devices only", "re-sync, devices only"), DEVICES_ONLY),
                    (("first sync", "re-sync"), ""),
                ):
                    db = fresh_database(kind, workdir, pg_url)
                    try:
                        write_config(workdir / "scaling.toml", url, db, 1, sync)
                        for label in labels:
                            measured[label] = run_once_child(workdir / "scaling.toml")
                            passes[label] = longest_pass(db)
                            scaling_line(f"1 x {size:,} {kind} {label}", measured[label], size)
                    finally:
                        drop_database(db, pg_url)
                per_device[(kind, size)] = measured["first sync"].seconds / size
                compared = Ratios()
                first, resync = "first sync, devices only", "re-sync, devices only"  # what the loops do
                compared.add(measured[resync], passes[resync], fetched, measured[first], passes[first], reference)
                if size == min(sizes) and pairs > 1:
                    ratio_pairs(workdir, url, kind, pg_url, pairs - 1, compared)
                ratios.append(compared.line(kind, size))
        finally:
            sim.terminate()
            sim.wait(timeout=60)
    if many_orgs:
        orgs, devices = many_orgs
        sim, url = start_simulator(orgs, devices)
        try:
            serve_rate(url, orgs)
            for kind in kinds:
                db = fresh_database(kind, workdir, pg_url)
                try:
                    write_config(workdir / "scaling.toml", url, db, orgs)  # sync.concurrency 4: run-once's default
                    for label in ("first sync", "re-sync"):
                        child = run_once_child(workdir / "scaling.toml")
                        scaling_line(f"{orgs:,} x {devices:,} {kind} {label}", child, orgs * devices, longest_pass(db))
                finally:
                    drop_database(db, pg_url)
        finally:
            sim.terminate()
            sim.wait(timeout=60)
    for line in ratios:
        print(f"  {line}")
    ordered = sorted(sizes)
    for kind in kinds:
        for small, large in itertools.pairwise(ordered):
            growth = per_device[(kind, large)] / per_device[(kind, small)]
            print(
                f"  {kind}: time per device of a first sync, 1 x {large:,} / 1 x {small:,}: {growth:.2f}x "
                "(target <= 1.2 from 100,000 to 1,000,000)"
            )


def portal_block(workdir: Path, kinds: list[str], pg_url: str | None, devices: int, shares: list[float]) -> None:
    """The detail phase at each share of portals: a first sync of 1 org with door restrictions on,
    its restriction reads timed from the simulator's request log (first sent to last answered:
    requests per second), and syncd's CPU per portal against a first sync with them off (fresh
    databases)."""
    from syncd.simulator import Simulator, World

    print(f"\nportals: first sync of 1 x {devices:,}, door restrictions off, then on", flush=True)
    for share in shares:
        world = World(seed=14)
        world.seed(1, devices, portal_fraction=share)
        world.add_key(KEY)
        with Simulator(world, log_size=1_000_000) as sim:
            serve_rate(sim.url, 1)
            for kind in kinds:
                measured: dict[bool, Child] = {}
                for restrictions in (False, True):
                    db = fresh_database(kind, workdir, pg_url)
                    try:
                        config = workdir / "portals.toml"
                        write_config(config, sim.url, db, 1, f"door_restrictions = {str(restrictions).lower()}\n")
                        sim.log.clear()
                        measured[restrictions] = run_once_child(config)
                        reads = sim.requests("get_door_restrictions")
                    finally:
                        drop_database(db, pg_url)
                off, on = measured[False], measured[True]
                phase = max(r.finished for r in reads) - min(r.started for r in reads) if reads else 0.0
                print(
                    f"  {share:.0%} portals, {kind}: first sync {off.seconds:.2f} s -> {on.seconds:.2f} s; "
                    f"{len(reads):,} restriction reads in {phase:.2f} s: {len(reads) / max(phase, 1e-3):,.0f} "
                    f"requests/s in the detail phase, {(on.cpu - off.cpu) / max(len(reads), 1) * 1000:.2f} ms "
                    "of syncd's CPU per portal",
                    flush=True,
                )


STORM_SECONDS = 2.5


def storm_rate(log: list[Any], began: float | None) -> tuple[float, int, int]:
    """Requests per second that met the storm (every one is answered 429), the ones of its first half
    second (sent before syncd could hear of it) and after."""
    if began is None:
        return 0.0, 0, 0
    during = [r.started - began for r in log if r.status == 429]
    onset = sum(1 for offset in during if offset < 0.5)
    return len(during) / STORM_SECONDS, onset, len(during) - onset


def storm_block(workdir: Path, trees: list[tuple[str, Path | None]], devices: int, repeat: int) -> None:
    """A 2.5 s storm of 429s (Retry-After: 1, every request) in the middle of a first sync of 1 org
    on SQLite (`syncd run-once`, pages and door restrictions): requests per second that met it, for
    each tree's syncd (alternated), beside a single sequential client in the same storm."""
    from syncd.simulator import Fault, Simulator, World

    print(
        f"\n429 storm: {STORM_SECONDS:g} s of 429s (Retry-After 1) from the 40th request of a first sync, "
        f"1 org x {devices:,} devices, SQLite (target <= 2 requests/s)",
        flush=True,
    )
    world = World(seed=13)
    (org,) = world.seed(1, devices, portal_fraction=0.02)
    world.add_key(KEY)
    rates: dict[str, list[tuple[float, int, int]]] = {}
    with Simulator(world, log_size=1_000_000) as sim:
        serve_rate(sim.url, 1)  # render every device once before the measured runs
        with httpx.Client(base_url=sim.url, headers={"X-API-Key": KEY, "X-Org": org}) as client:
            storm = sim.inject(Fault(status=429, retry_after="1", times=None, duration=STORM_SECONDS))
            sim.log.clear()
            while client.get("/devices", params={"limit": PAGE}).status_code == 429:
                time.sleep(1.0)  # a sequential client that honours Retry-After
            rates["a single sequential client"] = [storm_rate(list(sim.log), storm.first_fired_at)]
            sim.clear_faults()
        for _ in range(repeat):
            for label, tree in trees:
                db = fresh_database("sqlite", workdir, None)
                try:
                    config = workdir / "storm.toml"
                    write_config(
                        config, sim.url, db, 1, api="[api.retry]\nmax_attempts = 20\ndeadline = 600\n", tree=tree
                    )
                    storm = sim.inject(Fault(status=429, retry_after="1", times=None, skip=40, duration=STORM_SECONDS))
                    sim.log.clear()
                    run_once_child(config, tree)
                    rates.setdefault(label, []).append(storm_rate(list(sim.log), storm.first_fired_at))
                    sim.clear_faults()
                finally:
                    drop_database(db, None)
    for label, measured in rates.items():
        rate, onset, after = sorted(measured)[len(measured) // 2]
        print(
            f"  {label}: {rate:.1f} requests/s during the storm, {after / (STORM_SECONDS - 0.5):.1f} after its "
            f"first 0.5 s ({onset} requests in it, sent before the storm could be heard of; {after} after; "
            f"median of {len(measured)}: {', '.join(f'{m[0]:.1f}' for m in measured)})",
            flush=True,
        )


# Write-back: what each kind needs of the simulator, which mirrored devices it edits, and its payload.
EDIT_KINDS: dict[str, tuple[list[str], str, Any]] = {
    "update": ([], "active", lambda device_id: {"name": {"en": f"Bench {device_id[-6:]}"}}),
    "delete": ([], "active", lambda device_id: None),
    "restore": (["--deleted-fraction", "0.6"], "deleted", lambda device_id: None),
    "door_restrictions": (
        ["--portal-fraction", "0.8"],
        "portal",
        # A whole list: add / remove never turn an unrestricted portal (a third of the simulator's) into a
        # restricted one. The mirror holds no lists here, so no base: no conflict either.
        lambda device_id: {"entity_ids": [f"01HBENCH{device_id[-18:]}"]},
    ),
}
EDIT_CONDITIONS = {
    "no faults": [],
    "10% answered 429": ["--rate-limit-rate", "0.1", "--retry-after", "1"],
    "20% of writes' answers lost": ["--lost-rate", "0.2"],
}


def http_requests() -> float:
    """Every HTTP request this process has made (all operations, all outcomes)."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "syncd_http_requests"
        for sample in metric.samples
        if sample.name == "syncd_http_requests_total"
    )


def edits_scenario(workdir: Path, action: str, condition: str, count: int) -> dict[str, float]:
    """Mirror a simulated org, queue ``count`` edits of one kind and time the reconciler (in this
    process) until none is left to do; requests per edit counts every request of the reconciler."""
    from syncd.api import OpenAppClient
    from syncd.config import ApiSettings, Config, DatabaseSettings, OrgSettings, Secret, SyncSettings, WritebackSettings
    from syncd.edits import queue_edit
    from syncd.passes import writeback_client
    from syncd.reconcile import Reconciler
    from syncd.store import Store
    from syncd.store.edits import EditQueue
    from syncd.sync import OrgPass, PassOptions

    simulator_args, wanted, payload = EDIT_KINDS[action]
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd", "simulate", "--port", "0", "--orgs", "1", "--devices", str(count * 2)]
        + simulator_args
        + EDIT_CONDITIONS[condition],
        env={**os.environ, "SYNCD_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = re.search(r"serving (\S+)", proc.stdout.readline())
    assert url
    org = org_ids(1)[0]
    config = Config(
        api=ApiSettings(base_url=url.group(1), api_key=Secret(KEY)),
        database=DatabaseSettings(url=f"sqlite:///{workdir}/edits-{uuid.uuid4().hex[:6]}.db"),
        orgs=(OrgSettings(org),),
    )
    store = Store(config.database.url)
    try:
        store.upgrade()
        # The mirror, before the clock starts (the devices only: with 429s, asking 1,600 portals for
        # their restrictions one Retry-After at a time would take minutes; the edits read them anyway).
        with OpenAppClient(config.api) as client:
            OrgPass(client, store, PassOptions(OrgSettings(org), SyncSettings(door_restrictions=False))).run()

        def chosen(device: dict[str, Any]) -> bool:
            if wanted == "portal":
                metadata = device["device_metadata"] or {}
                return device["state"] == "active" and metadata.get("kind") == "virtual_access_portal"
            return bool(device["state"] == wanted)

        devices = [d["id"] for d in store.devices_of(org) if chosen(d)][:count]
        if len(devices) < count:
            raise SystemExit(f"the simulator holds only {len(devices)} devices to {action}, not {count}")
        for device_id in devices:
            queue_edit(store, device_id, action, payload(device_id), "bench", {org})
        settings = replace(WritebackSettings(), max_attempts=20, batch_size=100, max_deletes_per_hour=count)
        before = http_requests()
        with writeback_client(config) as client:
            reconciler = Reconciler(client, store, settings, "bench", {org})
            started = time.perf_counter()
            while True:
                reconciler.run_once()
                left = EditQueue(store).counts()
                if not left.get("pending") and not left.get("in_flight"):
                    break
                time.sleep(0.05)
            seconds = time.perf_counter() - started
        counts = EditQueue(store).counts()
        done = counts.get("succeeded", 0)
        return {
            "edits": done,
            "seconds": seconds,
            "rate": done / seconds,
            "per_edit": (http_requests() - before) / max(done, 1),
            "conflicts": counts.get("conflict", 0),
            "failed": counts.get("failed", 0),
        }
    finally:
        store.close()
        proc.terminate()
        proc.wait(timeout=30)


def edits_block(workdir: Path, count: int) -> None:
    """Every kind under every condition; a table, then the targets for lost answers."""
    print(f"\nwrite-back, {count:,} edits per kind and condition (reconciler in this process, SQLite)")
    print(
        f"{'kind':<18} {'condition':<28} {'edits/s':>8} {'seconds':>8} {'requests/edit':>13} "
        f"{'conflicts':>9} {'failed':>6}"
    )
    worst_lost, lost_conflicts = 0.0, 0
    for action in EDIT_KINDS:
        for condition in EDIT_CONDITIONS:
            r = edits_scenario(workdir, action, condition, count)
            print(
                f"{action:<18} {condition:<28} {r['rate']:>8,.0f} {r['seconds']:>8.2f} {r['per_edit']:>13.2f} "
                f"{r['conflicts']:>9.0f} {r['failed']:>6.0f}",
                flush=True,
            )
            if "lost" in condition:
                worst_lost = max(worst_lost, r["per_edit"])
                lost_conflicts += int(r["conflicts"])
    print(
        f"lost answers: at most {worst_lost:.2f} requests per edit (target <= 2.5), "
        f"{lost_conflicts} conflicts (target 0)",
        flush=True,
    )


def sizes_option(text: str) -> list[int]:
    """--sizes: comma-separated device counts."""
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of device counts: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"device counts must be positive: {text!r}")
    return sizes


def shape_option(text: str) -> tuple[int, int] | None:
    """--many-orgs: ORGSxDEVICES, or none."""
    if text.lower() == "none":
        return None
    found = re.fullmatch(r"([0-9_]+)x([0-9_]+)", text)
    if not found or not int(found.group(1)) or not int(found.group(2)):
        raise argparse.ArgumentTypeError(f"not ORGSxDEVICES (e.g. 1000x1000) or none: {text!r}")
    return int(found.group(1)), int(found.group(2))


def daemon_shape_option(text: str) -> tuple[int, int]:
    """--daemon-orgs: ORGSxDEVICES."""
    shape = shape_option(text)
    if shape is None:
        raise argparse.ArgumentTypeError("the daemons block needs a world: ORGSxDEVICES, e.g. 1000x100")
    return shape


def daemons_shape(args: argparse.Namespace) -> DaemonsShape:
    orgs, devices = args.daemon_orgs
    if args.daemons < 1 or args.daemon_concurrency < 1:
        raise SystemExit("--daemons and --daemon-concurrency must be at least 1")
    if args.daemon_interval < 1 or args.daemon_steady <= 0 or args.daemon_latency_ms < 0:
        raise SystemExit(
            "--daemon-interval is at least 1 (sync.interval's minimum), --daemon-steady positive, "
            "--daemon-latency-ms not negative"
        )
    return DaemonsShape(
        orgs,
        devices,
        args.daemon_interval,
        args.daemon_steady,
        args.daemon_latency_ms,
        args.daemons,
        args.daemon_concurrency,
        args.daemon_kill,
    )


def shares_option(text: str) -> list[float]:
    """--portal-shares: comma-separated fractions."""
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of fractions: {text!r}") from None
    if not all(0 < share <= 1 for share in shares):
        raise argparse.ArgumentTypeError(f"shares of portals lie in (0, 1]: {text!r}")
    return shares


def compile_bytecode(tree: Path) -> None:
    """Compile ``tree``'s syncd package to bytecode, as `pip install` does: where
    PYTHONDONTWRITEBYTECODE is set, every child would otherwise compile syncd's modules again (about
    0.2 s a process), while the reference loop's libraries come compiled from site-packages."""
    if (tree / "syncd").is_dir():
        compileall.compile_dir(tree / "syncd", quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default=os.environ.get("SYNCD_BENCH_POSTGRES_URL"))
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="run only the scaling block: 1 org x each of --sizes, --many-orgs, on every database (issue 21)",
    )
    parser.add_argument(
        "--sizes",
        type=sizes_option,
        default=[10_000, 100_000, 1_000_000],
        help="devices of the one org in the scaling block, comma-separated (default 10000,100000,1000000)",
    )
    parser.add_argument(
        "--many-orgs",
        type=shape_option,
        default=(1000, 1000),
        metavar="ORGSxDEVICES",
        help="the scaling block's many-orgs shape (default 1000x1000; 'none' to skip)",
    )
    parser.add_argument(
        "--portal-shares",
        type=shares_option,
        default=[],
        help="with --scaling: also the detail phase at these shares of portals, e.g. 0.02,0.2",
    )
    parser.add_argument(
        "--portal-devices", type=int, default=100_000, help="devices of the org in the portal block (100000)"
    )
    parser.add_argument(
        "--only-storm",
        action="store_true",
        help="run only the 429 cases: the storm, then 20%% of requests answered 429",
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="another checkout of syncd (e.g. main before a change) whose syncd the storm case also runs",
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, to try the script")
    parser.add_argument("--only-edits", action="store_true", help="run only the write-back part")
    parser.add_argument("--only-restrictions", action="store_true", help="run only the door-restrictions comparison")
    parser.add_argument(
        "--only-latency", action="store_true", help="run only the latency and 429 blocks (and the reference loop)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=50.0,
        help="latency the simulator adds to every request in the latency block, against 0 (default 50)",
    )
    parser.add_argument(
        "--latency-devices",
        type=sizes_option,
        default=None,
        help="devices of the org in the latency block, comma-separated (default 100000)",
    )
    parser.add_argument("--only-daemons", action="store_true", help="run only the daemons block (needs --postgres-url)")
    parser.add_argument(
        "--daemon-orgs",
        type=daemon_shape_option,
        default=(DaemonsShape.orgs, DaemonsShape.devices),
        metavar="ORGSxDEVICES",
        help="the daemons block's world (default 30x250)",
    )
    parser.add_argument(
        "--daemons", type=int, default=DaemonsShape.daemons, help="`syncd run` daemons in the daemons block (3)"
    )
    parser.add_argument(
        "--daemon-interval", type=float, default=DaemonsShape.interval, help="their sync.interval in seconds (4)"
    )
    parser.add_argument(
        "--daemon-steady",
        type=float,
        default=DaemonsShape.steady,
        help="seconds of the steady window measured after every org's first sync (24)",
    )
    parser.add_argument(
        "--daemon-concurrency", type=int, default=DaemonsShape.concurrency, help="their sync.concurrency (4)"
    )
    parser.add_argument(
        "--daemon-latency-ms",
        type=float,
        default=DaemonsShape.latency_ms,
        help="latency the simulator adds to every request in the daemons block (default 0)",
    )
    parser.add_argument(
        "--daemon-kill",
        action=argparse.BooleanOptionalAction,
        help=f"SIGKILL a daemon after the steady window, time the takeover (default: up to {KILL_UP_TO:,} devices)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per sync figure; the median run is reported (default 3)"
    )
    args = parser.parse_args()
    from syncd import logs

    logs.configure("json", "warning")  # the write-back part runs in this process
    print(f"Python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs, --repeat {args.repeat}")
    scale = 10 if args.quick else 1
    shapes = [(1, 100_000 // scale), (10, 10_000 // scale)]
    kinds = ["sqlite"] + (["postgresql"] if args.postgres_url else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.compare_tree:
            trees.insert(0, (str(args.compare_tree), args.compare_tree.resolve()))
        for _, tree in trees:
            compile_bytecode(tree or Path.cwd())  # where `python -m syncd` children import it from
        if args.only_storm:
            storm_block(Path(tmp), trees, 20_000 // scale, args.repeat)
            throttled_block(Path(tmp), trees)
            return
        if args.scaling:
            scaling_block(Path(tmp), kinds, args.postgres_url, args.sizes, args.many_orgs, args.repeat)
            if args.portal_shares:
                portal_block(Path(tmp), kinds, args.postgres_url, args.portal_devices, args.portal_shares)
            return
        if args.postgres_url and not (args.only_edits or args.only_restrictions or args.only_latency):
            daemons_block(Path(tmp), args.postgres_url, daemons_shape(args))
        if args.only_daemons:
            return
        if not (args.only_edits or args.only_restrictions):
            for devices in args.latency_devices or [100_000 // scale]:
                latency_block(Path(tmp), devices, args.repeat, args.latency_ms)
            throttled_block(Path(tmp), trees)
            storm_block(Path(tmp), trees, 20_000 // scale, args.repeat)
        if args.only_latency:
            return
        if not args.only_edits:
            for kind in kinds:
                restrictions_scenario(kind, Path(tmp), args.postgres_url, args.repeat, 100_000 // scale)
        if args.only_restrictions:
            return
        edits_block(Path(tmp), 1000 // scale)
        if args.only_edits:
            return
        for kind in kinds:
            for orgs, devices in shapes:
                rows.append(scenario(kind, orgs, devices, Path(tmp), args.postgres_url, args.repeat))
                print_row(rows[-1], flush=True)
    print()
    summarise(rows)
    print(f"(bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


HEADER = (
    f"{'db':<10} {'shape':<12} {'pass':<7} {'seconds':>8} {'devices/s':>10} {'in-pass dev/s':>13} {'requests':>9} "
    f"{'written':>8} {'peak RSS MB':>11} {'sim serves dev/s':>16}"
)


def print_row(row: dict[str, object], flush: bool = False) -> None:
    if not getattr(print_row, "headed", False):
        print(HEADER)
        print_row.headed = True  # type: ignore[attr-defined]
    for label in ("first", "resync"):
        m = row[label]
        assert isinstance(m, Measure)
        print(
            f"{row['db']:<10} {row['shape']:<12} {label:<7} {m.seconds:>8.2f} {m.rate:>10,.0f} "
            f"{m.in_pass_rate:>13,.0f} {m.requests:>9,} "
            f"{m.written:>8,} {m.rss_mb:>11.0f} {row['served']:>16,.0f}",
            flush=flush,
        )


def summarise(rows: list[dict[str, object]]) -> None:
    def find(db: str, shape: str) -> dict[str, object] | None:
        return next((r for r in rows if r["db"] == db and r["shape"] == shape), None)

    for row in rows:
        first, resync = row["first"], row["resync"]
        assert isinstance(first, Measure) and isinstance(resync, Measure)
        served = row["served"]
        assert isinstance(served, float)
        print(
            f"{row['db']} {row['shape']}: first {first.rate:,.0f} dev/s, {first.in_pass_rate:,.0f} in-pass "
            "(target >= 20,000), "
            f"re-sync {resync.rate:,.0f} dev/s, {resync.in_pass_rate:,.0f} in-pass (target >= 40,000) "
            f"writing {resync.written} rows; "
            f"simulator headroom {served / first.rate:.1f}x first, {served / resync.rate:.1f}x re-sync"
        )
    for row in rows:
        if row["db"] != "postgresql":
            continue
        lite = find("sqlite", str(row["shape"]))
        if lite:
            for label in ("first", "resync"):
                pg, sq = row[label], lite[label]
                assert isinstance(pg, Measure) and isinstance(sq, Measure)
                print(
                    f"PostgreSQL/SQLite time ratio {row['shape']} {label}: {pg.seconds / sq.seconds:.2f} (target <= 2)"
                )


if __name__ == "__main__":
    main()
