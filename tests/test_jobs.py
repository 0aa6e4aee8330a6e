"""The job queue: states, the bounded queue, cancellation, ownership, progress and persistence.

Most tests inject a gated fake runner (no model) so timing is under the test's control; two use the tiny in-code
model to check that cancellation really stops the diffusion within one step and that previews are real PNGs.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app import imaging
from app.artifacts import ReviewRequest
from app.engine import GenerationCancelled
from app.jobs import (
    JOB_FILE,
    JobManager,
    JobNotFoundError,
    JobState,
    QueueFullError,
    WorkerStoppedError,
)


def png_bytes(h: int = 40, w: int = 36, seed: int = 0) -> bytes:
    img = (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class FakeEngine:
    """Just what JobManager asks of an engine outside the runner."""

    def check_inputs(self, image, prompt, strength, guidance_scale, steps, samples, scheduler, seed) -> None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength={strength} must be in (0, 1]")


class GatedRunner:
    """A stand-in for ``run_review``: ``steps`` progress calls, each waiting for ``gate`` (or cancel)."""

    def __init__(self, steps: int = 3, gated: bool = True, fail: BaseException | None = None) -> None:
        self.steps = steps
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, engine: Any, data: bytes, req: ReviewRequest, out: Path, *, mask=None, progress=None,
                 cancel=None, decoded=None) -> dict[str, Any]:
        self.calls.append(out.name)
        self.started.set()
        if self.fail is not None:
            raise self.fail
        for k in range(1, self.steps + 1):
            while not self.gate.wait(0.01):
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled("cancelled")
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("cancelled")
            if progress is not None:
                progress(k, self.steps, 0.01 * k, np.full((8, 8), k / self.steps, np.float32))
        (out / "input.png").write_bytes(imaging.to_png_bytes(decoded.pixels, bits=16))
        record = {"effective_steps": 2, "unet_evaluations": self.steps, "seeds": [req.seed],
                  "timings_s": {"denoising": 0.02 * self.steps, "total": 0.05}}
        (out / "record.json").write_text(json.dumps(record))
        return record


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for a job state")
        time.sleep(0.01)


@pytest.fixture
def make_manager(tmp_path):
    managers: list[JobManager] = []

    def make(runner: Any = None, *, queue_size: int = 4, engine: Any = None, runs_dir: Path | None = None):
        m = JobManager(engine or FakeEngine(), runs_dir or tmp_path / "runs", queue_size=queue_size,
                       runner=runner or GatedRunner(gated=False), preview_size=64)
        m.start()
        managers.append(m)
        return m

    yield make
    for m in managers:
        m.stop(timeout=5)


def req(**kw: Any) -> ReviewRequest:
    return ReviewRequest(**{"strength": 0.5, "steps": 4, **kw})


def test_job_runs_to_done_and_persists_without_client_names(make_manager, tmp_path):
    runner = GatedRunner(gated=False)
    m = make_manager(runner)
    job = m.submit("alice", png_bytes(), req(seed=7))
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.DONE and job.error is None
    assert job.step == job.total == 3
    assert job.seeds == [7] and job.effective_steps == 2
    assert {"queued", "run", "denoising"} <= set(job.timings_s)
    files = {p.name for p in job.run_dir.iterdir()}
    assert "upload.png" in files and JOB_FILE in files  # the server's names; JobManager never sees the client's
    saved = json.loads((job.run_dir / JOB_FILE).read_text())
    assert saved["state"] == "done" and saved["owner"] == "alice" and saved["request"]["seed"] == 7
    assert saved["input_summary"]["source_format"] == "png"


def test_seed_is_fixed_at_submission(make_manager):
    m = make_manager(GatedRunner())
    job = m.submit("alice", png_bytes(), req(seed=None))
    assert isinstance(job.request.seed, int) and job.seeds == [job.request.seed]


def test_bounded_queue_refuses_and_creates_nothing(make_manager, tmp_path):
    runner = GatedRunner()
    m = make_manager(runner, queue_size=1)
    running = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    waiting = m.submit("alice", png_bytes(), req())
    assert m.queue_position(waiting) == 1 and m.queue_position(running) is None
    before = set((tmp_path / "runs").iterdir())
    with pytest.raises(QueueFullError) as e:
        m.submit("alice", png_bytes(), req())
    assert e.value.queue_length == 1 and e.value.capacity == 1
    assert "1 of 1" in str(e.value)
    assert set((tmp_path / "runs").iterdir()) == before
    runner.gate.set()
    wait_for(lambda: waiting.state.finished)
    assert running.state is waiting.state is JobState.DONE


def test_cancel_queued_job_before_it_starts(make_manager):
    runner = GatedRunner()
    m = make_manager(runner)
    first = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    second = m.submit("alice", png_bytes(), req())
    m.cancel(second.id, "alice")
    assert second.state is JobState.CANCELLED and m.queue_length == 0
    runner.gate.set()
    wait_for(lambda: first.state.finished)
    assert runner.calls == [first.id]  # the cancelled job never reached the runner


def test_cancel_running_job(make_manager):
    runner = GatedRunner(steps=50)
    m = make_manager(runner)
    job = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    m.cancel(job.id, "alice")
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.CANCELLED
    assert not (job.run_dir / "record.json").exists()


def test_owner_filtering(make_manager):
    m = make_manager()
    job = m.submit("alice", png_bytes(), req())
    assert m.get(job.id, "alice") is job
    with pytest.raises(JobNotFoundError):
        m.get(job.id, "bob")
    with pytest.raises(JobNotFoundError):
        m.cancel(job.id, "bob")
    assert m.list_jobs("bob") == [] and m.list_jobs("alice") == [job]


def test_bad_upload_or_parameters_create_no_job(make_manager, tmp_path):
    m = make_manager()
    with pytest.raises(imaging.ImagingError):
        m.submit("alice", b"not an image at all", req())
    with pytest.raises(ValueError, match="strength"):
        m.submit("alice", png_bytes(), req(strength=1.5))
    with pytest.raises(ValueError, match="mask"):
        m.submit("alice", png_bytes(), req(), mask_png=b"garbage")
    assert list((tmp_path / "runs").iterdir()) == [] and m.list_jobs("alice") == []


def test_failure_is_reported_and_worker_survives(make_manager):
    runner = GatedRunner(gated=False, fail=RuntimeError("boom: /secret/path"))
    m = make_manager(runner)
    job = m.submit("alice", png_bytes(), req())
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.FAILED
    assert "internal error" in job.error and "secret" not in job.error
    runner.fail = None
    ok = m.submit("alice", png_bytes(), req())
    wait_for(lambda: ok.state.finished)
    assert ok.state is JobState.DONE and m.worker_alive


def test_progress_state_and_preview_png(make_manager):
    runner = GatedRunner(steps=4)
    m = make_manager(runner)
    job = m.submit("alice", png_bytes(), req())
    assert m.preview_png(job) is None
    assert runner.started.wait(5)
    runner.gate.set()
    wait_for(lambda: job.state.finished)
    png = m.preview_png(job)
    assert png is not None and png.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png)).size == (64, 64)  # 8x8 preview upscaled by a whole factor to 64 px
    assert job.eta_s is None and job.step == 4


def test_history_reloads_and_unfinished_become_interrupted(make_manager, tmp_path):
    runner = GatedRunner()
    m = make_manager(runner)
    done_runner_job = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    waiting = m.submit("alice", png_bytes(), req())
    m.stop(timeout=5)  # cancels the running job; the queued one stays queued on disk
    fresh = JobManager(FakeEngine(), tmp_path / "runs", queue_size=4, runner=GatedRunner(gated=False))
    reloaded = {j.id: j for j in fresh.list_jobs("alice")}
    assert set(reloaded) == {done_runner_job.id, waiting.id}
    assert reloaded[waiting.id].state is JobState.INTERRUPTED
    assert "server stopped" in reloaded[waiting.id].error


def test_submit_after_stop_is_refused(make_manager):
    m = make_manager()
    m.stop(timeout=5)
    with pytest.raises(WorkerStoppedError):
        m.submit("alice", png_bytes(), req())


def test_cancel_stops_real_diffusion_within_one_step(tiny_engine, tmp_path):
    m = JobManager(tiny_engine, tmp_path / "runs", queue_size=2)
    m.start()
    try:
        job = m.submit("alice", png_bytes(), ReviewRequest(strength=1.0, steps=400, seed=1))
        wait_for(lambda: job.step >= 2, timeout=60)
        m.cancel(job.id, "alice")
        at_cancel = job.step
        wait_for(lambda: job.state.finished, timeout=30)
        assert job.state is JobState.CANCELLED
        assert job.step <= at_cancel + 1 < job.total
        assert m.preview_png(job).startswith(b"\x89PNG")
    finally:
        m.stop(timeout=10)
