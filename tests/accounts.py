"""Accounts for tests: users (without argon2 cost unless a password is needed) and signed-in clients.

``sign_in`` gives a ``TestClient`` a real server-side session: the cookie, plus the CSRF header that HTMX would
send from ``<body hx-headers>``. ``login_through_form`` goes through the real login page instead.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app import audit
from app.web.auth import CSRF_HEADER, SESSION_COOKIE, csrf_token_for

PASSWORD = "correct horse battery staple"


def add_user(db: Engine, username: str, role: str = "clinician", *, password: str | None = None) -> audit.User:
    """A user; with ``password`` through ``audit.create_user`` (argon2, audited), else a direct insert with an
    unusable password hash (instant; for tests that do not log in through the form)."""
    if password is not None:
        return audit.create_user(db, username, password, role=role)
    with audit.write_session(db) as session:
        user = audit.User(username=username, password_hash="!unusable", role=role)
        session.add(user)
    return user


def sign_in(client: TestClient, app: FastAPI, user: audit.User) -> str:
    """Open a session for ``user`` and make ``client`` use it (cookie + CSRF header). Returns the session token."""
    token = audit.create_session(app.state.db, user)
    client.cookies.set(SESSION_COOKIE, token)
    client.headers[CSRF_HEADER] = csrf_token_for(app.state.uid_secret, token)
    return token


def sign_out(client: TestClient) -> None:
    """Forget the session cookie and CSRF header (the session itself stays open)."""
    client.cookies.clear()
    client.headers.pop(CSRF_HEADER, None)


def bearer(app: FastAPI, user: audit.User) -> dict[str, str]:
    """An ``Authorization`` header with a new API token of ``user``."""
    return {"Authorization": f"Bearer {audit.create_api_token(app.state.db, user, 'tests')}"}


def login_through_form(client: TestClient, username: str, password: str, **extra: Any):
    """GET /login (sets the login form's CSRF cookie), then POST the form as a browser would."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    data = {"username": username, "password": password, "csrf_token": token.group(1), "next": "/", **extra}
    return client.post("/login", data=data, follow_redirects=False)
