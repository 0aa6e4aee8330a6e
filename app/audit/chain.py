"""The tamper-evident audit trail: the hash chain and appending to it.

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
    and ``last_seq`` never goes down (a trigger), so no number is handed out twice: a deleted tail leaves a gap.
    The state row also holds the head's hash and the schema fingerprint the application last saw, under an HMAC
    (``state_mac``); ``verify_chain`` compares it with the events, so cutting rows off the end is reported without
    an external copy. A state row that fails its MAC when an event is appended is itself recorded
    (``audit_tamper_detected``).

Checkpoints (``app.audit.anchors``)
    Signed copies of the head kept outside the database; ``verify_chain(anchors=...)`` checks that each
    checkpointed event is still there, unchanged (a rewrite or a re-used ``seq`` changes its hash).

Vocabulary and readers
    The actions and their DICOM PS3.15 codes are in ``app.audit.actions``; reading and exporting events in
    ``app.audit.query``; ``verify_chain`` and the start-up checks in ``app.audit.integrity``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text
from sqlmodel import Session, col, select

from app.audit.actions import DICOM_EVENT_CODES, AuditAction
from app.audit.db import PG_WRITE_LOCK_KEY, write_session
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
    """``ts`` as ISO 8601 UTC with microseconds (``2025-01-31T12:00:00.000001+00:00``), as hashed and exported."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def hashed_columns(event: AuditEvent) -> dict[str, Any]:
    """The columns of ``event`` that its chain hash covers (all but ``hash`` and ``key_id``), in their hashed form:
    ``ts`` as ISO 8601 UTC with microseconds, UUIDs in their dashed form. The export writes the same values."""
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
        "event_id_code": event.event_id_code,
        "event_type_code": event.event_type_code,
        "event_action_code": event.event_action_code,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
    }


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
    payload = {"v": LEGACY_HASH_VERSION if event.key_id is None else HASH_VERSION, **hashed_columns(event)}
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


def append_in_transaction(
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
    """Appends one event inside ``session``'s transaction: it commits or rolls back with the change it records.

    ``session`` must come from ``write_session`` (which holds the database-wide write lock: the chain head read here
    cannot move before the commit). ``append_event`` is the same in a transaction of its own.

    Args:
        session: an open ``write_session``.
        action, user, username, object_type, object_id, outcome, detail, now: as for ``append_event``.

    Returns:
        The event, added and flushed (``seq`` and ``hash`` set), not yet committed.

    Raises:
        ValueError: unknown ``action`` or ``outcome``.
        AuditDetailError: ``detail`` is not plain JSON or looks like patient data.
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
        append_in_transaction(session, AuditAction.AUDIT_TAMPER_DETECTED, outcome=Outcome.SERIOUS_FAILURE,
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
        return append_in_transaction(
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
