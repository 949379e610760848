"""Who may sync an org right now: one pass per org across threads, processes and machines.

PostgreSQL: a session advisory lock per org, held on a dedicated connection for the whole pass, so
several syncd instances sharing one database split the orgs between them; if an instance dies its
connection closes and the lock is free for the others at their next tick.

SQLite: POSIX record locks on ``<database>.lock`` (byte 0: the daemon; one byte per org elsewhere).
The kernel drops them when the process dies. Record locks are per process, so a per-org thread
lock keeps two threads of one process apart as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from syncd.errors import AlreadyRunningError, StoreError

ORG_LOCK_SPACE = 2**40  # byte offsets for org locks in the SQLite lock file


def lock_key(org_id: str) -> int:
    """A stable signed 64-bit key for an org (PostgreSQL advisory locks take bigint)."""
    return int.from_bytes(hashlib.blake2b(f"syncd:org:{org_id}".encode(), digest_size=8).digest(), "big", signed=True)


class OrgLocks:
    """Try-locks per org for one Store."""

    def __init__(self, engine: Engine, sqlite_path: Path | None) -> None:
        self._engine = engine
        self._threads: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._fd: int | None = None
        if sqlite_path is not None:
            # One descriptor for the Store's lifetime: closing any descriptor of the file would drop
            # every record lock this process holds on it.
            self._fd = os.open(f"{sqlite_path}.lock", os.O_RDWR | os.O_CREAT, 0o640)

    def close(self) -> None:
        """Release every lock (closes the lock file on SQLite)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def org(self, org_id: str, wait: float = 0.0, stop: threading.Event | None = None) -> Iterator[bool]:
        """Hold the org's lock for the ``with`` block; yields False if another pass has it.

        ``wait``: keep trying that many seconds (polling) before giving up.
        """
        with self._guard:
            thread_lock = self._threads.setdefault(org_id, threading.Lock())
        deadline = time.monotonic() + wait
        while not thread_lock.acquire(blocking=False):
            if time.monotonic() >= deadline or (stop and stop.is_set()):
                yield False
                return
            time.sleep(0.2)
        try:
            with self._process_lock(org_id, deadline, stop) as acquired:
                yield acquired
        finally:
            thread_lock.release()

    @contextlib.contextmanager
    def instance(self) -> Iterator[None]:
        """The daemon's lock on a SQLite mirror: a second daemon on the same file refuses to start."""
        if self._fd is None:
            yield
            return
        if not _try_record_lock(self._fd, 0):
            raise AlreadyRunningError(
                f"another syncd daemon already uses this SQLite database (lock file {self._lock_name()}); "
                "run one daemon per SQLite file, or share a PostgreSQL database between instances"
            )
        try:
            yield
        finally:
            _unlock_record(self._fd, 0)

    def _lock_name(self) -> str:
        return os.readlink(f"/proc/self/fd/{self._fd}") if self._fd is not None else "?"

    @contextlib.contextmanager
    def _process_lock(self, org_id: str, deadline: float, stop: threading.Event | None) -> Iterator[bool]:
        key = lock_key(org_id)
        if self._fd is not None:
            offset = 1 + key % ORG_LOCK_SPACE
            while not _try_record_lock(self._fd, offset):
                if time.monotonic() >= deadline or (stop and stop.is_set()):
                    yield False
                    return
                time.sleep(0.2)
            try:
                yield True
            finally:
                _unlock_record(self._fd, offset)
            return
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise StoreError(f"database error while locking org {org_id}: {exc}") from exc
        try:
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()
                if time.monotonic() >= deadline or (stop and stop.is_set()):
                    yield False
                    return
                time.sleep(0.2)
            conn.commit()
            try:
                yield True
            finally:
                with contextlib.suppress(SQLAlchemyError):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        except SQLAlchemyError as exc:
            raise StoreError(f"database error while locking org {org_id}: {exc}") from exc
        finally:
            conn.close()


def _try_record_lock(fd: int, offset: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError:
        return False
    return True


def _unlock_record(fd: int, offset: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
