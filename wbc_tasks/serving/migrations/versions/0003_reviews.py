"""People's reviews of classified cells: the ``reviews`` table.

One row per decision: the image (sha256, and the drop and path it was reviewed under), who and
when (UTC), the model name, version and predicted class at review time, the label given (one of
the nine classes or ``unusable``) and an optional note. No unique key: a second review of the
same image is a new row, and the latest one counts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out, like 0001, so this migration stays what it was when later ones change the table.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("drop", sa.String(255), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(50), nullable=False),
        sa.Column("predicted_class", sa.String(100), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
    )
    op.create_index("ix_reviews_sha256", "reviews", ["sha256"])
    op.create_index("ix_reviews_drop", "reviews", ["drop"])


def downgrade() -> None:
    op.drop_index("ix_reviews_drop", table_name="reviews")
    op.drop_index("ix_reviews_sha256", table_name="reviews")
    op.drop_table("reviews")
