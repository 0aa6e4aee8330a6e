"""Server-side sessions and API tokens: the bearer secrets that stand for a signed-in user.

Both are 256-bit random values shown once; the database stores only their SHA-256, so a stolen database does not
yield usable tokens. A session ends when idle or past its lifetime; an API token when it expires. Logout and
token changes are audited in the same transaction (sign-in itself is ``app.audit.accounts.authenticate``).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import col, select

from app.audit.actions import AuditAction
from app.audit.chain import append_in_transaction
from app.audit.db import read_session, write_session
from app.audit.errors import TokenNotFoundError
from app.audit.models import ApiToken, User, UserSession, utc_now

DEFAULT_IDLE_TIMEOUT = timedelta(minutes=30)
DEFAULT_SESSION_LIFETIME = timedelta(hours=12)
DEFAULT_API_TOKEN_LIFETIME = timedelta(days=90)

API_TOKEN_PREFIX = "vmd_"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- sessions ----------------------------------------------------------------------------------------------


def create_session(
    engine: Engine,
    user: User,
    *,
    idle_timeout: timedelta = DEFAULT_IDLE_TIMEOUT,
    lifetime: timedelta = DEFAULT_SESSION_LIFETIME,
    now: datetime | None = None,
) -> str:
    """Opens a server-side session for ``user`` (after ``authenticate``; ``login_ok`` is already audited).

    Args:
        engine: from ``init_db``.
        user: the signed-in user.
        idle_timeout: the session ends after this long without a request.
        lifetime: the session ends this long after creation, however active.
        now: creation time (aware); default now.

    Returns:
        The session token (43 URL-safe characters) for the cookie. It is not stored and cannot be recovered.
    """
    now = now or utc_now()
    token = secrets.token_urlsafe(32)
    with write_session(engine) as session:
        session.add(
            UserSession(
                token_hash=_token_hash(token),
                user_id=user.id,
                created_at=now,
                last_seen_at=now,
                idle_timeout_s=int(idle_timeout.total_seconds()),
                expires_at=now + lifetime,
            )
        )
    return token


def get_session_user(engine: Engine, token: str, *, now: datetime | None = None) -> User | None:
    """Resolves a session token to its user and marks the session as seen.

    ``None`` when the token is unknown, revoked, past its lifetime, idle for longer than its idle timeout, or
    the user is disabled. A session found idle or expired is revoked on the spot. One short write transaction
    per call (``last_seen_at``).

    Args:
        engine: from ``init_db``.
        token: from the cookie.
        now: request time (aware); default now.
    """
    now = now or utc_now()
    with write_session(engine) as session:
        row = session.exec(select(UserSession).where(UserSession.token_hash == _token_hash(token))).first()
        if row is None or row.revoked:
            return None
        user = session.get(User, row.user_id)
        if now >= row.expires_at or now - row.last_seen_at > timedelta(seconds=row.idle_timeout_s):
            row.revoked, row.revoked_at = True, now
            session.add(row)
            return None
        if user is None or user.disabled:
            return None
        row.last_seen_at = max(row.last_seen_at, now)
        session.add(row)
        return user


def revoke_session(engine: Engine, token: str, *, now: datetime | None = None) -> bool:
    """Ends a session (logout; audited ``logout``).

    Returns:
        ``True`` if an open session was revoked, ``False`` if the token was unknown or already revoked.
    """
    now = now or utc_now()
    with write_session(engine) as session:
        row = session.exec(select(UserSession).where(UserSession.token_hash == _token_hash(token))).first()
        if row is None or row.revoked:
            return False
        row.revoked, row.revoked_at = True, now
        session.add(row)
        append_in_transaction(
            session,
            AuditAction.LOGOUT,
            user=session.get(User, row.user_id),
            object_type="session",
            object_id=row.id,
            now=now,
        )
        return True


# --- API tokens --------------------------------------------------------------------------------------------


def create_api_token(
    engine: Engine,
    user: User,
    name: str,
    *,
    actor: User | None = None,
    lifetime: timedelta = DEFAULT_API_TOKEN_LIFETIME,
    now: datetime | None = None,
) -> str:
    """Creates a named API token for ``user`` (audited ``token_create``).

    Args:
        engine: from ``init_db``.
        user: whose token it is.
        name: a label, 1..100 characters (e.g. "nightly batch").
        actor: who created it; default ``user``.
        lifetime: how long it works, 1 day..10 years (``VALD_MD_API_TOKEN_DAYS``, default 90 days).
        now: creation time (aware); default now.

    Returns:
        The token (``vmd_`` + 43 URL-safe characters), shown once; only its SHA-256 is stored.

    Raises:
        ValueError: empty or over-long ``name``, ``lifetime`` out of range.
    """
    label = name.strip()
    if not 1 <= len(label) <= 100:
        raise ValueError(f"token name {name!r}: use 1-100 characters")
    if not timedelta(days=1) <= lifetime <= timedelta(days=3650):
        raise ValueError(f"token lifetime {lifetime}: use 1 to 3650 days")
    now = now or utc_now()
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with write_session(engine) as session:
        row = ApiToken(token_hash=_token_hash(token), user_id=user.id, name=label, created_at=now,
                       expires_at=now + lifetime)
        session.add(row)
        session.flush()
        append_in_transaction(
            session,
            AuditAction.TOKEN_CREATE,
            user=actor or user,
            object_type="api_token",
            object_id=row.id,
            detail={"owner": user.username, "name": label, "expires": row.expires_at.isoformat() if row.expires_at
                    else None},
            now=now,
        )
    return token


def get_token_user(engine: Engine, token: str, *, now: datetime | None = None) -> User | None:
    """Resolves an API token to its user (``None`` if unknown, revoked, expired, or the user is disabled)."""
    if not token.startswith(API_TOKEN_PREFIX):
        return None
    now = now or utc_now()
    with write_session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.token_hash == _token_hash(token))).first()
        if row is None or row.revoked or (row.expires_at is not None and now >= row.expires_at):
            return None
        user = session.get(User, row.user_id)
        if user is None or user.disabled:
            return None
        row.last_used_at = now
        session.add(row)
        return user


def list_api_tokens(engine: Engine, user_id: uuid.UUID | None = None) -> list[ApiToken]:
    """Returns ``user_id``'s tokens (every user's when ``None``; hashes only), newest first."""
    with read_session(engine) as session:
        statement = select(ApiToken).order_by(col(ApiToken.created_at).desc())
        if user_id is not None:
            statement = statement.where(ApiToken.user_id == user_id)
        return list(session.exec(statement).all())


def api_token_state(token: ApiToken, now: datetime | None = None) -> str:
    """``"revoked"``, ``"expired"`` (at ``now``, default now) or ``"active"``."""
    if token.revoked:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= (now or utc_now()):
        return "expired"
    return "active"


def find_api_token(engine: Engine, user_id: uuid.UUID, ref: str) -> ApiToken:
    """Finds one of ``user_id``'s tokens by id, a unique id prefix (at least 6 hex digits), or its exact name.

    A name that several tokens share is refused unless exactly one of them is still active.

    Raises:
        TokenNotFoundError: nothing matches, or the reference is ambiguous (the message says which).
    """
    wanted = ref.strip()
    tokens = list_api_tokens(engine, user_id)
    hex_ref = wanted.lower().replace("-", "")
    by_id = [t for t in tokens if len(hex_ref) >= 6 and t.id.hex.startswith(hex_ref)]
    if len(by_id) == 1:
        return by_id[0]
    by_name = [t for t in tokens if t.name == wanted]
    if len(by_name) > 1:
        by_name = [t for t in by_name if not t.revoked] or by_name
    if len(by_name) == 1 and not by_id:
        return by_name[0]
    if by_id or len(by_name) > 1:
        raise TokenNotFoundError(f"token {ref!r} matches several tokens: give more of the id")
    raise TokenNotFoundError(f"no API token {ref!r} for this user (vald-md users tokens NAME lists them)")


def revoke_api_token(
    engine: Engine,
    token_id: uuid.UUID,
    *,
    actor: User | None = None,
    owner_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> ApiToken:
    """Revokes an API token by id (audited ``token_revoke``; idempotent: a revoked token is not recorded twice).

    Args:
        engine: from ``init_db``.
        token_id: the token's id.
        actor: who revoked it; ``None`` for the CLI ("system").
        owner_id: when given, the token must belong to this user.
        now: revocation time (aware); default now.

    Raises:
        TokenNotFoundError: unknown id, or not ``owner_id``'s token.
    """
    now = now or utc_now()
    with write_session(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None or (owner_id is not None and row.user_id != owner_id):
            raise TokenNotFoundError(f"no API token with id {token_id}")
        if not row.revoked:
            owner = session.get(User, row.user_id)
            row.revoked, row.revoked_at = True, now
            session.add(row)
            append_in_transaction(
                session,
                AuditAction.TOKEN_REVOKE,
                user=actor,
                object_type="api_token",
                object_id=row.id,
                detail={"name": row.name, "owner": owner.username if owner is not None else None},
                now=now,
            )
    return row
