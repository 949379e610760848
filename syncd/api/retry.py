"""The server's Retry-After hint (the backoff syncd falls back to is :mod:`syncd.backoff`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DELAY_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_retry_after(value: str | None, maximum: float, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, clamped to ``maximum``.

    Accepts delta-seconds (digits, as RFC 9110 has them; a decimal fraction is tolerated) or an
    HTTP date. ``0``, a date in the past, or anything unusable (another number form, a date
    Python cannot represent, a year of 20 digits) means "no hint" (``None``), so the caller falls
    back to its own backoff. Never raises.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if DELAY_SECONDS.fullmatch(text):
        seconds = float(text)  # digits only: a number too large for a float is inf, and clamped
    else:
        try:
            when = parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - (now or datetime.now(UTC))).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not seconds > 0:  # no wait asked for (NaN included)
        return None
    return min(seconds, maximum)
