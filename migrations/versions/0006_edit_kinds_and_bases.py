"""write-back: the delete and door_restrictions edit kinds, and device_edits.base (the mirror's
values of the fields an edit sets, when it was queued: conflicts are decided field by field)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
ACTIONS_BEFORE = "'update', 'restore'"
ACTIONS_AFTER = "'update', 'restore', 'delete', 'door_restrictions'"


def _set_actions(actions: str, width: int) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table (no view reads it).
    with op.batch_alter_table("device_edits") as batch:
        batch.drop_constraint(op.f("ck_device_edits_action"), type_="check")
        batch.alter_column("action", type_=sa.String(width), existing_nullable=False, existing_server_default="update")
        batch.create_check_constraint(op.f("ck_device_edits_action"), f"action IN ({actions})")


def upgrade() -> None:
    _set_actions(ACTIONS_AFTER, 32)  # 'door_restrictions' is longer than 16
    op.add_column(
        "device_edits",
        sa.Column("base", JSONDoc, nullable=True,
                  comment="the mirror's values of the fields the edit sets, when it was queued"),
    )


def downgrade() -> None:
    op.drop_column("device_edits", "base")
    op.execute("DELETE FROM device_edits WHERE action IN ('delete', 'door_restrictions')")
    _set_actions(ACTIONS_BEFORE, 16)
