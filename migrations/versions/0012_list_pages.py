"""list_pages and org_generations: syncd's own record of the list pages a pass compared whole with
the mirror (the body's digest, the org's generation then, the oldest last sight of its devices),
so that a later pass given the same page byte for byte can take it without comparing each device.
Any other write to an org's devices bumps the org's generation, which retires its pages.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "list_pages",
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
        sa.PrimaryKeyConstraint("org_id", "page_offset", name=op.f("pk_list_pages")),
        comment="syncd's own: list pages compared whole with the mirror, each with the body it had then",
    )
    op.create_table(
        "org_generations",
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_generations")),
        comment="syncd's own: bumped by every write to an org's devices that is not a list page's compare "
        "(purges, pushed edits, devices confirmed one by one); list_pages of an older generation are not trusted",
    )


def downgrade() -> None:
    op.drop_table("org_generations")
    op.drop_table("list_pages")
