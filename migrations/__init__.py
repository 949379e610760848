"""Alembic migrations of the syncd mirror (installed as ``syncd.migrations``)."""
