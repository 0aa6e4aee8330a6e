"""``vald-md users ...`` and ``vald-md audit ...`` (app/manage.py) through the real entry point ``app.cli.main``."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from app import audit
from app.cli import build_parser, main

PASSWORD = "correct horse battery staple"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def vald(data_dir: Path, *argv: str, stdin: str = "", monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main([*argv[:2], *argv[2:], "--data-dir", str(data_dir)])


def _db(data_dir: Path):
    return audit.init_db(f"sqlite:///{data_dir / 'vald-md.db'}")


def test_users_lifecycle(data_dir, monkeypatch, capsys):
    assert vald(data_dir, "users", "add", "Root", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 0
    assert "created admin 'root'" in capsys.readouterr().out
    assert vald(data_dir, "users", "add", "nurse", "--password-stdin", stdin="short\n", monkeypatch=monkeypatch) == 2
    assert "at least 12 characters" in capsys.readouterr().err
    assert vald(data_dir, "users", "add", "root", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 2
    assert "taken" in capsys.readouterr().err
    assert vald(data_dir, "users", "add", "doc", monkeypatch=monkeypatch) == 2  # stdin is not a terminal
    assert "--password-stdin" in capsys.readouterr().err
    assert vald(data_dir, "users", "add", "doc", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert vald(data_dir, "users", "token", "doc", "--name", "batch", monkeypatch=monkeypatch) == 0
    token = capsys.readouterr().out.strip()
    db = _db(data_dir)
    assert token.startswith("vmd_") and audit.get_token_user(db, token).username == "doc"
    assert vald(data_dir, "users", "disable", "doc", monkeypatch=monkeypatch) == 0
    assert audit.get_token_user(db, token) is None
    assert vald(data_dir, "users", "disable", "root", monkeypatch=monkeypatch) == 2  # the last admin
    assert "last enabled admin" in capsys.readouterr().err
    assert vald(data_dir, "users", "enable", "doc", monkeypatch=monkeypatch) == 0
    new = "another long passphrase"
    assert vald(data_dir, "users", "reset-password", "doc", "--password-stdin", stdin=new + "\n",
                monkeypatch=monkeypatch) == 0
    assert audit.authenticate(db, "doc", new) is not None
    capsys.readouterr()
    assert vald(data_dir, "users", "list", monkeypatch=monkeypatch) == 0
    listing = capsys.readouterr().out
    assert "root" in listing and "admin" in listing and "doc" in listing and PASSWORD not in listing
    actions = [e.action for e in reversed(audit.query_events(db, limit=100))]
    assert actions[:2] == ["user_add", "user_add"] and {"token_create", "user_disable", "user_enable",
                                                        "password_reset", "login_ok"} <= set(actions)
    db.dispose()


def test_passwords_are_never_command_line_arguments():
    for argv in (["users", "add", "x", "--password", PASSWORD], ["users", "reset-password", "x", PASSWORD]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_audit_verify_and_export(data_dir, monkeypatch, capsys, tmp_path):
    assert vald(data_dir, "users", "add", "root", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0
    assert "audit trail OK: 1 events verified" in capsys.readouterr().out
    out = tmp_path / "trail.csv"
    assert vald(data_dir, "audit", "export", "--csv", "--out", str(out), monkeypatch=monkeypatch) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["action"] for r in rows] == ["user_add", "audit_verify"] and out.stat().st_mode & 0o077 == 0
    assert vald(data_dir, "audit", "export", "--json", "--action", "user_add", monkeypatch=monkeypatch) == 0
    assert [e["action"] for e in json.loads(capsys.readouterr().out)] == ["user_add"]
    assert vald(data_dir, "audit", "export", "--json", "--since", "yesterday", monkeypatch=monkeypatch) == 2
    # tamper: drop the trigger, rewrite who created the account
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    raw.execute("DROP TRIGGER audit_event_no_update")
    raw.execute("UPDATE audit_event SET username = 'mallory' WHERE seq = 1")
    raw.close()
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    printed = capsys.readouterr().out
    assert "BROKEN at event #1" in printed and "hash mismatch" in printed and "user='mallory'" in printed
    db = _db(data_dir)
    assert audit.query_events(db, action="audit_triggers_restored")  # start-up noticed the missing trigger
    db.dispose()
