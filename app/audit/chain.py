"""The tamper-evident audit trail: append, verify, query, export.

Hash chain (keyed)
    Event ``n`` stores ``prev_hash`` = ``hash`` of event ``n-1`` (``GENESIS_HASH`` for the first) and
    ``hash`` = HMAC-SHA256 (hex), under the audit key ``key_id`` (``app.audit.keys``; kept outside the database), of
    the UTF-8 canonical JSON (keys sorted, no whitespace, ``ensure_ascii=False``, no NaN) of ``{"v": 2, "seq",
    "id", "ts", "user_id", "username", "action", "object_type", "object_id", "outcome", "event_id_code",
    "event_type_code", "event_action_code", "detail", "prev_hash", "key_id"}``, with ``ts`` as ISO 8601 UTC with
    microseconds (``2025-01-31T12:00:00.000001+00:00``) and UUIDs in their dashed form. Without the key nobody can
    produce a valid hash, so rewriting an event and re-hashing the rest no longer goes unnoticed.

    Events written before the chain was keyed (``key_id`` NULL, ``seq`` <= ``audit_chain_state.legacy_until``)
    keep version 1: plain SHA-256 of the same JSON with ``"v": 1`` and no ``key_id``. The first event after them is
    the keyed ``audit_chain_keyed`` switch-over, which names ``legacy_until`` and the last legacy hash; an unkeyed
    event after it fails verification.

Sequence numbers and the chain state
    ``seq`` = max(``audit_chain_state.last_seq``, head, on SQLite ``sqlite_sequence``) + 1 under the write lock,
    and ``last_seq`` never goes down (a trigger), so no number is handed out twice: a deleted tail leaves a gap. The state row also holds the head's
    hash and the schema fingerprint the application last saw, under an HMAC (``state_mac``); ``verify_chain``
    compares it with the events, so cutting rows off the end is reported without an external copy. A state row
    that fails its MAC when an event is appended is itself recorded (``audit_tamper_detected``).

Checkpoints (``app.audit.anchors``)
    Signed copies of the head kept outside the database; ``verify_chain(anchors=...)`` checks that each
    checkpointed event is still there, unchanged (a rewrite or a re-used ``seq`` changes its hash).

DICOM PS3.15 mapping (A.5.1: EventID, EventTypeCode, EventActionCode; codes of scheme "DCM", PS3.16 CID 400-403)

    ========================  ===================================  =========================================  ===
    action                    EventID                              EventTypeCode                              act
    ========================  ===================================  =========================================  ===
    login_ok, login_failed    110114 User Authentication           110122 Login                               E
    logout                    110114 User Authentication           110123 Logout                              E
    lockout                   110113 Security Alert                110137 User Security Attributes Changed    E
    user_add, token_create    110113 Security Alert                110137 User Security Attributes Changed    C
    user_disable/_enable      110113 Security Alert                110137 User Security Attributes Changed    U
    password_reset            110113 Security Alert                110137 User Security Attributes Changed    U
    token_revoke              110113 Security Alert                110137 User Security Attributes Changed    D
    upload                    110107 Import                        --                                         C
    generate                  110103 DICOM Instances Accessed      --                                         C
    view                      110103 DICOM Instances Accessed      --                                         R
    export                    110106 Export                        --                                         R
    cancel, run_done/_failed  --                                   --                                         --
    job_interrupted           110100 Application Activity          --                                         E
    app_start                 110100 Application Activity          110120 Application Start                   E
    app_stop                  110100 Application Activity          110121 Application Stop                    E
    audit_view, audit_export  110101 Audit Log Used                --                                         R
    audit_verify              110101 Audit Log Used                --                                         E
    audit_triggers_restored   110113 Security Alert                110129 Security Configuration              E
    audit_chain_keyed         110113 Security Alert                110129 Security Configuration              E
    audit_key_rotated         110113 Security Alert                110129 Security Configuration              U
    audit_tamper_detected     110113 Security Alert                110129 Security Configuration              E
    audit_tamper_acknowledged 110113 Security Alert                110129 Security Configuration              E
    audit_anchor              110101 Audit Log Used                --                                         E
    ========================  ===================================  =========================================  ===

    110110 Patient Record is not used: the tool keeps no patient record. Outcome maps to EventOutcomeIndicator
    (``Outcome.dicom_code``).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from app.audit.db import PG_WRITE_LOCK_KEY, read_session, write_session
from app.audit.errors import AuditDetailError, AuditKeyError, InsecureSecretFileError
from app.audit.keys import AuditKeyRing, bind_audit_keys, keys_for, load_audit_keys
from app.audit.models import AuditChainState, AuditEvent, Outcome, User, utc_now

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event."""

