"""Synchronous httpx client for OpenApp's Devices operations.

httpx is imported here and nowhere else: its exceptions are translated at :meth:`_send` into the
:mod:`syncd.errors` tree, and HTTP statuses are mapped by :func:`error_for_status`.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import structlog

from syncd import __version__
from syncd.api.retry import backoff_delay, parse_retry_after
from syncd.config import ApiSettings
from syncd.errors import (
    ApiProblem,
    AuthError,
    ConfigError,
    ForbiddenError,
    InvalidResponseError,
    NotFoundError,
    RejectedError,
    ServerBusyError,
    SyncdError,
    TransientError,
    TransportError,
)
from syncd.metrics import HTTP_REQUESTS, HTTP_RETRIES, RETRY_AFTER_WAIT

log = structlog.get_logger(__name__)

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_OFFSET = 2**31 - 1  # PaginationQuery.offset is int32


@dataclass(frozen=True, slots=True)
class DevicePage:
    """One page of list_devices: its offset and the raw items, not yet parsed."""

    offset: int
    items: list[Any]


def error_for_status(status: int, problem: ApiProblem, operation: str, retry_after: float | None) -> SyncdError:
    """The one mapping from an HTTP error status to the exception the caller acts on."""
    message = f"{operation}: {problem.describe()}"
    if status == 401:
        return AuthError(f"{message} (check the API key and api.auth_header)", problem=problem)
    if status == 403:
        return ForbiddenError(message, problem=problem)
    if status == 404:
        return NotFoundError(message, problem=problem)
    if status in RETRYABLE_STATUSES or status >= 500:
        return ServerBusyError(message, problem=problem, retry_after=retry_after)
    return RejectedError(message, problem=problem)


def read_problem(status: int, body: bytes) -> ApiProblem:
    """Parse an ApiErrorResponse body; tolerate bodies that are not JSON at all."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):

        def text(*keys: str) -> str | None:
            for key in keys:
                value = data.get(key)
                if isinstance(value, str) and value:
                    return value
            return None

        return ApiProblem(
            status,
            message=text("message", "error", "detail"),
            error_code=text("error_code", "errorCode", "code"),
            correlation_id=text("correlationId", "correlation_id"),
        )
    snippet = " ".join(body[:200].decode("utf-8", "replace").split())
    return ApiProblem(status, message=snippet or None)


