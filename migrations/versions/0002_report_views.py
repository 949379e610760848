"""report views: device_report, org_summary, recent_changes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# JSON access differs between the two databases; everything else is shared SQL.
DIALECT = {
    "sqlite": {
        "name": "COALESCE(json_extract(d.name, '$.en'), "
        "(SELECT value FROM json_each(d.name) ORDER BY key LIMIT 1))",
        "kind": "json_extract(d.device_metadata, '$.kind')",
        "since": "datetime('now', '-30 days')",
    },
    "postgresql": {
        "name": "COALESCE(d.name->>'en', (SELECT value FROM jsonb_each_text(d.name) ORDER BY key LIMIT 1))",
        "kind": "(CASE WHEN jsonb_typeof(d.device_metadata) = 'object' THEN d.device_metadata->>'kind' END)",
        "since": "now() - interval '30 days'",
    },
}


def upgrade() -> None:
    sql = DIALECT[op.get_bind().dialect.name]
    op.execute(f"""
        CREATE VIEW device_report AS
        SELECT d.id, d.org_id, d.integration_id, d.zone_id, d.external_id,
               {sql["name"]} AS name, {sql["kind"]} AS kind, d.state,
               d.created_at, d.updated_at, d.deleted_at, d.purged_at, d.first_seen_at, d.last_seen_at
        FROM devices d
    """)
    op.execute("""
        CREATE VIEW org_summary AS
        SELECT o.org_id,
               (SELECT count(*) FROM devices d WHERE d.org_id = o.org_id AND d.state = 'active') AS active,
               (SELECT count(*) FROM devices d WHERE d.org_id = o.org_id AND d.state = 'deleted') AS deleted,
               (SELECT count(*) FROM devices d WHERE d.org_id = o.org_id AND d.state = 'purged') AS purged,
               (SELECT max(r.finished_at) FROM sync_runs r
                 WHERE r.org_id = o.org_id AND r.status = 'succeeded') AS last_success,
               (SELECT r.status FROM sync_runs r WHERE r.org_id = o.org_id ORDER BY r.id DESC LIMIT 1) AS last_status
        FROM (SELECT org_id FROM devices UNION SELECT org_id FROM sync_runs) o
    """)
    op.execute(f"""
        CREATE VIEW recent_changes AS
        SELECT c.id, c.observed_at, c.org_id, c.device_id, {sql["name"]} AS name, c.change, c.diff, c.run_id
        FROM device_changes c JOIN devices d ON d.id = c.device_id
        WHERE c.observed_at >= {sql["since"]}
    """)


def downgrade() -> None:
    for view in ("recent_changes", "org_summary", "device_report"):
        op.execute(f"DROP VIEW {view}")
