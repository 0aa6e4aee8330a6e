"""The admin API token page (app/web/tokens.py) and the server's own audit checkpoints (app/web/app.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import audit
from app.config import Settings
from app.web.app import create_app
from app.web.auth import CSRF_HEADER
from tests.accounts import add_user, sign_in


@pytest.fixture
def served(tiny_engine, tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(Settings(data_dir=tmp_path / "data"), engine=tiny_engine)
    with TestClient(app):
        yield app


def test_admin_lists_and_revokes_api_tokens_with_csrf(served: FastAPI) -> None:
    db = served.state.db
    boss, nina = add_user(db, "boss", role="admin"), add_user(db, "nina")
    token = audit.create_api_token(db, nina, "batch")
    other = audit.create_api_token(db, boss, "own")
    client = TestClient(served)
    sign_in(client, served, boss)
    bearer = {"Authorization": f"Bearer {token}"}
    assert TestClient(served).get("/api/v1/jobs", headers=bearer).status_code == 200

    page = client.get("/admin/tokens")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    [row] = audit.list_api_tokens(db, nina.id)
    assert f'data-token="{row.id.hex}" data-state="active"' in page.text and token not in page.text
    assert "nina" in page.text and "batch" in page.text and "own" in page.text
    only_nina = client.get("/admin/tokens?user=nina").text
    assert "batch" in only_nina and ">own<" not in only_nina
    assert client.get("/admin/tokens?user=nobody").status_code == 404
    assert audit.query_events(db, action="audit_view")[0].detail == {"what": "api_tokens", "filters": ["user"]}
    assert 'href="/admin/tokens"' in client.get("/admin").text

    csrf = client.headers.pop(CSRF_HEADER)
    assert client.post(f"/admin/tokens/{row.id.hex}/revoke", follow_redirects=False).status_code == 403
    form = re.search(rf'action="(/admin/tokens/{row.id.hex}/revoke[^"]*)"', only_nina)
    assert form is not None and f'value="{csrf}"' in only_nina
    revoked = client.post(form.group(1).replace("&amp;", "&"), data={"csrf_token": csrf}, follow_redirects=False)
    assert revoked.status_code == 303 and revoked.headers["location"] == "/admin/tokens?user=nina"
    assert TestClient(served).get("/api/v1/jobs", headers=bearer).status_code == 401
    [event] = audit.query_events(db, action="token_revoke")
    assert (event.username, event.object_id, event.detail) == ("boss", str(row.id), {"name": "batch",
                                                                                    "owner": "nina"})
    assert 'data-state="revoked"' in client.get("/admin/tokens?user=nina").text
    for bad in ("0" * 32, "not-a-uuid"):
        assert client.post(f"/admin/tokens/{bad}/revoke", data={"csrf_token": csrf}).status_code == 404
    assert audit.get_token_user(db, other) is not None


def test_clinicians_cannot_see_or_revoke_tokens(served: FastAPI) -> None:
    db = served.state.db
    nina = add_user(db, "nina")
    audit.create_api_token(db, nina, "batch")
    [row] = audit.list_api_tokens(db, nina.id)
    client = TestClient(served)
    sign_in(client, served, nina)
    assert client.get("/admin/tokens").status_code == 403
    assert client.post(f"/admin/tokens/{row.id.hex}/revoke").status_code == 403
    assert not audit.list_api_tokens(db, nina.id)[0].revoked


def test_the_server_checkpoints_the_chain_at_start_and_stop(tiny_engine, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, engine=tiny_engine)
    with TestClient(app):
        ring = audit.keys_for(app.state.db)
        [start] = audit.read_checkpoints(settings.resolved_audit_anchor_file, ring)
        assert start.seq == audit.query_events(app.state.db, action="app_start")[0].seq
    points = audit.read_checkpoints(settings.resolved_audit_anchor_file, ring)
    assert len(points) == 2 and points[1].seq == start.seq + 1  # app_stop
    db = audit.init_db(settings.resolved_database_url)
    try:
        assert audit.verify_chain(db, anchors=[p.head for p in points]).ok
    finally:
        db.dispose()


def test_the_audit_key_can_come_from_the_environment(tiny_engine, tmp_path: Path, monkeypatch) -> None:
    key = bytes(range(32))
    monkeypatch.setenv("VALD_MD_AUDIT_KEY", key.hex())
    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings, engine=tiny_engine)
    with TestClient(app):
        [event] = audit.query_events(app.state.db, action="app_start")
        assert event.key_id == audit.key_id(key) and audit.keys_for(app.state.db).path is None
    assert not settings.audit_key_path.exists()  # no key file written beside the database
