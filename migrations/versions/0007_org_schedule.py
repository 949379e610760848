"""org_schedule: when a pass of each org last started, on the database's clock, so that several
daemons sharing one PostgreSQL mirror run one pass per org per interval between them

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "org_schedule",
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column(
            "pass_started_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="start of the org's last scheduled pass, on the database's clock (NULL: none counts)",
        ),
        sa.Column("instance", sa.String(255), nullable=True, comment="host:pid of the syncd that started it"),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_schedule")),
        comment="PostgreSQL: which daemon last started a scheduled pass of each org, and when",
    )


def downgrade() -> None:
    op.drop_table("org_schedule")
