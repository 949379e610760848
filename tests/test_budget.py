"""The process's request budget: concurrency that halves on 429/503 and grows back, a rate limit,
and a Retry-After that holds every caller."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.api import OpenAppClient, RequestBudget
from syncd.errors import RequestTimeoutError, StoppedError, SyncdError
from syncd.simulator import Fault, Simulator, World

from .conftest import API_KEY, api_settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_throttled_round_halves_the_concurrency_once_then_it_grows_back() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    turns = [budget.acquire(deadline=1e9) for _ in range(8)]
    assert budget.in_flight == 8
    for turn in turns:  # a burst of 429s from requests sent in the same round: one halving
        budget.release(turn, throttled=True)
    assert budget.limit == 4
    turn = budget.acquire(deadline=1e9)  # sent after the decrease: its 429 halves again
    budget.release(turn, throttled=True)
    assert budget.limit == 2
    for _ in range(10):  # successes alone do not grow it within a second of the last change
        budget.release(budget.acquire(deadline=1e9), ok=True)
    assert budget.limit == 2
    for expected in (3, 4, 5):  # one more after a round (as many successes as the limit), a second apart
        clock.now += 1.0
        for _ in range(budget.limit):
            budget.release(budget.acquire(deadline=1e9), ok=True)
        assert budget.limit == expected
    budget.release(budget.acquire(deadline=1e9))  # another error leaves it alone
    assert budget.limit == 5


def test_the_limit_never_falls_below_one_nor_grows_past_the_maximum() -> None:
    clock = Clock()
    budget = RequestBudget(3, clock=clock)
    for _ in range(5):
        budget.release(budget.acquire(deadline=1e9), throttled=True)
    assert budget.limit == 1
    for _ in range(50):
        clock.now += 0.5
        budget.release(budget.acquire(deadline=1e9), ok=True)
    assert budget.limit == 3


def test_a_full_budget_waits_until_a_turn_is_handed_back_or_the_deadline() -> None:
    budget = RequestBudget(1)
    turn = budget.acquire(deadline=time.monotonic() + 1)
    with pytest.raises(RequestTimeoutError, match="no turn in the request budget"):
        budget.acquire(deadline=time.monotonic() + 0.2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StoppedError):
        budget.acquire(deadline=time.monotonic() + 5, stop=stop)
    threading.Timer(0.1, budget.release, args=[turn]).start()
    budget.acquire(deadline=time.monotonic() + 5)  # handed over


def test_retry_after_pauses_every_caller_but_not_twice_the_one_that_got_it() -> None:
    budget = RequestBudget(4)
    pause_ends = budget.release(budget.acquire(deadline=time.monotonic() + 5), throttled=True, retry_after=0.3)
    started = time.monotonic()
    budget.release(budget.acquire(deadline=started + 5, waited_until=pause_ends))  # it waits it out itself
    assert time.monotonic() - started < 0.2
    budget.release(budget.acquire(deadline=started + 5))  # every other caller waits here
    assert time.monotonic() - started >= 0.25
    budget.release(budget.acquire(deadline=time.monotonic() + 5))  # and the pause is over
    assert time.monotonic() - started < 0.6


def test_a_request_with_a_shorter_retry_after_still_waits_out_the_longer_pause() -> None:
    budget = RequestBudget(4)
    started = time.monotonic()
    first, second = budget.acquire(deadline=started + 5), budget.acquire(deadline=started + 5)
    budget.release(first, throttled=True, retry_after=0.4)
    own_pause_ends = budget.release(second, throttled=True, retry_after=0.05)
    time.sleep(0.05)  # it waits out its own hint itself, as the client does
    budget.release(budget.acquire(deadline=started + 5, waited_until=own_pause_ends))
    assert time.monotonic() - started >= 0.35  # and the other's longer one at the budget


def test_a_429_of_a_request_sent_before_a_growth_still_halves() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    budget.release(budget.acquire(deadline=1e9), throttled=True)
    assert budget.limit == 4
    in_flight = budget.acquire(deadline=1e9)  # sent after the decrease, answered after the growth
    clock.now += 1.0
    for _ in range(4):
        budget.release(budget.acquire(deadline=1e9), ok=True)
    assert budget.limit == 5
    budget.release(in_flight, throttled=True)
    assert budget.limit == 2


def test_a_caller_already_waiting_for_a_turn_waits_out_a_pause_that_begins_meanwhile() -> None:
    budget = RequestBudget(1)
    holder = budget.acquire(deadline=time.monotonic() + 5)
    got_turn_at: list[float] = []

    def wait_for_a_turn() -> None:
        budget.release(budget.acquire(deadline=time.monotonic() + 5))
        got_turn_at.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_a_turn)
    waiter.start()
    time.sleep(0.05)  # the waiter is queued behind the holder
    paused_at = time.monotonic()
    budget.release(holder, throttled=True, retry_after=0.5)
    waiter.join(timeout=5)
    assert got_turn_at and got_turn_at[0] - paused_at >= 0.45
    budget.release(budget.acquire(deadline=1e9), throttled=True, retry_after=30.0)
    with pytest.raises(RequestTimeoutError, match="Retry-After"):  # a pause past the deadline ends the wait at once
        budget.acquire(deadline=time.monotonic() + 1)


def goes_out_now(budget: RequestBudget, clock: Clock) -> bool:
    """Whether a request would get its turn without waiting (a deadline of now makes any wait an error)."""
    try:
        budget.release(budget.acquire(deadline=clock.now), ok=True)
    except RequestTimeoutError:
        return False
    return True


def test_after_a_retry_after_pause_one_probe_goes_out_alone_and_the_others_wait_for_its_answer() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    turns = [budget.acquire(deadline=1e9) for _ in range(8)]
    for turn in turns:  # a storm meets every request in flight
        budget.release(turn, throttled=True, retry_after=1.0)
    with pytest.raises(RequestTimeoutError, match="Retry-After"):
        budget.acquire(deadline=clock.now + 0.5)  # the pause holds everyone
    for _ in range(2):  # the storm goes on: each pause is followed by one probe, met by the next 429
        clock.now += 1.0
        probe = budget.acquire(deadline=clock.now)
        with pytest.raises(RequestTimeoutError, match="no turn"):
            budget.acquire(deadline=clock.now)  # the others wait until the probe answers
        budget.release(probe, throttled=True, retry_after=1.0)
        assert budget.limit == 1 and budget.probing
    clock.now += 1.0
    probe = budget.acquire(deadline=clock.now)
    assert not goes_out_now(budget, clock)
    budget.release(probe, ok=True)  # the storm is over: grow from 1 by the usual rule
    assert budget.limit == 1 and not budget.probing
    assert goes_out_now(budget, clock)  # one at a time now, but without waiting for a probe
    clock.now += 1.0
    assert goes_out_now(budget, clock)  # a round of 1 success a second later: 2
    assert budget.limit == 2
    for expected in (3, 4):
        clock.now += 1.0
        for _ in range(budget.limit):
            budget.release(budget.acquire(deadline=1e9), ok=True)
        assert budget.limit == expected


def test_only_the_success_of_a_request_sent_after_the_pause_ends_the_probing() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    sent_before = budget.acquire(deadline=1e9)
    budget.release(budget.acquire(deadline=1e9), throttled=True, retry_after=1.0)
    clock.now += 1.0
    budget.release(sent_before, ok=True)  # answered after the pause, but sent before it
    assert budget.probing and budget.limit == 1
    probe = budget.acquire(deadline=clock.now)
    budget.release(probe)  # an error that is no throttling: the next request is a probe again
    assert budget.probing
    probe = budget.acquire(deadline=clock.now)
    assert not goes_out_now(budget, clock)
    budget.release(probe, ok=True)
    assert not budget.probing


def test_a_request_waiting_behind_the_probe_honours_its_deadline_and_a_stop() -> None:
    clock = Clock()
    budget = RequestBudget(4, clock=clock, start=4)
    budget.release(budget.acquire(deadline=1e9), throttled=True, retry_after=2.0)
    clock.now += 2.0
    probe = budget.acquire(deadline=clock.now)
    with pytest.raises(RequestTimeoutError, match="no turn in the request budget"):
        budget.acquire(deadline=clock.now, what="list_devices")
    stop = threading.Event()
    stop.set()
    with pytest.raises(StoppedError):
        budget.acquire(deadline=1e9, stop=stop)
    budget.release(probe, throttled=True, retry_after=30.0)  # a pause past the deadline: at once
    with pytest.raises(RequestTimeoutError, match="Retry-After"):
        budget.acquire(deadline=clock.now + 10)
    assert budget.in_flight == 0


def test_a_throttled_answer_without_retry_after_halves_but_sends_no_probe() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    budget.release(budget.acquire(deadline=1e9), throttled=True)  # a 503 without Retry-After
    assert budget.limit == 4 and not budget.probing
    assert goes_out_now(budget, clock)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["ok", "throttled", "retry after", "error", "a second later"]), max_size=200),
    st.integers(1, 32),
)
def test_the_limit_stays_within_its_bounds(outcomes: list[str], maximum: int) -> None:
    clock = Clock()
    budget = RequestBudget(maximum, clock=clock)
    for outcome in outcomes:
        if outcome == "a second later":
            clock.now += 1.0
            continue
        turn = budget.acquire(deadline=1e9)
        retry_after = 1.0 if outcome == "retry after" else None
        budget.release(
            turn, ok=outcome == "ok", throttled=outcome in ("throttled", "retry after"), retry_after=retry_after
        )
        clock.now += retry_after or 0.0  # the caller waits the pause out
        assert 1 <= budget.limit <= maximum
        assert not budget.probing or budget.limit == 1
    assert budget.in_flight == 0


def test_the_rate_limit_spaces_requests() -> None:
    budget = RequestBudget(8, max_rate=20.0)
    started = time.monotonic()
    for _ in range(30):  # a burst of 20 (one second's worth), then 20 per second
        budget.release(budget.acquire(deadline=started + 10), ok=True)
    assert time.monotonic() - started >= 0.4


def test_a_burst_of_429s_is_followed_by_fewer_requests_per_second_not_more() -> None:
    """Eight threads call OpenApp as fast as they can through one client; a burst of 429s with
    Retry-After 1 pauses all of them and halves the concurrency, so the second after the burst sees
    fewer requests than the second before."""
    world = World(seed=5)
    (org,) = world.seed(1, 50)
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        sim.latency = 0.02
        device = world.ids(org)[0]
        with OpenAppClient(api_settings(sim, max_concurrency=8)) as client:
            stop = threading.Event()

            def call() -> None:
                while not stop.is_set():
                    with contextlib.suppress(SyncdError):  # the burst's retries may run out: call again
                        client.get_device(org, device)

            threads = [threading.Thread(target=call) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.2)
            limit_before = client.budget.limit
            burst_at = time.monotonic()
            sim.inject(Fault(status=429, retry_after="1", times=8))
            time.sleep(1.2)
            limit_after = client.budget.limit
            stop.set()
            for t in threads:
                t.join(timeout=10)
        log = sim.requests("get_device")
    per_second = Counter(math.floor(r.started - burst_at) for r in log if r.started >= burst_at - 1)
    assert limit_after < limit_before
    assert per_second[0] < per_second[-1], per_second
    assert sum(1 for r in log if r.status == 429) == 8


def test_a_storm_of_429s_meets_one_probe_per_pause_not_every_queued_request() -> None:
    """Eight threads call OpenApp as fast as they can; for 2.5 s every request is answered 429 with
    Retry-After 1. What was in flight when the storm began meets it; after that, one probe per pause
    (a sequential client's rate), and once the storm is over every caller gets its answers again."""
    world = World(seed=6)
    (org,) = world.seed(1, 50)
    world.add_key(API_KEY)
    with Simulator(world) as sim:
        device = world.ids(org)[0]
        with OpenAppClient(api_settings(sim, max_concurrency=8)) as client:
            stop = threading.Event()
            answered = Counter[int]()

            def call(number: int) -> None:
                while not stop.is_set():
                    with contextlib.suppress(SyncdError):
                        client.get_device(org, device)
                        answered[number] += 1

            threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            storm = sim.inject(Fault(status=429, retry_after="1", times=None, duration=2.5))
            time.sleep(3.5)
            answered.clear()
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=10)
        log = sim.requests("get_device")
    assert storm.first_fired_at is not None
    during = sorted((r for r in log if r.status == 429), key=lambda r: r.started)
    offsets = [round(r.started - storm.first_fired_at, 3) for r in during]
    # What was in flight as the storm began met it at once; after that, one probe per pause (at about
    # 1 s and 2 s), where every queued request used to go out after each pause.
    assert sum(1 for offset in offsets if offset >= 0.5) <= 2, offsets
    assert storm.fired == len(during)
    assert all(answered[n] > 0 for n in range(8)), answered  # nobody starves after the storm


