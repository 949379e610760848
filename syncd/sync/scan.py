"""The scan of a pass: reading list_devices page by page, taking each page's devices (filtering:
unreadable items, devices of another org, devices listed twice), sorting them against the mirror
(unchanged, new, changed) and parsing those to be written; then the page is compared
(:mod:`.history`) and handed to its writes (:mod:`.writes`)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any

from syncd.api import OpenAppClient
from syncd.errors import InvalidDeviceError, PassRefusedError
from syncd.models import (
    Device,
    Inventory,
    PageRecord,
    PageShape,
    encode,
    identify,
    parse_device,
    preview,
    utcnow,
)
from syncd.store import PageReader, SeenIds, Session, Store
from syncd.sync.bookkeeping import MAX_LOGGED_PROBLEMS, Bookkeeping
from syncd.sync.history import History
from syncd.sync.options import Bounds, PassOptions
from syncd.sync.unchanged import PageSummary, UnchangedPages
from syncd.sync.writes import PageWrites, PreparedPage
from syncd.vocab import DeviceState

# A list may run this far past the org's size at its last successful pass before a pass calls it
# endless: 10x the pages, plus 1,000. (Before a first success only sync.max_pages bounds it.)
PAGE_GROWTH_FACTOR = 10
PAGE_GROWTH_MARGIN = 1000

Taken = dict[str, tuple[dict[str, Any], int | None]]  # a page's devices to compare: id -> (item, position)


def page_limit(options: PassOptions, store: Store, page_size: int) -> int:
    """How many pages a pass may read: ``sync.max_pages``, and once a pass of the org has succeeded,
    at most :data:`PAGE_GROWTH_FACTOR` times its pages plus :data:`PAGE_GROWTH_MARGIN` (unless an
    operator gave the limit of this pass)."""
    if options.max_pages is not None:
        return options.max_pages
    size = store.last_success_size(options.org.id)
    if size is None:
        return options.settings.max_pages
    pages = -(-size // page_size)
    return min(options.settings.max_pages, PAGE_GROWTH_FACTOR * pages + PAGE_GROWTH_MARGIN)


class Scan:
    """The scan of one pass; :meth:`run` once, and :meth:`apply` for a device purge detection
    re-fetched. ``seen``: the ids it took (out of memory: :class:`~syncd.store.SeenIds`);
    ``inventory``: what the reads after the scan ask about."""

    def __init__(
        self,
        client: OpenAppClient,
        options: PassOptions,
        bounds: Bounds,
        book: Bookkeeping,
        session: Session,
        history: History,
        writes: PageWrites,
        max_pages: int,
        seen: SeenIds,
        unchanged: UnchangedPages,
    ) -> None:
        """``session``: the pass's connection, which pages are read through; ``max_pages``: see
        :func:`page_limit`; ``seen``: where the ids it takes go; ``unchanged``: the pages compared
        whole before, which it may take without comparing them again."""
        self.client = client
        self.options = options
        self.bounds = bounds
        self.book = book
        self.session = session
        self.history = history
        self.writes = writes
        self.max_pages = max_pages  # list pages this pass reads at most before it calls the list endless
        self.seen = seen
        self.unchanged = unchanged
        # Called once each page is written (the pass sets it: door restrictions asked meanwhile).
        self.after_page: Callable[[], None] | None = None
        self.distinct = 0  # devices taken, each once: known when the last page is in
        self.inventory = Inventory()
        self._touch_after = timedelta(seconds=options.settings.last_seen_resolution)

    def run(self) -> bool:
        """Read and apply every page; False when stopped before the last."""
        org = self.options.org
        pages = self.client.list_device_pages(
            org.id,
            integration_id=org.integration_id,
            device_kind=org.device_kind,
            deadline=self.bounds.deadline,
            known=self.unchanged.shapes,
        )
        # Closed here, not by the garbage collector: pages asked ahead are waited for (and no new
        # ones asked) before the pass ends, whether it ends by a stop, an error or the last page.
        with contextlib.closing(pages):
            for page in pages:
                if self.bounds.stopped:
                    return False
                self.bounds.check_deadline()
                self._check_length()
                if not (page.known and self._take_unchanged(page.offset, page.digest, page.count)):
                    self.apply(page.items, page.offset, page.digest, page.total)
                if self.after_page:
                    self.after_page()
                if self.options.on_progress:
                    self.options.on_progress(org.id, self.book.counts["pages"], self.book.counts["devices_seen"])
        if self.bounds.stopped:
            return False
        self.distinct = self._settle()
        return True

    def _check_length(self) -> None:
        pages = self.book.counts["pages"]
        if pages >= self.max_pages:
            raise PassRefusedError(
                f"list_devices kept sending full pages: stopped after {pages} pages "
                f"({self.book.counts['devices_seen']} devices) and purged nothing; a list this long is taken "
                "for a server fault "
                f"(the limit: sync.max_pages, and {PAGE_GROWTH_FACTOR}x the pages of the last successful pass "
                f"plus {PAGE_GROWTH_MARGIN}). If the org really has that many devices, confirm with "
                f"`syncd run-once --org {self.options.org.id} --max-pages N`"
            )

    def apply(self, items: list[Any], offset: int | None, digest: str | None = None, total: int | None = None) -> None:
        """Compare one page (or one re-fetched device: ``offset`` None) with the mirror and hand its
        writes over; a page with every item taken is recorded (``digest``: its body's, ``total``:
        the answer's) so that a later pass given the same body need not read it."""
        now = utcnow()
        counts: Counter[str] = Counter(requests=1, pages=1 if offset is not None else 0)
        problems_before = len(self.book.problems)
        taken = self._take(items, offset, counts)
        self.seen.add(taken.keys())
        counts["devices_seen"] = len(taken)
        listed = Inventory()  # what this page adds to the pass's inventory
        with self.session.reader() as reader:
            inserts, updates, touches, oldest = self._sort(reader, taken, now, counts, listed)
            previous = reader.previous([d.id for d in updates])
        self.inventory.merge(listed.portals, listed.integrations)
        counts["unreadable"] = len(self.book.problems) - problems_before
        rows = self.history.created(inserts, now)
        counts["created"] += len(inserts)
        compared = self.history.compare(updates, previous, now, counts)
        rows += compared.rows
        written = [d.id for group in (inserts, compared.changed, compared.refreshes) for d in group]
        self.unchanged.wrote(written)
        if offset is not None and digest is not None and len(taken) == len(items) and not counts["unreadable"]:
            ids = list(taken)
            shape = PageShape(digest, len(items), total, ids[0] if ids else None)
            summary = PageSummary(ids, listed.portals, listed.integrations).encode()
            # Devices written or touched were seen now; the others, at the oldest last sight known.
            self.unchanged.compared(PageRecord(offset, shape, min(now, oldest or now), summary))
        page = PreparedPage(
            self.history.run_id,
            now,
            inserts,
            compared.changed,
            compared.refreshes,
            touches,
            rows,
            counts,
            alone=offset is None,
        )
        self.writes.submit(page)
        self.book.counts.update(counts)

    def _take_unchanged(self, offset: int, digest: str, count: int) -> bool:
        """Take a page of ``count`` devices compared whole before (see :mod:`.unchanged`) by its
        record, without reading it: False when it was not, or lists a device this pass wrote."""
        now = utcnow()
        summary = self.unchanged.recorded(offset, digest, now)
        if summary is None or self.unchanged.lists_written(summary.ids):
            return False
        self.seen.add(summary.ids)
        counts = Counter(requests=1, pages=1, devices_seen=count, unchanged=count, pages_unchanged=1)
        self.inventory.merge(summary.portals, summary.integrations)
        self.writes.submit(PreparedPage(self.history.run_id, now, [], [], [], [], [], counts))
        self.book.counts.update(counts)
        return True

    def _take(self, items: list[Any], offset: int | None, counts: Counter[str]) -> Taken:
        """The items of a page to compare: readable, of this org, each device once."""
        taken: Taken = {}
        org_id, counted = self.options.org.id, self.book.counts
        for i, item in enumerate(items):
            position = None if offset is None else offset + i
            try:
                device_id, device_org_id = identify(item, position)
            except InvalidDeviceError as exc:
                self.book.problem(exc)
                continue
            if device_org_id != org_id:
                counts["rejected"] += 1
                if counts["rejected"] + counted["rejected"] <= MAX_LOGGED_PROBLEMS:
                    self.book.log.warning(
                        "rejected a device of another org", device_id=device_id, device_org_id=preview(device_org_id)
                    )
            elif device_id in taken:  # twice in this page (on an earlier page too: see settle)
                # Offset paging over a list that changes repeats devices; the first copy is the one taken.
                counts["duplicates"] += 1
                if counts["duplicates"] + counted["duplicates"] <= MAX_LOGGED_PROBLEMS:
                    self.book.log.info(
                        "a device was listed twice; the first copy was taken", device_id=device_id, position=position
                    )
            else:
                taken[device_id] = (item, position)
        return taken

    def _settle(self) -> int:
        """Once the last page is in: how many distinct devices the scan took. A device listed again on
        a later page (offset paging over a list that changes) was compared again, its later copy being
        the newer listing, but is counted once in ``devices_seen`` and its repeats in ``duplicates``."""
        settled = self.seen.settle()
        if settled.repeats:
            self.book.log.info(
                "devices were listed on more than one page: each copy was compared, the device counted once",
                repeats=settled.repeats,
                first=list(settled.repeated[:5]),
            )
            fixed = Counter(devices_seen=-settled.repeats, duplicates=settled.repeats)
            self.book.counts.update(fixed)
            self.writes.count(self.history.run_id, fixed)
            self.writes.retire_pages()  # a list that shifted under the scan: its pages are not to be trusted
        else:
            self.unchanged.settle()
        return settled.distinct

    def saw(self, ids: Collection[str]) -> set[str]:
        """Those of ``ids`` this scan took."""
        return self.seen.among(ids)

    def _sort(
        self, reader: PageReader, taken: Taken, now: datetime, counts: Counter[str], inventory: Inventory
    ) -> tuple[list[Device], list[Device], list[str], datetime | None]:
        """``(inserts, updates, touches, oldest)``: the devices new to the mirror and those whose
        payload differs from it, parsed; the ids of unchanged devices last seen longer ago than
        ``sync.last_seen_resolution``; the oldest last sight of the others. Active devices are noted
        in ``inventory``."""
        inserts: list[Device] = []
        updates: list[Device] = []
        touches: list[str] = []
        org_id = self.options.org.id
        known, oldest = reader.known(taken.keys(), now - self._touch_after)
        purged, active = DeviceState.PURGED, DeviceState.ACTIVE  # looked up once, not per device
        for device_id, (item, position) in taken.items():
            try:
                encoded = encode(item)
            except ValueError as exc:
                self.book.problem(InvalidDeviceError(str(exc), position=position, device_id=device_id))
                continue
            existing = known.get(device_id)
            if existing is not None and existing[0] == encoded[1] and existing[1] != purged:
                counts["unchanged"] += 1
                if existing[2]:  # stale: last seen before the resolution
                    touches.append(device_id)
                state = existing[1]
            else:
                try:
                    device = parse_device(item, position, encoded, (device_id, org_id))
                except InvalidDeviceError as exc:
                    self.book.problem(exc)
                    continue
                (updates if existing is not None else inserts).append(device)
                state = device.state
            if state == active:
                inventory.note(device_id, item, encoded[1])
        return inserts, updates, touches, oldest
