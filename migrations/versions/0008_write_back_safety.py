"""write-back safety: device_edits.sent_at (when a write was sent, outcome known or not: the delete
cap counts these, on the database's clock), device_edits.credential_pointers (where an edit's
credentials are, recorded when queued), metadata_definitions.schema_problem (why a provider's
schema cannot be used)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.add_column(
        "device_edits",
        sa.Column(
            "sent_at",
            Timestamp,
            nullable=True,
            comment="when syncd last sent the edit's write to OpenApp, on the database's clock, recorded before "
            "the request went out (outcome known or not); the delete cap counts these",
        ),
    )
    op.add_column(
        "device_edits",
        sa.Column(
            "credential_pointers",
            JSONDoc,
            nullable=True,
            comment="JSON Pointers of credential values in payload.device_metadata (found when queued and when "
            "pushed): masked in output, and replaced by ******** once pushed",
        ),
    )
    op.create_index(op.f("ix_device_edits_action_sent_at"), "device_edits", ["action", "sent_at"])
    # Soft deletes pushed before this revision count against the cap from when they applied.
    op.execute("UPDATE device_edits SET sent_at = applied_at WHERE action = 'delete' AND status = 'succeeded'")
    op.add_column(
        "metadata_definitions",
        sa.Column(
            "schema_problem",
            sa.Text(),
            nullable=True,
            comment="why syncd will not check metadata edits against json_schema (NULL: it is usable); "
            "metadata edits of this integration fail unsent while it is set",
        ),
    )


def downgrade() -> None:
    op.drop_column("metadata_definitions", "schema_problem")
    op.drop_index(op.f("ix_device_edits_action_sent_at"), table_name="device_edits")
    op.drop_column("device_edits", "credential_pointers")
    op.drop_column("device_edits", "sent_at")