def answer_together(budget: RequestBudget, clock: Clock, round_trips: list[float]) -> None:
    """As many requests as ``round_trips`` (at most the limit) sent at once, each answered (a success)
    after its round trip."""
    round_trips = round_trips[: budget.limit]
    sent_at = clock.now
    turns = [budget.acquire(deadline=1e9, what="list_devices") for _ in round_trips]
    for turn, took in sorted(zip(turns, round_trips, strict=True), key=lambda pair: pair[1]):
        clock.now = sent_at + took
        budget.release(turn, ok=True)


def test_round_trips_that_grow_with_what_is_in_flight_lower_the_limit_to_what_travels() -> None:
    """A server a few milliseconds away that answers one request at a time: the k-th of those sent
    together waits for the k-1 before it. The limit falls to what keeps it busy, not to 1."""
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    answer_together(budget, clock, [0.002])  # alone: the fastest round trip
    answer_together(budget, clock, [0.002 * k for k in range(1, 9)])
    assert budget.limit == 3  # once for the round: 1 travelling, about 2 more
    answer_together(budget, clock, [0.002 * k for k in range(1, 4)])
    assert budget.limit == 2
    for _ in range(5):  # one travelling and one queued behind it: kept there, not lowered, not grown
        answer_together(budget, clock, [0.002, 0.004])
    assert budget.limit == 2
    assert not budget.probing


