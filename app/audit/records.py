"""Inputs, runs and exports: the records that make a result traceable and reproducible.

DICOM UIDs never reach the database in clear unless the installation opts in: they are stored as
HMAC-SHA256 under a 32-byte secret kept in a file outside the database (``load_or_create_secret``), so a copy
of the database alone cannot be joined against a PACS, while the same study still maps to the same value.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import stat
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import col, select

from app.audit.actions import AuditAction
from app.audit.chain import append_in_transaction, canonical_json
from app.audit.db import read_session, write_session
from app.audit.errors import InsecureSecretFileError, InvalidRunTransitionError, RunNotFoundError
from app.audit.models import Export, InputImage, Outcome, Run, RunStatus, User, utc_now

SECRET_BYTES = 32
INTERRUPTED_REASON = "the server stopped before the run finished"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ALLOWED: dict[RunStatus, set[RunStatus]] = {
    RunStatus.QUEUED: {RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED},
    RunStatus.RUNNING: {RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED},
}
_FINISH_ACTION = {
    RunStatus.DONE: (AuditAction.RUN_DONE, Outcome.SUCCESS),
    RunStatus.FAILED: (AuditAction.RUN_FAILED, Outcome.SERIOUS_FAILURE),
    RunStatus.CANCELLED: (AuditAction.CANCEL, Outcome.SUCCESS),
}


# --- the UID secret ----------------------------------------------------------------------------------------


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """Reads the HMAC secret, creating it (32 random bytes, mode 0600) on first use.

    Keep the file outside the database and out of database backups. Creation is atomic (written beside, then
    hard-linked into place), so two processes starting together end up with the same secret.

    Args:
        path: the secret file; its directory is created with mode 0700 if missing.

    Returns:
        The 32-byte secret.

    Raises:
        InsecureSecretFileError: the file is accessible to group/others or is not exactly 32 bytes.
    """
    target = Path(path).expanduser()
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(SECRET_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, target)  # fails if another process won the race: then use theirs
        finally:
            temporary.unlink(missing_ok=True)
    mode = stat.S_IMODE(target.stat().st_mode)
    if mode & 0o077:
        raise InsecureSecretFileError(f"secret file {str(target)!r} has mode {mode:04o}: run chmod 600 on it")
    secret = target.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise InsecureSecretFileError(
            f"secret file {str(target)!r} holds {len(secret)} bytes, expected {SECRET_BYTES}: restore it from backup"
        )
    return secret


def hmac_uid(secret: bytes, uid: str) -> str:
    """Keyed hash of a DICOM UID: HMAC-SHA256(secret, uid) as 64 lowercase hex characters.

    Trailing NUL/space padding (DICOM UI values are padded to even length) is stripped first, so the same UID
    always maps to the same value. The result never equals the UID (it has no dots).

    Args:
        secret: at least 16 bytes, from ``load_or_create_secret``.
        uid: e.g. a (0020,000D) Study Instance UID.

    Raises:
        ValueError: ``secret`` shorter than 16 bytes or empty ``uid``.
    """
    if len(secret) < 16:
        raise ValueError(f"HMAC secret of {len(secret)} bytes is too short: use load_or_create_secret (32 bytes)")
    value = uid.rstrip("\x00 ").strip()
    if not value:
        raise ValueError("empty UID: pass None for a missing UID instead")
    return hmac.new(secret, value.encode("ascii", "strict"), hashlib.sha256).hexdigest()


# --- inputs ------------------------------------------------------------------------------------------------


def _check_sha256(name: str, value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"{name}={value!r} is not a SHA-256 digest: pass hashlib.sha256(...).hexdigest()")
    return value


def record_input(
    engine: Engine,
    *,
    user: User,
    upload_sha256: str,
    pixel_sha256: str,
    rows: int,
    cols: int,
    source_format: str,
    uid_secret: bytes,
    modality: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    store_plain_uids: bool = False,
    now: datetime | None = None,
) -> InputImage:
    """Records an uploaded image (audited ``upload``, DCM 110107 Import).

    Args:
        engine: from ``init_db``.
        user: the uploader.
        upload_sha256: SHA-256 hex of the uploaded bytes.
        pixel_sha256: SHA-256 hex of the decoded pixel array.
        rows: (0028,0010) Rows, > 0.
        cols: (0028,0011) Columns, > 0.
        source_format: "dicom", "png", "jpeg".
        uid_secret: HMAC key from ``load_or_create_secret``.
        modality: (0008,0060) Modality, e.g. "CR", "DX"; ``None`` for non-DICOM.
        study_instance_uid: (0020,000D), or ``None``.
        series_instance_uid: (0020,000E), or ``None``.
        sop_instance_uid: (0008,0018), or ``None``.
        store_plain_uids: also keep the UIDs in clear (site opt-in; off by default).
        now: upload time (aware); default now.

    Returns:
        The stored record.

    Raises:
        ValueError: malformed digest or non-positive size.
    """
    _check_sha256("upload_sha256", upload_sha256)
    _check_sha256("pixel_sha256", pixel_sha256)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"image size {rows}x{cols}: rows and cols must be positive")

    def keyed(uid: str | None) -> str | None:
        return None if uid is None else hmac_uid(uid_secret, uid)

    def plain(uid: str | None) -> str | None:
        return uid.rstrip("\x00 ").strip() if store_plain_uids and uid is not None else None

    with write_session(engine) as session:
        record = InputImage(
            upload_sha256=upload_sha256,
            pixel_sha256=pixel_sha256,
            modality=modality,
            rows=rows,
            cols=cols,
            source_format=source_format,
            study_uid_hmac=keyed(study_instance_uid),
            series_uid_hmac=keyed(series_instance_uid),
            sop_uid_hmac=keyed(sop_instance_uid),
            study_instance_uid=plain(study_instance_uid),
            series_instance_uid=plain(series_instance_uid),
            sop_instance_uid=plain(sop_instance_uid),
            created_by=user.id,
            created_at=now or utc_now(),
        )
        session.add(record)
        session.flush()
        append_in_transaction(
            session,
            AuditAction.UPLOAD,
            user=user,
            object_type="input_image",
            object_id=record.id,
            detail={"source_format": source_format, "modality": modality, "rows": rows, "cols": cols},
            now=now,
        )
    return record


# --- runs --------------------------------------------------------------------------------------------------


def _plain_json(name: str, value: Any) -> Any:
    try:
        return json.loads(canonical_json(value))
    except ValueError as exc:
        raise ValueError(f"{name} must be plain JSON (str/int/float/bool/None/list/dict): {exc}") from exc


def create_run(
    engine: Engine,
    *,
    user: User,
    input_id: uuid.UUID,
    params: Mapping[str, Any],
    seeds: Sequence[int],
    model_sha256: str,
    library_versions: Mapping[str, str],
    now: datetime | None = None,
) -> Run:
    """Records a queued run with everything needed to reproduce it (audited ``generate``).

    Args:
        engine: from ``init_db``.
        user: who asked for it.
        input_id: the ``InputImage``.
        params: every generation parameter (prompt, strength, guidance, steps, ...), plain JSON.
        seeds: one seed per sample.
        model_sha256: hash of the model folder.
        library_versions: e.g. ``{"torch": "2.5.1", "diffusers": "0.32.0"}``.
        now: creation time (aware); default now.

    Returns:
        The run, status ``queued``.

    Raises:
        ValueError: non-JSON params, non-int seeds, malformed digest.
    """
    _check_sha256("model_sha256", model_sha256)
    if not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise ValueError(f"seeds={list(seeds)!r}: pass one or more integers")
    with write_session(engine) as session:
        run = Run(
            user_id=user.id,
            input_id=input_id,
            params=_plain_json("params", dict(params)),
            seeds=list(seeds),
            model_sha256=model_sha256,
            library_versions=_plain_json("library_versions", dict(library_versions)),
            status=RunStatus.QUEUED.value,
            created_at=now or utc_now(),
        )
        session.add(run)
        session.flush()
        append_in_transaction(
            session,
            AuditAction.GENERATE,
            user=user,
            object_type="run",
            object_id=run.id,
            detail={"input_id": str(input_id), "samples": len(run.seeds), "model_sha256": model_sha256},
            now=now,
        )
    return run


def get_run(engine: Engine, run_id: uuid.UUID) -> Run | None:
    """Returns the run, or ``None``."""
    with read_session(engine) as session:
        return session.get(Run, run_id)


def list_runs(engine: Engine, *, user_id: uuid.UUID | None = None, limit: int = 100, offset: int = 0) -> list[Run]:
    """Returns runs, newest first, optionally only ``user_id``'s."""
    statement = select(Run).order_by(col(Run.created_at).desc()).offset(offset).limit(limit)
    if user_id is not None:
        statement = statement.where(Run.user_id == user_id)
    with read_session(engine) as session:
        return list(session.exec(statement).all())


