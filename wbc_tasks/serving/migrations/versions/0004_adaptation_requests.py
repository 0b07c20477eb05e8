"""The watermark of reviews already learned or asked to be learned: ``adaptation_requests``.

One row per night that asked for an adaptation run (kind ``asset``) and per training run that
trained on the reviews (kind ``training``): the highest review id it accounts for, how many new
reviews that was, when, and the run (unique: a retried task finds its own row).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Written out, like 0001, so this migration stays what it was when later ones change the table.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "adaptation_requests",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("through_review_id", sa.BigInteger(), nullable=False),
        sa.Column("reviews", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_adaptation_requests"),
        sa.UniqueConstraint("run_id", name="uq_adaptation_requests_run_id"),
    )


def downgrade() -> None:
    op.drop_table("adaptation_requests")
