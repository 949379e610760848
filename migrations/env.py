"""Alembic environment: syncd passes an open connection; the alembic CLI passes a URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from syncd.store import migrate
from syncd.store.schema import metadata
from syncd.store.store import normalise_url

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        migrate.guard(connection, config.attributes.get("lock_timeout_ms", migrate.LOCK_TIMEOUT_MS))
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("SYNCD_DATABASE_URL")
    if not url:
        raise SystemExit("alembic: pass -x url=DATABASE_URL or set SYNCD_DATABASE_URL")
    with create_engine(normalise_url(url)).begin() as conn:
        run(conn)