def start_run(engine: Engine, run_id: uuid.UUID, *, now: datetime | None = None) -> Run:
    """Moves a run from ``queued`` to ``running`` (the worker picked it up; not audited).

    Raises:
        RunNotFoundError, InvalidRunTransitionError.
    """
    with write_session(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        _check_transition(run, RunStatus.RUNNING)
        run.status, run.started_at = RunStatus.RUNNING.value, now or utc_now()
        session.add(run)
    return run


def _check_transition(run: Run, target: RunStatus) -> None:
    current = RunStatus(run.status)
    if target not in _ALLOWED.get(current, set()):
        raise InvalidRunTransitionError(f"run {run.id} is {current.value!r}; it cannot become {target.value!r}")


def finish_run(
    engine: Engine,
    run_id: uuid.UUID,
    status: RunStatus | str,
    *,
    reason: str | None = None,
    effective_steps: int | None = None,
    timings: Mapping[str, float] | None = None,
    artifact_hashes: Mapping[str, str] | None = None,
    actor: User | None = None,
    now: datetime | None = None,
) -> Run:
    """Ends a run as ``done``, ``failed`` or ``cancelled`` (audited ``run_done``, ``run_failed`` or ``cancel``).

    Args:
        engine: from ``init_db``.
        run_id: the run.
        status: the terminal status.
        reason: why it failed or was cancelled (no patient data).
        effective_steps: denoising steps actually run (img2img runs ``strength * steps``).
        timings: seconds per phase, e.g. ``{"queue": 0.1, "generate": 12.3}``.
        artifact_hashes: SHA-256 per produced file, e.g. ``{"counterfactual.png": "..."}``.
        actor: who cancelled it; default the run's owner.
        now: end time (aware); default now.

    Returns:
        The updated run.

    Raises:
        RunNotFoundError, InvalidRunTransitionError (e.g. a run that is already finished), ValueError.
    """
    target = RunStatus(status)
    if target not in _FINISH_ACTION:
        raise InvalidRunTransitionError(f"finish_run status {target.value!r}: use 'done', 'failed' or 'cancelled'")
    now = now or utc_now()
    hashes = {
        name: _check_sha256(f"artifact_hashes[{name!r}]", value) for name, value in (artifact_hashes or {}).items()
    }
    with write_session(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        _check_transition(run, target)
        run.status, run.reason, run.finished_at = target.value, reason, now
        run.effective_steps = effective_steps
        run.timings = _plain_json("timings", dict(timings or {}))
        run.artifact_hashes = hashes
        session.add(run)
        action, outcome = _FINISH_ACTION[target]
        append_in_transaction(
            session,
            action,
            user=actor or session.get(User, run.user_id),
            object_type="run",
            object_id=run.id,
            outcome=outcome,
            detail={"status": target.value, "artifacts": len(hashes)},
            now=now,
        )
    return run


def mark_interrupted_runs(engine: Engine, *, reason: str = INTERRUPTED_REASON, now: datetime | None = None) -> int:
    """Start-up step: marks every ``queued``/``running`` run ``interrupted`` (audited ``job_interrupted`` each).

    Runs are held in memory by the worker, so after a restart nothing will ever finish them; this makes the
    loss explicit instead of leaving them "running" forever. One transaction: all or nothing.

    Args:
        engine: from ``init_db``.
        reason: stored in ``Run.reason``.
        now: time of the sweep (aware); default now.

    Returns:
        How many runs were marked.
    """
    now = now or utc_now()
    with write_session(engine) as session:
        stale = session.exec(
            select(Run)
            .where(col(Run.status).in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value]))
            .order_by(col(Run.created_at))
        ).all()
        for run in stale:
            previous = run.status
            run.status, run.reason, run.finished_at = RunStatus.INTERRUPTED.value, reason, now
            session.add(run)
            append_in_transaction(
                session,
                AuditAction.JOB_INTERRUPTED,
                object_type="run",
                object_id=run.id,
                outcome=Outcome.SERIOUS_FAILURE,
                detail={"previous_status": previous, "owner_id": str(run.user_id)},
                now=now,
            )
        return len(stale)


