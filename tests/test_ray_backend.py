"""The Ray Serve backend (issue 14): a local Ray cluster on 127.0.0.1, the tiny model on 2 CPU replicas, and the
review API in front of it: a run end to end with its progress stream, cancel, and a replica killed mid-run.

Skipped with the reason when ``ray[serve]`` is not installed, unless ``VALD_MD_REQUIRE_RAY=1`` (CI), where it
fails instead. One cluster and one deployment serve the whole module (about 10 s to start on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.web import create_app
from tests.accounts import add_user, sign_in
from tests.factories import png_bytes
from tests.test_web import wait_state

pytestmark = pytest.mark.ray

FAST = {"strength": "0.5", "steps": "4", "guidance_scale": "5", "seed": "11"}
LONG = {"strength": "1.0", "steps": "600", "guidance_scale": "5", "seed": "3"}  # seconds on the tiny model


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        reason = "ray[serve] is not installed (pip install -e '.[ray]'); the Ray backend is not tested"
        if os.environ.get("VALD_MD_REQUIRE_RAY") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 with 2 CPUs, shut down (Serve first) after the module."""
    ray = _require_ray()
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="vald-md",
             log_to_driver=False)
    try:
        yield ray
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_app(ray_cluster, tiny_engine, tmp_path_factory):
    """The review app with ``backend=ray``: the tiny model on 2 replicas of half a CPU each."""
    data = tmp_path_factory.mktemp("ray-data")
    settings = Settings(data_dir=data, backend="ray", ray_replicas=2, ray_cpus_per_replica=0.5, device="cpu",
                        model_dir=Path(tiny_engine.info.path), lung_segmenter=data / "no-segmenter-here",
                        lesion_classifier=data / "no-classifier-here", queue_size=4, max_steps=1000,
                        sse_interval_s=0.05)
    app = create_app(settings, engine=tiny_engine)
    with TestClient(app) as client:
        sign_in(client, app, add_user(app.state.db, "clinician-r"))
        yield app, client


