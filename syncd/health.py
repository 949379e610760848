"""How orgs are doing, and what syncd does about it: one home for the rules.

- :func:`max_age`: when an org counts as healthy; the same rule for ``syncd status``, the daemon's
  STATUS line and the ``syncd_org_max_age_seconds`` metric.
- :class:`Board`: the orgs' recent passes as the daemon sees them (failing since when, last
  success), thread-safe, with the transitions worth a log line and the backoff of a failing org.
- :class:`AuthGate`: while OpenApp rejects the API key, work pauses: one probe at a time, at most
  one per pause. Shared by the daemon's passes and the write-back reconciler.

All of them take their clock from the caller (the daemon's :class:`Clock`), so tests drive time
instead of waiting for it; the Board and the gate keep their own Prometheus gauges in step (failing
orgs, the pause).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from syncd.backoff import backoff_ceiling
from syncd.metrics import AUTH_PAUSED, LAST_SUCCESS, ORG_FAILING
from syncd.vocab import PassStatus

MIN_MAX_AGE = 300.0  # seconds: below this, ordinary jitter and retries would flap the check


def max_age(interval: float) -> float:
    """The oldest a last successful pass may be for an org synced every ``interval`` seconds:
    twice the interval (one missed pass is tolerated), at least five minutes."""
    return max(2 * interval, MIN_MAX_AGE)


def healthy(last_success: datetime | None, now: datetime, limit: float) -> bool:
    """Whether a last success at ``last_success`` is recent enough at ``now`` (``limit`` seconds)."""
    return last_success is not None and (now - last_success).total_seconds() <= limit


@dataclass
class OrgHealth:
    """One org's recent passes."""

    failures: int = 0  # consecutive failed passes
    last_success: datetime | None = None


def utc_now() -> datetime:
    """The wall clock, as an aware UTC datetime."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Clock:
    """The daemon's time: wall time (schedules, last successes) and monotonic seconds (pauses).
    Tests pass one they move themselves."""

    now: Callable[[], datetime] = utc_now
    monotonic: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Verdict:
    """What one outcome means: a transition worth a log line, and when to try again."""

    started_failing: bool = False
    recovered_after: int = 0  # failures before this success (0: it was not failing)
    failures: int = 0
    backoff: float = 0.0  # seconds until the next pass, when longer than the interval (else 0)


@dataclass
class Board:
    """Every org's health, for the daemon: updated from pass threads, read by the main loop."""

    clock: Callable[[], datetime] = utc_now
    _orgs: dict[str, OrgHealth] = field(default_factory=dict)
    _totals: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def seed(self, last_successes: dict[str, datetime]) -> None:
        """Start from what the mirror recorded (so a restart agrees with ``syncd status``, and the
        last-success gauge is not empty until each org's next pass)."""
        with self._lock:
            for org_id, when in last_successes.items():
                self._orgs.setdefault(org_id, OrgHealth()).last_success = when
                LAST_SUCCESS.labels(org_id).set(when.timestamp())

    def record(self, org_id: str, status: PassStatus, interval: float, backoff_max: float, stopping: bool) -> Verdict:
        """Take a pass's outcome (``status`` of :class:`~syncd.sync.PassOutcome`) into account."""
        with self._lock:
            self._totals[status] += 1
            org = self._orgs.setdefault(org_id, OrgHealth())
            if status == PassStatus.SUCCEEDED:
                failures, org.failures = org.failures, 0
                org.last_success = self.clock()
                ORG_FAILING.labels(org_id).set(0)
                return Verdict(recovered_after=failures)
            if status == PassStatus.SKIPPED or (status == PassStatus.ABORTED and stopping):
                return Verdict(failures=org.failures)
            org.failures += 1
            ORG_FAILING.labels(org_id).set(1)
            wait = backoff_ceiling(org.failures, interval, max(interval, backoff_max))
            return Verdict(
                started_failing=org.failures == 1, failures=org.failures, backoff=wait if wait > interval else 0.0
            )

    def forget(self, org_ids: Iterable[str]) -> None:
        """Drop orgs no longer configured."""
        with self._lock:
            for org_id in org_ids:
                self._orgs.pop(org_id, None)

    def totals(self) -> dict[str, int]:
        """Passes by outcome since the daemon started."""
        with self._lock:
            return dict(self._totals)

    def summary(self, org_intervals: dict[str, float]) -> tuple[int, int, int]:
        """``(ok, stale, failing)`` over the configured orgs: ok by :func:`max_age`, as ``syncd status``
        says; failing, whose last pass failed."""
        now = self.clock()
        with self._lock:
            orgs = [(self._orgs.get(org_id) or OrgHealth(), interval) for org_id, interval in org_intervals.items()]
        ok = sum(1 for org, interval in orgs if healthy(org.last_success, now, max_age(interval)))
        return ok, len(orgs) - ok, sum(1 for org, _ in orgs if org.failures)


class AuthGate:
    """While OpenApp rejects the API key, work waits: one probe at a time, at most one per pause.

    ``clock``: monotonic seconds. :meth:`rejected` and :meth:`accepted` say whether they changed
    the state, so callers log a state change once, not every repeat.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._paused_until: float | None = None
        self._probe: str | None = None

    @property
    def paused(self) -> bool:
        """Whether the key was rejected and has not been accepted since."""
        return self._paused_until is not None

    def admit(self, who: str) -> bool:
        """Whether ``who`` may call OpenApp now: always, unless paused; then only as the one probe,
        once the pause has run out. A probe ends with :meth:`done`."""
        with self._lock:
            if self._paused_until is None:
                return True
            if self._probe is not None or self._clock() < self._paused_until:
                return False
            self._probe = who
            return True

    def done(self, who: str) -> None:
        """``who`` has finished its call (probe or not)."""
        with self._lock:
            if self._probe == who:
                self._probe = None

    def rejected(self, pause: float) -> bool:
        """OpenApp answered 401: pause everything for ``pause`` seconds. True if not paused before."""
        with self._lock:
            first = self._paused_until is None
            self._paused_until = self._clock() + pause
            AUTH_PAUSED.set(1)  # under the lock: the gauge never disagrees with the gate
        return first

    def accepted(self) -> bool:
        """OpenApp accepted the key: resume. True if it had been paused."""
        with self._lock:
            was = self._paused_until is not None
            self._paused_until = None
            AUTH_PAUSED.set(0)
        return was
