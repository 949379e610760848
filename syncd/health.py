"""When an org counts as healthy: one rule for `syncd status`, the daemon's STATUS line and metrics."""

from __future__ import annotations

MIN_MAX_AGE = 300.0  # seconds: below this, ordinary jitter and retries would flap the check


def max_age(interval: float) -> float:
    """The oldest a last successful pass may be for an org synced every ``interval`` seconds:
    twice the interval (one missed pass is tolerated), at least five minutes."""
    return max(2 * interval, MIN_MAX_AGE)
