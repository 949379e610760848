"""Below the client: every request bounded by a total deadline, and interruptible by a stop.

httpx's timeouts bound each socket operation, not the request: a server that sends a byte every
few seconds never trips them. Here each socket operation of a request also gets no more time than
the request has left (:class:`Attempt`), so a request ends at its deadline however the server
trickles; and :meth:`InFlight.abort` shuts down the sockets of requests in flight, so that a stop
does not wait for them.

The guard sits in httpcore's network backend, the one layer every byte passes through. httpx has no
public switch for it, so :func:`guarded_transport` sets it on the connection pool httpx builds.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import typing
import urllib.request
from collections.abc import Iterable, Iterator

import httpcore
import httpx

_current = threading.local()  # the Attempt of the request this thread is making, if any


class Attempt:
    """One HTTP request in flight: its deadline (monotonic), and whether a stop may cut it short."""

    __slots__ = ("aborted", "expires", "interruptible", "stream")

    def __init__(self, expires: float, interruptible: bool) -> None:
        self.expires = expires
        self.interruptible = interruptible
        self.stream: httpcore.NetworkStream | None = None
        self.aborted = False

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self.expires

    def abort(self) -> None:
        """Make the request fail now: its socket is shut down, which wakes a blocked read."""
        self.aborted = True
        stream = self.stream
        if stream is not None:
            sock = stream.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def bound(self, timeout: float | None, stream: httpcore.NetworkStream | None) -> float:
        """The time a socket operation may take: what httpx allows, at most what is left."""
        if stream is not None:
            self.stream = stream  # before the check below, so that abort() either sees it or we see aborted
        if self.aborted:
            raise httpcore.ReadError("stopped")
        left = self.expires - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the request's deadline passed")
        return left if timeout is None else min(timeout, left)


def _bounded(timeout: float | None, stream: httpcore.NetworkStream | None = None) -> float | None:
    attempt: Attempt | None = getattr(_current, "attempt", None)
    return timeout if attempt is None else attempt.bound(timeout, stream)


class InFlight:
    """The requests a client has in flight, so that a stop can interrupt them."""

    def __init__(self) -> None:
        self._attempts: set[Attempt] = set()  # set.add/discard and list(set) are atomic under the GIL
        self._aborted = False

    @contextlib.contextmanager
    def attempt(self, expires: float, interruptible: bool) -> Iterator[Attempt]:
        """Register one request of this thread for the ``with`` block (one that may be interrupted
        and begins after :meth:`abort` fails at its first socket operation)."""
        attempt = Attempt(expires, interruptible)
        self._attempts.add(attempt)
        if interruptible and self._aborted:  # after the add: an abort() running now sees it, or we see this
            attempt.aborted = True
        _current.attempt = attempt
        try:
            yield attempt
        finally:
            _current.attempt = None
            self._attempts.discard(attempt)

    def abort(self) -> int:
        """Interrupt every interruptible request in flight, and any that starts later; returns how many."""
        self._aborted = True
        attempts = [a for a in list(self._attempts) if a.interruptible]
        for attempt in attempts:
            attempt.abort()
        return len(attempts)


class _GuardedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, self))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, self))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _GuardedStream(self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout, self)))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _bounded(timeout), local_address, socket_options)
        return _GuardedStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[typing.Any] | None = None
    ) -> httpcore.NetworkStream:
        return _GuardedStream(self._inner.connect_unix_socket(path, _bounded(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def guarded_transport(base_url: str, verify: ssl.SSLContext | bool, limits: httpx.Limits) -> httpx.HTTPTransport:
    """An httpx transport whose every socket operation honours the current :class:`Attempt`.

    Proxies come from the usual environment variables (``HTTPS_PROXY``, ``NO_PROXY``, ...), read
    here because the client does not let httpx read the environment (which would also mean
    ``.netrc`` credentials and transports without the guard).
    """
    url = httpx.URL(base_url)
    proxy = None
    if not urllib.request.proxy_bypass(url.host):
        proxy = urllib.request.getproxies().get(url.scheme)
    transport = httpx.HTTPTransport(verify=verify, limits=limits, proxy=proxy)
    pool = transport._pool
    if not hasattr(pool, "_network_backend"):  # pragma: no cover - a new httpcore would show up here first
        raise RuntimeError("httpcore's connection pool has changed: syncd cannot bound its requests")
    pool._network_backend = _GuardedBackend()
    return transport
