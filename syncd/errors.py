"""Every error syncd raises, named by what the caller should do next.

::

    SyncdError                      root: anything syncd itself reports
    ├── ConfigError                 fix the configuration (or CLI arguments), then rerun
    │   ├── AuthError               401: the API key is wrong or revoked; retrying cannot help
    │   └── AlreadyRunningError     another daemon already owns this SQLite mirror
    ├── TransientError              try again later (the client already retried within its budget)
    │   ├── TransportError          connect / read / reset / timeout talking to the API
    │   │   ├── RequestTimeoutError no complete answer within api.request_timeout (or the pass's deadline)
    │   │   └── UnreachableError    no connection at api.base_url's host:port (refused, unknown host, TLS)
    │   └── ServerBusyError         408, 425, 429, 5xx (carries the server's Retry-After hint)
    ├── PermanentError              give up on this request; repeating it gives the same answer
    │   ├── ForbiddenError          403: the key may not act for this org
    │   ├── NotFoundError           404: no such device (or not visible to this org)
    │   ├── RejectedError           400, 422 and any other 4xx: the request itself was refused
    │   ├── InvalidRequestError     syncd will not send this request (a device id OpenApp cannot have issued)
    │   └── InvalidResponseError    the API answered with something we cannot read or believe
    │       ├── InvalidDeviceError  one device in a list cannot be read (carries its position and id)
    │       └── ResponseTooLargeError  the answer is larger than api.max_response_size
    ├── StoreError                  the database failed; the transaction was rolled back
    │   ├── SchemaOutdatedError     the database schema is behind: run `syncd db upgrade`
    │   ├── LockLostError           the session holding an org's lock ended mid-pass: the pass stopped
    │   └── ClaimLostError          an edit is no longer this reconciler's (its lease ran out): leave it
    ├── PassRefusedError            a safety guard stopped a pass; an operator must confirm
    │   └── MassPurgeRefusedError   a pass would purge too much; rerun with --allow-mass-purge
    └── StoppedError                stopped on request (SIGTERM, SIGINT, shutdown): nothing to fix

Errors that come from an HTTP response carry an :class:`ApiProblem` with the status and the
parsed ``ApiErrorResponse`` body (``message``, ``error_code``, ``correlationId``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ApiProblem:
    """What an error response said: status plus the ApiErrorResponse fields, if any."""

    status: int
    message: str | None = None
    error_code: str | None = None
    correlation_id: str | None = None

    def describe(self) -> str:
        """One line such as ``HTTP 422 (device_has_entities): Device has entities``."""
        text = f"HTTP {self.status}"
        if self.error_code:
            text += f" ({self.error_code})"
        if self.message:
            text += f": {self.message}"
        if self.correlation_id:
            text += f" [correlation id {self.correlation_id}]"
        return text


class SyncdError(Exception):
    """Root of every error syncd reports."""

    def __init__(self, message: str, *, problem: ApiProblem | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problem = problem

    @property
    def status(self) -> int | None:
        """The HTTP status behind this error, when there was one."""
        return self.problem.status if self.problem else None

    def __str__(self) -> str:
        return self.message


class ConfigError(SyncdError):
    """The configuration or the command line is wrong; fix it and rerun."""

    def __init__(
        self,
        message: str,
        *,
        problems: list[str] | None = None,
        problem: ApiProblem | None = None,
        where: str | None = None,
    ) -> None:
        """``problems``: each problem found, when there are several; ``where``: the file they are in."""
        super().__init__(message, problem=problem)
        self.problems = problems or [message]
        self.where = where


class AuthError(ConfigError):
    """The API refused the key (401)."""


class AlreadyRunningError(ConfigError):
    """A second daemon was pointed at a SQLite mirror that one already uses."""


class TransientError(SyncdError):
    """Worth retrying later."""

    def __init__(self, message: str, *, problem: ApiProblem | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, problem=problem)
        self.retry_after = retry_after


class TransportError(TransientError):
    """The request did not get an HTTP answer (connect, read, reset, timeout)."""


class RequestTimeoutError(TransportError):
    """The request got no complete answer within its total deadline."""


class UnreachableError(TransportError):
    """No connection could be made where ``api.base_url`` points: nothing listens there
    (``refused``), the host name is unknown (``dns``), or TLS failed (``tls``). Worth retrying (a
    restart, a DNS blip), but more often ``api.base_url`` is wrong."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServerBusyError(TransientError):
    """The server answered 408, 425, 429 or 5xx."""


class PermanentError(SyncdError):
    """Repeating the same request gives the same answer."""


class ForbiddenError(PermanentError):
    """403: the key may not act for this organisation."""


class NotFoundError(PermanentError):
    """404: the resource does not exist (for this organisation)."""


class RejectedError(PermanentError):
    """400, 422 or another 4xx: the request itself was refused."""


class InvalidRequestError(PermanentError):
    """syncd refuses to send a request built from untrusted data (an id OpenApp cannot have issued)."""


class InvalidResponseError(PermanentError):
    """The API answered with a body syncd cannot read, or one about something else than was asked."""


class InvalidDeviceError(InvalidResponseError):
    """One device cannot be read or stored; the other devices of its page still can.

    ``device_id`` is the id as received when it was readable (shown escaped and shortened).
    """

    def __init__(self, message: str, *, position: int | None = None, device_id: str | None = None) -> None:
        where = []
        if position is not None:
            where.append(f"position {position}")
        if device_id is not None:
            where.append(f"id {device_id}")
        super().__init__(f"device at {', '.join(where)}: {message}" if where else f"device: {message}")
        self.position = position
        self.device_id = device_id
        self.reason = message


class ResponseTooLargeError(InvalidResponseError):
    """The answer (after decompression) is larger than ``api.max_response_size``."""


class StoreError(SyncdError):
    """The database failed; the current transaction was rolled back."""


class SchemaOutdatedError(StoreError):
    """The database schema is not at the version this syncd needs."""


class LockLostError(StoreError):
    """The database session holding an org's lock ended (terminated, an idle timeout, a proxy, a
    failover) while a pass ran: the pass stopped, and nothing more of it was written."""


class ClaimLostError(StoreError):
    """An edit this reconciler claimed is no longer its own (its lease ran out and another took it,
    or an operator moved it): nothing was sent; it is left to its new owner."""


class PassRefusedError(SyncdError):
    """A safety guard refused to finish a pass; an operator has to confirm."""


class MassPurgeRefusedError(PassRefusedError):
    """The pass would mark too many devices purged."""


class StoppedError(SyncdError):
    """The work was stopped on request (SIGTERM, SIGINT, daemon shutdown); it is not a failure."""
