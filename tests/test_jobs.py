"""The job queue: states, the bounded queue, cancellation, ownership, progress and persistence.

Most tests inject a gated fake runner (no model) so timing is under the test's control; two use the tiny in-code
model to check that cancellation really stops the diffusion within one step and that previews are real PNGs.
The audit tests give the manager a SQLite audit database and check that it is the record of every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app import audit, imaging
from app.engine import GenerationCancelled
from app.jobs import (
    JOB_FILE,
    AuditRecorder,
    Backend,
    BackendError,
    JobManager,
    JobNotFoundError,
    JobState,
    JobStore,
    Limits,
    NullRecorder,
    QueueFullError,
    UserQueueLimitError,
    WorkerStoppedError,
)
from app.runs.record import RunRecord
from app.runs.review import ReviewRequest
from tests.factories import edited_dicom, png_bytes


class FakeEngine:
    """Just what JobManager asks of an engine outside the runner."""

    info = SimpleNamespace(model_hash="5e" * 32, name="fake")

    def check_inputs(self, image, *, request) -> None:
        if not 0 < request.strength <= 1:
            raise ValueError(f"strength={request.strength} must be in (0, 1]")


class GatedRunner:
    """A stand-in for ``run_review``: ``steps`` progress calls, each waiting for ``gate`` (or cancel)."""

    def __init__(self, steps: int = 3, gated: bool = True, fail: BaseException | None = None) -> None:
        self.steps = steps
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self.calls: list[str] = []
        self.classifiers: list[Any] = []
        self.fail = fail

    def __call__(self, engine: Any, data: bytes, req: ReviewRequest, out: Path, *, mask=None, progress=None,
                 cancel=None, decoded=None, segmenter=None, classifier=None) -> RunRecord:
        self.calls.append(out.name)
        self.classifiers.append(classifier)
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
        png = imaging.to_png_bytes(decoded.pixels, bits=16)
        (out / "input.png").write_bytes(png)
        record = {"effective_steps": 2, "unet_evaluations": self.steps, "seeds": [req.seed],
                  "timings_s": {"denoising": 0.02 * self.steps, "total": 0.05},
                  "artifacts_sha256": {"input.png": hashlib.sha256(png).hexdigest()}}
        (out / "record.json").write_text(json.dumps(record))
        return RunRecord.from_dict(record)


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for a job state")
        time.sleep(0.01)


@pytest.fixture
def make_manager(tmp_path):
    managers: list[JobManager] = []

    def make(runner: Any = None, *, queue_size: int = 4, engine: Any = None, runs_dir: Path | None = None,
             db: Any = None, uid_secret: bytes | None = None, store_plain_uids: bool = False,
             store_identified_uploads: bool = False, max_jobs_per_user: int | None = None,
             cost_budget: int | None = None, **kw: Any):
        store = JobStore(runs_dir or tmp_path / "runs", identified_uploads=store_identified_uploads)
        recorder = (NullRecorder() if db is None else
                    AuditRecorder(db, uid_secret, store_plain_uids=store_plain_uids))
        limits = Limits(queue_size=queue_size, max_jobs_per_user=max_jobs_per_user, cost_budget=cost_budget)
        m = JobManager(engine or FakeEngine(), store, recorder, limits, runner=runner or GatedRunner(gated=False),
                       preview_size=64, **kw)
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


def test_map_method_is_checked_at_submission(make_manager, tmp_path):
    """Default: the manifest's method (sdedit without the key); classifier_guided needs the classifier and the
    segmenter, and one sample; refusals create no job."""
    m = make_manager(GatedRunner(gated=False))
    job = m.submit("alice", png_bytes(), req(seed=1))
    assert job.request.map_method == "sdedit"
    for bad, message in ((req(map_method="classifier_guided"), "no lesion classifier is loaded"),
                         (req(map_method="gradcam"), "is not a map method"),
                         (req(map_method="classifier_guided", samples=3), "one counterfactual")):
        with pytest.raises(ValueError, match=message):
            m.submit("alice", png_bytes(), bad)
    runner = GatedRunner(gated=False)
    clf, seg = object(), object()
    engine = FakeEngine()
    engine.info = SimpleNamespace(model_hash="5e" * 32, name="fake", manifest={"map_method": "classifier_guided"})
    ready = make_manager(runner, engine=engine, runs_dir=tmp_path / "ready", classifier=clf, segmenter=seg)
    job = ready.submit("alice", png_bytes(), req(seed=1))  # the manifest's method
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.DONE and job.request.map_method == "classifier_guided"
    assert runner.classifiers == [clf]
    saved = json.loads((job.run_dir / JOB_FILE).read_text())
    assert saved["request"]["map_method"] == "classifier_guided" and saved["request"]["classifier_scale"] == 0.3
    assert len(list((tmp_path / "runs").iterdir())) == 1  # the refused submissions left nothing


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
    fresh = JobManager(FakeEngine(), JobStore(tmp_path / "runs"), NullRecorder(), Limits(queue_size=4),
                       runner=GatedRunner(gated=False))
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
    m = JobManager(tiny_engine, JobStore(tmp_path / "runs"), NullRecorder(), Limits(queue_size=2))
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


def test_progress_counts_the_effective_steps_the_form_shows(tiny_engine, tmp_path):
    """"15 effective steps" runs as "step 15 of 15", although PNDM makes one more UNet evaluation (issue 12)."""
    m = JobManager(tiny_engine, JobStore(tmp_path / "runs"), NullRecorder(), Limits(queue_size=2))
    m.start()
    try:
        seen: list[tuple[int, int]] = []
        job = m.submit("alice", png_bytes(), ReviewRequest(strength=0.5, steps=8, seed=1))
        while not job.state.finished:
            if job.total:
                seen.append((job.step, job.total))
            time.sleep(0.002)
        assert job.state is JobState.DONE, job.error
        assert job.effective_steps == 4 and job.unet_evaluations == 5
        assert job.step == job.total == job.effective_steps
        assert all(total == 4 and 0 <= step <= 4 for step, total in seen), seen
    finally:
        m.stop(timeout=10)


# ----------------------------------------------------------------------------------------------------------------
# the audit database is the record of every run
# ----------------------------------------------------------------------------------------------------------------
SECRET = bytes(range(32))


@pytest.fixture
def db(tmp_path):
    engine = audit.init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def alice(db):
    from tests.accounts import add_user

    return add_user(db, "alice")


def _actions(db) -> list[str]:
    return [e.action for e in reversed(audit.query_events(db, limit=1000))]


def test_runs_are_recorded_in_the_audit_database(make_manager, db, alice):
    m = make_manager(GatedRunner(gated=False), db=db, uid_secret=SECRET)
    data = png_bytes()
    job = m.submit(alice, data, req(seed=7, prompt="small effusion"))
    wait_for(lambda: job.state.finished)
    assert job.owner == str(alice.id) and job.state is JobState.DONE
    run = audit.get_run(db, uuid.UUID(job.id))  # the job id is the run id
    assert run.status == "done" and run.user_id == alice.id and run.seeds == [7]
    assert run.params["seed"] == 7 and run.params["prompt"] == "small effusion" and run.params["mask"] is False
    assert run.effective_steps == 2 and {"queued", "run", "denoising"} <= set(run.timings)
    assert set(run.artifact_hashes) == {"input.png"} and run.model_sha256 == FakeEngine.info.model_hash
    assert {"torch", "numpy"} <= set(run.library_versions)
    assert run.started_at is not None and run.finished_at >= run.started_at
    with audit.read_session(db) as session:
        upload = session.get(audit.InputImage, run.input_id)
    assert upload.upload_sha256 == hashlib.sha256(data).hexdigest() and (upload.rows, upload.cols) == (40, 36)
    pixels = imaging.decode_image(data).pixels
    assert upload.pixel_sha256 == hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
    assert _actions(db) == ["upload", "generate", "run_done"]
    assert json.loads((job.run_dir / JOB_FILE).read_text())["input_id"] == str(upload.id)


def test_cancelled_and_failed_runs_are_recorded_with_reason_and_actor(make_manager, db, alice):
    from tests.accounts import add_user

    admin = add_user(db, "root", role="admin")
    runner = GatedRunner()
    m = make_manager(runner, db=db, uid_secret=SECRET)
    running = m.submit(alice, png_bytes(), req())
    assert runner.started.wait(5)
    waiting = m.submit(alice, png_bytes(), req())
    with pytest.raises(JobNotFoundError):
        m.cancel(waiting.id, "someone-else")
    m.cancel(waiting.id, "", any_owner=True, actor=admin)  # an admin may cancel anyone's run
    run = audit.get_run(db, uuid.UUID(waiting.id))
    assert waiting.state is JobState.CANCELLED and run.status == "cancelled" and run.reason == "cancelled by the user"
    cancel_event = audit.query_events(db, action="cancel")[0]
    assert cancel_event.username == "root" and cancel_event.object_id == str(run.id)
    runner.fail = ValueError("strength out of range for this model")
    runner.gate.set()
    wait_for(lambda: running.state.finished)
    failing = m.submit(alice, png_bytes(), req())
    wait_for(lambda: failing.state.finished)
    run = audit.get_run(db, uuid.UUID(failing.id))
    assert failing.state is JobState.FAILED and run.status == "failed" and "strength" in run.reason


def test_delete_removes_one_finished_run_and_nothing_else(make_manager, db, alice, tmp_path):
    """Deleting a run (issue 12) removes its folder and history entry, audited first; its re-run, another run of
    the same image and other users' runs keep every file; unfinished and foreign runs are refused."""
    from tests.accounts import add_user

    runner = GatedRunner(gated=False)
    m = make_manager(runner, db=db, uid_secret=SECRET)
    bob = add_user(db, "bob")
    data = png_bytes()
    first = m.submit(alice, data, req(seed=1))
    wait_for(lambda: first.state.finished)
    rerun = m.submit(alice, first.upload_path.read_bytes(), req(seed=2), rerun_of=first.id)
    other = m.submit(bob, data, req(seed=3))
    wait_for(lambda: rerun.state.finished and other.state.finished)
    # the finished state shows before job.json's atomic write (its temporary file) has landed
    wait_for(lambda: not any(p.name.endswith(".tmp") for j in (rerun, other) for p in j.run_dir.iterdir()))
    kept = {j.id: sorted(p.name for p in j.run_dir.iterdir()) for j in (rerun, other)}
    with pytest.raises(JobNotFoundError):
        m.delete(first.id, str(bob.id), actor=bob)  # not bob's
    m.delete(first.id, str(alice.id), actor=alice)
    assert not first.run_dir.exists()
    with pytest.raises(JobNotFoundError):
        m.get(first.id, str(alice.id))
    assert [j.id for j in m.list_jobs(str(alice.id))] == [rerun.id]
    assert {j.id: sorted(p.name for p in j.run_dir.iterdir()) for j in (rerun, other)} == kept
    [event] = audit.query_events(db, action="run_delete")
    assert event.username == "alice" and event.object_id == str(uuid.UUID(first.id))
    assert audit.get_run(db, uuid.UUID(first.id)).status == "done"  # the record of the run stays
    # a restart does not bring it back
    m.stop(timeout=5)
    again = make_manager(runner, db=db, uid_secret=SECRET)
    assert first.id not in {j.id for j in again.list_jobs(None)} and rerun.id in {j.id for j in again.list_jobs(None)}
    # a queued or running run is cancelled first
    gate = GatedRunner(gated=True)
    m2 = make_manager(gate, db=db, uid_secret=SECRET, runs_dir=tmp_path / "runs2")
    busy = m2.submit(alice, data, req())
    with pytest.raises(ValueError, match="cancel it first"):
        m2.delete(busy.id, str(alice.id), actor=alice)
    gate.gate.set()
    wait_for(lambda: busy.state.finished)


