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
  from a probe's success (1) back to 32, 31 seconds (unless the round trips show a queue first:
  from then on they say when it grows, as below).

It also follows the round trips, like TCP Vegas: concurrency only helps while the answers come back
as fast as when little was in flight. Each successful answer's round trip is set against the fastest
of its operation and size (within a factor of 2) over the last ten to twenty seconds; the requests
that were in flight with it times the share of its round trip that was waiting is how many of them
queued somewhere (at the server, or in this process waiting to be read) rather than travelled. More
than a few queued (``_most_queued``) lowers the limit, at once, to what was travelling plus a little
(never below 2); none queued while the limit was used grows it by one a round. The limit starts at 2
and doubles a round at a time until a queue or a 429 shows or it reaches the maximum (slow start),
so the first requests of a process do not all go out at once either. So against a server a few
milliseconds away, which answers one request at a time, about 2 or 3 are in flight - as many as help
- and a storm of 429s meets that many, not every request the windows would allow; at 50 ms the limit
reaches ``api.max_concurrency`` in a few rounds and stays there while the round trips do not grow with
what is in flight.

Waits are bounded by the caller's deadline and end early on a stop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.errors import RequestTimeoutError, StoppedError
from syncd.metrics import (
    BUDGET_CONCURRENCY,
    BUDGET_IN_FLIGHT,
    BUDGET_QUEUEING,
    BUDGET_THROTTLED,
    BUDGET_WAIT,
    RETRY_AFTER_WAIT,
)

POLL = 0.1  # seconds between looks at the stop event while waiting for a turn
GROWTH_PERIOD = 1.0  # seconds at least between two increases of the concurrency after a 429 or 503
FASTEST_WINDOW = 10.0  # seconds: an operation's fastest round trip is the least of this window and the last
DELAY_FLOOR = 2  # the round trips alone never lower the concurrency below this
SLOW_START = 2  # the first limit, doubled each round until a queue or a 429 shows


def _least_queued(limit: int) -> float:
    """Requests queued (by the round trips) below which the limit may grow: 0.5 up to a limit of 2,
    1 at 5, 1.8 at 16."""
    return max(0.5, 1.5 * math.log10(limit))


def _most_queued(limit: int) -> float:
    """Requests queued above which the limit falls: 1.5 up to a limit of 3, 3.6 at 16."""
    return max(1.5, 3.0 * math.log10(limit))


@dataclass(frozen=True, slots=True)
class Turn:
    """A request's place in the budget, handed back with its outcome."""

    generation: int  # how many decreases the budget had made when the request was sent
    pauses: int = 0  # how many Retry-After pauses the budget had begun when the request was sent
    what: str = "request"  # the operation, whose round trips are compared with each other
    sent_at: float = 0.0  # when the turn was given (the budget's clock)
    in_flight: int = 1  # requests in flight with this one, itself included, when it was sent
    changes: int = 0  # how many times the limit had changed when the request was sent


