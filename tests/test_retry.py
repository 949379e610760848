import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from syncd.api.retry import parse_retry_after
from syncd.backoff import backoff_delay

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("5", 5.0),
        (" 2 ", 2.0),
        ("1.5", 1.5),
        ("0", None),  # 0 = no hint: fall back to our own backoff
        ("-3", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
        ("3600", 60.0),  # clamped
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), None),  # already past
        (format_datetime(NOW + timedelta(hours=2), usegmt=True), 60.0),
        ("Wed, 99 Foo 2026 25:61:00 GMT", None),
    ],
)
def test_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, maximum=60.0, now=NOW) == expected


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(1)
    for attempt, cap in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (10, 8.0)]:
        delays = [backoff_delay(attempt, 0.25, 8.0, rng) for _ in range(500)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.9  # it does reach up to the cap
        assert min(delays) < cap * 0.1  # and down towards zero (full jitter)
