"""The Ray Serve backend of the job queue: connect to (or start) a Ray cluster, deploy the model, run jobs on it.

``VALD_MD_BACKEND=ray`` makes the web app build a :class:`RayBackend` (:meth:`RayBackend.from_settings`): it
attaches to ``VALD_MD_RAY_ADDRESS`` (or starts a one-machine cluster on 127.0.0.1 in this process), deploys the
application ``vald-md`` (:class:`~app.serving.replica.ReviewReplica` as the deployment ``ReviewReplica-<model
hash>``, ``VALD_MD_RAY_REPLICAS`` replicas or the autoscaling bounds; one GPU per replica when the cluster has GPUs,
else a CPU share) unless it already runs the same model, and takes one job per replica at a time
(:attr:`RayBackend.concurrency`). The front process stays the ingress: the queue, the audit trail, the pages and the
progress streams are its own, and a replica only runs.

A run (:meth:`RayBackend.run`) is a streaming call to the deployment; its progress events feed the job as the
engine's callback does in process. Cancel cancels the Serve response (the replica stops within a denoising step).
A replica that dies mid-run (a crash, a lost node, ``ray.kill``: Ray's ``RayActorError``) costs one retry: the
first attempt's stream is cancelled, the run folder is cleaned back to what it held before the run (upload, mask,
``job.json``) and the run goes to another replica; a second loss fails the job with a message that says so. A
replica that is only unreachable (``ActorUnavailableError``: it may still be running and writing the run folder)
is not retried: its stream is cancelled and the job fails with a message that says so. The job never stays
``running``.

Every run checks the model: the replica names its model's hash in its ``start`` event, and a front whose engine has
another hash fails the run (the audit trail names the front's model). A front never redeploys over another model's
application on a shared cluster (``ray_address`` set): it refuses to start and names both hashes
(``vald-md ray-serve`` redeploys).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from app.config import REPO_ROOT, Settings
from app.engine import GenerationCancelled, ProgressCallback
from app.imaging import ImagingError
from app.jobs.backend import Backend
from app.jobs.errors import BackendError
from app.jobs.job import Job
from app.jobs.store import THUMBNAIL
from app.modelfolder import model_hash
from app.runs.record import RunRecord
from app.serving.replica import ReviewReplica, replica_config

__all__ = ["APP_NAME", "RayBackend", "connect", "deploy", "deployment_options"]

logger = logging.getLogger("vald_md.serving")

APP_NAME = "vald-md"
"""The Serve application's name (one deployment, ``ReviewReplica``)."""
ATTEMPTS = 2
"""Tries of a run whose replica died: the first, and one retry on another replica."""
DEPLOYMENT_PREFIX = "ReviewReplica-"
"""The deployment's name is this and its model's hash: a starting front reads the running model from
``serve.status()`` without a request, which ``max_ongoing_requests=1`` would queue behind the replicas' runs."""
DESCRIBE_TIMEOUT_S = 60.0
"""Seconds a starting front waits for an application deployed without the hash in its name to say which model it
serves (a request: it waits for a free replica)."""


def connect(settings: Settings) -> bool:
    """Connect this process to Ray: ``settings.ray_address``, or a new local cluster on 127.0.0.1; nothing when
    already connected (a test fixture's cluster). Starts Serve without its HTTP proxy (the front is the ingress).

    Returns:
        True when this call started a local cluster (the backend then shuts it down on close).

    Raises:
        BackendError: ``ray[serve]`` is not installed (install the ``ray`` extra), or nothing answers at
            ``ray_address`` (Ray itself would retry for minutes).
    """
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BackendError("VALD_MD_BACKEND=ray needs Ray Serve: pip install 'vald-md[ray]' "
                           "(ray[serve]==2.60.0)") from None
    started = False
    if not ray.is_initialized():
        if settings.ray_address:
            _check_reachable(settings.ray_address)
            ray.init(address=settings.ray_address, namespace=APP_NAME)
        else:
            ray.init(include_dashboard=False, namespace=APP_NAME, _node_ip_address="127.0.0.1")
            started = True
    serve.start(proxy_location="Disabled")
    return started


