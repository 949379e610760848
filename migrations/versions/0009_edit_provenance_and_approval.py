"""edit provenance and two-person approval: device_edits.requested_by (now always set: the CLI's
user@host; a plain INSERT's session_user on PostgreSQL, 'sql' on SQLite), requested_via,
requested_at, approval_requested_at, approved_by / approved_at, rejected_by / rejected_at, reason;
the statuses awaiting_approval and rejected; device_changes.requested_by / approved_by; and on
PostgreSQL a trigger that refuses an approval by the edit's own requester, in SQL too

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
STATUSES_BEFORE = "'pending', 'in_flight', 'succeeded', 'failed', 'conflict', 'cancelled'"
STATUSES_AFTER = STATUSES_BEFORE + ", 'awaiting_approval', 'rejected'"
REQUESTED_BY = "who queued the edit: user@host from the CLI; the session's role for SQL on PostgreSQL"

# The person an approval or a request names: `alice@ops-1` (the CLI) and `alice` (a PostgreSQL role)
# are the same person. syncd.store.edits.person is the same rule in Python.
PERSON_SQL = """
CREATE FUNCTION syncd_person(who text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT lower(regexp_replace(btrim(who), '@[^@]*$', ''))
$$
"""
# An approval (approved_at / approved_by set or changed) by the edit's requester is refused, whoever
# writes it; an approval that names nobody is the session's, and every approval is stamped with the
# database's clock. A role granted only UPDATE (approved_at) therefore approves as itself, now, and
# cannot approve what it queued (deploy/postgresql-ops-roles.sql).
TRIGGER_FUNCTION_SQL = """
CREATE FUNCTION syncd_edit_approval() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.approved_at IS NULL AND NEW.approved_by IS NULL THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.approved_at IS NOT DISTINCT FROM OLD.approved_at
            AND NEW.approved_by IS NOT DISTINCT FROM OLD.approved_by THEN
        RETURN NEW;
    END IF;
    NEW.approved_by := coalesce(NEW.approved_by, session_user);
    NEW.approved_at := clock_timestamp();
    IF syncd_person(NEW.approved_by) = syncd_person(NEW.requested_by) THEN
        RAISE EXCEPTION 'edit % was requested by %: it needs the approval of another person', NEW.id,
            NEW.requested_by USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$
"""
TRIGGER_SQL = """
CREATE TRIGGER syncd_edit_approval BEFORE INSERT OR UPDATE ON device_edits
FOR EACH ROW EXECUTE FUNCTION syncd_edit_approval()
"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column(
        "device_edits", sa.Column("requested_via", sa.String(8), nullable=False, server_default="sql", comment="cli or sql")
    )
    op.add_column(
        "device_edits",
        sa.Column(
            "requested_at",
            Timestamp,
            nullable=False,
            server_default=sa.text("CURRENT_TIMESTAMP"),
            comment="when the edit was queued, on the database's clock",
        ),
    )
    op.add_column(
        "device_edits",
        sa.Column(
            "approval_requested_at",
            Timestamp,
            nullable=True,
            comment="when the edit began to await approval, on the database's clock (writeback.approval_ttl counts "
            "from here)",
        ),
    )
    op.add_column(
        "device_edits",
        sa.Column("approved_by", sa.String(255), nullable=True, comment="who approved the edit (never its requester)"),
    )
    op.add_column("device_edits", sa.Column("approved_at", Timestamp, nullable=True))
    op.add_column("device_edits", sa.Column("rejected_by", sa.String(255), nullable=True))
    op.add_column("device_edits", sa.Column("rejected_at", Timestamp, nullable=True))
    op.add_column(
        "device_edits",
        sa.Column(
            "reason",
            sa.Text(),
            nullable=True,
            comment="why the edit ended unsent by a person's or a rule's decision: a rejection's reason, or that no "
            "approval came within writeback.approval_ttl",
        ),
    )
    # Before this revision the CLI always named its user@host and SQL rows named nobody.
    op.execute("UPDATE device_edits SET requested_via = 'cli' WHERE requested_by IS NOT NULL")
    op.execute("UPDATE device_edits SET requested_by = 'sql' WHERE requested_by IS NULL")
    op.execute("UPDATE device_edits SET requested_at = created_at")
    # SQLite cannot alter a CHECK constraint or a column's nullability: batch mode copies the table.
    with op.batch_alter_table("device_edits") as batch:
        batch.drop_constraint(op.f("ck_device_edits_status"), type_="check")
        batch.alter_column(
            "status", type_=sa.String(32), existing_type=sa.String(16), existing_nullable=False,
            existing_server_default="pending",
        )
        batch.create_check_constraint(op.f("ck_device_edits_status"), f"status IN ({STATUSES_AFTER})")
        batch.create_check_constraint(op.f("ck_device_edits_requested_via"), "requested_via IN ('cli', 'sql')")
        batch.alter_column(
            "requested_by",
            existing_type=sa.String(255),
            nullable=False,
            server_default=sa.text("session_user") if postgres else "sql",
            comment=REQUESTED_BY,
        )
    op.add_column(
        "device_changes",
        sa.Column(
            "requested_by",
            sa.String(255),
            nullable=True,
            comment="local edits: who queued the edit (device_edits.requested_by)",
        ),
    )
    op.add_column(
        "device_changes",
        sa.Column(
            "approved_by",
            sa.String(255),
            nullable=True,
            comment="local edits: who approved it, when its kind needed an approval",
        ),
    )
    op.execute("""
        UPDATE device_changes SET requested_by = (
            SELECT e.requested_by FROM device_edits e WHERE e.id = device_changes.edit_id
        ) WHERE edit_id IS NOT NULL
    """)
    if postgres:
        op.execute(PERSON_SQL)
        op.execute(TRIGGER_FUNCTION_SQL)
        op.execute(TRIGGER_SQL)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("DROP TRIGGER syncd_edit_approval ON device_edits")
        op.execute("DROP FUNCTION syncd_edit_approval()")
        op.execute("DROP FUNCTION syncd_person(text)")
    op.drop_column("device_changes", "approved_by")
    op.drop_column("device_changes", "requested_by")
    # The older code knows neither status: nothing unapproved may be pushed by it.
    op.execute(
        "UPDATE device_edits SET status = 'cancelled', last_error = coalesce(reason, 'awaited approval') "
        "WHERE status IN ('awaiting_approval', 'rejected')"
    )
    with op.batch_alter_table("device_edits") as batch:
        batch.drop_constraint(op.f("ck_device_edits_requested_via"), type_="check")
        batch.drop_constraint(op.f("ck_device_edits_status"), type_="check")
        batch.alter_column(
            "status", type_=sa.String(16), existing_type=sa.String(32), existing_nullable=False,
            existing_server_default="pending",
        )
        batch.create_check_constraint(op.f("ck_device_edits_status"), f"status IN ({STATUSES_BEFORE})")
        batch.alter_column(
            "requested_by", existing_type=sa.String(255), nullable=True, server_default=None, comment=None
        )
    for column in (
        "reason",
        "rejected_at",
        "rejected_by",
        "approved_at",
        "approved_by",
        "approval_requested_at",
        "requested_at",
        "requested_via",
    ):
        op.drop_column("device_edits", column)