def submit(client: TestClient, **fields: str) -> str:
    r = client.post("/api/v1/counterfactuals", data={**FAST, **fields},
                    files={"file": ("patient.png", png_bytes())})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def placement(app: Any, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The running attempt's replica (``start`` event), once the job has made progress on it."""
    backend = app.state.jobs.backend
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = app.state.jobs.get(job_id, "", any_owner=True)
        where = backend.placements.get(job_id)
        if where is not None and job.step > 0:
            return dict(where)
        assert not job.state.finished, f"the job ended ({job.state}: {job.error}) before it was seen running"
        time.sleep(0.01)
    raise AssertionError("the job never started on a replica")


def record_of(client: TestClient, job_id: str) -> dict[str, Any]:
    r = client.get(f"/api/v1/jobs/{job_id}/artifacts/record.json")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_run_end_to_end_through_ray(ray_app):
    app, client = ray_app
    assert app.state.jobs.backend.name == "ray" and app.state.jobs.backend.concurrency == 2
    assert len(app.state.jobs._threads) == 2
    job_id = submit(client, steps="150", strength="1.0")
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:  # ends when the job does
        body = "".join(r.iter_text())
    events = [json.loads(d) for name, d in re.findall(r"event: (\w+)\r?\ndata: (.*)", body) if name == "status"]
    assert events[-1]["state"] == "done", events[-1]
    steps = {e["progress"]["step"] for e in events if e["state"] == "running"}
    assert len(steps) >= 2, f"the stream showed no step-by-step progress: {steps}"  # the replica's events
    st = wait_state(client, job_id)
    assert set(st["artifacts"]) >= {"input.png", "counterfactual.png", "overlay.png", "attribution.npy",
                                    "record.json", "reconstruction.png"}
    assert client.get(f"/api/v1/jobs/{job_id}/artifacts/overlay.png").content.startswith(b"\x89PNG")
    record = record_of(client, job_id)
    serving = record["serving"]
    assert serving["backend"] == "ray" and serving["attempt"] == 1 and serving["node"]
    assert re.fullmatch(r"\w+", serving["replica"])
    assert record["seeds"] == [11] and record["effective_steps"] == 150
    assert job_id not in app.state.jobs.backend.placements


def test_two_replicas_run_two_jobs_at_once(ray_app):
    app, client = ray_app
    first, second = submit(client, **LONG), submit(client, **LONG)
    where = {placement(app, first)["replica"], placement(app, second)["replica"]}
    assert len(where) == 2, "both jobs should run at once, one per replica"
    # a second front starting now learns the model while every replica runs a review (no request to a replica)
    from ray import serve

    from app.serving.backend import _served_model

    assert _served_model(serve.status().applications["vald-md"]) == app.state.engine.info.model_hash
    for job_id in (first, second):
        client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert {wait_state(client, j)["state"] for j in (first, second)} == {"cancelled"}


def test_cancel_stops_the_run_on_its_replica(ray_app):
    app, client = ray_app
    job_id = submit(client, **LONG)
    placement(app, job_id)
    t0 = time.monotonic()
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    st = wait_state(client, job_id, timeout=20)
    assert st["state"] == "cancelled" and time.monotonic() - t0 < 10
    # both replicas are free again: two quick runs finish
    again = [submit(client), submit(client)]
    assert [wait_state(client, j)["state"] for j in again] == ["done", "done"]


def test_killed_replica_costs_one_retry_in_a_clean_folder(ray_app, ray_cluster):
    app, client = ray_app
    job_id = submit(client, strength="1.0", steps="300", seed="5")
    victim = placement(app, job_id)
    run_dir = app.state.settings.runs_dir / job_id
    (run_dir / "stale-from-attempt-1.tmp").write_bytes(b"x")  # as if the lost attempt had left a file
    ray_cluster.kill(ray_cluster.get_actor(victim["actor"], namespace="serve"), no_restart=False)
    st = wait_state(client, job_id, timeout=200)  # an upper bound only (a loaded machine restarts replicas slowly)
    assert st["state"] == "done", st
    serving = record_of(client, job_id)["serving"]
    assert serving["attempt"] == 2 and serving["replica"] != victim["replica"]
    assert not (run_dir / "stale-from-attempt-1.tmp").exists()


def test_a_run_lost_twice_fails_with_a_clear_message(ray_app, ray_cluster):
    app, client = ray_app
    job_id = submit(client, **LONG)
    killed: list[str] = []

    def kill_each_attempt() -> None:
        for _ in range(2):
            end = time.monotonic() + 90  # a replica restarting on a loaded 2-core machine takes its time
            while time.monotonic() < end:
                where = app.state.jobs.backend.placements.get(job_id)
                if where is not None and where["actor"] not in killed:
                    killed.append(where["actor"])
                    ray_cluster.kill(ray_cluster.get_actor(where["actor"], namespace="serve"), no_restart=False)
                    break
                time.sleep(0.01)

    killer = threading.Thread(target=kill_each_attempt)
    killer.start()
    st = wait_state(client, job_id, timeout=200)  # an upper bound only: it returns as soon as the run has failed
    killer.join(100)
    assert len(killed) == 2
    assert st["state"] == "failed" and "replica" in st["error"] and "submit it again" in st["error"]


def test_settings_choose_the_backend_and_its_deployment():
    """Pure settings and options: no cluster (these run without ray installed)."""
    from pydantic import ValidationError

    from app.serving import deployment_options

    assert Settings().backend == "local" and Settings().ray_replica_bounds == (1, 1)
    with pytest.raises(ValidationError, match="ray_min_replicas=3 is above ray_max_replicas=2"):
        Settings(ray_min_replicas=3, ray_max_replicas=2)
    with pytest.raises(ValidationError):
        Settings(backend="dask")
    fixed = Settings(backend="ray", ray_replicas=2)
    options, device = deployment_options(fixed, {"CPU": 2.0})
    assert options["num_replicas"] == 2 and options["max_ongoing_requests"] == 1 and device is None
    assert options["ray_actor_options"]["num_cpus"] == 1.0 and "runtime_env" in options["ray_actor_options"]
    options, device = deployment_options(fixed, {"CPU": 32.0, "GPU": 4.0})
    assert options["ray_actor_options"]["num_gpus"] == 1 and device == "cuda"
    scaled = Settings(backend="ray", ray_min_replicas=1, ray_max_replicas=4, ray_address="auto")
    options, _ = deployment_options(scaled, {"CPU": 2.0})
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 1}
    assert options["ray_actor_options"] == {"num_cpus": 0.5}  # an existing cluster: its nodes' own install


