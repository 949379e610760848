"""One request budget per process: every request to OpenApp waits here for its turn.

The budget bounds how many requests are in flight (``api.max_concurrency``) and, when set, how many
start per second (``api.max_requests_per_second``, a token bucket with one second of burst). It
adapts to OpenApp's load signals like TCP's congestion window (AIMD):

- a 429 or 503 halves the concurrency (never below 1), once per round: answers to requests that
  were sent before the last decrease do not decrease it again, so a burst of 429s from requests
  already in flight costs one halving, not one per answer;
- a ``Retry-After`` pauses every caller until it runs out, not just the request that got it: each
  waits it out in :meth:`RequestBudget.acquire` (the one that got it waits with its own retry delay);
- after such a pause one request goes out alone, a probe: the concurrency is 1 until a request sent
  after the pause succeeds, so a storm of 429s meets one request per pause, not every queued one at
  once; another ``Retry-After`` starts the next pause, and again one probe after it;
- after as many successes in a row as the current concurrency (one round), and at most once per
  second, it grows by one again, up to ``api.max_concurrency``: from 4 back to 8 takes 4 seconds,
  from a probe's success (1) back to 16, 15 seconds.

Waits are bounded by the caller's deadline and end early on a stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.errors import RequestTimeoutError, StoppedError
from syncd.metrics import BUDGET_CONCURRENCY, BUDGET_IN_FLIGHT, BUDGET_THROTTLED, BUDGET_WAIT, RETRY_AFTER_WAIT

POLL = 0.1  # seconds between looks at the stop event while waiting for a turn
GROWTH_PERIOD = 1.0  # seconds at least between two increases of the concurrency


@dataclass(frozen=True, slots=True)
class Turn:
    """A request's place in the budget, handed back with its outcome."""

    generation: int  # how many decreases the budget had made when the request was sent
    pauses: int = 0  # how many Retry-After pauses the budget had begun when the request was sent


class RequestBudget:
    """Shared by every thread of a process that calls OpenApp; thread-safe."""

    def __init__(
        self,
        max_concurrency: int,
        max_rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_rate``: requests started per second at most (0: no limit)."""
        self.max_concurrency = max(1, max_concurrency)
        self.max_rate = max_rate
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = self.max_concurrency
        self._in_flight = 0
        self._decreases = 0
        self._successes = 0
        self._changed_at = clock()
        self._paused_until = 0.0
        self._pauses = 0
        self._probing = False  # after a pause: concurrency 1 until a request sent after it succeeds
        self._tokens = max(1.0, max_rate)
        self._refilled = clock()
        BUDGET_CONCURRENCY.set(self._limit)

    @property
    def limit(self) -> int:
        """The concurrency allowed right now."""
        return self._limit

    @property
    def probing(self) -> bool:
        """True from a Retry-After pause until a request sent after it succeeds."""
        return self._probing

    @property
    def in_flight(self) -> int:
        """Requests holding a turn right now."""
        return self._in_flight

    def acquire(
        self,
        deadline: float,
        stop: threading.Event | None = None,
        what: str = "request",
        waited_until: float = 0.0,
    ) -> Turn:
        """Wait for a turn: for a Retry-After pause to end, for room under the concurrency limit, for
        the rate limit. RequestTimeoutError at ``deadline`` (monotonic; at once when a pause outlasts
        it), StoppedError on ``stop``. ``waited_until``: the end of a pause the caller waited out
        itself, as :meth:`release` returned it (the request that got the Retry-After)."""
        started = self._clock()
        paused = 0.0  # seconds of the wait that were a Retry-After pause
        with self._cond:
            try:
                while True:
                    now = self._clock()
                    pause = self._paused_until - now if self._paused_until > max(now, waited_until) else 0.0
                    if pause and now + pause > deadline:
                        raise RequestTimeoutError(
                            f"{what}: OpenApp asked for a pause of {pause:.1f}s more (Retry-After), past the deadline"
                        )
                    wait = pause or self._wait_needed(now)
                    if wait <= 0:
                        self._in_flight += 1
                        if self.max_rate > 0:
                            self._tokens -= 1.0
                        BUDGET_IN_FLIGHT.set(self._in_flight)
                        return Turn(self._decreases, self._pauses)
                    if stop is not None and stop.is_set():
                        raise StoppedError(f"{what}: not sent, syncd is stopping")
                    if now >= deadline:
                        raise RequestTimeoutError(
                            f"{what}: no turn in the request budget before the deadline "
                            f"({self._in_flight} in flight, concurrency {self._limit})"
                        )
                    self._cond.wait(min(wait, deadline - now, POLL))
                    if pause:
                        paused += self._clock() - now
            finally:
                waited = self._clock() - started
                if waited > 0:
                    BUDGET_WAIT.inc(waited)
                if paused > 0:
                    RETRY_AFTER_WAIT.labels(what).inc(paused)

    def release(
        self, turn: Turn, *, throttled: bool = False, retry_after: float | None = None, ok: bool = False
    ) -> float:
        """Hand a turn back. ``throttled``: OpenApp answered 429 or 503 (``retry_after``: its hint in
        seconds); ``ok``: a successful answer. Anything else (other errors) leaves the limit alone.
        Returns when the pause this answer asked for ends (on the budget's clock; now when it asked
        for none): the caller waits that out itself, and any longer pause at :meth:`acquire`."""
        with self._cond:
            self._in_flight -= 1
            now = self._clock()
            if throttled:
                if turn.generation == self._decreases:  # one halving per round of requests
                    self._decreases += 1
                    self._limit = max(1, self._limit // 2)
                    self._successes = 0
                    self._changed_at = now
                    BUDGET_THROTTLED.inc()
                if retry_after:
                    self._paused_until = max(self._paused_until, now + retry_after)
                    self._pauses += 1
                    self._probing = True
                    self._limit = 1
                BUDGET_CONCURRENCY.set(self._limit)
            elif self._probing:
                # Only a success of a request sent after the latest pause ends the probing (one
                # sent before it says nothing about the server now); the growth counts from there.
                if ok and turn.pauses == self._pauses:
                    self._probing = False
                    self._successes = 0
                    self._changed_at = now
            elif ok and self._limit < self.max_concurrency:
                self._successes += 1
                if self._successes >= self._limit and now - self._changed_at >= GROWTH_PERIOD:
                    self._limit += 1
                    self._successes = 0
                    self._changed_at = now
                    BUDGET_CONCURRENCY.set(self._limit)
            BUDGET_IN_FLIGHT.set(self._in_flight)
            self._cond.notify_all()
            return now + retry_after if throttled and retry_after else now

    def _wait_needed(self, now: float) -> float:
        """Seconds to wait for room under the limits (0: none). Called with the lock held."""
        if self._in_flight >= self._limit:
            return POLL  # woken by a release
        if self.max_rate > 0:
            self._tokens = min(max(1.0, self.max_rate), self._tokens + (now - self._refilled) * self.max_rate)
            self._refilled = now
            if self._tokens < 1.0:
                return (1.0 - self._tokens) / self.max_rate
        return 0.0
