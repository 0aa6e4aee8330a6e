"""Accounts: password hashing, users, lockout, server-side sessions and API tokens.

There is no default account and no default password anywhere: the first admin is created explicitly (CLI).
Passwords are hashed with argon2id (pwdlib defaults: t=3, m=64 MiB, p=4; about 0.2 s on a 2-core CPU).
Session and API tokens are 256-bit random values shown once; the database stores only their SHA-256, so a
stolen database does not yield usable tokens. Every change is audited in the same transaction.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import uuid
from datetime import datetime, timedelta

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from app.audit.actions import AuditAction
from app.audit.chain import append_in_transaction
from app.audit.db import read_session, write_session
from app.audit.errors import (
    InvalidUsernameError,
    LastAdminError,
    TokenNotFoundError,
    UserExistsError,
    UserNotFoundError,
    WeakPasswordError,
)
from app.audit.models import ApiToken, Outcome, Role, User, UserSession, utc_now

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
DEFAULT_MAX_FAILED_LOGINS = 5
DEFAULT_LOCKOUT = timedelta(minutes=15)
DEFAULT_IDLE_TIMEOUT = timedelta(minutes=30)
DEFAULT_SESSION_LIFETIME = timedelta(hours=12)
DEFAULT_API_TOKEN_LIFETIME = timedelta(days=90)
"""How long a new API token works (``VALD_MD_API_TOKEN_DAYS`` in the settings)."""
API_TOKEN_PREFIX = "vmd_"

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,63}$")
_PASSWORD_HASH = PasswordHash((Argon2Hasher(),))


# --- passwords ---------------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """Hashes ``password`` with argon2id (PHC string, salted; two calls give different strings)."""
    return _PASSWORD_HASH.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    """Checks ``password`` against a hash from ``hash_password``; a malformed hash gives ``False``."""
    try:
        return bool(_PASSWORD_HASH.verify(password, password_hash))
    except Exception:  # noqa: BLE001 - pwdlib raises for unknown/garbled hashes; that is a failed login
        return False


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def check_password_policy(password: str, *, username: str | None = None) -> None:
    """Enforces the password policy: 12..1024 characters, not the username, not one repeated character.

    Raises:
        WeakPasswordError: with the rule that failed (never the password).
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"password too short: use at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPasswordError(f"password too long: use at most {MAX_PASSWORD_LENGTH} characters")
    if username is not None and password.strip().lower() == username.lower():
        raise WeakPasswordError("password must differ from the username")
    if len(set(password)) < 4:
        raise WeakPasswordError("password must use at least 4 different characters")


def normalize_username(username: str) -> str:
    """Lower-cases and strips ``username`` and checks it against ``[a-z0-9][a-z0-9._@-]{1,63}``.

    Raises:
        InvalidUsernameError: quoting the bad value.
    """
    normalized = username.strip().lower()
    if not _USERNAME.match(normalized):
        raise InvalidUsernameError(
            f"username {username!r} is not allowed: use 2-64 characters a-z 0-9 . _ @ -, starting with a letter/digit"
        )
    return normalized


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --- users -------------------------------------------------------------------------------------------------


def _load_user(session: Session, user_id: uuid.UUID) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise UserNotFoundError(f"no user with id {user_id}")
    return user


def create_user(
    engine: Engine,
    username: str,
    password: str,
    *,
    role: Role | str = Role.CLINICIAN,
    actor: User | None = None,
    now: datetime | None = None,
) -> User:
    """Creates an account (audited ``user_add``).

    Args:
        engine: from ``init_db``.
        username: see ``normalize_username``; stored lower-case.
        password: see ``check_password_policy``. Required: there is no default.
        role: ``"clinician"`` or ``"admin"``.
        actor: the admin doing it; ``None`` for the CLI (recorded as "system").
        now: creation time (aware); default now.

    Returns:
        The new user.

    Raises:
        InvalidUsernameError, WeakPasswordError, UserExistsError, ValueError (unknown role).
    """
    name = normalize_username(username)
    role = Role(role)
    check_password_policy(password, username=name)
    password_hash = hash_password(password)  # slow: outside the write lock
    with write_session(engine) as session:
        if session.exec(select(User).where(User.username == name)).first() is not None:
            raise UserExistsError(f"username {name!r} is taken: choose another")
        user = User(username=name, password_hash=password_hash, role=role.value, created_at=now or utc_now())
        session.add(user)
        session.flush()
        append_in_transaction(
            session,
            AuditAction.USER_ADD,
            user=actor,
            object_type="user",
            object_id=user.id,
            detail={"username": name, "role": role.value},
            now=now,
        )
    return user


