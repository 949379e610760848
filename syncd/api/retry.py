"""The server's Retry-After hint (the backoff syncd falls back to is :mod:`syncd.backoff`)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str | None, maximum: float, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, clamped to ``maximum``.

    Accepts delta-seconds or an HTTP date. ``0``, a date in the past, or anything unreadable
    means "no hint" (``None``), so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or seconds <= 0:  # no wait asked for
        return None
    return min(seconds, maximum)
