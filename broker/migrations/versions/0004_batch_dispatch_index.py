"""Index jobs by batch, status and dispatch time

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 10:00:00.000000

A batch keeps most of its jobs unpublished (``dispatched_at`` null) and publishes the
next ones as earlier ones settle; this index finds them, and counts the ones in flight,
without scanning the whole batch.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_batch_dispatch", ["batch_id", "status", "dispatched_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_dispatch")
