"""Alembic, driven programmatically: the migrations ship inside the installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

import syncd.migrations  # type: ignore[import-not-found]  # installed from migrations/

# Any fixed 64-bit number; it only has to be the same for every syncd sharing one database.
UPGRADE_LOCK_KEY = 0x73796E6364  # "syncd"


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


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Apply migrations inside the caller's transaction (serialised across instances on PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY})
    command.upgrade(alembic_config(connection), revision)