def deployment_options(settings: Settings, resources: dict[str, float]) -> tuple[dict[str, Any], str | None]:
    """Serve options of the model deployment, and the device its replicas use.

    Args:
        settings: reads the ``ray_*`` fields, ``device`` and ``ray_address``.
        resources: ``ray.cluster_resources()`` (``"CPU"``, ``"GPU"`` counts).

    Returns:
        ``(options, device)``: ``max_ongoing_requests=1`` (one run per replica), ``num_replicas`` or
        ``autoscaling_config``, and ``ray_actor_options`` with ``num_gpus=1`` when the cluster has a GPU (device
        ``"cuda"``), else ``num_cpus`` = ``ray_cpus_per_replica`` or the cluster's CPUs over the most replicas, at
        most 1 (device: ``settings.device``). A local cluster's replicas import ``app`` from this checkout.
    """
    low, high = settings.ray_replica_bounds
    actor: dict[str, Any]
    device: str | None
    if resources.get("GPU", 0) >= 1:
        actor, device = {"num_gpus": 1, "num_cpus": 1}, "cuda"
    else:
        share = settings.ray_cpus_per_replica or max(0.1, min(1.0, resources.get("CPU", 1.0) / high))
        actor, device = {"num_cpus": share}, settings.device
    if settings.ray_address is None:
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        actor["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    options: dict[str, Any] = {"max_ongoing_requests": 1, "ray_actor_options": actor,
                               "graceful_shutdown_timeout_s": 5}
    if settings.ray_autoscaling:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "initial_replicas": min(max(settings.ray_replicas, low), high),
                                         "target_ongoing_requests": 1}
    else:
        options["num_replicas"] = settings.ray_replicas
    return options, device


def deploy(settings: Settings, model_sha256: str | None = None) -> Any:
    """Deploy (or redeploy) the application ``vald-md`` on the connected cluster and wait until it runs.

    Args:
        settings: the model folders, compute and ``ray_*`` settings.
        model_sha256: the model's hash, named in the deployment's name (:data:`DEPLOYMENT_PREFIX`); ``None``:
            hashed here from ``settings.resolved_model_dir`` (seconds for a large model).

    Returns:
        Its ``DeploymentHandle``.

    Raises:
        BackendError: the deployment failed (a replica could not load the model, say).
    """
    import ray
    from ray import serve

    options, device = deployment_options(settings, ray.cluster_resources())
    config = replica_config(model_dir=settings.resolved_model_dir, lung_segmenter=settings.resolved_lung_segmenter,
                            lesion_classifier=settings.resolved_lesion_classifier, device=device,
                            dtype=settings.dtype, cpu_autocast=settings.cpu_autocast)
    name = DEPLOYMENT_PREFIX + (model_sha256 or model_hash(settings.resolved_model_dir))
    app = serve.deployment(ReviewReplica, name=name).options(**options).bind(config)  # type: ignore[attr-defined]
    logger.info("deploying %s on Ray Serve: %s", APP_NAME, {k: v for k, v in options.items()
                                                            if k != "ray_actor_options"})
    try:
        return serve.run(app, name=APP_NAME, route_prefix=None)
    except RuntimeError as e:  # Serve's "Deploying application ... failed": a replica could not start
        raise BackendError(f"The model deployment did not start on Ray Serve ({e}). Check that the model folders "
                           f"exist at the same paths on every Ray node (docs/DEPLOYMENT.md).") from e


