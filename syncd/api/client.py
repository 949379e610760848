"""Synchronous httpx client for OpenApp's Devices operations.

httpx is imported in :mod:`syncd.api` and nowhere else: its exceptions are translated at
:meth:`OpenAppClient._send` into the :mod:`syncd.errors` tree, and HTTP statuses are mapped by
:func:`error_for_status`.

Nothing from the other side is believed unchecked: device ids are checked and percent-encoded
before they go into a path; an answer about a device is checked to be about the device and org
asked for; a body may not grow past ``api.max_response_size`` (decompressed); every request has a
total deadline; no error message carries a header value.
"""

from __future__ import annotations

import contextlib
import functools
import html
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson
import structlog
from xxhash import xxh3_128_hexdigest

from syncd import __version__
from syncd.api.ahead import in_order
from syncd.api.body import ACCEPT_ENCODING, read_body
from syncd.api.budget import RequestBudget
from syncd.api.pages import read_page
from syncd.api.retry import parse_retry_after
from syncd.api.transport import Attempt, InFlight, guarded_transport
from syncd.backoff import backoff_delay
from syncd.config import ApiSettings
from syncd.errors import (
    ApiProblem,
    AuthError,
    ConfigError,
    ForbiddenError,
    InvalidRequestError,
    InvalidResponseError,
    NotFoundError,
    RejectedError,
    RequestTimeoutError,
    ResponseTooLargeError,
    ServerBusyError,
    StoppedError,
    SyncdError,
    TransientError,
    TransportError,
    UnreachableError,
)
from syncd.metrics import HTTP_REQUESTS, HTTP_RETRIES, RETRY_AFTER_WAIT
from syncd.models import (
    DoorRestrictions,
    MetadataDefinition,
    PageShape,
    check_device_id,
    masked,
    one_line,
    parse_door_restrictions,
    parse_metadata_definition,
    preview,
)

log = structlog.get_logger(__name__)

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
THROTTLING_STATUSES = frozenset({429, 503})  # OpenApp asks for less: the request budget halves its concurrency
MAX_OFFSET = 2**31 - 1  # PaginationQuery.offset is int32
T = TypeVar("T")
ERROR_BODY_LIMIT = 64 * 1024  # of an error answer only the ApiErrorResponse fields (or a snippet) are kept
# What OpenSSL says when the other end answered a TLS hello in plain HTTP (an http port).
PLAIN_HTTP_REPLIES = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"}
)
STOP_POLL = 0.5  # seconds between looks at the stop event by the thread that interrupts requests


@dataclass(slots=True)
class DevicePage:
    """One page of list_devices: its offset, a digest of the body as received (the same body, byte
    for byte, digests the same), how many items it held, the answer's total if it gave one, and the
    raw items (not yet parsed as devices).

    A page whose body is one the caller said it knew (``known``) is not read when it arrives: its
    count, total and first id are the known ones, and :attr:`items` reads the body only if asked."""

    offset: int
    digest: str
    count: int
    total: int | None
    first_id: object  # the first item's id (None: no first item, or one without an id)
    known: bool
    _items: list[Any] | None
    _body: bytes | None = None

    @property
    def items(self) -> list[Any]:
        """The raw items (read from the body the first time, for a known page)."""
        if self._items is None:
            assert self._body is not None
            self._items = read_page(self._body)[0]
            self._body = None
        return self._items


def error_for_status(status: int, problem: ApiProblem, operation: str, retry_after: float | None) -> SyncdError:
    """The one mapping from an HTTP error status to the exception the caller acts on."""
    message = f"{operation}: {problem.describe()}"
    if status == 404 and operation in ("list_devices", "status"):  # not a device: the URL is wrong
        message += " (api.base_url is probably wrong: it must end in /api/v1)"
    if status == 401:
        return AuthError(f"{message} (check the API key and api.auth_header)", problem=problem)
    if status == 403:
        return ForbiddenError(message, problem=problem)
    if status == 404:
        return NotFoundError(message, problem=problem)
    if status in RETRYABLE_STATUSES or status >= 500:
        return ServerBusyError(message, problem=problem, retry_after=retry_after)
    return RejectedError(message, problem=problem)


