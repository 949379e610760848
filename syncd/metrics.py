"""Prometheus metrics. Always counted (cheaply); served only when ``[metrics] listen`` is set."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from syncd.vocab import ChangeKind, DeviceState, PassStatus

# PASS_DURATION's statuses: those of a pass that ran (a skipped one has no duration).
PASS_STATUSES = tuple(s for s in PassStatus if s is not PassStatus.SKIPPED)

HTTP_REQUESTS = Counter(
    "syncd_http_requests", "OpenApp API responses by operation and HTTP status", ["operation", "status"]
)
HTTP_RETRIES = Counter("syncd_http_retries", "OpenApp API requests retried", ["operation"])
RETRY_AFTER_WAIT = Counter(
    "syncd_retry_after_wait_seconds", "Seconds waited because OpenApp sent Retry-After", ["operation"]
)
BUDGET_CONCURRENCY = Gauge(
    "syncd_api_concurrency_limit",
    "Requests to OpenApp allowed in flight now (halved on 429/503, lowered while answers queue)",
)
BUDGET_IN_FLIGHT = Gauge("syncd_api_requests_in_flight", "Requests to OpenApp in flight now")
BUDGET_WAIT = Counter("syncd_api_budget_wait_seconds", "Seconds requests waited for a turn in the request budget")
BUDGET_THROTTLED = Counter("syncd_api_budget_decreases", "Times a 429 or 503 halved the request concurrency")
BUDGET_QUEUEING = Counter(
    "syncd_api_budget_queueing_decreases", "Times round trips grown by queueing lowered the request concurrency"
)
LAST_SUCCESS = Gauge("syncd_org_last_success_timestamp_seconds", "End of the org's last successful pass", ["org_id"])
PASS_DURATION = Histogram(
    "syncd_pass_duration_seconds",
    "Duration of org passes",
    ["org_id", "status"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
DEVICES = Gauge("syncd_devices", "Mirrored devices by state", ["org_id", "state"])
CHANGES = Counter("syncd_device_changes", "Device changes recorded", ["org_id", "change"])
PURGES_REFUSED = Counter("syncd_purges_refused", "Passes whose purges the mass-purge guard refused", ["org_id"])
EDIT_RESULTS = Counter("syncd_edit_attempts", "Write-back attempts by result", ["result"])
EDIT_QUEUE = Gauge("syncd_edit_queue", "Queued local edits by status", ["status"])
ORG_FAILING = Gauge("syncd_org_failing", "1 while the org's passes keep failing", ["org_id"])
ORG_MAX_AGE = Gauge(
    "syncd_org_max_age_seconds", "Oldest a last success may be for the org to count as healthy", ["org_id"]
)
AUTH_PAUSED = Gauge("syncd_auth_paused", "1 while OpenApp rejects the API key (syncing or write-back paused)")
EDIT_QUEUE_OLDEST = Gauge(
    "syncd_edit_queue_oldest_pending_seconds", "Age of the oldest pending edit (0 when none is pending)"
)
AWAITING_APPROVAL = Gauge(
    "syncd_edits_awaiting_approval", "Edits of the org awaiting a second person's approval", ["org_id"]
)
AWAITING_APPROVAL_OLDEST = Gauge(
    "syncd_edits_awaiting_approval_oldest_seconds",
    "How long the org's oldest edit awaiting approval has waited (0 when none waits)",
    ["org_id"],
)


class MetricsServer:
    """The /metrics endpoint on its own thread."""

    def __init__(self, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=REGISTRY)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def track_org(org_id: str, max_age: float) -> None:
    """Start an org's series at their resting values, so a first failure or refusal is a change."""
    ORG_MAX_AGE.labels(org_id).set(max_age)
    ORG_FAILING.labels(org_id).set(0)
    AWAITING_APPROVAL.labels(org_id).set(0)
    AWAITING_APPROVAL_OLDEST.labels(org_id).set(0)
    PURGES_REFUSED.labels(org_id).inc(0)
    for kind in ChangeKind:
        CHANGES.labels(org_id, kind).inc(0)


_AWAITING_SHOWN: set[str] = set()  # orgs with awaiting-approval series, configured or not


def show_awaiting_approval(by_org: dict[str, tuple[int, float]], orgs: Collection[str]) -> None:
    """Edits awaiting approval per org, and the age of each org's oldest: the configured ``orgs``
    at 0 when none waits; an org not configured only while edits of it wait."""
    shown = {org_id for org_id in set(orgs) | set(by_org) if org_id in orgs or by_org[org_id][0]}
    for org_id in shown:
        count, oldest = by_org.get(org_id, (0, 0.0))
        AWAITING_APPROVAL.labels(org_id).set(count)
        AWAITING_APPROVAL_OLDEST.labels(org_id).set(oldest)
    for org_id in _AWAITING_SHOWN - shown:
        for metric in (AWAITING_APPROVAL, AWAITING_APPROVAL_OLDEST):
            with contextlib.suppress(KeyError):
                metric.remove(org_id)
    _AWAITING_SHOWN.clear()
    _AWAITING_SHOWN.update(shown)


def forget_org(org_id: str) -> None:
    """Drop every series of an org no longer configured (so no alert fires for it)."""
    for metric in (ORG_MAX_AGE, ORG_FAILING, PURGES_REFUSED, LAST_SUCCESS, AWAITING_APPROVAL, AWAITING_APPROVAL_OLDEST):
        with contextlib.suppress(KeyError):
            metric.remove(org_id)
    pairs: tuple[tuple[Counter | Gauge | Histogram, tuple[str, ...]], ...] = (
        (CHANGES, tuple(ChangeKind)),
        (DEVICES, tuple(DeviceState)),
        (PASS_DURATION, PASS_STATUSES),
    )
    for labelled, values in pairs:
        for value in values:
            with contextlib.suppress(KeyError):
                labelled.remove(org_id, value)
