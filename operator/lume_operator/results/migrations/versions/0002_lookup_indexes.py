"""Indexes for the lookups users make: a flow's newest results, by flow run, by resource.

Revision ID: 0002_lookup_indexes
Revises: 0001_documents
Create Date: 2025-01-01
"""

from __future__ import annotations

from alembic import op

revision: str = "0002_lookup_indexes"
down_revision: str | None = "0001_documents"
branch_labels: str | None = None
depends_on: str | None = None

TABLE = "lume_result_documents"


def upgrade() -> None:
    op.create_index("ix_lume_result_documents_flow_created", TABLE, ["flow_name", "created_at"])
    op.create_index("ix_lume_result_documents_flow_run_id", TABLE, ["flow_run_id"])
    op.create_index("ix_lume_result_documents_resource_created", TABLE, ["resource", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_lume_result_documents_resource_created", table_name=TABLE)
    op.drop_index("ix_lume_result_documents_flow_run_id", table_name=TABLE)
    op.drop_index("ix_lume_result_documents_flow_created", table_name=TABLE)
