"""Each drop's counts, kept by the writers: ``drop_summaries``.

One row per drop (unique): its files, classified cells, rejected and pending files, cells that
need review, reviewed cells and suspected blasts, and when they were counted. The drops page reads
these rows instead of every cell of every drop (issue 31). Every writer recounts the drops it
touches in its own transaction (``wbc_tasks.serving.drop_summaries``).

The upgrade fills the table by recounting every drop already in the database, with the code's
counting rule (the rule defines the table). That rule reads only columns that exist since 0003; a
later migration that renames them, or changes this table, must recount in its own step.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_COUNTS = ("files", "cells", "rejected", "pending", "needs_review", "reviewed", "blast_suspected")


def upgrade() -> None:
    from wbc_tasks.serving.drop_summaries import recount_all

    op.create_table(
        "drop_summaries",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("drop", sa.String(255), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in _COUNTS),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drop_summaries"),
        sa.UniqueConstraint("drop", name="uq_drop_summaries_drop"),
    )
    recount_all(op.get_bind())


def downgrade() -> None:
    op.drop_table("drop_summaries")