HASH_VERSION = 2
"""Version of the keyed formula; events before the switch-over use ``LEGACY_HASH_VERSION`` (plain SHA-256)."""
LEGACY_HASH_VERSION = 1
SYSTEM_USERNAME = "system"
"""``username`` of events that no signed-in user caused (start-up, the job worker, the CLI)."""

MAX_QUERY_LIMIT = 1000
_BATCH = 500


class AuditAction(StrEnum):
    """Audited actions. Add new ones here *and* in ``DICOM_EVENT_CODES`` (a test checks both)."""

    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    LOCKOUT = "lockout"
    USER_ADD = "user_add"
    USER_DISABLE = "user_disable"
    USER_ENABLE = "user_enable"
    PASSWORD_RESET = "password_reset"
    TOKEN_CREATE = "token_create"
    TOKEN_REVOKE = "token_revoke"
    UPLOAD = "upload"
    GENERATE = "generate"
    CANCEL = "cancel"
    RUN_DONE = "run_done"
    RUN_FAILED = "run_failed"
    JOB_INTERRUPTED = "job_interrupted"
    RUN_DELETE = "run_delete"
    VIEW = "view"
    EXPORT = "export"
    APP_START = "app_start"
    APP_STOP = "app_stop"
    AUDIT_VIEW = "audit_view"
    AUDIT_EXPORT = "audit_export"
    AUDIT_VERIFY = "audit_verify"
    AUDIT_TRIGGERS_RESTORED = "audit_triggers_restored"
    AUDIT_CHAIN_KEYED = "audit_chain_keyed"
    AUDIT_KEY_ROTATED = "audit_key_rotated"
    AUDIT_TAMPER_DETECTED = "audit_tamper_detected"
    AUDIT_TAMPER_ACKNOWLEDGED = "audit_tamper_acknowledged"
    AUDIT_ANCHOR = "audit_anchor"
    PACS_QUERY = "pacs_query"
    PACS_RETRIEVE = "pacs_retrieve"
    PACS_STORE = "pacs_store"
    PACS_TEST = "pacs_test"


@dataclass(frozen=True)
class DicomEventCodes:
    """DICOM PS3.15 A.5.1 coded values of one action (codes of scheme "DCM", PS3.16 CID 400/401)."""

    event_id: str | None
    event_id_meaning: str | None
    event_type: str | None
    event_type_meaning: str | None
    event_action: Literal["C", "R", "U", "D", "E"] | None


_AUTH = ("110114", "User Authentication")
_SECURITY = ("110113", "Security Alert")
_USER_ATTRS = ("110137", "User Security Attributes Changed")
_APP = ("110100", "Application Activity")
_AUDIT_LOG = ("110101", "Audit Log Used")
_ACCESSED = ("110103", "DICOM Instances Accessed")
_NONE = (None, None)

