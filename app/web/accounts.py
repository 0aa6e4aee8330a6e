"""Signing in and out.

=======  ==========  ==============================================================================================
GET      /login      the login form (and, while no administrator exists, how to create the first one)
POST     /login      username + password -> a server-side session cookie; rate limited per address and username
POST     /logout     revoke the session and clear the cookie
=======  ==========  ==============================================================================================

There is no default account: the first administrator is created on the server with
``vald-md users add NAME --role admin``. Every attempt is audited by ``audit.authenticate`` (``login_ok``,
``login_failed`` with the reason, ``lockout``); rate-limited attempts never reach the password check and are
audited once per minute and key. The session cookie is ``HttpOnly``, ``SameSite=Lax``, ``Secure`` over HTTPS (or
with ``VALD_MD_COOKIE_SECURE=1`` behind a TLS proxy), and has no ``Max-Age``: the server ends it (idle timeout,
lifetime, logout, disabled account, password reset).
"""

from __future__ import annotations

import hmac
import logging
import re
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine as Database
from starlette.concurrency import run_in_threadpool

from app import audit
from app.web.auth import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    LoginRateLimiter,
    cookie_is_secure,
    login_csrf_token,
    new_login_csrf,
)
from app.web.deps import CurrentUser, DbDep, SettingsDep
from app.web.templating import render

logger = logging.getLogger("vald_md.web")

router = APIRouter(tags=["accounts"], include_in_schema=False)

FIRST_ADMIN_HINT = "vald-md users add NAME --role admin"
"""The command that creates the first administrator (shown on the login page and logged at start-up)."""
_NEXT = re.compile(r"^/(?![/\\])[^\s\\]{0,2000}$")
UNTRUSTED_NAME_PREFIX = "untrusted:"
"""Marks a login name in the audit trail that is no account's: it is whatever the client typed."""
UNTRUSTED_NAME_CHARS = 32
"""How much of such a name is kept (escaped, so at most ``64`` characters after the prefix)."""


def has_admin(db: Database) -> bool:
    """At least one enabled administrator account exists."""
    return any(u.role == audit.Role.ADMIN.value and not u.disabled for u in audit.list_users(db))


def safe_next(value: str | None) -> str:
    """A local path to return to after login; anything else (another host, ``//x``, ``/login``) becomes ``/``."""
    if not value or not _NEXT.match(value) or value.startswith("/login"):
        return "/"
    return value


def client_address(request: Request) -> str:
    """The client's address as the server sees it (behind a proxy: what uvicorn's proxy-headers support gives)."""
    return request.client.host if request.client else "unknown"


def untrusted_name(typed: str) -> str:
    """A login name that is no account's, as the audit trail keeps it: ``untrusted:`` + its first
    :data:`UNTRUSTED_NAME_CHARS` characters with everything but printable ASCII escaped (``\\xe9``), cut to 64
    characters, ``...`` when cut. The client chose it (up to 150 characters, any Unicode): it must neither pass for
    a real account name nor carry control characters or bulk into the trail."""
    text = typed.strip()
    escaped = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                      for c in text[:UNTRUSTED_NAME_CHARS])
    cut = len(text) > UNTRUSTED_NAME_CHARS or len(escaped) > 64
    return UNTRUSTED_NAME_PREFIX + escaped[:64] + ("..." if cut else "")


def audited_login_name(db: Database, typed: str) -> str:
    """``typed`` when it names an account (normalized), else :func:`untrusted_name` of it. Blocking (database)."""
    try:
        name = audit.normalize_username(typed)
    except audit.InvalidUsernameError:
        return untrusted_name(typed)
    return name if audit.get_user(db, username=name) is not None else untrusted_name(typed)