def test_refused_upload_is_audited_and_nothing_is_recorded(make_manager, db, alice, tmp_path):
    m = make_manager(db=db, uid_secret=SECRET)
    with pytest.raises(imaging.ImagingError):
        m.submit(alice, b"not an image at all", req())
    with pytest.raises(ValueError):
        m.submit(alice, png_bytes(), req(strength=1.5))
    events = audit.query_events(db, action="upload")
    assert [e.outcome for e in events] == ["minor_failure"] * 2
    assert {e.detail["refused"] for e in events} == {"UnsupportedImageError", "ValueError"}
    assert audit.list_runs(db) == [] and list((tmp_path / "runs").iterdir()) == []
    with pytest.raises(ValueError, match=r"audit.User"):
        m.submit("alice", png_bytes(), req())  # with a database, the owner must be a real user


def test_restart_marks_runs_and_jobs_interrupted_consistently(make_manager, db, alice, tmp_path):
    runner = GatedRunner()
    m = make_manager(runner, db=db, uid_secret=SECRET)
    running = m.submit(alice, png_bytes(), req())
    assert runner.started.wait(5)
    waiting = m.submit(alice, png_bytes(), req())
    m.stop(timeout=5)  # cancels the running job; the waiting one stays queued in job.json and the database
    assert audit.get_run(db, uuid.UUID(running.id)).reason == "the server was shutting down"
    assert audit.get_run(db, uuid.UUID(waiting.id)).status == "queued"
    # the next start-up: the database first (as the app's lifespan does), then the job history
    assert audit.mark_interrupted_runs(db) == 1
    fresh = JobManager(FakeEngine(), JobStore(tmp_path / "runs"), AuditRecorder(db, SECRET), Limits(),
                       runner=GatedRunner(gated=False))
    reloaded = {j.id: j for j in fresh.list_jobs(str(alice.id))}
    assert reloaded[waiting.id].state is JobState.INTERRUPTED
    assert audit.get_run(db, uuid.UUID(waiting.id)).status == "interrupted"
    assert reloaded[running.id].state is JobState.CANCELLED
    assert audit.query_events(db, action="job_interrupted")[0].object_id == str(uuid.UUID(waiting.id))


