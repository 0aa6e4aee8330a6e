"""Security of the review server: authentication on every route, CSRF, cross-site refusal, ownership, lockout,
sessions, rate limiting, headers, PHI in logs and storage, and fuzzing of the upload route and the OpenAPI schema.

The route tables are built from ``app.routes``, so a route added later is covered without editing this file.
Counts (audit events written, fuzz cases run, 5xx responses seen) are printed at the end of the module and
written to ``test-output/security-counts.json``.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount

from app import audit, imaging
from app.config import REPO_ROOT, Settings
from app.engine import GenerationCancelled
from app.web import create_app
from app.web.auth import (
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    PUBLIC_PATHS,
    SESSION_COOKIE,
    UNSAFE_METHODS,
    csrf_token_for,
    login_csrf_token,
)
from tests.accounts import PASSWORD, add_user, bearer, login_through_form, sign_in
from tests.factories import edited_dicom, png_bytes

FAST = {"strength": "0.5", "steps": "4", "guidance_scale": "5", "seed": "11"}
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUTPUT = REPO_ROOT / "test-output"
COUNTS: dict[str, int] = {"audit_events_written": 0, "upload_fuzz_cases": 0, "schemathesis_cases": 0,
                          "admin_fuzz_cases": 0, "responses_5xx": 0}
FUZZ_EXAMPLES = 200
ADMIN_FUZZ_EXAMPLES = 150
SCHEMA_EXAMPLES_PER_OPERATION = 25


# ----------------------------------------------------------------------------------------------------------------
# the route table, from the app itself
# ----------------------------------------------------------------------------------------------------------------
def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route except the static mount, HEAD folded into GET."""
    rows = set()
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        contexts = getattr(route, "effective_route_contexts", None)  # an included router (recent FastAPI)
        entries = [(c.path, c.methods) for c in contexts()] if contexts else [(route.path, route.methods)]
        for path, methods in entries:
            for method in (methods or {"GET"}) - {"HEAD"}:
                rows.add((method, path))
    return sorted(rows, key=lambda r: (r[1], r[0]))


_FILL = {"{name}": "input.png"}


def fill(path: str) -> str:
    """A concrete URL for a route path: ids become 32 hex digits (no such job or run), names an artifact."""
    return re.sub(r"\{[^}]+\}", lambda m: _FILL.get(m.group(0), "0" * 32), path)


ROUTES = route_table(create_app(Settings(data_dir=Path(tempfile.gettempdir()) / "vald-md-route-table")))
PROTECTED = [r for r in ROUTES if r[1] not in PUBLIC_PATHS]
UNSAFE = [r for r in PROTECTED if r[0] in UNSAFE_METHODS]
ADMIN = [r for r in PROTECTED if r[1].startswith("/admin")]


def _id(row: tuple[str, str]) -> str:
    return f"{row[0]} {row[1]}"


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
def _close(app: FastAPI) -> None:
    """Every app a test used leaves a verifiable audit chain; count its events."""
    result = audit.verify_chain(app.state.db)
    assert result.ok, result.reason
    COUNTS["audit_events_written"] += result.events_checked


@pytest.fixture(scope="module", autouse=True)
def report_counts(security_counts: dict[str, int]) -> Iterator[None]:
    """Hand the counts to the terminal summary (conftest) and to test-output/security-counts.json."""
    yield
    security_counts.update(COUNTS)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "security-counts.json").write_text(json.dumps(COUNTS, indent=2) + "\n")


@pytest.fixture(scope="module")
def secure(tiny_engine, tmp_path_factory) -> Iterator[FastAPI]:
    """The app with the tiny model; 3 wrong passwords lock an account; login rate limit out of the way."""
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("security-data"), max_failed_logins=3,
                         login_attempts_per_minute=1000, queue_size=8)
    app = create_app(settings_, engine=tiny_engine)
    with TestClient(app):
        yield app
        _close(app)


@pytest.fixture(scope="module")
def people(secure) -> dict[str, audit.User]:
    db = secure.state.db
    return {"a": add_user(db, "clin-a"), "b": add_user(db, "clin-b"), "admin": add_user(db, "boss", role="admin")}


def client_for(app: FastAPI, user: audit.User | None = None, **kw: Any) -> TestClient:
    """A client on the running app (not entered: the lifespan already runs), signed in as ``user``."""
    c = TestClient(app, **kw)
    if user is not None:
        sign_in(c, app, user)
    return c


@pytest.fixture(scope="module")
def anon(secure) -> TestClient:
    return client_for(secure)


@pytest.fixture(scope="module")
def job_of_a(secure, people) -> str:
    c = client_for(secure, people["a"])
    r = c.post("/api/v1/counterfactuals", data=FAST, files={"file": ("scan.png", png_bytes())})
    assert r.status_code == 202, r.text
    return _wait(c, r.json()["job_id"])["job_id"]


