"""One pass of one org, its parts run in turn: the scan, purge detection, the reads after them."""

from __future__ import annotations

import contextlib

from syncd.api import OpenAppClient
from syncd.details import DetailReads
from syncd.errors import LockLostError, StoreError, SyncdError
from syncd.store import OrgLease, SeenIds, Session, Store
from syncd.sync.bookkeeping import SUCCEEDED, Bookkeeping, Ending, PassOutcome
from syncd.sync.history import History
from syncd.sync.options import Bounds, PassOptions
from syncd.sync.purges import PurgeSweep
from syncd.sync.scan import Scan, page_limit
from syncd.sync.unchanged import UnchangedPages
from syncd.sync.writes import PageWrites
from syncd.vocab import RunStatus


class OrgPass:
    """Mirror one org once. Create one per pass (:func:`syncd.passes.make_pass`); call :meth:`run`.
    The client asks ``api.page_concurrency`` pages ahead while the pass compares and writes one
    after the other."""

    def __init__(self, client: OpenAppClient, store: Store, options: PassOptions) -> None:
        self.client = client
        self.store = store
        self.options = options
        self.book = Bookkeeping(store, options)
        self._writes: PageWrites | None = None  # the pass's page commits, once its connection is held

    def run(self, lease: OrgLease | None = None) -> PassOutcome:
        """Run the pass; errors end up in the outcome and the sync_runs row, not as exceptions.

        ``lease``: the org's lock, held by the caller. On PostgreSQL the pass writes through the
        lock's connection; if the lock's session ends, the pass fails at its next statement and
        writes nothing more (LockLostError).
        """
        not_started = self.book.start(self.options.trigger, self.options.instance)
        if not_started is not None:
            return not_started
        bounds = Bounds.starting_now(self.options)
        held = contextlib.ExitStack()  # the pass's database connection
        try:
            ending = self._phases(lease, bounds, held)
        except Exception as exc:
            ending = self.book.ending_of(exc, bounds)
        except BaseException:
            self._release(held, SUCCEEDED)
            raise
        return self.book.finish(self._release(held, ending))

    def _phases(self, lease: OrgLease | None, bounds: Bounds, held: contextlib.ExitStack) -> Ending:
        org_id, run_id = self.options.org.id, self.book.run_id
        # An org's first pass loads a baseline: its devices were not created now, so their history
        # rows say 'observed', not 'created' (OpenApp's created_at tells when they appeared). Until a
        # pass has succeeded, the baseline is not complete: an interrupted first pass leaves a part.
        history = History(org_id, run_id, baseline=not self.store.has_succeeded(org_id))
        max_pages = page_limit(self.options, self.store, self.client.settings.page_size)
        session = held.enter_context(self.store.session(lease))
        seen = held.enter_context(SeenIds())
        resolution = self.options.settings.last_seen_resolution
        unchanged = UnchangedPages(session, self.options.org, self.client.settings.page_size, resolution, run_id)
        self._writes = writes = PageWrites(session, unchanged)
        scan = Scan(self.client, self.options, bounds, self.book, session, history, writes, max_pages, seen, unchanged)
        reads = self._detail_reads(scan, bounds, session)
        held.callback(reads.close)
        reads.during_scan()
        scan.after_page = reads.after_page
        sweep = PurgeSweep(self.client, self.store, self.options, bounds, self.book, scan, history, writes)
        ending = self._scan_and_sweep(scan, sweep)
        if ending.status != RunStatus.ABORTED and not bounds.stopped:
            self._read_details(reads, writes)
        return ending

    def _scan_and_sweep(self, scan: Scan, sweep: PurgeSweep) -> Ending:
        if not scan.run():
            return Ending(RunStatus.ABORTED, "stopped before the scan finished")
        if self.book.problems:
            return self.book.unreadable("could not be read, so purge detection was skipped")
        if not sweep.run():
            return Ending(RunStatus.ABORTED, "stopped during purge detection")
        if self.book.problems:
            return self.book.unreadable("could not be confirmed; purge detection is incomplete")
        return SUCCEEDED

    def _detail_reads(self, scan: Scan, bounds: Bounds, session: Session) -> DetailReads:
        """Door restrictions and metadata definitions (:mod:`syncd.details`): some door
        restrictions are asked while the scan goes on, the rest after purge detection."""
        options = self.options
        return DetailReads(
            self.client,
            self.store,
            options.org,
            options.settings,
            self.book.run_id,
            scan.inventory,
            scan.saw,
            bounds.deadline,
            bounds.stop,
            self.book.log,
            session,
        )

    def _read_details(self, reads: DetailReads, writes: PageWrites) -> None:
        """The reads after the scan and purge detection: what goes wrong there is logged and
        counted, never the pass's failure."""
        book = self.book
        try:
            counts = reads.run()
        except LockLostError:
            raise  # the pass fails: it may write nothing more
        except Exception:  # a bug there must not fail a pass whose scan and purge detection are done
            book.log.exception("door restrictions and metadata definitions failed; the pass's scan stands")
            return
        book.counts.update(counts)
        writes.count(book.run_id, counts)

    def _release(self, held: contextlib.ExitStack, ending: Ending) -> Ending:
        """Commit the counters held back (the run's are complete before it is closed) and give the
        connection back; ``ending``, or the failure to commit when the pass had not failed already."""
        try:
            if self._writes is not None:
                self._writes.flush()
        except SyncdError as exc:
            if ending.status != RunStatus.FAILED:  # the first error is the one that tells what happened
                ending = Ending(RunStatus.FAILED, str(exc), exc)
        finally:
            try:
                held.close()
            except StoreError as exc:  # a connection the server dropped cannot be closed cleanly
                self.book.log.debug("closing the pass's connection failed", error=str(exc))
        return ending
