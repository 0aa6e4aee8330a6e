"""Tests of app.audit: migrations, the hash chain and its tamper evidence, accounts, inputs and runs.

Every test uses its own file-based SQLite database in ``tmp_path`` (WAL needs a file). Argon2 costs ~0.2 s per
hash on a 2-core CPU, so only the account tests go through ``create_user``; the others insert users with an
unusable hash through ``_user``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, select

from app import audit
from app.audit import (
    AuditAction,
    AuditChainState,
    AuditDetailError,
    AuditEvent,
    Outcome,
    Role,
    RunStatus,
    User,
    UserSession,
)
from app.audit.db import POSTGRESQL_TRIGGER_FUNCTION, POSTGRESQL_TRIGGERS

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SHA = "ab" * 32
SECRET = bytes(range(32))
STUDY_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000001"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "vald.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = audit.init_db(db_url)
    yield engine
    engine.dispose()


def _user(engine: Engine, username: str = "alice", role: Role = Role.CLINICIAN) -> User:
    """A user without argon2 cost (unusable password hash) for tests that are not about logging in."""
    with audit.write_session(engine) as session:
        user = User(username=username, password_hash="!unusable", role=role.value)
        session.add(user)
    return user


def _events(n: int, engine: Engine) -> None:
    for i in range(n):
        audit.append_event(
            engine, AuditAction.VIEW, username="bob", object_type="run", object_id=str(i), detail={"i": i}
        )


def _stored_bytes(db_path: Path) -> bytes:
    """The database file and its write-ahead log, where recent commits still live."""
    wal = db_path.with_name(db_path.name + "-wal")
    return db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def _raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)


# --- schema and connections --------------------------------------------------------------------------------


def test_init_db_builds_the_schema_by_migration_in_sync_with_the_models(engine: Engine, db_url: str) -> None:
    tables = set(inspect(engine).get_table_names())
    assert {"app_user", "user_session", "api_token", "input_image", "run", "export", "audit_event",
            "audit_chain_state"} <= tables
    assert "alembic_version" in tables
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == "0003_job_table"
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
    assert audit.install_triggers(engine) == []  # the migration installed exactly the triggers init_db expects
    audit.upgrade_database(db_url)  # idempotent
    assert audit.list_users(engine) == []  # no default account


def test_sqlite_runs_in_wal_with_busy_timeout_and_begin_immediate(engine: Engine, db_path: Path) -> None:
    with engine.connect() as connection:
        pragma = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
        }
    assert pragma == {"journal_mode": "wal", "busy_timeout": 10_000, "foreign_keys": 1, "synchronous": 2}

    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    # the write session holds the write lock from its first statement
    with audit.write_session(engine), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    with audit.read_session(engine) as session:  # readers take no write lock
        session.exec(select(AuditEvent)).all()
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    other.close()


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(audit.UnsupportedDatabaseError, match="mysql"):
        audit.make_engine("mysql://u@localhost/db")


# --- the chain ---------------------------------------------------------------------------------------------


def test_chain_survives_8_concurrent_writers(engine: Engine, db_url: str) -> None:
    writers, per_writer = 8, 50
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(index: int) -> None:
        own = audit.make_engine(db_url)  # own engine, own connection, as a separate process would have
        try:
            barrier.wait()
            for i in range(per_writer):
                audit.append_event(own, AuditAction.VIEW, username=f"writer{index}", detail={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    result = audit.verify_chain(engine)
    assert result.ok, result.reason
    assert result.events_checked == writers * per_writer
    assert result.head is not None and result.head.seq == writers * per_writer
    assert audit.count_events(engine, user="writer3") == per_writer


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_event SET username = 'mallory' WHERE seq = 2", "DELETE FROM audit_event WHERE seq = 2"]
)
def test_update_and_delete_are_refused_by_triggers(engine: Engine, db_path: Path, statement: str) -> None:
    _events(3, engine)
    connection = _raw(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="audit_event is append-only"):
        connection.execute(statement)
    connection.close()
    with audit.write_session(engine) as session, pytest.raises(IntegrityError, match="append-only"):
        session.exec(text(statement))  # type: ignore[call-overload]
    assert audit.verify_chain(engine).ok


def test_forged_row_is_named_and_the_triggers_come_back(engine: Engine, db_path: Path, db_url: str) -> None:
    _events(10, engine)
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_update")
    connection.execute("DROP TRIGGER audit_event_no_delete")
    connection.execute("""UPDATE audit_event SET detail = '{"i": 99}' WHERE seq = 6""")
    connection.close()

    result = audit.verify_chain(engine)
    assert not result.ok
    assert result.first_bad_seq == 6
    assert result.events_checked == 6
    assert "hash mismatch" in result.reason

    restarted = audit.init_db(db_url)  # start-up restores the triggers and leaves a trace
    try:
        assert audit.install_triggers(restarted) == []
        [event] = audit.query_events(restarted, action=AuditAction.AUDIT_TRIGGERS_RESTORED)
        assert event.detail["triggers"] == ["audit_event_no_update", "audit_event_no_delete"]
        assert event.detail["schema_changed"]
        assert event.event_id_code == "110113"
    finally:
        restarted.dispose()


def test_garbled_row_is_named(engine: Engine, db_path: Path) -> None:
    _events(4, engine)
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_update")
    connection.execute("UPDATE audit_event SET detail = '{not json', ts = 'yesterday' WHERE seq = 3")
    connection.close()
    result = audit.verify_chain(engine)
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "cannot be decoded" in result.reason


def test_deleted_middle_row_is_detected(engine: Engine, db_path: Path) -> None:
    _events(10, engine)
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_delete")
    connection.execute("DELETE FROM audit_event WHERE seq = 5")
    connection.close()
    result = audit.verify_chain(engine)
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert "5 missing" in result.reason


def test_truncated_tail_is_detected_by_the_chain_state_and_an_anchor(engine: Engine, db_path: Path) -> None:
    _events(10, engine)
    anchor = audit.chain_head(engine)
    assert anchor is not None and anchor.seq == 10
    assert audit.verify_chain(engine, anchor=anchor).ok
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_delete")
    connection.execute("DELETE FROM audit_event WHERE seq >= 9")
    connection.close()
    result = audit.verify_chain(engine)  # the signed high-water mark sees the cut tail...
    assert (result.ok, result.first_bad_seq) == (False, 9)
    assert "9..10 missing" in result.reason and "tail was deleted" in result.reason
    result = audit.verify_chain(engine, anchor=anchor)  # ...and so does an anchor kept elsewhere
    assert (result.ok, result.first_bad_seq) == (False, 10)
    assert "truncated" in result.reason


# --- issue 18: a keyed chain, sequence numbers never re-used, checkpoints outside the database ---------------


def _drop_triggers(connection: sqlite3.Connection) -> dict[str, str]:
    """Drops every trigger, as anyone with write access to the database file can; returns their SQL."""
    rows = dict(connection.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
    for name in rows:
        connection.execute(f"DROP TRIGGER {name}")
    return rows


def _plain_sha256(event: AuditEvent, prev_hash: str) -> str:
    """The unkeyed formula of revision 0001, as an attacker who read the code would compute it."""
    payload = {
        "v": 1, "seq": event.seq, "id": str(event.id),
        "ts": event.ts.astimezone(UTC).isoformat(timespec="microseconds"),
        "user_id": None if event.user_id is None else str(event.user_id), "username": event.username,
        "action": event.action, "object_type": event.object_type, "object_id": event.object_id,
        "outcome": event.outcome, "event_id_code": event.event_id_code, "event_type_code": event.event_type_code,
        "event_action_code": event.event_action_code, "detail": event.detail, "prev_hash": prev_hash,
    }
    return hashlib.sha256(audit.canonical_json(payload).encode("utf-8")).hexdigest()


def _rewrite_and_rehash(engine: Engine, db_path: Path, seq: int, *, clear_key_id: bool) -> None:
    """Issue 18's attack: change event ``seq`` and re-hash it and every later event with plain SHA-256."""
    with audit.read_session(engine) as session:
        rows = list(session.exec(select(AuditEvent).where(AuditEvent.seq >= seq).order_by(AuditEvent.seq)).all())
        previous = session.exec(select(AuditEvent.hash).where(AuditEvent.seq == seq - 1)).one()
    connection = _raw(db_path)
    _drop_triggers(connection)
    for row in rows:
        if row.seq == seq:
            row.detail = {"i": 999}
        digest = _plain_sha256(row, previous)
        key = ", key_id = NULL" if clear_key_id else ""
        connection.execute(f"UPDATE audit_event SET detail = ?, prev_hash = ?, hash = ?{key} WHERE seq = ?",
                           (json.dumps(row.detail), previous, digest, row.seq))
        previous = digest
    connection.close()