class RequestBudget:
    """Shared by every thread of a process that calls OpenApp; thread-safe."""

    def __init__(
        self,
        max_concurrency: int,
        max_rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        start: int = SLOW_START,
    ) -> None:
        """``max_rate``: requests started per second at most (0: no limit). ``start``: the first
        limit, doubled a round at a time while the round trips show no queue (slow start)."""
        self.max_concurrency = max(1, max_concurrency)
        self.max_rate = max_rate
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = max(1, min(start, self.max_concurrency))
        self._slow_start = self._limit < self.max_concurrency  # until the first decrease or the maximum
        self._in_flight = 0
        self._decreases = 0
        self._successes = 0
        self._changed_at = clock()
        self._paused_until = 0.0
        self._pauses = 0
        self._probing = False  # after a pause: concurrency 1 until a request sent after it succeeds
        # After a 429 or 503, until back at the maximum or a queue shows: grow at most once a second.
        self._cautious = False
        self._changes = 0
        # (operation, answer size's bit length) -> fastest round trip (this window's, the last one's)
        self._fastest: dict[tuple[str, int], tuple[float, float]] = {}
        self._window_ends = clock() + FASTEST_WINDOW
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
                        return Turn(self._decreases, self._pauses, what, now, self._in_flight, self._changes)
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
        self,
        turn: Turn,
        *,
        throttled: bool = False,
        retry_after: float | None = None,
        ok: bool = False,
        size: int = 0,
    ) -> float:
        """Hand a turn back. ``throttled``: OpenApp answered 429 or 503 (``retry_after``: its hint in
        seconds); ``ok``: a successful answer, of ``size`` bytes (its round trip is compared with
        those of answers of about that size). Anything else (other errors) leaves the limit alone.
        Returns when the pause this answer asked for ends (on the budget's clock; now when it asked
        for none): the caller waits that out itself, and any longer pause at :meth:`acquire`."""
        with self._cond:
            self._in_flight -= 1
            now = self._clock()
            if throttled:
                self._throttled(turn, now, retry_after)
            elif self._probing:
                # Only a success of a request sent after the latest pause ends the probing (one
                # sent before it says nothing about the server now); the growth counts from there.
                if ok and turn.pauses == self._pauses:
                    self._probing = False
                    self._successes = 0
                    self._changed_at = now
            elif ok:
                self._succeeded(turn, now, size)
            BUDGET_IN_FLIGHT.set(self._in_flight)
            self._cond.notify_all()
            return now + retry_after if throttled and retry_after else now

    def _throttled(self, turn: Turn, now: float, retry_after: float | None) -> None:
        """A 429 or 503: halve (once a round), and pause for its Retry-After. Called with the lock held."""
        self._cautious = True
        self._slow_start = False
        if turn.generation == self._decreases:  # one halving per round of requests
            self._decreases += 1
            self._set_limit(max(1, self._limit // 2), now)
            BUDGET_THROTTLED.inc()
        if retry_after:
            self._paused_until = max(self._paused_until, now + retry_after)
            self._pauses += 1
            self._probing = True
            self._set_limit(1, now)

    def _succeeded(self, turn: Turn, now: float, size: int) -> None:
        """A success: lower the limit if the round trips show a queue, else count it towards growth.
        Called with the lock held."""
        queued = self._queued(turn, now, size)
        if queued > _most_queued(self._limit):
            if turn.changes == self._changes and self._limit > DELAY_FLOOR:  # once a round
                travelling = turn.in_flight - queued
                lowered = max(DELAY_FLOOR, min(self._limit - 1, math.ceil(travelling + _least_queued(self._limit))))
                self._decreases += 1  # a 429 to a request sent before this does not halve it again
                self._set_limit(lowered, now)
                self._slow_start = False
                self._cautious = False  # the round trips hold the limit now; they say when to grow
                BUDGET_QUEUEING.inc()
            return
        if queued >= _least_queued(self._limit) or self._limit >= self.max_concurrency:
            return
        if self._cautious:  # back from a 429 or 503: a round of successes, at most once a second
            self._successes += 1
            if self._successes >= self._limit and now - self._changed_at >= GROWTH_PERIOD:
                self._set_limit(self._limit + 1, now)
                self._cautious = self._limit < self.max_concurrency
        elif turn.in_flight >= self._limit and turn.changes == self._changes:
            # Once a round, and only when the limit was what held the requests back: otherwise
            # nothing says more would help.
            grown = self._limit * 2 if self._slow_start else self._limit + 1
            self._set_limit(min(grown, self.max_concurrency), now)

    def _queued(self, turn: Turn, now: float, size: int) -> float:
        """How many of the requests in flight with ``turn`` were queued rather than travelling, by its
        round trip against the fastest of its operation and size (within a factor of 2) in the last
        10-20 seconds (0 without a round trip to go by)."""
        if now >= self._window_ends:
            idle = now >= self._window_ends + FASTEST_WINDOW  # nothing to carry over from before a gap
            self._fastest = {
                key: (math.inf, math.inf if idle else fastest) for key, (fastest, _) in self._fastest.items()
            }
            self._window_ends = now + FASTEST_WINDOW
        took = now - turn.sent_at
        if took <= 0:  # a clock too coarse to tell: no round trip to go by
            return 0.0
        key = (turn.what, size.bit_length())
        current, last = self._fastest.get(key, (math.inf, math.inf))
        self._fastest[key] = (min(current, took), last)
        return turn.in_flight * (1.0 - min(current, last, took) / took)

    def _set_limit(self, limit: int, now: float) -> None:
        self._limit = limit
        self._successes = 0
        self._changed_at = now
        self._changes += 1
        BUDGET_CONCURRENCY.set(limit)

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