def _wait(c: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        st_ = c.get(f"/api/v1/jobs/{job_id}").json()
        if st_["state"] in ("done", "failed", "cancelled"):
            return st_
        assert time.monotonic() < end, f"job stuck in {st_['state']}"
        time.sleep(0.05)


@pytest.fixture
def fresh(tiny_engine, tmp_path) -> Iterator[FastAPI]:
    """A new app per test (first-admin hint, rate limits), 3 login attempts a minute."""
    app = create_app(Settings(data_dir=tmp_path / "data", login_attempts_per_minute=3), engine=tiny_engine)
    with TestClient(app):
        yield app
        _close(app)


# ----------------------------------------------------------------------------------------------------------------
# 1. authentication on every route
# ----------------------------------------------------------------------------------------------------------------
def test_the_public_allow_list_is_exactly_login_health_and_static():
    assert {"/login", "/healthz", "/readyz"} == PUBLIC_PATHS
    paths = {p for _, p in ROUTES}
    assert {"/", "/runs", "/runs/{job_id}", "/api/v1/counterfactuals", "/api/v1/jobs/{job_id}/artifacts/{name}",
            "/admin", "/admin/runs/{run_id}/rerun", "/logout", "/api/openapi.json", "/api/docs"} <= paths
    assert len(PROTECTED) >= 25


def test_websockets_are_refused(anon):
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect), anon.websocket_connect("/api/v1/jobs"):
        pass


@pytest.mark.parametrize("row", PROTECTED, ids=_id)
def test_anonymous_requests_are_refused(anon, row):
    method, path = row
    r = anon.request(method, fill(path), follow_redirects=False)
    if path.startswith("/api/"):
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "Sign-in required" and r.headers["www-authenticate"].startswith("Bearer")
    else:
        assert r.status_code == 303, r.text
        assert r.headers["location"].startswith("/login")
    htmx = anon.request(method, fill(path), headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.status_code == 401 and (path.startswith("/api/") or htmx.headers["hx-redirect"].startswith("/login"))


@pytest.mark.parametrize("row", [r for r in ROUTES if r[1] in PUBLIC_PATHS], ids=_id)
def test_public_routes_answer_anonymously(anon, row):
    method, path = row
    r = anon.request(method, path, follow_redirects=False)
    assert r.status_code not in (401, 303), r.text  # POST /login without a form: 422, not a redirect


@pytest.mark.parametrize("credential", ["cookie", "bearer", "not-bearer", "garbage-cookie"])
def test_invalid_credentials_are_anonymous(secure, people, credential):
    c = client_for(secure)
    if credential == "cookie":
        token = audit.create_session(secure.state.db, people["a"])
        audit.revoke_session(secure.state.db, token)
        c.cookies.set(SESSION_COOKIE, token)
    elif credential == "garbage-cookie":
        c.cookies.set(SESSION_COOKIE, "x" * 43)
    headers = {"bearer": {"Authorization": "Bearer vmd_" + "A" * 43},
               "not-bearer": {"Authorization": "Basic Ym9zczpwYXNzd29yZA=="}}.get(credential, {})
    assert c.get("/api/v1/jobs", headers=headers).status_code == 401
    assert c.get("/", headers=headers, follow_redirects=False).status_code == 303


def test_api_tokens_work_for_the_api_and_stop_with_the_account(secure, people):
    db = secure.state.db
    user = add_user(db, "script-user")
    auth = bearer(secure, user)
    c = client_for(secure)
    assert c.get("/api/v1/jobs", headers=auth).status_code == 200
    r = c.post("/api/v1/jobs/" + "0" * 32 + "/cancel", headers=auth)  # bearer: no CSRF token needed
    assert r.status_code == 404
    audit.disable_user(db, user.id)
    assert c.get("/api/v1/jobs", headers=auth).status_code == 401


@pytest.mark.parametrize("row", ADMIN, ids=_id)
def test_admin_pages_are_for_admins_only(secure, people, row):
    method, path = row
    r = client_for(secure, people["a"]).request(method, fill(path), follow_redirects=False)
    assert r.status_code == 403, r.text


# ----------------------------------------------------------------------------------------------------------------
# 2. CSRF and cross-site requests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["missing", "wrong", "empty"])
@pytest.mark.parametrize("row", UNSAFE, ids=_id)
def test_state_changes_need_the_sessions_csrf_token(secure, people, row, token):
    method, path = row
    c = client_for(secure)
    c.cookies.set(SESSION_COOKIE, audit.create_session(secure.state.db, people["admin"]))
    headers = {} if token is None else {CSRF_HEADER: token}
    r = c.request(method, fill(path), headers=headers, follow_redirects=False)
    assert r.status_code == 403, r.text
    assert "CSRF" in r.text
    form = c.request(method, fill(path), data={"csrf_token": token or ""}, follow_redirects=False)
    assert form.status_code == 403


def test_csrf_token_in_a_plain_form_field_is_accepted(secure, people):
    c = client_for(secure)
    session = audit.create_session(secure.state.db, people["b"])
    c.cookies.set(SESSION_COOKIE, session)
    good = csrf_token_for(secure.state.uid_secret, session)
    # multipart, as the review form posts without JavaScript: the token passes, then the form is checked
    r = c.post("/runs", data={**FAST, "csrf_token": good}, files={"file": ("x.png", b"not an image")},
               follow_redirects=False)
    assert r.status_code == 415, r.text
    r = c.post("/logout", data={"csrf_token": good}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"},
                                     {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "http://testserver.evil.example"},
                                     {"Origin": "http://testserver", "Sec-Fetch-Site": "cross-site"}],
                         ids=["foreign-origin", "sandboxed", "fetch-cross-site", "fetch-same-site", "lookalike",
                              "fetch-metadata-wins"])
