#!/usr/bin/env python3
"""The bare minimum a mirror does, for bench_sync.py to measure syncd against: fetch every page of
one org's list_devices, parse it, upsert each device into SQLite. No history, no change detection,
no checks of any kind, one transaction per page, one page at a time. With --fetch-only instead of
a path: fetch and parse every page, no database (what a no-change re-sync cannot do without).
Prints the devices it saw and the loop's own seconds (from before its first request to after its
last write: the interpreter's start-up and the imports left out).

    SYNCD_API_KEY=... python bench/reference_loop.py BASE_URL ORG_ID (SQLITE_PATH | --fetch-only)
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import httpx
import orjson

PAGE = 200


def main() -> None:
    base_url, org_id, path = sys.argv[1:4]
    fetch_only = path == "--fetch-only"
    db = sqlite3.connect(":memory:" if fetch_only else path)
    db.execute("CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, org_id TEXT, name TEXT, raw TEXT)")
    upsert = (
        "INSERT INTO devices (id, org_id, name, raw) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET org_id = excluded.org_id, name = excluded.name, raw = excluded.raw"
    )
    params: dict[str, str | int] = {
        "include_deleted": "true",
        "only_deleted": "false",
        "include_metadata": "true",
        "limit": PAGE,
    }
    seen = 0
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, headers={"X-API-Key": os.environ["SYNCD_API_KEY"], "X-Org": org_id}) as client:
        offset = 0
        while True:
            items = orjson.loads(client.get("/devices", params={**params, "offset": offset}).content)
            if not fetch_only:
                with db:
                    db.executemany(
                        upsert, [(d["id"], d["org_id"], orjson.dumps(d["name"]), orjson.dumps(d)) for d in items]
                    )
            seen += len(items)
            offset += PAGE
            if len(items) < PAGE:
                break
    print(seen, f"{time.perf_counter() - started:.3f}")


if __name__ == "__main__":
    main()
