"""What a pass reads after its scan, beyond list_devices: the door restrictions of portals and the
metadata definition of each integration's provider (README, "Door restrictions and metadata
definitions").

Rules:
- it can never make the scan or purge detection fail or skip: door restrictions of the portals a
  page lists are asked while the scan reads on (:meth:`DetailReads.after_page`, on the pass's
  thread between pages; the requests on threads of their own, at most half ``api.max_concurrency``
  at once, and no more waiting than the request budget lets through, which the pages share), and
  the rest after purge detection:
  those that failed last time, former portals, and what the scan went faster than. A fault while
  the scan goes on ends the asking during the scan, never the scan;
- OpenApp has no bulk endpoint: one request per portal (as many in flight as ``api.max_concurrency``
  allows, the answers taken in order on the pass's thread), asked when the portal is new or its device
  changed, else once per ``sync.door_restrictions_interval`` (a portal's first answer is followed
  by a refresh 1-2 intervals later, at a point fixed by its id, so that portals first asked
  together are then asked spread over the passes of an interval); one request per integration
  once per ``sync.metadata_definitions_interval``. An org without portals asks nothing;
- every answer costs only itself: one that fails (after the client's retries) keeps what the
  mirror has and is asked again at the next pass; after a second failure in a row it backs off
  (:data:`RETRY_BASE` seconds, doubling, at most the interval), and items that failed last time
  are asked after all others, so a few that keep failing never hold the rest up;
- the phase ends early, leaving the rest due, at a 401 or 403 (every request would get it), after
  :data:`MAX_FAILURES_IN_A_ROW` transient failures in a row (OpenApp is failing now), at the
  pass's deadline and on a stop;
- answers are written :data:`BATCH` at a time, each batch in one transaction, sooner when they
  hold :data:`BATCH_ENTITIES` entity ids (memory stays bounded whatever the answers hold);
- one phase failing (the database, say) does not keep the other from running; but once the pass
  has lost its org's lock (:class:`~syncd.errors.LockLostError`) the reads end and the pass fails.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from syncd.api import OpenAppClient
from syncd.api.ahead import Ahead, in_order
from syncd.backoff import backoff_ceiling
from syncd.config import OrgSettings, SyncSettings
from syncd.errors import (
    AuthError,
    ForbiddenError,
    LockLostError,
    NotFoundError,
    RejectedError,
    StoppedError,
    SyncdError,
    TransientError,
)
from syncd.models import PORTAL_KIND, Inventory, utcnow
from syncd.schemas import schema_problem
from syncd.store import Session, Store
from syncd.store.details import (
    DefinitionAnswer,
    DueIntegration,
    DuePortal,
    MetadataDefinitions,
    PortalRestrictions,
    RestrictionsAnswer,
)
from syncd.vocab import RestrictionStatus

# Answers per transaction: each costs a few statements whatever its size (0.4 ms an answer at 500
# on PostgreSQL, 2.3 ms at 50).
BATCH = 500
BATCH_ENTITIES = 20_000
CHECK = 50  # portals the scan listed, checked for being due at a time (the first early request waits for these)
EARLY_BACKLOG = 4  # during the scan, at most this many times the width asked and not taken yet
EARLY_CANDIDATES = 1_000  # portals the scan listed, waiting to be checked for being due
MAX_FAILURES_IN_A_ROW = 5  # a few doors may be unreachable (error_code door_unreachable); five is OpenApp
RETRY_BASE = 60.0
Item = TypeVar("Item")
Answer = TypeVar("Answer")


class DetailReads:
    """The reads of one pass beyond list_devices. :meth:`during_scan` before the scan (then
    :meth:`after_page` after each of its pages), :meth:`run` once after purge detection, and
    :meth:`close` in any case. :meth:`run` returns the pass's counters."""

    def __init__(
        self,
        client: OpenAppClient,
        store: Store,
        org: OrgSettings,
        settings: SyncSettings,
        run_id: int,
        inventory: Inventory,
        saw: Callable[[Collection[str]], set[str]],
        deadline: float,
        stop: threading.Event,
        log: Any,
        session: Session | None = None,
    ) -> None:
        """``session``: the pass's, which the answers are written through (on PostgreSQL the
        connection holding the org's lock: once that is lost, nothing more is written)."""
        self.client = client
        self.org = org
        self.settings = settings
        self.run_id = run_id
        self.inventory = inventory
        self.saw = saw  # which of some ids the scan took (once it is over)
        self.deadline = deadline
        self.stop = stop
        self.log = log  # the pass's, its context bound
        self.restrictions = PortalRestrictions(store, session)
        self.definitions = MetadataDefinitions(store, session)
        self._portals = self._restrictions_phase()  # one tally for the asking during the scan and after it
        self._early: Ahead[DuePortal, RestrictionsAnswer] | None = None  # asking during the scan
        self._early_width = 0
        self._asked_early: set[str] = set()  # portals whose answer was taken during the scan
        self._candidates: dict[str, str] = {}  # portals the scan saw, not checked yet for being due
        self._due: deque[DuePortal] = deque()  # checked, due, not asked yet

    def during_scan(self) -> None:
        """Ask about portals as the scan lists them (when door restrictions are mirrored at all)."""
        if not self.settings.door_restrictions or not self._takes_portals():
            return
        self._early_width = max(1, self.client.budget.max_concurrency // 2)
        self._early = Ahead(self._early_width, "restrictions")
        self.inventory.fresh = {}

    def after_page(self) -> None:
        """On the pass's thread, after a page of the scan is written: ask about its portals that
        are due (a batch at a time), and record the answers come in. Never raises, but
        LockLostError: a fault ends the asking during the scan, the rest is asked after it."""
        if self._early is None:
            return
        try:
            self._offer()
            for portal, answer in self._early.finished():
                if not self._take_early(portal, answer):
                    self._end_early()
                    return
        except LockLostError:
            raise
        except SyncdError as exc:
            self.log.warning(
                "door restrictions: stopped asking during the scan; the rest are asked after it", error=str(exc)
            )
            self._end_early()
        except Exception:  # a bug here must not fail the scan
            self.log.exception("door restrictions: asking during the scan failed; the rest are asked after it")
            self._end_early()

    def close(self) -> None:
        """Stop asking: what has not started is not asked (it stays due), started requests are waited for."""
        if self._early is not None:
            self._early.close()
            self._early = None
            self.inventory.fresh = None

    def run(self) -> Counter[str]:
        """Ask what is due; counters ``restrictions`` (portals whose list changed),
        ``restriction_requests``, ``restriction_failures``, ``definition_requests``, ``definition_failures``."""
        counts: Counter[str] = Counter()
        phases = [
            ("door restrictions", self._door_restrictions, self.settings.door_restrictions),
            ("metadata definitions", self._metadata_definitions, self.settings.metadata_definitions),
        ]
        for what, phase, wanted in phases:
            if not wanted or self.stop.is_set():
                continue
            try:
                counts += phase()
            except LockLostError:
                raise  # the pass stops: nothing more of it may be written
            except SyncdError as exc:
                self.log.warning(f"{what} were not mirrored this pass", error=str(exc))
        return counts

    # -- door restrictions -----------------------------------------------------------------------

    def _takes_portals(self) -> bool:
        return self.org.device_kind in (None, PORTAL_KIND)  # else the scan took only devices of another kind

    def _restrictions_phase(self) -> Phase[DuePortal, RestrictionsAnswer]:
        interval = self.settings.door_restrictions_interval

        def failed(portal: DuePortal, exc: SyncdError) -> RestrictionsAnswer:
            failures = portal.failures + 1
            again = retry_at(failures, interval)
            return RestrictionsAnswer(
                portal.device_id, portal.fingerprint, RestrictionStatus.FAILED, again, error=str(exc), failures=failures
            )

        def record(answers: list[RestrictionsAnswer]) -> int:
            return self.restrictions.record(self.org.id, self.run_id, utcnow(), answers)

        def weight(answer: RestrictionsAnswer) -> int:
            return 1 + (len(answer.restrictions.entity_ids) if answer.restrictions else 0)

        return Phase("door restrictions", failed, record, weight)

    def _ask(self, portal: DuePortal) -> Callable[[], RestrictionsAnswer]:
        return functools.partial(self._ask_portal, portal, self.settings.door_restrictions_interval)

    def _offer(self) -> None:
        """Ask about the portals the scan listed that are due, as many as the backlog has room for.
        They are checked for being due :data:`CHECK` at a time; those the backlog has no room for wait,
        up to :data:`EARLY_CANDIDATES` (more stay due for after the scan)."""
        assert self._early is not None
        self._candidates.update(self.inventory.take_fresh())
        while len(self._candidates) > EARLY_CANDIDATES:
            self._candidates.popitem()
        # The first request goes alone, since its answer may end them all (a refused key). No more
        # are asked than the request budget lets travel: the rest would only wait on threads of their own.
        backlog = EARLY_BACKLOG * self._early_width if self._portals.tally.requests else 1
        backlog = max(1, min(backlog, self.client.budget.limit))
        while len(self._early) < backlog:
            if not self._due and len(self._candidates) >= CHECK:
                batch = dict(itertools.islice(self._candidates.items(), CHECK))
                for device_id in batch:
                    del self._candidates[device_id]
                self._due.extend(self.restrictions.due_among(self.org.id, utcnow(), batch))
            if not self._due:
                return
            portal = self._due.popleft()
            self._early.submit(portal, self._ask(portal))

    def _take_early(self, portal: DuePortal, answer: Future[RestrictionsAnswer]) -> bool:
        """Take one answer asked during the scan; False when the asking must end."""
        self._asked_early.add(portal.device_id)
        return self._portals.take(portal, answer)

    def _end_early(self) -> None:
        """End the asking during the scan: what has not started stays due (asked after the scan
        unless the phase ended early); the answers of what has started are taken, so that no
        portal is asked twice in a pass."""
        assert self._early is not None
        early = self._early
        try:
            early.drop_waiting()
            for portal, answer in early.rest():
                self._take_early(portal, answer)
            self._portals.flush()
        except LockLostError:
            raise
        except SyncdError as exc:
            self.log.warning("door restrictions: answers asked during the scan were not recorded", error=str(exc))
        except Exception:  # a bug here must not fail the scan
            self.log.exception("door restrictions: answers asked during the scan were not recorded")
        finally:
            self.close()

    def _door_restrictions(self) -> Counter[str]:
        phase = self._portals
        if self._early is not None:  # the answers still to come from the asking during the scan
            for portal, answer in self._early.rest():
                if not self._goes_on(phase) or not self._take_early(portal, answer):
                    break
            self.close()
        if self._takes_portals() and not phase.tally.ended_early:
            due = self.restrictions.due(self.org.id, utcnow(), self.inventory.portals, self.saw)
            due = [portal for portal in due if portal.device_id not in self._asked_early]
            if due:
                self.log.debug("asking portals for their door restrictions", portals=len(due))
            self._ask_each(due, self._ask, phase)
        phase.finish(self.log)
        return Counter(
            restrictions=phase.recorded,
            restriction_requests=phase.tally.requests,
            restriction_failures=phase.tally.failures,
        )

    def _ask_portal(self, portal: DuePortal, interval: float) -> RestrictionsAnswer:
        try:
            restrictions = self.client.get_door_restrictions(self.org.id, portal.device_id, deadline=self.deadline)
        except NotFoundError as exc:  # gone since the scan: purge detection will tell; restrictions kept
            return self._answer(portal, RestrictionStatus.NOT_FOUND, interval, error=str(exc))
        except RejectedError as exc:
            if exc.status != 400:
                raise
            return self._answer(portal, RestrictionStatus.NOT_A_PORTAL, interval, error=str(exc))
        return self._answer(portal, RestrictionStatus.OK, interval, restrictions=restrictions)

    @staticmethod
    def _answer(portal: DuePortal, status: RestrictionStatus, interval: float, **found: Any) -> RestrictionsAnswer:
        stretch = 1.0 if portal.answered else 1.0 + spread(portal.device_id)
        next_fetch_at = utcnow() + timedelta(seconds=interval * stretch)
        return RestrictionsAnswer(portal.device_id, portal.fingerprint, status, next_fetch_at, **found)

    # -- metadata definitions --------------------------------------------------------------------

    def _metadata_definitions(self) -> Counter[str]:
        seconds = self.settings.metadata_definitions_interval
        interval = timedelta(seconds=seconds)
        due = self.definitions.due(self.org.id, utcnow(), self.inventory.integrations)

        def ask(item: DueIntegration) -> DefinitionAnswer:
            definition = self.client.get_metadata_definition(self.org.id, item.device_id, deadline=self.deadline)
            unusable = schema_problem(definition.schema)  # checked once per new answer, never fetched from
            return DefinitionAnswer(
                item.integration_id, item.device_id, utcnow() + interval, definition=definition, schema_problem=unusable
            )

        def failed(item: DueIntegration, exc: SyncdError) -> DefinitionAnswer:
            failures = item.failures + 1
            again = retry_at(failures, seconds)
            return DefinitionAnswer(item.integration_id, item.device_id, again, error=str(exc), failures=failures)

        def record(answers: list[DefinitionAnswer]) -> int:
            changed = self.definitions.record(self.org.id, utcnow(), answers)
            for integration_id in changed:
                self.log.info("a provider's metadata schema changed", integration_id=integration_id)
            return len(changed)

        phase: Phase[DueIntegration, DefinitionAnswer] = Phase("metadata definitions", failed, record, lambda _: 1)
        self._ask_each(due, lambda item: functools.partial(ask, item), phase)
        phase.finish(self.log)
        return Counter(definition_requests=phase.tally.requests, definition_failures=phase.tally.failures)

    # -- the loop --------------------------------------------------------------------------------

    def _goes_on(self, phase: Phase[Any, Any]) -> bool:
        """Whether a phase may take one more answer: not at a stop, nor at the pass's deadline."""
        if self.stop.is_set():
            return False
        if time.monotonic() >= self.deadline:
            phase.tally.ended_early = "the pass reached sync.pass_timeout"
            return False
        return True

    def _ask_each(
        self, items: Iterable[Item], ask: Callable[[Item], Callable[[], Answer]], phase: Phase[Item, Answer]
    ) -> None:
        """Ask about each item in turn (see the module's rules), as many at once as the request
        budget allows (for the waiting), the answers taken in order here by ``phase``."""
        todo = list(items)
        budget = self.client.budget
        asked = in_order((ask(item) for item in todo), budget.max_concurrency, phase.what, allowed=lambda: budget.limit)
        with contextlib.closing(asked):
            for item, asking in zip(todo, asked, strict=False):
                if not self._goes_on(phase) or not phase.take(item, asking):
                    break


class Phase(Generic[Item, Answer]):
    """What one phase's answers come to: counted (:class:`Tally`), a failed request turned into an
    answer by ``failed``, and recorded ``BATCH`` at a time (sooner when their ``weight`` reaches
    :data:`BATCH_ENTITIES`) by ``record``, which returns how many changed."""

    def __init__(
        self,
        what: str,
        failed: Callable[[Item, SyncdError], Answer],
        record: Callable[[list[Answer]], int],
        weight: Callable[[Answer], int],
    ) -> None:
        self.what = what
        self.tally = Tally()
        self.recorded = 0  # items whose recorded answer changed something
        self._failed = failed
        self._record = record
        self._weight = weight
        self._answers: list[Answer] = []
        self._held = 0

    def take(self, item: Item, asking: Future[Answer]) -> bool:
        """Take one finished request; False when the phase must end (a stop, or the tally says so)."""
        self.tally.requests += 1
        try:
            answer = asking.result()
            self.tally.in_a_row = 0
        except StoppedError:
            self.tally.requests -= 1  # not answered, not failed: asked again next pass
            return False
        except SyncdError as exc:
            answer = self._failed(item, exc)
            self.tally.failed(exc)
        self._answers.append(answer)
        self._held += self._weight(answer)
        if len(self._answers) >= BATCH or self._held >= BATCH_ENTITIES:
            self.flush()
        return not self.tally.ended_early

    def flush(self) -> None:
        """Record the answers held."""
        answers, self._answers, self._held = self._answers, [], 0
        if answers:
            self.recorded += self._record(answers)

    def finish(self, log: Any) -> None:
        """Record the answers held; log the failures and an early end, once."""
        self.flush()
        self.tally.report(log, self.what)


@dataclass
class Tally:
    """What one phase's loop asked, what failed, and why it ended early (if it did)."""

    requests: int = 0
    failures: int = 0
    in_a_row: int = 0  # transient failures in a row
    first_error: SyncdError | None = None
    ended_early: str = ""

    def failed(self, exc: SyncdError) -> None:
        """Count a failed request; the phase ends early at a refused key or too many failures in a row."""
        self.failures += 1
        self.first_error = self.first_error or exc
        self.in_a_row = self.in_a_row + 1 if isinstance(exc, TransientError) else 0
        if isinstance(exc, AuthError | ForbiddenError):
            self.ended_early = "OpenApp refused the key"
        elif self.in_a_row >= MAX_FAILURES_IN_A_ROW:
            self.ended_early = f"{self.in_a_row} requests in a row failed"

    def report(self, log: Any, what: str) -> None:
        """Log the failures and an early end, once per phase."""
        if self.failures:
            log.warning(
                f"{what}: {self.failures} request(s) failed; the mirror keeps what it had and asks again next pass",
                first_error=str(self.first_error),
            )
        if self.ended_early:
            log.warning(f"{what}: stopped early, the rest are asked next pass", reason=self.ended_early)


def retry_at(failures: int, interval: float) -> datetime:
    """When an item that failed ``failures`` times in a row is due again: at the next pass after
    the first failure, then :data:`RETRY_BASE` seconds, doubling, at most ``interval``."""
    delay = 0.0 if failures <= 1 else backoff_ceiling(failures - 1, RETRY_BASE, interval)
    return utcnow() + timedelta(seconds=delay)


def spread(device_id: str) -> float:
    """A fraction in [0, 1) fixed by the id, evenly spread over ids."""
    return zlib.crc32(device_id.encode()) / 2**32
