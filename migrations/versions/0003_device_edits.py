"""write-back queue: device_edits, and device_changes.source / edit_id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "device_edits",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("org_id", sa.String(64), nullable=True, comment="taken from the mirror when omitted"),
        sa.Column("action", sa.String(16), server_default="update", nullable=False),
        sa.Column("payload", JSONDoc, nullable=True,
                  comment="UpdateDeviceRequest fields: name, zone_id, external_id, device_metadata"),
        sa.Column("base_updated_at", Timestamp, nullable=True, comment="the mirror's updated_at when queued"),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", Timestamp, nullable=True, comment="NULL: due now"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("remote", JSONDoc, nullable=True,
                  comment="on conflict: OpenApp's current values of the fields the edit sets"),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("claimed_at", Timestamp, nullable=True),
        sa.Column("created_at", Timestamp, server_default=NOW, nullable=False),
        sa.Column("updated_at", Timestamp, server_default=NOW, nullable=False),
        sa.Column("applied_at", Timestamp, nullable=True),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.CheckConstraint("action IN ('update', 'restore')", name=op.f("ck_device_edits_action")),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'succeeded', 'failed', 'conflict', 'cancelled')",
            name=op.f("ck_device_edits_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_edits")),
    )
    op.create_index(op.f("ix_device_edits_status_next_attempt_at"), "device_edits", ["status", "next_attempt_at"])
    op.create_index(op.f("ix_device_edits_device_id_id"), "device_edits", ["device_id", "id"])
    op.add_column(
        "device_changes",
        sa.Column("source", sa.String(16), server_default="sync", nullable=False, comment="sync, or local_edit"),
    )
    op.add_column(
        "device_changes", sa.Column("edit_id", BigId, nullable=True, comment="the device_edits row, for local edits")
    )


def downgrade() -> None:
    # Plain ALTER TABLE DROP COLUMN (SQLite >= 3.35): a batch copy of the table would trip over the views.
    op.drop_column("device_changes", "edit_id")
    op.drop_column("device_changes", "source")
    op.drop_table("device_edits")
