"""The review queue: a bounded, fair queue of jobs and the single worker thread that owns the engine.

One process holds one model copy, and the diffusion pipeline is not thread-safe, so exactly one thread runs
:func:`app.runs.review.run_review`; requests only enqueue. A job's life cycle is

    queued -> running -> done | failed | cancelled          (queued -> cancelled before it starts)
    queued | running -> interrupted                         (found unfinished when the server starts)

Everything a job produces lives on disk under ``<runs_dir>/<job_id>/``: the upload (under a name the server
chooses, never the client's), the artifacts ``run_review`` writes, and ``job.json`` (state, parameters,
timings) so that the history survives a restart. Memory holds only small state: the progress counters, the
latest preview (a latent-sized array) and, while a job waits, its decoded pixels.

Jobs belong to an ``owner`` (a user id string); every lookup takes the owner and treats another user's job as
unknown, so one user can never learn that another user's job id exists (administrators pass ``any_owner``).

Sharing the one worker: a user may have at most ``max_jobs_per_user`` runs queued or running
(:class:`UserQueueLimitError`, HTTP 429); the waiting runs together may cost at most ``cost_budget`` (and number at
most ``queue_size``; :class:`QueueFullError`, HTTP 503), where a run's cost is ``(effective steps + 1) x samples``
(:func:`job_cost`: the samples run as one batch, so every denoising step costs about one UNet evaluation per
sample; the model's fixed resolution makes the image size irrelevant). The worker does not take the oldest run but
the next run of the user who has waited longest since their last run ended (or since they queued, if later):
round robin between users, first come first served within a user (:meth:`JobManager.fair_order`). Queue positions
and start estimates follow that order; an estimate is the measured seconds per UNet evaluation and sample times
the cost of every run ahead, plus each run's measured fixed overhead, plus what the running job has left.

With an audit database (``db``), the database is the record of every run: ``submit`` records the upload
(``audit.record_input``: hashes, size, HMAC'd DICOM UIDs) and the run (``audit.create_run``: parameters, seeds,
model hash, library versions) and uses the run's id as the job id; the worker moves the run to ``running`` and
finishes it as ``done`` / ``failed`` / ``cancelled`` with the reason, effective steps, timings and artifact
hashes, always *before* the job's in-memory state changes. At start-up ``audit.mark_interrupted_runs`` marks
unfinished runs ``interrupted`` and :meth:`JobManager._load_history` does the same to their ``job.json``, taking
the database's word where the two differ. ``job.json`` keeps what the pages need without a query.

The stored upload is de-identified (``app.imaging.deid``) unless ``store_identified_uploads`` is set.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine as Database

from app import attribution, audit, filemodes, imaging
from app.engine import CounterfactualEngine, GenerationCancelled, effective_steps, library_versions
from app.fileio import sha256_bytes as sha256
from app.imaging.deid import deidentify
from app.lungs import LungSegmenter
from app.runs import folder
from app.runs.folder import RunFolder, RunFolderError, decode_png_unit
from app.runs.record import RunRecord
from app.runs.review import ReviewRequest, resolve_request, run_review

logger = logging.getLogger("vald_md.jobs")

JOB_FILE = "job.json"
UPLOAD_STEM = "upload"
MASK_UPLOAD = "mask-upload.png"
THUMBNAIL = "thumbnail.png"
_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}

Runner = Callable[..., RunRecord]
"""Signature of :func:`app.runs.review.run_review`; injectable so tests can gate a job."""


class JobState(StrEnum):
    """Where a job is in its life cycle (the same words as ``app.audit.models.RunStatus``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        """True for the terminal states (done, failed, cancelled, interrupted)."""
        return self not in (JobState.QUEUED, JobState.RUNNING)


class QueueFullError(RuntimeError):
    """The queue holds ``capacity`` waiting jobs already, or the new one would take the waiting jobs' total cost
    past the budget (``cost`` and ``budget`` then say by how much). The message is written for the user."""

    def __init__(self, queue_length: int, capacity: int, *, queued_cost: int | None = None, cost: int | None = None,
                 budget: int | None = None) -> None:
        self.queue_length = queue_length
        self.capacity = capacity
        self.queued_cost, self.cost, self.budget = queued_cost, cost, budget
        if budget is None:
            message = (f"The review queue is full ({queue_length} of {capacity} runs waiting). "
                       f"Please try again when a run has finished.")
        else:
            message = (f"The review queue is fully booked: the {queue_length} runs waiting need {queued_cost} "
                       f"step-samples and this run {cost}, more than this server's {budget}. Please try again "
                       f"when a run has finished, or ask for fewer steps or samples.")
        super().__init__(message)


class UserQueueLimitError(RuntimeError):
    """The user already has ``limit`` runs queued or running. The message is written for the user."""

    def __init__(self, active: int, limit: int, retry_after_s: int) -> None:
        self.active = active
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"You already have {active} runs queued or running; this server takes at most {limit} per "
                         f"user at a time so that everyone gets a turn. Please wait for one to finish, or cancel "
                         f"one.")