DICOM_EVENT_CODES: dict[AuditAction, DicomEventCodes] = {
    AuditAction.LOGIN_OK: DicomEventCodes(*_AUTH, "110122", "Login", "E"),
    AuditAction.LOGIN_FAILED: DicomEventCodes(*_AUTH, "110122", "Login", "E"),
    AuditAction.LOGOUT: DicomEventCodes(*_AUTH, "110123", "Logout", "E"),
    AuditAction.LOCKOUT: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "E"),
    AuditAction.USER_ADD: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "C"),
    AuditAction.USER_DISABLE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.USER_ENABLE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.PASSWORD_RESET: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.TOKEN_CREATE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "C"),
    AuditAction.TOKEN_REVOKE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "D"),
    AuditAction.UPLOAD: DicomEventCodes("110107", "Import", *_NONE, "C"),
    AuditAction.GENERATE: DicomEventCodes(*_ACCESSED, *_NONE, "C"),
    AuditAction.VIEW: DicomEventCodes(*_ACCESSED, *_NONE, "R"),
    AuditAction.EXPORT: DicomEventCodes("110106", "Export", *_NONE, "R"),
    AuditAction.CANCEL: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.RUN_DONE: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.RUN_FAILED: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.JOB_INTERRUPTED: DicomEventCodes(*_APP, *_NONE, "E"),
    AuditAction.RUN_DELETE: DicomEventCodes(*_ACCESSED, *_NONE, "D"),
    AuditAction.APP_START: DicomEventCodes(*_APP, "110120", "Application Start", "E"),
    AuditAction.APP_STOP: DicomEventCodes(*_APP, "110121", "Application Stop", "E"),
    AuditAction.AUDIT_VIEW: DicomEventCodes(*_AUDIT_LOG, *_NONE, "R"),
    AuditAction.AUDIT_EXPORT: DicomEventCodes(*_AUDIT_LOG, *_NONE, "R"),
    AuditAction.AUDIT_VERIFY: DicomEventCodes(*_AUDIT_LOG, *_NONE, "E"),
    AuditAction.AUDIT_TRIGGERS_RESTORED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_CHAIN_KEYED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_KEY_ROTATED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "U"),
    AuditAction.AUDIT_TAMPER_DETECTED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_TAMPER_ACKNOWLEDGED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_ANCHOR: DicomEventCodes(*_AUDIT_LOG, *_NONE, "E"),
    AuditAction.PACS_QUERY: DicomEventCodes("110112", "Query", *_NONE, "E"),
    AuditAction.PACS_RETRIEVE: DicomEventCodes("110107", "Import", *_NONE, "C"),
    AuditAction.PACS_STORE: DicomEventCodes("110106", "Export", *_NONE, "R"),
    AuditAction.PACS_TEST: DicomEventCodes(*_APP, *_NONE, "E"),
}


