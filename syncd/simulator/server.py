"""HTTP front of the simulator: routing, auth, query parsing, fault injection, a request log.

Runs on the standard library's threading HTTP server with keep-alive; binds loopback only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from syncd.simulator.world import SimError, World

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# The writes a mirroring client makes (``syncd simulate --lost-rate`` loses their answers).
WRITE_OPERATIONS = ("update_device", "delete_device", "restore_device", "set_door_restrictions")


@dataclass
class Fault:
    """A misbehaviour injected into matching requests.

    ``kind``: ``status`` (answer ``status``, with ``retry_after`` if set), ``reset`` (drop the
    connection with a TCP reset), ``slow`` (wait ``delay`` seconds, then answer normally) or
    ``slow_reply`` (do the work at once, then wait ``delay`` seconds before answering) or ``lost``
    (do the work, then drop the connection with a TCP reset: the client never hears that it was done).
    ``times`` bounds how often it fires (None: forever); ``skip`` lets that many matches pass first;
    ``rate`` fires it on that fraction of matches; ``duration`` makes it a storm: from its first
    firing (``first_fired_at``, monotonic) it fires for that many seconds, then never again.
    """

    kind: str = "status"
    status: int = 503
    retry_after: str | None = None
    delay: float = 0.0
    operation: str | None = None
    org_id: str | None = None
    times: int | None = 1
    skip: int = 0
    rate: float = 1.0
    body: bytes | None = None
    fired: int = 0
    duration: float | None = None
    first_fired_at: float | None = None

    def matches(self, operation: str, org_id: str | None, rng: random.Random) -> bool:
        if self.operation not in (None, operation) or self.org_id not in (None, org_id):
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        began = self.first_fired_at
        if self.duration is not None and began is not None and time.monotonic() - began >= self.duration:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.rate < 1.0 and rng.random() >= self.rate:
            return False
        self.fired += 1
        if self.first_fired_at is None:
            self.first_fired_at = time.monotonic()
        return True


@dataclass(frozen=True, slots=True)
class Reply:
    """What to send back: status, extra headers, body (None: reset the connection)."""

    status: int
    headers: dict[str, str]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the simulator saw it."""

    started: float
    finished: float
    method: str
    operation: str
    org_id: str | None
    device_id: str | None
    offset: int | None
    status: int
    user_agent: str = ""


@dataclass
class Routes:
    """Which operation a path is, and the device id in it."""

    patterns: list[tuple[str, re.Pattern[str], str]] = field(default_factory=list)
    base: str = "/api/v1"

    @classmethod
    def for_base(cls, base: str) -> Routes:
        dev = re.escape(base) + r"/devices"
        table = [
            ("GET", re.escape(base) + r"/status$", "status"),
            ("GET", dev + r"$", "list_devices"),
            ("POST", dev + r"$", "create_device"),
            ("GET", dev + r"/(?P<id>[^/]+)$", "get_device"),
            ("PUT", dev + r"/(?P<id>[^/]+)$", "update_device"),
            ("DELETE", dev + r"/(?P<id>[^/]+)$", "delete_device"),
            ("DELETE", dev + r"/(?P<id>[^/]+)/purge$", "hard_delete_device"),
            ("POST", dev + r"/(?P<id>[^/]+)/restore$", "restore_device"),
            ("GET", dev + r"/(?P<id>[^/]+)/door-restrictions$", "get_door_restrictions"),
            ("PUT", dev + r"/(?P<id>[^/]+)/door-restrictions$", "set_door_restrictions"),
            ("GET", dev + r"/(?P<id>[^/]+)/metadata-definition$", "get_device_metadata_definition"),
        ]
        return cls([(m, re.compile(p), op) for m, p, op in table], base)

    def match(self, method: str, path: str) -> tuple[str, str | None]:
        known_path = False
        for route_method, pattern, operation in self.patterns:
            found = pattern.match(path)
            if found:
                known_path = True
                if route_method == method:
                    return operation, found.groupdict().get("id")
        if known_path:
            raise SimError(405, f"No route for {method} {path}", "no_route")
        raise SimError(
            404,
            f"{method} {path} is outside what this simulator serves: the OpenApp simulator answers only the "
            f"Devices API ({self.base}/devices and below) and GET {self.base}/status",
            "outside_simulator_scope",
        )


