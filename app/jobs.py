"""The review queue: a bounded FIFO of jobs and the single worker thread that owns the engine.

One process holds one model copy, and the diffusion pipeline is not thread-safe, so exactly one thread runs
:func:`app.artifacts.run_review`; requests only enqueue. A job's life cycle is

    queued -> running -> done | failed | cancelled          (queued -> cancelled before it starts)
    queued | running -> interrupted                         (found unfinished when the server starts)

Everything a job produces lives on disk under ``<runs_dir>/<job_id>/``: the upload (under a name the server
chooses, never the client's), the artifacts ``run_review`` writes, and ``job.json`` (state, parameters,
timings) so that the history survives a restart. Memory holds only small state: the progress counters, the
latest preview (a latent-sized array) and, while a job waits, its decoded pixels.

Jobs belong to an ``owner`` (a user id string); every lookup takes the owner and treats another user's job as
unknown, so one user can never learn that another user's job id exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app import attribution, imaging
from app.artifacts import ReviewRequest, run_review
from app.engine import CounterfactualEngine, GenerationCancelled, effective_steps

logger = logging.getLogger("vald_md.jobs")

JOB_FILE = "job.json"
UPLOAD_STEM = "upload"
MASK_UPLOAD = "mask-upload.png"
THUMBNAIL = "thumbnail.png"
_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}

Runner = Callable[..., dict[str, Any]]
"""Signature of :func:`app.artifacts.run_review`; injectable so tests can gate a job."""


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
    """The queue holds ``capacity`` waiting jobs already. The message is written for the user."""

    def __init__(self, queue_length: int, capacity: int) -> None:
        self.queue_length = queue_length
        self.capacity = capacity
        super().__init__(f"The review queue is full ({queue_length} of {capacity} runs waiting). "
                         f"Please try again when a run has finished.")


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
        version: bumped on every change; progress streams poll it.
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
    version: int = 0
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    _decoded: imaging.DecodedImage | None = field(default=None, repr=False)
    _mask: np.ndarray | None = field(default=None, repr=False)
    _preview: np.ndarray | None = field(default=None, repr=False)
    _preview_png: tuple[int, bytes] | None = field(default=None, repr=False)

    @property
    def source_format(self) -> str:
        """``"dicom"``, ``"png"`` or ``"jpeg"``."""
        return str(self.input_summary.get("source_format", ""))

    @property
    def upload_path(self) -> Path:
        """The stored upload."""
        return self.run_dir / self.upload_name

    @property
    def has_preview(self) -> bool:
        """A progress preview is available."""
        return self._preview is not None

    def touch(self) -> None:
        """Record that something changed (wakes progress streams)."""
        self.version += 1

    def to_json(self) -> dict[str, Any]:
        """The persistent description written to ``job.json`` (no pixels, no client file name)."""
        return {
            "id": self.id, "owner": self.owner, "state": self.state.value, "request": asdict(self.request),
            "upload_name": self.upload_name, "input_summary": self.input_summary, "has_mask": self.has_mask,
            "effective_steps": self.effective_steps, "unet_evaluations": self.unet_evaluations,
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at), "error": self.error, "seeds": self.seeds,
            "timings_s": self.timings_s,
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
                   timings_s=dict(data.get("timings_s", {})))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _parse(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


def _now() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    """Read a grayscale PNG written by ``imaging.to_png_bytes`` (8 or 16 bit) as float32 (H, W) in [0, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im)
        mode = im.mode
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    full = 65535.0 if mode.startswith("I") or arr.dtype == np.uint16 or arr.max() > 255 else 255.0
    return (arr.astype(np.float32) / full).clip(0.0, 1.0)


