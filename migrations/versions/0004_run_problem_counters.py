"""sync_runs.unreadable and sync_runs.duplicates: what a pass could not take from a list

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ADD COLUMN with a constant default: no table rewrite on either database.
    op.add_column("sync_runs", sa.Column("unreadable", sa.Integer(), server_default="0", nullable=False))
    op.add_column("sync_runs", sa.Column("duplicates", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("sync_runs", "duplicates")
    op.drop_column("sync_runs", "unreadable")
