"""The one place where database errors become :class:`~syncd.errors.StoreError`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError

from syncd.errors import StoreError, SyncdError


@contextmanager
def translated(action: str, instead: Callable[[SQLAlchemyError], SyncdError | None] | None = None) -> Iterator[None]:
    """Turn a database error inside the block into StoreError("database error while {action}: ...");
    or into what ``instead`` makes of it, when it makes something (an error that ended an org
    lock's session: LockLostError)."""
    try:
        yield
    except SQLAlchemyError as exc:
        other = None if instead is None else instead(exc)
        if other is not None:
            raise other from exc
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
        hint = ""
        if "unable to open database file" in detail:
            hint = " (does the SQLite file's folder exist, and may this user write in it? `syncd check-config` tells)"
        raise StoreError(f"database error while {action}: {detail[:300]}{hint}") from exc
