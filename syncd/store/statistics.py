"""Planner statistics of the tables a pass fills, kept by the store itself (PostgreSQL).

A first sync fills tables from empty faster than autovacuum analyzes them (and autovacuum may be
off). Without statistics PostgreSQL guesses that a lookup of a batch of portals' rows in
door_restrictions or door_access_intervals matches a quarter of the table, and reads all of it:
every batch then costs the table's size, and a first sync grows with the square of its portals
(100,000 devices with 20% portals: 177 ms a batch of 50 answers, 2.3x SQLite's pass).

So the store analyzes a table whenever the rows this process inserted into it since its last
ANALYZE reach the rows it had then (at least :data:`MIN_ROWS`): a table growing from empty to n
rows is analyzed about log2(n / MIN_ROWS) times, each a sample of at most 30,000 rows. The ANALYZE
runs after the write's commit, on the same connection, with a short lock timeout: it never waits
for a VACUUM or another daemon's ANALYZE of the same table (it is tried again later).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from syncd.store.dialect import Dialect

MIN_ROWS = 1_000
LOCK_TIMEOUT_MS = 100


class PlannerStatistics:
    """When to ANALYZE which table, from the rows inserted by this process; thread-safe."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._lock = threading.Lock()
        self._inserted: Counter[str] = Counter()  # rows inserted since the table's last ANALYZE
        self._threshold: dict[str, float] = {}  # its rows then (read from pg_class when first needed)
        self.analyzed: Counter[str] = Counter()  # ANALYZEs run, by table (for tests and the curious)

    def after_commit(self, conn: Connection, inserted: Mapping[str, int]) -> None:
        """Count a committed write's inserted rows; ANALYZE the tables that grew enough. A database
        error here is not the write's: it is left for the next time (``conn`` stays usable)."""
        if not inserted:
            return
        with self._lock:
            self._inserted.update(inserted)
            grown = [table for table, rows in self._inserted.items() if rows >= MIN_ROWS]
        for table in grown:
            try:
                self._maybe_analyze(conn, table)
            except SQLAlchemyError:  # its transaction was rolled back
                with self._lock:  # tried again once as many rows more were inserted
                    self._threshold[table] = 2 * max(self._threshold.get(table, MIN_ROWS), MIN_ROWS)

    def _maybe_analyze(self, conn: Connection, table: str) -> None:
        with self._lock:
            threshold = self._threshold.get(table)
        if threshold is None:
            threshold = self._rows(conn, table)
        with self._lock:
            self._threshold[table] = threshold
            if self._inserted[table] < threshold:
                return
            self._inserted[table] = 0  # a thread at a time analyzes a table
        with conn.begin():
            self._dialect.analyze(conn, table, LOCK_TIMEOUT_MS)
        rows = self._rows(conn, table)
        with self._lock:
            self._threshold[table] = rows
            self.analyzed[table] += 1

    def _rows(self, conn: Connection, table: str) -> float:
        """The table's rows as of its last ANALYZE (at least MIN_ROWS; MIN_ROWS if never analyzed)."""
        with conn.begin():
            rows = self._dialect.analyzed_rows(conn, table)
        return max(rows or 0.0, MIN_ROWS)
