"""Keyed audit chain, its signed state row, and API token expiry.

Revision ID: 0002_keyed_chain_tokens
Revises: 0001_initial
Create Date: 2026-12-06

- ``audit_event.key_id``: the HMAC key that signed the event. Existing events keep ``NULL`` and their plain SHA-256
  (they are verified with the old formula up to ``legacy_until``).
- ``audit_chain_state``: one row, the chain's high-water mark. ``last_seq`` starts at the highest ``seq`` ever
  used (on SQLite also what ``sqlite_sequence`` remembers, so a tail deleted *before* this upgrade still shows as
  a gap), ``legacy_until`` at the highest ``seq`` present. The row is unsigned (``mac`` empty) until ``init_db``
  signs it with the audit key and, if there were events, appends the ``audit_chain_keyed`` switch-over event.
  Triggers (frozen copies of ``app.audit.db``'s) refuse deleting it and lowering ``last_seq``.
- ``api_token.expires_at``: existing tokens get ``created_at`` + 90 days; tokens of accounts that are disabled
  now are revoked (before this revision, re-enabling an account revived them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_keyed_chain_tokens"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GENESIS = "0" * 64
_TOKEN_DAYS = 90

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_chain_state_no_delete BEFORE DELETE ON audit_chain_state "
    "BEGIN SELECT RAISE(ABORT, 'audit_chain_state only moves forward'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_chain_state_no_rewind BEFORE UPDATE ON audit_chain_state "
    "WHEN NEW.last_seq < OLD.last_seq OR NEW.legacy_until <> OLD.legacy_until OR NEW.id <> OLD.id "
    "BEGIN SELECT RAISE(ABORT, 'audit_chain_state only moves forward'); END",
)
_POSTGRESQL_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION audit_chain_state_guard() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_chain_state only moves forward'; END $$",
    "CREATE TRIGGER audit_chain_state_no_delete BEFORE DELETE ON audit_chain_state "
    "FOR EACH ROW EXECUTE FUNCTION audit_chain_state_guard()",
    "CREATE TRIGGER audit_chain_state_no_truncate BEFORE TRUNCATE ON audit_chain_state "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_state_guard()",
    "CREATE TRIGGER audit_chain_state_no_rewind BEFORE UPDATE ON audit_chain_state FOR EACH ROW "
    "WHEN (NEW.last_seq < OLD.last_seq OR NEW.legacy_until <> OLD.legacy_until OR NEW.id <> OLD.id) "
    "EXECUTE FUNCTION audit_chain_state_guard()",
)


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"

    # 1. events: the signing key (ALTER TABLE ADD COLUMN: no table copy, the append-only triggers stay)
    op.add_column("audit_event", sa.Column("key_id", sa.String(32), nullable=True))

    # 2. the chain state, from what is there now
    op.create_table(
        "audit_chain_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("legacy_until", sa.Integer(), nullable=False),
        sa.Column("schema_fingerprint", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    head = bind.execute(sa.text("SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1")).first()
    head_seq, head_hash = (int(head[0]), str(head[1])) if head is not None else (0, _GENESIS)
    high_water = head_seq
    if sqlite:
        used = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'audit_event'")).scalar()
        high_water = max(high_water, int(used or 0))
    bind.execute(
        sa.text(
            "INSERT INTO audit_chain_state (id, last_seq, head_hash, legacy_until, schema_fingerprint, key_id, mac) "
            "VALUES (1, :last_seq, :head_hash, :legacy_until, '', NULL, '')"
        ),
        {"last_seq": high_water, "head_hash": head_hash, "legacy_until": head_seq},
    )
    for statement in _SQLITE_TRIGGERS if sqlite else _POSTGRESQL_TRIGGERS:
        op.execute(statement)

    # 3. API tokens: expiry, and no token of a disabled account survives
    op.add_column("api_token", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    if sqlite:
        op.execute(f"UPDATE api_token SET expires_at = datetime(created_at, '+{_TOKEN_DAYS} days')")
        op.execute(
            "UPDATE api_token SET revoked = 1, revoked_at = datetime('now') WHERE revoked = 0 "
            "AND user_id IN (SELECT id FROM app_user WHERE disabled = 1)"
        )
    else:
        op.execute(f"UPDATE api_token SET expires_at = created_at + interval '{_TOKEN_DAYS} days'")
        op.execute(
            "UPDATE api_token SET revoked = true, revoked_at = now() WHERE NOT revoked "
            "AND user_id IN (SELECT id FROM app_user WHERE disabled)"
        )


def downgrade() -> None:
    # Events signed with a key cannot be verified by revision 0001's code: for development databases only.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_chain_state_guard() CASCADE")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_chain_state_no_delete")
        op.execute("DROP TRIGGER IF EXISTS audit_chain_state_no_rewind")
    op.drop_table("audit_chain_state")
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("expires_at")
    op.drop_column("audit_event", "key_id")
