"""Start-up: open the audit database in order -- migrate, restore the triggers, open the signed chain.

``init_db`` is the one entry point the server and the ``vald-md`` commands call. It sits above the modules it
orchestrates (``db``: engines, migrations, triggers; ``integrity``: the chain state), so none of them imports it.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from app.audit.db import ensure_sqlite_directory, install_triggers, make_engine, migrate, schema_fingerprint
from app.audit.errors import AuditKeyError
from app.audit.integrity import open_chain
from app.audit.keys import AuditKeyRing, bind_audit_keys, default_key_path, load_audit_keys

logger = logging.getLogger("vald_md.audit")


def init_db(database_url: str, *, keys: AuditKeyRing | None = None) -> Engine:
    """Start-up entry point: migrates the schema to head, checks the triggers and the chain state, returns the engine.

    The schema is created by the migrations (never ``create_all``). Call ``mark_interrupted_runs`` next.

    Args:
        database_url: as for ``make_engine`` (``DATABASE_URL`` in the settings).
        keys: the audit key ring (``Settings``: ``load_audit_keys(settings.audit_key_path)`` or
            ``VALD_MD_AUDIT_KEY``); ``None``: SQLite's default file beside the database, created if missing
            (``app.audit.keys``). PostgreSQL needs ``keys``.

    Returns:
        The engine the application keeps for its lifetime, bound to ``keys``.

    Raises:
        AuditKeyError: no ring for a non-SQLite database, or the ring lacks the key that signed the chain state.
    """
    ensure_sqlite_directory(database_url)
    if keys is None:
        path = default_key_path(database_url)
        if path is None:
            raise AuditKeyError(
                "pass the audit key ring to init_db(url, keys=...) for this database (Settings.audit_key_path or "
                "VALD_MD_AUDIT_KEY)"
            )
        keys = load_audit_keys(path)
    engine = make_engine(database_url)
    try:
        bind_audit_keys(engine, keys)
        # 1. schema, remembering what it looked like before we touched it
        with engine.connect() as connection:
            found = schema_fingerprint(connection)
        migrate(engine, "head")
        # 2. triggers: a missing one means somebody removed it; restore and leave a trace in the chain
        missing = install_triggers(engine)
        if missing:
            logger.warning("audit triggers were missing or altered and have been re-created: %s", ", ".join(missing))
        # 3. the chain state: signed on first use, checked for schema changes and key rotation
        open_chain(engine, keys, found_fingerprint=found, restored_triggers=missing)
    except BaseException:
        engine.dispose()
        raise
    return engine