def test_round_trips_that_barely_grow_leave_the_limit_at_its_maximum() -> None:
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    answer_together(budget, clock, [0.050])
    for round_number in range(20):  # 50 ms away, a few ms of jitter with 16 in flight
        answer_together(budget, clock, [0.050 + 0.0005 * ((k * 7 + round_number) % 11) for k in range(16)])
    assert budget.limit == 16


def test_the_limit_grows_back_a_round_at_a_time_once_the_queue_is_gone_but_only_while_it_is_used() -> None:
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    answer_together(budget, clock, [0.002])
    answer_together(budget, clock, [0.002 * k for k in range(1, 9)])
    lowered = budget.limit
    assert lowered < 8
    for _ in range(10):  # one at a time: the limit is not what holds anything back
        answer_together(budget, clock, [0.002])
    assert budget.limit == lowered
    for expected in range(lowered + 1, 9):  # the limit in use, answers as fast as alone: one more a round
        answer_together(budget, clock, [0.002] * budget.limit)
        assert budget.limit == expected
    answer_together(budget, clock, [0.002] * 8)
    assert budget.limit == 8


def test_an_operations_round_trips_are_set_against_its_own_fastest() -> None:
    """A page of 200 devices takes longer than a door-restriction read: that is no queue."""
    clock = Clock()
    budget = RequestBudget(8, clock=clock, start=8)
    for what, took in (("get_door_restrictions", 0.001), ("list_devices", 0.020)):
        turn = budget.acquire(deadline=1e9, what=what)
        clock.now += took
        budget.release(turn, ok=True)
    sent_at = clock.now
    turns = [budget.acquire(deadline=1e9, what="list_devices") for _ in range(8)]
    clock.now = sent_at + 0.021
    for turn in turns:
        budget.release(turn, ok=True)
    assert budget.limit == 8


