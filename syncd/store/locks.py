"""Who may sync an org right now: one pass per org across threads, processes and machines.

PostgreSQL: a session advisory lock per org, held for the whole pass on the connection the pass
writes through (an :class:`OrgLease` carries it to :meth:`syncd.store.store.Store.session`), so
several syncd instances sharing one database split the orgs between them; if an instance dies its
connection closes and the lock is free for the others at their next tick. If the lock's session
ends while the pass runs (terminated, an idle timeout, a proxy, a failover), the pass's next
statement fails with it and the lease is lost for good: no write of the pass commits without the
lock (:class:`~syncd.errors.LockLostError`).

SQLite: ``flock`` on small files in ``<database>.locks/`` (``daemon``, and one per org). The kernel
drops them when the process dies; they conflict between threads of one process too, because each
acquisition opens its own file description.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from syncd.errors import AlreadyRunningError, LockLostError, StoreError
from syncd.store.dialect import Dialect, advisory_key
from syncd.store.translate import translated

POLL = 0.2  # seconds between attempts while waiting for a lock


def lock_key(org_id: str) -> int:
    """The advisory key of an org's lock."""
    return advisory_key(f"syncd:org:{org_id}")


class OrgLease:
    """What :meth:`OrgLocks.org` yields: true when the org's lock was taken.

    On PostgreSQL, ``connection`` is the connection whose session holds the advisory lock; a pass
    writes through it (:meth:`syncd.store.store.Store.session`), so each of its commits happened
    while the lock was held. Once that session has ended the lease is lost for good, though
    SQLAlchemy would reconnect the connection to a new session (one without the lock). On SQLite
    (``flock``: the kernel holds it for the process) there is no connection and nothing to lose.
    """

    def __init__(self, org_id: str, acquired: bool, connection: Connection | None = None) -> None:
        self.org_id = org_id
        self.acquired = acquired
        self.connection = connection if acquired else None
        # The driver's connection the lock was taken on: any other one is a session without the lock.
        self._driver: object = None if self.connection is None else self.connection.connection.dbapi_connection
        self._lost: str | None = None  # what ended the lock's session, once known

    def __bool__(self) -> bool:
        return self.acquired

    def __repr__(self) -> str:
        state = "lost" if self._lost is not None else "held" if self.acquired else "not acquired"
        return f"OrgLease({self.org_id!r}, {state})"

    @property
    def lost(self) -> bool:
        """Whether the session holding the lock is known to have ended."""
        if self._lost is None and self.connection is not None and self._session_ended():
            self._lost = "its connection was closed"
        return self._lost is not None

    def check(self) -> None:
        """LockLostError if the lock's session is known to have ended. No query: a statement on the
        lock's connection finds out by itself (see :meth:`guarded`)."""
        if self.lost:
            raise self._error()

    @contextlib.contextmanager
    def guarded(self, action: str) -> Iterator[None]:
        """Statements on the lock's connection: :func:`translated`, except that an error that ended
        the lock's session is LockLostError (and so is every later use)."""
        self.check()
        with translated(action, self._lost_by):
            yield

    def _lost_by(self, exc: SQLAlchemyError) -> LockLostError | None:
        """LockLostError if ``exc`` ended the lock's session (else None: a plain StoreError)."""
        disconnected = isinstance(exc, DBAPIError) and exc.connection_invalidated
        if self.connection is None or not (disconnected or self._session_ended()):
            return None
        self._lost = _reason(exc)
        return self._error()

    def _session_ended(self) -> bool:
        conn = self.connection
        assert conn is not None
        return (
            conn.closed
            or conn.invalidated
            or conn.connection.dbapi_connection is not self._driver
            or bool(getattr(self._driver, "closed", False))  # psycopg: the server ended the session
        )

    def _error(self) -> LockLostError:
        return LockLostError(
            f"the database session holding the lock of org {self.org_id} ended ({self._lost}): "
            "the pass stopped there, and nothing more of it was written"
        )


def _reason(cause: BaseException | None) -> str:
    """What the driver said when the session ended, on one short line (no SQL, no links)."""
    said = str(getattr(cause, "orig", None) or cause or "")
    said = said.partition("[SQL:")[0].partition("(Background on this error")[0]
    return " ".join(said.split())[:200] or "its connection was closed"


class OrgLocks:
    """Try-locks per org (and for the daemon) for one Store."""

    def __init__(self, engine: Engine, dialect: Dialect, sqlite_path: Path | None) -> None:
        self._engine = engine
        self._dialect = dialect
        self._dir = Path(f"{sqlite_path}.locks") if sqlite_path is not None else None

    @contextlib.contextmanager
    def org(self, org_id: str, wait: float = 0.0, stop: threading.Event | None = None) -> Iterator[OrgLease]:
        """Hold the org's lock for the ``with`` block; yields a lease, false if another pass has it.

        ``wait``: keep trying that many seconds before giving up (``stop`` ends the wait early).
        """
        deadline = time.monotonic() + wait

        def give_up() -> bool:
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return True
            time.sleep(POLL)
            return False

        if self._dir is not None:
            with self._file_lock(f"org-{lock_key(org_id) & 0xFFFFFFFFFFFFFFFF:016x}", give_up) as acquired:
                yield OrgLease(org_id, acquired)
            return
        with self._advisory_lock(org_id, give_up) as lease:
            yield lease

    @contextlib.contextmanager
    def instance(self) -> Iterator[None]:
        """The daemon's lock on a SQLite mirror: a second daemon on the same file refuses to start."""
        if self._dir is None:
            yield
            return
        with self._file_lock("daemon", lambda: True) as acquired:
            if not acquired:
                raise AlreadyRunningError(
                    f"another syncd daemon already uses this SQLite database (lock {self._dir}/daemon); "
                    "run one daemon per SQLite file, or share a PostgreSQL database between instances"
                )
            yield

    @contextlib.contextmanager
    def _file_lock(self, name: str, give_up: Callable[[], bool]) -> Iterator[bool]:
        assert self._dir is not None
        try:
            self._dir.mkdir(mode=0o750, exist_ok=True)
            fd = os.open(self._dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self._dir / name}: {exc.strerror}") from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if give_up():
                        yield False
                        return
            yield True
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _advisory_lock(self, org_id: str, give_up: Callable[[], bool]) -> Iterator[OrgLease]:
        key = lock_key(org_id)
        with translated(f"locking org {org_id}"):
            conn = self._engine.connect()
        try:
            with translated(f"locking org {org_id}"):
                while not (acquired := self._dialect.try_lock(conn, key)):
                    conn.rollback()
                    if give_up():
                        break
                conn.commit()
            if not acquired:
                yield OrgLease(org_id, False)
                return
            lease = OrgLease(org_id, True, conn)
            try:
                yield lease
            finally:
                if conn.in_transaction():  # a pass that ended inside one of its transactions
                    with contextlib.suppress(SQLAlchemyError):
                        conn.rollback()
                if not lease.lost:  # else the lock went with its session; do not reconnect to unlock
                    with contextlib.suppress(SQLAlchemyError):
                        self._dialect.unlock(conn, key)
                        conn.commit()
        finally:
            conn.close()