def test_unfinished_job_takes_the_databases_word(make_manager, db, alice, tmp_path):
    """The process died after the database recorded the end of a run but before job.json did."""
    m = make_manager(GatedRunner(gated=False), db=db, uid_secret=SECRET)
    job = m.submit(alice, png_bytes(), req())
    wait_for(lambda: job.state.finished)
    m.stop(timeout=5)
    saved = json.loads((job.run_dir / JOB_FILE).read_text())
    (job.run_dir / JOB_FILE).write_text(json.dumps({**saved, "state": "running"}))
    fresh = JobManager(FakeEngine(), JobStore(tmp_path / "runs"), AuditRecorder(db, SECRET), Limits())
    assert fresh.get(job.id, str(alice.id)).state is JobState.DONE


def _identified_dicom(shared_data: Path) -> bytes:
    return edited_dicom(shared_data / "dicom" / "siim_cr_chest.dcm", private_value="private-secret-value",
                        PatientName="Doe^Jane", PatientID="MRN-4711-0815", PatientBirthDate="19610203",
                        InstitutionName="Saint Example Hospital", AccessionNumber="ACC-99887766",
                        ReferringPhysicianName="Who^Doctor", StudyDate="20240517")


IDENTIFIERS = (b"Doe^Jane", b"MRN-4711-0815", b"19610203", b"Saint Example Hospital", b"ACC-99887766",
               b"Who^Doctor", b"20240517", b"private-secret-value")


