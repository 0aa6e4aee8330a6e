"""``vald-md users ...`` and ``vald-md audit ...`` (app/manage.py) through the real entry point ``app.cli.main``."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

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
    assert "trigger(s) missing or altered: audit_event_no_update" in printed  # as found, before any repair
    db = _db(data_dir)
    assert audit.query_events(db, action="audit_triggers_restored")  # start-up noticed the missing trigger
    db.dispose()


def _add_root(data_dir, monkeypatch, capsys):
    assert vald(data_dir, "users", "add", "root", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 0
    capsys.readouterr()


def _drop_triggers(raw: sqlite3.Connection) -> dict[str, str]:
    rows = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
    for name in rows:
        raw.execute(f"DROP TRIGGER {name}")
    return rows


def _root_and_views(data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                    views: int) -> Any:
    """The first admin (through the CLI), then ``views`` view events by bob; returns the open database."""
    _add_root(data_dir, monkeypatch, capsys)
    db = _db(data_dir)
    for i in range(views):
        audit.append_event(db, audit.AuditAction.VIEW, username="bob", detail={"i": i})
    return db


def test_audit_anchor_and_verify_against_it_after_the_tail_is_cut(data_dir, monkeypatch, capsys, tmp_path):
    db = _root_and_views(data_dir, monkeypatch, capsys, 66)
    db.dispose()
    assert vald(data_dir, "audit", "anchor", monkeypatch=monkeypatch) == 0  # the default file, in the data folder
    assert "checkpoint: event #67" in capsys.readouterr().out
    elsewhere = tmp_path / "other-host" / "anchors.jsonl"
    assert vald(data_dir, "audit", "anchor", "--to", str(elsewhere), monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert vald(data_dir, "audit", "anchor", "--to", "-", monkeypatch=monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 69  # a line for syslog: ... | logger -t vald-md-audit
    assert vald(data_dir, "audit", "verify", "--anchor", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "audit trail OK: 70 events verified" in out and "1 checkpoint(s)" in out

    # drop the triggers, cut the newest 4 events (68..71: two anchors' records and the verification's)
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    _drop_triggers(raw)
    raw.execute("DELETE FROM audit_event WHERE seq > 67")
    raw.close()
    assert vald(data_dir, "audit", "verify", "--anchor", str(elsewhere), monkeypatch=monkeypatch) == 1
    # verify checks the database as found (nothing repaired first), then records itself as event 72, never
    # re-using 68..71; the next start-up restores the triggers and records that as 73
    assert "BROKEN at event #68: checkpointed event 68 is missing" in capsys.readouterr().out
    db = _db(data_dir)
    assert [(e.seq, e.action) for e in audit.query_events(db, limit=3)] == [
        (73, "audit_triggers_restored"), (72, "audit_verify"), (67, "view")]
    result = audit.verify_chain(db, anchors=[c.head for c in audit.read_checkpoints(elsewhere, audit.keys_for(db))])
    db.dispose()
    assert not result.ok and result.first_bad_seq == 72

    (elsewhere).write_text(elsewhere.read_text().replace('"seq":68', '"seq":60'))
    assert vald(data_dir, "audit", "verify", "--anchor", str(elsewhere), monkeypatch=monkeypatch) == 1
    assert "line 1: its MAC does not match" in capsys.readouterr().out


def test_audit_verify_catches_a_plain_sha256_rehash_and_hand_made_triggers(data_dir, monkeypatch, capsys):
    db = _root_and_views(data_dir, monkeypatch, capsys, 12)
    db.dispose()
    # re-create the triggers by hand: the next start records it
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    for sql in _drop_triggers(raw).values():
        raw.execute(sql)
    raw.close()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1  # the database as found
    assert "schema changed" in capsys.readouterr().out
    assert vald(data_dir, "users", "list", monkeypatch=monkeypatch) == 0  # a start-up records it...
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0  # ...and verify shows it
    assert "warning: event 15: audit_triggers_restored" in capsys.readouterr().out

    # rewrite event 10 and re-hash it and the rest with the plain SHA-256 formula of revision 0001
    from tests.test_audit import _rewrite_and_rehash

    db = _db(data_dir)
    _rewrite_and_rehash(db, data_dir / "vald-md.db", 10, clear_key_id=False)
    db.dispose()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    assert "BROKEN at event #10: event 10: hash mismatch" in capsys.readouterr().out


def test_audit_verify_checks_the_database_as_found_and_never_signs_a_forged_unkeyed_chain(
        data_dir, monkeypatch, capsys):
    from tests.test_audit import _forge_unkeyed_chain

    db = _root_and_views(data_dir, monkeypatch, capsys, 10)
    _forge_unkeyed_chain(db, data_dir / "vald-md.db", drop_i=5)
    db.dispose()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    out = capsys.readouterr().out
    assert "audit trail BROKEN" in out and "not signed" in out and "audit trail OK" not in out
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1  # and it stays broken
    assert "BROKEN at event #11" in capsys.readouterr().out
    assert vald(data_dir, "users", "list", monkeypatch=monkeypatch) == 0  # a start-up does not heal it
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    assert "expected the audit_chain_keyed switch-over" in capsys.readouterr().out
    db = _db(data_dir)
    assert audit.query_events(db, action="audit_chain_keyed") == []
    db.dispose()


def test_audit_verify_checks_the_default_checkpoint_file_when_it_exists(data_dir, monkeypatch, capsys):
    db = _root_and_views(data_dir, monkeypatch, capsys, 3)
    db.dispose()
    assert vald(data_dir, "audit", "anchor", monkeypatch=monkeypatch) == 0  # checkpoint of event 4
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0  # no --anchor: the default file
    assert "1 checkpoint(s)" in capsys.readouterr().out
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    _drop_triggers(raw)
    raw.execute("DELETE FROM audit_event WHERE seq > 2")
    raw.close()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    assert "checkpointed event 4 is missing" in capsys.readouterr().out


def test_audit_verify_after_a_cut_tail_and_a_blanked_state_reuses_no_seq_and_repairs_nothing(
        data_dir, monkeypatch, capsys):
    db = _root_and_views(data_dir, monkeypatch, capsys, 9)
    db.dispose()
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    _drop_triggers(raw)
    raw.execute("DELETE FROM audit_event WHERE seq > 5")
    raw.execute("UPDATE audit_chain_state SET last_seq = 5, head_hash = (SELECT hash FROM audit_event "
                "WHERE seq = 5), mac = '', key_id = NULL")
    raw.close()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    assert "BROKEN at event #6: the chain state row is not signed" in capsys.readouterr().out
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    assert "BROKEN at event #11: event 11: seq gap, event(s) 6..10 missing" in capsys.readouterr().out
    db = _db(data_dir)
    assert [(e.seq, e.action) for e in audit.query_events(db, limit=5)][::-1] == [
        (5, "view"), (11, "audit_tamper_detected"), (12, "audit_verify"), (13, "audit_verify"),
        (14, "audit_triggers_restored")]
    db.dispose()


def test_audit_verify_fails_until_a_tamper_alarm_is_acknowledged(data_dir, monkeypatch, capsys):
    _add_root(data_dir, monkeypatch, capsys)
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    _drop_triggers(raw)
    raw.execute("UPDATE audit_chain_state SET mac = '', key_id = NULL")  # blanked beside keyed events
    raw.close()
    assert vald(data_dir, "users", "list", monkeypatch=monkeypatch) == 0  # start-up: alarm #2, triggers back #3
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    out = capsys.readouterr().out
    assert "warning: event 2: audit_tamper_detected" in out and "not yet acknowledged" in out and "#2" in out
    assert vald(data_dir, "audit", "acknowledge", "1", "--reason", "x", monkeypatch=monkeypatch) == 2
    assert "not an audit_tamper_detected or audit_triggers_restored event" in capsys.readouterr().err
    assert vald(data_dir, "audit", "acknowledge", "2", "--reason", "drill by the admin, ticket 42",
                monkeypatch=monkeypatch) == 0
    assert "acknowledged" in capsys.readouterr().out
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0
    assert "audit trail OK" in capsys.readouterr().out
    db = _db(data_dir)
    [ack] = audit.query_events(db, action="audit_tamper_acknowledged")
    assert ack.detail == {"seq": 2, "reason": "drill by the admin, ticket 42"} and ack.username.startswith("cli:")
    db.dispose()


def test_audit_verify_after_a_vacuum_says_so_and_how_to_acknowledge_it(data_dir, monkeypatch, capsys):
    _add_root(data_dir, monkeypatch, capsys)
    raw = sqlite3.connect(data_dir / "vald-md.db", isolation_level=None)
    raw.execute("VACUUM")
    raw.close()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 1
    out = capsys.readouterr().out
    assert "schema changed" in out and "VACUUM" in out and "vald-md audit acknowledge SEQ" in out
    assert vald(data_dir, "users", "list", monkeypatch=monkeypatch) == 0  # start-up records it as event 3
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0
    assert "warning: event 3: audit_triggers_restored" in capsys.readouterr().out
    assert vald(data_dir, "audit", "acknowledge", "3", "--reason", "nightly VACUUM", monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0
    assert "(acknowledged in event 5)" in capsys.readouterr().out


def test_audit_rotate_key(data_dir, monkeypatch, capsys):
    _add_root(data_dir, monkeypatch, capsys)
    assert vald(data_dir, "audit", "rotate-key", monkeypatch=monkeypatch) == 0
    assert "audit key rotated: ak_" in capsys.readouterr().out
    key_file = data_dir / "secrets" / "audit-hmac.key"
    assert len(key_file.read_text().split()) == 2 and key_file.stat().st_mode & 0o077 == 0
    assert vald(data_dir, "audit", "verify", monkeypatch=monkeypatch) == 0
    db = _db(data_dir)
    [rotated] = audit.query_events(db, action="audit_key_rotated")
    assert rotated.key_id == audit.keys_for(db).current_id != rotated.detail["previous_key_id"]
    db.dispose()
    monkeypatch.setenv("VALD_MD_AUDIT_KEY", "00" * 32)
    assert vald(data_dir, "audit", "rotate-key", monkeypatch=monkeypatch) == 2
    assert "VALD_MD_AUDIT_KEY" in capsys.readouterr().err


def test_rotate_key_while_the_server_runs_is_no_tamper_alarm(data_dir, monkeypatch, capsys):
    import os
    import subprocess

    _add_root(data_dir, monkeypatch, capsys)
    server = _db(data_dir)  # the running server's engine, its key ring read at start-up
    try:
        old = audit.keys_for(server).current_id
        audit.append_event(server, audit.AuditAction.VIEW, username="bob", detail={"i": 1})
        env = {k: v for k, v in os.environ.items() if not k.startswith("VALD_MD_")}
        rotated = subprocess.run([sys.executable, "-m", "app.cli", "audit", "rotate-key", "--data-dir",
                                  str(data_dir)], capture_output=True, text=True, env=env, timeout=120,
                                 cwd=Path(__file__).resolve().parent.parent)
        assert rotated.returncode == 0, rotated.stderr
        event = audit.append_event(server, audit.AuditAction.VIEW, username="bob", detail={"i": 2})
        assert audit.query_events(server, action="audit_tamper_detected") == []
        assert event.key_id == audit.keys_for(server).current_id != old  # signs with the new key from now on
        assert audit.verify_chain(server).ok
    finally:
        server.dispose()


def test_users_tokens_revoke_token_and_expiry(data_dir, monkeypatch, capsys):
    _add_root(data_dir, monkeypatch, capsys)
    assert vald(data_dir, "users", "add", "doc", "--password-stdin", stdin=PASSWORD + "\n",
                monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    tokens = {}
    for name, extra in (("batch", ["--days", "7"]), ("cron", []), ("spare", [])):
        assert vald(data_dir, "users", "token", "doc", "--name", name, *extra, monkeypatch=monkeypatch) == 0
        tokens[name] = capsys.readouterr().out.strip()
    assert vald(data_dir, "users", "token", "doc", "--days", "0", monkeypatch=monkeypatch) == 2
    assert "--days 0" in capsys.readouterr().err
    assert vald(data_dir, "users", "tokens", "doc", monkeypatch=monkeypatch) == 0
    listing = capsys.readouterr().out
    db = _db(data_dir)
    by_name = {t.name: t for t in audit.list_api_tokens(db, audit.get_user(db, username="doc").id)}
    assert (by_name["batch"].expires_at - by_name["batch"].created_at).days == 7
    assert (by_name["cron"].expires_at - by_name["cron"].created_at).days == 90
    assert by_name["batch"].id.hex in listing and listing.count("active") == 3 and "vmd_" not in listing

    assert vald(data_dir, "users", "revoke-token", "doc", "batch", monkeypatch=monkeypatch) == 0
    assert "API token 'batch'" in capsys.readouterr().out
    assert vald(data_dir, "users", "revoke-token", "doc", by_name["cron"].id.hex[:8], monkeypatch=monkeypatch) == 0
    assert vald(data_dir, "users", "revoke-token", "root", "spare", monkeypatch=monkeypatch) == 2  # not root's
    assert "no API token 'spare'" in capsys.readouterr().err
    assert audit.get_token_user(db, tokens["batch"]) is None and audit.get_token_user(db, tokens["cron"]) is None
    assert audit.get_token_user(db, tokens["spare"]) is not None

    # a password reset revokes the rest; re-enabling after a disable revives nothing
    assert vald(data_dir, "users", "reset-password", "doc", "--password-stdin", stdin="another long passphrase\n",
                monkeypatch=monkeypatch) == 0
    assert "API tokens revoked" in capsys.readouterr().out
    assert audit.get_token_user(db, tokens["spare"]) is None
    assert vald(data_dir, "users", "token", "doc", "--name", "new", monkeypatch=monkeypatch) == 0
    new = capsys.readouterr().out.strip()
    assert vald(data_dir, "users", "disable", "doc", monkeypatch=monkeypatch) == 0
    assert vald(data_dir, "users", "enable", "doc", monkeypatch=monkeypatch) == 0
    assert all(audit.get_token_user(db, t) is None for t in (*tokens.values(), new))
    capsys.readouterr()
    assert vald(data_dir, "users", "tokens", "doc", monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.count("revoked") == 4
    revokes = audit.query_events(db, action="token_revoke")
    assert [e.detail["name"] for e in reversed(revokes)] == ["batch", "cron"]
    resets = audit.query_events(db, action="password_reset")
    assert resets[0].detail["tokens_revoked"] == 1
    assert audit.query_events(db, action="user_disable")[0].detail["tokens_revoked"] == 1
    assert audit.verify_chain(db).ok
    db.dispose()


# ----------------------------------------------------------------------------------------------------------------
# a quiet command line (issue 12, "first hour")
# ----------------------------------------------------------------------------------------------------------------
def test_cli_stderr_has_no_alembic_chatter_or_text_encoder_warning(tmp_path):
    """``users list`` opens (and migrates) the database; ``model info`` builds the pipeline around a BERT text
    encoder. Neither prints alembic's INFO lines nor diffusers' "Expected types for text_encoder" warning."""
    import os
    import subprocess

    from tests.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny")
    env = {**os.environ, "VALD_MD_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    for argv in (["users", "list"], ["model", "info", str(model)]):
        done = subprocess.run([sys.executable, "-m", "app.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=300, cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr
        assert "INFO alembic" not in done.stderr and "Expected types" not in done.stderr, done.stderr
    assert json.loads(done.stdout)["text_encoder_type"].lower().startswith("bert")
    # the database was migrated all the same, and -v still shows alembic
    verbose = subprocess.run([sys.executable, "-m", "app.cli", "-v", "users", "list"], env={
        **env, "VALD_MD_DATA_DIR": str(tmp_path / "data2")}, capture_output=True, text=True, timeout=300)
    assert "alembic" in verbose.stderr
