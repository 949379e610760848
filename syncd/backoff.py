"""Exponential backoff, the one formula: for retried requests, queued edits and failing orgs."""

from __future__ import annotations

import random


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """``base * 2**(attempt-1)`` for attempt >= 1, at most ``cap``."""
    return float(min(cap, base * (2 ** max(attempt - 1, 0))))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, :func:`backoff_ceiling`] (so retries from many callers spread out)."""
    return (rng or random).uniform(0.0, backoff_ceiling(attempt, base, cap))
