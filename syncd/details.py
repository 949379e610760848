"""What a pass reads after its scan, beyond list_devices: the door restrictions of portals and the
metadata definition of each integration's provider (README, "Door restrictions and metadata
definitions").

Rules:
- it runs after the scan and purge detection, so it can never make them fail or skip;
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
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from syncd.api import OpenAppClient
from syncd.api.ahead import in_order
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

BATCH = 50
BATCH_ENTITIES = 20_000
MAX_FAILURES_IN_A_ROW = 5  # a few doors may be unreachable (error_code door_unreachable); five is OpenApp
RETRY_BASE = 60.0
Item = TypeVar("Item")
Answer = TypeVar("Answer")


class DetailReads:
    """The reads after one pass's scan; call :meth:`run` once. Returns the pass's counters."""

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
        self.saw = saw  # which of some ids the scan took
        self.deadline = deadline
        self.stop = stop
        self.log = log  # the pass's, its context bound
        self.restrictions = PortalRestrictions(store, session)
        self.definitions = MetadataDefinitions(store, session)

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

    def _door_restrictions(self) -> Counter[str]:
        if self.org.device_kind not in (None, PORTAL_KIND):
            return Counter()  # the scan took only devices of another kind
        interval = self.settings.door_restrictions_interval
        due = self.restrictions.due(self.org.id, utcnow(), self.inventory.portals, self.saw)
        if not due:
            return Counter()
        self.log.debug("asking portals for their door restrictions", portals=len(due))

        def ask(portal: DuePortal) -> RestrictionsAnswer:
            return self._ask_portal(portal, interval)

        def failed(portal: DuePortal, exc: SyncdError) -> RestrictionsAnswer:
            failures = portal.failures + 1
            again = retry_at(failures, interval)
            return RestrictionsAnswer(
                portal.device_id, portal.fingerprint, RestrictionStatus.FAILED, again, error=str(exc), failures=failures
            )

        changed = 0

        def record(answers: list[RestrictionsAnswer]) -> None:
            nonlocal changed
            changed += self.restrictions.record(self.org.id, self.run_id, utcnow(), answers)

        def weight(answer: RestrictionsAnswer) -> int:
            return 1 + (len(answer.restrictions.entity_ids) if answer.restrictions else 0)

        requests, failures = self._ask_each("door restrictions", due, ask, failed, record, weight)
        return Counter(restrictions=changed, restriction_requests=requests, restriction_failures=failures)

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

        def record(answers: list[DefinitionAnswer]) -> None:
            for integration_id in self.definitions.record(self.org.id, utcnow(), answers):
                self.log.info("a provider's metadata schema changed", integration_id=integration_id)

        requests, failures = self._ask_each("metadata definitions", due, ask, failed, record, lambda _: 1)
        return Counter(definition_requests=requests, definition_failures=failures)

    # -- the loop --------------------------------------------------------------------------------

    def _ask_each(
        self,
        what: str,
        items: Iterable[Item],
        ask: Callable[[Item], Answer],
        failed: Callable[[Item, SyncdError], Answer],
        record: Callable[[list[Answer]], None],
        weight: Callable[[Answer], int],
    ) -> tuple[int, int]:
        """Ask about each item in turn (see the module's rules); returns ``(requests, failures)``.
        ``weight``: what an answer holds, for the batch bound."""
        answers: list[Answer] = []
        held = 0
        tally = Tally()
        todo = list(items)
        # As many at once as the request budget allows (for the waiting), answers taken in order here.
        asked = in_order((functools.partial(ask, item) for item in todo), self.client.budget.max_concurrency, what)
        with contextlib.closing(asked):
            for item, asking in zip(todo, asked, strict=False):
                if self.stop.is_set():
                    break
                if time.monotonic() >= self.deadline:
                    tally.ended_early = "the pass reached sync.pass_timeout"
                    break
                tally.requests += 1
                try:
                    answer = asking.result()
                    tally.in_a_row = 0
                except StoppedError:
                    tally.requests -= 1  # not answered, not failed: asked again next pass
                    break
                except SyncdError as exc:
                    answer = failed(item, exc)
                    tally.failed(exc)
                answers.append(answer)
                held += weight(answer)
                if tally.ended_early:
                    break
                if len(answers) >= BATCH or held >= BATCH_ENTITIES:
                    record(answers)
                    answers, held = [], 0
        record(answers)
        tally.report(self.log, what)
        return tally.requests, tally.failures


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
