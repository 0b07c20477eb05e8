"""Why a prediction needs review, and how unfamiliar its image looked to the model.

Adds ``predictions.review_reasons`` (a JSON list of reasons: ``low_confidence``, ``unfamiliar``,
``image_check``, ``blast_suspected``; empty when none applies), ``predictions.unfamiliar_score``
(NULL for rows made before scores existed) and ``predictions.image_check`` (what the pre-model
image check found, NULL when it passed). Existing rows get ``["low_confidence"]`` where
``needs_review`` is true: the only reason the fixed threshold could give.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("review_reasons", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("unfamiliar_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("image_check", sa.Text(), nullable=True))
    predictions = sa.table(
        "predictions", sa.column("needs_review", sa.Boolean()), sa.column("review_reasons", sa.JSON())
    )
    op.execute(
        predictions.update()
        .where(predictions.c.needs_review == sa.true())
        .values(review_reasons=sa.literal(["low_confidence"], sa.JSON()))
    )


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("image_check")
        batch.drop_column("unfamiliar_score")
        batch.drop_column("review_reasons")