# --- exports -----------------------------------------------------------------------------------------------


def record_export(
    engine: Engine, *, run_id: uuid.UUID, kind: str, sha256: str, user: User, now: datetime | None = None
) -> Export:
    """Records a file leaving the system (audited ``export``, DCM 110106 Export).

    Args:
        engine: from ``init_db``.
        run_id: the run it came from.
        kind: e.g. "png", "dicom_sc", "report_pdf", "zip".
        sha256: SHA-256 hex of the exported bytes.
        user: who downloaded it.
        now: export time (aware); default now.

    Raises:
        RunNotFoundError: unknown run.
        ValueError: malformed digest or empty kind.
    """
    _check_sha256("sha256", sha256)
    if not 1 <= len(kind) <= 32:
        raise ValueError(f"export kind {kind!r}: use 1-32 characters")
    with write_session(engine) as session:
        if session.get(Run, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        export = Export(run_id=run_id, kind=kind, sha256=sha256, user_id=user.id, created_at=now or utc_now())
        session.add(export)
        session.flush()
        append_in_transaction(
            session,
            AuditAction.EXPORT,
            user=user,
            object_type="export",
            object_id=export.id,
            detail={"run_id": str(run_id), "kind": kind, "sha256": sha256},
            now=now,
        )
    return export