@pytest.mark.shared_data
def test_stored_dicom_is_deidentified_and_uids_are_hmacs(make_manager, db, alice, shared_data):
    import pydicom

    data = _identified_dicom(shared_data)
    assert all(x in data for x in IDENTIFIERS)
    m = make_manager(GatedRunner(gated=False), db=db, uid_secret=SECRET)
    job = m.submit(alice, data, req(seed=3))
    stored = job.upload_path.read_bytes()
    assert job.upload_path.name == "upload.dcm"
    assert [x for x in IDENTIFIERS if x in stored] == []
    ds = pydicom.dcmread(io.BytesIO(stored))
    original = pydicom.dcmread(io.BytesIO(data))
    assert ds.PatientIdentityRemoved == "YES" and "PatientName" in ds and not ds.PatientName
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    assert ds.StudyInstanceUID == original.StudyInstanceUID  # Retain UIDs: the Secondary Capture export needs it
    assert np.array_equal(imaging.decode_image(stored).pixels, imaging.decode_image(data).pixels)
    wait_for(lambda: job.state.finished)
    run = audit.get_run(db, uuid.UUID(job.id))
    with audit.read_session(db) as session:
        upload = session.get(audit.InputImage, run.input_id)
    assert upload.upload_sha256 == hashlib.sha256(data).hexdigest()  # what the client sent
    assert upload.study_uid_hmac == audit.hmac_uid(SECRET, original.StudyInstanceUID)
    assert upload.study_instance_uid is None and upload.sop_instance_uid is None
    # the site may opt out of both
    m2 = make_manager(GatedRunner(gated=False), db=db, uid_secret=SECRET, store_identified_uploads=True,
                      store_plain_uids=True, runs_dir=job.run_dir.parent.parent / "runs-identified")
    kept = m2.submit(alice, data, req(seed=3))
    assert kept.upload_path.read_bytes() == data
    wait_for(lambda: kept.state.finished)
    with audit.read_session(db) as session:
        plain = session.get(audit.InputImage, audit.get_run(db, uuid.UUID(kept.id)).input_id)
    assert plain.study_instance_uid == original.StudyInstanceUID


