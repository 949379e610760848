"""Who may sync an org right now: one pass per org across threads, processes and machines.

PostgreSQL: a session advisory lock per org, held on a dedicated connection for the whole pass, so
several syncd instances sharing one database split the orgs between them; if an instance dies its
connection closes and the lock is free for the others at their next tick.

SQLite: ``flock`` on small files in ``<database>.locks/`` (``daemon``, and one per org). The kernel
drops them when the process dies; they conflict between threads of one process too, because each
acquisition opens its own file description.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from syncd.errors import AlreadyRunningError, StoreError
from syncd.store.translate import translated

POLL = 0.2  # seconds between attempts while waiting for a lock


def lock_key(org_id: str) -> int:
    """A stable signed 64-bit key for an org (PostgreSQL advisory locks take bigint)."""
    return int.from_bytes(hashlib.blake2b(f"syncd:org:{org_id}".encode(), digest_size=8).digest(), "big", signed=True)


class OrgLocks:
    """Try-locks per org (and for the daemon) for one Store."""

    def __init__(self, engine: Engine, sqlite_path: Path | None) -> None:
        self._engine = engine
        self._dir = Path(f"{sqlite_path}.locks") if sqlite_path is not None else None

    @contextlib.contextmanager
    def org(self, org_id: str, wait: float = 0.0, stop: threading.Event | None = None) -> Iterator[bool]:
        """Hold the org's lock for the ``with`` block; yields False if another pass has it.

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
                yield acquired
            return
        with self._advisory_lock(org_id, give_up) as acquired:
            yield acquired

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
    def _advisory_lock(self, org_id: str, give_up: Callable[[], bool]) -> Iterator[bool]:
        key = lock_key(org_id)
        with translated(f"locking org {org_id}"):
            conn = self._engine.connect()
        try:
            with translated(f"locking org {org_id}"):
                while not (acquired := conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()):
                    conn.rollback()
                    if give_up():
                        break
                conn.commit()
            if not acquired:
                yield False
                return
            try:
                yield True
            finally:
                with contextlib.suppress(SQLAlchemyError):  # the session may be gone with its lock already
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        finally:
            conn.close()