def test_a_lasting_slowdown_stops_counting_as_a_queue_once_the_fastest_round_trip_ages_out() -> None:
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    answer_together(budget, clock, [0.010])
    answer_together(budget, clock, [0.050] * 16)  # 40 ms more at once: taken for a queue
    lowered = budget.limit
    assert lowered < 16
    for _ in range(25):  # a second apart, the slower path stays: the old fastest ages out
        clock.now += 1.0
        answer_together(budget, clock, [0.050] * budget.limit)
    assert budget.limit > lowered


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.floats(0.0005, 0.5), min_size=1, max_size=40), st.sampled_from(["", "429", "pause"])),
        max_size=40,
    ),
    st.integers(1, 32),
)
def test_round_trips_and_429s_keep_the_limit_within_its_bounds(
    rounds: list[tuple[list[float], str]], maximum: int
) -> None:
    clock = Clock()
    budget = RequestBudget(maximum, clock=clock)
    throttled = False
    for round_trips, answer in rounds:
        answer_together(budget, clock, round_trips)
        assert 1 <= budget.limit <= maximum
        if not throttled:  # the round trips alone never take it below 2
            assert min(2, maximum) <= budget.limit
        if answer:
            throttled = True
            budget.release(budget.acquire(deadline=1e9), throttled=True, retry_after=1.0 if answer == "pause" else None)
            clock.now += 1.0
            assert 1 <= budget.limit <= maximum
            assert not budget.probing or budget.limit == 1
    assert budget.in_flight == 0


