"""List pages a pass need not compare again.

The API has no changed-since filter, so every pass reads every page; most pages of a re-sync are,
byte for byte, what the previous pass read. A page compared whole with the mirror is recorded
(``list_pages``: its offset, the digest of its body, until when its devices count as seen). A later
pass given the same body at that offset takes its devices as seen and unchanged without reading the
body (the client hands such a page over unread) or comparing them one by one: the record's summary
gives their ids, which still go to purge detection, and the active portals and integrations among
them, which go to the inventory.

What keeps the mirror exact:

- the digest is of the whole body as received, under a scope: the org's filters, the page size,
  :data:`READ_VERSION` (how syncd reads a page) and the versions of syncd and orjson;
- a page is recorded only when every item on it was taken (none unreadable, of another org or listed
  twice on it), and trusted only once the pass that recorded it has read its whole list and met no
  device listed on more than one page (``settled``): a pass cut short, or one that met the list
  shifting under it (where a later page may have overwritten what an earlier one wrote), leaves
  its pages untrusted;
- every other write to the org's devices (a purge, a pushed edit, a device confirmed on its own)
  bumps the org's generation in the same transaction, and only records of the current generation
  are read. The pass reads the generation once, before it compares anything, and records under it:
  a write that lands during the pass retires what the pass records too;
- ``seen_since``: a page is compared again once a device on it is due a new ``last_seen_at``
  (the oldest last sight of its devices is older than ``sync.last_seen_resolution``);
- within a pass, a page that lists a device an earlier page of the same pass wrote (the list
  shifting under offset paging) is compared, not taken: the later copy wins, as without this. Past
  :data:`WRITTEN_KEPT` such devices the pass stops taking pages (its memory stays bounded); a pass
  that met devices listed on more than one page retires the org's pages.

A write by another process that lands while a pass runs retires the org's pages in the database at
once, but the pass may still leave pages unread by the shapes it read when it began, and take them
by the records it read before (at most :data:`RECORDS_READ` ahead): as if that write had come after
the pass read those pages. The next pass compares them. A summary that cannot be read as syncd wrote
it (a row edited by hand) is not taken: the page is read and compared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from xxhash import xxh3_128_hexdigest

from syncd import __version__
from syncd.config import OrgSettings
from syncd.models import PageRecord, PageShape, utcnow
from syncd.store import PageWriter, Session

READ_VERSION = 1  # bump when syncd reads a page differently: pages recorded before are compared again
RECORDS_READ = 100  # recorded pages read from the database at a time, by offset (~6 KB each)
WRITTEN_KEPT = 20_000  # devices written by this pass kept to check later pages against


@dataclass(frozen=True, slots=True)
class PageSummary:
    """What a pass takes from a recorded page instead of reading it: the ``ids`` of its devices, in
    order, and of the active ones the ``portals`` (id -> fingerprint) and ``integrations`` (id ->
    the lowest device id), as :meth:`~syncd.models.Inventory.note` took them."""

    ids: list[str]
    portals: dict[str, str]
    integrations: dict[str, str]

    def encode(self) -> bytes:
        """The summary as stored."""
        return orjson.dumps([self.ids, self.portals, self.integrations])

    @classmethod
    def decode(cls, data: bytes, count: int) -> PageSummary | None:
        """A stored summary of a page of ``count`` devices; None when it is not one syncd wrote."""
        try:
            ids, portals, integrations = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None
        if not (_strings(ids) and len(ids) == count and _string_map(portals) and _string_map(integrations)):
            return None
        return cls(ids, portals, integrations)


def _strings(value: Any) -> bool:
    return value.__class__ is list and all(v.__class__ is str for v in value)


def _string_map(value: Any) -> bool:
    return value.__class__ is dict and all(v.__class__ is str for v in value.values())


class UnchangedPages:
    """One pass's use of recorded pages: which pages the client may hand over unread
    (:attr:`shapes`), which of them the pass may take unchanged (:meth:`recorded`), and the pages it
    compared whole, held until :meth:`write_into` a page's transaction."""

    def __init__(self, session: Session, org: OrgSettings, page_size: int, resolution: float, run_id: int) -> None:
        """``resolution``: ``sync.last_seen_resolution``, in seconds; ``run_id``: the pass's run."""
        self.org_id = org.id
        self.run_id = run_id
        self._resolution = timedelta(seconds=resolution)
        reading = [READ_VERSION, __version__, orjson.__version__, org.integration_id, org.device_kind, page_size]
        self.scope = xxh3_128_hexdigest(orjson.dumps(reading))
        self._session = session
        with session.reader() as reader:
            self.generation = reader.generation(org.id)  # before any page is compared: see the docstring
            fresh_after = utcnow() - self._resolution
            self.shapes: Mapping[int, PageShape] = reader.page_shapes(org.id, self.scope, self.generation, fresh_after)
        self._ahead: deque[PageRecord] = deque()  # recorded pages read, not yet asked about
        self._read_from: int | None = 0  # the next offset to read recorded pages from; None: all read
        self._written: set[str] | None = set()  # None: too many to keep, no page is taken any more
        self._held: list[PageRecord] = []
        self._settled = False  # the scan read its whole list and met no device twice: trust its pages

    def recorded(self, offset: int, digest: str, now: datetime) -> PageSummary | None:
        """The summary of the page at ``offset`` with body ``digest`` if it was compared whole
        before, under this generation, and its devices are still fresh. Ask in increasing offsets."""
        if self._written is None:
            return None
        record = self._record_at(offset)
        if record is None or record.shape.digest != digest or record.seen_since <= now - self._resolution:
            return None
        return PageSummary.decode(record.summary, record.shape.count)

    def lists_written(self, ids: Iterable[str]) -> bool:
        """Whether any of ``ids`` was written by a page of this pass."""
        return self._written is None or not self._written.isdisjoint(ids)

    def wrote(self, ids: Iterable[str]) -> None:
        """Devices a page of this pass wrote."""
        if self._written is not None:
            self._written.update(ids)
            if len(self._written) > WRITTEN_KEPT:
                self._written = None

    def compared(self, record: PageRecord) -> None:
        """A page compared whole: to record, with the next write."""
        self._held.append(record)

    def settle(self) -> None:
        """The scan read the whole list and met no device on more than one page: its pages are to
        be trusted from the next write on."""
        self._settled = True

    def forget_held(self) -> None:
        """The pages held are not to be recorded (the write that was to carry them failed)."""
        self._held = []

    @property
    def pending(self) -> bool:
        """Whether :meth:`write_into` has anything to write."""
        return bool(self._held) or self._settled

    def write_into(self, writer: PageWriter) -> None:
        """Record the pages held (and, once settled, trust this pass's pages), in ``writer``'s transaction."""
        if self._held:
            writer.record_pages(self.org_id, self.scope, self.generation, self.run_id, self._held)
            self._held = []
        if self._settled:
            writer.settle_pages(self.org_id, self.run_id)
            self._settled = False

    def _record_at(self, offset: int) -> PageRecord | None:
        while True:
            while self._ahead and self._ahead[0].offset < offset:
                self._ahead.popleft()
            if self._ahead or self._read_from is None:
                break
            start = max(offset, self._read_from)
            with self._session.reader() as reader:
                found = reader.page_records(self.org_id, self.scope, self.generation, start, RECORDS_READ)
            self._ahead.extend(found)
            self._read_from = found[-1].offset + 1 if len(found) == RECORDS_READ else None
        return self._ahead[0] if self._ahead and self._ahead[0].offset == offset else None
