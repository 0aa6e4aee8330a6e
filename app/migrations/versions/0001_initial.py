"""Initial schema: accounts, sessions, API tokens, inputs, runs, exports and the append-only audit_event.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-25

The append-only triggers are part of this revision (frozen copies of ``app.audit.db.SQLITE_TRIGGERS`` /
``POSTGRESQL_TRIGGERS``): SQLite gets ``RAISE(ABORT, ...)`` triggers, PostgreSQL a PL/pgSQL trigger function
that also refuses ``TRUNCATE``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_event_no_update BEFORE UPDATE ON audit_event "
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_event_no_delete BEFORE DELETE ON audit_event "
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END",
)
_POSTGRESQL_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_event is append-only'; END $$",
    "CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event "
    "FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()",
    "CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event "
    "FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()",
    "CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()",
)


def upgrade() -> None:
    op.create_table(
        "app_user",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("role IN ('clinician', 'admin')", name="ck_app_user_role"),
    )
    op.create_index("ix_app_user_username", "app_user", ["username"], unique=True)

    op.create_table(
        "user_session",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("last_seen_at", _TS, nullable=False),
        sa.Column("idle_timeout_s", sa.Integer(), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_user_session_token_hash", "user_session", ["token_hash"], unique=True)
    op.create_index("ix_user_session_user_id", "user_session", ["user_id"])

    op.create_table(
        "api_token",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("last_used_at", _TS, nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_token_token_hash", "api_token", ["token_hash"], unique=True)
    op.create_index("ix_api_token_user_id", "api_token", ["user_id"])

    op.create_table(
        "input_image",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("upload_sha256", sa.String(64), nullable=False),
        sa.Column("pixel_sha256", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("cols", sa.Integer(), nullable=False),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("study_uid_hmac", sa.String(64), nullable=True),
        sa.Column("series_uid_hmac", sa.String(64), nullable=True),
        sa.Column("sop_uid_hmac", sa.String(64), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("created_by", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_input_image_upload_sha256", "input_image", ["upload_sha256"])
    op.create_index("ix_input_image_pixel_sha256", "input_image", ["pixel_sha256"])
    op.create_index("ix_input_image_study_uid_hmac", "input_image", ["study_uid_hmac"])
    op.create_index("ix_input_image_sop_uid_hmac", "input_image", ["sop_uid_hmac"])
    op.create_index("ix_input_image_created_by", "input_image", ["created_by"])

    op.create_table(
        "run",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=False),
        sa.Column("input_id", sa.Uuid(), sa.ForeignKey("input_image.id"), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("seeds", sa.JSON(), nullable=False),
        sa.Column("effective_steps", sa.Integer(), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("library_versions", sa.JSON(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("artifact_hashes", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'cancelled', 'interrupted')", name="ck_run_status"
        ),
    )
    op.create_index("ix_run_user_id", "run", ["user_id"])
    op.create_index("ix_run_input_id", "run", ["input_id"])
    op.create_index("ix_run_status", "run", ["status"])

    op.create_table(
        "export",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("run_id", sa.Uuid(), sa.ForeignKey("run.id"), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_export_run_id", "export", ["run_id"])
    op.create_index("ix_export_user_id", "export", ["user_id"])

    op.create_table(
        "audit_event",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("ts", _TS, nullable=False),
        sa.Column("user_id", sa.Uuid(), sa.ForeignKey("app_user.id"), nullable=True),
        sa.Column("username", sa.String(150), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=True),
        sa.Column("object_id", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("event_id_code", sa.String(16), nullable=True),
        sa.Column("event_type_code", sa.String(16), nullable=True),
        sa.Column("event_action_code", sa.String(1), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("hash"),
        sqlite_autoincrement=True,
    )
    for column in ("ts", "user_id", "username", "action", "object_id"):
        op.create_index(f"ix_audit_event_{column}", "audit_event", [column])

    dialect = op.get_bind().dialect.name
    for statement in _POSTGRESQL_TRIGGERS if dialect == "postgresql" else _SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    # Destroys the audit trail: for development databases only.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_event_append_only() CASCADE")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_delete")
    for table in ("audit_event", "export", "run", "input_image", "api_token", "user_session", "app_user"):
        op.drop_table(table)
