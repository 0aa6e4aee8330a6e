"""Engines, transactions, migrations and the append-only triggers (a leaf: of app.audit it imports only errors).

SQLite (default) and PostgreSQL are supported. On SQLite every connection runs in WAL mode with a 10 s busy
timeout, ``synchronous=FULL`` (a committed audit event survives a power cut) and foreign keys on; pysqlite's own
transaction handling is switched off and every transaction starts with ``BEGIN IMMEDIATE``, so a writer takes
the write lock before it reads the chain head -- concurrent writers queue instead of forking the chain or
failing on a lock upgrade. Read-only work (``read_session``) starts with a plain deferred ``BEGIN`` and never
blocks writers. On PostgreSQL, ``write_session`` takes a transaction-scoped advisory lock first, which
serializes writers the same way.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from app.audit.errors import UnsupportedDatabaseError

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for the write lock before failing with "database is locked" (ms)."""

PG_WRITE_LOCK_KEY = 0x56414C44  # "VALD"; one key: all writers of this schema are serialized
"""Key of the PostgreSQL transaction-scoped advisory lock held by every write transaction."""

READ_BATCH_ROWS = 500
"""Rows read per short read transaction when walking the whole chain (verify, export)."""

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
"""The Alembic script directory (``env.py`` and ``versions/``)."""

_BEGIN_OPTION = "vald_sqlite_begin"

# Frozen copies of these statements live in the migrations (0001: audit_event, 0002: audit_chain_state);
# install_triggers() re-creates any that are missing or altered (e.g. dropped by hand) at start-up, keyed by name.
SQLITE_TRIGGERS: dict[str, str] = {
    "audit_event_no_update": (
        "CREATE TRIGGER IF NOT EXISTS audit_event_no_update BEFORE UPDATE ON audit_event "
        "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END"
    ),
    "audit_event_no_delete": (
        "CREATE TRIGGER IF NOT EXISTS audit_event_no_delete BEFORE DELETE ON audit_event "
        "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END"
    ),
    "audit_chain_state_no_delete": (
        "CREATE TRIGGER IF NOT EXISTS audit_chain_state_no_delete BEFORE DELETE ON audit_chain_state "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_state only moves forward'); END"
    ),
    "audit_chain_state_no_rewind": (
        "CREATE TRIGGER IF NOT EXISTS audit_chain_state_no_rewind BEFORE UPDATE ON audit_chain_state "
        "WHEN NEW.last_seq < OLD.last_seq OR NEW.legacy_until <> OLD.legacy_until OR NEW.id <> OLD.id "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_state only moves forward'); END"
    ),
}
POSTGRESQL_TRIGGER_FUNCTION = (
    "CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_event is append-only'; END $$"
)
POSTGRESQL_STATE_FUNCTION = (
    "CREATE OR REPLACE FUNCTION audit_chain_state_guard() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_chain_state only moves forward'; END $$"
)
POSTGRESQL_TRIGGERS: dict[str, str] = {
    "audit_event_no_update": (
        "CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event "
        "FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()"
    ),
    "audit_event_no_delete": (
        "CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event "
        "FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()"
    ),
    "audit_event_no_truncate": (
        "CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()"
    ),
    "audit_chain_state_no_delete": (
        "CREATE TRIGGER audit_chain_state_no_delete BEFORE DELETE ON audit_chain_state "
        "FOR EACH ROW EXECUTE FUNCTION audit_chain_state_guard()"
    ),
    "audit_chain_state_no_truncate": (
        "CREATE TRIGGER audit_chain_state_no_truncate BEFORE TRUNCATE ON audit_chain_state "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_state_guard()"
    ),
    "audit_chain_state_no_rewind": (
        "CREATE TRIGGER audit_chain_state_no_rewind BEFORE UPDATE ON audit_chain_state FOR EACH ROW "
        "WHEN (NEW.last_seq < OLD.last_seq OR NEW.legacy_until <> OLD.legacy_until OR NEW.id <> OLD.id) "
        "EXECUTE FUNCTION audit_chain_state_guard()"
    ),
}
_GUARDED_TABLES = ("audit_event", "audit_chain_state")
_PG_TRIGGER_TABLE = {name: name.rsplit("_no_", 1)[0] for name in POSTGRESQL_TRIGGERS}


