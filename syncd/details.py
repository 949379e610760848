"""What a pass reads after its scan, beyond list_devices: the door restrictions of portals and the
metadata definition of each integration's provider (README, "Door restrictions and metadata
definitions").

Rules:
- it runs after the scan and purge detection, so it can never make them fail or skip;
- OpenApp has no bulk endpoint: one request per portal, asked when the portal is new or its device
  changed, else once per ``sync.door_restrictions_interval`` (a portal's first answer is followed
  by a refresh 1-2 intervals later, at a point fixed by its id, so that portals first asked
  together are then asked spread over the passes of an interval); one request per integration
  once per ``sync.metadata_definitions_interval``. An org without portals asks nothing;
- every answer costs only itself: one that fails (after the client's retries) keeps what the
  mirror has and is asked again at the next pass;
- the phase ends early, leaving the rest due, at a 401 or 403 (every request would get it), after
  :data:`MAX_FAILURES_IN_A_ROW` transient failures in a row (OpenApp is failing now), at the
  pass's deadline and on a stop;
- answers are written :data:`BATCH` at a time, each batch in one transaction.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from syncd.api import OpenAppClient
from syncd.config import OrgSettings, SyncSettings
from syncd.errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    RejectedError,
    StoppedError,
    SyncdError,
    TransientError,
)
from syncd.models import PORTAL_KIND, Inventory, utcnow
from syncd.store import Store
from syncd.store.details import (
    DefinitionAnswer,
    DueIntegration,
    DuePortal,
    MetadataDefinitions,
    PortalRestrictions,
    RestrictionsAnswer,
)

BATCH = 50
MAX_FAILURES_IN_A_ROW = 3
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
        deadline: float,
        stop: threading.Event,
        log: Any,
    ) -> None:
        self.client = client
        self.org = org
        self.settings = settings
        self.run_id = run_id
        self.inventory = inventory
        self.deadline = deadline
        self.stop = stop
        self.log = log  # the pass's, its context bound
        self.restrictions = PortalRestrictions(store)
        self.definitions = MetadataDefinitions(store)

    def run(self) -> Counter[str]:
        """Ask what is due; counters ``restrictions`` (portals whose list changed),
        ``restriction_requests``, ``restriction_failures``, ``definition_requests``, ``definition_failures``."""
        counts: Counter[str] = Counter()
        if self.settings.door_restrictions and self.org.device_kind in (None, PORTAL_KIND):
            counts += self._door_restrictions()
        if self.settings.metadata_definitions and not self.stop.is_set():
            counts += self._metadata_definitions()
        return counts

    # -- door restrictions -----------------------------------------------------------------------

    def _door_restrictions(self) -> Counter[str]:
        interval = self.settings.door_restrictions_interval
        due = self.restrictions.due(self.org.id, utcnow(), self.inventory.portals)
        if not due:
            return Counter()
        self.log.debug("asking portals for their door restrictions", portals=len(due))

        def ask(portal: DuePortal) -> RestrictionsAnswer:
            try:
                restrictions = self.client.get_door_restrictions(self.org.id, portal.device_id, deadline=self.deadline)
            except NotFoundError as exc:  # gone since the scan: purge detection will tell; restrictions kept
                return self._answer(portal, "not_found", interval, error=str(exc))
            except RejectedError as exc:
                if exc.status != 400:
                    raise
                return self._answer(portal, "not_a_portal", interval, error=str(exc))
            return self._answer(portal, "ok", interval, restrictions=restrictions)

        def failed(portal: DuePortal, exc: SyncdError) -> RestrictionsAnswer:
            return RestrictionsAnswer(portal.device_id, portal.fingerprint, "failed", utcnow(), error=str(exc))

        changed = 0

        def record(answers: list[RestrictionsAnswer]) -> None:
            nonlocal changed
            changed += self.restrictions.record(self.org.id, self.run_id, utcnow(), answers)

        requests, failures = self._ask_each("door restrictions", due, ask, failed, record)
        return Counter(restrictions=changed, restriction_requests=requests, restriction_failures=failures)

    @staticmethod
    def _answer(portal: DuePortal, status: str, interval: float, **found: Any) -> RestrictionsAnswer:
        stretch = 1.0 if portal.answered else 1.0 + spread(portal.device_id)
        next_fetch_at = utcnow() + timedelta(seconds=interval * stretch)
        return RestrictionsAnswer(portal.device_id, portal.fingerprint, status, next_fetch_at, **found)

    # -- metadata definitions --------------------------------------------------------------------

    def _metadata_definitions(self) -> Counter[str]:
        interval = timedelta(seconds=self.settings.metadata_definitions_interval)
        due = self.definitions.due(self.org.id, utcnow(), self.inventory.integrations)

        def ask(item: DueIntegration) -> DefinitionAnswer:
            definition = self.client.get_metadata_definition(self.org.id, item.device_id, deadline=self.deadline)
            return DefinitionAnswer(item.integration_id, item.device_id, utcnow() + interval, definition=definition)

        def failed(item: DueIntegration, exc: SyncdError) -> DefinitionAnswer:
            return DefinitionAnswer(item.integration_id, item.device_id, utcnow(), error=str(exc))

        def record(answers: list[DefinitionAnswer]) -> None:
            for integration_id in self.definitions.record(self.org.id, utcnow(), answers):
                self.log.info("a provider's metadata schema changed", integration_id=integration_id)

        requests, failures = self._ask_each("metadata definitions", due, ask, failed, record)
        return Counter(definition_requests=requests, definition_failures=failures)

    # -- the loop --------------------------------------------------------------------------------

    def _ask_each(
        self,
        what: str,
        items: Iterable[Item],
        ask: Callable[[Item], Answer],
        failed: Callable[[Item, SyncdError], Answer],
        record: Callable[[list[Answer]], None],
    ) -> tuple[int, int]:
        """Ask about each item in turn (see the module's rules); returns ``(requests, failures)``."""
        answers: list[Answer] = []
        requests = failures = in_a_row = 0
        first_error: SyncdError | None = None
        ended_early = ""
        for item in items:
            if self.stop.is_set():
                break
            if time.monotonic() >= self.deadline:
                ended_early = "the pass reached sync.pass_timeout"
                break
            requests += 1
            try:
                answers.append(ask(item))
                in_a_row = 0
            except StoppedError:
                requests -= 1  # not answered, not failed: asked again next pass
                break
            except SyncdError as exc:
                answers.append(failed(item, exc))
                failures += 1
                first_error = first_error or exc
                in_a_row = in_a_row + 1 if isinstance(exc, TransientError) else 0
                if isinstance(exc, AuthError | ForbiddenError):
                    ended_early = "OpenApp refused the key"
                    break
                if in_a_row >= MAX_FAILURES_IN_A_ROW:
                    ended_early = f"{in_a_row} requests in a row failed"
                    break
            if len(answers) >= BATCH:
                record(answers)
                answers = []
        record(answers)
        if failures:
            self.log.warning(
                f"{what}: {failures} request(s) failed; the mirror keeps what it had and asks again next pass",
                first_error=str(first_error),
            )
        if ended_early:
            self.log.warning(f"{what}: stopped early, the rest are asked next pass", reason=ended_early)
        return requests, failures


def spread(device_id: str) -> float:
    """A fraction in [0, 1) fixed by the id, evenly spread over ids."""
    return zlib.crc32(device_id.encode()) / 2**32
