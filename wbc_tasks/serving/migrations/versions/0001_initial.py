"""Initial predictions schema: predictions, files_seen, rejections.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written out (not taken from wbc_tasks.serving.predictions.metadata) so this migration stays what it
# was when later migrations change the tables.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("predicted_class", sa.String(100), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(50), nullable=False),
        sa.Column("model_run_id", sa.String(64), nullable=False),
        sa.Column("dag_run_id", sa.String(250), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("needs_review", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.UniqueConstraint(
            "sha256", "model_name", "model_version",
            name="uq_predictions_sha256_model_name_model_version",
        ),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])

    op.create_table(
        "files_seen",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("drop", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mtime", sa.Float(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_run_id", sa.String(250), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files_seen"),
        sa.UniqueConstraint("path", "sha256", name="uq_files_seen_path_sha256"),
    )
    op.create_index("ix_files_seen_sha256", "files_seen", ["sha256"])
    op.create_index("ix_files_seen_drop", "files_seen", ["drop"])

    op.create_table(
        "rejections",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dag_run_id", sa.String(250), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejections"),
        sa.UniqueConstraint("path", "sha256", name="uq_rejections_path_sha256"),
    )


def downgrade() -> None:
    op.drop_table("rejections")
    op.drop_index("ix_files_seen_drop", table_name="files_seen")
    op.drop_index("ix_files_seen_sha256", table_name="files_seen")
    op.drop_table("files_seen")
    op.drop_index("ix_predictions_created_at", table_name="predictions")
    op.drop_table("predictions")