class _ConnectedRequest:
    """What ``job_changes`` asks of a Starlette request: a client that stays connected."""

    async def is_disconnected(self) -> bool:
        return False


def test_progress_stream_thins_steps_and_announces_the_end_at_once(make_manager):
    import asyncio

    from app.web.streams import job_changes

    runner = GatedRunner(steps=40)
    m = make_manager(runner)
    job = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    seen: list[tuple[str, int]] = []

    async def follow() -> float:
        t0 = time.monotonic()
        threading.Timer(0.2, runner.gate.set).start()  # 40 steps of ~10 ms each, then done
        async for j in job_changes(_ConnectedRequest(), m, job, interval=30.0):
            seen.append((j.state.value, j.step))
        return time.monotonic() - t0

    took = asyncio.run(asyncio.wait_for(follow(), timeout=20))
    assert seen[0] == ("running", 0) and seen[-1] == ("done", 40)
    # progress within one interval is thinned to the first event; the state change is sent without waiting
    # for the 30 s interval
    assert len(seen) == 2 and took < 15
    assert job._listeners == []  # the stream unregistered itself


# ----------------------------------------------------------------------------------------------------------------
# sharing the worker: per-user limit, cost budget, fair order, estimates
# ----------------------------------------------------------------------------------------------------------------
def test_per_user_limit_refuses_the_next_run_and_creates_nothing(make_manager, tmp_path):
    runner = GatedRunner()
    m = make_manager(runner, queue_size=8, max_jobs_per_user=2)
    first = m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    m.submit("alice", png_bytes(), req())
    before = set((tmp_path / "runs").iterdir())
    with pytest.raises(UserQueueLimitError) as e:
        m.submit("alice", png_bytes(), req())
    assert e.value.active == 2 and e.value.limit == 2 and "at most 2 per user" in str(e.value)
    assert set((tmp_path / "runs").iterdir()) == before
    assert m.submit("bob", png_bytes(), req()).state is JobState.QUEUED  # others still get in
    m.cancel(first.id, "alice")
    wait_for(lambda: first.state.finished)
    assert m.submit("alice", png_bytes(), req()).state is JobState.QUEUED  # a slot freed up
    runner.gate.set()


