"""initial mirror schema: devices, sync_runs, device_changes

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types as they were at this revision (migrations never import app code).
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), server_default="0", nullable=False)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False, comment="OpenApp device id (ULID)"),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("integration_id", sa.String(64), nullable=True),
        sa.Column("zone_id", sa.String(64), nullable=True),
        sa.Column("external_id", sa.Text(), nullable=True),
        sa.Column("name", JSONDoc, nullable=False, comment="{locale: text}; 'und' when OpenApp sent a bare string"),
        sa.Column("device_metadata", JSONDoc, nullable=True),
        sa.Column("created_at", Timestamp, nullable=True),
        sa.Column("updated_at", Timestamp, nullable=True),
        sa.Column("deleted_at", Timestamp, nullable=True),
        sa.Column("purge_at", Timestamp, nullable=True),
        sa.Column("hard_delete_at", Timestamp, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("purged_at", Timestamp, nullable=True, comment="when syncd confirmed the purge (GET answered 404)"),
        sa.Column("first_seen_at", Timestamp, nullable=False),
        sa.Column("last_seen_at", Timestamp, nullable=False),
        sa.Column("last_changed_at", Timestamp, nullable=False),
        sa.Column("fingerprint", sa.String(32), nullable=False, comment="digest of raw, for change detection"),
        sa.Column("raw", JSONDoc, nullable=False, comment="the DeviceResponse as last received"),
        sa.CheckConstraint("state IN ('active', 'deleted', 'purged')", name=op.f("ck_devices_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_org_id_state"), "devices", ["org_id", "state"])

    op.create_table(
        "sync_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("instance", sa.String(255), nullable=False, comment="host:pid of the syncd process"),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        *(_counter(name) for name in ("pages", "requests", "devices_seen", "created", "updated", "unchanged",
                                      "deleted", "restored", "purged", "rejected")),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'aborted')", name=op.f("ck_sync_runs_status")),
        sa.CheckConstraint("trigger IN ('scheduled', 'run-once')", name=op.f("ck_sync_runs_trigger")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_index(op.f("ix_sync_runs_org_id_started_at"), "sync_runs", ["org_id", "started_at"])
    op.create_index(op.f("ix_sync_runs_status"), "sync_runs", ["status"])

    op.create_table(
        "device_changes",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("run_id", BigId, nullable=True),
        sa.Column("observed_at", Timestamp, nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("diff", JSONDoc, nullable=True, comment="{field: {old, new}} of what changed; NULL for 'created'"),
        sa.CheckConstraint(
            "change IN ('created', 'updated', 'deleted', 'restored', 'purged')", name=op.f("ck_device_changes_change")
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_device_changes_device_id_devices")),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name=op.f("fk_device_changes_run_id_sync_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_changes")),
    )
    op.create_index(op.f("ix_device_changes_device_id_observed_at"), "device_changes", ["device_id", "observed_at"])
    op.create_index(op.f("ix_device_changes_org_id_observed_at"), "device_changes", ["org_id", "observed_at"])
    op.create_index(op.f("ix_device_changes_run_id"), "device_changes", ["run_id"])


def downgrade() -> None:
    op.drop_table("device_changes")
    op.drop_table("sync_runs")
    op.drop_table("devices")
