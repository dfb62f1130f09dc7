"""Result documents table, with the (flow, inputs) hash unique.

Revision ID: 0001_documents
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_documents"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "lume_result_documents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("flow_name", sa.String(255), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("resource", sa.String(512), nullable=True),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("files", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unique_hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("unique_hash", name="uq_lume_result_documents_unique_hash"),
    )


def downgrade() -> None:
    op.drop_table("lume_result_documents")
