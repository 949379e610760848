"""door restrictions (portal_restrictions, door_restrictions, the portal_access view), metadata
definitions, devices.credentials_set / has_credentials, and the 'restrictions' change kind

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Frozen copies of the column types as they were at this revision (migrations never import app code).
JSONDoc = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
Timestamp = sa.DateTime(timezone=True)
KINDS_BEFORE = "'created', 'updated', 'deleted', 'restored', 'purged'"
KINDS_AFTER = KINDS_BEFORE + ", 'restrictions'"
COUNTERS = ("restrictions", "restriction_requests", "restriction_failures", "definition_requests", "definition_failures")

DIALECT = {
    "sqlite": {
        "name": "COALESCE(json_extract(d.name, '$.en'), "
        "(SELECT value FROM json_each(d.name) ORDER BY key LIMIT 1))",
        "kind": "json_extract(d.device_metadata, '$.kind')",
        "since": "datetime('now', '-30 days')",
        # credentials_set as the Python side reads it: a boolean, or a list of strings; else NULL.
        "credentials_set": """CASE json_type(raw, '$.credentials_set')
            WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
            WHEN 'array' THEN CASE WHEN NOT EXISTS (
                SELECT 1 FROM json_each(raw, '$.credentials_set') WHERE type != 'text'
            ) THEN json_extract(raw, '$.credentials_set') END END""",
        "has_credentials": """CASE json_type(credentials_set)
            WHEN 'true' THEN 1 WHEN 'false' THEN 0
            WHEN 'array' THEN json_array_length(credentials_set) > 0 END""",
    },
    "postgresql": {
        "name": "COALESCE(d.name->>'en', (SELECT value FROM jsonb_each_text(d.name) ORDER BY key LIMIT 1))",
        "kind": "(CASE WHEN jsonb_typeof(d.device_metadata) = 'object' THEN d.device_metadata->>'kind' END)",
        "since": "now() - interval '30 days'",
        "credentials_set": """CASE jsonb_typeof(raw->'credentials_set')
            WHEN 'boolean' THEN raw->'credentials_set'
            WHEN 'array' THEN CASE WHEN NOT EXISTS (
                SELECT 1 FROM jsonb_array_elements(raw->'credentials_set') e WHERE jsonb_typeof(e) != 'string'
            ) THEN raw->'credentials_set' END END""",
        "has_credentials": """CASE jsonb_typeof(credentials_set)
            WHEN 'boolean' THEN credentials_set::text::boolean
            WHEN 'array' THEN jsonb_array_length(credentials_set) > 0 END""",
    },
}


def _device_report(sql: dict[str, str], with_credentials: bool) -> str:
    credentials = " d.has_credentials," if with_credentials else ""
    return f"""
        CREATE VIEW device_report AS
        SELECT d.id, d.org_id, d.integration_id, d.zone_id, d.external_id,
               {sql["name"]} AS name, {sql["kind"]} AS kind, d.state,{credentials}
               d.created_at, d.updated_at, d.deleted_at, d.purged_at, d.first_seen_at, d.last_seen_at
        FROM devices d
    """


def _recent_changes(sql: dict[str, str]) -> str:
    return f"""
        CREATE VIEW recent_changes AS
        SELECT c.id, c.observed_at, c.org_id, c.device_id, {sql["name"]} AS name, c.change, c.diff, c.run_id
        FROM device_changes c JOIN devices d ON d.id = c.device_id
        WHERE c.observed_at >= {sql["since"]}
    """


def _set_change_kinds(kinds: str) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table (the views that read it
    # are dropped around that by the callers).
    with op.batch_alter_table("device_changes") as batch:
        batch.drop_constraint(op.f("ck_device_changes_change"), type_="check")
        batch.create_check_constraint(op.f("ck_device_changes_change"), f"change IN ({kinds})")


def upgrade() -> None:
    sql = DIALECT[op.get_bind().dialect.name]
    op.execute("DROP VIEW recent_changes")
    op.execute("DROP VIEW device_report")
    _set_change_kinds(KINDS_AFTER)

    op.add_column(
        "devices",
        sa.Column(
            "credentials_set",
            JSONDoc,
            nullable=True,
            comment="as received: JSON Pointers of write-only credential fields that hold a value, or a boolean",
        ),
    )
    op.add_column(
        "devices",
        sa.Column("has_credentials", sa.Boolean(), nullable=True, comment="credentials_set in either form: any credential stored"),
    )
    op.execute(f"UPDATE devices SET credentials_set = {sql['credentials_set']}")
    op.execute(f"UPDATE devices SET has_credentials = {sql['has_credentials']}")
    for name in COUNTERS:
        op.add_column("sync_runs", sa.Column(name, sa.Integer(), server_default="0", nullable=False,
                                             comment="portals whose restrictions changed" if name == "restrictions" else None))

    op.create_table(
        "portal_restrictions",
        sa.Column("device_id", sa.String(64), nullable=False, comment="the portal"),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, comment="ok, not_a_portal (400), not_found (404), failed"),
        sa.Column("restricted", sa.Boolean(), nullable=True, comment="the last answer listed entities (false: no restriction)"),
        sa.Column("entity_count", sa.Integer(), nullable=True),
        sa.Column("body_key", sa.String(32), nullable=True,
                  comment="apartment_entity_ids or listing_entity_ids, as the answer had it"),
        sa.Column("raw", JSONDoc, nullable=True, comment="the last DoorRestrictionsResponse as received"),
        sa.Column("fetched_at", Timestamp, nullable=True, comment="the last answer"),
        sa.Column("changed_at", Timestamp, nullable=True, comment="when the list last changed"),
        sa.Column("attempted_at", Timestamp, nullable=False),
        sa.Column("next_fetch_at", Timestamp, nullable=False,
                  comment="asked again after this, or when the device changes"),
        sa.Column("device_fingerprint", sa.String(32), nullable=True, comment="devices.fingerprint when last asked"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False, comment="failed attempts in a row"),
        sa.CheckConstraint("status IN ('ok', 'not_a_portal', 'not_found', 'failed')",
                           name=op.f("ck_portal_restrictions_status")),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_portal_restrictions_device_id_devices")),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_portal_restrictions")),
    )
    op.create_index(op.f("ix_portal_restrictions_org_id_next_fetch_at"), "portal_restrictions",
                    ["org_id", "next_fetch_at"])

    op.create_table(
        "door_restrictions",
        sa.Column("device_id", sa.String(64), nullable=False, comment="the portal"),
        sa.Column("entity_id", sa.String(64), nullable=False, comment="an apartment / listing it lets through"),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("since", Timestamp, nullable=False, comment="when syncd first saw the entity on the portal"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_door_restrictions_device_id_devices")),
        sa.PrimaryKeyConstraint("device_id", "entity_id", name=op.f("pk_door_restrictions")),
    )
    op.create_index(op.f("ix_door_restrictions_entity_id"), "door_restrictions", ["entity_id"])
    op.create_index(op.f("ix_door_restrictions_org_id"), "door_restrictions", ["org_id"])

    op.create_table(
        "metadata_definitions",
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("integration_id", sa.String(64), nullable=False),
        sa.Column("provider_type", sa.String(64), nullable=True),
        sa.Column("json_schema", JSONDoc, nullable=True, comment="JSON Schema of device_metadata for this provider"),
        sa.Column("fingerprint", sa.String(32), nullable=True, comment="digest of json_schema (key order aside)"),
        sa.Column("device_id", sa.String(64), nullable=True, comment="the device it was asked of"),
        sa.Column("raw", JSONDoc, nullable=True, comment="the last DeviceMetadataDefinitionResponse as received"),
        sa.Column("fetched_at", Timestamp, nullable=True, comment="the last answer"),
        sa.Column("changed_at", Timestamp, nullable=True, comment="when json_schema last changed"),
        sa.Column("attempted_at", Timestamp, nullable=False),
        sa.Column("next_fetch_at", Timestamp, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False, comment="failed attempts in a row"),
        sa.PrimaryKeyConstraint("org_id", "integration_id", name=op.f("pk_metadata_definitions")),
    )
    op.create_index(op.f("ix_metadata_definitions_provider_type"), "metadata_definitions", ["provider_type"])

    op.execute(_device_report(sql, with_credentials=True))
    op.execute(_recent_changes(sql))
    # One row per portal and entity it lets through; a portal without restrictions (restricted
    # false) or not answered yet (restricted NULL) has one row with entity_id NULL.
    op.execute(f"""
        CREATE VIEW portal_access AS
        SELECT p.org_id, p.device_id AS portal_id, {sql["name"]} AS portal_name, d.state AS portal_state,
               p.status AS restrictions_status, p.restricted, r.entity_id, r.since AS entity_since,
               p.fetched_at AS restrictions_fetched_at, p.changed_at AS restrictions_changed_at
        FROM portal_restrictions p
        JOIN devices d ON d.id = p.device_id
        LEFT JOIN door_restrictions r ON r.device_id = p.device_id
    """)


def downgrade() -> None:
    sql = DIALECT[op.get_bind().dialect.name]
    for view in ("portal_access", "recent_changes", "device_report"):
        op.execute(f"DROP VIEW {view}")
    op.drop_table("metadata_definitions")
    op.drop_table("door_restrictions")
    op.drop_table("portal_restrictions")
    for name in reversed(COUNTERS):
        op.drop_column("sync_runs", name)
    op.drop_column("devices", "has_credentials")
    op.drop_column("devices", "credentials_set")
    op.execute("DELETE FROM device_changes WHERE change = 'restrictions'")  # the older schema cannot hold them
    _set_change_kinds(KINDS_BEFORE)
    op.execute(_device_report(sql, with_credentials=False))
    op.execute(_recent_changes(sql))