class RayBackend(Backend):
    """Runs jobs on the ``vald-md`` Serve application.

    Args:
        handle: the application's ``DeploymentHandle``.
        concurrency: runs at once: the (most) replicas.
        owns_cluster: this process started the cluster; :meth:`close` shuts it down.
        model_sha256: the front's model hash: a run on a replica of another model fails (``None``: no check).

    Attributes:
        placements: job id -> the ``start`` event of its current attempt (replica id, actor name, node), while it
            runs (operators' view; the replica-kill test finds its victim here).
    """

    name = "ray"

    def __init__(self, handle: Any, concurrency: int, *, owns_cluster: bool = False,
                 model_sha256: str | None = None) -> None:
        self.handle = handle
        self.model_sha256 = model_sha256
        self.concurrency = max(1, concurrency)
        self.owns_cluster = owns_cluster
        self.placements: dict[str, dict[str, Any]] = {}
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, *, model_sha256: str | None = None,
                      redeploy: bool = False) -> RayBackend:
        """Connect (:func:`connect`), reuse the running ``vald-md`` application when it serves ``model_sha256``
        (any model for ``None``), else deploy it (:func:`deploy`). On a shared cluster (``settings.ray_address``
        set) an application of another model is not replaced unless ``redeploy`` (``vald-md ray-serve``).

        Raises:
            BackendError: Ray is not installed; the running application did not answer within
                :data:`DESCRIBE_TIMEOUT_S`; it serves another model on a shared cluster; the deployment failed.
        """
        owns = connect(settings)  # first: it turns a missing Ray into BackendError
        from ray import serve

        handle = None
        applications = serve.status().applications
        if not redeploy and APP_NAME in applications:
            handle = serve.get_app_handle(APP_NAME)
            running = _served_model(applications[APP_NAME]) or _describe(handle)["model_sha256"]
            if model_sha256 is not None and running != model_sha256:
                if settings.ray_address is not None:
                    raise BackendError(
                        f"The Ray cluster at {settings.ray_address} already serves another model (hash {running}) "
                        f"as the application {APP_NAME!r}; this server's model has hash {model_sha256}. Replacing "
                        f"it would change the model under the other servers that use it, so this server does not "
                        f"start. Redeploy deliberately with `vald-md ray-serve`, or point VALD_MD_MODEL_DIR at the "
                        f"deployed model (docs/DEPLOYMENT.md).")
                logger.info("the running %s serves another model (%s); redeploying", APP_NAME, running[:12])
                handle = None
        if handle is None:
            handle = deploy(settings, model_sha256)
        backend = cls(handle, settings.ray_replica_bounds[1], owns_cluster=owns, model_sha256=model_sha256)
        logger.info("Ray Serve backend ready: up to %d runs at once", backend.concurrency)
        return backend

    def run(self, job: Job, data: bytes, progress: ProgressCallback) -> RunRecord:
        """Run ``job`` on a replica (the upload is read there from ``job.run_dir``; ``data`` is not sent), retrying
        once on another replica if the first dies.

        Raises:
            GenerationCancelled, imaging.ImagingError, ValueError, BackendError: see :meth:`Backend.run`.
        """
        import ray.exceptions as rex

        before = {p.name for p in job.run_dir.iterdir()}
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    return self._attempt(job, progress, attempt)
                except rex.ActorUnavailableError as e:  # perhaps still running: a retry could overlap it
                    if job.cancel_event.is_set():
                        raise GenerationCancelled("cancelled while its replica was unreachable") from None
                    logger.error("job %s: replica unreachable on attempt %d: %s", job.id, attempt, e)
                    raise BackendError(
                        "The run stopped: the model replica running it became unreachable (it may still be "
                        "finishing), so the run was not retried elsewhere. Please submit it again; if this happens "
                        "again, tell the administrator (the Ray cluster's network or nodes).") from None
                except _ReplicaLost as lost:
                    if job.cancel_event.is_set():
                        raise GenerationCancelled("cancelled while its replica was lost") from None
                    if attempt == ATTEMPTS:
                        raise BackendError(
                            f"The run was lost: the model replica running it stopped ({lost}), and so did the "
                            f"replica that retried it. Please submit it again; if this happens again, tell the "
                            f"administrator (the Ray Serve replicas are failing).") from None
                    logger.warning("job %s: replica lost on attempt %d (%s); retrying on another replica", job.id,
                                   attempt, lost)
                    _clean(job, before)
            raise AssertionError("unreachable")
        finally:
            self.placements.pop(job.id, None)

    def _attempt(self, job: Job, progress: ProgressCallback, attempt: int) -> RunRecord:
        import ray.exceptions as rex

        task = {"job_id": job.id, "run_dir": str(job.run_dir), "upload_name": job.upload_name,
                "request": asdict(job.request), "mask": job._mask, "attempt": attempt}
        stream = self.handle.options(stream=True).review.remote(task)
        finished = threading.Event()
        watcher = threading.Thread(target=_cancel_when_asked, args=(job, stream, finished),
                                   name=f"vald-md-cancel-{job.id[:8]}", daemon=True)
        watcher.start()
        try:
            for event in _events(stream):
                kind = event.get("event")
                if kind == "start":
                    self._check_model(event)
                    self.placements[job.id] = event
                elif kind == "progress":  # the preview copied out of Ray's read-only, shared buffer
                    preview = event.get("preview")
                    progress(int(event["step"]), int(event["total"]), float(event["elapsed_s"]),
                             None if preview is None else np.array(preview, dtype=np.float32))
                elif kind == "done":
                    return RunRecord.from_json(event["record"])
                elif kind == "cancelled":
                    raise GenerationCancelled("cancelled")
                elif kind == "error":
                    raise _error(event)
            raise _ReplicaLost("its stream ended without a result")
        except (rex.TaskCancelledError, asyncio.CancelledError) as e:
            if job.cancel_event.is_set():
                raise GenerationCancelled("cancelled") from None
            _cancel(stream)
            raise _ReplicaLost(type(e).__name__) from None
        except rex.ActorUnavailableError:
            _cancel(stream)
            raise
        except rex.RayActorError as e:  # the replica died
            _cancel(stream)
            raise _ReplicaLost(type(e).__name__) from None
        except rex.RayError as e:
            _cancel(stream)
            logger.error("job %s: Ray Serve error: %s", job.id, e)
            raise BackendError("The run failed on its model replica because of an internal error. It has been "
                               "logged; please try again.") from None
        except BackendError:
            _cancel(stream)
            raise
        finally:
            finished.set()

    def _check_model(self, start: dict[str, Any]) -> None:
        """Refuse a run on a replica whose model is not the front's (``start``: the replica's first event).

        Raises:
            BackendError: the hashes differ.
        """
        served = start.get("model_sha256")
        if self.model_sha256 is not None and served != self.model_sha256:
            logger.error("replica %s serves model %s, this front's is %s", start.get("replica"), served,
                         self.model_sha256)
            raise BackendError(
                f"The run was refused: the model replica serves another model (hash {served}) than this server "
                f"(hash {self.model_sha256}), so its result would not match the audit trail. Please tell the "
                f"administrator (the Ray application {APP_NAME!r} was redeployed with another model; restart this "
                f"server with that model or redeploy with `vald-md ray-serve`).")

    def close(self) -> None:
        """Shut down Serve and the cluster if this process started them; otherwise leave the deployment running
        for the next front (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.owns_cluster:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` or ``ray://host:port`` address where nothing listens (``auto`` is Ray's to find).

    Raises:
        BackendError: no TCP connection within ``timeout_s`` seconds.
    """
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise BackendError(f"No Ray cluster answers at {address} ({e.strerror or e}); start one with "
                           f"`ray start --head` there, or fix VALD_MD_RAY_ADDRESS (docs/DEPLOYMENT.md)") from None