def _login_page(request: Request, db: Database, *, next_path: str, status_code: int = 200, error: str | None = None,
                username: str = "", headers: dict[str, str] | None = None) -> HTMLResponse:
    nonce = new_login_csrf()
    context = {"login_csrf": login_csrf_token(request.app.state.uid_secret, nonce), "next": next_path,
               "error": error, "username": username, "no_admin": not has_admin(db),
               "first_admin_hint": FIRST_ADMIN_HINT}
    response = render(request, "login.html", context, status_code=status_code, headers=headers)
    settings = request.app.state.settings
    response.set_cookie(LOGIN_CSRF_COOKIE, nonce, httponly=True, samesite="strict", path="/login",
                        secure=cookie_is_secure(request, settings.cookie_secure))
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, db: DbDep,
               next: Annotated[str | None, Query(max_length=2000)] = None) -> HTMLResponse:
    """The login form."""
    return _login_page(request, db, next_path=safe_next(next))


@router.post("/login")
async def login(request: Request, db: DbDep, settings: SettingsDep,
                username: Annotated[str, Form(max_length=150)], password: Annotated[str, Form(max_length=1024)],
                csrf_token: Annotated[str, Form(max_length=100)] = "",
                next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    """Check the password and open a session; one generic message for every failure."""
    next_path = safe_next(next)
    # 1. the form must come from our login page: its field is the HMAC of the nonce in its cookie
    nonce = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not nonce or not hmac.compare_digest(login_csrf_token(request.app.state.uid_secret, nonce), csrf_token):
        return _login_page(request, db, next_path=next_path, status_code=403, username=username,
                           error="The sign-in form had expired. Please try again.")
    # 2. rate limits per client address and per username, before any password work
    limiter: LoginRateLimiter = request.app.state.login_limiter
    name = username.strip().lower()[:150]
    wait, tripped = limiter.hit([f"ip:{client_address(request)}", f"user:{name}"])
    if wait is not None:
        audited = await run_in_threadpool(audited_login_name, db, username) if tripped else ""
        for key in tripped:
            await run_in_threadpool(
                audit.append_event, db, audit.AuditAction.LOGIN_FAILED, username=audited,
                outcome=audit.Outcome.MINOR_FAILURE,
                detail={"reason": "rate_limited", "key": key.split(":", 1)[0], "limit_per_minute": limiter.limit})
        return _login_page(request, db, next_path=next_path, status_code=429, username=username,
                           error=f"Too many sign-in attempts. Please wait {wait} seconds and try again.",
                           headers={"Retry-After": str(wait)})
    # 3. the password (argon2, in a worker thread); lockout and auditing happen in audit.authenticate, which
    # records a name that is no account's as typed: hand it the marked, length-limited form instead (it cannot
    # match an account either, so the check and its cost are the same)
    login_name = await run_in_threadpool(audited_login_name, db, username)
    user = await run_in_threadpool(audit.authenticate, db, login_name, password,
                                   max_failures=settings.max_failed_logins,
                                   lockout=timedelta(minutes=settings.lockout_minutes))
    if user is None:
        return _login_page(request, db, next_path=next_path, status_code=401, username=username,
                           error=f"Wrong username or password, or the account is disabled or locked. After "
                                 f"{settings.max_failed_logins} wrong passwords in a row an account is locked for "
                                 f"{settings.lockout_minutes} minutes.")
    # 4. a fresh session (a previous one from this browser is ended first)
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:
        await run_in_threadpool(audit.revoke_session, db, previous)
    token = await run_in_threadpool(audit.create_session, db, user,
                                    idle_timeout=timedelta(minutes=settings.session_idle_minutes),
                                    lifetime=timedelta(hours=settings.session_lifetime_hours))
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", path="/",
                        secure=cookie_is_secure(request, settings.cookie_secure))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    logger.info("sign-in: user %s", user.id)
    return response


@router.post("/logout")
def logout(request: Request, db: DbDep, user: CurrentUser, settings: SettingsDep) -> Response:
    """End the session (audited ``logout``) and go to the login page."""
    if user.session_token is not None:
        audit.revoke_session(db, user.session_token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                           secure=cookie_is_secure(request, settings.cookie_secure))
    return response