class JobNotFoundError(LookupError):
    """No job with that id belongs to this user."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__("No such run. It may belong to another user or have been removed.")


class WorkerStoppedError(RuntimeError):
    """The worker thread is not running (server shutting down, or it crashed)."""


class JobNotReadyError(RuntimeError):
    """The job has no artifacts (yet): it is queued, running, failed or cancelled."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(f"This run is {state}; its images are available once it is done.")


@dataclass(eq=False)
class Job:
    """One review run. Mutated only by :class:`JobManager` (state) and its worker (progress).

    Attributes:
        id: 32 hex digits (uuid4), also the folder name under ``runs_dir``; unguessable.
        owner: user id string of the submitter.
        request: the generation parameters; ``seed`` is always fixed at submission so it can be shown early.
        run_dir: ``<runs_dir>/<id>``.
        upload_name: file name of the stored upload inside ``run_dir`` (``upload.dcm``/``.png``/``.jpg``).
        input_summary: ``ImageMeta.public_summary()`` of the upload (non-identifying).
        has_mask: a region mask was uploaded with the image.
        effective_steps: ``int(steps * strength)``; unet_evaluations: the count the engine reported (0 before).
        step, total: progress, in UNet evaluations (total known from the first step on).
        elapsed_s: seconds since denoising started. eta_s: estimated seconds left, ``None`` when unknown.
        error: message for the user when failed / interrupted.
        seeds: one per sample (from the record once done). timings_s: engine stage timings, plus ``queued``
            (seconds waited) and ``run`` (seconds in the worker).
        input_id: the ``audit.InputImage`` id of the upload (``None`` without an audit database).
        rerun_of: the job id this one re-runs (administrators' reproducibility check), else ``None``.
        version: bumped on every change; progress streams compare it.
    """

    id: str
    owner: str
    request: ReviewRequest
    run_dir: Path
    upload_name: str
    input_summary: dict[str, Any]
    has_mask: bool
    effective_steps: int
    created_at: datetime
    state: JobState = JobState.QUEUED
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    unet_evaluations: int = 0
    error: str | None = None
    seeds: list[int] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    input_id: str | None = None
    rerun_of: str | None = None
    version: int = 0
    queued_tick: int = field(default=0, repr=False)  # JobManager's order of events (fair_order)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    _user: audit.User | None = field(default=None, repr=False)
    _cancelled_by: audit.User | None = field(default=None, repr=False)
    _cancel_reason: str | None = field(default=None, repr=False)
    _decoded: imaging.DecodedImage | None = field(default=None, repr=False)
    _mask: np.ndarray | None = field(default=None, repr=False)
    _preview: np.ndarray | None = field(default=None, repr=False)
    _preview_png: tuple[int, bytes] | None = field(default=None, repr=False)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def source_format(self) -> str:
        """``"dicom"``, ``"png"`` or ``"jpeg"``."""
        return str(self.input_summary.get("source_format", ""))

    @property
    def cost(self) -> int:
        """What this run asks of the worker, in step-samples: :func:`job_cost` of its parameters."""
        return (self.effective_steps + 1) * max(1, self.request.samples)

    @property
    def upload_path(self) -> Path:
        """The stored upload."""
        return self.run_dir / self.upload_name

    @property
    def has_preview(self) -> bool:
        """A progress preview is available."""
        return self._preview is not None

    def touch(self) -> None:
        """Record that something changed and wake the progress streams listening to this job."""
        self.version += 1
        for notify in tuple(self._listeners):
            notify()

    def add_listener(self, notify: Callable[[], None]) -> None:
        """Call ``notify()`` after every change, from the thread that made it (must be cheap and thread-safe)."""
        self._listeners.append(notify)

    def remove_listener(self, notify: Callable[[], None]) -> None:
        """Stop calling ``notify`` (no error if it was not registered)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(notify)

    def to_json(self) -> dict[str, Any]:
        """The persistent description written to ``job.json`` (no pixels, no client file name)."""
        return {
            "id": self.id, "owner": self.owner, "state": self.state.value, "request": asdict(self.request),
            "upload_name": self.upload_name, "input_summary": self.input_summary, "has_mask": self.has_mask,
            "effective_steps": self.effective_steps, "unet_evaluations": self.unet_evaluations,
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at), "error": self.error, "seeds": self.seeds,
            "timings_s": self.timings_s, "input_id": self.input_id, "rerun_of": self.rerun_of,
        }

    @classmethod
    def from_json(cls, run_dir: Path, data: dict[str, Any]) -> Job:
        """Rebuild a job from its ``job.json`` (used at start-up)."""
        req = ReviewRequest(**{k: v for k, v in data["request"].items() if k in ReviewRequest.__dataclass_fields__})
        return cls(id=data["id"], owner=data["owner"], request=req, run_dir=run_dir, upload_name=data["upload_name"],
                   input_summary=data.get("input_summary", {}), has_mask=bool(data.get("has_mask")),
                   effective_steps=int(data.get("effective_steps", 0)),
                   created_at=datetime.fromisoformat(data["created_at"]),
                   state=JobState(data["state"]), started_at=_parse(data.get("started_at")),
                   finished_at=_parse(data.get("finished_at")), error=data.get("error"),
                   unet_evaluations=int(data.get("unet_evaluations", 0)), seeds=list(data.get("seeds", [])),
                   timings_s=dict(data.get("timings_s", {})), input_id=data.get("input_id"),
                   rerun_of=data.get("rerun_of"))


METHOD_COST_FACTOR = {"ddim_inversion": 2, "classifier_guided": 2}
"""UNet work of a map method relative to the SDEdit map's: DDIM inversion inverts then denoises (two passes);
the classifier-guided map back-propagates through the autoencoder's decoder at every step (about as much again)."""


