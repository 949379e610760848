"""What a pass writes, each page in one transaction: its devices, their history rows, the run's counters."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from syncd.models import Device, HistoryRow, utcnow
from syncd.store import Session
from syncd.sync.history import History
from syncd.sync.unchanged import UnchangedPages


@dataclass
class PreparedPage:
    """Everything one page writes, decided; committed by :class:`PageWrites` in one transaction."""

    run_id: int
    now: datetime
    inserts: list[Device]
    updates: list[Device]
    refreshes: list[Device]  # same content, new serialisation: payload and fingerprint only
    touches: list[str]
    changes: list[HistoryRow]
    counts: Counter[str]
    alone: bool = False  # a device confirmed on its own, not a list page: retires the org's recorded pages


class PageWrites:
    """Commits a pass's prepared pages, each in one transaction, as they come.

    (On the pass's own thread: a writer thread overlapped too little with the GIL held by
    parsing to pay for its hand-overs; bench/bench_sync.py measured it slower on both databases.)

    A page that changes no device (the usual page of a re-sync) only moves the run's counters.
    Those are held back and committed with the next page that writes devices or comes
    ``progress_interval`` seconds after the last commit, and by :meth:`flush`. So the counters of
    a running pass lag a little, and a page's devices and counters still commit together.
    """

    def __init__(self, session: Session, unchanged: UnchangedPages, progress_interval: float = 1.0) -> None:
        """``unchanged``: the pass's recorded pages; those it compared whole are recorded with the commits."""
        self._session = session
        self._unchanged = unchanged
        self._retire = False  # the org's recorded pages are to be retired with the next commit
        self._progress_interval = progress_interval
        self._held: Counter[str] = Counter()  # counters of pages that wrote nothing, not yet committed
        self._held_run: int | None = None
        self._counted_at = float("-inf")  # monotonic time the counters were last committed

    def submit(self, page: PreparedPage) -> None:
        """Commit a page (or hold back its counters, when it writes no device)."""
        self._held.update(page.counts)
        self._held_run = page.run_id
        writes_devices = page.inserts or page.updates or page.refreshes or page.touches or page.changes
        if writes_devices or time.monotonic() - self._counted_at >= self._progress_interval:
            try:
                self._commit(page)
            except BaseException:
                self._held.subtract(page.counts)  # the page was rolled back, and its counts with it
                self._unchanged.forget_held()  # and the pages compared with it are not to be recorded
                raise

    def count(self, run_id: int, counts: Counter[str]) -> None:
        """Counters of work done outside the pages, committed with the next commit or :meth:`flush`."""
        self._held.update(counts)
        self._held_run = run_id

    def flush(self) -> None:
        """Commit the counters held back (and what the pass's recorded pages have to write)."""
        if self._held_run is not None or self._unchanged.pending:
            self._commit(None)

    def retire_pages(self) -> None:
        """Retire the org's recorded pages with the next commit (:meth:`flush` at the latest)."""
        self._retire = True

    def purge(self, history: History, device_id: str) -> None:
        """Mark a device purged, with its history row and the run's counters, in one transaction of its own."""
        now = utcnow()
        with self._session.writer(durable=False) as writer:
            row = history.purged(device_id, writer.history_values(device_id), now)
            writer.mark_purged(device_id, now, history.run_id)
            writer.bump_generation(history.org_id)
            writer.add_history([row])
            writer.bump_run(history.run_id, {"purged": 1, "requests": 1})

    def _commit(self, page: PreparedPage | None) -> None:
        with self._session.writer(durable=False) as writer:
            if page is not None:
                writer.insert_devices(page.inserts, page.now)
                writer.update_devices(page.updates, page.now)
                writer.refresh_devices(page.refreshes, page.now)
                writer.add_history(page.changes)
                writer.touch(page.touches, page.now)
            if self._retire or (page is not None and page.alone):
                writer.bump_generation(self._unchanged.org_id)
            self._unchanged.write_into(writer)
            if self._held_run is not None:
                writer.bump_run(self._held_run, self._held)
        self._held.clear()
        self._held_run = None
        self._retire = False
        self._counted_at = time.monotonic()