class OpenAppClient:
    """Calls the Devices operations for one OpenApp account, retrying what is safe to repeat."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], Any] | None = None,
        stop: threading.Event | None = None,
        rng: random.Random | None = None,
        instance: str | None = None,
    ) -> None:
        """``stop``: when set, waits between retries end early and the call gives up.
        ``instance``: named in the User-Agent, so server logs tell syncd instances apart."""
        self.settings = settings
        key = settings.api_key.reveal()
        auth = {"Authorization": f"Bearer {key}"} if settings.auth_header == "bearer" else {"X-API-Key": key}
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        # A plain-HTTP base URL never does TLS (redirects are not followed), so it gets an empty
        # verifying context instead of loading the CA bundle (40 ms at every start).
        plain = settings.base_url.startswith("http://")
        self._http = httpx.Client(
            verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if plain else True,
            base_url=settings.base_url,
            headers={**auth, "Accept": "application/json", "User-Agent": _user_agent(instance)},
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )
        self._stop = stop
        self._sleep = sleep or (stop.wait if stop else time.sleep)
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.retries = 0

    def __enter__(self) -> OpenAppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAppClient(base_url={self.settings.base_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    # -- operations -------------------------------------------------------------------------

    def list_device_pages(
        self,
        org_id: str,
        *,
        integration_id: str | None = None,
        device_kind: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[DevicePage]:
        """Every page of list_devices for an org, soft-deleted devices included.

        Pages by ``offset`` until a page is shorter than ``limit`` (or empty). Items are returned
        raw; the caller parses them so that one bad device does not cost the page.
        """
        limit = page_size or self.settings.page_size
        params: dict[str, Any] = {"include_deleted": "true", "only_deleted": "false", "include_metadata": "true"}
        if integration_id:
            params["integration_id"] = integration_id
        if device_kind:
            params["device_kind"] = device_kind
        offset = 0
        previous_first: object = None
        while True:
            page_params = {**params, "limit": limit, "offset": offset}
            response = self._send("list_devices", "GET", "/devices", org_id, page_params)
            items, total = _list_items(response)
            if items and offset and _item_id(items[0]) is not None and _item_id(items[0]) == previous_first:
                raise InvalidResponseError(
                    f"list_devices: the page at offset {offset} repeats the previous one; the server ignores 'offset'"
                )
            yield DevicePage(offset, items)
            offset += limit
            if len(items) < limit or (total is not None and offset >= total):
                return
            if offset > MAX_OFFSET:
                raise InvalidResponseError(f"list_devices: more than {MAX_OFFSET} devices; refusing to page further")
            previous_first = _item_id(items[0])

    def get_device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """get_device with soft-deleted devices visible; NotFoundError when it does not exist."""
        params = {"include_deleted": "true", "include_metadata": "true"}
        return self._device(self._send("get_device", "GET", f"/devices/{device_id}", org_id, params), "get_device")

    def update_device(self, org_id: str, device_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """update_device (PUT, safe to repeat) with an UpdateDeviceRequest body."""
        response = self._send("update_device", "PUT", f"/devices/{device_id}", org_id, _write_params(), body=changes)
        return self._device(response, "update_device")

    def restore_device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """restore_device: undo a soft delete (repeating it only yields 422 "not soft-deleted")."""
        response = self._send("restore_device", "POST", f"/devices/{device_id}/restore", org_id, _write_params())
        return self._device(response, "restore_device")

    def delete_device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """delete_device: soft delete (repeating it is harmless)."""
        response = self._send("delete_device", "DELETE", f"/devices/{device_id}", org_id, _write_params())
        return self._device(response, "delete_device")

    # -- transport --------------------------------------------------------------------------

    def _device(self, response: httpx.Response, operation: str) -> dict[str, Any]:
        data = _json(response, operation)
        if not isinstance(data, dict):
            raise InvalidResponseError(f"{operation}: expected a device object, got {type(data).__name__}")
        return data

    def _send(
        self,
        operation: str,
        method: str,
        path: str,
        org_id: str,
        params: dict[str, Any],
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """One logical call: retries transient failures with backoff until attempts or deadline run out.

        Every Devices call syncd makes is safe to repeat (GET, PUT, soft delete, restore), so
        transport errors and 408/425/429/5xx are retried for all of them.
        """
        policy = self.settings.retry
        started = time.monotonic()
        attempt = 0
        content = orjson.dumps(body) if body is not None else None
        headers = {"X-Org": org_id}
        if content is not None:
            headers["Content-Type"] = "application/json"
        while True:
            attempt += 1
            error: SyncdError
            try:
                response = self._http.request(method, path, params=params, headers=headers, content=content)
            except httpx.InvalidURL as exc:
                raise ConfigError(f"{operation}: invalid API URL: {exc}") from exc
            except httpx.TransportError as exc:
                HTTP_REQUESTS.labels(operation, "transport_error").inc()
                error = TransportError(f"{operation}: {type(exc).__name__}: {exc or 'connection failed'}")
                cause: BaseException = exc
            else:
                HTTP_REQUESTS.labels(operation, str(response.status_code)).inc()
                if response.is_success:
                    return response
                problem = read_problem(response.status_code, response.content)
                hint = parse_retry_after(response.headers.get("Retry-After"), policy.max_retry_after)
                error = error_for_status(response.status_code, problem, operation, hint)
                cause = error
            if not isinstance(error, TransientError):
                raise error
            delay = (
                error.retry_after
                if error.retry_after is not None
                else backoff_delay(attempt, policy.base_delay, policy.max_delay, self._rng)
            )
            elapsed = time.monotonic() - started
            if attempt >= policy.max_attempts or elapsed + delay > policy.deadline:
                error.message = f"{error.message} (gave up after {attempt} attempts in {elapsed:.1f}s)"
                raise error from (cause if cause is not error else None)
            with self._lock:
                self.retries += 1
            HTTP_RETRIES.labels(operation).inc()
            if error.retry_after is not None:
                RETRY_AFTER_WAIT.labels(operation).inc(delay)
            log.debug(
                "retrying", operation=operation, org_id=org_id, attempt=attempt, delay=round(delay, 3), error=str(error)
            )
            self._sleep(delay)
            if self._stop is not None and self._stop.is_set():
                error.message = f"{error.message} (stopped while waiting to retry)"
                raise error


def _user_agent(instance: str | None) -> str:
    return f"syncd/{__version__} ({instance})" if instance else f"syncd/{__version__}"


def _write_params() -> dict[str, str]:
    return {"include_deleted": "true", "include_metadata": "true"}


def _json(response: httpx.Response, operation: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise InvalidResponseError(f"{operation}: response body is not JSON ({exc})") from exc


def _list_items(response: httpx.Response) -> tuple[list[Any], int | None]:
    """Accept the spec's bare array and the ``{"items": [...], "total": N}`` envelope."""
    data = _json(response, "list_devices")
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        total = data.get("total")
        return data["items"], total if isinstance(total, int) and not isinstance(total, bool) else None
    raise InvalidResponseError(
        f"list_devices: expected a JSON array of devices (or {{items, total}}), got {type(data).__name__}"
    )


def _item_id(item: object) -> object:
    return item.get("id") if isinstance(item, dict) else None