def _sqlite_on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
    # isolation_level=None stops pysqlite from emitting its own (deferred, DML-only) BEGIN; _sqlite_on_begin
    # emits ours. PRAGMAs must run outside a transaction, which is the case right after connect.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
    connection.exec_driver_sql("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def make_engine(database_url: str, *, echo: bool = False) -> Engine:
    """Creates an engine for ``database_url`` with this module's connection and transaction settings.

    Does not touch the schema: use ``init_db`` at start-up.

    Args:
        database_url: SQLAlchemy URL, e.g. ``sqlite:///var/vald-md.db`` or
            ``postgresql+psycopg://vald@localhost/vald``. ``sqlite://`` is an in-memory database shared by
            all threads (tests only).
        echo: log every SQL statement.

    Returns:
        The engine. Dispose of it with ``engine.dispose()``.

    Raises:
        UnsupportedDatabaseError: the URL names a backend other than ``sqlite`` or ``postgresql``.
    """
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        }
        if url.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, echo=echo, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        return create_engine(url, echo=echo, pool_pre_ping=True)
    raise UnsupportedDatabaseError(
        f"database URL backend {backend!r} is not supported: use sqlite:///PATH or postgresql+psycopg://..."
    )


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """Opens a session whose transaction holds the database-wide write lock from its first statement.

    SQLite: ``BEGIN IMMEDIATE``. PostgreSQL: ``pg_advisory_xact_lock(PG_WRITE_LOCK_KEY)``. Commits on normal
    exit, rolls back on an exception. Objects stay usable after the block (``expire_on_commit=False``).
    Keep the block short: argon2 hashing and other slow work belong outside it.

    Args:
        engine: from ``make_engine``/``init_db``.

    Yields:
        The session.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        if engine.dialect.name == "postgresql":
            session.connection().execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK_KEY})
        else:
            session.connection()  # emits BEGIN IMMEDIATE now, before the first read
        yield session


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """Opens a session for reads only; on SQLite it starts with a deferred ``BEGIN`` and takes no write lock.

    Args:
        engine: from ``make_engine``/``init_db``.

    Yields:
        The session (rolled back on exit; objects stay usable).
    """
    with Session(engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"}), expire_on_commit=False) as session:
        yield session


@contextmanager
def snapshot_session(engine: Engine) -> Iterator[Session]:
    """A read session whose every statement sees one snapshot: ``REPEATABLE READ`` on PostgreSQL (whose default
    READ COMMITTED takes a new snapshot per statement, so a chain state row and the events read after it could
    disagree while the server writes); on SQLite ``read_session`` (one deferred transaction is one snapshot).

    Yields:
        The session (rolled back on exit).
    """
    if engine.dialect.name != "postgresql":
        with read_session(engine) as session:
            yield session
        return
    with engine.connect() as connection:
        snapshot = connection.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=snapshot, expire_on_commit=False) as session:
            yield session


def alembic_config(database_url: str | None = None) -> Config:
    """Builds the Alembic configuration without an ``alembic.ini`` (for the CLI, e.g. ``command.revision``).

    Args:
        database_url: stored as ``sqlalchemy.url`` when given (used when ``env.py`` is not handed a connection).

    Returns:
        The configuration, with ``script_location`` set to ``MIGRATIONS_DIR``.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Runs the Alembic migrations up to ``revision`` on ``engine``, in one transaction holding the write lock.

    Args:
        engine: from ``make_engine``.
        revision: target revision; ``"head"`` for the latest.
    """
    config = alembic_config()
    # Alembic logs its plugin set-up and migration context at INFO: seven lines on every CLI call and start-up,
    # none of them news. Warnings and errors still show; a deliberately configured alembic level is kept.
    alembic_logger = logging.getLogger("alembic")
    if alembic_logger.level == logging.NOTSET:
        alembic_logger.setLevel(logging.WARNING)
    # One transaction holding the write lock: concurrent start-ups migrate one after the other.
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Runs the Alembic migrations up to ``revision`` (idempotent).

    Args:
        database_url: as for ``make_engine``.
        revision: target revision; ``"head"`` for the latest.
    """
    ensure_sqlite_directory(database_url)
    engine = make_engine(database_url)
    try:
        migrate(engine, revision)
    finally:
        engine.dispose()