def job_cost(req: ReviewRequest) -> int:
    """A run's cost in step-samples: ``(int(steps * strength) + 1) * samples``, times the map method's
    :data:`METHOD_COST_FACTOR`. The samples are denoised as one batch, so each step costs about one UNet evaluation
    per sample (PNDM adds one warm-up step); the image is always denoised at the model's own resolution, so its
    size does not count."""
    factor = METHOD_COST_FACTOR.get(req.map_method or "sdedit", 1)
    return (effective_steps(req.steps, req.strength) + 1) * max(1, req.samples) * factor


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _parse(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def _now() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, data: bytes) -> None:
    filemodes.write_private(path, data)


def gray_png(img: np.ndarray, *, longest_side: int | None = None, upscale: bool = False) -> bytes:
    """Encode a float (H, W) image in [0, 1] as an 8-bit grayscale PNG.

    Args:
        img: float (H, W) in [0, 1].
        longest_side: target longest side in pixels; ``upscale=False`` only ever shrinks (thumbnails),
            ``upscale=True`` enlarges by a whole factor up to it (previews).
    """
    pil = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if longest_side:
        w, h = pil.size
        if upscale:
            f = max(1, longest_side // max(w, h))
            if f > 1:
                pil = pil.resize((w * f, h * f), Image.Resampling.BILINEAR)
        elif max(w, h) > longest_side:
            pil.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def read_png_unit(path: Path) -> np.ndarray:
    """Read a grayscale PNG written by ``imaging.to_png_bytes`` (8 or 16 bit) as float32 (H, W) in [0, 1], unchecked
    (run files: :meth:`app.runs.folder.RunFolder.read_png_unit`, which checks their SHA-256)."""
    return decode_png_unit(Path(path).read_bytes())


class JobManager:
    """Owns the queue, the worker thread and the engine's time.

    Args:
        engine: the loaded engine (or any object with ``generate_request``, ``check_inputs`` and ``info`` for tests).
        runs_dir: folder that receives one sub-folder per job; existing ``job.json`` files are loaded as history.
        queue_size: jobs that may wait behind the running one (>= 1).
        max_jobs_per_user: runs one owner may have queued or running at once; ``None`` = no limit.
        cost_budget: total :func:`job_cost` of the waiting jobs, step-samples; a job that would pass it is refused
            (a job always fits an empty queue); ``None`` = no limit.
        runner: the function that performs one run; :func:`app.runs.review.run_review` unless a test injects one.
        preview_size: longest side in pixels of preview PNGs.
        max_steps, max_samples: limits on what a user may ask for (on top of the engine's own ranges).
        db: the audit database (``audit.init_db``); ``None`` keeps no records beyond ``job.json`` (tests).
        uid_secret: the HMAC key for DICOM UIDs (``audit.load_or_create_secret``); required with ``db``.
        store_plain_uids: also store DICOM UIDs in clear in the database (site opt-in).
        store_identified_uploads: keep uploads as received instead of de-identifying the stored copy.
        segmenter: the lung segmenter handed to every run (``ReviewRequest.lung_mask`` restricts the map to the
            lungs it finds); ``None``: runs are not restricted and their records say why.
        classifier: the lesion classifier (``app.lesions.LesionClassifier``) handed to every run; the
            ``classifier_guided`` map method needs it (and the segmenter), and is refused at submission without.
    """

    def __init__(self, engine: CounterfactualEngine, runs_dir: Path, *, queue_size: int = 8,
                 runner: Runner = run_review, preview_size: int = 192, thumbnail_size: int = 96,
                 max_steps: int = 1000, max_samples: int = 16, db: Database | None = None,
                 uid_secret: bytes | None = None, store_plain_uids: bool = False,
                 store_identified_uploads: bool = False, segmenter: LungSegmenter | None = None,
                 classifier: Any = None, max_jobs_per_user: int | None = None,
                 cost_budget: int | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        if db is not None and uid_secret is None:
            raise ValueError("uid_secret is required with db: pass audit.load_or_create_secret(path)")
        self.db = db
        self.uid_secret = uid_secret
        self.store_plain_uids = store_plain_uids
        self.store_identified_uploads = store_identified_uploads
        self.engine = engine
        self.segmenter = segmenter
        self.classifier = classifier
        self.runs_dir = Path(runs_dir)
        self.capacity = queue_size
        self.max_jobs_per_user = max_jobs_per_user
        self.cost_budget = cost_budget
        self.preview_size = preview_size
        self.thumbnail_size = thumbnail_size
        self.max_steps = max_steps
        self.max_samples = max_samples
        self._runner = runner
        self._jobs: dict[str, Job] = {}
        self._pending: list[Job] = []  # in submission order; the worker takes them in fair_order()
        self._tick = 0  # orders submissions and ends of runs (fair_order)
        self._served: dict[str, int] = {}  # owner -> tick at which their latest job ended
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_eval: float | None = None  # per UNet evaluation and sample (job_cost's unit)
        self._overhead_s: float | None = None  # per run, outside denoising: decoding, maps, files
        self._thread: threading.Thread | None = None
        filemodes.private_dir(self.runs_dir)
        self._load_history()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="vald-md-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, stop the worker and wait up to ``timeout`` seconds for it.

        Jobs still waiting stay ``queued`` on disk and are marked ``interrupted`` at the next start.
        """
        with self._cond:
            self._stopping = True
            if self._running is not None:
                self._running._cancel_reason = "the server was shutting down"
                self._running.cancel_event.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def worker_alive(self) -> bool:
        """The worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._pending)

    @property
    def is_full(self) -> bool:
        """A submission now would get :class:`QueueFullError` (whatever its cost)."""
        return len(self._pending) >= self.capacity or (
            self.cost_budget is not None and self.queued_cost >= self.cost_budget)

    @property
    def queued_cost(self) -> int:
        """Total :func:`job_cost` of the waiting jobs, step-samples."""
        return sum(j.cost for j in self._pending)

    # -- submission -----------------------------------------------------------------------------------------------
    def check_request(self, decoded: imaging.DecodedImage, req: ReviewRequest) -> ReviewRequest:
        """Refuse parameters before queueing (the engine's ranges plus this server's limits); returns the request
        with the model's map recommendations filled in (:func:`app.runs.review.resolve_request`).

        Raises:
            ValueError: a parameter is out of range; the message names it and the allowed range.
        """
        if req.steps > self.max_steps:
            raise ValueError(f"steps={req.steps} exceeds this server's limit of {self.max_steps}")
        if req.samples > self.max_samples:
            raise ValueError(f"samples={req.samples} exceeds this server's limit of {self.max_samples}")
        req = resolve_request(req, self.engine.info, classifier=self.classifier, segmenter=self.segmenter)
        self.engine.check_inputs(decoded.pixels, request=req)
        return req

    def submit(self, owner: str | audit.User, data: bytes, req: ReviewRequest, *, mask_png: bytes | None = None,
               decoded: imaging.DecodedImage | None = None, rerun_of: str | None = None) -> Job:
        """Validate an upload and its parameters synchronously, store it, and queue a job.

        No job exists and nothing is stored unless every check passes (a refused upload is audited).

        Args:
            owner: the submitter: an ``audit.User`` (required with an audit database; the job's owner is then
                ``str(user.id)``) or a user id string.
            data: the uploaded file (DICOM with or without extension, PNG or JPEG).
            req: parameters, never changed; the job's request is a copy with the seed drawn now when ``None`` (it
                is recorded and shown) and the map method and reference resolved.
            mask_png: optional region mask image; must decode (see ``attribution.load_mask_png``).
            decoded: pass when the caller already decoded ``data`` with ``req.window``.
            rerun_of: the job id this submission re-runs (recorded with the run).

        Raises:
            UserQueueLimitError: the owner has ``max_jobs_per_user`` runs queued or running.
            QueueFullError: ``queue_size`` jobs are already waiting, or this one would pass ``cost_budget``.
            imaging.ImagingError: the file cannot be read as a radiograph (message for the clinician).
            ValueError: a parameter or the mask is invalid.
            WorkerStoppedError: the server is shutting down.
        """
        user = owner if isinstance(owner, audit.User) else None
        owner_id = str(user.id) if user is not None else str(owner)
        if self.db is not None and user is None:
            raise ValueError("submit: pass the audit.User as owner when the manager keeps an audit database")
        # 1. cheap refusals first: a stopped worker, the user's limit, a full queue need no decoding
        with self._cond:
            self._check_capacity(owner_id, job_cost(req))
        # 2. decode, validate and de-identify (raises ImagingError / ValueError; nothing is stored yet)
        try:
            if decoded is None:
                decoded = imaging.decode_image(data, window=req.window)
            if req.seed is None:
                req = replace(req, seed=int(np.random.default_rng().integers(0, 2**31 - 1)))
            req = self.check_request(decoded, req)
            mask = attribution.load_mask_png(mask_png, decoded.pixels.shape) if mask_png else None
            summary = decoded.meta.public_summary()
            source_format = str(summary.get("source_format"))
            stored = data if self.store_identified_uploads else deidentify(data, source_format)
        except (imaging.ImagingError, ValueError) as e:
            self._audit_refused(user, data, e)
            raise
        # 3. the audit records: the upload, then the run, whose id becomes the job id
        seeds = [req.seed + i for i in range(req.samples)]
        input_id: str | None = None
        if self.db is not None and user is not None:
            input_id, job_id = self._record_submission(user, data, decoded, req, seeds, mask is not None, rerun_of)
        else:
            job_id = uuid.uuid4().hex
        # 4. store the upload under a server-chosen name
        run_dir = self.runs_dir / job_id
        upload_name = UPLOAD_STEM + _SUFFIX.get(source_format, ".bin")
        job = Job(id=job_id, owner=owner_id, request=req, run_dir=run_dir, upload_name=upload_name,
                  input_summary=summary, has_mask=mask is not None,
                  effective_steps=effective_steps(req.steps, req.strength), created_at=_now(),
                  seeds=seeds, input_id=input_id, rerun_of=rerun_of, _decoded=decoded, _mask=mask, _user=user)
        run_dir.mkdir(mode=filemodes.DIR_MODE)
        filemodes.private_tree(run_dir)  # mkdir's mode is filtered by the umask
        try:
            _write_atomic(job.upload_path, stored)
            if mask_png:
                _write_atomic(run_dir / MASK_UPLOAD, mask_png)
            self._save(job)
            # 5. queue (limits re-checked under the lock: another request may have won the last slot)
            with self._cond:
                self._check_capacity(owner_id, job.cost)
                self._tick += 1
                job.queued_tick = self._tick
                self._jobs[job_id] = job
                self._pending.append(job)
                self._cond.notify_all()
        except BaseException as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            self._audit_finish(job, JobState.FAILED, f"not queued: {type(e).__name__}")
            raise
        logger.info("job %s queued (position %s, %d effective steps, cost %d)", job_id, self.queue_position(job),
                    job.effective_steps, job.cost)
        return job

    def _record_submission(self, user: audit.User, data: bytes, decoded: imaging.DecodedImage, req: ReviewRequest,
                           seeds: list[int], has_mask: bool, rerun_of: str | None) -> tuple[str, str]:
        """``audit.record_input`` + ``audit.create_run``; returns (input id, job id = the run id's hex)."""
        assert self.db is not None and self.uid_secret is not None
        meta = decoded.meta
        record = audit.record_input(
            self.db, user=user, upload_sha256=sha256(data),
            pixel_sha256=sha256(np.ascontiguousarray(decoded.pixels).tobytes()), rows=meta.rows, cols=meta.columns,
            source_format=meta.source_format, uid_secret=self.uid_secret, modality=meta.modality,
            study_instance_uid=meta.study_instance_uid, series_instance_uid=meta.series_instance_uid,
            sop_instance_uid=meta.sop_instance_uid, store_plain_uids=self.store_plain_uids)
        # the operator's case label is theirs to see on the result, never the audit's
        params: dict[str, Any] = {**{k: v for k, v in asdict(req).items() if k != "case_label"}, "mask": has_mask}
        if rerun_of is not None:
            params["rerun_of"] = rerun_of
        run = audit.create_run(self.db, user=user, input_id=record.id, params=params, seeds=seeds,
                               model_sha256=self.engine.info.model_hash, library_versions=library_versions())
        return str(record.id), run.id.hex

    def _audit_refused(self, user: audit.User | None, data: bytes, error: Exception) -> None:
        """A refused submission leaves a trace: who, how many bytes, which kind of refusal (never the message)."""
        if self.db is None:
            return
        try:
            audit.append_event(self.db, audit.AuditAction.UPLOAD, user=user, outcome=audit.Outcome.MINOR_FAILURE,
                               detail={"refused": type(error).__name__, "size_bytes": len(data)})
        except Exception:  # the refusal itself must still reach the user
            logger.exception("could not audit a refused upload")

    def _audit_finish(self, job: Job, state: JobState, reason: str | None, *,
                      artifact_hashes: dict[str, str] | None = None) -> None:
        """Finish the job's run in the audit database (before the job's own state changes)."""
        if self.db is None or job.input_id is None:
            return
        try:
            audit.finish_run(self.db, uuid.UUID(job.id), state.value, reason=reason,
                             effective_steps=job.effective_steps, timings=_final_timings(job, _now()),
                             artifact_hashes=artifact_hashes, actor=job._cancelled_by)
        except Exception:  # a database hiccup must not kill the worker; job.json still says it
            logger.exception("job %s: could not record its end (%s) in the audit database", job.id, state.value)

    def _check_capacity(self, owner: str, cost: int) -> None:
        """Refuse a job of ``owner`` costing ``cost`` (caller holds the lock): stopped worker, the user's limit, the
        queue's length, then its cost budget."""
        if self._stopping or not self.worker_alive:
            raise WorkerStoppedError("The review worker is not running; the server may be restarting. "
                                     "Please try again in a minute.")
        if self.max_jobs_per_user is not None:
            running = self._running
            active = sum(j.owner == owner for j in self._pending) + int(running is not None and running.owner == owner)
            if active >= self.max_jobs_per_user:
                wait = running.eta_s if running is not None and running.owner == owner else None
                raise UserQueueLimitError(active, self.max_jobs_per_user, max(5, int(wait or 30)))
        if len(self._pending) >= self.capacity:
            raise QueueFullError(len(self._pending), self.capacity)
        queued = self.queued_cost
        if self.cost_budget is not None and queued and queued + cost > self.cost_budget:
            raise QueueFullError(len(self._pending), self.capacity, queued_cost=queued, cost=cost,
                                 budget=self.cost_budget)

    # -- queries ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str, *, any_owner: bool = False) -> Job:
        """The job, if it belongs to ``owner`` (or to anyone, with ``any_owner``: administrators).

        Raises:
            JobNotFoundError: unknown id, or another user's job (indistinguishable on purpose).
        """
        job = self._jobs.get(job_id)
        if job is None or (job.owner != owner and not any_owner):
            raise JobNotFoundError(job_id)
        return job

    def list_jobs(self, owner: str | None, limit: int | None = None) -> list[Job]:
        """``owner``'s jobs (everyone's for ``None``), newest first."""
        jobs = sorted((j for j in self._jobs.values() if owner is None or j.owner == owner),
                      key=lambda j: j.created_at, reverse=True)
        return jobs[:limit] if limit else jobs

    def reruns_of(self, job_id: str) -> list[Job]:
        """Jobs submitted as re-runs of ``job_id``, newest first."""
        return sorted((j for j in self._jobs.values() if j.rerun_of == job_id), key=lambda j: j.created_at,
                      reverse=True)

    def fair_order(self) -> list[Job]:
        """The waiting jobs in the order the worker will take them, if nothing else arrives.

        Each pick goes to the user who has waited longest: since their latest job ended, or since their oldest
        waiting job was queued if that is later (ties: the older job); the owner of the running job is being served
        now. A user's own jobs keep their order. So users take turns, the user whose job runs goes after everyone
        who is waiting, and a newcomer waits behind users who have waited longer but ahead of a user who has just
        been served.
        """
        with self._cond:
            served = dict(self._served)
            tick = self._tick + 1  # "now": after every job queued so far
            if self._running is not None:
                served[self._running.owner] = tick
            waiting: dict[str, list[Job]] = {}
            for j in self._pending:
                waiting.setdefault(j.owner, []).append(j)
        order: list[Job] = []
        while waiting:
            owner = min(waiting, key=lambda o: (max(served.get(o, 0), waiting[o][0].queued_tick),
                                                waiting[o][0].queued_tick))
            order.append(waiting[owner].pop(0))
            if not waiting[owner]:
                del waiting[owner]
            tick += 1
            served[owner] = tick
        return order

    def queue_position(self, job: Job) -> int | None:
        """1 for the job that starts next, 2 behind it, ... in :meth:`fair_order`; ``None`` unless it is queued."""
        for i, j in enumerate(self.fair_order()):
            if j is job:
                return i + 1
        return None

    def estimated_run_s(self, job: Job) -> float | None:
        """Estimated seconds the job will hold the worker: its cost times the measured seconds per UNet evaluation
        and sample, plus the measured overhead of a run; ``None`` before a run has been measured."""
        rate = self._seconds_per_eval
        if rate is None:
            return None
        return job.cost * rate + (self._overhead_s or 0.0)

    def queue_eta_s(self, job: Job) -> float | None:
        """Estimated seconds until a queued job starts: what the running job has left plus
        :meth:`estimated_run_s` of every job ahead of it in :meth:`fair_order`; ``None`` before a run has been
        measured or when the job is not queued."""
        if self._seconds_per_eval is None:
            return None
        order = self.fair_order()
        if job not in order:
            return None
        ahead = order[:order.index(job)]
        left = sum(self.estimated_run_s(j) or 0.0 for j in ahead)
        running = self._running
        if running is not None:
            whole = self.estimated_run_s(running) or 0.0
            if running.eta_s is not None:  # denoising left, plus the share of the overhead still to come
                left += running.eta_s + (self._overhead_s or 0.0) * 0.5
            else:
                left += whole
        return left

    def preview_png(self, job: Job) -> bytes | None:
        """The latest progress preview as a small PNG (encoded on request, cached per version)."""
        preview = job._preview
        if preview is None:
            return None
        cached = job._preview_png
        version = job.version
        if cached is not None and cached[0] == version:
            return cached[1]
        png = gray_png(preview, longest_side=self.preview_size, upscale=True)
        job._preview_png = (version, png)
        return png

    def thumbnail_png(self, job: Job) -> bytes | None:
        """A small PNG of the input for the history list, cached in the run folder; ``None`` before it exists."""
        thumb = job.run_dir / THUMBNAIL
        if thumb.is_file():
            return thumb.read_bytes()
        try:  # the record's checked input.png; none before the run has finished writing it
            pixels = RunFolder(job.run_dir).read_png_unit(folder.INPUT)
        except RunFolderError:
            return None
        png = gray_png(pixels, longest_side=self.thumbnail_size)
        _write_atomic(thumb, png)
        return png

    # -- cancellation -----------------------------------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str, *, any_owner: bool = False, actor: audit.User | None = None) -> Job:
        """Cancel a job: a queued one at once, a running one within one denoising step; finished: no change.

        Args:
            job_id, owner, any_owner: as for :meth:`get`.
            actor: who cancels (recorded with the run); default its owner.

        Raises:
            JobNotFoundError: unknown id or another user's job.
        """
        job = self.get(job_id, owner, any_owner=any_owner)
        with self._cond:
            queued = job.state is JobState.QUEUED and job in self._pending
            if queued:
                self._pending.remove(job)
                job._decoded = job._mask = None
            if not job.state.finished:
                job._cancelled_by = actor
                job._cancel_reason = "cancelled by the user"
            if job.state is JobState.RUNNING:
                job.cancel_event.set()
                job.touch()
        if queued:
            self._audit_finish(job, JobState.CANCELLED, job._cancel_reason)
            with self._cond:
                self._finish(job, JobState.CANCELLED)
        return job

    # -- deletion ---------------------------------------------------------------------------------------------------
    def delete(self, job_id: str, owner: str, *, actor: audit.User | None = None) -> Job:
        """Delete one of ``owner``'s finished runs: its folder (upload, artifacts, ``job.json``) and its history entry.

        Nothing else is touched: every run keeps its own copy of its upload (a re-run or a "reuse image" run
        included), so no other run loses a file. The audit trail keeps the run's record (parameters, hashes) and
        gains a ``run_delete`` event, written before anything is removed.

        Args:
            job_id, owner: as for :meth:`get` (owners only: an administrator deletes no one else's work here).
            actor: who deletes (recorded); default the owner.

        Raises:
            JobNotFoundError: unknown id or another user's job.
            ValueError: the run is queued or running (cancel it first).
        """
        job = self.get(job_id, owner)
        if not job.state.finished:  # a finished job never becomes unfinished again: no lock needed past this
            raise ValueError(f"This run is {job.state.value}; cancel it first, then delete it.")
        if self.db is not None:
            audit.append_event(self.db, audit.AuditAction.RUN_DELETE, user=actor or job._user, object_type="run",
                               object_id=uuid.UUID(job.id), detail={"state": job.state.value})
        with self._cond:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.run_dir, ignore_errors=True)
        logger.info("job %s deleted", job.id)
        return job

    # -- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.fair_order()[0]
                self._pending.remove(job)
                job.state = JobState.RUNNING
                job.started_at = _now()
                self._running = job
                job.touch()
            try:
                self._save(job)
                self._audit_start(job)
                self._execute(job)
            except Exception:  # never let one job kill the worker
                logger.exception("job %s: unexpected error in the worker", job.id)
                message = "The run failed because of an internal error. It has been logged; please try again."
                if not job.state.finished:
                    self._audit_finish(job, JobState.FAILED, "internal error")
                with self._cond:
                    if not job.state.finished:
                        self._finish(job, JobState.FAILED, message)
            finally:
                with self._cond:
                    self._running = None
                    self._tick += 1
                    self._served[job.owner] = self._tick
                    job._decoded = job._mask = None

    def _execute(self, job: Job) -> None:
        t0 = time.perf_counter()

        def progress(step: int, total: int, elapsed_s: float, preview: np.ndarray | None) -> None:
            job.step, job.total, job.elapsed_s = step, total, elapsed_s
            job.eta_s = elapsed_s / step * (total - step) if step else None
            if preview is not None:
                job._preview = preview
            job.touch()

        data = job.upload_path.read_bytes()
        try:
            record = self._runner(self.engine, data, job.request, job.run_dir, mask=job._mask, progress=progress,
                                  cancel=job.cancel_event, decoded=job._decoded, segmenter=self.segmenter,
                                  classifier=self.classifier)
        except GenerationCancelled:
            self._audit_finish(job, JobState.CANCELLED, job._cancel_reason or "cancelled")
            with self._cond:
                self._finish(job, JobState.CANCELLED)
            return
        except (imaging.ImagingError, ValueError) as e:
            self._audit_finish(job, JobState.FAILED, str(e))
            with self._cond:
                self._finish(job, JobState.FAILED, str(e))
            return
        run_s = time.perf_counter() - t0
        job.unet_evaluations = int(record.unet_evaluations if record.unet_evaluations is not None else job.total)
        job.effective_steps = int(record.effective_steps if record.effective_steps is not None else job.effective_steps)
        job.seeds = list(record.seeds or job.seeds)
        job.timings_s = {**record.timings_s, "run": round(run_s, 4)}
        denoise = job.timings_s.get("denoising")
        if denoise and job.unet_evaluations > 1 and (record.map_method or "sdedit") == "sdedit":
            # per UNet evaluation and sample (job_cost's unit), and the rest of the run (decoding, maps, files);
            # exponential averages, so that a changed load shows within a few runs. The engine times denoising
            # from the first step's end to the last's: unet_evaluations - 1 evaluations. Other map methods time
            # their whole method as "denoising" (encode, inversion, decode), so they do not teach the rate.
            rate = float(denoise) / ((job.unet_evaluations - 1) * max(1, job.request.samples))
            overhead = max(0.0, run_s - float(denoise))
            prev, prev_overhead = self._seconds_per_eval, self._overhead_s
            self._seconds_per_eval = rate if prev is None else 0.7 * prev + 0.3 * rate
            self._overhead_s = overhead if prev_overhead is None else 0.7 * prev_overhead + 0.3 * overhead
        hashes = record.artifacts_sha256
        self._audit_finish(job, JobState.DONE, None, artifact_hashes=dict(hashes) if hashes else None)
        with self._cond:
            self._finish(job, JobState.DONE)

    def _audit_start(self, job: Job) -> None:
        if self.db is None or job.input_id is None:
            return
        try:
            audit.start_run(self.db, uuid.UUID(job.id), now=job.started_at)
        except Exception:  # see _audit_finish
            logger.exception("job %s: could not record its start in the audit database", job.id)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Move a job to a terminal state (caller holds the lock) and persist it."""
        # run_review writes through libraries (Pillow, numpy, pydicom) that create files by the umask
        filemodes.private_tree(job.run_dir)
        job.state = state
        job.error = error
        job.finished_at = _now()
        job.eta_s = None
        job.timings_s = _final_timings(job, job.finished_at)
        job.touch()
        self._save(job)
        logger.info("job %s %s", job.id, state.value)

    # -- persistence ------------------------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        _write_atomic(job.run_dir / JOB_FILE, json.dumps(job.to_json(), indent=2).encode())

    def _load_history(self) -> None:
        """Load every ``job.json`` under ``runs_dir``; unfinished ones become ``interrupted``.

        With an audit database, an unfinished job whose run the database finished (the process stopped between
        the two writes) takes the database's status instead: the database is the record.
        """
        for path in sorted(self.runs_dir.glob(f"*/{JOB_FILE}")):
            try:
                job = Job.from_json(path.parent, json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring unreadable %s: %s", path, e)
                continue
            if job.id != path.parent.name:
                logger.warning("ignoring %s: id does not match its folder", path)
                continue
            if not job.state.finished:
                recorded = self._recorded_status(job)
                if recorded in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                    job.state = recorded
                else:
                    job.state = JobState.INTERRUPTED
                    job.error = "The server stopped before this run finished. Please run it again."
                job.finished_at = job.finished_at or _now()
                self._save(job)
            self._jobs[job.id] = job

    def _recorded_status(self, job: Job) -> JobState | None:
        if self.db is None or job.input_id is None:
            return None
        try:
            run = audit.get_run(self.db, uuid.UUID(job.id))
        except (ValueError, LookupError):
            return None
        return JobState(run.status) if run is not None else None


def _final_timings(job: Job, finished_at: datetime) -> dict[str, float]:
    """The job's timings plus ``queued``: seconds from submission to start (or to the end, if it never ran)."""
    queued = ((job.started_at or finished_at) - job.created_at).total_seconds()
    return {**job.timings_s, "queued": round(queued, 4)}