def get_user(engine: Engine, *, user_id: uuid.UUID | None = None, username: str | None = None) -> User | None:
    """Looks a user up by id or (case-insensitive) username; exactly one of them must be given."""
    if (user_id is None) == (username is None):
        raise ValueError("pass exactly one of user_id= or username=")
    with read_session(engine) as session:
        if user_id is not None:
            return session.get(User, user_id)
        return session.exec(select(User).where(User.username == (username or "").strip().lower())).first()


def list_users(engine: Engine, *, include_disabled: bool = True) -> list[User]:
    """Returns all users ordered by username."""
    statement = select(User).order_by(col(User.username))
    if not include_disabled:
        statement = statement.where(col(User.disabled).is_(False))
    with read_session(engine) as session:
        return list(session.exec(statement).all())


def _revoke_all(session: Session, table: type[UserSession] | type[ApiToken], user_id: uuid.UUID,
                now: datetime) -> int:
    """Revoke every open row of ``table`` (sessions or API tokens) that belongs to ``user_id``; returns how many."""
    open_rows = session.exec(select(table).where(table.user_id == user_id, col(table.revoked).is_(False))).all()
    for row in open_rows:
        row.revoked, row.revoked_at = True, now
        session.add(row)
    return len(open_rows)


def disable_user(engine: Engine, user_id: uuid.UUID, *, actor: User | None = None, now: datetime | None = None) -> User:
    """Disables an account and revokes its sessions and API tokens (audited ``user_disable``).

    Revoked tokens stay revoked: ``enable_user`` does not bring them back.

    Raises:
        UserNotFoundError: unknown id.
        LastAdminError: it is the last enabled admin.
    """
    now = now or utc_now()
    with write_session(engine) as session:
        user = _load_user(session, user_id)
        if user.role == Role.ADMIN and not user.disabled:
            admins = session.exec(
                select(func.count())
                .select_from(User)
                .where(User.role == Role.ADMIN.value, col(User.disabled).is_(False), User.id != user.id)
            ).one()
            if admins == 0:
                raise LastAdminError(f"{user.username!r} is the last enabled admin: create or enable another first")
        user.disabled = True
        session.add(user)
        revoked = _revoke_all(session, UserSession, user.id, now)
        tokens = _revoke_all(session, ApiToken, user.id, now)
        append_in_transaction(
            session,
            AuditAction.USER_DISABLE,
            user=actor,
            object_type="user",
            object_id=user.id,
            detail={"username": user.username, "sessions_revoked": revoked, "tokens_revoked": tokens},
            now=now,
        )
    return user


def enable_user(engine: Engine, user_id: uuid.UUID, *, actor: User | None = None, now: datetime | None = None) -> User:
    """Re-enables an account and clears its lockout (audited ``user_enable``). Its old API tokens stay revoked.

    Raises:
        UserNotFoundError: unknown id.
    """
    with write_session(engine) as session:
        user = _load_user(session, user_id)
        user.disabled, user.failed_logins, user.locked_until = False, 0, None
        session.add(user)
        append_in_transaction(
            session,
            AuditAction.USER_ENABLE,
            user=actor,
            object_type="user",
            object_id=user.id,
            detail={"username": user.username},
            now=now,
        )
    return user