class JobManager:
    """Owns the queue, the worker thread and the engine's time.

    Args:
        engine: the loaded engine (or any object with ``generate``, ``check_inputs`` and ``info`` for tests).
        runs_dir: folder that receives one sub-folder per job; existing ``job.json`` files are loaded as history.
        queue_size: jobs that may wait behind the running one (>= 1).
        runner: the function that performs one run; :func:`app.artifacts.run_review` unless a test injects one.
        preview_size: longest side in pixels of preview PNGs.
        max_steps, max_samples: limits on what a user may ask for (on top of the engine's own ranges).
    """

    def __init__(self, engine: CounterfactualEngine, runs_dir: Path, *, queue_size: int = 8,
                 runner: Runner = run_review, preview_size: int = 192, thumbnail_size: int = 96,
                 max_steps: int = 1000, max_samples: int = 16) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size} must be at least 1")
        self.engine = engine
        self.runs_dir = Path(runs_dir)
        self.capacity = queue_size
        self.preview_size = preview_size
        self.thumbnail_size = thumbnail_size
        self.max_steps = max_steps
        self.max_samples = max_samples
        self._runner = runner
        self._jobs: dict[str, Job] = {}
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_eval: float | None = None
        self._thread: threading.Thread | None = None
        self.runs_dir.mkdir(parents=True, exist_ok=True)
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
        """A submission now would get :class:`QueueFullError`."""
        return len(self._pending) >= self.capacity

    # -- submission -----------------------------------------------------------------------------------------------
    def check_request(self, decoded: imaging.DecodedImage, req: ReviewRequest) -> None:
        """Refuse parameters before queueing (the engine's ranges plus this server's limits).

        Raises:
            ValueError: a parameter is out of range; the message names it and the allowed range.
        """
        if req.steps > self.max_steps:
            raise ValueError(f"steps={req.steps} exceeds this server's limit of {self.max_steps}")
        if req.samples > self.max_samples:
            raise ValueError(f"samples={req.samples} exceeds this server's limit of {self.max_samples}")
        req.check()
        self.engine.check_inputs(decoded.pixels, req.prompt, req.strength, req.guidance_scale, req.steps,
                                 req.samples, req.scheduler, req.seed)

    def submit(self, owner: str, data: bytes, req: ReviewRequest, *, mask_png: bytes | None = None,
               decoded: imaging.DecodedImage | None = None) -> Job:
        """Validate an upload and its parameters synchronously, store it, and queue a job.

        Nothing is written and no job exists unless every check passes.

        Args:
            owner: user id of the submitter.
            data: the uploaded file (DICOM with or without extension, PNG or JPEG).
            req: parameters; ``seed=None`` draws one now (it is recorded and shown).
            mask_png: optional region mask image; must decode (see ``attribution.load_mask_png``).
            decoded: pass when the caller already decoded ``data`` with ``req.window``.

        Raises:
            QueueFullError: ``queue_size`` jobs are already waiting.
            imaging.ImagingError: the file cannot be read as a radiograph (message for the clinician).
            ValueError: a parameter or the mask is invalid.
            WorkerStoppedError: the server is shutting down.
        """
        # 1. cheap refusals first: a full queue or a stopped worker need no decoding
        self._check_capacity()
        # 2. decode and validate (raises ImagingError / ValueError; nothing is stored yet)
        if decoded is None:
            decoded = imaging.decode_image(data, window=req.window)
        if req.seed is None:
            req.seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        self.check_request(decoded, req)
        mask = attribution.load_mask_png(mask_png, decoded.pixels.shape) if mask_png else None
        # 3. store the upload under a server-chosen name
        job_id = uuid.uuid4().hex
        run_dir = self.runs_dir / job_id
        summary = decoded.meta.public_summary()
        upload_name = UPLOAD_STEM + _SUFFIX.get(str(summary.get("source_format")), ".bin")
        job = Job(id=job_id, owner=owner, request=req, run_dir=run_dir, upload_name=upload_name,
                  input_summary=summary, has_mask=mask is not None,
                  effective_steps=effective_steps(req.steps, req.strength), created_at=_now(),
                  seeds=[req.seed + i for i in range(req.samples)], _decoded=decoded, _mask=mask)
        run_dir.mkdir(parents=True)
        try:
            _write_atomic(job.upload_path, data)
            if mask_png:
                _write_atomic(run_dir / MASK_UPLOAD, mask_png)
            self._save(job)
            # 4. queue (capacity re-checked under the lock: another request may have won the last slot)
            with self._cond:
                self._check_capacity()
                self._jobs[job_id] = job
                self._pending.append(job)
                self._cond.notify_all()
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        logger.info("job %s queued (position %d, %d effective steps)", job_id, len(self._pending),
                    job.effective_steps)
        return job

    def _check_capacity(self) -> None:
        if self._stopping or not self.worker_alive:
            raise WorkerStoppedError("The review worker is not running; the server may be restarting. "
                                     "Please try again in a minute.")
        if len(self._pending) >= self.capacity:
            raise QueueFullError(len(self._pending), self.capacity)

    # -- queries ----------------------------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> Job:
        """The job, if it belongs to ``owner``.

        Raises:
            JobNotFoundError: unknown id, or another user's job (indistinguishable on purpose).
        """
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise JobNotFoundError(job_id)
        return job

    def list_jobs(self, owner: str, limit: int | None = None) -> list[Job]:
        """``owner``'s jobs, newest first."""
        jobs = sorted((j for j in self._jobs.values() if j.owner == owner), key=lambda j: j.created_at,
                      reverse=True)
        return jobs[:limit] if limit else jobs

    def queue_position(self, job: Job) -> int | None:
        """1 for the job that starts next, 2 behind it, ...; ``None`` unless the job is queued."""
        with self._cond:
            for i, j in enumerate(self._pending):
                if j is job:
                    return i + 1
        return None

    def queue_eta_s(self, job: Job) -> float | None:
        """Estimated seconds until a queued job starts (from the measured seconds per UNet evaluation)."""
        rate = self._seconds_per_eval
        if rate is None:
            return None
        with self._cond:
            ahead: list[Job] = []
            for j in self._pending:
                if j is job:
                    break
                ahead.append(j)
            running = self._running
        left = sum((j.effective_steps + 1) * rate for j in ahead)
        if running is not None:
            left += running.eta_s if running.eta_s is not None else (running.effective_steps + 1) * rate
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
        src = job.run_dir / "input.png"
        if not src.is_file():
            return None
        png = gray_png(read_png_unit(src), longest_side=self.thumbnail_size)
        _write_atomic(thumb, png)
        return png

    # -- cancellation -----------------------------------------------------------------------------------------------
    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel a job: a queued one at once, a running one within one denoising step; finished: no change.

        Raises:
            JobNotFoundError: unknown id or another user's job.
        """
        job = self.get(job_id, owner)
        with self._cond:
            if job.state is JobState.QUEUED:
                self._pending.remove(job)
                job._decoded = job._mask = None
                self._finish(job, JobState.CANCELLED)
            elif job.state is JobState.RUNNING:
                job.cancel_event.set()
                job.touch()
        return job

    # -- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state = JobState.RUNNING
                job.started_at = _now()
                self._running = job
                job.touch()
            try:
                self._save(job)
                self._execute(job)
            except Exception:  # never let one job kill the worker
                logger.exception("job %s: unexpected error in the worker", job.id)
                with self._cond:
                    self._finish(job, JobState.FAILED, "The run failed because of an internal error. "
                                                       "It has been logged; please try again.")
            finally:
                with self._cond:
                    self._running = None
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
                                  cancel=job.cancel_event, decoded=job._decoded)
        except GenerationCancelled:
            with self._cond:
                self._finish(job, JobState.CANCELLED)
            return
        except (imaging.ImagingError, ValueError) as e:
            with self._cond:
                self._finish(job, JobState.FAILED, str(e))
            return
        run_s = time.perf_counter() - t0
        job.unet_evaluations = int(record.get("unet_evaluations", job.total))
        job.effective_steps = int(record.get("effective_steps", job.effective_steps))
        job.seeds = list(record.get("seeds", job.seeds))
        job.timings_s = {**record.get("timings_s", {}), "run": round(run_s, 4)}
        denoise = job.timings_s.get("denoising")
        if denoise and job.unet_evaluations > 1:
            rate = float(denoise) / (job.unet_evaluations - 1)
            prev = self._seconds_per_eval
            self._seconds_per_eval = rate if prev is None else 0.7 * prev + 0.3 * rate
        with self._cond:
            self._finish(job, JobState.DONE)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        """Move a job to a terminal state (caller holds the lock) and persist it."""
        job.state = state
        job.error = error
        job.finished_at = _now()
        job.eta_s = None
        queued = ((job.started_at or job.finished_at) - job.created_at).total_seconds()
        job.timings_s = {**job.timings_s, "queued": round(queued, 4)}
        job.touch()
        self._save(job)
        logger.info("job %s %s", job.id, state.value)

    # -- persistence ------------------------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        _write_atomic(job.run_dir / JOB_FILE, json.dumps(job.to_json(), indent=2).encode())

    def _load_history(self) -> None:
        """Load every ``job.json`` under ``runs_dir``; unfinished ones become ``interrupted``."""
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
                job.state = JobState.INTERRUPTED
                job.error = "The server stopped before this run finished. Please run it again."
                job.finished_at = job.finished_at or _now()
                self._save(job)
            self._jobs[job.id] = job
