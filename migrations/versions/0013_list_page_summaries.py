"""list_pages keep what a later pass takes from a page instead of reading it: how many items it
held, the answer's total, its first device's id (what paging needs) and a summary (its device ids,
active portals and integrations). The table is syncd's own cache of pages compared before: it is
made again empty, and the next pass of each org compares every page once.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

TABLE_COMMENT = "syncd's own: list pages compared whole with the mirror, each with the body it had then"


def _columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("page_offset", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(32), nullable=False, comment="digest of how the page was asked for and read"),
        sa.Column("digest", sa.String(32), nullable=False, comment="xxh3-128 of the page's body as received"),
        sa.Column(
            "generation", sa.BigInteger(), nullable=False, comment="org_generations.generation when it was compared"
        ),
        sa.Column("run_id", sa.BigInteger(), nullable=False, comment="the sync_runs row of the pass that compared it"),
        sa.Column(
            "settled",
            sa.Boolean(),
            nullable=False,
            comment="that pass read its whole list and met no device on more than one page: the page is trusted",
        ),
        sa.Column(
            "seen_since",
            sa.DateTime(timezone=True),
            nullable=False,
            comment="the oldest last_seen_at of the page's devices when it was compared",
        ),
    ]


def upgrade() -> None:
    op.drop_table("list_pages")
    op.create_table(
        "list_pages",
        *_columns(),
        sa.Column("item_count", sa.Integer(), nullable=False, comment="how many items the page held"),
        sa.Column("total", sa.BigInteger(), nullable=True, comment="the answer's total, if it gave one"),
        sa.Column("first_id", sa.String(64), nullable=True, comment="the id of the page's first device"),
        sa.Column(
            "summary",
            sa.LargeBinary(),
            nullable=False,
            comment="what a pass takes from the page instead of reading it: its device ids, active portals, "
            "integrations",
        ),
        sa.PrimaryKeyConstraint("org_id", "page_offset", name=op.f("pk_list_pages")),
        comment=TABLE_COMMENT,
    )


def downgrade() -> None:
    op.drop_table("list_pages")
    op.create_table(
        "list_pages",
        *_columns(),
        sa.PrimaryKeyConstraint("org_id", "page_offset", name=op.f("pk_list_pages")),
        comment=TABLE_COMMENT,
    )
