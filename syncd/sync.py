"""One pass of one org: page through list_devices, upsert page by page, then detect purges.

Safety rules (README, "How a pass works"):
- every page is one transaction; a crash leaves only whole pages behind;
- an unchanged device is not written;
- nothing is marked purged unless the scan was complete and error-free *and* get_device answers 404;
- a pass that would purge more than ``sync.max_purge_fraction`` of the org refuses, unless confirmed;
- a device of another org is never written; a device that cannot be read or stored costs only itself
  (and purge detection); a device listed twice is taken once;
- a pass ends: at ``sync.pass_timeout``, and when a list runs on far past the org's known size;
- door restrictions and metadata definitions are read after purge detection (:mod:`syncd.details`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.details import DetailReads
from syncd.errors import (
    InvalidDeviceError,
    InvalidResponseError,
    LockLostError,
    MassPurgeRefusedError,
    NotFoundError,
    PassRefusedError,
    StoppedError,
    StoreError,
    SyncdError,
    TransientError,
)
from syncd.metrics import CHANGES, DEVICES, LAST_SUCCESS, PASS_DURATION, PURGES_REFUSED
from syncd.models import (
    CHANGE_KINDS,
    DEVICE_STATES,
    Device,
    HistoryRow,
    Inventory,
    change_kind,
    describe_change,
    encode,
    history_row,
    identify,
    is_device_id,
    one_line,
    parse_device,
    preview,
    utcnow,
)
from syncd.store import OrgLease, Session, Store

log = structlog.get_logger(__name__)

MAX_LOGGED_PROBLEMS = 10
# A list may run this far past the org's size at its last successful pass before a pass calls it
# endless: 10x the pages, plus 1,000. (Before a first success only sync.max_pages bounds it.)
PAGE_GROWTH_FACTOR = 10
PAGE_GROWTH_MARGIN = 1000
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class PassOutcome:
    """How one org's pass ended."""

    org_id: str
    run_id: int | None  # None when the pass was skipped
    status: str  # succeeded | failed | aborted | skipped
    started_at: datetime
    finished_at: datetime
    counts: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    exception: SyncdError | None = None  # what ended a failed pass, for callers that act on its kind
    due_in: float | None = None  # skipped because another daemon's pass is recent: seconds until the org is due

    @property
    def seconds(self) -> float:
        """Wall time of the pass."""
        return (self.finished_at - self.started_at).total_seconds()