@dataclass(frozen=True)
class ChainHead:
    """An event's position and hash: the chain's last event, or a checkpoint kept outside the database."""

    seq: int
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify_chain``.

    Attributes:
        ok: every event checked out (and the anchor, if one was given).
        events_checked: events read, up to and including the first bad one.
        first_bad_seq: ``seq`` of the first event that fails, else ``None``.
        reason: human-readable explanation ("" when ok).
        head: the last event read, for anchoring.
        warnings: things an auditor should look at even when the chain verifies: the security alerts recorded in
            it (``audit_triggers_restored``, ``audit_tamper_detected``), by ``seq``.
        unacknowledged: ``seq`` of every ``audit_tamper_detected`` event that no verified
            ``audit_tamper_acknowledged`` event names (``vald-md audit verify`` fails while there is one).
    """

    ok: bool
    events_checked: int
    first_bad_seq: int | None
    reason: str
    head: ChainHead | None = None
    warnings: tuple[str, ...] = ()
    unacknowledged: tuple[int, ...] = ()


# --- canonical form ----------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Serializes ``value`` to the canonical JSON used for hashing.

    Raises:
        AuditDetailError: ``value`` holds something JSON cannot represent exactly (NaN, non-str keys, objects).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditDetailError(
            f"audit detail is not plain JSON ({exc}): use str/int/float/bool/None/list/dict"
        ) from exc


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(event: AuditEvent, key: bytes | None = None) -> str:
    """Computes the chain hash of ``event`` from its columns (``hash`` itself excluded).

    Args:
        event: the row.
        key: the audit key ``event.key_id`` names; ignored for a legacy event (``key_id`` ``None``).

    Returns:
        64 lowercase hex characters: HMAC-SHA256 (keyed events) or SHA-256 (legacy events).

    Raises:
        AuditKeyError: a keyed event and no ``key``.
    """
    payload = {
        "v": LEGACY_HASH_VERSION if event.key_id is None else HASH_VERSION,
        "seq": event.seq,
        "id": str(event.id),
        "ts": _iso(event.ts),
        "user_id": None if event.user_id is None else str(event.user_id),
        "username": event.username,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "outcome": event.outcome,
        "event_id_code": event.event_id_code,
        "event_type_code": event.event_type_code,
        "event_action_code": event.event_action_code,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
    }
    if event.key_id is None:
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()
    if key is None:
        raise AuditKeyError(f"event {event.seq} is signed with key {event.key_id}, which is not in the key ring")
    payload["key_id"] = event.key_id
    return hmac.new(key, canonical_json(payload).encode("utf-8"), hashlib.sha256).hexdigest()


def state_mac(state: AuditChainState, key: bytes) -> str:
    """HMAC-SHA256 (hex) of the chain state row's columns (``mac`` excluded) under ``key``."""
    payload = {
        "v": 1,
        "id": state.id,
        "last_seq": state.last_seq,
        "head_hash": state.head_hash,
        "legacy_until": state.legacy_until,
        "schema_fingerprint": state.schema_fingerprint,
        "key_id": state.key_id,
    }
    return hmac.new(key, canonical_json(payload).encode("utf-8"), hashlib.sha256).hexdigest()


def state_ok(state: AuditChainState, ring: AuditKeyRing) -> bool:
    """Whether the chain state row carries a valid MAC under the key it names."""
    key = ring.get(state.key_id)
    return bool(state.mac) and key is not None and hmac.compare_digest(state.mac, state_mac(state, key))


def sign_state(state: AuditChainState, ring: AuditKeyRing) -> None:
    """Signs the chain state row with the ring's current key (``key_id`` and ``mac``)."""
    state.key_id = ring.current_id
    state.mac = state_mac(state, ring.current)


# --- what may go into `detail` -----------------------------------------------------------------------------

_PHI_KEY = re.compile(r"patient|accession|instanceuid|birthdate|^mrn$|password|^token$|^secret$")
_UID_VALUE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*)){4,}$")  # DICOM UID shape, e.g. 1.2.840.10008.x.y