@pytest.mark.parametrize("row", [*UNSAFE, ("POST", "/login")], ids=_id)
def test_cross_site_state_changes_are_refused(secure, people, row, headers):
    method, path = row
    c = client_for(secure, people["admin"])  # valid session and CSRF token: only the origin is wrong
    r = c.request(method, fill(path), headers=headers, follow_redirects=False)
    assert r.status_code == 403, r.text
    assert "Cross-site" in r.text


def test_same_origin_requests_pass(secure, people):
    c = client_for(secure, people["a"])
    # Origin: null + same-origin is Chromium's form post under Referrer-Policy: no-referrer
    for headers in ({"Origin": "http://testserver"}, {"Sec-Fetch-Site": "same-origin"}, {},
                    {"Origin": "null", "Sec-Fetch-Site": "same-origin"}):
        assert c.post("/api/v1/jobs/" + "0" * 32 + "/cancel", headers=headers).status_code == 404


# ----------------------------------------------------------------------------------------------------------------
# 3. who sees what
# ----------------------------------------------------------------------------------------------------------------
def test_user_b_cannot_see_user_as_job_but_an_admin_can(secure, people, job_of_a):
    b = client_for(secure, people["b"])
    base = f"/api/v1/jobs/{job_of_a}"
    for url in (base, f"{base}/artifacts/input.png", f"{base}/artifacts/bundle.zip", f"{base}/overlay.png",
                f"{base}/thumbnail.png", f"/runs/{job_of_a}", f"/runs/{job_of_a}/form"):
        assert b.get(url).status_code == 404, url
    assert b.post(f"{base}/cancel").status_code == 404
    assert job_of_a not in [j["job_id"] for j in b.get("/api/v1/jobs").json()["jobs"]]
    a = client_for(secure, people["a"])
    assert job_of_a in [j["job_id"] for j in a.get("/api/v1/jobs").json()["jobs"]]
    boss = client_for(secure, people["admin"])
    assert boss.get(base).status_code == 200 and boss.get(f"/runs/{job_of_a}").status_code == 200
    assert boss.get(f"{base}/artifacts/input.png").status_code == 200
    page = boss.get(f"/admin/runs/{job_of_a}")
    assert page.status_code == 200 and "counterfactual.png" in page.text


# ----------------------------------------------------------------------------------------------------------------
# 4. passwords, lockout, sessions
# ----------------------------------------------------------------------------------------------------------------
def test_lockout_after_repeated_failures(secure):
    db = secure.state.db
    user = add_user(db, "lock-me", password=PASSWORD)
    c = client_for(secure)
    for _ in range(3):  # max_failed_logins=3
        r = login_through_form(c, "lock-me", "wrong password, clearly")
        assert r.status_code == 401 and "Wrong username or password" in r.text
    r = login_through_form(c, "lock-me", PASSWORD)  # the right password, but locked now
    assert r.status_code == 401 and SESSION_COOKIE not in r.headers.get("set-cookie", "")
    assert audit.get_user(db, user_id=user.id).locked_until is not None
    events = audit.query_events(db, user="lock-me", limit=20)
    assert [e.action for e in events].count("lockout") == 1
    assert events[0].action == "login_failed" and events[0].detail["reason"] == "locked"
    audit.enable_user(db, user.id)  # an admin unlocks it
    r = login_through_form(c, "lock-me", PASSWORD)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_login_sets_a_strict_session_cookie_with_the_configured_timeouts(secure):
    db = secure.state.db
    add_user(db, "cookie-user", password=PASSWORD)
    r = login_through_form(client_for(secure), "cookie-user", PASSWORD)
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "samesite", "path"} <= attrs and "secure" not in attrs and "max-age" not in attrs
    assert "samesite=lax" in cookie.lower()
    token = cookie.split(";")[0].split("=", 1)[1]
    row = _session_row(db, token)
    settings_ = secure.state.settings
    assert row.idle_timeout_s == settings_.session_idle_minutes * 60
    assert row.expires_at - row.created_at == timedelta(hours=settings_.session_lifetime_hours)
    https = login_through_form(client_for(secure, base_url="https://testserver"), "cookie-user", PASSWORD)
    assert "secure" in https.headers["set-cookie"].lower()
    assert https.headers["strict-transport-security"].startswith("max-age=")


