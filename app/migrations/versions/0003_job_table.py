"""The shared job table: every accepted job of every front process (``VALD_MD_JOB_STATE=database``).

Revision ID: 0003_job_table
Revises: 0002_keyed_chain_tokens
Create Date: 2026-12-07

- ``job``: one row per accepted review job (``app.audit.models.JobRecord``): owner, state, cost, times, the front
  that accepted it and the one that claimed it, the claim's heartbeat, attempts, progress, a cancel request (and
  the id of the user who asked) and the error. The request's parameters are not stored: the run folder's
  ``job.json`` keeps them (its free-text case label included, which stays out of the database). Used only when the
  site runs several front processes on one database (``app.jobs.jobtable``); a single-process site leaves it
  empty. Not append-only: it is the queue, not the record (``run`` and ``audit_event`` are).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_job_table"
down_revision: str | None = "0002_keyed_chain_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cost", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("submitted_by", sa.String(128), nullable=False),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", _TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("cancel_requested_by", sa.Uuid(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'done', 'failed', 'cancelled', 'interrupted')", name="ck_job_state"),
    )
    op.create_index("ix_job_owner", "job", ["owner"])
    op.create_index("ix_job_state", "job", ["state"])
    op.create_index("ix_job_updated_at", "job", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_job_updated_at", table_name="job")
    op.drop_index("ix_job_state", table_name="job")
    op.drop_index("ix_job_owner", table_name="job")
    op.drop_table("job")