def reset_password(
    engine: Engine,
    user_id: uuid.UUID,
    new_password: str,
    *,
    actor: User | None = None,
    now: datetime | None = None,
) -> User:
    """Sets a new password, clears the lockout, revokes all sessions and API tokens (audited ``password_reset``).

    Raises:
        UserNotFoundError, WeakPasswordError.
    """
    now = now or utc_now()
    current = get_user(engine, user_id=user_id)
    if current is None:
        raise UserNotFoundError(f"no user with id {user_id}")
    check_password_policy(new_password, username=current.username)
    password_hash = hash_password(new_password)
    with write_session(engine) as session:
        user = _load_user(session, user_id)
        user.password_hash, user.failed_logins, user.locked_until = password_hash, 0, None
        session.add(user)
        revoked = _revoke_all(session, UserSession, user.id, now)
        tokens = _revoke_all(session, ApiToken, user.id, now)
        append_in_transaction(
            session,
            AuditAction.PASSWORD_RESET,
            user=actor,
            object_type="user",
            object_id=user.id,
            detail={"username": user.username, "sessions_revoked": revoked, "tokens_revoked": tokens},
            now=now,
        )
    return user


def authenticate(
    engine: Engine,
    username: str,
    password: str,
    *,
    max_failures: int = DEFAULT_MAX_FAILED_LOGINS,
    lockout: timedelta = DEFAULT_LOCKOUT,
    now: datetime | None = None,
) -> User | None:
    """Checks a login; locks the account for ``lockout`` after ``max_failures`` consecutive wrong passwords.

    Audits ``login_ok`` or ``login_failed`` (detail ``reason``: ``unknown_user``, ``bad_password``, ``disabled``,
    ``locked``) and, when the limit is reached, ``lockout``. Unknown users, disabled and locked accounts cost one
    argon2 verification too, so timing does not reveal which usernames exist. While locked, even the right
    password is refused. The argon2 work runs outside the write lock.

    Args:
        engine: from ``init_db``.
        username: as typed (normalized like ``normalize_username``, without raising).
        password: as typed.
        max_failures: consecutive failures that trigger a lockout (>= 1).
        lockout: how long the account stays locked.
        now: the time of the attempt (aware); default now.

    Returns:
        The user on success, else ``None`` (the caller shows one generic message for every failure).
    """
    now = now or utc_now()
    name = username.strip().lower()
    candidate = get_user(engine, username=name) if _USERNAME.match(name) else None
    locked = candidate is not None and candidate.locked_until is not None and candidate.locked_until > now
    if candidate is None or candidate.disabled or locked:
        verify_password(password, _dummy_hash())
        reason = "unknown_user" if candidate is None else "disabled" if candidate.disabled else "locked"
        with write_session(engine) as session:
            append_in_transaction(
                session,
                AuditAction.LOGIN_FAILED,
                user=candidate,
                username=username.strip()[:150],
                object_type="user",
                object_id=None if candidate is None else candidate.id,
                outcome=Outcome.MINOR_FAILURE,
                detail={"reason": reason},
                now=now,
            )
        return None

    ok, new_hash = _PASSWORD_HASH.verify_and_update(password, candidate.password_hash)
    with write_session(engine) as session:
        user = _load_user(session, candidate.id)
        if ok:
            user.failed_logins, user.locked_until = 0, None
            if new_hash is not None:  # hasher parameters changed since this hash was made
                user.password_hash = new_hash
            session.add(user)
            append_in_transaction(session, AuditAction.LOGIN_OK, user=user, object_type="user", object_id=user.id,
                                  now=now)
            return user
        user.failed_logins += 1
        append_in_transaction(
            session,
            AuditAction.LOGIN_FAILED,
            user=user,
            object_type="user",
            object_id=user.id,
            outcome=Outcome.MINOR_FAILURE,
            detail={"reason": "bad_password", "consecutive_failures": user.failed_logins},
            now=now,
        )
        if user.failed_logins >= max_failures:
            user.locked_until = now + lockout
            append_in_transaction(
                session,
                AuditAction.LOCKOUT,
                user=user,
                object_type="user",
                object_id=user.id,
                outcome=Outcome.MINOR_FAILURE,
                detail={"failures": user.failed_logins, "locked_for_s": int(lockout.total_seconds())},
                now=now,
            )
            user.failed_logins = 0
        session.add(user)
    return None


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