def _sqlite_expected(name: str) -> str:
    return SQLITE_TRIGGERS[name].replace("IF NOT EXISTS ", "", 1)


_PG_FUNCTIONS = {"audit_event_append_only": POSTGRESQL_TRIGGER_FUNCTION,
                 "audit_chain_state_guard": POSTGRESQL_STATE_FUNCTION}
_PG_TRIGGERS_SQL = (
    "SELECT tgname, oid, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid IN "
    "(to_regclass('audit_event'), to_regclass('audit_chain_state')) AND NOT tgisinternal ORDER BY tgname"
)
_PG_FUNCTIONS_SQL = (
    "SELECT proname, prosrc FROM pg_proc WHERE oid IN (to_regprocedure('audit_event_append_only()'), "
    "to_regprocedure('audit_chain_state_guard()')) ORDER BY proname"
)


def _pg_normalized(sql: str) -> str:
    """A trigger definition without case, quotes, blanks, parentheses or the schema of our two tables, so that
    ``pg_get_triggerdef``'s form (``ON public.audit_event``, ``WHEN (((new.a < old.a) OR ...))``) compares equal
    to our ``CREATE TRIGGER`` text. A function's schema is kept: pointing a trigger at another schema's function
    of the same name must not compare equal."""
    lowered = sql.lower().replace('"', "")
    lowered = re.sub(r"\bon\s+\w+\.(audit_event|audit_chain_state)\b", r"on \1", lowered)
    return re.sub(r"[\s()]", "", lowered)