def test_events_are_keyed_with_a_key_kept_outside_the_database(engine: Engine, db_path: Path) -> None:
    _events(3, engine)
    ring = audit.keys_for(engine)
    key_file = db_path.parent / "secrets" / "audit-hmac.key"
    assert ring.path == key_file and oct(key_file.stat().st_mode & 0o777) == oct(0o600)
    assert ring.current.hex().encode() not in _stored_bytes(db_path)
    [event] = audit.query_events(engine, limit=1)
    assert event.key_id == ring.current_id == audit.key_id(ring.current)
    assert event.hash == audit.event_hash(event, ring.current) != _plain_sha256(event, event.prev_hash)
    assert audit.event_hash(event, bytes(32)) != event.hash  # another key, another hash
    with pytest.raises(audit.AuditKeyError, match="not in the key ring"):
        audit.event_hash(event)
    other = audit.AuditKeyRing.from_keys([bytes(range(32))])
    result = audit.verify_chain(engine, keys=other)
    assert (result.ok, result.first_bad_seq) == (False, 1) and "not in the key ring" in result.reason


@pytest.mark.parametrize("clear_key_id", [False, True], ids=["key-id-kept", "key-id-cleared"])
def test_row_rewritten_and_rest_rehashed_with_plain_sha256_is_detected(
    engine: Engine, db_path: Path, clear_key_id: bool
) -> None:
    _events(20, engine)
    _rewrite_and_rehash(engine, db_path, 10, clear_key_id=clear_key_id)
    result = audit.verify_chain(engine)
    assert (result.ok, result.first_bad_seq) == (False, 10), result.reason
    assert ("not signed with the audit key" if clear_key_id else "hash mismatch") in result.reason


def test_truncated_tail_with_triggers_dropped_fails_and_seq_is_never_reused(
    engine: Engine, db_path: Path, tmp_path: Path
) -> None:
    _events(68, engine)
    checkpoints = tmp_path / "elsewhere" / "anchors.jsonl"
    point = audit.write_checkpoint(engine, checkpoints)
    assert (point.seq, point.last_seq) == (68, 68)
    connection = _raw(db_path)
    _drop_triggers(connection)
    connection.execute("DELETE FROM audit_event WHERE seq > 65")
    connection.close()

    anchors = [c.head for c in audit.read_checkpoints(checkpoints, audit.keys_for(engine))]
    result = audit.verify_chain(engine, anchors=anchors)
    assert (result.ok, result.first_bad_seq) == (False, 68) and "truncated" in result.reason
    result = audit.verify_chain(engine)  # no checkpoint needed: the signed state remembers 68
    assert (result.ok, result.first_bad_seq) == (False, 66) and "66..68 missing" in result.reason

    event = audit.append_event(engine, AuditAction.APP_START)
    assert event.seq == 69  # 66..68 are never handed out again
    result = audit.verify_chain(engine)
    assert (result.ok, result.first_bad_seq) == (False, 69) and "66..68 missing" in result.reason


def test_rewound_chain_state_is_recorded_and_seq_still_not_reused(engine: Engine, db_path: Path, db_url: str) -> None:
    _events(5, engine)
    connection = _raw(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="only moves forward"):
        connection.execute("UPDATE audit_chain_state SET last_seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="only moves forward"):
        connection.execute("DELETE FROM audit_chain_state")
    _drop_triggers(connection)
    connection.execute("DELETE FROM audit_event WHERE seq > 3")
    connection.execute("UPDATE audit_chain_state SET last_seq = 3, head_hash = "
                       "(SELECT hash FROM audit_event WHERE seq = 3)")
    connection.close()
    result = audit.verify_chain(engine)
    assert not result.ok and "fails its MAC" in result.reason

    event = audit.append_event(engine, AuditAction.APP_START)  # the application notices before it writes
    [alarm] = audit.query_events(engine, action=AuditAction.AUDIT_TAMPER_DETECTED)
    assert alarm.detail["found"] == {"last_seq": 3, "head_seq": 3, "key_id": event.key_id}
    # 4 and 5 were handed out before (sqlite_sequence remembers): the alarm is 6, never a re-used 4
    assert alarm.outcome == Outcome.SERIOUS_FAILURE and (alarm.seq, event.seq) == (6, 7)
    restarted = audit.init_db(db_url)  # puts the triggers back, and says so
    try:
        result = audit.verify_chain(restarted)
        assert (result.ok, result.first_bad_seq) == (False, 6) and "4..5 missing" in result.reason
    finally:
        restarted.dispose()


def test_tail_deleted_and_state_rewound_and_blanked_never_reuses_a_seq(engine: Engine, db_path: Path) -> None:
    _events(10, engine)
    connection = _raw(db_path)
    _drop_triggers(connection)
    connection.execute("DELETE FROM audit_event WHERE seq > 5")
    connection.execute("UPDATE audit_chain_state SET last_seq = 5, head_hash = (SELECT hash FROM audit_event "
                       "WHERE seq = 5), mac = '', key_id = NULL")
    connection.close()
    event = audit.append_event(engine, AuditAction.APP_START)
    [alarm] = audit.query_events(engine, action=AuditAction.AUDIT_TAMPER_DETECTED)
    assert (alarm.seq, event.seq) == (11, 12)
    result = audit.verify_chain(engine)
    assert (result.ok, result.first_bad_seq) == (False, 11) and "6..10 missing" in result.reason


def test_unacknowledged_tamper_alarms_are_listed_until_acknowledged(engine: Engine, db_path: Path) -> None:
    _events(3, engine)
    connection = _raw(db_path)  # the triggers allow it: the mark does not move back
    connection.execute("UPDATE audit_chain_state SET mac = 'tampered'")
    connection.close()
    audit.append_event(engine, AuditAction.APP_START)
    result = audit.verify_chain(engine)
    assert result.ok and result.unacknowledged == (4,)
    audit.append_event(engine, AuditAction.AUDIT_TAMPER_ACKNOWLEDGED, username="cli:root",
                       detail={"seq": 4, "reason": "test"})
    assert audit.verify_chain(engine).unacknowledged == ()


def test_blanked_chain_state_is_not_taken_for_a_new_chain(engine: Engine, db_path: Path, db_url: str) -> None:
    _events(3, engine)
    connection = _raw(db_path)
    _drop_triggers(connection)
    connection.execute("UPDATE audit_chain_state SET mac = '', key_id = NULL")
    connection.close()
    result = audit.verify_chain(engine)
    assert not result.ok and "not signed" in result.reason
    restarted = audit.init_db(db_url)
    try:
        alarm = audit.query_events(restarted, action=AuditAction.AUDIT_TAMPER_DETECTED)
        assert [(e.seq, e.detail["check"]) for e in alarm] == [(4, "chain_state_unsigned")]
        result = audit.verify_chain(restarted)
        assert result.ok and [w.split()[2] for w in result.warnings] == ["audit_tamper_detected",
                                                                         "audit_triggers_restored"]
    finally:
        restarted.dispose()


def _forge_unkeyed_chain(engine: Engine, db_path: Path, *, drop_i: int) -> int:
    """The review's bypass without the key: delete one event, renumber and re-hash everything with the unkeyed
    formula of revision 0001 (``key_id`` NULL), make the state row look freshly migrated (unsigned,
    ``legacy_until`` = ``last_seq`` = N) and put the triggers back exactly. Returns N."""
    with audit.read_session(engine) as session:
        rows = list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())
    keep = [r for r in rows if not (r.action == "view" and r.detail.get("i") == drop_i)]
    connection = _raw(db_path)
    triggers = _drop_triggers(connection)
    connection.execute("DELETE FROM audit_event")
    previous = audit.GENESIS_HASH
    for n, row in enumerate(keep, start=1):
        row.seq, row.key_id = n, None
        digest = _plain_sha256(row, previous)
        connection.execute(
            "INSERT INTO audit_event (seq, id, ts, user_id, username, action, object_type, object_id, outcome, "
            "event_id_code, event_type_code, event_action_code, detail, prev_hash, hash, key_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (n, row.id.hex, row.ts.replace(tzinfo=None).isoformat(sep=" "),
             None if row.user_id is None else row.user_id.hex, row.username, row.action, row.object_type,
             row.object_id, row.outcome, row.event_id_code, row.event_type_code, row.event_action_code,
             json.dumps(row.detail), previous, digest))
        previous = digest
    connection.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit_event'", (len(keep),))
    connection.execute("UPDATE audit_chain_state SET last_seq = ?, head_hash = ?, legacy_until = ?, "
                       "schema_fingerprint = '', key_id = NULL, mac = ''", (len(keep), previous, len(keep)))
    for sql in triggers.values():
        connection.execute(sql)
    connection.close()
    return len(keep)


