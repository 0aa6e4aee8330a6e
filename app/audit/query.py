"""Reading the audit trail: one ``EventFilter``, the admin page's page and count, the auditors' export.

Every reader takes the same filter::

    where = EventFilter(action=AuditAction.LOGIN_FAILED, since=datetime(2025, 1, 1, tzinfo=UTC))
    count_events(engine, where)
    query_events(engine, where, limit=50)            # newest first
    "".join(export_events(engine, "json", where))    # oldest first, streamed

The filter's fields may also be passed as keywords (``query_events(engine, action="view")``); they build the same
``EventFilter``. Writing events is ``app.audit.chain``'s job; this module only reads.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, Engine, func
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from app.audit.actions import AuditAction
from app.audit.chain import canonical_json, hashed_columns
from app.audit.db import READ_BATCH_ROWS, read_session
from app.audit.models import AuditEvent, Outcome

MAX_QUERY_LIMIT = 1000
"""The largest page ``query_events`` returns (rows)."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class EventFilter:
    """Which events to read. Every field that is set narrows the selection; all ``None`` selects every event.

    Values are checked and normalised when the filter is built, so a bad one fails before any SQL runs:
    ``action`` and ``outcome`` become their enums, a UUID ``object_id`` its dashed string.

    Attributes:
        user: exact username (also matches the names tried at failed logins).
        user_id: the acting user's id.
        action: one ``AuditAction`` (or its value).
        outcome: one ``Outcome`` (or its value).
        object_id: events about this object.
        since: ``ts >= since``; timezone-aware.
        until: ``ts < until``; timezone-aware.

    Raises:
        ValueError: an unknown ``action`` or ``outcome``, or a naive ``since``/``until``.
    """

    user: str | None = None
    user_id: uuid.UUID | None = None
    action: AuditAction | str | None = None
    outcome: Outcome | str | None = None
    object_id: str | uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.action is not None:
            try:
                object.__setattr__(self, "action", AuditAction(self.action))
            except ValueError:
                raise ValueError(
                    f"unknown audit action {self.action!r}: use an AuditAction value such as 'view' or 'login_failed'"
                ) from None
        if self.outcome is not None:
            try:
                object.__setattr__(self, "outcome", Outcome(self.outcome))
            except ValueError:
                choices = ", ".join(repr(o.value) for o in Outcome)
                raise ValueError(f"unknown audit outcome {self.outcome!r}: use one of {choices}") from None
        if isinstance(self.object_id, uuid.UUID):
            object.__setattr__(self, "object_id", str(self.object_id))
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name}={value!r} is a naive datetime: pass a timezone-aware one, e.g. tzinfo=UTC")

    @classmethod
    def of(cls, where: EventFilter | None = None, **criteria: Any) -> EventFilter:
        """The filter a reader was given: ``where`` itself, or one built from ``EventFilter`` fields as keywords.

        Raises:
            TypeError: both ``where`` and keywords, or a keyword that is not a field of ``EventFilter``.
            ValueError: as for ``EventFilter``.
        """
        if where is not None and criteria:
            raise TypeError(f"pass an EventFilter or its fields as keywords, not both (got {sorted(criteria)} too)")
        if where is not None:
            return where
        unknown = sorted(set(criteria) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{unknown} are not audit event filters: use {[f.name for f in fields(cls)]}")
        return cls(**criteria)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL conditions of the fields that are set, to be AND-ed on ``audit_event`` (empty: no filter)."""
        found: list[ColumnElement[bool]] = []
        if self.user is not None:
            found.append(col(AuditEvent.username) == self.user)
        if self.user_id is not None:
            found.append(col(AuditEvent.user_id) == self.user_id)
        if self.action is not None:
            found.append(col(AuditEvent.action) == AuditAction(self.action).value)
        if self.outcome is not None:
            found.append(col(AuditEvent.outcome) == Outcome(self.outcome).value)
        if self.object_id is not None:
            found.append(col(AuditEvent.object_id) == str(self.object_id))
        if self.since is not None:
            found.append(col(AuditEvent.ts) >= self.since)
        if self.until is not None:
            found.append(col(AuditEvent.ts) < self.until)
        return found

    def apply(self, statement: SelectOfScalar[_T]) -> SelectOfScalar[_T]:
        """``statement`` narrowed to the events this filter selects (a ``select`` over ``AuditEvent``)."""
        conditions = self.conditions()
        return statement.where(*conditions) if conditions else statement


def query_events(
    engine: Engine, where: EventFilter | None = None, *, limit: int = 100, offset: int = 0, **criteria: Any
) -> list[AuditEvent]:
    """Lists events for the admin page, newest first.

    Args:
        engine: from ``init_db``.
        where: which events; ``None``: every event, or the ``criteria``.
        limit: page size, 1..1000 (``MAX_QUERY_LIMIT``).
        offset: rows to skip, >= 0.
        **criteria: ``EventFilter`` fields instead of ``where`` (``action="view"``).

    Returns:
        Up to ``limit`` events, highest ``seq`` first.

    Raises:
        ValueError: ``limit``/``offset`` out of range, or a bad filter value (``EventFilter``).
        TypeError: both ``where`` and ``criteria``, or an unknown criterion.
    """
    if not 1 <= limit <= MAX_QUERY_LIMIT or offset < 0:
        raise ValueError(f"limit={limit}, offset={offset}: use 1 <= limit <= {MAX_QUERY_LIMIT} and offset >= 0")
    statement = EventFilter.of(where, **criteria).apply(select(AuditEvent))
    with read_session(engine) as session:
        return list(session.exec(statement.order_by(col(AuditEvent.seq).desc()).offset(offset).limit(limit)).all())


def count_events(engine: Engine, where: EventFilter | None = None, **criteria: Any) -> int:
    """Counts the events ``query_events`` would page through with the same filter.

    Args:
        engine: from ``init_db``.
        where, **criteria: as for ``query_events``.

    Returns:
        The number of events, >= 0.
    """
    statement = EventFilter.of(where, **criteria).apply(select(func.count()).select_from(AuditEvent))
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
    extra = {"event_outcome_indicator": Outcome(event.outcome).dicom_code, "hash": event.hash, "key_id": event.key_id}
    record = hashed_columns(event) | extra
    return {name: record[name] for name in EXPORT_COLUMNS}


def _csv_cell(value: Any) -> str:
    text_value = "" if value is None else canonical_json(value) if isinstance(value, dict) else str(value)
    # Spreadsheet formula injection: a login name like "=HYPERLINK(...)" must stay text when opened in Excel.
    return "'" + text_value if text_value[:1] in ("=", "+", "-", "@", "\t", "\r") else text_value


def export_events(
    engine: Engine, fmt: Literal["csv", "json"] = "csv", where: EventFilter | None = None, **criteria: Any
) -> Iterator[str]:
    """Streams events for auditors, oldest first, in chunks (join them, or hand them to a streaming response).

    ``json`` is one JSON array of objects with the columns of ``EXPORT_COLUMNS`` (``detail`` as an object), enough
    for anyone holding the audit key to recompute every hash of an unfiltered export. ``csv`` has a header row,
    ``detail`` as canonical JSON text, and cells starting with ``= + - @`` prefixed with ``'`` against spreadsheet
    formula injection. The caller records the export itself (``AuditAction.AUDIT_EXPORT``).

    Args:
        engine: from ``init_db``.
        fmt: ``"csv"`` or ``"json"``.
        where, **criteria: as for ``query_events``.

    Returns:
        An iterator of text chunks (one per event plus framing); rows are read lazily in batches.

    Raises:
        ValueError: unknown ``fmt`` or a bad filter value (raised here, before anything is streamed).
        TypeError: both ``where`` and ``criteria``, or an unknown criterion.
    """
    if fmt not in ("csv", "json"):
        raise ValueError(f"export format {fmt!r} is not supported: use 'csv' or 'json'")
    return _export_stream(engine, fmt, EventFilter.of(where, **criteria).apply(select(AuditEvent)))


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
                    base.where(col(AuditEvent.seq) > last_seq).order_by(col(AuditEvent.seq)).limit(READ_BATCH_ROWS)
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
