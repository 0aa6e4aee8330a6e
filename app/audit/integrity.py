"""The chain's integrity checks: what ``init_db`` does to the chain at start-up, and ``verify_chain``.

``open_chain`` signs a freshly migrated chain state (appending the ``audit_chain_keyed`` switch-over after unkeyed
events), records triggers restored or a schema changed behind the application's back (``audit_triggers_restored``),
a key rotation (``audit_key_rotated``) and an unsigned state beside keyed events (``audit_tamper_detected``).
``verify_chain`` recomputes every hash under the key ring and compares the signed state and any checkpoints.
The formulas are in ``app.audit.chain``; ``app.audit.startup.init_db`` calls ``open_chain``.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine, make_url
from sqlmodel import Session, col, select

from app.audit.actions import AuditAction
from app.audit.chain import (
    GENESIS_HASH,
    ChainHead,
    VerifyResult,
    append_in_transaction,
    canonical_json,
    event_hash,
    sign_state,
    state_ok,
)
from app.audit.db import (
    READ_BATCH_ROWS,
    fingerprint_kind,
    read_session,
    schema_fingerprint,
    snapshot_session,
    write_session,
)
from app.audit.errors import AuditKeyError
from app.audit.keys import AuditKeyRing, default_key_path, keys_for
from app.audit.models import AuditChainState, AuditEvent, Outcome

logger = logging.getLogger("vald_md.audit")


# --- which databases this key ring has keyed (outside the database) ----------------------------------------

KEYED_MARKER_NAME = "audit-keyed"
"""Beside the audit key file: one line per database this key ring has signed a chain state of."""


def database_identity(engine: Engine) -> str | None:
    """Where the database is, as the ``audit-keyed`` marker lists it; ``None`` for an in-memory SQLite database.

    SQLite: ``sqlite:`` + the database file's absolute path. Others: ``backend://host:port/database``.
    """
    url = make_url(engine.url.render_as_string(hide_password=False))
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            return None
        return "sqlite:" + str(Path(str(url.database)).expanduser().resolve())
    return f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"


def keyed_marker_path(engine: Engine, ring: AuditKeyRing) -> Path | None:
    """``<folder of the key file>/audit-keyed``; for ``VALD_MD_AUDIT_KEY`` the SQLite default secrets folder, and
    ``None`` (no marker) for other databases keyed from the environment."""
    if ring.path is not None:
        return ring.path.parent / KEYED_MARKER_NAME
    default = default_key_path(engine.url.render_as_string(hide_password=False))
    return None if default is None else default.parent / KEYED_MARKER_NAME


def was_keyed(engine: Engine, ring: AuditKeyRing) -> bool:
    """Whether the marker says this key ring has already signed this database's chain state."""
    identity, path = database_identity(engine), keyed_marker_path(engine, ring)
    if identity is None or path is None:
        return False
    try:
        return identity in path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False


