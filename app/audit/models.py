"""SQLModel tables of the audit/accounts data layer, and their coded values.

Every table has a UUID key (``audit_event`` also has an integer ``seq``, the position in the hash chain) and
timezone-aware UTC timestamps. The schema itself is created by the Alembic migrations in ``app/migrations``;
``tests/test_audit.py`` checks that the migrations and these classes agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, Dialect, String, Text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utc_now() -> datetime:
    """Returns the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that only accepts aware datetimes and always returns aware UTC ones.

    SQLite has no time-zone type: values are stored as naive UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``, which
    sorts and compares correctly as text) and get ``tzinfo=UTC`` back on load. PostgreSQL stores
    ``timestamptz``. Microseconds survive both, which the audit hash chain relies on.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one, e.g. datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Role(StrEnum):
    """Account roles: clinicians use the tool, admins also manage accounts and read the audit trail."""

    CLINICIAN = "clinician"
    ADMIN = "admin"


class RunStatus(StrEnum):
    """Life cycle of a generation run.

    ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``; ``queued`` -> ``cancelled``;
    ``queued`` | ``running`` -> ``interrupted`` only at start-up (``mark_interrupted_runs``).
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class Outcome(StrEnum):
    """Outcome of an audited action; mirrors DICOM PS3.15 A.5.1 EventOutcomeIndicator (see ``dicom_code``)."""

    SUCCESS = "success"
    MINOR_FAILURE = "minor_failure"
    SERIOUS_FAILURE = "serious_failure"
    MAJOR_FAILURE = "major_failure"

    @property
    def dicom_code(self) -> int:
        """EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure."""
        return {"success": 0, "minor_failure": 4, "serious_failure": 8, "major_failure": 12}[self.value]


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class User(SQLModel, table=True):
    """An account. There is no default account and no default password: the first admin is created explicitly."""

    __tablename__ = "app_user"  # "user" is reserved in PostgreSQL
    __table_args__ = (CheckConstraint(_in("role", Role), name="ck_app_user_role"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    username: str = Field(sa_type=String(64), unique=True, index=True)
    password_hash: str = Field(sa_type=String(255), repr=False)
    role: str = Field(default=Role.CLINICIAN.value, sa_type=String(16))
    disabled: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    failed_logins: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


class UserSession(SQLModel, table=True):
    """A server-side login session. Only the SHA-256 of the random token is stored, never the token."""

    __tablename__ = "user_session"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    token_hash: str = Field(sa_type=String(64), unique=True, index=True, repr=False)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    last_seen_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    idle_timeout_s: int
    expires_at: datetime = Field(sa_type=UTCDateTime)
    revoked: bool = Field(default=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """A named API token for scripts. Only the SHA-256 of the token is stored.

    ``expires_at`` is set at creation (``VALD_MD_API_TOKEN_DAYS``, default 90 days); revision 0002 gave tokens made
    before it ``created_at`` + 90 days. Revoking is final: re-enabling the account does not revive a token.
    """

    __tablename__ = "api_token"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    token_hash: str = Field(sa_type=String(64), unique=True, index=True, repr=False)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    name: str = Field(sa_type=String(100))
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked: bool = Field(default=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class InputImage(SQLModel, table=True):
    """An uploaded image, identified by hashes only.

    DICOM UIDs -- (0020,000D) Study Instance UID, (0020,000E) Series Instance UID, (0008,0018) SOP Instance UID --
    are stored as keyed HMAC-SHA256 hex digests (``*_uid_hmac``) whose key lives outside the database. The plain
    UID columns stay ``NULL`` unless the installation opted in to plain storage.
    """

    __tablename__ = "input_image"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    upload_sha256: str = Field(sa_type=String(64), index=True)
    pixel_sha256: str = Field(sa_type=String(64), index=True)
    modality: str | None = Field(default=None, sa_type=String(16))
    rows: int
    cols: int
    source_format: str = Field(sa_type=String(16))
    study_uid_hmac: str | None = Field(default=None, sa_type=String(64), index=True)
    series_uid_hmac: str | None = Field(default=None, sa_type=String(64))
    sop_uid_hmac: str | None = Field(default=None, sa_type=String(64), index=True)
    study_instance_uid: str | None = Field(default=None, sa_type=String(64))
    series_instance_uid: str | None = Field(default=None, sa_type=String(64))
    sop_instance_uid: str | None = Field(default=None, sa_type=String(64))
    created_by: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)


class Run(SQLModel, table=True):
    """One counterfactual generation: everything needed to reproduce it, and what it produced."""

    __tablename__ = "run"
    __table_args__ = (CheckConstraint(_in("status", RunStatus), name="ck_run_status"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    input_id: uuid.UUID = Field(foreign_key="input_image.id", index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    seeds: list[int] = Field(default_factory=list, sa_type=JSON)
    effective_steps: int | None = Field(default=None)
    model_sha256: str = Field(sa_type=String(64))
    library_versions: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    timings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    status: str = Field(default=RunStatus.QUEUED.value, sa_type=String(16), index=True)
    reason: str | None = Field(default=None, sa_type=Text)
    artifact_hashes: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Export(SQLModel, table=True):
    """A file that left the system (PNG/DICOM/report), by content hash."""

    __tablename__ = "export"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    run_id: uuid.UUID = Field(foreign_key="run.id", index=True)
    kind: str = Field(sa_type=String(32))
    sha256: str = Field(sa_type=String(64))
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)


class AuditEvent(SQLModel, table=True):
    """One append-only audit record, a link of the hash chain.

    ``hash`` = HMAC-SHA256 under the key ``key_id`` of the canonical JSON of every other column (``prev_hash``
    included); events written before the chain was keyed (``key_id`` ``NULL``, ``seq`` <= the chain state's
    ``legacy_until``) keep their plain SHA-256, see ``app.audit.chain``. ``UPDATE``/``DELETE`` are refused by
    database triggers. ``event_*_code`` are DICOM PS3.15 / PS3.16 (scheme "DCM") codes where one fits, else ``NULL``.
    """

    __tablename__ = "audit_event"
    __table_args__ = {"sqlite_autoincrement": True}

    seq: int | None = Field(default=None, primary_key=True)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, unique=True)
    ts: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, index=True)
    user_id: uuid.UUID | None = Field(default=None, foreign_key="app_user.id", index=True)
    username: str = Field(sa_type=String(150), index=True)
    action: str = Field(sa_type=String(32), index=True)
    object_type: str | None = Field(default=None, sa_type=String(32))
    object_id: str | None = Field(default=None, sa_type=String(64), index=True)
    outcome: str = Field(default=Outcome.SUCCESS.value, sa_type=String(16))
    event_id_code: str | None = Field(default=None, sa_type=String(16))
    event_type_code: str | None = Field(default=None, sa_type=String(16))
    event_action_code: str | None = Field(default=None, sa_type=String(1))
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    prev_hash: str = Field(sa_type=String(64))
    hash: str = Field(sa_type=String(64), unique=True)
    key_id: str | None = Field(default=None, sa_type=String(32))


class AuditChainState(SQLModel, table=True):
    """The chain's signed high-water mark: one row (``id`` 1), updated with every event.

    ``last_seq`` is the highest ``seq`` ever handed out (never lowered: a trigger refuses it), so a deleted tail
    leaves a gap that ``verify_chain`` reports and no ``seq`` is used twice. ``head_hash`` is the hash of that
    event, ``legacy_until`` the last event written before the chain was keyed (0 for a database created keyed),
    ``schema_fingerprint`` what the application last saw of the schema and its triggers (SQLite
    ``PRAGMA schema_version`` and the trigger definitions). ``mac`` = HMAC-SHA256 under ``key_id`` over the other
    columns (``app.audit.chain.state_mac``); empty until ``init_db`` first signs the row.
    """

    __tablename__ = "audit_chain_state"

    id: int = Field(default=1, primary_key=True)
    last_seq: int = Field(default=0)
    head_hash: str = Field(sa_type=String(64))
    legacy_until: int = Field(default=0)
    schema_fingerprint: str = Field(default="", sa_type=String(200))
    key_id: str | None = Field(default=None, sa_type=String(32))
    mac: str = Field(default="", sa_type=String(64))


class JobRecord(SQLModel, table=True):
    """One accepted review job, shared by every front process of a site (``VALD_MD_JOB_STATE=database``).

    ``app.jobs.jobtable`` writes it: a front inserts the row when it accepts a job (``queued``), a worker claims it
    (``running``, ``claimed_by`` its front id, ``attempts`` + 1, ``heartbeat_at`` refreshed every few seconds) and
    ends it (``done`` | ``failed`` | ``cancelled``). A ``running`` row whose heartbeat stopped goes back to
    ``queued`` once, then ``failed`` (``interrupted`` is never written here: that word belongs to the single-process
    mode). ``id`` is the job id (the audit run's id as 32 hex digits). ``cancel_requested_by`` is the id of the
    user who asked another front to cancel the job (recorded as the run's actor). The run folder's ``job.json``
    stays the artifact of record, and the only place of the request's parameters (its case label included): this
    row is the queue.
    """

    __tablename__ = "job"
    __table_args__ = (CheckConstraint(_in("state", RunStatus), name="ck_job_state"),)

    id: str = Field(sa_type=String(32), primary_key=True)
    owner: str = Field(sa_type=String(64), index=True)
    state: str = Field(default=RunStatus.QUEUED.value, sa_type=String(16), index=True)
    cost: int = Field(default=0)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime, index=True)
    submitted_by: str = Field(sa_type=String(128))
    claimed_by: str | None = Field(default=None, sa_type=String(128))
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    attempts: int = Field(default=0)
    step: int = Field(default=0)
    total: int = Field(default=0)
    cancel_requested: bool = Field(default=False)
    cancel_requested_by: uuid.UUID | None = Field(default=None)
    error: str | None = Field(default=None, sa_type=Text)
