"""``syncd simulate`` (the built-in OpenApp simulator) and ``syncd demo`` (a mirror of it, no setup)."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from syncd.api import OpenAppClient
from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_command,
    configure_logging,
    count,
    fraction,
    latency,
    port,
    prepared_store,
)
from syncd.cli.output import print_door_restrictions, print_state_counts, print_summary
from syncd.cli.run import run_passes
from syncd.cli.signals import stop_on_signals
from syncd.config import ApiSettings, Config, DatabaseSettings, OrgSettings, Secret
from syncd.errors import ConfigError, SyncdError
from syncd.store import Store
from syncd.vocab import PassStatus


def add_commands(commands: Commands) -> None:
    """``simulate`` and ``demo``."""
    p = add_command(
        commands,
        "simulate",
        "serve the built-in OpenApp simulator on loopback",
        "Serve the built-in OpenApp simulator (the Devices API, and GET /status) on 127.0.0.1 until Ctrl-C, "
        "with generated orgs and devices, accepting the key in $SYNCD_API_KEY. Faults can be injected (errors, "
        "rate limits, resets, lost answers, latency). The official SDK works against it given a key of its "
        "form, ORIGIN_openapp_SECRET, whose origin is the simulator's.",
        "SYNCD_API_KEY=http://127.0.0.1:8765_openapp_dev-secret syncd simulate --orgs 2 --devices 5000",
        "SYNCD_API_KEY=k syncd simulate --port 0 --error-rate 0.05 --latency-ms 50",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--orgs", type=count, default=1, help="organisations to seed (default 1)")
    p.add_argument("--devices", type=count, default=1000, help="devices per org (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the generated data (default 1)")
    p.add_argument("--deleted-fraction", type=fraction, default=0.05, help="share seeded soft-deleted (0.05)")
    p.add_argument(
        "--portal-fraction", type=fraction, default=0.02, help="share of devices that are door portals (0.02)"
    )
    p.add_argument(
        "--api-key-env",
        default="SYNCD_API_KEY",
        metavar="NAME",
        help="environment variable holding the key to accept (default SYNCD_API_KEY)",
    )
    p.add_argument(
        "--name-style",
        choices=("value", "map", "string", "mixed"),
        default="value",
        help="how names are rendered: the spec's {value:{...}}, a plain map, a string, or mixed",
    )
    p.add_argument(
        "--timestamps",
        choices=("top", "metadata", "both"),
        default="both",
        help="where lifecycle timestamps appear (default both)",
    )
    p.add_argument(
        "--credentials-set",
        choices=("list", "bool"),
        default="list",
        help="credentials_set as the SDK's JSON Pointers (default) or an older payload's boolean",
    )
    p.add_argument(
        "--restrictions-key",
        choices=("apartment_entity_ids", "listing_entity_ids"),
        default="listing_entity_ids",
        help="door-restrictions body key: the official SDK's models' (default) or the public spec's; "
        "syncd reads either",
    )
    p.add_argument(
        "--strict-query",
        action="store_true",
        help="answer 400 when list/get lack include_deleted/only_deleted/include_metadata (the spec's 'required')",
    )
    p.add_argument("--error-rate", type=fraction, default=0.0, help="fraction of requests answered 503")
    p.add_argument("--rate-limit-rate", type=fraction, default=0.0, help="fraction of requests answered 429")
    p.add_argument("--retry-after", default="1", help="Retry-After sent with injected 429s (default 1)")
    p.add_argument("--reset-rate", type=fraction, default=0.0, help="fraction of connections reset")
    p.add_argument(
        "--lost-rate",
        type=fraction,
        default=0.0,
        help="fraction of writes (update, delete, restore, door restrictions) done but their answer lost (reset)",
    )
    p.add_argument("--latency-ms", type=latency, default=0.0, help="added latency per request in milliseconds")
    p.set_defaults(handler=cmd_simulate)

    p = add_command(
        commands,
        "demo",
        "mirror the built-in simulator into a SQLite file and report (no setup needed)",
        "Start the simulator on a free loopback port, mirror it into a SQLite file, change a few devices "
        "there (rename, soft delete, restore, purge, create, a door's restrictions), mirror again, and print "
        "what each pass saw. Needs no configuration file and no key.",
        "syncd demo",
        "syncd demo --db /tmp/demo.db --orgs 1 --devices 500",
    )
    p.add_argument("--db", default="syncd-demo.db", metavar="PATH", help="SQLite file (default syncd-demo.db)")
    p.add_argument("--orgs", type=count, default=3, help="organisations (default 3)")
    p.add_argument("--devices", type=count, default=2000, help="devices per org (default 2000)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.set_defaults(handler=cmd_demo)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve the simulator until SIGTERM/SIGINT."""
    from syncd.simulator import Fault, Simulator, World
    from syncd.simulator.server import LOOPBACK, WRITE_OPERATIONS

    configure_logging(args)
    key = os.environ.get(args.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"set the environment variable {args.api_key_env} to the API key the simulator accepts")
    if args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host}: the simulator binds loopback only (127.0.0.1, ::1, localhost)")
    world = World(
        seed=args.seed,
        name_style=args.name_style,
        timestamps=args.timestamps,
        credentials_style=args.credentials_set,
        restrictions_key=args.restrictions_key,
    )
    org_ids = world.seed(args.orgs, args.devices, args.deleted_fraction, args.portal_fraction)
    world.add_key(key)
    try:
        sim = Simulator(world, host=args.host, port=args.port, seed=args.seed, strict_query=args.strict_query)
    except OSError as exc:
        raise ConfigError(
            f"--port {args.port}: cannot listen on {args.host}:{args.port} ({exc.strerror}); "
            "another program may use it: pick another port, or 0 for a free one"
        ) from None
    sim.latency = args.latency_ms / 1000
    if args.error_rate:
        sim.inject(Fault(status=503, rate=args.error_rate, times=None))
    if args.rate_limit_rate:
        sim.inject(Fault(status=429, retry_after=args.retry_after, rate=args.rate_limit_rate, times=None))
    if args.reset_rate:
        sim.inject(Fault(kind="reset", rate=args.reset_rate, times=None))
    for operation in WRITE_OPERATIONS if args.lost_rate else ():
        sim.inject(Fault(kind="lost", operation=operation, rate=args.lost_rate, times=None))
    print(f"OpenApp simulator serving {sim.url}", flush=True)
    print(
        f"  {args.orgs} org(s) x {args.devices} devices: {', '.join(org_ids[:5])}"
        + (" ..." if len(org_ids) > 5 else ""),
        flush=True,
    )
    with stop_on_signals("stopping the simulator") as stop:

        def stop_when_signalled() -> None:
            stop.wait()
            sim.stop()

        threading.Thread(target=stop_when_signalled, daemon=True).start()
        sim.serve_forever()
    print(f"simulator stopped after {len(sim.log)} requests", flush=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Mirror a simulated OpenApp twice (with changes between) into a fresh SQLite file."""
    from syncd.simulator import Simulator, World

    configure_logging(args, level="warning")
    world = World(seed=args.seed, name_style="mixed")
    org_ids = world.seed(args.orgs, args.devices, portal_fraction=0.05)
    key = secrets.token_urlsafe(24)
    world.add_key(key)
    db = Path(args.db).resolve()
    print(f"syncd demo: the built-in OpenApp simulator ({args.orgs} orgs x {args.devices} devices) -> {db}")
    if _start_afresh(db):
        print("(the mirror of an earlier demo there was replaced, so that pass 1 starts from nothing)")
    print()
    with Simulator(world) as sim:
        config = Config(
            api=ApiSettings(base_url=sim.url, api_key=Secret(key)),
            database=DatabaseSettings(url=f"sqlite:///{db}"),
            orgs=tuple(OrgSettings(org_id) for org_id in org_ids),
        )
        with prepared_store(config, create=True) as store:
            with (
                stop_on_signals("finishing the current page, then stopping") as stop,
                OpenAppClient(config.api, stop=stop) as client,
            ):
                print("Pass 1: full mirror")
                outcomes = run_passes(config, list(config.orgs), store, client, stop)
                print_summary(outcomes, sys.stdout)
                if not stop.is_set():  # stopped during pass 1: no second pass
                    _demo_changes(world, org_ids[0])
                    print(
                        f"\nOpenApp changed meanwhile (org {org_ids[0]}): 3 renamed, 2 soft-deleted, 1 restored, "
                        "1 purged, 2 created; one door portal was moved and who may open it changed.\n"
                        "Pass 2: only the changes are written (unchanged portals are asked again hourly)"
                    )
                    outcomes += run_passes(config, list(config.orgs), store, client, stop)
                    print_summary(outcomes[len(org_ids) :], sys.stdout)
            print("\nThe mirror now holds (devices by state):")
            print_state_counts(store.state_counts(), sys.stdout)
            print_door_restrictions(store, sys.stdout)
            print(f'\nQuery it yourself: sqlite3 {db} "SELECT change, count(*) FROM device_changes GROUP BY change"')
            print(f'                   sqlite3 {db} "SELECT * FROM portal_access LIMIT 10"')
    return EXIT_OK if all(o.status == PassStatus.SUCCEEDED for o in outcomes) else EXIT_FAILED


def _start_afresh(db: Path) -> bool:
    """Remove the mirror an earlier demo left at ``db``; True if there was one. Anything else there
    is refused: the demo never overwrites a mirror it did not make."""
    if not db.exists():
        return False
    try:
        previous = Store(f"sqlite:///{db}", read_only=True)
        try:
            orgs = set(previous.last_successes()) | set(previous.state_counts())
        finally:
            previous.close()
    except SyncdError:
        orgs = {"?"}
    from syncd.simulator.world import is_seeded_org

    if not all(is_seeded_org(org_id) for org_id in orgs):
        raise ConfigError(f"--db {db}: the file exists and is not a demo's mirror; name another file")
    for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(f"{db}.locks", ignore_errors=True)
    return True


def _demo_changes(world: Any, org_id: str) -> None:
    ids = world.ids(org_id)
    for device_id in ids[10:13]:
        world.update_device(org_id, device_id, {"name": {"en": f"Renamed {device_id[-4:]}"}})
    for device_id in ids[20:22]:
        world.delete_device(org_id, device_id)
    deleted = next(d["id"] for d in world.ground_truth(org_id) if d.get("deleted_at") and d["id"] not in ids[20:22])
    world.restore_device(org_id, deleted)
    world.purge_device(org_id, ids[30])
    world.create_device(org_id)
    world.create_device(org_id)
    portal = next(
        d
        for d in world.ground_truth(org_id)
        if d["device_metadata"]["kind"] == "virtual_access_portal" and not d["deleted_at"]
    )
    kept = world.orgs[org_id].devices[portal["id"]].restrictions[:1]
    world.set_door_restrictions(org_id, portal["id"], {"apartment_entity_ids": [*kept, "01HENTDEM0NEWTENANT0000000"]})
    world.update_device(org_id, portal["id"], {"name": {"en": "Lobby portal (moved)"}})