def test_whoever_sees_a_run_finished_finds_its_slot_free(make_manager):
    """The end of a run and the release of the worker's slot are one step: at the moment the job is announced
    finished (its listeners run inside that step), its owner may queue the next run under a limit of one."""
    m = make_manager(GatedRunner(gated=False), queue_size=8, max_jobs_per_user=1)
    job = m.submit("alice", png_bytes(), req())
    outcome: list[object] = []

    def on_change() -> None:
        if job.state.finished and not outcome:
            try:
                outcome.append(m.submit("alice", png_bytes(), req()))
            except Exception as e:  # noqa: BLE001 - the limit refused it: the slot was still held
                outcome.append(e)

    job.add_listener(on_change)
    wait_for(lambda: bool(outcome))
    job.remove_listener(on_change)
    assert isinstance(outcome[0], type(job)) and outcome[0].owner == "alice", outcome


def test_submitting_right_after_a_run_finishes_is_never_refused(make_manager):
    """The flaky per-user-limit test's pattern, repeated: wait for the finished state, submit at once."""
    m = make_manager(GatedRunner(gated=False), queue_size=8, max_jobs_per_user=1)
    job = m.submit("alice", png_bytes(), req())
    for _ in range(25):
        while not job.state.finished:
            pass  # no sleep: submit as soon as the state changes
        job = m.submit("alice", png_bytes(), req())
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.DONE


def test_job_cost_counts_the_map_methods_extra_passes() -> None:
    from app.jobs import job_cost

    plain = ReviewRequest(steps=20, strength=0.5, samples=2)
    assert job_cost(plain) == (10 + 1) * 2
    assert job_cost(ReviewRequest(steps=20, strength=0.5, map_method="ddim_inversion")) == (10 + 1) * 2
    assert job_cost(ReviewRequest(steps=20, strength=0.5, map_method="sdedit")) == 10 + 1


def test_cost_budget_refuses_heavy_runs_but_an_empty_queue_takes_any(make_manager):
    runner = GatedRunner()
    m = make_manager(runner, queue_size=8, cost_budget=100)
    m.submit("alice", png_bytes(), req(steps=250, strength=1.0, samples=8))  # runs at once: nothing waits
    assert runner.started.wait(5)
    heavy = m.submit("bob", png_bytes(), req(steps=200, strength=0.4, samples=1))  # 81 step-samples: fits
    assert heavy.cost == 81 and m.queued_cost == 81
    with pytest.raises(QueueFullError) as e:
        m.submit("carol", png_bytes(), req(steps=20, strength=1.0, samples=1))  # 21 more: 102 > 100
    assert (e.value.queued_cost, e.value.cost, e.value.budget) == (81, 21, 100)
    assert "fewer steps or samples" in str(e.value)
    assert m.submit("carol", png_bytes(), req(steps=18, strength=1.0)).cost == 19  # 100: fits exactly
    runner.gate.set()


def test_the_worker_takes_users_in_turn(make_manager):
    runner = GatedRunner()
    m = make_manager(runner, queue_size=16)
    a = [m.submit("alice", png_bytes(), req())]  # runs; alice then queues three more
    assert runner.started.wait(5)
    a += [m.submit("alice", png_bytes(), req()) for _ in range(3)]
    b = [m.submit("bob", png_bytes(), req()) for _ in range(2)]
    c = m.submit("carol", png_bytes(), req())
    # bob and carol do not wait behind alice's backlog: one run each, in turn
    expected = [b[0], c, a[1], b[1], a[2], a[3]]
    assert m.fair_order() == expected
    assert [m.queue_position(j) for j in expected] == [1, 2, 3, 4, 5, 6]
    runner.gate.set()
    wait_for(lambda: all(j.state.finished for j in [*a, *b, c]))
    assert runner.calls == [j.id for j in [a[0], *expected]]