def read_problem(status: int, body: bytes, secrets: Collection[str] = ()) -> ApiProblem:
    """Parse an ApiErrorResponse body; tolerate bodies that are not JSON at all. ``secrets`` (the
    credential values a write carried) are masked in every text kept, before it is shortened."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):

        def text(*keys: str) -> str | None:
            for key in keys:
                value = data.get(key)
                if isinstance(value, str) and value:
                    return one_line(masked(value, secrets), 200)
            return None

        return ApiProblem(
            status,
            message=text("message", "error", "detail"),
            error_code=text("error_code", "errorCode", "code"),
            correlation_id=text("correlationId", "correlation_id"),
        )
    return ApiProblem(status, message=_snippet(body, secrets) or None)


def _snippet(body: bytes, secrets: Collection[str] = ()) -> str:
    """One line of a body that is not an ApiErrorResponse: an HTML page's title, else its first line
    of text, not the whole page."""
    text = masked(body.decode("utf-8", "replace"), secrets)[:4096]  # masked whole, then cut
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        text = " ".join(title.group(1).split())  # a title may span lines
    elif text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", "\n", text)  # the page's text, a line per element
    line = next((line.strip() for line in html.unescape(text).splitlines() if line.strip()), "")
    line = masked(line, secrets)  # what unescaping revealed
    return one_line(" ".join(line.split()), 200)


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
        budget: RequestBudget | None = None,
    ) -> None:
        """``stop``: once set, waits between retries end, reads in flight are interrupted and no new
        request starts (writes in flight finish, within their deadline). ``instance``: named in the
        User-Agent, so server logs tell syncd instances apart. ``budget``: the process's request
        budget, shared with its other clients (by default one of this client's own, from ``settings``)."""
        if settings.api_key is None:
            raise ConfigError("no API key is configured (api.api_key_env, api_key_file or api_key_credential)")
        self.settings = settings
        key = settings.api_key.reveal()
        self._key = key  # only to scrub it from error messages, should a library ever quote it
        auth = {"Authorization": f"Bearer {key}"} if settings.auth_header == "bearer" else {"X-API-Key": key}
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        self.budget = budget or RequestBudget(settings.max_concurrency, settings.max_requests_per_second)
        pool = max(32, self.budget.max_concurrency)
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        # A plain-HTTP base URL never does TLS (redirects are not followed), so it gets an empty
        # verifying context instead of loading the CA bundle (40 ms at every start).
        plain = settings.base_url.startswith("http://")
        verify: ssl.SSLContext | bool = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if plain else True
        unsendable = False
        try:
            self._http = httpx.Client(
                base_url=settings.base_url,
                headers={
                    **auth,
                    "Accept": "application/json",
                    "Accept-Encoding": ACCEPT_ENCODING,
                    "User-Agent": _user_agent(instance),
                },
                timeout=timeout,
                transport=transport or guarded_transport(settings.base_url, verify, limits),
                trust_env=False,  # no .netrc credentials, no transport without the deadline guard
            )
        except (httpx.LocalProtocolError, UnicodeError):  # the exception quotes the key: not even kept as context
            unsendable = True
        if unsendable:
            raise ConfigError("the API key or api.base_url cannot be sent in an HTTP request")
        self._in_flight = InFlight()
        self._stop = stop
        self._sleep = sleep or (stop.wait if stop else time.sleep)
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.retries = 0
        if stop is not None:
            threading.Thread(target=self._interrupt_on_stop, name="api-stop", daemon=True).start()

    def __enter__(self) -> OpenAppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAppClient(base_url={self.settings.base_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self._closed.set()
        self._http.close()

    def _interrupt_on_stop(self) -> None:
        assert self._stop is not None
        while not self._closed.is_set():
            if self._stop.wait(STOP_POLL):
                self._in_flight.abort()
                return

    # -- operations -------------------------------------------------------------------------

    def list_device_pages(
        self,
        org_id: str,
        *,
        integration_id: str | None = None,
        device_kind: str | None = None,
        page_size: int | None = None,
        deadline: float | None = None,
        concurrency: int | None = None,
        known: Mapping[int, PageShape] | None = None,
    ) -> Generator[DevicePage, None, None]:
        """Every page of list_devices for an org, soft-deleted devices included, in order.

        Pages by ``offset`` until a page is shorter than ``limit`` (or empty, or the answer's total is
        reached). The first page is asked alone (an org of one page, or a rejected key, costs one
        request); after a full one, up to ``concurrency`` pages (default ``api.page_concurrency``)
        are asked at once, at the offsets after the last page handed over; once a short page is
        seen no new offset is asked. Items are returned raw (an :class:`~syncd.models.UnreadableItem`
        for one that cannot be read alone); the caller parses them so that one bad device does not
        cost the page.
        ``deadline``: a ``time.monotonic()`` value no request may outlast (the pass's own deadline).
        ``known``: pages the caller has read before, by offset: one whose body digests the same is
        handed over unread (see :class:`DevicePage`).
        """
        limit = page_size or self.settings.page_size
        params: dict[str, Any] = {"include_deleted": "true", "only_deleted": "false", "include_metadata": "true"}
        if integration_id:
            params["integration_id"] = integration_id
        if device_kind:
            params["device_kind"] = device_kind
        known_end: list[int] = []  # the latest answer's total: no offset at or past it is asked

        def offsets(start: int) -> Iterator[Callable[[], DevicePage]]:
            offset = start
            while offset <= MAX_OFFSET and not (known_end and offset >= known_end[0]):
                page_params = {**params, "limit": limit, "offset": offset}
                yield functools.partial(self._device_page, org_id, page_params, deadline, known)
                offset += limit

        offset = 0
        previous_first: object = None
        width = concurrency or self.settings.page_concurrency
        while offset <= MAX_OFFSET:
            # One round asks the offsets up to the total known when it started; when devices are
            # added during the scan, a later answer's total is larger and the next round goes on.
            asked = in_order(offsets(offset), width, "page", allowed=lambda: self.budget.limit)
            with contextlib.closing(asked) as pages:
                for answer in pages:
                    page = answer.result()
                    if page.count and offset and page.first_id is not None and page.first_id == previous_first:
                        raise InvalidResponseError(
                            f"list_devices: the page at offset {offset} repeats the previous one; "
                            "the server ignores 'offset'"
                        )
                    yield page
                    offset += limit
                    if page.count < limit or (page.total is not None and offset >= page.total):
                        return
                    known_end[:] = [] if page.total is None else [page.total]
                    previous_first = page.first_id
        raise InvalidResponseError(f"list_devices: more than {MAX_OFFSET} devices; refusing to page further")

    def _device_page(
        self, org_id: str, params: dict[str, Any], deadline: float | None, known: Mapping[int, PageShape] | None
    ) -> DevicePage:
        """One list_devices page (``params`` name its offset), read unless ``known`` knows its body."""
        offset = params["offset"]
        body = self._send("list_devices", "GET", "/devices", org_id, params, deadline=deadline)
        digest = xxh3_128_hexdigest(body)
        shape = known.get(offset) if known else None
        if shape is not None and shape.digest == digest:
            return DevicePage(offset, digest, shape.count, shape.total, shape.first_id, True, None, body)
        items, total = read_page(body)
        return DevicePage(offset, digest, len(items), total, _item_id(items[0]) if items else None, False, items)

    def probe_status(self) -> None:
        """``GET /status``, the probe the official SDK makes when it connects (no org, no key needed)."""
        self._send("status", "GET", "/status", None, {})

    def probe_org(self, org_id: str) -> tuple[int, int | None]:
        """One list page of at most one device of ``org_id``, with the key and X-Org a pass uses:
        how many devices it held (0 or 1), and the total the answer gave, if it gave one."""
        params = {"include_deleted": "true", "only_deleted": "false", "include_metadata": "true"}
        items, total = read_page(self._send("list_devices", "GET", "/devices", org_id, {**params, "limit": 1}))
        return len(items), total

    def get_devices(
        self, org_id: str, device_ids: Iterable[str], *, deadline: float | None = None, concurrency: int | None = None
    ) -> Iterator[tuple[str, Future[dict[str, Any]]]]:
        """:meth:`get_device` of many devices, up to ``concurrency`` at once (default: as many as the
        request budget allows); each id with its finished answer (``.result()`` raises what
        get_device raised), in order."""
        ids = list(device_ids)

        def calls() -> Iterator[Callable[[], dict[str, Any]]]:
            for device_id in ids:
                yield functools.partial(self.get_device, org_id, device_id, deadline=deadline)

        width = concurrency or self.budget.max_concurrency
        with contextlib.closing(in_order(calls(), width, "get-device", allowed=lambda: self.budget.limit)) as answers:
            yield from zip(ids, answers, strict=False)

    def get_device(self, org_id: str, device_id: str, *, deadline: float | None = None) -> dict[str, Any]:
        """get_device with soft-deleted devices visible; NotFoundError when it does not exist."""
        params = {"include_deleted": "true", "include_metadata": "true"}
        path = _device_path("get_device", device_id)
        body = self._send("get_device", "GET", path, org_id, params, deadline=deadline)
        return _device(body, "get_device", org_id, device_id)

    def update_device(
        self, org_id: str, device_id: str, changes: dict[str, Any], *, secrets: Collection[str] = ()
    ) -> dict[str, Any]:
        """update_device (PUT, safe to repeat) with an UpdateDeviceRequest body. ``secrets``: the
        credential values it carries, masked in any error message OpenApp's answer leads to."""
        path = _device_path("update_device", device_id)
        body = self._send("update_device", "PUT", path, org_id, _write_params(), body=changes, secrets=secrets)
        return _device(body, "update_device", org_id, device_id)

    def restore_device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """restore_device: undo a soft delete (repeating it only yields 422 "not soft-deleted")."""
        path = _device_path("restore_device", device_id, "restore")
        body = self._send("restore_device", "POST", path, org_id, _write_params())
        return _device(body, "restore_device", org_id, device_id)

    def delete_device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """delete_device: soft delete (repeating it is harmless)."""
        path = _device_path("delete_device", device_id)
        body = self._send("delete_device", "DELETE", path, org_id, _write_params())
        return _device(body, "delete_device", org_id, device_id)

    def set_door_restrictions(self, org_id: str, device_id: str, key: str, entity_ids: list[str]) -> DoorRestrictions:
        """PUT door-restrictions (the official SDK's set_door_restrictions; not in the public spec):
        the whole list, under ``key`` (``apartment_entity_ids`` or ``listing_entity_ids``). Safe to repeat."""
        path = _device_path("set_door_restrictions", device_id, "door-restrictions")
        body = self._send("set_door_restrictions", "PUT", path, org_id, {}, body={key: entity_ids})
        return _answer(body, "set_door_restrictions", parse_door_restrictions)

    def get_door_restrictions(self, org_id: str, device_id: str, *, deadline: float | None = None) -> DoorRestrictions:
        """get_door_restrictions: the entities a virtual_access_portal lets through (either body key).
        RejectedError (400) for a device that is not a portal, NotFoundError (404) for one that is gone."""
        path = _device_path("get_door_restrictions", device_id, "door-restrictions")
        body = self._send("get_door_restrictions", "GET", path, org_id, {}, deadline=deadline)
        return _answer(body, "get_door_restrictions", parse_door_restrictions)

    def get_metadata_definition(
        self, org_id: str, device_id: str, *, deadline: float | None = None
    ) -> MetadataDefinition:
        """get_device_metadata_definition: the JSON Schema of the device's provider's device_metadata."""
        path = _device_path("get_device_metadata_definition", device_id, "metadata-definition")
        body = self._send("get_device_metadata_definition", "GET", path, org_id, {}, deadline=deadline)
        return _answer(body, "get_device_metadata_definition", parse_metadata_definition)

    # -- transport --------------------------------------------------------------------------

    def _send(
        self,
        operation: str,
        method: str,
        path: str,
        org_id: str | None,
        params: dict[str, Any],
        body: dict[str, Any] | None = None,
        *,
        deadline: float | None = None,
        secrets: Collection[str] = (),
    ) -> bytes:
        """One logical call, returning the body of its successful answer: retries transient failures
        with backoff until attempts, ``api.retry.deadline`` or ``deadline`` (monotonic) run out.

        Every Devices call syncd makes is safe to repeat (GET, PUT, soft delete, restore, PUT
        door-restrictions), so transport errors and 408/425/429/5xx are retried for all of them.
        """
        policy = self.settings.retry
        started = time.monotonic()
        give_up_at = min(started + policy.deadline, deadline if deadline is not None else float("inf"))
        attempt_number = 0
        content = orjson.dumps(body) if body is not None else None
        headers = {"X-Org": org_id} if org_id is not None else {}
        if content is not None:
            headers["Content-Type"] = "application/json"
        interruptible = method == "GET"  # a stop must not leave a write's outcome unknown
        waited_until = 0.0  # the end of a Retry-After pause this call already waits out itself
        while True:
            attempt_number += 1
            if interruptible and self._stop is not None and self._stop.is_set():
                raise StoppedError(f"{operation}: not sent, syncd is stopping")
            turn = self.budget.acquire(give_up_at, self._stop, operation, waited_until)  # nothing sent before
            try:
                answer = self._attempt(
                    operation, method, path, params, headers, content, give_up_at, interruptible, secrets
                )
            except TransientError as exc:
                throttled = exc.status in THROTTLING_STATUSES
                # This request waits out its own Retry-After below; the others wait at the budget.
                waited_until = self.budget.release(turn, throttled=throttled, retry_after=exc.retry_after)
                error = exc
            except BaseException:
                self.budget.release(turn)
                raise
            else:
                self.budget.release(turn, ok=True, size=len(answer))
                return answer
            delay = (
                error.retry_after
                if error.retry_after is not None
                else backoff_delay(attempt_number, policy.base_delay, policy.max_delay, self._rng)
            )
            now = time.monotonic()
            if attempt_number >= policy.max_attempts or now + delay > give_up_at:
                if policy.max_attempts > 1:  # one attempt was all there was to be: nothing was given up
                    error.message = f"{error.message} (gave up after {attempt_number} attempts in {now - started:.1f}s)"
                raise error
            self._wait_to_retry(operation, org_id, attempt_number, error, delay)

    def _wait_to_retry(
        self, operation: str, org_id: str | None, attempt_number: int, error: TransientError, delay: float
    ) -> None:
        """Count the retry, then wait ``delay`` seconds; StoppedError if syncd stopped meanwhile."""
        with self._lock:
            self.retries += 1
        HTTP_RETRIES.labels(operation).inc()
        if error.retry_after is not None:
            RETRY_AFTER_WAIT.labels(operation).inc(delay)
        log.debug(
            "retrying",
            operation=operation,
            org_id=org_id,
            attempt=attempt_number,
            delay=round(delay, 3),
            error=str(error),
        )
        self._sleep(delay)
        if self._stop is not None and self._stop.is_set():
            raise StoppedError(f"{operation}: stopped while waiting to retry after: {error}")

    def _attempt(
        self,
        operation: str,
        method: str,
        path: str,
        params: dict[str, Any],
        headers: dict[str, str],
        content: bytes | None,
        give_up_at: float,
        interruptible: bool,
        secrets: Collection[str] = (),
    ) -> bytes:
        """One HTTP request: the body of a successful answer, else the error it comes to."""
        started = time.monotonic()
        own_limit = started + self.settings.request_timeout
        expires = min(own_limit, give_up_at)
        status = "transport_error"
        unsendable = False
        with self._in_flight.attempt(expires, interruptible) as attempt:
            try:
                request = self._http.build_request(method, path, params=params, headers=headers, content=content)
                response = self._http.send(request, stream=True)
                status = str(response.status_code)
                try:
                    if response.is_success:
                        return read_body(response, self.settings.max_response_size)
                    error_body = read_body(response, ERROR_BODY_LIMIT, truncate=True)
                finally:
                    response.close()
            except httpx.LocalProtocolError:
                # h11 quotes the offending header value, which may be the key: the exception is
                # dropped here, not even kept as the context of the one raised below.
                unsendable = True
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
                raise ConfigError(f"{operation}: invalid API URL: {self._scrub(exc)}") from None
            except httpx.TransportError as exc:
                # Not chained: an httpx exception holds its request, auth header included.
                raise self._transport_failure(operation, exc, attempt, started, own_limit, give_up_at) from None
            except ResponseTooLargeError:
                raise ResponseTooLargeError(
                    f"{operation}: the answer is larger than api.max_response_size "
                    f"({self.settings.max_response_size} bytes, decompressed); it was not read"
                ) from None
            except InvalidResponseError as exc:
                raise InvalidResponseError(f"{operation}: {exc}") from None
            finally:
                HTTP_REQUESTS.labels(operation, status).inc()
        if unsendable:
            raise ConfigError(
                f"{operation}: the request could not be built (an API key, org id or URL that HTTP cannot carry; "
                "run `syncd check-config`)"
            )
        problem = read_problem(response.status_code, error_body, secrets)
        hint = parse_retry_after(response.headers.get("Retry-After"), self.settings.retry.max_retry_after)
        raise error_for_status(response.status_code, problem, operation, hint)

    def _transport_failure(
        self,
        operation: str,
        exc: httpx.TransportError,
        attempt: Attempt,
        started: float,
        own_limit: float,
        give_up_at: float,
    ) -> SyncdError:
        """What a request that got no answer comes to: stopped, out of time, unreachable, or a
        transport error (retried)."""
        if attempt.aborted:
            return StoppedError(f"{operation}: interrupted, syncd is stopping")
        if attempt.expired:
            bound = "api.request_timeout" if own_limit <= give_up_at else "the retry or pass deadline"
            return RequestTimeoutError(
                f"{operation}: no complete answer within {attempt.expires - started:.1f}s ({bound})"
            )
        unreachable = self._unreachable(operation, exc)
        if unreachable is not None:
            return unreachable
        return TransportError(f"{operation}: {type(exc).__name__}: {self._scrub(exc) or 'connection failed'}")

    def _unreachable(self, operation: str, exc: httpx.TransportError) -> UnreachableError | None:
        """A failed connect as what to check: the host and port ``api.base_url`` names, and why."""
        if not isinstance(exc, httpx.ConnectError):
            return None
        url = httpx.URL(self.settings.base_url)
        where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        causes = list(_causes(exc))
        if any(isinstance(c, socket.gaierror) for c in causes):
            reason, text = "dns", f"unknown host {url.host} (the name does not resolve)"
        elif any(isinstance(c, ConnectionRefusedError) for c in causes):
            reason, text = "refused", f"nothing listens on {where} (connection refused)"
        elif tls := next((c for c in causes if isinstance(c, ssl.SSLError)), None):
            reason = "tls"
            if isinstance(tls, ssl.SSLCertVerificationError):
                text = f"the TLS certificate of {where} is not trusted ({tls.verify_message})"
            elif tls.reason in PLAIN_HTTP_REPLIES:
                text = f"{where} answers plain HTTP, not TLS: an https:// URL on an http port? ({tls.reason})"
            else:
                text = f"the TLS handshake with {where} failed ({tls.reason or self._scrub(tls)})"
        else:
            return None
        return UnreachableError(
            f"{operation}: cannot connect: {text}; check api.base_url ({self.settings.base_url})", reason=reason
        )

    def _scrub(self, exc: BaseException) -> str:
        """An exception's text for a message, one line, with the key masked should it appear."""
        return one_line(" ".join(str(exc).replace(self._key, "********").split()))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from (httpx wraps httpcore, which wraps the socket's error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _user_agent(instance: str | None) -> str:
    return f"syncd/{__version__} ({instance})" if instance else f"syncd/{__version__}"


def _write_params() -> dict[str, str]:
    return {"include_deleted": "true", "include_metadata": "true"}


def _device_path(operation: str, device_id: str, *rest: str) -> str:
    """``/devices/{id}[/...]`` for an id OpenApp can have issued, every segment percent-encoded."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise InvalidRequestError(f"{operation}: not sent: {exc}") from None
    return "/devices/" + "/".join(quote(segment, safe="") for segment in (device_id, *rest))


def _device(body: bytes, operation: str, org_id: str, device_id: str) -> dict[str, Any]:
    """The device object of an answer, believed only if it is the device and org that were asked for."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidResponseError(f"{operation}: the response body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidResponseError(f"{operation}: expected a device object, got {type(data).__name__}")
    if data.get("id") != device_id or data.get("org_id") != org_id:
        raise InvalidResponseError(
            f"{operation}: asked about device {device_id} of org {org_id}, the answer is about device "
            f"{preview(data.get('id'))} of org {preview(data.get('org_id'))}; it was not believed"
        )
    return data


def _answer(body: bytes, operation: str, parse: Callable[[object], T]) -> T:
    """An answer read by ``parse`` (a models function); what it cannot read is InvalidResponseError."""
    try:
        return parse(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise InvalidResponseError(f"{operation}: the response body is not JSON ({exc})") from None
    except ValueError as exc:
        raise InvalidResponseError(f"{operation}: unusable answer: {exc}") from None


def _item_id(item: object) -> object:
    return item.get("id") if isinstance(item, dict) else None