def _check_detail(value: Any, path: str = "detail") -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            normalized = re.sub(r"[^a-z0-9]", "", str(key).lower())
            if _PHI_KEY.search(normalized):
                raise AuditDetailError(
                    f"{path} key {key!r} looks like patient data or a credential: audit details must not carry "
                    "either; reference the object by id (object_type/object_id) instead"
                )
            _check_detail(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_detail(item, f"{path}[{index}]")
    elif isinstance(value, str) and len(value) >= 12 and _UID_VALUE.match(value):
        raise AuditDetailError(
            f"{path} holds a DICOM UID-like value {value!r}: store UIDs only as HMACs (hmac_uid), not in the audit"
        )


# --- append ------------------------------------------------------------------------------------------------


def _reload_rotated_ring(session: Session, state: AuditChainState, ring: AuditKeyRing) -> AuditKeyRing:
    """The ring re-read from its key file when the state row is signed with a key this process does not know yet:
    ``vald-md audit rotate-key`` ran while the server was up. Taken only if it keeps every key of ``ring`` (a
    rotation only appends) and the row verifies under it; then it is bound for the rest of this process, which
    signs with the new key from now on. Otherwise ``ring`` is returned and the caller records the tampering."""
    if ring.path is None or state.key_id is None or ring.get(state.key_id) is not None:
        return ring
    try:
        fresh = load_audit_keys(ring.path, create=False)
    except (AuditKeyError, InsecureSecretFileError, OSError):
        return ring
    if not set(ring.keys) <= set(fresh.keys) or not state_ok(state, fresh):
        return ring
    bind_audit_keys(session.get_bind(), fresh)  # type: ignore[arg-type]
    return fresh


def _sqlite_high_water(session: Session) -> int:
    """On SQLite, the highest ``seq`` ever inserted (``sqlite_sequence``, kept by AUTOINCREMENT): a tail deleted
    together with a rewound, blanked state row still does not give its numbers out again. 0 elsewhere."""
    if session.get_bind().dialect.name != "sqlite":
        return 0
    used = session.connection().exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'audit_event'").scalar()
    return int(used or 0)


def _append(
    session: Session,
    action: AuditAction | str,
    *,
    user: User | None = None,
    username: str | None = None,
    object_type: str | None = None,
    object_id: str | uuid.UUID | None = None,
    outcome: Outcome | str = Outcome.SUCCESS,
    detail: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """Appends one event inside ``session``'s transaction (which must come from ``write_session``).

    Raises:
        AuditKeyError: the chain state row is missing (open the database with ``init_db``), or no key ring.
    """
    try:
        action = AuditAction(action)
    except ValueError:
        raise ValueError(f"unknown audit action {action!r}: add it to AuditAction and DICOM_EVENT_CODES") from None
    outcome = Outcome(outcome)
    detail_dict = json.loads(canonical_json(dict(detail or {})))
    _check_detail(detail_dict)
    if session.get_bind().dialect.name == "postgresql":
        # re-entrant; write_session already holds it, this covers sessions opened elsewhere
        session.connection().execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK_KEY})
    ring = keys_for(session.get_bind())  # type: ignore[arg-type]
    state = session.get(AuditChainState, 1)
    if state is None:
        raise AuditKeyError("audit_chain_state is missing: open the database with init_db (it runs the migrations)")
    if not state_ok(state, ring):
        ring = _reload_rotated_ring(session, state, ring)
    head = session.exec(select(AuditEvent.seq, AuditEvent.hash).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    head_seq, prev_hash = (head[0] or 0, head[1]) if head is not None else (0, GENESIS_HASH)
    if not state_ok(state, ring) and action is not AuditAction.AUDIT_TAMPER_DETECTED:
        # somebody changed (or blanked) the row, or it was signed with a key we no longer have: say so in the chain
        # first, then carry on from the highest number either side remembers, so no seq is handed out twice
        found = {"last_seq": state.last_seq, "head_seq": head_seq, "key_id": state.key_id}
        _append(session, AuditAction.AUDIT_TAMPER_DETECTED, outcome=Outcome.SERIOUS_FAILURE,
                detail={"check": "chain_state_mac", "found": found}, now=now)
        head_seq, prev_hash = state.last_seq, state.head_hash
    codes = DICOM_EVENT_CODES[action]
    event = AuditEvent(
        seq=max(state.last_seq, head_seq, _sqlite_high_water(session)) + 1,
        id=uuid.uuid4(),
        ts=now or utc_now(),
        user_id=user.id if user is not None else None,
        username=(user.username if user is not None else username or SYSTEM_USERNAME)[:150],
        action=action.value,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        outcome=outcome.value,
        event_id_code=codes.event_id,
        event_type_code=codes.event_type,
        event_action_code=codes.event_action,
        detail=detail_dict,
        prev_hash=prev_hash,
        hash="",
        key_id=ring.current_id,
    )
    event.hash = event_hash(event, ring.current)
    session.add(event)
    state.last_seq, state.head_hash = event.seq or 0, event.hash
    sign_state(state, ring)
    session.add(state)
    session.flush()
    return event


def append_event(
    engine: Engine,
    action: AuditAction | str,
    *,
    user: User | None = None,
    username: str | None = None,
    object_type: str | None = None,
    object_id: str | uuid.UUID | None = None,
    outcome: Outcome | str = Outcome.SUCCESS,
    detail: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """Appends one event to the chain in its own transaction.

    The account, run and export functions of this package write their events themselves, in the same
    transaction as the change they record; use this for the rest (``view``, ``audit_view``, ``app_start``...).

    Args:
        engine: from ``init_db``.
        action: an ``AuditAction`` (or its value).
        user: who acted; ``None`` for the system or an unknown login name.
        username: recorded when ``user`` is ``None`` (e.g. the name tried at a failed login); default "system".
        object_type: kind of object acted on ("run", "input_image", "user", "export", "session", "api_token").
        object_id: its id.
        outcome: ``Outcome`` (or its value).
        detail: small JSON object, never patient data or credentials (keys like ``patient_*``, ``*_instance_uid``,
            ``password`` and UID-shaped values are refused).
        now: event time (aware); default now.

    Returns:
        The stored event.

    Raises:
        ValueError: unknown ``action`` or ``outcome``.
        AuditDetailError: ``detail`` is not plain JSON or looks like patient data.
    """
    with write_session(engine) as session:
        return _append(
            session,
            action,
            user=user,
            username=username,
            object_type=object_type,
            object_id=object_id,
            outcome=outcome,
            detail=detail,
            now=now,
        )


# --- query / export ----------------------------------------------------------------------------------------


def _filtered(
    statement: SelectOfScalar[Any],
    *,
    user: str | None,
    user_id: uuid.UUID | None,
    action: AuditAction | str | None,
    outcome: Outcome | str | None,
    object_id: str | uuid.UUID | None,
    since: datetime | None,
    until: datetime | None,
) -> SelectOfScalar[Any]:
    if user is not None:
        statement = statement.where(AuditEvent.username == user)
    if user_id is not None:
        statement = statement.where(AuditEvent.user_id == user_id)
    if action is not None:
        statement = statement.where(AuditEvent.action == AuditAction(action).value)
    if outcome is not None:
        statement = statement.where(AuditEvent.outcome == Outcome(outcome).value)
    if object_id is not None:
        statement = statement.where(AuditEvent.object_id == str(object_id))
    if since is not None:
        statement = statement.where(col(AuditEvent.ts) >= since)
    if until is not None:
        statement = statement.where(col(AuditEvent.ts) < until)
    return statement


def query_events(
    engine: Engine,
    *,
    user: str | None = None,
    user_id: uuid.UUID | None = None,
    action: AuditAction | str | None = None,
    outcome: Outcome | str | None = None,
    object_id: str | uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AuditEvent]:
    """Lists events for the admin page, newest first.

    Args:
        engine: from ``init_db``.
        user: exact username (also matches names tried at failed logins).
        user_id: the acting user's id.
        action: one ``AuditAction``.
        outcome: one ``Outcome``.
        object_id: events about this object.
        since: ``ts >= since`` (aware datetime).
        until: ``ts < until`` (aware datetime).
        limit: page size, 1..1000.
        offset: rows to skip, >= 0.

    Returns:
        Up to ``limit`` events, highest ``seq`` first.

    Raises:
        ValueError: ``limit``/``offset`` out of range, unknown ``action``/``outcome``.
    """
    if not 1 <= limit <= MAX_QUERY_LIMIT or offset < 0:
        raise ValueError(f"limit={limit}, offset={offset}: use 1 <= limit <= {MAX_QUERY_LIMIT} and offset >= 0")
    statement = _filtered(
        select(AuditEvent),
        user=user,
        user_id=user_id,
        action=action,
        outcome=outcome,
        object_id=object_id,
        since=since,
        until=until,
    )
    with read_session(engine) as session:
        return list(session.exec(statement.order_by(col(AuditEvent.seq).desc()).offset(offset).limit(limit)).all())


def count_events(
    engine: Engine,
    *,
    user: str | None = None,
    user_id: uuid.UUID | None = None,
    action: AuditAction | str | None = None,
    outcome: Outcome | str | None = None,
    object_id: str | uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """Counts the events ``query_events`` would page through with the same filters."""
    statement = _filtered(
        select(func.count()).select_from(AuditEvent),
        user=user,
        user_id=user_id,
        action=action,
        outcome=outcome,
        object_id=object_id,
        since=since,
        until=until,
    )
    with read_session(engine) as session:
        return int(session.exec(statement).one())


EXPORT_COLUMNS = (
    "seq",
    "id",
    "ts",
    "user_id",
    "username",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "event_outcome_indicator",
    "event_id_code",
    "event_type_code",
    "event_action_code",
    "detail",
    "prev_hash",
    "hash",
    "key_id",
)


def _export_record(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": str(event.id),
        "ts": _iso(event.ts),
        "user_id": None if event.user_id is None else str(event.user_id),
        "username": event.username,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "outcome": event.outcome,
        "event_outcome_indicator": Outcome(event.outcome).dicom_code,
        "event_id_code": event.event_id_code,
        "event_type_code": event.event_type_code,
        "event_action_code": event.event_action_code,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
        "key_id": event.key_id,
    }


def _csv_cell(value: Any) -> str:
    text_value = "" if value is None else canonical_json(value) if isinstance(value, dict) else str(value)
    # Spreadsheet formula injection: a login name like "=HYPERLINK(...)" must stay text when opened in Excel.
    return "'" + text_value if text_value[:1] in ("=", "+", "-", "@", "\t", "\r") else text_value


def export_events(
    engine: Engine,
    fmt: Literal["csv", "json"] = "csv",
    *,
    user: str | None = None,
    user_id: uuid.UUID | None = None,
    action: AuditAction | str | None = None,
    outcome: Outcome | str | None = None,
    object_id: str | uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[str]:
    """Streams events for auditors, oldest first, in chunks (join them, or hand them to a streaming response).

    ``json`` is one JSON array of objects with the columns of ``EXPORT_COLUMNS`` (``detail`` as an object), enough
    for anyone holding the audit key to recompute every hash of an unfiltered export. ``csv`` has a header row, ``detail`` as canonical JSON text,
    and cells starting with ``= + - @`` prefixed with ``'`` against spreadsheet formula injection. The caller
    records the export itself (``AuditAction.AUDIT_EXPORT``).

    Args:
        engine: from ``init_db``.
        fmt: ``"csv"`` or ``"json"``.
        user, user_id, action, outcome, object_id, since, until: as for ``query_events``.

    Returns:
        An iterator of text chunks (one per event plus framing); rows are read lazily in batches.

    Raises:
        ValueError: unknown ``fmt``, ``action`` or ``outcome`` (raised here, before anything is streamed).
    """
    if fmt not in ("csv", "json"):
        raise ValueError(f"export format {fmt!r} is not supported: use 'csv' or 'json'")
    base = _filtered(
        select(AuditEvent),
        user=user,
        user_id=user_id,
        action=action,
        outcome=outcome,
        object_id=object_id,
        since=since,
        until=until,
    )
    return _export_stream(engine, fmt, base)


def _export_stream(engine: Engine, fmt: str, base: SelectOfScalar[AuditEvent]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def csv_line(values: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield csv_line(list(EXPORT_COLUMNS)) if fmt == "csv" else "["
    first, last_seq = True, 0
    while True:
        # a short read transaction per batch: a slow download never pins a snapshot for long
        with read_session(engine) as session:
            batch = list(
                session.exec(
                    base.where(col(AuditEvent.seq) > last_seq).order_by(col(AuditEvent.seq)).limit(_BATCH)
                ).all()
            )
        if not batch:
            break
        for event in batch:
            record = _export_record(event)
            if fmt == "csv":
                yield csv_line([_csv_cell(record[name]) for name in EXPORT_COLUMNS])
            else:
                yield ("\n" if first else ",\n") + json.dumps(record, ensure_ascii=False, sort_keys=False)
            first = False
        last_seq = batch[-1].seq or last_seq
    if fmt == "json":
        yield "\n]\n" if not first else "]\n"
