"""One review run in memory: :class:`Job`, its life cycle (:class:`JobState`) and its cost (:func:`job_cost`).

A job's life cycle is

    queued -> running -> done | failed | cancelled          (queued -> cancelled before it starts)
    queued | running -> interrupted                         (found unfinished when the server starts)

:meth:`Job.to_json` is what ``job.json`` holds (written by :class:`app.jobs.store.JobStore`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from app import audit, imaging
from app.engine import effective_steps
from app.runs.review import ReviewRequest

__all__ = ["METHOD_COST_FACTOR", "Job", "JobState", "final_timings", "job_cost", "now"]


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


@dataclass(eq=False)
class Job:
    """One review run. Mutated only by :class:`app.jobs.JobManager` (state) and its worker (progress).

    Attributes:
        id: 32 hex digits (uuid4), also the folder name under ``runs_dir``; unguessable.
        owner: user id string of the submitter.
        request: the generation parameters; ``seed`` is always fixed at submission so it can be shown early.
        run_dir: ``<runs_dir>/<id>``.
        upload_name: file name of the stored upload inside ``run_dir`` (``upload.dcm``/``.png``/``.jpg``).
        input_summary: ``ImageMeta.public_summary()`` of the upload (non-identifying).
        has_mask: a region mask was uploaded with the image.
        effective_steps: ``int(steps * strength)``; unet_evaluations: the count the engine reported (0 before).
        step, total: progress, in denoising steps (step 0 when denoising starts; total known from then on).
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
        return job_cost(self.request)

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
        stored = {k: v for k, v in data["request"].items() if k in ReviewRequest.__dataclass_fields__}
        stored.setdefault("map_polarity", "both")  # jobs from before map polarities mapped both directions
        stored.setdefault("map_smoothing", 0.0)  # jobs from before map smoothing made unsmoothed maps
        stored.setdefault("counterfactual_edit", "redraw")  # jobs from before edits showed the first sample
        req = ReviewRequest(**stored)
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
    size does not count. An edit restricted to the map's region (``counterfactual_edit`` ``"map_region"``) adds
    one sample's denoising after the map."""
    factor = METHOD_COST_FACTOR.get(req.map_method or "sdedit", 1)
    edit = 1 if req.counterfactual_edit == "map_region" else 0
    return (effective_steps(req.steps, req.strength) + 1) * (max(1, req.samples) * factor + edit)


def final_timings(job: Job, finished_at: datetime) -> dict[str, float]:
    """The job's timings plus ``queued``: seconds from submission to start (or to the end, if it never ran)."""
    queued = ((job.started_at or finished_at) - job.created_at).total_seconds()
    return {**job.timings_s, "queued": round(queued, 4)}


def now() -> datetime:
    """The current time, timezone-aware (UTC): every timestamp of a job."""
    return datetime.now(UTC)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _parse(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None
