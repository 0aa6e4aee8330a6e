"""Accounts: password hashing, users, lockout and sign-in (sessions and API tokens: ``app.audit.tokens``).

There is no default account and no default password anywhere: the first admin is created explicitly (CLI).
Passwords are hashed with argon2id (pwdlib defaults: t=3, m=64 MiB, p=4; about 0.2 s on a 2-core CPU).
Disabling an account or resetting its password revokes its sessions and API tokens. Every change is audited in
the same transaction.
"""

from __future__ import annotations

import functools
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
    UserExistsError,
    UserNotFoundError,
    WeakPasswordError,
)
from app.audit.models import ApiToken, Outcome, Role, User, UserSession, utc_now

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
DEFAULT_MAX_FAILED_LOGINS = 5
DEFAULT_LOCKOUT = timedelta(minutes=15)
"""How long a new API token works (``VALD_MD_API_TOKEN_DAYS`` in the settings)."""
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
