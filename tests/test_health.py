"""The health rules and the auth gate, driven by an injected clock (no waiting)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from syncd.health import AuthGate, Board, healthy, max_age

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_max_age_is_twice_the_interval_at_least_five_minutes() -> None:
    assert max_age(900) == 1800 and max_age(60) == 300 and max_age(150) == 300
    assert healthy(T0, T0 + timedelta(seconds=300), 300) and not healthy(T0, T0 + timedelta(seconds=301), 300)
    assert not healthy(None, T0, 300)


def test_a_failing_org_backs_off_and_its_transitions_are_told_once() -> None:
    now = [T0]
    board = Board(clock=lambda: now[0])
    first = board.record("a", "failed", interval=60, backoff_max=600, stopping=False)
    assert first.started_failing and first.failures == 1 and first.backoff == 0  # the next pass is due anyway
    backoffs = [board.record("a", "failed", 60, 600, False) for _ in range(5)]
    assert not any(v.started_failing for v in backoffs)
    assert [v.backoff for v in backoffs] == [120, 240, 480, 600, 600]  # doubling, capped
    recovered = board.record("a", "succeeded", 60, 600, False)
    assert recovered.recovered_after == 6 and not board.record("a", "succeeded", 60, 600, False).recovered_after
    assert board.record("a", "aborted", 60, 600, stopping=True).failures == 0  # a shutdown is no failure
    assert board.record("a", "skipped", 60, 600, False).failures == 0
    assert board.totals() == {"failed": 6, "succeeded": 2, "aborted": 1, "skipped": 1}


def test_the_summary_counts_orgs_as_syncd_status_does() -> None:
    now = [T0]
    board = Board(clock=lambda: now[0])
    board.seed({"old": T0 - timedelta(hours=2), "recent": T0 - timedelta(minutes=10)})
    board.record("failing", "failed", 60, 600, False)
    assert board.summary({"old": 900, "recent": 900, "failing": 60, "new": 900}) == (1, 3, 1)
    now[0] += timedelta(minutes=30)
    assert board.summary({"recent": 900}) == (0, 1, 0)  # 40 minutes > 2 x 15 minutes


def test_the_auth_gate_lets_one_probe_through_per_pause() -> None:
    clock = [0.0]
    gate = AuthGate(clock=lambda: clock[0])
    assert gate.admit("a") and gate.admit("b")  # open
    assert gate.rejected(60) and not gate.rejected(60)  # the first rejection changes the state
    assert gate.paused and not gate.admit("a")
    clock[0] = 61.0
    assert gate.admit("a") and not gate.admit("b")  # one probe at a time
    gate.done("a")
    assert gate.rejected(60) is False and not gate.admit("b")  # the probe failed: a new pause
    clock[0] = 200.0
    assert gate.admit("b")
    assert gate.accepted() and not gate.paused and gate.admit("a") and not gate.accepted()
