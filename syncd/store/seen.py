"""The ids a pass's scan took, out of the pass's memory and off its thread.

Purge detection needs every id the scan took (the org's live mirrored devices it did not take are the
candidates), and so do the distinct count and the duplicates across pages. A Python set of them costs
about 175 bytes a device, linear in the org's size; :class:`SeenIds` keeps them in a private SQLite
database on disk instead (``sqlite3.connect("")``: a temporary file, deleted when it closes), whose
page cache is bounded, so a pass's memory does not grow with its org.

Inserting ids in no particular order into a B-tree costs a few microseconds each, about 1 ms a page:
on the pass's thread that would add a quarter to a no-change re-sync. So one thread of its own
inserts them, in SQLite's C code, where the GIL is released, while the pass goes on parsing the next
page; the pass hands each page's ids over and only waits at the end (:meth:`SeenIds.settle`), or when
the thread has fallen :data:`BACKLOG` pages behind. The price: a device listed again on a later page
is compared again (its later copy is the newer listing); it is counted once, and its repeats are
reported by :meth:`settle`.

This is not the mirror: it uses the standard library's ``sqlite3`` directly, whatever the mirror's database.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import orjson

from syncd.errors import StoreError

BACKLOG = 32  # pages handed over and not yet inserted, at most (then the pass waits)
BATCH = 5000  # ids a stream is checked in at a time (see SeenIds.unseen)
CACHE_KIB = 4096  # the scratch database's page cache
MAX_REPEATS_KEPT = 20  # repeated ids kept for the log; all are counted

T = TypeVar("T")


@dataclass(frozen=True)
class Settled:
    """What the scan took, once every page handed over is in: ``distinct`` ids, and ``repeats``: how
    many were handed over again (listed on more than one page), the first few by id in ``repeated``."""

    distinct: int
    repeats: int
    repeated: tuple[str, ...]


class SeenIds:
    """A pass's set of seen ids (see the module docstring). Use as a context manager; :meth:`add` a
    page's ids (each once within the page), then :meth:`settle`, :meth:`among`, :meth:`unseen`."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-seen")
        self._pending: deque[Future[int]] = deque()
        self._db: sqlite3.Connection | None = None
        self._pages = 0
        self._distinct = 0
        self._repeats = 0
        self._repeated: list[str] = []
        self._closed = False

    def __enter__(self) -> SeenIds:
        self._call(self._open)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the thread, then close (and so delete) the scratch database; once."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._worker.submit(self._close)
        self._worker.shutdown(wait=True)

    def add(self, ids: Collection[str]) -> None:
        """Hand a page's ids over (each once; the thread inserts them while the caller goes on)."""
        if not ids:
            return
        self._pages += 1
        self._pending.append(self._worker.submit(self._insert, orjson.dumps(list(ids)), len(ids), self._pages))
        while len(self._pending) > BACKLOG:
            self._collect(self._pending.popleft())

    def settle(self) -> Settled:
        """Wait until every id handed over is in; how many distinct ids, and repeats."""
        while self._pending:
            self._collect(self._pending.popleft())
        return Settled(self._distinct, self._repeats, tuple(self._repeated))

    def among(self, ids: Collection[str]) -> set[str]:
        """Those of ``ids`` handed over so far."""
        self.settle()
        wanted = list(ids)
        return {wanted[i] for i in self._call(self._select, orjson.dumps(wanted), True)} if wanted else set()

    def unseen(self, ids: Iterable[str]) -> Iterator[str]:
        """Those of ``ids`` (a stream, read :data:`BATCH` at a time) never handed over."""
        self.settle()
        stream = iter(ids)
        while batch := list(islice(stream, BATCH)):
            yield from (batch[i] for i in self._call(self._select, orjson.dumps(batch), False))

    # -- on the thread ------------------------------------------------------------------------------

    def _call(self, function: Callable[..., T], *args: object) -> T:
        return self._collect(self._worker.submit(function, *args))

    def _collect(self, future: Future[T]) -> T:
        try:
            return future.result()
        except sqlite3.Error as exc:
            raise StoreError(f"keeping the ids a pass saw: {exc}") from exc

    def _open(self) -> None:
        db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        db.execute("PRAGMA journal_mode = OFF")  # a scratch file: nothing to recover after a crash
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, page INTEGER NOT NULL) WITHOUT ROWID")
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, ids: bytes, handed: int, page: int) -> int:
        assert self._db is not None
        # One statement for the page: its rows are stepped through in SQLite's C code, GIL released.
        cursor = self._db.execute(
            "INSERT INTO seen (id, page) SELECT value, ? FROM json_each(?) WHERE true ON CONFLICT DO NOTHING",
            (page, ids),
        )
        inserted = cursor.rowcount
        if inserted < handed:  # listed on an earlier page too: which ones (rare, so asked only then)
            repeated = self._db.execute(
                "SELECT seen.id FROM json_each(?) AS page_ids JOIN seen ON seen.id = page_ids.value "
                "WHERE seen.page < ?",
                (ids, page),
            ).fetchall()
            self._repeats += handed - inserted
            room = MAX_REPEATS_KEPT - len(self._repeated)
            self._repeated.extend(row[0] for row in repeated[: max(room, 0)])
        self._distinct += inserted
        return inserted

    def _select(self, ids: bytes, seen: bool) -> list[int]:
        """Positions in ``ids`` (a JSON array) of those handed over (``seen``) or not."""
        assert self._db is not None
        condition = "IN" if seen else "NOT IN"
        rows = self._db.execute(
            f"SELECT key FROM json_each(?) WHERE value {condition} (SELECT id FROM seen) ORDER BY key", (ids,)
        ).fetchall()
        return [row[0] for row in rows]