def _served_model(application: Any) -> str | None:
    """The model hash in the name of an application's deployment (``serve.status()``'s entry), if it has one."""
    for name in getattr(application, "deployments", None) or {}:
        if name.startswith(DEPLOYMENT_PREFIX):
            return str(name).removeprefix(DEPLOYMENT_PREFIX)
    return None


def _describe(handle: Any, timeout_s: float = DESCRIBE_TIMEOUT_S) -> dict[str, Any]:
    """The running application's :meth:`~app.serving.replica.ReviewReplica.describe`.

    Raises:
        BackendError: no answer within ``timeout_s`` seconds (every replica busy or unhealthy).
    """
    try:
        return dict(handle.describe.remote().result(timeout_s=timeout_s))
    except TimeoutError:
        raise BackendError(
            f"The running Ray Serve application {APP_NAME!r} did not say which model it serves within "
            f"{timeout_s:.0f} s (its replicas are all busy or unhealthy). Start this server again when a replica "
            f"is free, or add replicas (docs/DEPLOYMENT.md).") from None


def _cancel(stream: Any) -> None:
    """Cancel a Serve response, so that a replica still running it stops (harmless when it has ended or died)."""
    try:
        stream.cancel()
    except Exception:  # a dead replica's response: nothing left to stop
        logger.debug("cancelling a Serve response failed", exc_info=True)


class _ReplicaLost(Exception):
    """The replica running an attempt died or left (internal: the backend retries or fails the job)."""


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    for event in stream:
        yield dict(event)


def _cancel_when_asked(job: Job, stream: Any, finished: threading.Event) -> None:
    """Cancel the Serve response once ``job.cancel_event`` is set (polled every 50 ms until the attempt ends)."""
    while not finished.is_set():
        if job.cancel_event.wait(0.05):
            if not finished.is_set():
                stream.cancel()
            return


def _error(event: dict[str, Any]) -> Exception:
    """The exception a replica's ``error`` event stands for (the messages are for the user)."""
    kind, message = event.get("kind"), str(event.get("message", ""))
    if kind == "imaging":
        return ImagingError(message)
    if kind == "value":
        return ValueError(message)
    if kind == "backend":
        return BackendError(message)
    return BackendError(f"The run failed on its model replica because of an internal error ({message}). It has "
                        f"been logged there; please try again.")


def _clean(job: Job, keep: set[str]) -> None:
    """Remove what a lost attempt wrote into the run folder: every file that was not there before the run (the
    history thumbnail, which the pages may have cached meanwhile, stays)."""
    for path in job.run_dir.iterdir():
        if path.name not in keep and path.name != THUMBNAIL and path.is_file():
            path.unlink(missing_ok=True)