def _session_row(db, token: str) -> audit.UserSession:
    import hashlib

    from sqlmodel import select

    with audit.read_session(db) as session:
        return session.exec(select(audit.UserSession).where(
            audit.UserSession.token_hash == hashlib.sha256(token.encode()).hexdigest())).one()


@pytest.mark.parametrize("kind", ["idle", "lifetime"])
def test_sessions_end_after_the_idle_timeout_and_the_lifetime(secure, people, kind):
    db = secure.state.db
    now = audit.utc_now()
    if kind == "idle":
        token = audit.create_session(db, people["a"], idle_timeout=timedelta(minutes=30),
                                     now=now - timedelta(minutes=31))
    else:
        token = audit.create_session(db, people["a"], idle_timeout=timedelta(hours=5), lifetime=timedelta(hours=1),
                                     now=now - timedelta(hours=1, minutes=1))
    c = client_for(secure)
    c.cookies.set(SESSION_COOKIE, token)
    assert c.get("/", follow_redirects=False).headers["location"].startswith("/login")
    assert c.get("/api/v1/jobs").status_code == 401
    assert _session_row(db, token).revoked


def test_a_live_session_is_kept_alive_by_requests(secure, people):
    db = secure.state.db
    token = audit.create_session(db, people["a"], idle_timeout=timedelta(minutes=30),
                                 now=audit.utc_now() - timedelta(minutes=29))
    c = client_for(secure)
    c.cookies.set(SESSION_COOKIE, token)
    assert c.get("/api/v1/jobs").status_code == 200
    assert audit.utc_now() - _session_row(db, token).last_seen_at < timedelta(minutes=1)