def test_the_default_backend_imports_no_ray():
    code = ("import sys; from app.config import Settings; from app.web.app import make_backend; "
            "assert make_backend(Settings(), 'x') is None; assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]


# Without a cluster: the backend against fake Serve handles and streams, the replica's methods on a bare object.


class FakeStream:
    """A Serve streaming response: yields ``events``, then raises ``error`` (if any); records cancel()."""

    def __init__(self, events: list[dict[str, Any]], error: BaseException | None = None) -> None:
        self.events, self.error, self.cancelled = events, error, False

    def __iter__(self) -> Any:
        yield from self.events
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A ``DeploymentHandle``: each ``review`` call takes the next stream; ``describe`` answers or times out."""

    def __init__(self, streams: list[FakeStream], described: dict[str, Any] | None = None) -> None:
        self.streams, self.calls, self.described = streams, 0, described

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def review(self) -> Any:
        return self

    @property
    def describe(self) -> Any:
        return self

    def remote(self, *_: Any) -> Any:
        if self.streams:
            self.calls += 1
            return self.streams[self.calls - 1]
        return self

    def result(self, timeout_s: float) -> dict[str, Any]:
        if self.described is None:
            raise TimeoutError("timed out")
        return self.described


def _start(model: str = "a" * 64) -> dict[str, Any]:
    return {"event": "start", "replica": "r1", "actor": "SERVE_REPLICA::x", "node": "10.0.0.7", "attempt": 1,
            "model_sha256": model}


@pytest.fixture
def fake_job(tmp_path):
    from app.jobs import Job
    from app.runs.review import ReviewRequest

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "upload.png").write_bytes(png_bytes())
    return Job(id="j" * 32, owner="alice", request=ReviewRequest(strength=0.5, steps=4, samples=1, seed=1),
               run_dir=run_dir, upload_name="upload.png", input_summary={}, has_mask=False, effective_steps=2,
               created_at=datetime(2026, 1, 2, tzinfo=UTC))


def test_a_replica_of_another_model_fails_the_run(fake_job):
    _require_ray()
    from app.jobs import BackendError
    from app.serving import RayBackend

    stream = FakeStream([_start("b" * 64), {"event": "progress", "step": 1, "total": 2, "elapsed_s": 0.1}])
    backend = RayBackend(FakeHandle([stream]), 1, model_sha256="a" * 64)
    with pytest.raises(BackendError, match=f"hash {'b' * 64}.*hash {'a' * 64}"):
        backend.run(fake_job, b"", lambda *a: None)
    assert stream.cancelled and not backend.placements


def test_an_unreachable_replica_is_cancelled_and_not_retried(fake_job):
    ray = _require_ray()
    from app.jobs import BackendError
    from app.serving import RayBackend

    first = FakeStream([_start()], ray.exceptions.ActorUnavailableError("connection lost", None))
    handle = FakeHandle([first, FakeStream([_start()])])
    with pytest.raises(BackendError, match=r"unreachable.*not retried"):
        RayBackend(handle, 1, model_sha256="a" * 64).run(fake_job, b"", lambda *a: None)
    assert handle.calls == 1 and first.cancelled


def test_a_dead_replica_is_cancelled_before_the_retry(fake_job):
    ray = _require_ray()
    from app.jobs import BackendError
    from app.serving import RayBackend

    streams = [FakeStream([_start()], ray.exceptions.ActorDiedError()) for _ in range(2)]
    handle = FakeHandle(streams)
    with pytest.raises(BackendError, match="submit it again"):
        RayBackend(handle, 1).run(fake_job, b"", lambda *a: None)
    assert handle.calls == 2 and all(s.cancelled for s in streams)


def test_a_busy_application_fails_the_front_with_a_message(monkeypatch):
    _require_ray()
    from ray import serve

    from app.jobs import BackendError
    from app.serving import RayBackend, backend

    monkeypatch.setattr(backend, "connect", lambda settings: False)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"vald-md": None}))  # an old name
    monkeypatch.setattr(backend, "deploy", lambda settings: pytest.fail("redeployed"))
    monkeypatch.setattr(serve, "get_app_handle", lambda name: FakeHandle([], described=None))
    with pytest.raises(BackendError, match="did not say which model it serves"):
        RayBackend.from_settings(Settings(backend="ray"), model_sha256="a" * 64)
    # a shared cluster's application of another model is not replaced; the same model is reused
    deployed = SimpleNamespace(deployments={"ReviewReplica-" + "b" * 64: None})
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"vald-md": deployed}))
    with pytest.raises(BackendError, match=f"hash {'b' * 64}.*hash {'a' * 64}.*vald-md ray-serve"):
        RayBackend.from_settings(Settings(backend="ray", ray_address="auto"), model_sha256="a" * 64)
    reused = RayBackend.from_settings(Settings(backend="ray", ray_address="auto"), model_sha256="b" * 64)
    assert reused.model_sha256 == "b" * 64


def test_the_replica_describes_itself_without_its_run_thread_and_hides_its_address(tmp_path):
    import asyncio

    from app.serving import ReviewReplica

    replica = object.__new__(ReviewReplica)  # no model load: the attributes __init__ sets
    replica.replica_id, replica.node, replica.torch_threads, replica._pool = "r1", "10.0.0.7", 3, None
    replica.engine = SimpleNamespace(info=SimpleNamespace(name="tiny", model_hash="a" * 64), device="cpu")
    described = asyncio.run(replica.describe())
    assert described["model_sha256"] == "a" * 64 and described["torch_threads"] == 3
    end = replica._run({"run_dir": str(tmp_path / "elsewhere"), "upload_name": "u.png", "job_id": "j"},
                       None, threading.Event(), {})
    assert end["kind"] == "backend" and "cannot see this run's folder" in end["message"]
    assert "10.0.0.7" not in end["message"]


def test_a_missing_ray_is_a_backend_error(monkeypatch):
    from app.jobs import BackendError
    from app.serving import RayBackend

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'vald-md\[ray\]'"):
        RayBackend.from_settings(Settings(backend="ray"), model_sha256="a" * 64)
