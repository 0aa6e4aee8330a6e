"""Where a run executes: the seam between the queue and the model.

The :class:`~app.jobs.manager.JobManager` queues, orders and records jobs; a :class:`Backend` runs them. It runs
up to :attr:`Backend.concurrency` jobs at once, each through :meth:`Backend.run`, which reports progress with the
engine's callback, honours ``job.cancel_event`` within a denoising step and returns the run's record (what
:func:`app.runs.review.run_review` returns, the files written into ``job.run_dir``).

- :class:`LocalBackend` (``VALD_MD_BACKEND=local``, the default): the model this process loaded, one run at a time,
  in the manager's one worker thread, exactly as before the seam existed;
- ``app.serving.RayBackend`` (``VALD_MD_BACKEND=ray``): a Ray Serve deployment with one run per replica at a time
  (built by the web app, so that nothing here imports Ray).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.engine import CounterfactualEngine, ProgressCallback
from app.jobs.job import Job
from app.lungs import LungSegmenter
from app.runs.record import RunRecord
from app.runs.review import run_review

__all__ = ["Backend", "LocalBackend", "Runner"]

Runner = Callable[..., RunRecord]
"""Signature of :func:`app.runs.review.run_review`; injectable so tests can gate a job."""


class Backend:
    """Runs jobs for the manager (abstract).

    Attributes:
        name: ``"local"`` or ``"ray"`` (logged, and said in the records of runs it made where it is not local).
        concurrency: runs it takes at once, >= 1; the manager keeps that many worker threads.
    """

    name: str = "local"
    concurrency: int = 1

    def run(self, job: Job, data: bytes, progress: ProgressCallback) -> RunRecord:
        """Run ``job`` (its request, mask and run folder) on the uploaded ``data``; blocks until it ends.

        Raises:
            imaging.ImagingError, ValueError: the upload or a parameter cannot be used (message for the user).
            engine.GenerationCancelled: ``job.cancel_event`` was set.
            BackendError: the backend itself failed the run (message for the user).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (after the manager stopped); idempotent."""


class LocalBackend(Backend):
    """The in-process backend: ``runner`` (:func:`app.runs.review.run_review`) on the loaded engine, one run at a time
    (the diffusion pipeline is not thread-safe).

    Args:
        engine: the loaded engine. runner: the function that performs one run (tests inject a gated one).
        segmenter, classifier: handed to every run (see :class:`~app.jobs.manager.JobManager`).
    """

    name = "local"
    concurrency = 1

    def __init__(self, engine: CounterfactualEngine, *, runner: Runner = run_review,
                 segmenter: LungSegmenter | None = None, classifier: Any = None) -> None:
        self.engine = engine
        self.runner = runner
        self.segmenter = segmenter
        self.classifier = classifier

    def run(self, job: Job, data: bytes, progress: ProgressCallback) -> RunRecord:
        """``runner(engine, data, ...)`` into ``job.run_dir`` with the job's decoded pixels and mask."""
        return self.runner(self.engine, data, job.request, job.run_dir, mask=job._mask, progress=progress,
                           cancel=job.cancel_event, decoded=job._decoded, segmenter=self.segmenter,
                           classifier=self.classifier)
