"""Drops a night finished, with what they held: ``drop_scans``.

One row per drop (unique): the fingerprint of its files' names, sizes and times when a night
finished it (every file classified or rejected, none settling), how many files, when and by
which run. The next night skips a drop whose fingerprint is unchanged; nothing else reads it, so
an empty table only means every drop is scanned once more.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Written out, like 0001, so this migration stays what it was when later ones change the table.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "drop_scans",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("drop", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_run_id", sa.String(250), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drop_scans"),
        sa.UniqueConstraint("drop", name="uq_drop_scans_drop"),
    )


def downgrade() -> None:
    op.drop_table("drop_scans")