def _pg_guard_rows(connection: Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    triggers = [tuple(row) for row in connection.execute(text(_PG_TRIGGERS_SQL)).tuples()]
    functions = [tuple(row) for row in connection.execute(text(_PG_FUNCTIONS_SQL)).tuples()]
    return triggers, functions


def pg_guard_problems(triggers: list[tuple[Any, ...]], functions: list[tuple[Any, ...]]) -> list[str]:
    """The guarding triggers and functions that are missing, disabled or not ours (PostgreSQL).

    Args:
        triggers: ``(tgname, oid, tgenabled, pg_get_triggerdef(oid))`` rows (``_PG_TRIGGERS_SQL``).
        functions: ``(proname, prosrc)`` rows (``_PG_FUNCTIONS_SQL``).

    Returns:
        Trigger names, and ``function()`` for a trigger function whose body was replaced.
    """
    found = {str(name): (str(enabled), str(definition)) for name, _oid, enabled, definition in triggers}
    problems = []
    for name, sql in POSTGRESQL_TRIGGERS.items():
        enabled, definition = found.get(name, ("", ""))
        # O: fires (origin/local); A: always; D: disabled; R: replica only -- the last two guard nothing
        if enabled not in ("O", "A") or _pg_normalized(definition) != _pg_normalized(sql):
            problems.append(name)
    bodies = {str(name): str(source) for name, source in functions}
    for name, sql in _PG_FUNCTIONS.items():
        if _pg_normalized(bodies.get(name, "")) != _pg_normalized(sql.split("$$")[1]):
            problems.append(f"{name}()")
    return problems


def missing_triggers(connection: Connection) -> list[str]:
    """Names of the append-only triggers that are missing or altered, read without changing anything.

    SQLite: a trigger whose SQL differs from ours (e.g. ``WHEN 0`` added) counts as altered. PostgreSQL
    (``pg_guard_problems``): also a trigger that is disabled (``tgenabled`` not ``O``/``A``) or whose
    ``pg_get_triggerdef`` differs from ours (e.g. ``WHEN (false)``), and a trigger function whose body is not ours
    (reported as ``name()``).
    """
    if connection.dialect.name == "postgresql":
        triggers, functions = _pg_guard_rows(connection)
        return pg_guard_problems(triggers, functions)
    rows = connection.exec_driver_sql(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
        "AND tbl_name IN ('audit_event', 'audit_chain_state')"
    ).tuples()
    present = {name: sql for name, sql in rows}
    return [name for name in SQLITE_TRIGGERS if present.get(name) != _sqlite_expected(name)]


def install_triggers(engine: Engine) -> list[str]:
    """Re-creates any missing (or, on SQLite, altered) append-only trigger of ``audit_event``/``audit_chain_state``.

    The migrations create them; this only matters if someone dropped or rewrote one by hand, which is itself a
    sign of tampering -- ``init_db`` logs it and writes an ``audit_triggers_restored`` event. A trigger dropped
    and re-created *identically* is not visible here; ``schema_fingerprint`` catches that.

    Args:
        engine: a migrated database.

    Returns:
        Names of the triggers that were missing or altered (empty when all were in place).
    """
    with write_session(engine) as session:
        connection = session.connection()
        missing = missing_triggers(connection)
        if engine.dialect.name == "postgresql":
            if missing:
                connection.execute(text(POSTGRESQL_TRIGGER_FUNCTION))
                connection.execute(text(POSTGRESQL_STATE_FUNCTION))
            for name in missing:
                if name in POSTGRESQL_TRIGGERS:  # missing, disabled or altered: replace it with ours
                    connection.execute(text(f'DROP TRIGGER IF EXISTS "{name}" ON {_PG_TRIGGER_TABLE[name]}'))
                    connection.execute(text(POSTGRESQL_TRIGGERS[name]))
        else:
            present = {name for (name,) in connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'").tuples()}
            for name in missing:
                if name in present:  # altered (e.g. a WHEN 0 added): replace it with ours
                    connection.exec_driver_sql(f'DROP TRIGGER "{name}"')
                connection.exec_driver_sql(SQLITE_TRIGGERS[name])
    return missing


def schema_fingerprint(connection: Connection) -> str:
    """What the application remembers of the schema, to notice changes made behind its back.

    SQLite: ``PRAGMA schema_version`` (SQLite adds one on every schema change, so a trigger dropped and
    re-created identically still moves it) and a SHA-256 of every object's SQL in ``sqlite_master``.
    PostgreSQL: a SHA-256 of the guarding triggers' names, OIDs (a re-created trigger gets a new OID), ``tgenabled``
    (``ALTER TABLE ... DISABLE TRIGGER`` keeps the OID) and ``pg_get_triggerdef``, and of the trigger functions'
    bodies.

    Args:
        connection: any connection to the database.

    Returns:
        A short string, compared for equality only.
    """
    if connection.dialect.name == "postgresql":
        triggers, functions = _pg_guard_rows(connection)
        material = "\x00".join(
            [f"{name}={oid}:{enabled}:{definition}" for name, oid, enabled, definition in triggers]
            + [f"{name}()={source}" for name, source in functions]
        )
        # a digest: six name=oid pairs outgrow audit_chain_state.schema_fingerprint (String(200)) once OIDs have
        # six digits; 18 + 64 characters fit any column length
        return "postgresql:sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()
    version = connection.exec_driver_sql("PRAGMA schema_version").scalar()
    objects = connection.exec_driver_sql(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name"
    ).tuples()
    digest = hashlib.sha256("\x00".join("\x01".join(row) for row in objects).encode()).hexdigest()[:16]
    return f"sqlite:{version}:{digest}"


def fingerprint_kind(fingerprint: str) -> str:
    """The format of a schema fingerprint (``sqlite``, ``postgresql:sha256``, ``postgresql:v0`` for the plain
    ``name=oid`` list stored before the digest). Fingerprints of different kinds are not compared: the first
    start-up after an upgrade of the format records the new one instead of reporting a schema change."""
    if fingerprint.startswith("postgresql:sha256:"):
        return "postgresql:sha256"
    return fingerprint.split(":", 1)[0] if not fingerprint.startswith("postgresql:") else "postgresql:v0"


def ensure_sqlite_directory(database_url: str) -> None:
    """Creates the folder of a SQLite database file if it is missing (nothing for other URLs or ``:memory:``)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(str(url.database)).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