def test_logout_revokes_the_session(secure):
    db = secure.state.db
    add_user(db, "leaver", password=PASSWORD)
    c = client_for(secure)
    r = login_through_form(c, "leaver", PASSWORD)
    token = c.cookies.get(SESSION_COOKIE)
    assert r.status_code == 303 and token
    page = c.get("/")
    assert page.status_code == 200 and 'id="logout"' in page.text and "leaver" in page.text
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)
    assert csrf == csrf_token_for(secure.state.uid_secret, token)
    r = c.post("/logout", headers={CSRF_HEADER: csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert _session_row(db, token).revoked
    assert audit.query_events(db, user="leaver", limit=1)[0].action == "logout"
    replay = client_for(secure)
    replay.cookies.set(SESSION_COOKIE, token)  # the old cookie, kept by an attacker
    assert replay.get("/", follow_redirects=False).status_code == 303


def test_login_form_needs_its_own_csrf_cookie_and_redirects_only_locally(secure):
    db = secure.state.db
    add_user(db, "next-user", password=PASSWORD)
    c = client_for(secure)
    r = c.post("/login", data={"username": "next-user", "password": PASSWORD, "csrf_token": "forged"})
    assert r.status_code == 403 and "expired" in r.text
    # a value planted in both the cookie (a sibling subdomain can set one) and the field: not ours, refused
    planted = client_for(secure)
    planted.cookies.set(LOGIN_CSRF_COOKIE, "planted-by-attacker-0123456789", path="/login")
    r = planted.post("/login", data={"username": "next-user", "password": PASSWORD,
                                     "csrf_token": "planted-by-attacker-0123456789"}, follow_redirects=False)
    assert r.status_code == 403 and SESSION_COOKIE not in r.headers.get("set-cookie", "")
    # the field is bound to the cookie's nonce by the server's secret: the token of another nonce fails too
    other = client_for(secure)
    other.get("/login")
    other.cookies.set(LOGIN_CSRF_COOKIE, "another-nonce-0123456789", path="/login")
    r = other.post("/login", data={"username": "next-user", "password": PASSWORD,
                                   "csrf_token": login_csrf_token(b"not the secret", "another-nonce-0123456789")})
    assert r.status_code == 403
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"), ("/runs?x=1", "/runs?x=1"),
                             ("/\\evil.example", "/")):
        r = login_through_form(client_for(secure), "next-user", PASSWORD, next=target)
        assert r.status_code == 303 and r.headers["location"] == expected


def test_login_rate_limit_per_address_and_username(fresh):
    db = fresh.state.db
    c = client_for(fresh)
    statuses = [login_through_form(c, "nobody-here", "wrong password!!").status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    r = login_through_form(c, "nobody-here", "wrong password!!")
    assert int(r.headers["retry-after"]) >= 1 and "Too many sign-in attempts" in r.text
    limited = [e for e in audit.query_events(db, action="login_failed") if e.detail.get("reason") == "rate_limited"]
    assert sorted(e.detail["key"] for e in limited) == ["ip", "user"]  # audited once per key, not per attempt


def test_failed_login_names_are_stored_length_limited_and_marked_untrusted(fresh):
    db = fresh.state.db
    add_user(db, "real-user", password=PASSWORD)
    c = client_for(fresh)
    typed = "=cmd|' /C calc'!A0\x1b[31m\u202e" + "\u00e9" * 40 + "x" * 150
    assert login_through_form(c, typed[:150], "wrong password!!").status_code == 401
    assert login_through_form(c, "Real-User", "wrong password!!").status_code == 401
    assert login_through_form(c, "ghost-user", "wrong password!!").status_code == 401
    names = [e.username for e in audit.query_events(db, action="login_failed")][::-1]
    assert names[1] == "real-user"  # an account's own name, as before
    assert names[2] == "untrusted:ghost-user"  # a well-formed name that is no account's is still the client's
    stored = names[0]
    assert stored.startswith("untrusted:=cmd|' /C calc'!A0\\x1b[31m\\u202e\\xe9") and stored.endswith("...")
    assert len(stored) <= len("untrusted:") + 64 + 3 and stored.isascii() and stored.isprintable()
    # the rate-limited attempts (audited once per key) keep the same form
    for _ in range(12):
        r = login_through_form(c, typed[:150], "wrong password!!")
    assert r.status_code == 429
    limited = [e.username for e in audit.query_events(db, action="login_failed")
               if e.detail.get("reason") == "rate_limited"]
    assert limited and all(n == stored or n.startswith("untrusted:") for n in limited)


def _failed_logins(c: TestClient, n: int, forwarded: list[str] | None = None) -> list[int]:
    statuses = []
    for i in range(n):
        headers = {"X-Forwarded-For": forwarded[i % len(forwarded)]} if forwarded else {}
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        statuses.append(c.post("/login", headers=headers, follow_redirects=False, data={
            "username": f"nobody-{i}", "password": "wrong password!!", "csrf_token": token}).status_code)
    return statuses


@pytest.mark.parametrize("proxies", ["", "10.0.0.0/8"])
def test_forged_forwarded_for_does_not_escape_the_address_limit(tiny_engine, tmp_path, proxies):
    # 14 failed logins from one address, each naming another in X-Forwarded-For and another username
    app = create_app(Settings(data_dir=tmp_path / "d", trusted_proxies=proxies), engine=tiny_engine)
    forged = [f"203.0.113.{i}" for i in range(14)]
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        statuses = _failed_logins(c, 14, forged)
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429] * 4
    _close(app)


def test_forwarded_for_from_a_trusted_proxy_names_the_client(tiny_engine, tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "d", trusted_proxies="127.0.0.1, 10.0.0.0/8"),
                     engine=tiny_engine)
    with TestClient(app, client=("10.1.2.3", 50000)) as proxy:
        # each client behind the proxy has its own count; a client's own (spoofed) entries are left of the proxy's
        assert 429 not in _failed_logins(proxy, 14, [f"spoof, 198.51.100.{i}" for i in range(14)])
        assert _failed_logins(proxy, 11, ["192.0.2.7"])[-1] == 429
    _close(app)


def test_serve_leaves_forwarded_headers_to_the_app_and_keeps_files_private(tmp_path, monkeypatch):
    import os

    import uvicorn

    from app import cli

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs, umask=os.umask(0o022))

    previous = os.umask(0o022)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    try:
        assert cli.main(["serve", "--data-dir", str(tmp_path / "d")]) == 0
    finally:
        os.umask(previous)
    # uvicorn's own proxy-headers support trusts 127.0.0.1 (and FORWARDED_ALLOW_IPS) by default
    assert seen["proxy_headers"] is False and seen["workers"] == 1
    assert seen["umask"] == 0o077


@pytest.mark.parametrize(("host", "trusted", "status"), [
    ("evil.example", "", 400), ("localhost:8000", "", 303), ("127.0.0.1", "", 303), ("[::1]:8000", "", 303),
    ("vald.example.org", "vald.example.org", 303), ("x.example.org", "*.example.org", 303),
    ("vald.example.org.evil.example", "vald.example.org", 400)])
def test_only_trusted_host_names_are_served(tiny_engine, tmp_path, host, trusted, status):
    app = create_app(Settings(data_dir=tmp_path / "d", trusted_hosts=trusted), engine=tiny_engine)
    with TestClient(app) as c:
        r = c.get("/", headers={"Host": host}, follow_redirects=False)
        assert r.status_code == status, r.text
        assert c.get("/healthz", headers={"Host": "10.9.8.7:8000"}).status_code == 200  # probes by address
    _close(app)