def test_a_newcomer_waits_behind_users_who_waited_longer_but_not_behind_a_backlog(make_manager):
    runner = GatedRunner()
    m = make_manager(runner, queue_size=16)
    m.submit("alice", png_bytes(), req())
    assert runner.started.wait(5)
    a2, a3 = m.submit("alice", png_bytes(), req()), m.submit("alice", png_bytes(), req())
    b1 = m.submit("bob", png_bytes(), req())
    d1 = m.submit("dave", png_bytes(), req())
    assert m.fair_order() == [b1, d1, a2, a3]


def test_queue_estimate_counts_samples_overhead_and_the_fair_order(make_manager):
    runner = GatedRunner(gated=False)
    m = make_manager(runner, queue_size=16)
    done = m.submit("alice", png_bytes(), req(samples=2))
    wait_for(lambda: done.state.finished)
    # GatedRunner: 3 UNet evaluations, timed as the engine does from the first step's end to the last's (2
    # evaluations), in 0.06 s of denoising for 2 samples -> 0.015 s per evaluation and sample
    assert m.estimator.seconds_per_eval == pytest.approx(0.015)
    overhead = m.estimator.overhead_s
    assert overhead is not None and overhead >= 0
    runner.gate.clear()
    runner.started.clear()
    running = m.submit("alice", png_bytes(), req(steps=100, strength=1.0, samples=8))
    assert runner.started.wait(5)
    heavy = m.submit("alice", png_bytes(), req(steps=100, strength=1.0, samples=8))  # 808 step-samples
    light = m.submit("bob", png_bytes(), req(steps=10, strength=1.0))  # 11 step-samples
    assert heavy.cost == 808 and light.cost == 11
    assert m.estimated_run_s(heavy) == pytest.approx(12.12 + overhead)
    # bob goes first: his estimate is what the running job has left; alice's heavy one waits for bob's too
    assert running.eta_s is None  # before its first step the running job counts whole
    assert m.queue_eta_s(light) == pytest.approx(12.12 + overhead)
    assert m.queue_eta_s(heavy) == pytest.approx(12.12 + overhead + 0.165 + overhead)
    assert m.queue_eta_s(running) is None
    runner.gate.set()


class SlotsBackend(Backend):
    """A backend with two slots: each run waits for ``gate`` (or cancel); ``fail`` makes runs raise it."""

    name = "slots"
    concurrency = 2

    def __init__(self, fail: BaseException | None = None) -> None:
        self.runner = GatedRunner(steps=2)
        self.fail = fail
        self.closed = False

    def run(self, job, data, progress):
        if self.fail is not None:
            raise self.fail
        return self.runner(None, data, job.request, job.run_dir, progress=progress, cancel=job.cancel_event,
                           decoded=job._decoded)


def test_a_backend_with_two_slots_runs_two_jobs_at_once(make_manager):
    backend = SlotsBackend()
    m = make_manager(backend=backend)
    assert m.backend is backend and len(m._threads) == 2 and m.worker_alive
    first, second, third = (m.submit(owner, png_bytes(), req()) for owner in ("alice", "bob", "carol"))
    wait_for(lambda: first.state is JobState.RUNNING and second.state is JobState.RUNNING)
    assert third.state is JobState.QUEUED and m.queue_position(third) == 1
    backend.runner.gate.set()
    wait_for(lambda: all(j.state is JobState.DONE for j in (first, second, third)))
    assert m._running == []


def test_the_default_backend_is_the_in_process_runner(make_manager):
    runner = GatedRunner(gated=False)
    m = make_manager(runner)
    assert m.backend.name == "local" and m.backend.concurrency == 1 and len(m._threads) == 1
    job = m.submit("alice", png_bytes(), req())
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.DONE and runner.calls == [job.id]


def test_a_backend_error_fails_the_job_with_its_message(make_manager):
    m = make_manager(backend=SlotsBackend(fail=BackendError("The run was lost: the model replica stopped.")))
    job = m.submit("alice", png_bytes(), req())
    wait_for(lambda: job.state.finished)
    assert job.state is JobState.FAILED and job.error == "The run was lost: the model replica stopped."