class Simulator:
    """A running OpenApp simulator: ``with Simulator(world) as sim: sim.url``."""

    def __init__(
        self,
        world: World,
        host: str = "127.0.0.1",
        port: int = 0,
        base_path: str = "/api/v1",
        auth_header: str = "any",
        seed: int = 0,
        log_size: int = 200_000,
        strict_query: bool = False,
    ) -> None:
        """``strict_query``: answer 400 when list_devices / get_device lack the output-option booleans
        the public spec marks required (syncd's tests: it always sends them); by default they take
        their defaults (false), as the official SDK's newer revision expects."""
        if host not in LOOPBACK:
            raise ValueError(f"the simulator binds loopback only, not {host!r}")
        self.world = world
        self.strict_query = strict_query
        self.base_path = base_path.rstrip("/")
        self.auth_header = auth_header  # "x-api-key", "bearer" or "any"
        self.faults: list[Fault] = []
        self.latency = 0.0  # seconds added to every request before it is answered, faults or not
        self.log: deque[RequestRecord] = deque(maxlen=log_size)
        self.rng = random.Random(seed)
        self._routes = Routes.for_base(self.base_path)
        self._lock = threading.Lock()
        self._server = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for syncd's ``api.base_url``."""
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def start(self) -> Simulator:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="openapp-simulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` is called from another."""
        self._server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        """Stop serving and close every open connection."""
        self._server.shutdown()
        self._server.close_all()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault) -> Fault:
        """Add a fault; returns it (its ``fired`` count tells how often it struck)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self.faults.clear()

    def requests(self, operation: str | None = None, org_id: str | None = None) -> list[RequestRecord]:
        """Logged requests, optionally of one operation and/or org."""
        return [r for r in list(self.log) if operation in (None, r.operation) and org_id in (None, r.org_id)]

    def _fault_for(self, operation: str, org_id: str | None) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.matches(operation, org_id, self.rng)), None)

    # -- request handling ----------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> Reply:
        """Answer one request; a reply whose body is None means: reset the connection."""
        started = time.monotonic()
        split = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        offset = query.get("offset", "")
        reply = Reply(0, {}, None)
        record = RequestRecord(
            started,
            0.0,
            method,
            "unknown",
            headers.get("X-Org") or None,
            None,
            int(offset) if offset.isdigit() else None,
            0,
            headers.get("User-Agent") or "",
        )
        try:
            operation, device_id = self._routes.match(method, split.path)
            record = dataclasses.replace(record, operation=operation, device_id=device_id)
            if self.latency > 0:
                time.sleep(min(self.latency, 30.0))
            fault = self._fault_for(operation, record.org_id)
            if fault is not None and fault.kind == "reset":
                pass
            elif fault is not None and fault.kind == "status":
                extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                payload = (
                    fault.body
                    if fault.body is not None
                    else orjson.dumps({"message": f"injected fault {fault.status}", "error_code": "injected"})
                )
                reply = Reply(fault.status, extra, payload)
            else:
                if fault is not None and fault.kind == "slow":
                    time.sleep(min(fault.delay, 30.0))
                reply = Reply(200, {}, self._dispatch(operation, device_id, record.org_id, query, headers, body))
                if fault is not None and fault.kind == "slow_reply":
                    time.sleep(min(fault.delay, 30.0))
                if fault is not None and fault.kind == "lost":
                    reply = Reply(0, {}, None)
        except SimError as exc:
            reply = Reply(exc.status, {}, orjson.dumps({"message": exc.message, "error_code": exc.error_code}))
        self.log.append(dataclasses.replace(record, finished=time.monotonic(), status=reply.status))
        return reply

    def _key(self, headers: Any) -> str | None:
        key = None
        if self.auth_header in ("x-api-key", "any"):
            key = headers.get("X-API-Key")
        if key is None and self.auth_header in ("bearer", "any"):
            auth = headers.get("Authorization") or ""
            if auth.startswith("Bearer "):
                key = auth[len("Bearer ") :]
        return key

    def _dispatch(
        self,
        operation: str,
        device_id: str | None,
        org_id: str | None,
        query: dict[str, str],
        headers: Any,
        body: bytes,
    ) -> bytes:
        if operation == "status":  # the SDK's connect() probe
            return orjson.dumps({"status": "ok", "service": "openapp-simulator"})
        if operation == "get_door_restrictions":  # the spec declares no security here
            assert device_id is not None
            return self.world.door_restrictions(device_id)
        self.world.authorise(self._key(headers), org_id)
        assert org_id is not None
        return _OPERATIONS[operation](_Call(self.world, org_id, device_id, query, body, self.strict_query))


@dataclass(frozen=True, slots=True)
class _Call:
    """An authorised request, as an operation's handler reads it."""

    world: World
    org_id: str
    device_id: str | None
    query: dict[str, str]
    body: bytes
    strict: bool  # the output-option booleans are required (the `strict_query` mode)

    @property
    def device(self) -> str:
        """The device id of the path (every operation on one device has one)."""
        assert self.device_id is not None
        return self.device_id

    def flag(self, name: str) -> bool:
        return _flag(self.query, name, self.strict)