def test_data_folder_database_and_runs_are_owner_only(secure, job_of_a):
    import os
    import stat

    settings_ = secure.state.settings

    def mode(path: Path) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(settings_.data_dir) == 0o700 and mode(settings_.runs_dir) == 0o700
    assert mode(settings_.data_dir / "vald-md.db") == 0o600
    run = settings_.runs_dir / job_of_a
    assert mode(run) == 0o700
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 5 and {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert all(mode(p) == 0o700 for p in run.rglob("*") if p.is_dir())


def test_first_start_explains_how_to_create_the_first_admin(fresh, caplog):
    page = client_for(fresh).get("/login")
    assert "vald-md users add NAME --role admin" in page.text and 'id="first-admin"' in page.text
    assert ".venv/bin/vald-md users add NAME --role admin" in page.text  # a new shell has no vald-md on its PATH
    add_user(fresh.state.db, "first-admin", role="admin")
    assert "vald-md users add NAME --role admin" not in client_for(fresh).get("/login").text


def test_serve_logs_the_first_admin_command(tiny_engine, tmp_path, caplog):
    caplog.set_level("WARNING", logger="vald_md.web")
    app = create_app(Settings(data_dir=tmp_path / "d"), engine=tiny_engine)
    with TestClient(app):
        pass
    assert "vald-md users add NAME --role admin" in caplog.text
    assert "second terminal: `.venv/bin/vald-md users add" in caplog.text
    _close(app)


# ----------------------------------------------------------------------------------------------------------------
# 5. the admin pages: the trail, run records, re-runs
# ----------------------------------------------------------------------------------------------------------------
def test_admin_page_filters_pages_and_exports_the_trail(secure, people):
    db = secure.state.db
    for i in range(60):
        audit.append_event(db, audit.AuditAction.VIEW, username="pager", object_type="run", detail={"i": i})
    boss = client_for(secure, people["admin"])
    page = boss.get("/admin")
    assert page.status_code == 200 and 'id="audit-events"' in page.text and 'id="recent-runs"' in page.text
    hx = {"HX-Request": "true"}
    first = boss.get("/admin/events?user=pager&action=view", headers=hx)
    assert first.status_code == 200 and "<html" not in first.text
    assert "60 matching · page 1 of 2" in first.text and first.text.count('data-action="view"') == 50
    assert 'rel="next"' in first.text and first.headers["hx-push-url"].startswith("/admin?")
    second = boss.get("/admin/events?user=pager&action=view&page=2", headers=hx)
    assert second.text.count('data-action="view"') == 10 and 'rel="prev"' in second.text
    today = audit.utc_now().date()
    assert "60 matching" in boss.get(f"/admin/events?user=pager&since={today}&until={today}", headers=hx).text
    tomorrow = today + timedelta(days=1)
    assert "0 matching" in boss.get(f"/admin/events?user=pager&since={tomorrow}", headers=hx).text
    assert boss.get("/admin/events?since=someday", headers=hx).status_code == 422
    assert boss.get("/admin/events?action=hack", headers=hx).status_code == 422
    export = boss.get("/admin/events/export?format=csv&user=pager")
    assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
    assert len(export.text.strip().splitlines()) == 61
    as_json = boss.get("/admin/events/export?format=json&user=pager").json()
    assert [e["detail"]["i"] for e in as_json] == list(range(60))
    mine = [e.action for e in audit.query_events(db, user="boss", limit=20)]
    assert "audit_export" in mine and "audit_view" in mine


@pytest.mark.parametrize("path", ["/admin", "/admin/events", "/admin/events/export?format=csv",
                                  "/admin/events/export?format=json"])
@pytest.mark.parametrize(("query", "message"), [
    ("until=9999-12-31", "is out of range: use a date from 1970-01-01 to 9998-12-31"),
    ("since=0001-01-01", "is out of range"),
    ("since=2025-02-30", "is not a date: use YYYY-MM-DD"),
    ("since=2025-03-02&until=2025-03-01", "since=2025-03-02 is after until=2025-03-01"),
])
def test_admin_date_filters_are_validated_with_a_message(secure, people, path, query, message):
    boss = client_for(secure, people["admin"], raise_server_exceptions=False)
    r = boss.get(f"{path}{'&' if '?' in path else '?'}{query}")
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert html.escape(message, quote=True) in r.text and "Traceback" not in r.text


def test_admin_rerun_shows_whether_the_output_reproduces(secure, people, job_of_a):
    boss = client_for(secure, people["admin"])
    record = boss.get(f"/admin/runs/{job_of_a}")
    assert record.status_code == 200 and 'id="rerun"' in record.text and '"seed": 11' in record.text
    r = boss.post(f"/admin/runs/{job_of_a}/rerun", headers={"HX-Request": "true"})
    assert r.status_code == 200, r.text
    new_id = re.search(r'id="rerun-([0-9a-f]{32})"', r.text).group(1)
    end = time.monotonic() + 120
    while 'data-rerun-state="pending"' in r.text:
        assert 'hx-trigger="every 1s"' in r.text and time.monotonic() < end
        time.sleep(0.2)
        r = boss.get(f"/admin/reruns/{new_id}", headers={"HX-Request": "true"})
    assert 'data-rerun-state="reproduced"' in r.text and "✓ reproduced" in r.text
    again = audit.get_run(secure.state.db, uuid.UUID(new_id))
    assert again.params["rerun_of"] == job_of_a and again.seeds == [11] and again.user_id == people["admin"].id
    assert "✓ reproduced" in boss.get(f"/admin/runs/{job_of_a}").text
    assert client_for(secure, people["b"]).get(f"/api/v1/jobs/{new_id}").status_code == 404


# ----------------------------------------------------------------------------------------------------------------
# 6. headers
# ----------------------------------------------------------------------------------------------------------------
def test_security_headers_and_no_store(secure, people, job_of_a):
    c = client_for(secure, people["a"])
    for url in ("/", f"/runs/{job_of_a}", f"/api/v1/jobs/{job_of_a}/artifacts/counterfactual.png",
                f"/api/v1/jobs/{job_of_a}/overlay.png", f"/api/v1/jobs/{job_of_a}", "/login"):
        r = c.get(url)
        assert r.status_code == 200, url
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        assert "camera=()" in r.headers["permissions-policy"]
        assert r.headers["cache-control"] == "no-store", url
    static = c.get("/static/css/app.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("cache-control", "")


# ----------------------------------------------------------------------------------------------------------------
# 7. PHI: logs, stored files, names
# ----------------------------------------------------------------------------------------------------------------
PATIENT = "Zyxwvut^Quorra"
FILENAME = "Zyxwvut_Quorra_MRN4711.dcm"
# the tiny model's tokenizer keeps 16 tokens: diffusers would log the cut-off tail of this prompt
PROMPT = ("large lung opacity on the left with cardiomegaly heart lungs right scan normal chest x ray "
          "viral pneumonia covid 19 healthy no findings")


@pytest.mark.shared_data
def test_logs_never_contain_patient_data_file_names_or_prompts(secure, people, shared_data, caplog, capfd):
    upload = edited_dicom(shared_data / "dicom" / "siim_cr_chest.dcm", PatientName=PATIENT, PatientID="MRN4711")
    caplog.set_level("DEBUG")
    c = client_for(secure, people["a"])
    r = c.post("/api/v1/counterfactuals", data={**FAST, "prompt": PROMPT}, files={"file": (FILENAME, upload)})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert _wait(c, job_id)["state"] == "done"
    for url in (f"/runs/{job_id}", f"/api/v1/jobs/{job_id}/artifacts/secondary-capture.dcm",
                f"/api/v1/jobs/{job_id}/artifacts/record.json"):
        assert c.get(url).status_code == 200
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert caplog.records, "nothing was logged at all: the capture is broken"
    for secret in (PATIENT, "Zyxwvut", "Quorra", "MRN4711", FILENAME, PROMPT, "viral pneumonia covid 19 healthy"):
        assert secret not in logged, secret
    # nor in the stored upload, the audit trail, or any file name under the data folder
    data_dir = secure.state.settings.data_dir
    stored = (data_dir / "runs" / job_id / "upload.dcm").read_bytes()
    assert b"Zyxwvut" not in stored and b"MRN4711" not in stored
    trail = "".join(audit.export_events(secure.state.db, "json"))
    assert "Zyxwvut" not in trail and "MRN4711" not in trail and "Quorra" not in trail
    names = [p.name for p in data_dir.rglob("*")]
    assert not [n for n in names if "Zyxwvut" in n or "MRN" in n]
    assert set(names) & {"upload.dcm", "job.json", "record.json"}


# ----------------------------------------------------------------------------------------------------------------
# 8. fuzzing: the upload route, the broken files, the OpenAPI schema
# ----------------------------------------------------------------------------------------------------------------
class InstantEngine:
    """The tiny engine for decoding and checks, but every generation stops at once (fuzzing is about input)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate_request(self, *args: Any, **kwargs: Any) -> Any:
        raise GenerationCancelled("fuzzing: no generation")


@pytest.fixture(scope="module")
def fuzz(tiny_engine, tmp_path_factory) -> Iterator[tuple[FastAPI, TestClient, dict[str, str]]]:
    # fuzzing is about input: one user submits everything, so the per-user and cost limits are out of the way
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("fuzz-data"), queue_size=64, max_upload_mb=8,
                              max_jobs_per_user=64, queue_cost_budget=10_000_000),
                     engine=InstantEngine(tiny_engine))  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        user = add_user(app.state.db, "fuzzer")
        yield app, c, bearer(app, user)
        _close(app)


def _seeds() -> list[bytes]:
    files = [SHARED / "dicom" / n for n in ("siim_cr_chest.dcm", "SC_rgb_rle_2frame.dcm", "RG3_JPLY.dcm",
                                            "vlut_04.dcm")]
    files += sorted((SHARED / "cxr256" / "test" / "normal").glob("*.png"))[:1]
    seeds = [p.read_bytes() for p in files if p.is_file()]
    return seeds or [png_bytes()]


SEEDS = _seeds()


@st.composite
def hostile_uploads(draw: st.DrawFn) -> bytes:
    """Random bytes, real files cut short, real headers with bytes changed, a DICOM prefix on noise."""
    mode = draw(st.sampled_from(["random", "truncated", "mutated", "dicm-prefix", "png-prefix"]))
    if mode == "random":
        return draw(st.binary(max_size=4096))
    if mode == "dicm-prefix":
        return b"\0" * 128 + b"DICM" + draw(st.binary(max_size=2048))
    if mode == "png-prefix":
        return b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=2048))
    base = draw(st.sampled_from(SEEDS))
    if mode == "truncated":
        return base[:draw(st.integers(0, len(base) - 1))]
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 12))):
        pos = draw(st.integers(0, min(len(data), 4096) - 1))  # the header: where parsers decide things
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (SIGALRM; the main thread blocks on the test client's portal)."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a request took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=FUZZ_EXAMPLES, deadline=timedelta(seconds=30), database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=hostile_uploads(), name=st.sampled_from(["x.dcm", "../../etc/passwd", "a" * 300 + ".png", "\u00e9.png"]))
def test_fuzzed_uploads_never_cause_a_server_error(fuzz, data, name):
    _, c, auth = fuzz
    with time_limit(60):
        r = c.post("/api/v1/counterfactuals", data=FAST, files={"file": (name, data)}, headers=auth)
    COUNTS["upload_fuzz_cases"] += 1
    if r.status_code >= 500:
        COUNTS["responses_5xx"] += 1
    assert r.status_code in (202, 413, 415, 422), (r.status_code, r.text[:300])
    assert "Traceback" not in r.text


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(p.name for p in (SHARED / "dicom").glob("*")) or ["none"])
def test_every_shared_dicom_file_is_accepted_or_refused_with_a_4xx(fuzz, shared_data, name):
    _, c, auth = fuzz
    data = (shared_data / "dicom" / name).read_bytes()
    try:
        imaging.decode_image(data)
        readable = True
    except imaging.ImagingError:
        readable = False
    r = c.post("/api/v1/counterfactuals", data=FAST, files={"file": ("scan", data)}, headers=auth)
    COUNTS["upload_fuzz_cases"] += 1
    if r.status_code >= 500:
        COUNTS["responses_5xx"] += 1
    if readable:
        assert r.status_code == 202, r.text
    else:
        assert 400 <= r.status_code < 500 and r.json()["message"] and "Traceback" not in r.text


@pytest.fixture(scope="module")
def fuzz_admin(fuzz) -> TestClient:
    """An administrator's client on the fuzzing app (server errors come back as responses)."""
    app = fuzz[0]
    return client_for(app, add_user(app.state.db, "fuzz-boss", role="admin"), raise_server_exceptions=False)


_DAYS = st.one_of(st.dates().map(date.isoformat), st.text(max_size=12),
                  st.sampled_from(["9999-12-31", "0001-01-01", "2025-02-30", "20250101", "2025-W01-1", "\u0661"]))


@settings(max_examples=ADMIN_FUZZ_EXAMPLES, deadline=timedelta(seconds=30), database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/admin", "/admin/events", "/admin/events/export"]), htmx=st.booleans(),
       query=st.fixed_dictionaries({}, optional={
           "since": _DAYS, "until": _DAYS, "user": st.text(max_size=160),
           "action": st.one_of(st.sampled_from([a.value for a in audit.AuditAction]), st.text(max_size=20)),
           "page": st.one_of(st.integers(-5, 2_000_000).map(str), st.text(max_size=8)),
           "format": st.sampled_from(["csv", "json", "xml", ""])}))
def test_admin_filters_fuzzing_finds_no_server_errors(fuzz_admin, path, htmx, query):
    with time_limit(60):
        r = fuzz_admin.get(path, params=query, headers={"HX-Request": "true"} if htmx else {})
    COUNTS["admin_fuzz_cases"] += 1
    if r.status_code >= 500:
        COUNTS["responses_5xx"] += 1
    assert r.status_code in (200, 422), (r.status_code, query, r.text[:300])
    assert "Traceback" not in r.text


def test_openapi_schema_fuzzing_finds_no_server_errors(fuzz):
    schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (in the test extras)")
    app, c, auth = fuzz
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[str] = []
    for operation in operations:

        @settings(max_examples=SCHEMA_EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=auth)
            kwargs.pop("timeout", None)
            with time_limit(60):
                response = c.request(**{k: v for k, v in kwargs.items() if k in _HTTPX_KWARGS})
            COUNTS["schemathesis_cases"] += 1
            if response.status_code >= 500:
                COUNTS["responses_5xx"] += 1
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code}")

        call()
    assert failures == []


_HTTPX_KWARGS = {"method", "url", "params", "headers", "cookies", "content", "data", "files", "json"}
