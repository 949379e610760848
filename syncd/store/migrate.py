"""Alembic, driven programmatically: the migrations ship inside the installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

import syncd.migrations  # type: ignore[import-not-found]  # installed from migrations/
from syncd.store.dialect import dialect_for

# Any fixed 64-bit number; it only has to be the same for every syncd sharing one database.
UPGRADE_LOCK_KEY = 0x73796E6364  # "syncd"
# PostgreSQL, as Warehouse does: a migration that waits this long for a table lock (behind a long
# report, say) gives up instead of queueing every reader of that table behind it; one statement
# may run this long (the backfills work in batches, so none should come near it).
LOCK_TIMEOUT_MS = 10_000
STATEMENT_TIMEOUT_MS = 300_000


def migrations_dir() -> Path:
    """Folder of the Alembic environment (``migrations/`` in the source tree)."""
    return Path(syncd.migrations.__file__).parent


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config without alembic.ini, optionally bound to an open connection."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration this syncd ships."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(connection: Connection, revision: str = "head", lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
    """Apply migrations inside the caller's transaction (serialised across instances on PostgreSQL,
    and bounded there by :func:`guard`)."""
    config = alembic_config(connection)
    config.attributes["lock_timeout_ms"] = lock_timeout_ms
    command.upgrade(config, revision)


def guard(connection: Connection, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
    """On PostgreSQL, inside the migration's transaction: one migrator at a time (an advisory lock,
    so two instances starting together do not race), and lock and statement timeouts (so a busy
    database is never hung). Called by ``migrations/env.py`` for syncd and the alembic CLI alike."""
    dialect = dialect_for(connection.dialect.name)
    dialect.guard_migration(connection, UPGRADE_LOCK_KEY, lock_timeout_ms, STATEMENT_TIMEOUT_MS)