def test_chain_rewritten_unkeyed_and_state_made_to_look_migrated_is_not_signed(
    engine: Engine, db_path: Path, db_url: str
) -> None:
    _events(10, engine)
    marker = db_path.parent / "secrets" / "audit-keyed"
    assert marker.read_text().splitlines() == [f"sqlite:{db_path.resolve()}"]  # written when it was keyed
    n = _forge_unkeyed_chain(engine, db_path, drop_i=5)
    assert n == 9
    restarted = audit.init_db(db_url)  # the start-up must not take it for an upgrade from revision 0001
    try:
        assert audit.query_events(restarted, action=AuditAction.AUDIT_CHAIN_KEYED) == []
        [alarm] = audit.query_events(restarted, action=AuditAction.AUDIT_TAMPER_DETECTED)
        assert alarm.seq == 10 and alarm.detail["check"] == "chain_state_unsigned" and alarm.detail["marker"]
        result = audit.verify_chain(restarted)
        assert (result.ok, result.first_bad_seq) == (False, 10), result.reason
        assert "expected the audit_chain_keyed switch-over" in result.reason
    finally:
        restarted.dispose()


def test_a_database_the_marker_does_not_list_is_keyed_as_an_upgrade(db_url: str, db_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    audit.init_db(f"sqlite:///{other}").dispose()  # same key folder, another database
    marker = db_path.parent / "secrets" / "audit-keyed"
    assert marker.read_text().splitlines() == [f"sqlite:{other.resolve()}"]
    _legacy_database(db_url, 2)
    engine = audit.init_db(db_url)
    try:
        assert [e.action for e in audit.query_events(engine)] == ["audit_chain_keyed", "view", "view"]
        assert audit.query_events(engine, action=AuditAction.AUDIT_TAMPER_DETECTED) == []
        assert f"sqlite:{db_path.resolve()}" in marker.read_text().splitlines()
    finally:
        engine.dispose()


def test_triggers_recreated_by_hand_are_detected(engine: Engine, db_path: Path, db_url: str) -> None:
    _events(5, engine)
    connection = _raw(db_path)
    dropped = _drop_triggers(connection)
    for sql in dropped.values():  # put them back exactly as they were
        connection.execute(sql)
    connection.close()
    assert audit.install_triggers(engine) == []  # nothing missing...
    result = audit.verify_chain(engine)  # ...but the schema moved on behind the application's back
    assert not result.ok and "schema changed" in result.reason

    restarted = audit.init_db(db_url)  # start-up records it
    try:
        [event] = audit.query_events(restarted, action=AuditAction.AUDIT_TRIGGERS_RESTORED)
        assert event.seq == 6 and event.detail["triggers"] == [] and event.detail["schema_changed"]
        before, after = event.detail["schema_version"]
        assert after - before == 8 and event.detail["sql_unchanged"]  # 4 drops + 4 creates; same SQL
        result = audit.verify_chain(restarted)
        assert result.ok
        assert result.warnings == (f"event 6: audit_triggers_restored {audit.canonical_json(event.detail)}",)
    finally:
        restarted.dispose()


def test_vacuum_is_reported_as_a_schema_change_with_the_way_to_record_and_acknowledge_it(
    engine: Engine, db_path: Path, db_url: str
) -> None:
    _events(2, engine)
    connection = _raw(db_path)
    connection.execute("VACUUM")  # moves PRAGMA schema_version like a re-created trigger would
    connection.close()
    result = audit.verify_chain(engine)
    assert not result.ok and "schema changed" in result.reason and "VACUUM" in result.reason
    assert "vald-md audit acknowledge" in result.reason
    restarted = audit.init_db(db_url)
    try:
        [event] = audit.query_events(restarted, action=AuditAction.AUDIT_TRIGGERS_RESTORED)
        before, after = event.detail["schema_version"]
        assert (after - before, event.detail["sql_unchanged"], event.detail["triggers"]) == (1, True, [])
        result = audit.verify_chain(restarted)
        assert result.ok and result.unacknowledged == () and len(result.warnings) == 1
        audit.append_event(restarted, AuditAction.AUDIT_TAMPER_ACKNOWLEDGED, username="cli:root",
                           detail={"seq": event.seq, "reason": "VACUUM by the admin"})
        [warning] = audit.verify_chain(restarted).warnings
        assert warning.endswith(f"(acknowledged in event {event.seq + 1})")
    finally:
        restarted.dispose()


class _FakePgResult:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self.rows = rows

    def tuples(self) -> list[tuple[object, ...]]:
        return self.rows

    def scalars(self) -> list[object]:
        return [row[0] for row in self.rows]


class _FakePgConnection:
    """Stands in for a PostgreSQL connection: answers the pg_trigger query with ``rows``, the pg_proc one with
    ``functions``, and remembers the SQL."""

    class dialect:
        name = "postgresql"

    def __init__(self, rows: list[tuple[object, ...]], functions: list[tuple[object, ...]] | None = None) -> None:
        self.rows, self.functions, self.sql = rows, functions if functions is not None else _PG_FUNCTIONS, []

    def execute(self, statement: object, *args: object) -> _FakePgResult:
        self.sql.append(str(statement))
        return _FakePgResult(self.functions if "pg_proc" in str(statement) else self.rows)


# as PostgreSQL 15 shows them (pg_get_triggerdef, pg_proc.prosrc) for a database made by init_db
_PG_DEFS = {
    "audit_chain_state_no_delete": "CREATE TRIGGER audit_chain_state_no_delete BEFORE DELETE ON "
    "public.audit_chain_state FOR EACH ROW EXECUTE FUNCTION audit_chain_state_guard()",
    "audit_chain_state_no_rewind": "CREATE TRIGGER audit_chain_state_no_rewind BEFORE UPDATE ON "
    "public.audit_chain_state FOR EACH ROW WHEN (((new.last_seq < old.last_seq) OR (new.legacy_until <> "
    "old.legacy_until) OR (new.id <> old.id))) EXECUTE FUNCTION audit_chain_state_guard()",
    "audit_chain_state_no_truncate": "CREATE TRIGGER audit_chain_state_no_truncate BEFORE TRUNCATE ON "
    "public.audit_chain_state FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_state_guard()",
    "audit_event_no_delete": "CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON public.audit_event FOR EACH "
    "ROW EXECUTE FUNCTION audit_event_append_only()",
    "audit_event_no_truncate": "CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON public.audit_event FOR "
    "EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()",
    "audit_event_no_update": "CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON public.audit_event FOR EACH "
    "ROW EXECUTE FUNCTION audit_event_append_only()",
}
_PG_FUNCTIONS: list[tuple[object, ...]] = [
    ("audit_chain_state_guard", " BEGIN RAISE EXCEPTION 'audit_chain_state only moves forward'; END "),
    ("audit_event_append_only", " BEGIN RAISE EXCEPTION 'audit_event is append-only'; END "),
]


def _pg_trigger_rows(oid_base: int, **changed: tuple[str, str]) -> list[tuple[object, ...]]:
    """(tgname, oid, tgenabled, pg_get_triggerdef) rows; ``changed``: name -> (tgenabled, definition)."""
    return [(name, oid_base + i, *changed.get(name, ("O", _PG_DEFS[name])))
            for i, name in enumerate(sorted(POSTGRESQL_TRIGGERS))]


def test_postgresql_disabled_or_weakened_triggers_and_functions_are_found() -> None:
    from app.audit.db import pg_guard_problems, schema_fingerprint

    assert sorted(_PG_DEFS) == sorted(POSTGRESQL_TRIGGERS)
    assert pg_guard_problems(_pg_trigger_rows(16_384), _PG_FUNCTIONS) == []
    # ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_delete: same OID, tgenabled 'D'
    disabled = _pg_trigger_rows(16_384, audit_event_no_delete=("D", _PG_DEFS["audit_event_no_delete"]))
    assert pg_guard_problems(disabled, _PG_FUNCTIONS) == ["audit_event_no_delete"]
    replica = _pg_trigger_rows(16_384, audit_event_no_update=("R", _PG_DEFS["audit_event_no_update"]))
    assert pg_guard_problems(replica, _PG_FUNCTIONS) == ["audit_event_no_update"]
    # dropped and re-created WHEN (false), or pointed at a function of the same name in another schema
    never = _PG_DEFS["audit_event_no_update"].replace("FOR EACH ROW", "FOR EACH ROW WHEN (false)")
    elsewhere = _PG_DEFS["audit_event_no_delete"].replace("FUNCTION audit_", "FUNCTION evil.audit_")
    weakened = _pg_trigger_rows(16_384, audit_event_no_update=("O", never), audit_event_no_delete=("O", elsewhere))
    assert pg_guard_problems(weakened, _PG_FUNCTIONS) == ["audit_event_no_update", "audit_event_no_delete"]
    assert pg_guard_problems(_pg_trigger_rows(16_384)[1:], _PG_FUNCTIONS) == ["audit_chain_state_no_delete"]
    # the trigger function's body replaced (CREATE OR REPLACE FUNCTION ... RETURN NEW)
    neutered = [_PG_FUNCTIONS[0], ("audit_event_append_only", " BEGIN RETURN NEW; END ")]
    assert pg_guard_problems(_pg_trigger_rows(16_384), neutered) == ["audit_event_append_only()"]
    # and the fingerprint moves with each of them, though no OID changed
    plain = schema_fingerprint(_FakePgConnection(_pg_trigger_rows(16_384)))  # type: ignore[arg-type]
    for rows, functions in ((disabled, _PG_FUNCTIONS), (_pg_trigger_rows(16_384), neutered)):
        assert schema_fingerprint(_FakePgConnection(rows, functions)) != plain  # type: ignore[arg-type]


def test_postgresql_schema_fingerprint_fits_the_column_with_large_oids() -> None:
    from app.audit.db import fingerprint_kind, schema_fingerprint

    small = schema_fingerprint(_FakePgConnection(_pg_trigger_rows(16_384)))  # type: ignore[arg-type]
    large = schema_fingerprint(_FakePgConnection(_pg_trigger_rows(4_294_967_000)))  # type: ignore[arg-type]
    column = AuditChainState.__table__.c.schema_fingerprint.type.length  # type: ignore[attr-defined]
    assert large.startswith("postgresql:sha256:") and len(large) == len(small) == 18 + 64 <= column
    assert small != large  # still changes when a trigger is re-created (new OID)
    # a list stored before the digest is of another kind: recorded anew at start-up, not reported as a change
    assert fingerprint_kind("postgresql:audit_event_no_update=16385") != fingerprint_kind(large)


def test_verify_and_checkpoints_read_one_snapshot_repeatable_read_on_postgresql(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.audit import anchors, db, integrity

    options: list[dict[str, object]] = []

    class FakeConnection:
        def execution_options(self, **kwargs: object) -> FakeConnection:
            options.append(kwargs)
            return self

        def __enter__(self) -> FakeConnection:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    class FakePgEngine:
        class dialect:
            name = "postgresql"

        def connect(self) -> FakeConnection:
            return FakeConnection()

    with db.snapshot_session(FakePgEngine()) as session:  # type: ignore[arg-type]
        assert isinstance(session.bind, FakeConnection)
    assert options == [{"isolation_level": "REPEATABLE READ"}]

    used: list[str] = []
    real = db.snapshot_session

    def recording(bound: Engine):  # type: ignore[no-untyped-def]
        used.append(bound.dialect.name)
        return real(bound)

    monkeypatch.setattr(integrity, "snapshot_session", recording)
    monkeypatch.setattr(anchors, "snapshot_session", recording)
    _events(2, engine)
    assert audit.verify_chain(engine).ok
    audit.make_checkpoint(engine)
    assert used == ["sqlite", "sqlite"]  # both go through it (SQLite: a plain deferred read transaction)


def test_altered_trigger_is_replaced(engine: Engine, db_path: Path) -> None:
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_delete")
    connection.execute("CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event WHEN 0 "
                       "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END")
    connection.close()
    assert audit.install_triggers(engine) == ["audit_event_no_delete"]
    assert audit.install_triggers(engine) == []


def _legacy_database(db_url: str, events: int) -> None:
    """A database of revision 0001 with ``events`` events hashed by the old (unkeyed) formula."""
    audit.upgrade_database(db_url, "0001_initial")
    engine = audit.make_engine(db_url)
    previous = audit.GENESIS_HASH
    try:
        with engine.begin() as connection:
            for seq in range(1, events + 1):
                event = AuditEvent(seq=seq, id=uuid.uuid4(), ts=T0 + timedelta(seconds=seq), username="old",
                                   action="view", outcome="success", event_id_code="110103", event_action_code="R",
                                   detail={"i": seq}, prev_hash=previous, hash="")
                event.hash = _plain_sha256(event, previous)
                connection.execute(
                    text("INSERT INTO audit_event (seq, id, ts, username, action, outcome, event_id_code, "
                         "event_action_code, detail, prev_hash, hash) VALUES (:seq, :id, :ts, 'old', 'view', "
                         "'success', '110103', 'R', :detail, :prev, :hash)"),
                    {"seq": seq, "id": event.id.hex, "ts": event.ts.replace(tzinfo=None).isoformat(sep=" "),
                     "detail": json.dumps(event.detail), "prev": previous, "hash": event.hash})
                previous = event.hash
    finally:
        engine.dispose()


def test_existing_unkeyed_chain_keeps_verifying_and_is_keyed_from_a_switch_over(db_url: str, db_path: Path) -> None:
    _legacy_database(db_url, 6)
    engine = audit.init_db(db_url)  # migration 0002, then the keyed switch-over event
    try:
        [switch] = audit.query_events(engine, action=AuditAction.AUDIT_CHAIN_KEYED)
        assert switch.seq == 7 and switch.key_id is not None
        assert switch.detail["legacy_until"] == 6 and switch.detail["key_id"] == switch.key_id
        _events(3, engine)
        result = audit.verify_chain(engine)
        assert result.ok and result.events_checked == 10, result.reason
        assert [e.key_id is None for e in reversed(audit.query_events(engine))] == [True] * 6 + [False] * 4

        # the old events are still only SHA-256: rewriting one and re-hashing the unkeyed part breaks at the
        # keyed switch-over, which pins the last unkeyed hash
        with audit.read_session(engine) as session:
            legacy = list(session.exec(select(AuditEvent).where(AuditEvent.seq <= 6).order_by(AuditEvent.seq)).all())
        connection = _raw(db_path)
        _drop_triggers(connection)
        previous = audit.GENESIS_HASH
        for row in legacy:
            if row.seq == 3:
                row.detail = {"i": 999}
            digest = _plain_sha256(row, previous)
            connection.execute("UPDATE audit_event SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                               (json.dumps(row.detail), previous, digest, row.seq))
            previous = digest
        connection.close()
        result = audit.verify_chain(engine)
        assert (result.ok, result.first_bad_seq) == (False, 7) and "prev_hash" in result.reason
    finally:
        engine.dispose()


def test_tail_deleted_before_the_upgrade_shows_as_a_gap(db_url: str, db_path: Path) -> None:
    _legacy_database(db_url, 6)
    connection = _raw(db_path)
    connection.execute("DROP TRIGGER audit_event_no_delete")
    connection.execute("DELETE FROM audit_event WHERE seq > 4")  # sqlite_sequence still remembers 6
    connection.close()
    engine = audit.init_db(db_url)
    try:
        [switch] = audit.query_events(engine, action=AuditAction.AUDIT_CHAIN_KEYED)
        assert switch.seq == 7
        result = audit.verify_chain(engine)
        assert (result.ok, result.first_bad_seq) == (False, 7) and "5..6 missing" in result.reason
    finally:
        engine.dispose()


def test_key_rotation_is_recorded_and_old_events_verify_with_the_ring(engine: Engine, db_url: str,
                                                                      db_path: Path) -> None:
    _events(2, engine)
    old = audit.keys_for(engine)
    key_file = db_path.parent / "secrets" / "audit-hmac.key"
    ring = audit.rotate_audit_key(key_file)
    assert list(ring.keys) == [old.current_id, ring.current_id] and oct(key_file.stat().st_mode & 0o777) == oct(0o600)
    rotated = audit.init_db(db_url, keys=ring)
    try:
        [event] = audit.query_events(rotated, action=AuditAction.AUDIT_KEY_ROTATED)
        assert (event.key_id, event.detail) == (ring.current_id, {"key_id": ring.current_id,
                                                                 "previous_key_id": old.current_id})
        _events(2, rotated)
        assert audit.verify_chain(rotated).ok
        only_new = audit.AuditKeyRing.from_keys([ring.current])
        result = audit.verify_chain(rotated, keys=only_new)
        assert (result.ok, result.first_bad_seq) == (False, 1) and old.current_id in result.reason
    finally:
        rotated.dispose()
    with pytest.raises(audit.AuditKeyError, match="not in the key ring"):
        audit.init_db(db_url, keys=audit.AuditKeyRing.from_keys([bytes(range(32))]))


def test_key_ring_from_the_environment_and_bad_key_files(tmp_path: Path) -> None:
    keys = [bytes(range(32)), bytes(range(1, 33))]
    ring = audit.audit_keys_from_env(",".join(k.hex() for k in keys))
    assert ring.current == keys[1] and ring.path is None and len(ring.keys) == 2
    with pytest.raises(audit.AuditKeyError, match="entry 1 is not 64 hex digits"):
        audit.audit_keys_from_env("not-a-key")
    path = tmp_path / "secrets" / "audit-hmac.key"
    with pytest.raises(audit.AuditKeyError, match="no audit key file"):
        audit.load_audit_keys(path, create=False)
    first = audit.load_audit_keys(path)
    assert audit.load_audit_keys(path) == first
    path.chmod(0o640)
    with pytest.raises(audit.InsecureSecretFileError, match="chmod 600"):
        audit.load_audit_keys(path)
    with pytest.raises(audit.AuditKeyError, match="keys="):
        audit.init_db("sqlite://")  # no file beside an in-memory database: the caller must pass the ring


def test_checkpoints_are_signed_appended_and_checked(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "anchors.jsonl"
    ring = audit.keys_for(engine)
    _events(3, engine)
    first = audit.write_checkpoint(engine, path)
    _events(2, engine)
    second = audit.write_checkpoint(engine, path)
    assert (first.seq, second.seq) == (3, 5) and oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert [c.seq for c in audit.read_checkpoints(path, ring)] == [3, 5]
    assert audit.verify_chain(engine, anchors=[c.head for c in audit.read_checkpoints(path, ring)]).ok

    lines = path.read_text().splitlines()
    forged = json.loads(lines[1]) | {"seq": 4}
    path.write_text(lines[0] + "\n" + json.dumps(forged) + "\n")
    with pytest.raises(audit.AnchorFileError, match="line 2: its MAC does not match"):
        audit.read_checkpoints(path, ring)
    path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(audit.AnchorFileError, match="line 2: not a checkpoint"):
        audit.read_checkpoints(path, ring)
    with pytest.raises(audit.AnchorFileError, match="no checkpoint file"):
        audit.read_checkpoints(tmp_path / "missing.jsonl", ring)
    path.chmod(0o666)
    with pytest.raises(audit.AnchorFileError, match="others may rewrite it"):
        audit.write_checkpoint(engine, path)
    # a checkpointed event that changed (here: a seq re-used after a rewind) is named
    moved = audit.ChainHead(3, "ab" * 32)
    result = audit.verify_chain(engine, anchors=[moved])
    assert (result.ok, result.first_bad_seq) == (False, 3) and "differs from the checkpoint" in result.reason


_WRITER = """
import sys
from app.audit import make_engine, append_event
engine = make_engine(sys.argv[1])
i = 0
while True:
    append_event(engine, "view", username="writer", detail={"i": i, "pad": "x" * 2000})
    i += 1
    print(i, flush=True)
"""


def test_kill_9_mid_write_leaves_a_consistent_database(engine: Engine, db_url: str, db_path: Path) -> None:
    _events(3, engine)
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, db_url],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    committed = 0
    watchdog = threading.Timer(60, process.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        for line in process.stdout:
            committed = int(line)
            if committed >= 40:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        watchdog.cancel()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert committed >= 40

    result = audit.verify_chain(engine)
    assert result.ok, result.reason
    assert result.events_checked >= 3 + committed  # every acknowledged commit survived
    connection = _raw(db_path)
    assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    connection.close()
    audit.append_event(engine, AuditAction.APP_START)  # the chain continues after the crash
    assert audit.verify_chain(engine).ok


# --- query and export --------------------------------------------------------------------------------------


def test_query_count_and_export(engine: Engine) -> None:
    alice = _user(engine, "alice")
    audit.append_event(engine, AuditAction.LOGIN_OK, user=alice, now=T0)
    audit.append_event(
        engine, AuditAction.VIEW, user=alice, object_type="run", object_id="r1", now=T0 + timedelta(hours=1)
    )
    audit.append_event(
        engine,
        AuditAction.LOGIN_FAILED,
        username="=HYPERLINK(1)",
        outcome=Outcome.MINOR_FAILURE,
        now=T0 + timedelta(hours=2),
    )

    newest_first = audit.query_events(engine)
    assert [e.action for e in newest_first][:3] == ["login_failed", "view", "login_ok"]
    assert [e.action for e in audit.query_events(engine, user="alice")] == ["view", "login_ok"]
    assert [e.object_id for e in audit.query_events(engine, action="view")] == ["r1"]
    window = audit.query_events(engine, since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=2))
    assert [e.action for e in window] == ["view"]
    assert len(audit.query_events(engine, limit=1, offset=1)) == 1
    assert audit.count_events(engine, user_id=alice.id) == 2
    with pytest.raises(ValueError, match="limit"):
        audit.query_events(engine, limit=0)

    records = json.loads("".join(audit.export_events(engine, "json")))
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["event_id_code"] == "110114" and records[0]["event_type_code"] == "110122"
    assert records[2]["event_outcome_indicator"] == 4
    assert records[1]["prev_hash"] == records[0]["hash"]
    assert json.loads("".join(audit.export_events(engine, "json", action="cancel"))) == []

    rows = list(csv.DictReader(io.StringIO("".join(audit.export_events(engine, "csv")))))
    assert list(rows[0]) == list(audit.EXPORT_COLUMNS)
    assert rows[2]["username"] == "'=HYPERLINK(1)"  # neutralized for spreadsheets
    assert rows[1]["ts"] == "2025-03-01T10:00:00.000000+00:00"
    with pytest.raises(ValueError, match="xml"):
        audit.export_events(engine, "xml")  # type: ignore[arg-type]


def test_one_event_filter_serves_query_count_and_export(engine: Engine) -> None:
    alice = _user(engine, "alice")
    audit.append_event(engine, AuditAction.LOGIN_OK, user=alice, now=T0)
    audit.append_event(engine, AuditAction.VIEW, user=alice, object_id="r1", now=T0 + timedelta(hours=1))
    audit.append_event(engine, AuditAction.VIEW, username="bob", object_id="r2", now=T0 + timedelta(hours=2))

    where = audit.EventFilter(action="view", until=T0 + timedelta(hours=2))
    assert [e.object_id for e in audit.query_events(engine, where)] == ["r1"]
    assert audit.count_events(engine, where) == 1
    assert [r["object_id"] for r in json.loads("".join(audit.export_events(engine, "json", where)))] == ["r1"]
    # the keyword shorthand builds the same filter
    assert audit.query_events(engine, where) == audit.query_events(engine, action="view", until=T0 + timedelta(hours=2))
    assert audit.count_events(engine, audit.EventFilter()) == audit.count_events(engine) == 3
    with pytest.raises(TypeError, match="not both"):
        audit.query_events(engine, where, user="alice")
    with pytest.raises(TypeError, match="usr"):
        audit.count_events(engine, usr="alice")


def test_event_filter_normalises_and_refuses_bad_values() -> None:
    run_id = uuid.uuid4()
    where = audit.EventFilter(action="view", outcome="minor_failure", object_id=run_id)
    assert where.action is AuditAction.VIEW and where.outcome is Outcome.MINOR_FAILURE
    assert where.object_id == str(run_id)
    assert where == audit.EventFilter(action=AuditAction.VIEW, outcome=Outcome.MINOR_FAILURE, object_id=str(run_id))
    with pytest.raises(ValueError, match="unknown audit action 'teleport'"):
        audit.EventFilter(action="teleport")
    with pytest.raises(ValueError, match=r"unknown audit outcome 'meh'.*'success'"):
        audit.EventFilter(outcome="meh")
    with pytest.raises(ValueError, match=r"since=.*naive"):
        audit.EventFilter(since=datetime(2025, 1, 1))


def test_event_filter_builds_one_condition_per_field_set() -> None:
    def sql(where: audit.EventFilter) -> str:
        statement = where.apply(select(AuditEvent))
        return str(statement.compile(compile_kwargs={"literal_binds": True})).replace("\n", " ")

    assert audit.EventFilter().conditions() == []
    assert "WHERE" not in sql(audit.EventFilter())
    where = audit.EventFilter(user="alice", action=AuditAction.LOGIN_FAILED, object_id="r1",
                              since=T0, until=T0 + timedelta(days=1))
    assert len(where.conditions()) == 5
    text_sql = sql(where)
    for expected in ("audit_event.username = 'alice'", "audit_event.action = 'login_failed'",
                     "audit_event.object_id = 'r1'", "audit_event.ts >= ", "audit_event.ts < "):
        assert expected in text_sql
    assert " AND " in text_sql and "outcome" not in text_sql.split("WHERE", 1)[1]


@pytest.mark.parametrize(
    "detail",
    [
        {"patient_name": "DOE^JANE"},
        {"nested": {"PatientID": "123"}},
        {"StudyInstanceUID": "1.2.3"},
        {"note": STUDY_UID},
        {"items": [{"accession_number": "A1"}]},
        {"password": "hunter2hunter2"},
        {"x": float("nan")},
        {"when": datetime(2025, 1, 1, tzinfo=UTC)},
    ],
)
def test_event_detail_refuses_patient_data_and_credentials(engine: Engine, detail: dict[str, object]) -> None:
    with pytest.raises(AuditDetailError):
        audit.append_event(engine, AuditAction.VIEW, detail=detail)
    assert audit.count_events(engine) == 0


def test_unknown_action_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown audit action 'teleport'"):
        audit.append_event(engine, "teleport")


def test_every_action_has_a_dicom_mapping() -> None:
    assert set(audit.DICOM_EVENT_CODES) == set(AuditAction)
    for action, codes in audit.DICOM_EVENT_CODES.items():
        assert (codes.event_id is None) == (codes.event_id_meaning is None), action
        assert (codes.event_type is None) == (codes.event_type_meaning is None), action
        assert codes.event_id is None or codes.event_id.startswith("110"), action
    assert audit.DICOM_EVENT_CODES[AuditAction.UPLOAD].event_id == "110107"
    assert audit.DICOM_EVENT_CODES[AuditAction.EXPORT].event_id == "110106"
    assert audit.DICOM_EVENT_CODES[AuditAction.LOGOUT].event_type == "110123"


# --- runs, inputs, exports ---------------------------------------------------------------------------------


def _input(engine: Engine, user: User, **kwargs: object) -> audit.InputImage:
    arguments: dict[str, object] = {
        "user": user,
        "upload_sha256": SHA,
        "pixel_sha256": "cd" * 32,
        "rows": 2048,
        "cols": 2500,
        "source_format": "dicom",
        "uid_secret": SECRET,
        "modality": "CR",
        "study_instance_uid": STUDY_UID,
        "series_instance_uid": STUDY_UID + ".2",
        "sop_instance_uid": STUDY_UID + ".3\x00",
    }
    arguments.update(kwargs)
    return audit.record_input(engine, **arguments)  # type: ignore[arg-type]


def _run(engine: Engine, user: User, input_id: uuid.UUID) -> audit.Run:
    return audit.create_run(
        engine,
        user=user,
        input_id=input_id,
        params={"prompt": "normal chest x-ray", "strength": 0.6, "guidance_scale": 7.5, "steps": 50},
        seeds=[1, 2, 3],
        model_sha256=SHA,
        library_versions={"torch": "2.5.1", "diffusers": "0.32.0"},
    )


def test_mark_interrupted_runs(engine: Engine) -> None:
    alice = _user(engine)
    image = _input(engine, alice)
    queued, running, done = (_run(engine, alice, image.id) for _ in range(3))
    audit.start_run(engine, running.id)
    audit.start_run(engine, done.id)
    audit.finish_run(engine, done.id, RunStatus.DONE, effective_steps=30, artifact_hashes={"cf.png": SHA})

    assert audit.mark_interrupted_runs(engine, now=T0) == 2
    for run in (queued, running):
        stored = audit.get_run(engine, run.id)
        assert stored is not None
        assert stored.status == RunStatus.INTERRUPTED
        assert stored.reason == audit.INTERRUPTED_REASON
        assert stored.finished_at == T0
    stored_done = audit.get_run(engine, done.id)
    assert stored_done is not None and stored_done.status == RunStatus.DONE
    events = audit.query_events(engine, action=AuditAction.JOB_INTERRUPTED)
    assert {e.object_id for e in events} == {str(queued.id), str(running.id)}
    assert {e.detail["previous_status"] for e in events} == {"queued", "running"}
    assert all(e.username == audit.SYSTEM_USERNAME for e in events)
    assert audit.mark_interrupted_runs(engine) == 0  # idempotent
    assert audit.verify_chain(engine).ok


def test_run_record_is_reproducible_and_transitions_are_checked(engine: Engine) -> None:
    alice = _user(engine)
    image = _input(engine, alice)
    run = _run(engine, alice, image.id)
    with pytest.raises(audit.InvalidRunTransitionError, match="'queued'; it cannot become 'done'"):
        audit.finish_run(engine, run.id, RunStatus.DONE)
    audit.start_run(engine, run.id)
    audit.finish_run(
        engine,
        run.id,
        "done",
        effective_steps=30,
        timings={"generate": 12.5},
        artifact_hashes={"counterfactual.png": SHA},
    )
    with pytest.raises(audit.InvalidRunTransitionError):
        audit.start_run(engine, run.id)
    stored = audit.get_run(engine, run.id)
    assert stored is not None
    assert stored.params["strength"] == 0.6 and stored.seeds == [1, 2, 3]
    assert stored.library_versions == {"torch": "2.5.1", "diffusers": "0.32.0"}
    assert stored.timings == {"generate": 12.5} and stored.effective_steps == 30
    assert stored.created_at.tzinfo is not None and stored.finished_at is not None

    export = audit.record_export(engine, run_id=run.id, kind="png", sha256=SHA, user=alice)
    assert [e.action for e in audit.query_events(engine)] == ["export", "run_done", "generate", "upload"]
    assert audit.query_events(engine, action="export")[0].object_id == str(export.id)
    with pytest.raises(ValueError, match="not a SHA-256"):
        audit.record_export(engine, run_id=run.id, kind="png", sha256="nope", user=alice)

    cancelled = _run(engine, alice, image.id)
    admin = _user(engine, "root", Role.ADMIN)
    audit.finish_run(engine, cancelled.id, RunStatus.CANCELLED, reason="user cancelled", actor=admin)
    [cancel] = audit.query_events(engine, action="cancel")
    assert (cancel.username, cancel.object_id) == ("root", str(cancelled.id))


def test_hmac_uids_never_equal_plain_uids(engine: Engine, db_path: Path) -> None:
    digest = audit.hmac_uid(SECRET, STUDY_UID)
    assert digest != STUDY_UID and len(digest) == 64
    assert digest == audit.hmac_uid(SECRET, STUDY_UID + "\x00")  # DICOM padding does not matter
    assert digest != audit.hmac_uid(bytes(32), STUDY_UID)  # keyed
    with pytest.raises(ValueError, match="too short"):
        audit.hmac_uid(b"short", STUDY_UID)

    alice = _user(engine)
    image = _input(engine, alice)
    assert image.study_uid_hmac == digest
    assert image.sop_uid_hmac == audit.hmac_uid(SECRET, STUDY_UID + ".3")
    assert {image.study_uid_hmac, image.series_uid_hmac, image.sop_uid_hmac}.isdisjoint(
        {STUDY_UID, STUDY_UID + ".2", STUDY_UID + ".3"}
    )
    assert image.study_instance_uid is None and image.sop_instance_uid is None
    assert STUDY_UID.encode() not in _stored_bytes(db_path)  # nowhere in the database or its WAL

    opted_in = _input(engine, alice, store_plain_uids=True)
    assert opted_in.study_instance_uid == STUDY_UID and opted_in.sop_instance_uid == STUDY_UID + ".3"
    assert opted_in.study_uid_hmac == digest


def test_load_or_create_secret(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "uid.key"
    secret = audit.load_or_create_secret(path)
    assert len(secret) == 32
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert audit.load_or_create_secret(path) == secret
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    path.chmod(0o644)
    with pytest.raises(audit.InsecureSecretFileError, match="chmod 600"):
        audit.load_or_create_secret(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(audit.InsecureSecretFileError, match="expected 32"):
        audit.load_or_create_secret(path)


# --- accounts ----------------------------------------------------------------------------------------------


def test_password_hashing() -> None:
    first, second = audit.hash_password(PASSWORD), audit.hash_password(PASSWORD)
    assert first.startswith("$argon2id$") and PASSWORD not in first
    assert first != second  # salted
    assert audit.verify_password(PASSWORD, first)
    assert not audit.verify_password(PASSWORD + "!", first)
    assert not audit.verify_password(PASSWORD, "not-a-hash")


def test_no_default_account_and_password_policy(engine: Engine) -> None:
    for weak, rule in [("short", "too short"), ("aaaaaaaaaaaaaaaa", "4 different"), ("dr.house.md.x", "differ")]:
        with pytest.raises(audit.WeakPasswordError, match=rule):
            audit.create_user(engine, "dr.house.md.x", weak)
    with pytest.raises(audit.InvalidUsernameError, match="'bad name'"):
        audit.create_user(engine, "bad name", PASSWORD)
    assert audit.list_users(engine) == []
    assert audit.count_events(engine) == 0


def test_lockout_after_repeated_failures(engine: Engine) -> None:
    admin = _user(engine, "root", Role.ADMIN)
    user = audit.create_user(engine, "Carol", PASSWORD, actor=admin, now=T0)
    assert user.username == "carol" and user.role == "clinician"
    with pytest.raises(audit.UserExistsError):
        audit.create_user(engine, "carol", PASSWORD)

    for attempt in range(5):
        assert audit.authenticate(engine, "carol", "wrong password!", now=T0 + timedelta(seconds=attempt)) is None
    locked = audit.get_user(engine, username="carol")
    assert locked is not None and locked.locked_until == T0 + timedelta(seconds=4, minutes=15)
    # the right password does not help while locked
    assert audit.authenticate(engine, "carol", PASSWORD, now=T0 + timedelta(minutes=5)) is None
    signed_in = audit.authenticate(engine, "CAROL ", PASSWORD, now=T0 + timedelta(minutes=20))
    assert signed_in is not None and signed_in.id == user.id and signed_in.failed_logins == 0

    actions = [e.action for e in reversed(audit.query_events(engine, user="carol"))]
    assert actions == ["login_failed"] * 5 + ["lockout", "login_failed", "login_ok"]
    reasons = [e.detail.get("reason") for e in audit.query_events(engine, action="login_failed")]
    assert reasons[0] == "locked"
    assert audit.query_events(engine, action="user_add")[0].username == "root"
    assert audit.verify_chain(engine).ok


def test_unknown_and_disabled_users_cannot_log_in(engine: Engine) -> None:
    assert audit.authenticate(engine, "nobody", PASSWORD) is None
    [failed] = audit.query_events(engine, action="login_failed")
    assert (failed.username, failed.user_id, failed.detail) == ("nobody", None, {"reason": "unknown_user"})

    dave = audit.create_user(engine, "dave", PASSWORD)
    token = audit.create_session(engine, dave)
    audit.disable_user(engine, dave.id)
    assert audit.authenticate(engine, "dave", PASSWORD) is None
    assert audit.get_session_user(engine, token) is None
    assert audit.query_events(engine, action="login_failed")[0].detail == {"reason": "disabled"}
    assert audit.query_events(engine, action="user_disable")[0].detail["sessions_revoked"] == 1


def test_last_admin_cannot_be_disabled(engine: Engine) -> None:
    root = _user(engine, "root", Role.ADMIN)
    with pytest.raises(audit.LastAdminError, match="'root'"):
        audit.disable_user(engine, root.id)
    second = _user(engine, "root2", Role.ADMIN)
    audit.disable_user(engine, root.id, actor=second)
    with pytest.raises(audit.UserNotFoundError):
        audit.disable_user(engine, uuid.uuid4())
    assert [u.username for u in audit.list_users(engine, include_disabled=False)] == ["root2"]


def test_session_idle_timeout_and_logout(engine: Engine) -> None:
    erin = _user(engine, "erin")
    token = audit.create_session(engine, erin, idle_timeout=timedelta(minutes=30), lifetime=timedelta(hours=8), now=T0)
    # active use keeps it alive well past one idle timeout...
    for minutes in (20, 45, 70):
        user = audit.get_session_user(engine, token, now=T0 + timedelta(minutes=minutes))
        assert user is not None and user.id == erin.id
    # ...31 idle minutes end it, for good
    assert audit.get_session_user(engine, token, now=T0 + timedelta(minutes=101)) is None
    assert audit.get_session_user(engine, token, now=T0 + timedelta(minutes=102)) is None

    token = audit.create_session(engine, erin, lifetime=timedelta(hours=1), now=T0)
    for minutes in (20, 40):
        assert audit.get_session_user(engine, token, now=T0 + timedelta(minutes=minutes)) is not None
    assert audit.get_session_user(engine, token, now=T0 + timedelta(minutes=60)) is None  # absolute lifetime

    token = audit.create_session(engine, erin)
    assert audit.revoke_session(engine, token) is True
    assert audit.revoke_session(engine, token) is False
    assert audit.get_session_user(engine, token) is None
    assert audit.get_session_user(engine, "forged-token") is None
    assert [e.action for e in audit.query_events(engine, user="erin")] == ["logout"]


def test_tokens_are_stored_only_as_sha256(engine: Engine, db_path: Path) -> None:
    frank = _user(engine, "frank")
    session_token = audit.create_session(engine, frank)
    api_token = audit.create_api_token(engine, frank, "nightly batch")
    assert api_token.startswith("vmd_")
    with audit.read_session(engine) as session:
        [stored] = session.exec(select(UserSession)).all()
    assert stored.token_hash == hashlib.sha256(session_token.encode()).hexdigest()
    content = _stored_bytes(db_path)
    assert session_token.encode() not in content and api_token.encode() not in content

    user = audit.get_token_user(engine, api_token)
    assert user is not None and user.id == frank.id
    assert audit.get_token_user(engine, "vmd_forged") is None
    [listed] = audit.list_api_tokens(engine, frank.id)
    assert listed.name == "nightly batch" and listed.last_used_at is not None
    audit.revoke_api_token(engine, listed.id, actor=frank)
    assert audit.get_token_user(engine, api_token) is None
    assert [e.action for e in audit.query_events(engine, user="frank")] == ["token_revoke", "token_create"]


def test_reset_password_revokes_sessions_and_clears_lockout(engine: Engine) -> None:
    admin = _user(engine, "root", Role.ADMIN)
    grace = _user(engine, "grace")
    token = audit.create_session(engine, grace)
    new_password = "a much better passphrase"
    audit.reset_password(engine, grace.id, new_password, actor=admin)
    assert audit.get_session_user(engine, token) is None
    assert audit.authenticate(engine, "grace", new_password) is not None
    [reset] = audit.query_events(engine, action="password_reset")
    assert reset.username == "root" and new_password not in json.dumps(reset.detail)


def test_reset_and_disable_revoke_api_tokens_and_enable_does_not_revive_them(engine: Engine) -> None:
    admin = _user(engine, "root", Role.ADMIN)
    heidi = _user(engine, "heidi")
    first, second = (audit.create_api_token(engine, heidi, name) for name in ("batch", "cron"))
    audit.reset_password(engine, heidi.id, "a much better passphrase", actor=admin)
    assert audit.get_token_user(engine, first) is None and audit.get_token_user(engine, second) is None
    assert audit.query_events(engine, action="password_reset")[0].detail["tokens_revoked"] == 2

    third = audit.create_api_token(engine, heidi, "after reset")
    assert audit.get_token_user(engine, third) is not None
    audit.disable_user(engine, heidi.id, actor=admin)
    assert audit.query_events(engine, action="user_disable")[0].detail["tokens_revoked"] == 1
    audit.enable_user(engine, heidi.id, actor=admin)
    assert all(audit.get_token_user(engine, t) is None for t in (first, second, third))
    assert all(t.revoked and t.revoked_at is not None for t in audit.list_api_tokens(engine, heidi.id))
    assert audit.verify_chain(engine).ok


def test_api_tokens_expire(engine: Engine) -> None:
    ivan = _user(engine, "ivan")
    default = audit.create_api_token(engine, ivan, "default", now=T0)
    short = audit.create_api_token(engine, ivan, "short", lifetime=timedelta(days=1), now=T0)
    by_name = {t.name: t for t in audit.list_api_tokens(engine, ivan.id)}
    assert by_name["default"].expires_at == T0 + timedelta(days=90) == T0 + audit.DEFAULT_API_TOKEN_LIFETIME
    assert by_name["short"].expires_at == T0 + timedelta(days=1)
    assert audit.get_token_user(engine, short, now=T0 + timedelta(hours=23)) is not None
    assert audit.get_token_user(engine, short, now=T0 + timedelta(days=1)) is None
    assert audit.get_token_user(engine, default, now=T0 + timedelta(days=89)) is not None
    assert audit.get_token_user(engine, default, now=T0 + timedelta(days=90)) is None
    with pytest.raises(ValueError, match="1 to 3650 days"):
        audit.create_api_token(engine, ivan, "forever", lifetime=timedelta(days=4000))
    [created] = [e for e in audit.query_events(engine, action="token_create") if e.detail["name"] == "short"]
    assert created.detail["expires"] == (T0 + timedelta(days=1)).isoformat()


def test_find_and_revoke_one_api_token(engine: Engine) -> None:
    judy, mallory = _user(engine, "judy"), _user(engine, "mallory")
    audit.create_api_token(engine, judy, "batch")
    keep = audit.create_api_token(engine, judy, "cron")
    [cron, batch] = audit.list_api_tokens(engine, judy.id)
    assert audit.find_api_token(engine, judy.id, "batch").id == batch.id
    assert audit.find_api_token(engine, judy.id, batch.id.hex[:8]).id == batch.id
    assert audit.find_api_token(engine, judy.id, str(batch.id)).id == batch.id
    with pytest.raises(audit.TokenNotFoundError, match="no API token 'nightly'"):
        audit.find_api_token(engine, judy.id, "nightly")
    with pytest.raises(audit.TokenNotFoundError):
        audit.find_api_token(engine, mallory.id, "batch")  # someone else's
    with pytest.raises(audit.TokenNotFoundError):
        audit.revoke_api_token(engine, batch.id, owner_id=mallory.id)
    admin = _user(engine, "root", Role.ADMIN)
    audit.revoke_api_token(engine, batch.id, actor=admin, owner_id=judy.id)
    audit.revoke_api_token(engine, batch.id, actor=admin)  # idempotent: recorded once
    [event] = audit.query_events(engine, action="token_revoke")
    assert (event.username, event.object_id, event.detail) == ("root", str(batch.id),
                                                               {"name": "batch", "owner": "judy"})
    assert audit.get_token_user(engine, keep) is not None and cron.id != batch.id
    assert [t.id for t in audit.list_api_tokens(engine)] == [cron.id, batch.id]  # every user's


def test_upgrade_gives_old_tokens_an_expiry_and_revokes_those_of_disabled_accounts(db_url: str) -> None:
    audit.upgrade_database(db_url, "0001_initial")
    raw = audit.make_engine(db_url)
    try:
        with raw.begin() as connection:
            for name, disabled in (("kim", 0), ("lee", 1)):
                user_id = uuid.uuid4().hex
                connection.execute(text("INSERT INTO app_user (id, username, password_hash, role, disabled, "
                                        "created_at, failed_logins) VALUES (:id, :name, '!', 'clinician', :d, :t, 0)"),
                                   {"id": user_id, "name": name, "d": disabled, "t": "2025-03-01 09:00:00.000000"})
                connection.execute(text("INSERT INTO api_token (id, token_hash, user_id, name, created_at, revoked) "
                                        "VALUES (:id, :h, :u, 'old', :t, 0)"),
                                   {"id": uuid.uuid4().hex, "h": name * 10, "u": user_id,
                                    "t": "2025-03-01 09:00:00.000000"})
    finally:
        raw.dispose()
    engine = audit.init_db(db_url)
    try:
        tokens = {audit.get_user(engine, user_id=t.user_id).username: t for t in audit.list_api_tokens(engine)}
        assert tokens["kim"].expires_at == T0 + timedelta(days=90) and not tokens["kim"].revoked
        assert tokens["lee"].revoked and tokens["lee"].revoked_at is not None
        assert audit.verify_chain(engine).ok
    finally:
        engine.dispose()


# --- PostgreSQL (opt-in) -----------------------------------------------------------------------------------


def test_postgresql_chain_triggers_and_concurrency(postgres_url: str) -> None:
    url = postgres_url  # a throw-away server (tests/postgres.py), or VALD_TEST_POSTGRES_URL
    engine = audit.init_db(url, keys=audit.AuditKeyRing.from_keys([os.urandom(32)]))  # PostgreSQL needs a ring
    try:
        start = audit.count_events(engine)
        errors: list[BaseException] = []

        def write(index: int) -> None:
            own = audit.make_engine(url)
            try:
                for i in range(25):
                    audit.append_event(own, AuditAction.VIEW, username=f"pg{index}", detail={"i": i})
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                own.dispose()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        result = audit.verify_chain(engine)
        assert result.ok, result.reason
        assert result.events_checked == start + 100
        for statement in ("UPDATE audit_event SET username = 'x'", "DELETE FROM audit_event", "TRUNCATE audit_event"):
            with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
        assert audit.install_triggers(engine) == []
        # disabled, weakened (WHEN (false)) or neutered guards are found and replaced, and move the fingerprint
        weakened = POSTGRESQL_TRIGGERS["audit_event_no_delete"].replace("FOR EACH ROW", "FOR EACH ROW WHEN (false)")
        for statements, expected in (
            (["ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update"], ["audit_event_no_update"]),
            (["DROP TRIGGER audit_event_no_delete ON audit_event", weakened], ["audit_event_no_delete"]),
            ([POSTGRESQL_TRIGGER_FUNCTION.replace("RAISE EXCEPTION 'audit_event is append-only'", "RETURN NEW")],
             ["audit_event_append_only()"]),
        ):
            with engine.connect() as connection:
                before = audit.schema_fingerprint(connection)
            with engine.begin() as connection:
                for statement in statements:
                    connection.execute(text(statement))
            with engine.connect() as connection:
                assert audit.schema_fingerprint(connection) != before
            assert audit.install_triggers(engine) == expected
            assert audit.install_triggers(engine) == []
        with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
            connection.execute(text("DELETE FROM audit_event"))
    finally:
        engine.dispose()