def test_a_short_last_page_is_no_yardstick_for_full_pages() -> None:
    """Round trips are compared with those of answers of about the same size: a page of 3 devices
    that comes back in 3 ms does not make every full page of 20 ms look queued."""
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    for _ in range(10):
        sent_at = clock.now
        turns = [budget.acquire(deadline=1e9, what="list_devices") for _ in range(16)]
        short, *full = turns
        clock.now = sent_at + 0.003
        budget.release(short, ok=True, size=2_000)
        clock.now = sent_at + 0.020
        for turn in full:
            budget.release(turn, ok=True, size=150_000)
    assert budget.limit == 16


def test_after_an_idle_gap_the_fastest_round_trip_of_before_it_is_forgotten() -> None:
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    answer_together(budget, clock, [0.002])  # then nothing for five minutes; the path is slower now
    clock.now += 300.0
    answer_together(budget, clock, [0.020])
    answer_together(budget, clock, [0.020] * 16)
    assert budget.limit == 16


def test_a_429_to_a_request_sent_before_a_lowering_by_the_round_trips_does_not_halve_it_again() -> None:
    clock = Clock()
    budget = RequestBudget(16, clock=clock, start=16)
    answer_together(budget, clock, [0.002])
    sent_before = budget.acquire(deadline=1e9)
    answer_together(budget, clock, [0.002 * k for k in range(1, 9)])
    lowered = budget.limit
    assert lowered < 15
    budget.release(sent_before, throttled=True)
    assert budget.limit == lowered
    budget.release(budget.acquire(deadline=1e9), throttled=True)  # one sent after it does
    assert budget.limit == lowered // 2


def test_the_limit_starts_at_two_and_doubles_a_round_until_a_queue_shows_then_grows_by_one() -> None:
    clock = Clock()
    budget = RequestBudget(32, clock=clock)
    assert budget.limit == 2
    answer_together(budget, clock, [0.050])  # one alone: the limit was not used, so no growth
    assert budget.limit == 2
    for expected in (4, 8, 16):  # 50 ms away, answers as fast with more in flight: doubled a round
        answer_together(budget, clock, [0.050] * budget.limit)
        assert budget.limit == expected
    answer_together(budget, clock, [0.050 + 0.004 * k for k in range(16)])  # up to 110 ms: a queue
    lowered = budget.limit
    assert lowered < 16
    answer_together(budget, clock, [0.050] * budget.limit)  # slow start is over: one more a round
    assert budget.limit == lowered + 1


def test_a_429_ends_the_slow_start() -> None:
    clock = Clock()
    budget = RequestBudget(32, clock=clock)
    answer_together(budget, clock, [0.050] * 2)
    assert budget.limit == 4
    budget.release(budget.acquire(deadline=1e9), throttled=True)
    assert budget.limit == 2
    for _ in range(5):  # back from a 429: a round of successes, at most one more a second
        clock.now += 1.0
        answer_together(budget, clock, [0.050] * budget.limit)
    assert budget.limit == 7


def test_many_callers_behind_a_low_limit_each_get_their_turns_and_never_more_than_it() -> None:
    """Every caller still gets its turns, and no more than the limit are ever in flight at once."""
    budget = RequestBudget(2, start=2)
    most = [0]
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(20):
            turn = budget.acquire(deadline=time.monotonic() + 10)
            with lock:
                most[0] = max(most[0], budget.in_flight)
            time.sleep(0.001)
            budget.release(turn, ok=True)

    started = time.monotonic()
    threads = [threading.Thread(target=caller) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert most[0] <= 2 and budget.in_flight == 0
    assert time.monotonic() - started < 5.0  # 240 turns of 1 ms, two at a time