class OrgPass:
    """Mirror one org once. Create one per pass; call :meth:`run`."""

    session: Session  # the pass's database connection, while :meth:`run` runs
    writes: PageWrites  # the pass's page commits, while :meth:`run` runs
    baseline: bool  # no pass of the org had succeeded when this one started
    deadline: float  # time.monotonic() at which the pass gives up (sync.pass_timeout)
    max_pages: int  # list pages this pass reads at most before it calls the list endless

    def __init__(
        self,
        client: OpenAppClient,
        store: Store,
        org: OrgSettings,
        settings: SyncSettings,
        *,
        trigger: str = "run-once",
        instance: str = "syncd",
        allow_mass_purge: bool = False,
        max_pages: int | None = None,
        stop: threading.Event | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """``max_pages``: an operator's limit for this pass, instead of the one derived from the org's
        size and ``sync.max_pages`` (``run-once --max-pages``, to confirm that an org really grew).
        The client asks ``api.page_concurrency`` pages ahead while this pass compares and writes
        one after the other."""
        self.client = client
        self.store = store
        self.org = org
        self.settings = settings
        self.trigger = trigger
        self.instance = instance
        self.allow_mass_purge = allow_mass_purge
        self.page_limit_override = max_pages
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.counts: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.inventory = Inventory()  # what the reads after the scan ask about
        self.problems: list[InvalidDeviceError] = []
        self._touch_after = timedelta(seconds=settings.last_seen_resolution)
        self.log = log.bind(org_id=org.id)

    def run(self, lease: OrgLease | None = None) -> PassOutcome:
        """Run the pass; errors end up in the outcome and the sync_runs row, not as exceptions.

        ``lease``: the org's lock, held by the caller. On PostgreSQL the pass writes through the
        lock's connection; if the lock's session ends, the pass fails at its next statement and
        writes nothing more (LockLostError).
        """
        started = utcnow()
        try:
            run_id, stale = self.store.start_run(self.org.id, self.trigger, self.instance, started)
        except SyncdError as exc:
            self.log.error("pass could not start", error=str(exc))
            return PassOutcome(
                self.org.id, None, "failed", started, utcnow(), error=f"could not start: {exc}", exception=exc
            )
        self.log = self.log.bind(run_id=run_id)
        if stale:
            self.log.warning("closed interrupted runs", count=stale)
        self.log.debug("pass started")
        self.deadline = time.monotonic() + self.settings.pass_timeout
        status, error = "succeeded", None
        exception: SyncdError | None = None
        held = contextlib.ExitStack()  # the pass's database connection
        writes: PageWrites | None = None
        try:
            # An org's first pass loads a baseline: its devices were not created now, so their history
            # rows say 'observed', not 'created' (OpenApp's created_at tells when they appeared). Until a
            # pass has succeeded, the baseline is not complete: an interrupted first pass leaves a part.
            self.baseline = not self.store.has_succeeded(self.org.id)
            self.max_pages = self._page_limit()
            self.session = held.enter_context(self.store.session(lease))
            self.writes = writes = PageWrites(self.session)
            if not self._scan(run_id):
                status, error = "aborted", "stopped before the scan finished"
            elif self.problems:
                status, error = "failed", self._problems_summary("could not be read, so purge detection was skipped")
            elif not self._sweep(run_id):
                status, error = "aborted", "stopped during purge detection"
            elif self.problems:
                status, error = (
                    "failed",
                    self._problems_summary("could not be confirmed; purge detection is incomplete"),
                )
            if status != "aborted" and not self.stop.is_set():
                self._read_details(run_id)
        except StoppedError as exc:
            status, error = "aborted", str(exc)
        except MassPurgeRefusedError as exc:
            PURGES_REFUSED.labels(self.org.id).inc()
            status, error, exception = "failed", str(exc), exc
        except SyncdError as exc:
            status, error, exception = "failed", self._explain(exc), exc
        except Exception as exc:  # a bug must not leave the run 'running' forever
            self.log.exception("pass crashed")
            status, error = "failed", one_line(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            try:
                if writes:
                    writes.flush()  # the run's counters are complete before it is closed
            except SyncdError as exc:
                if status != "failed":  # the first error is the one that tells what happened
                    status, error, exception = "failed", str(exc), exc
            finally:
                try:
                    held.close()
                except StoreError as exc:  # a connection the server dropped cannot be closed cleanly
                    self.log.debug("closing the pass's connection failed", error=str(exc))
        finished = utcnow()
        outcome = PassOutcome(self.org.id, run_id, status, started, finished, self.counts, error, exception)
        try:
            self.store.finish_run(run_id, status, finished, error)
        except StoreError as exc:
            self.log.error(
                "the pass's result could not be recorded; this process records it before its next pass",
                status=status,
                error=error,
                bookkeeping_error=str(exc),
            )
            outcome.status = "failed"
            outcome.error = f"{error or f'the pass {status}'}; and its result could not be recorded: {exc}"
            outcome.exception = outcome.exception or exc
        self._record_metrics(outcome)
        counts = {k: v for k, v in sorted(self.counts.items()) if v}
        if outcome.status == "succeeded":
            self.log.info("pass succeeded", seconds=round(outcome.seconds, 2), **counts)
        else:
            self.log.warning(f"pass {outcome.status}", error=outcome.error, seconds=round(outcome.seconds, 2), **counts)
        return outcome

    def _read_details(self, run_id: int) -> None:
        """Door restrictions and metadata definitions (:mod:`syncd.details`), after the scan and
        purge detection: what goes wrong there is logged and counted, never the pass's failure."""
        reads = DetailReads(
            self.client,
            self.store,
            self.org,
            self.settings,
            run_id,
            self.inventory,
            self.seen,
            self.deadline,
            self.stop,
            self.log,
            self.session,
        )
        try:
            counts = reads.run()
        except LockLostError:
            raise  # the pass fails: it may write nothing more
        except Exception:  # a bug there must not fail a pass whose scan and purge detection are done
            self.log.exception("door restrictions and metadata definitions failed; the pass's scan stands")
            return
        self.counts.update(counts)
        self.writes.count(run_id, counts)

    def _problems_summary(self, what: str) -> str:
        return f"{len(self.problems)} device(s) {what}; first: {self.problems[0]}"

    def _explain(self, exc: SyncdError) -> str:
        if time.monotonic() >= self.deadline and "sync.pass_timeout" not in str(exc):
            return f"the pass ran into sync.pass_timeout ({self.settings.pass_timeout:.0f}s): {exc}"
        return str(exc)

    def _check_deadline(self) -> None:
        if time.monotonic() >= self.deadline:
            raise TransientError(
                f"the pass took longer than sync.pass_timeout ({self.settings.pass_timeout:.0f}s) and was stopped; "
                "nothing was purged"
            )

    def _page_limit(self) -> int:
        """How many pages this pass may read: ``sync.max_pages``, and once a pass of the org has
        succeeded, at most :data:`PAGE_GROWTH_FACTOR` times its pages plus :data:`PAGE_GROWTH_MARGIN`
        (unless an operator gave the limit of this pass)."""
        if self.page_limit_override is not None:
            return self.page_limit_override
        size = self.store.last_success_size(self.org.id)
        if size is None:
            return self.settings.max_pages
        pages = -(-size // self.client.settings.page_size)
        return min(self.settings.max_pages, PAGE_GROWTH_FACTOR * pages + PAGE_GROWTH_MARGIN)

    def _record_metrics(self, outcome: PassOutcome) -> None:
        org_id = self.org.id
        PASS_DURATION.labels(org_id, outcome.status).observe(outcome.seconds)
        for kind in CHANGE_KINDS:
            if self.counts[kind]:
                CHANGES.labels(org_id, kind).inc(self.counts[kind])
        if outcome.status == "succeeded":
            LAST_SUCCESS.labels(org_id).set(outcome.finished_at.timestamp())
        try:
            by_state = self.store.state_counts(org_id).get(org_id, {})
        except StoreError:
            return  # the gauges keep their last values; the pass's outcome says what failed
        for state in DEVICE_STATES:
            DEVICES.labels(org_id, state).set(by_state.get(state, 0))

    # -- scan ------------------------------------------------------------------------------

    def _scan(self, run_id: int) -> bool:
        pages = self.client.list_device_pages(
            self.org.id,
            integration_id=self.org.integration_id,
            device_kind=self.org.device_kind,
            deadline=self.deadline,
        )
        # Closed here, not by the garbage collector: pages asked ahead are waited for (and no new
        # ones asked) before the pass ends, whether it ends by a stop, an error or the last page.
        with contextlib.closing(pages):
            for page in pages:
                if self.stop.is_set():
                    return False
                self._check_deadline()
                if self.counts["pages"] >= self.max_pages:
                    raise PassRefusedError(
                        f"list_devices kept sending full pages: stopped after {self.counts['pages']} pages "
                        f"({len(self.seen)} devices) and purged nothing; a list this long is taken for a server fault "
                        f"(the limit: sync.max_pages, and {PAGE_GROWTH_FACTOR}x the pages of the last successful pass "
                        f"plus {PAGE_GROWTH_MARGIN}). If the org really has that many devices, confirm with "
                        f"`syncd run-once --org {self.org.id} --max-pages N`"
                    )
                self._apply(run_id, page.items, page.offset)
                if self.on_progress:
                    self.on_progress(self.org.id, self.counts["pages"], len(self.seen))
        return not self.stop.is_set()

    def _apply(self, run_id: int, items: list[Any], offset: int | None) -> None:
        """Compare one page (or one re-fetched device) with the mirror and hand its writes over."""
        now = utcnow()
        batch: dict[str, tuple[dict[str, Any], int | None]] = {}
        counts: Counter[str] = Counter(requests=1, pages=1 if offset is not None else 0)
        problems_before = len(self.problems)
        for i, item in enumerate(items):
            position = None if offset is None else offset + i
            try:
                device_id, org_id = identify(item, position)
            except InvalidDeviceError as exc:
                self._problem(exc)
                continue
            if org_id != self.org.id:
                counts["rejected"] += 1
                if counts["rejected"] + self.counts["rejected"] <= MAX_LOGGED_PROBLEMS:
                    self.log.warning(
                        "rejected a device of another org", device_id=device_id, device_org_id=preview(org_id)
                    )
                continue
            if device_id in batch or device_id in self.seen:
                # Offset paging over a list that changes repeats devices; the first copy is the one taken.
                counts["duplicates"] += 1
                if counts["duplicates"] + self.counts["duplicates"] <= MAX_LOGGED_PROBLEMS:
                    self.log.info(
                        "a device was listed twice; the first copy was taken", device_id=device_id, position=position
                    )
                continue
            batch[device_id] = (item, position)
        self.seen.update(batch)
        counts["devices_seen"] = len(batch)

        inserts: list[Device] = []
        updates: list[Device] = []
        touches: list[str] = []
        with self.session.reader() as reader:
            known = reader.known(batch.keys(), now - self._touch_after)
            for device_id, (item, position) in batch.items():
                try:
                    encoded = encode(item)
                except ValueError as exc:
                    self._problem(InvalidDeviceError(str(exc), position=position, device_id=device_id))
                    continue
                existing = known.get(device_id)
                if existing is not None:
                    fingerprint, state, stale = existing
                    if fingerprint == encoded[1] and state != "purged":
                        counts["unchanged"] += 1
                        if stale:
                            touches.append(device_id)
                        if state == "active":
                            self.inventory.note(device_id, item, fingerprint)
                        continue
                try:
                    device = parse_device(item, position, encoded, (device_id, self.org.id))
                except InvalidDeviceError as exc:
                    self._problem(exc)
                    continue
                (updates if existing is not None else inserts).append(device)
                if device.state == "active":
                    self.inventory.note(device_id, item, device.fingerprint)
            previous = reader.previous([d.id for d in updates])
        counts["unreadable"] = len(self.problems) - problems_before
        # A baseline pass cannot tell a new device from one that existed: it records what it saw.
        first = "observed" if self.baseline else "created"
        changes = [history_row(d.id, self.org.id, now, first, None, d, run_id=run_id) for d in inserts]
        counts["created"] += len(inserts)
        changed: list[Device] = []
        refreshes: list[Device] = []
        for device in updates:
            old_raw, old_state = previous[device.id]
            diff = describe_change(old_raw, device.raw, old_state, device.state)
            if not diff:
                # The same content serialised differently (another key order, say): only the
                # stored payload and fingerprint are renewed; nothing changed.
                refreshes.append(device)
                counts["unchanged"] += 1
                continue
            kind = change_kind(old_state, device.state)
            counts[kind] += 1
            changed.append(device)
            changes.append(history_row(device.id, self.org.id, now, kind, diff, device, run_id=run_id))
        self.writes.submit(PreparedPage(run_id, now, inserts, changed, refreshes, touches, changes, counts))
        self.counts.update(counts)

    def _problem(self, exc: InvalidDeviceError) -> None:
        self.problems.append(exc)
        if len(self.problems) <= MAX_LOGGED_PROBLEMS:
            self.log.warning("unreadable device", error=str(exc), position=exc.position)

    # -- purge detection -----------------------------------------------------------------------

    def _sweep(self, run_id: int) -> bool:
        """Confirm every mirrored device the scan did not see; 404 means purged."""
        org = self.org
        filtered = bool(org.integration_id or org.device_kind)
        by_state = self.store.state_counts(org.id).get(org.id, {})
        if not filtered and sum(n for state, n in by_state.items() if state != "purged") == len(self.seen):
            # Every device the scan saw is now live in the mirror, so equal counts mean nothing is
            # missing. (With filters, a server that ignores one could break that; compare ids then.)
            return True
        missing = self.store.live_ids_except(org.id, self.seen, org.integration_id, org.device_kind)
        foreign = [device_id for device_id in missing if not is_device_id(device_id)]
        if foreign:
            # Rows an older syncd took from a hostile list, or written by hand: never put into a URL.
            self.log.warning(
                "mirrored devices with ids OpenApp cannot have issued were not checked for purges",
                count=len(foreign),
                first=preview(foreign[0]),
            )
            missing = [device_id for device_id in missing if is_device_id(device_id)]
        if not missing:
            return True
        live = len(missing) + len(self.seen)
        limit = self.settings.max_purge_fraction * live
        if not self.allow_mass_purge:
            if not self.seen:
                raise MassPurgeRefusedError(
                    f"the scan returned no devices but the mirror holds {live} live ones; nothing was purged "
                    "(if OpenApp really has none left, rerun with --allow-mass-purge)"
                )
            if len(missing) > limit:
                raise MassPurgeRefusedError(
                    f"{len(missing)} of {live} devices ({len(missing) / live:.0%}) were missing from the scan, more "
                    f"than sync.max_purge_fraction ({self.settings.max_purge_fraction:.0%}); nothing was purged "
                    "(to confirm, rerun with --allow-mass-purge)"
                )
        self.log.debug("confirming devices missing from the scan", count=len(missing))
        for device_id, answer in self.client.get_devices(self.org.id, missing, deadline=self.deadline):
            if self.stop.is_set():
                return False
            self._check_deadline()
            try:
                raw = answer.result()
            except NotFoundError:
                self._mark_purged(run_id, device_id)
            except InvalidResponseError as exc:  # an answer not to be believed costs only this device
                self._problem(InvalidDeviceError(str(exc), device_id=device_id))
            else:
                self._apply(run_id, [raw], None)  # it was hidden from the scan by shifting offsets
        return True

    def _mark_purged(self, run_id: int, device_id: str) -> None:
        now = utcnow()
        with self.session.writer(durable=False) as writer:
            values = writer.history_values(device_id)
            diff = {"state": {"old": values["state"], "new": "purged"}}
            writer.mark_purged(device_id, now, run_id)
            writer.add_history(
                [history_row(device_id, self.org.id, now, "purged", diff, {**values, "state": "purged"}, run_id=run_id)]
            )
            writer.bump_run(run_id, {"purged": 1, "requests": 1})
        self.counts.update(purged=1, requests=1)
        self.log.info("device purged", device_id=device_id)


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


class PageWrites:
    """Commits a pass's prepared pages, each in one transaction, as they come.

    (On the pass's own thread: a writer thread overlapped too little with the GIL held by
    parsing to pay for its hand-overs; bench/bench_sync.py measured it slower on both databases.)

    A page that changes no device (the usual page of a re-sync) only moves the run's counters.
    Those are held back and committed with the next page that writes devices or comes
    ``progress_interval`` seconds after the last commit, and by :meth:`flush`. So the counters of
    a running pass lag a little, and a page's devices and counters still commit together.
    """

    def __init__(self, session: Session, progress_interval: float = 1.0) -> None:
        self._session = session
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
                raise

    def count(self, run_id: int, counts: Counter[str]) -> None:
        """Counters of work done outside the pages, committed with the next commit or :meth:`flush`."""
        self._held.update(counts)
        self._held_run = run_id

    def flush(self) -> None:
        """Commit the counters held back."""
        if self._held_run is not None:
            self._commit(None)

    def _commit(self, page: PreparedPage | None) -> None:
        assert self._held_run is not None
        with self._session.writer(durable=False) as writer:
            if page is not None:
                writer.insert_devices(page.inserts, page.now)
                writer.update_devices(page.updates, page.now)
                writer.refresh_devices(page.refreshes, page.now)
                writer.add_history(page.changes)
                writer.touch(page.touches, page.now)
            writer.bump_run(self._held_run, self._held)
        self._held.clear()
        self._held_run = None
        self._counted_at = time.monotonic()
