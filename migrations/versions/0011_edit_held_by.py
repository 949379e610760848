"""device_edits.held_by: why a pending edit waits unsent, as data ('send_cap': its kind's cap on
sends, writeback.max_deletes_per_hour), instead of the text 'held:' in its last_error. Edits held
before this revision (their last_error starts with 'held:') get it too.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COMMENT = (
    "why a pending edit waits unsent: send_cap (its kind's cap on sends, e.g. writeback.max_deletes_per_hour; "
    "last_error says until when); NULL: not held"
)


def upgrade() -> None:
    # SQLite cannot add a CHECK constraint to a table: batch mode copies it.
    with op.batch_alter_table("device_edits") as batch:
        batch.add_column(sa.Column("held_by", sa.String(16), nullable=True, comment=COMMENT))
        batch.create_check_constraint(op.f("ck_device_edits_held_by"), "held_by IN ('send_cap')")
    op.execute("UPDATE device_edits SET held_by = 'send_cap' WHERE last_error LIKE 'held:%'")


def downgrade() -> None:
    with op.batch_alter_table("device_edits") as batch:
        batch.drop_constraint(op.f("ck_device_edits_held_by"), type_="check")
        batch.drop_column("held_by")