def mark_keyed(engine: Engine, ring: AuditKeyRing) -> None:
    """Adds this database to the marker (``O_APPEND``, mode 0600); a failure is logged, never fatal."""
    identity, path = database_identity(engine), keyed_marker_path(engine, ring)
    if identity is None or path is None or was_keyed(engine, ring):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (identity + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        logger.warning("could not record in %s that this database's audit chain is keyed: %s", path, exc)


# --- opening the chain (init_db) ---------------------------------------------------------------------------


def _fingerprint_change(recorded: str, found: str) -> dict[str, object]:
    """For the admin who has to tell a VACUUM from a hand-made trigger: SQLite's schema_version before/after and
    whether every object's SQL is unchanged (a VACUUM: +1 and unchanged; re-creating k triggers: +2k, also
    unchanged when re-created identically, so this is a hint, not a proof)."""
    old, new = recorded.split(":"), found.split(":")
    if len(old) != 3 or len(new) != 3 or old[0] != "sqlite" or new[0] != "sqlite":
        return {}
    return {"schema_version": [int(old[1]), int(new[1])], "sql_unchanged": old[2] == new[2]}



def open_chain(
    engine: Engine, ring: AuditKeyRing, *, found_fingerprint: str, restored_triggers: Sequence[str] = ()
) -> None:
    """``init_db``'s chain step, after the migrations and ``install_triggers``, in one write transaction.

    1. An unsigned state row (a database just migrated to revision 0002, or a new one) is signed with the current
       key; if unkeyed events exist, the keyed ``audit_chain_keyed`` switch-over event is appended. That happens
       only while nothing says this database was keyed before: an unsigned row beside keyed events, or of a
       database the ``audit-keyed`` marker beside the key file lists (``mark_keyed``: written whenever a chain
       state is signed), is recorded as ``audit_tamper_detected`` instead, and no switch-over is written (the
       forged ``legacy_until`` then fails ``verify_chain``).
    2. Triggers that had to be restored, or a schema that changed since the application last recorded it
       (``found_fingerprint``, taken before the migrations), are recorded as ``audit_triggers_restored``: dropping
       the triggers and re-creating them by hand changes SQLite's ``schema_version``.
    3. A new current key (rotation) is recorded as ``audit_key_rotated``, signed with the new key.
    4. The state row remembers the schema as it is now.

    Raises:
        AuditKeyError: the ring lacks the key that signed the state row (restore the key file from its backup).
    """
    with write_session(engine) as session:
        state = session.get(AuditChainState, 1)
        if state is None:
            raise AuditKeyError("audit_chain_state is missing: the database was not migrated (or the row deleted)")
        now_fingerprint = schema_fingerprint(session.connection())
        recorded = state.schema_fingerprint
        # 1. first use: sign, and mark the switch-over from unkeyed events
        keyed = session.exec(select(AuditEvent.seq).where(col(AuditEvent.key_id).is_not(None)).limit(1)).first()
        keyed_before = not state.mac and was_keyed(engine, ring)
        if not state.mac and (keyed is not None or keyed_before):
            # blanked by hand beside keyed events, or a database this key ring keyed before (its events rewritten
            # with the unkeyed formula?): record it rather than treat it as a new chain or an upgrade
            logger.error("audit_chain_state is unsigned although this database was keyed before: recorded in the "
                         "audit trail")
            append_in_transaction(session, AuditAction.AUDIT_TAMPER_DETECTED, outcome=Outcome.SERIOUS_FAILURE,
                                  detail={"check": "chain_state_unsigned", "keyed_events": keyed is not None,
                                          "marker": keyed_before,
                                          "found": {"last_seq": state.last_seq, "legacy_until": state.legacy_until}})
            recorded = ""
        elif not state.mac:
            state.schema_fingerprint = now_fingerprint
            sign_state(state, ring)
            session.add(state)
            if state.legacy_until > 0:
                append_in_transaction(session, AuditAction.AUDIT_CHAIN_KEYED, detail={
                    "key_id": ring.current_id, "legacy_until": state.legacy_until,
                    "legacy_head": state.head_hash})
        elif state.key_id is not None and ring.get(state.key_id) is None:
            raise AuditKeyError(
                f"the audit chain is signed with key {state.key_id}, which is not in the key ring "
                f"({ring.path or 'VALD_MD_AUDIT_KEY'}): restore the key file from its backup, or add the old key "
                "back before the new one"
            )
        # 2. triggers restored, or the schema changed behind the application's back
        schema_changed = (bool(recorded) and fingerprint_kind(recorded) == fingerprint_kind(found_fingerprint)
                          and recorded != found_fingerprint)
        if restored_triggers or schema_changed:
            if schema_changed:
                logger.warning("the audit database's schema changed while the application was not looking "
                               "(triggers dropped and re-created by hand, or a VACUUM / backup restore); recorded "
                               "in the audit trail as audit_triggers_restored: check which, then vald-md audit "
                               "acknowledge SEQ --reason TEXT")
            detail: dict[str, object] = {"triggers": list(restored_triggers), "schema_changed": schema_changed}
            if schema_changed:
                detail.update(_fingerprint_change(recorded, found_fingerprint))
            append_in_transaction(session, AuditAction.AUDIT_TRIGGERS_RESTORED, detail=detail)
        # 3. rotation
        if state.key_id != ring.current_id:
            append_in_transaction(session, AuditAction.AUDIT_KEY_ROTATED, detail={
                "key_id": ring.current_id, "previous_key_id": state.key_id})
        # 4. remember the schema as the application left it
        if state.schema_fingerprint != now_fingerprint and state_ok(state, ring):
            state.schema_fingerprint = now_fingerprint
            sign_state(state, ring)
            session.add(state)
    mark_keyed(engine, ring)


# --- verify ------------------------------------------------------------------------------------------------


def chain_head(engine: Engine) -> ChainHead | None:
    """Returns the last event's ``seq`` and ``hash`` (``None`` for an empty log), to be kept off-database."""
    with read_session(engine) as session:
        row = session.exec(
            select(AuditEvent.seq, AuditEvent.hash).order_by(col(AuditEvent.seq).desc()).limit(1)
        ).first()
    return None if row is None or row[0] is None else ChainHead(seq=row[0], hash=row[1])


def _load_batch(session: Session, seqs: list[int]) -> list[AuditEvent | Exception]:
    """Loads events by seq; a row whose columns cannot even be decoded comes back as the exception."""
    statement = select(AuditEvent).where(col(AuditEvent.seq).in_(seqs)).order_by(col(AuditEvent.seq))
    try:
        return list(session.exec(statement).all())
    except Exception:  # noqa: BLE001 - a forged row may hold anything; find which one, row by row
        session.rollback()
        rows: list[AuditEvent | Exception] = []
        for seq in seqs:
            try:
                rows.append(session.exec(select(AuditEvent).where(AuditEvent.seq == seq)).one())
            except Exception as exc:  # noqa: BLE001
                session.rollback()
                rows.append(exc)
        return rows


_ALERTS = (AuditAction.AUDIT_TRIGGERS_RESTORED.value, AuditAction.AUDIT_TAMPER_DETECTED.value)


def _check_event(row: AuditEvent, seq: int, legacy_until: int, ring: AuditKeyRing) -> str | None:
    """Why ``row`` does not fit its place in a keyed chain, or ``None``."""
    if seq <= legacy_until:
        if row.key_id is not None:
            return f"event {seq}: signed with a key, but the chain was keyed only after event {legacy_until}"
    elif row.key_id is None:
        return (f"event {seq}: not signed with the audit key (the chain is keyed from event {legacy_until + 1}): "
                "rewritten with the unkeyed formula?")
    elif ring.get(row.key_id) is None:
        return f"event {seq}: signed with key {row.key_id}, which is not in the key ring (restore it to verify)"
    if legacy_until > 0 and seq == legacy_until + 1 and (
        row.action != AuditAction.AUDIT_CHAIN_KEYED.value or row.detail.get("legacy_until") != legacy_until
    ):
        return f"event {seq}: expected the audit_chain_keyed switch-over after {legacy_until} unkeyed events"
    try:
        recomputed = event_hash(row, ring.get(row.key_id))
    except Exception as exc:  # noqa: BLE001 - forged content that cannot be canonicalized
        return f"event {seq}: content cannot be hashed ({exc}): altered by hand"
    if not hmac.compare_digest(recomputed, row.hash):
        return f"event {seq}: hash mismatch, content altered after it was written"
    return None


def verify_chain(
    engine: Engine,
    *,
    anchor: ChainHead | None = None,
    anchors: Sequence[ChainHead] = (),
    keys: AuditKeyRing | None = None,
) -> VerifyResult:
    """Recomputes the whole chain and names the first event that does not fit.

    Checks, in ``seq`` order: ``seq`` runs 1, 2, 3... without gaps; each ``prev_hash`` equals the previous
    ``hash`` (``GENESIS_HASH`` first); each ``hash`` equals ``event_hash`` of the row as stored, under its key
    (events after the switch-over must be keyed); each checkpoint (``anchor``/``anchors``) names an event that is
    still there unchanged. Then the signed chain state: its MAC, its ``last_seq``/``head_hash`` against the last
    event (a deleted tail), and its schema fingerprint against the database's. Reads in batches of 500, so memory
    stays flat.

    Args:
        engine: from ``init_db``.
        anchor: one checkpoint (kept for callers of the earlier API).
        anchors: checkpoints read from outside the database (``app.audit.anchors.read_checkpoints``).
        keys: the key ring; default the one bound to ``engine`` (``keys_for``).

    Returns:
        The ``VerifyResult``.

    Raises:
        AuditKeyError: no key ring for this database.
    """
    ring = keys or keys_for(engine)
    pinned: dict[int, str] = {a.seq: a.hash for a in anchors}
    if anchor is not None:
        pinned[anchor.seq] = anchor.hash
    checked = 0
    expected_seq, expected_prev = 1, GENESIS_HASH
    head: ChainHead | None = None
    alerts: list[tuple[int, str]] = []
    alarms: list[int] = []
    acknowledged: dict[int, int] = {}

    def noted() -> tuple[str, ...]:
        return tuple(text + (f" (acknowledged in event {acknowledged[seq]})" if seq in acknowledged else "")
                     for seq, text in alerts)

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason, head, noted())

    with snapshot_session(engine) as session:  # the state row and the events from one snapshot
        state = session.get(AuditChainState, 1)
        legacy_until = state.legacy_until if state is not None else 0
        last_seq = 0
        while True:
            seqs = [
                s
                for s in session.exec(
                    select(AuditEvent.seq)
                    .where(col(AuditEvent.seq) > last_seq)
                    .order_by(col(AuditEvent.seq))
                    .limit(READ_BATCH_ROWS)
                ).all()
                if s is not None
            ]
            if not seqs:
                break
            for seq, row in zip(seqs, _load_batch(session, seqs), strict=True):
                checked += 1
                last_seq = seq
                if isinstance(row, Exception):
                    return bad(seq, f"event {seq}: row cannot be decoded ({type(row).__name__}): altered by hand")
                if seq != expected_seq:
                    missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
                    return bad(seq, f"event {seq}: seq gap, event(s) {missing} missing (deleted?)")
                if row.prev_hash != expected_prev:
                    return bad(seq, f"event {seq}: prev_hash does not match the hash of event {seq - 1}")
                problem = _check_event(row, seq, legacy_until, ring)
                if problem is not None:
                    return bad(seq, problem)
                if seq in pinned and row.hash != pinned[seq]:
                    return bad(seq, f"event {seq}: differs from the checkpoint (rewritten, or its seq re-used)")
                if row.action in _ALERTS:
                    alerts.append((seq, f"event {seq}: {row.action} {canonical_json(row.detail)}"))
                if row.action == AuditAction.AUDIT_TAMPER_DETECTED.value:
                    alarms.append(seq)
                elif row.action == AuditAction.AUDIT_TAMPER_ACKNOWLEDGED.value and isinstance(
                        row.detail.get("seq"), int):
                    acknowledged[row.detail["seq"]] = seq
                head = ChainHead(seq, row.hash)
                expected_seq, expected_prev = seq + 1, row.hash
        fingerprint = schema_fingerprint(session.connection())
    head_seq = head.seq if head is not None else 0
    beyond = [seq for seq in pinned if seq > head_seq]
    if beyond:
        return bad(max(beyond), f"checkpointed event {max(beyond)} is missing: the log was truncated (or restored "
                                "from an older copy)")
    # the signed state: a deleted tail, a rewound counter, a schema changed behind the application's back
    if state is None:
        return bad(head_seq + 1, "the chain state row is missing (deleted by hand?)")
    if not state.mac:
        return bad(head_seq + 1, "the chain state row is not signed: either a database not yet opened by this "
                                 "version (start the server once), or the row was blanked or forged by hand (the "
                                 "start-up then records audit_tamper_detected if this database was keyed before)")
    if not state_ok(state, ring):
        return bad(head_seq + 1, "the chain state row fails its MAC: altered by hand, or signed with a key that is "
                                 "not in the ring")
    if state.last_seq > head_seq:
        missing = f"{head_seq + 1}" if state.last_seq == head_seq + 1 else f"{head_seq + 1}..{state.last_seq}"
        return bad(head_seq + 1, f"event(s) {missing} missing after the last event: the tail was deleted")
    if state.last_seq < head_seq or state.head_hash != (head.hash if head is not None else GENESIS_HASH):
        return bad(head_seq, f"event {head_seq}: not the head the chain state recorded (written around the "
                             "application?)")
    if state.schema_fingerprint and fingerprint_kind(state.schema_fingerprint) == fingerprint_kind(fingerprint) \
            and state.schema_fingerprint != fingerprint:
        return bad(head_seq, "the database schema changed since the application last recorded it: append-only "
                             "triggers dropped and re-created by hand, or (SQLite) a VACUUM or a restore through "
                             "the backup API, which also move PRAGMA schema_version. Start the server (or any "
                             "vald-md users command) once to record it as audit_triggers_restored, find out which "
                             "it was, then: vald-md audit acknowledge SEQ --reason TEXT")
    return VerifyResult(True, checked, None, "", head, noted(),
                        tuple(seq for seq in alarms if seq not in acknowledged))
