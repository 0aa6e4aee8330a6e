"""The model as a Ray Serve deployment: each replica loads the engine, the lung segmenter and the lesion classifier
from the model folders and runs one review at a time (``max_ongoing_requests=1``), streaming its progress.

:class:`ReviewReplica` is a plain class; :func:`app.serving.backend.deploy` wraps it with ``serve.deployment``.
Its :meth:`ReviewReplica.review` is an async generator of events (plain dicts, so that no exception class has to
cross the cluster), in this order:

- ``{"event": "start", "replica": id, "actor": actor name, "node": node address, "attempt": n, "model_sha256":
  the replica's model hash}`` (the front fails the run when it is not its own model's: the audit names that hash);
- ``{"event": "progress", "step", "total", "elapsed_s", "preview"}``: the engine's progress callback (preview a
  small float32 array or ``None``), at most one per :data:`PROGRESS_INTERVAL_S` and always the last step; the
  front hands them to the job, so the browser's progress stream, itself thinned to one event per
  ``VALD_MD_SSE_INTERVAL_S`` (0.25 s), shows what it shows for an in-process run;
- one end: ``{"event": "done", "record": ...}``, ``{"event": "cancelled"}`` or ``{"event": "error", "kind":
  "imaging" | "value" | "backend" | "internal", "message": ...}``.

The run itself is :func:`app.runs.review.run_review` on the upload stored in the job's run folder, writing its
artifacts there: the run folders (``VALD_MD_DATA_DIR``) must be one path that every Ray node sees (a shared volume;
docs/DEPLOYMENT.md). ``record.json`` gains ``"serving"``: ``{"backend": "ray", "replica", "node", "attempt"}``.

Cancel: the front cancels the Serve response; Serve cancels the generator's task, which sets the run's cancel flag
(the engine checks it between denoising steps) and waits for the run's thread to stop before the replica takes the
next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from app import imaging
from app.engine import GenerationCancelled, load_engine_in_short_lived_thread
from app.runs.review import ReviewRequest, run_review
from app.serving.loading import load_classifier, load_segmenter

__all__ = ["PROGRESS_INTERVAL_S", "ReviewReplica", "replica_config"]

logger = logging.getLogger("vald_md.serving")

PROGRESS_INTERVAL_S = 0.2
"""Seconds between two progress events of a run. Each event wakes the replica's event loop and crosses the cluster
while the run computes on the same interpreter: one per denoising step slowed the embedded model's runs by 15 %
(docs/PERFORMANCE.md, "Ray Serve backend")."""


def replica_config(*, model_dir: Path, lung_segmenter: Path, lesion_classifier: Path, device: str | None,
                   dtype: str | None, cpu_autocast: bool) -> dict[str, Any]:
    """What a replica is built from (its constructor's argument): the model folders as strings, and the compute
    settings of ``vald-md serve`` (``device`` ``None``: CUDA when the replica sees a GPU)."""
    return {"model_dir": str(model_dir), "lung_segmenter": str(lung_segmenter),
            "lesion_classifier": str(lesion_classifier), "device": device, "dtype": dtype,
            "cpu_autocast": cpu_autocast}


class ReviewReplica:
    """One model copy serving reviews.

    Args:
        config: :func:`replica_config`'s dict.

    Raises:
        app.engine.ModelFolderError: the model folder cannot be loaded (Serve then reports the deployment
            unhealthy and keeps retrying; the front says so).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import ray
        from ray import serve

        self.engine = load_engine_in_short_lived_thread(Path(config["model_dir"]), device=config["device"],
                                             dtype=config["dtype"], cpu_autocast=config["cpu_autocast"])
        self.segmenter = load_segmenter(Path(config["lung_segmenter"]))
        self.classifier = load_classifier(Path(config["lesion_classifier"]))
        # one long-lived thread runs every review: the only thread with an OpenMP team
        # (see load_engine_in_short_lived_thread)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vald-md-replica")
        self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        self.actor_name = str(ray.get_runtime_context().get_actor_name())
        self.node = str(ray.util.get_node_ip_address())
        import torch

        self.torch_threads = int(self._pool.submit(torch.get_num_threads).result())  # the run thread's
        logger.info("replica %s on %s: model %s (%s) loaded", self.replica_id, self.node, self.engine.info.name,
                    self.engine.info.model_hash[:12])

    async def describe(self) -> dict[str, Any]:
        """The replica and its model: ``{"replica", "node", "model_name", "model_sha256", "device",
        "torch_threads"}``, from what the replica learned when it started (it never waits for the run thread)."""
        return {"replica": self.replica_id, "node": self.node, "model_name": self.engine.info.name,
                "model_sha256": self.engine.info.model_hash, "device": str(self.engine.device),
                "torch_threads": self.torch_threads}

    async def review(self, task: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one review and stream its events (see the module's docstring).

        Args:
            task: ``{"job_id", "run_dir", "upload_name", "request" (ReviewRequest's fields, resolved and seeded),
                "mask" (bool (H, W) array or None), "attempt" (1 or 2)}``.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        serving = {"backend": "ray", "replica": self.replica_id, "node": self.node,
                   "attempt": int(task.get("attempt", 1))}

        last_sent = [-PROGRESS_INTERVAL_S]

        def progress(step: int, total: int, elapsed_s: float, preview: np.ndarray | None) -> None:
            now = time.monotonic()
            if step < total and now - last_sent[0] < PROGRESS_INTERVAL_S:
                return
            last_sent[0] = now
            loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "step": step, "total": total,
                                                          "elapsed_s": elapsed_s, "preview": preview})

        def work() -> dict[str, Any]:
            return self._run(task, progress, cancel, serving)

        yield {"event": "start", "replica": self.replica_id, "actor": self.actor_name, "node": self.node,
               "attempt": serving["attempt"], "model_sha256": self.engine.info.model_hash}
        running = loop.run_in_executor(self._pool, work)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield running.result()
                return
        except asyncio.CancelledError:  # the front cancelled the response: stop the run within a step
            cancel.set()
            await asyncio.wait({running})
            raise

    def _run(self, task: dict[str, Any], progress: Any, cancel: threading.Event,
             serving: dict[str, Any]) -> dict[str, Any]:
        """The review, in the replica's run thread; its end as an event."""
        run_dir = Path(task["run_dir"])
        upload = run_dir / str(task["upload_name"])
        if not upload.is_file():  # the node's address is for the logs, not for the user
            logger.error("replica %s on %s: job %s: no upload at %s (the data folder is not shared with this node)",
                         self.replica_id, self.node, task.get("job_id"), upload)
            return {"event": "error", "kind": "backend",
                    "message": "The model replica cannot see this run's folder. The data folder must be on a volume "
                               "shared by every Ray node (docs/DEPLOYMENT.md); please tell the administrator."}
        try:
            req = ReviewRequest(**task["request"])
            record = run_review(self.engine, upload.read_bytes(), req, run_dir, mask=task.get("mask"),
                                progress=progress, cancel=cancel, segmenter=self.segmenter,
                                classifier=self.classifier, record_extra={"serving": serving})
        except GenerationCancelled:
            return {"event": "cancelled"}
        except imaging.ImagingError as e:
            return {"event": "error", "kind": "imaging", "message": str(e)}
        except ValueError as e:
            return {"event": "error", "kind": "value", "message": str(e)}
        except Exception as e:  # logged here, where the traceback is; the front fails the job
            logger.exception("replica %s: job %s failed", self.replica_id, task.get("job_id"))
            return {"event": "error", "kind": "internal", "message": type(e).__name__}
        return {"event": "done", "record": record.to_json()}  # record.json's bytes: the front reads them back