def _list_devices(call: _Call) -> bytes:
    filters = _list_filters(call.query)  # its problems are answered before the options'
    return call.world.list_devices(
        call.org_id,
        include_deleted=call.flag("include_deleted"),
        only_deleted=call.flag("only_deleted"),
        include_metadata=call.flag("include_metadata"),
        limit=_int(call.query, "limit", DEFAULT_LIMIT, MAX_LIMIT),
        offset=_int(call.query, "offset", 0, 2**31 - 1),
        filters=filters,
    )


def _list_filters(query: dict[str, str]) -> dict[str, Any]:
    """list_devices' filters, with the API's rules on which need which (400 otherwise)."""
    filters: dict[str, Any] = {
        k: query[k] for k in ("integration_id", "device_kind", "external_id", "q") if query.get(k)
    }
    for flag in ("has_external_id", "has_go2rtc_channel", "include_stale"):
        if flag in query and _flag(query, flag, required=False):
            filters[flag] = True
    needs_integration = ("device_kind", "has_external_id", "has_go2rtc_channel", "include_stale")
    if any(k in filters for k in needs_integration) and "integration_id" not in filters:
        raise SimError(400, "this filter requires integration_id", "invalid_query")
    if "external_id" in filters and "device_kind" not in filters:
        raise SimError(400, "external_id requires integration_id and device_kind", "invalid_query")
    filters.pop("include_stale", None)
    return filters


def _get_device(call: _Call) -> bytes:
    return call.world.get_device(call.org_id, call.device, call.flag("include_deleted"), call.flag("include_metadata"))


def _create_device(call: _Call) -> bytes:
    payload = _json_body(call.body)
    if "org_id" in payload and payload["org_id"] != call.org_id:
        raise SimError(403, "org_id does not match X-Org", "forbidden")
    return orjson.dumps(call.world.device(call.org_id, call.world.create_device(call.org_id, payload)))


_OPERATIONS: dict[str, Callable[[_Call], bytes]] = {
    "list_devices": _list_devices,
    "get_device": _get_device,
    "create_device": _create_device,
    "update_device": lambda call: call.world.update_device(call.org_id, call.device, _json_body(call.body)),
    "delete_device": lambda call: call.world.delete_device(call.org_id, call.device),
    "hard_delete_device": lambda call: call.world.purge_device(call.org_id, call.device),
    "restore_device": lambda call: call.world.restore_device(call.org_id, call.device),
    "set_door_restrictions": lambda call: call.world.set_door_restrictions(
        call.org_id, call.device, _json_body(call.body)
    ),
    "get_device_metadata_definition": lambda call: call.world.metadata_definition(call.org_id, call.device),
}


def _flag(query: dict[str, str], name: str, required: bool = True) -> bool:
    value = query.get(name)
    if value is None:
        if required:
            raise SimError(400, f"Failed to deserialize query string: missing field `{name}`", "invalid_query")
        return False
    if value not in ("true", "false"):
        raise SimError(400, f"Failed to deserialize query string: {name}: expected true or false", "invalid_query")
    return value == "true"


def _int(query: dict[str, str], name: str, default: int, maximum: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SimError(400, f"{name} must be an integer", "invalid_query") from None
    if number < 0:
        raise SimError(400, f"{name} must be >= 0", "invalid_query")
    if number > maximum:
        raise SimError(400, f"{name} must be <= {maximum}", "invalid_query")
    return number


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise SimError(400, "Request body is not valid JSON", "invalid_body") from None
    if not isinstance(payload, dict):
        raise SimError(400, "Request body must be a JSON object", "invalid_body")
    return payload


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer (a stopped or interrupted syncd) is no error of the
        simulator's: nothing is printed. Anything else is, as the standard library does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_all(self) -> None:
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _handler_for(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "openapp-simulator"
        disable_nagle_algorithm = True
        timeout = 60

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            reply = sim.handle(self.command, self.path, self.headers, body)
            if reply.body is None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
