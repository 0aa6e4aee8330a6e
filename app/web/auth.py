"""Who is asking, and may they: sessions, API tokens, CSRF, cross-site refusal and login rate limiting.

:class:`AuthMiddleware` runs before every route, so a route added later is protected without doing anything
(fail closed). In order, for each HTTP request:

1. a state-changing request (POST, PUT, PATCH, DELETE) that a browser marks cross-site -- ``Sec-Fetch-Site``
   other than ``same-origin``/``none``, or (without it) an ``Origin`` whose host differs from ``Host`` -- is
   refused (403);
2. the public paths (:data:`PUBLIC_PATHS`: the login page, ``/healthz``, ``/readyz``; ``/static/``) pass;
3. the caller is resolved: ``Authorization: Bearer vmd_...`` (an API token) or else the ``vald_md_session``
   cookie (a server-side session, revocable, with an idle timeout and an absolute lifetime). Nobody: 401 JSON
   under ``/api/``, else 303 to ``/login`` (HTMX: ``HX-Redirect``);
4. a state-changing request authenticated by the cookie must carry the session's CSRF token, in the
   ``X-CSRF-Token`` header (HTMX sends it from ``hx-headers`` on ``<body>``) or the ``csrf_token`` form field
   (plain forms); else 403. Bearer-token requests are exempt: a browser never attaches that header by itself.

The CSRF token is ``HMAC-SHA256(secret, session token)``: one per session, nothing stored, and the cookie
(HttpOnly) cannot be read by scripts to forge it. The login form, which has no session yet, carries
``HMAC-SHA256(secret, nonce)`` of a random nonce kept in a ``SameSite=Strict`` cookie (:func:`login_csrf_token`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import Engine as Database
from sqlmodel import select
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import audit
from app.web.errors import NotAuthenticatedError, PermissionDeniedError, UploadTooLargeError, error_response

SESSION_COOKIE = "vald_md_session"
LOGIN_CSRF_COOKIE = "vald_md_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz"})
"""Paths served without a session or token (besides everything under ``/static/``)."""
PUBLIC_PREFIXES = ("/static/",)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class Caller:
    """The authenticated user of one request.

    Attributes:
        user: the account (``audit.User``).
        via: ``"session"`` (browser cookie) or ``"token"`` (API bearer token).
        session_token: the cookie's value (sessions only), to log out.
        api_token: the bearer token (tokens only), to re-check it during a long response.
        csrf_token: the token state-changing requests must echo (sessions only).
    """

    user: audit.User
    via: Literal["session", "token"]
    session_token: str | None = None
    csrf_token: str | None = None
    api_token: str | None = field(default=None, repr=False)

    @property
    def owner(self) -> str:
        """The job owner id of this user: ``str(user.id)``."""
        return str(self.user.id)

    @property
    def is_admin(self) -> bool:
        """The user has the admin role (sees every run and the audit trail)."""
        return self.user.role == audit.Role.ADMIN.value

    @property
    def username(self) -> str:
        """The login name."""
        return self.user.username


def csrf_token_for(secret: bytes, session_token: str) -> str:
    """The CSRF token of a session: URL-safe base64 of HMAC-SHA256(secret, label + session token), 43 characters."""
    digest = hmac.new(secret, b"vald-md csrf v1\x00" + session_token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_login_csrf() -> str:
    """A random nonce for the login form's cookie; the form's hidden field carries :func:`login_csrf_token` of it."""
    return secrets.token_urlsafe(24)


def login_csrf_token(secret: bytes, nonce: str) -> str:
    """The login form's CSRF token for the nonce in its cookie: URL-safe base64 of HMAC-SHA256(secret, label +
    nonce), 43 characters. Bound to the server's secret, so a value planted in both the cookie and the field (a
    sibling subdomain can set cookies) does not pass: only this server can make the field match the cookie."""
    digest = hmac.new(secret, b"vald-md login csrf v1\x00" + nonce.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def is_public(path: str) -> bool:
    """The path is served without authentication."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_cross_site(request: Request) -> bool:
    """The browser says the request comes from another site: ``Sec-Fetch-Site`` other than ``same-origin`` or
    ``none`` (browsers set it and pages cannot), else an ``Origin`` that names another host than the one the
    request was sent to. ``Origin: null`` alone decides nothing: with ``Referrer-Policy: no-referrer`` a browser
    sends it on same-origin form posts too (the CSRF token still has to match). Requests without either header
    (scripts, old browsers) pass."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site.lower() not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    host = request.headers.get("host", "")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return True
    return not host or netloc.lower() != host.lower()


def cookie_is_secure(request: Request, force: bool) -> bool:
    """``Secure`` cookies when configured (behind a TLS proxy) or when this request came over HTTPS."""
    return force or request.url.scheme == "https"


def resolve_caller(db: Database, secret: bytes, request: Request) -> Caller | None:
    """The caller from the bearer token or else the session cookie; ``None`` when neither is valid.

    A present but invalid ``Authorization`` header is not rescued by a cookie. Blocking (database): call it in
    a worker thread.
    """
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith("vmd_") or not _TOKEN.match(token[4:]):
            return None
        user = audit.get_token_user(db, token)
        return Caller(user, "token", api_token=token) if user is not None else None
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or not _TOKEN.match(cookie):
        return None
    user = audit.get_session_user(db, cookie)
    if user is None:
        return None
    return Caller(user, "session", session_token=cookie, csrf_token=csrf_token_for(secret, cookie))


def credential_is_valid(db: Database, caller: Caller) -> bool:
    """The caller's session or API token still works: not revoked (logout), not expired or idle, the account not
    disabled. Read-only for sessions: a progress stream must not keep its session alive. Blocking (database).

    For API tokens ``audit.get_token_user`` decides (it records the token's use).
    """
    if caller.via == "token":
        return caller.api_token is not None and audit.get_token_user(db, caller.api_token) is not None
    if caller.session_token is None:
        return False
    now = audit.utc_now()
    digest = hashlib.sha256(caller.session_token.encode()).hexdigest()
    with audit.read_session(db) as session:
        row = session.exec(select(audit.UserSession).where(audit.UserSession.token_hash == digest)).first()
        if row is None or row.revoked or now >= row.expires_at:
            return False
        if now - row.last_seen_at > timedelta(seconds=row.idle_timeout_s):
            return False
        user = session.get(audit.User, row.user_id)
        return user is not None and not user.disabled


class TrustedHostsMiddleware(TrustedHostMiddleware):
    """Starlette's ``Host`` check (400 for a name not in ``allowed_hosts``: DNS rebinding, poisoned links), except on
    ``/healthz`` and ``/readyz``, which orchestrators probe by address and which reveal nothing."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        super().__init__(app, allowed_hosts=allowed_hosts, www_redirect=False)
        self.inner = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/healthz", "/readyz"):
            await self.inner(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class LoginRateLimiter:
    """Sliding-window counter of login attempts per key (``ip:...``, ``user:...``), in memory, thread-safe.

    One process serves the app, so memory is the right place; a restart forgets the counts (the account
    lockout in the database does not).
    """

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, keys: list[str], now: float | None = None) -> tuple[int | None, list[str]]:
        """Count one attempt under every key.

        Returns:
            (seconds to wait or ``None`` when allowed, the keys that just went over the limit -- for auditing
            once per window rather than on every refused attempt).
        """
        now = time.monotonic() if now is None else now
        wait: float | None = None
        tripped: list[str] = []
        with self._lock:
            for key in keys:
                hits = self._hits.setdefault(key, deque())
                while hits and now - hits[0] >= self.window_s:
                    hits.popleft()
                hits.append(now)
                if len(hits) > self.limit:
                    wait = max(wait or 0.0, self.window_s - (now - hits[-self.limit - 1]))
                    if len(hits) == self.limit + 1:
                        tripped.append(key)
            if len(self._hits) > 10_000:  # forget idle keys so a flood of names cannot grow memory forever
                for key in [k for k, v in self._hits.items() if not v or now - v[-1] >= self.window_s]:
                    del self._hits[key]
        return (None if wait is None else max(1, int(wait + 0.999))), tripped


class AuthMiddleware:
    """See the module docstring. Reads ``app.state.db`` and ``app.state.uid_secret`` (set in the lifespan)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # none are served; a future one must bring its own authentication
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        method = scope["method"]
        # 1. cross-site state changes, signed in or not
        if method in UNSAFE_METHODS and is_cross_site(request):
            await self._refuse(request, PermissionDeniedError(
                "Cross-site request refused: use VALD-MD from its own pages."), receive, send)
            return
        # 2. public paths
        if is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        # 3. who is it
        state = scope["app"].state
        db: Database | None = getattr(state, "db", None)
        secret: bytes | None = getattr(state, "uid_secret", None)
        caller = None if db is None or secret is None else await run_in_threadpool(resolve_caller, db, secret,
                                                                                    request)
        if caller is None:
            await self._refuse(request, NotAuthenticatedError(), receive, send)
            return
        # 4. CSRF for cookie sessions
        if method in UNSAFE_METHODS and caller.via == "session":
            token = request.headers.get(CSRF_HEADER)
            if token is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
                try:
                    body = await _read_body(receive)
                except UploadTooLargeError as e:
                    await self._refuse(request, e, receive, send)
                    return
                token = await _form_field(scope, body, CSRF_FIELD)
                receive = _replay(body, receive)
            if not token or not caller.csrf_token or not hmac.compare_digest(token, caller.csrf_token):
                await self._refuse(request, PermissionDeniedError(
                    "This form has expired or did not come from VALD-MD (CSRF check). Reload the page and try "
                    "again."), receive, send)
                return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(request: Request, exc: Exception, receive: Receive, send: Send) -> None:
        response = error_response(request, exc)
        await response(request.scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            return b"".join(chunks)


async def _form_field(scope: Scope, body: bytes, name: str) -> str | None:
    """One text field of a buffered form body (``None`` if absent or the body does not parse)."""
    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form()
    except Exception:  # noqa: BLE001 - a malformed body simply has no token
        return None
    try:
        value = form.get(name)
        return value if isinstance(value, str) else None
    finally:
        await form.close()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body to the app once, then waits on the real one (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
