"""The job queue's parts alone, without a worker: the store (job.json, history, thumbnails), the recorders (the
audit database, or the null object), the rate/ETA estimator, the queue policy (limits, fair order) and the
manager's builder from the server's settings."""

from __future__ import annotations

import io
import json
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app import audit, imaging
from app.config import Settings
from app.fileio import sha256_bytes
from app.jobs import (
    JOB_FILE,
    METHOD_COST_FACTOR,
    THUMBNAIL,
    AuditRecorder,
    Job,
    JobManager,
    JobState,
    JobStore,
    Limits,
    NullRecorder,
    QueueFullError,
    RateEstimator,
    UserQueueLimitError,
    fair_order,
    job_cost,
)
from app.runs.review import ReviewRequest

SECRET = bytes(range(32))


def _job(store: JobStore, owner: str = "alice", *, state: JobState = JobState.QUEUED, tick: int = 0,
         steps: int = 4, samples: int = 1, input_id: str | None = None) -> Job:
    job_id = uuid.uuid4().hex
    return Job(id=job_id, owner=owner, request=ReviewRequest(strength=0.5, steps=steps, samples=samples, seed=1),
               run_dir=store.run_dir(job_id), upload_name=store.upload_name("png"),
               input_summary={"source_format": "png"}, has_mask=False, effective_steps=steps // 2,
               created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), state=state, queued_tick=tick,
               input_id=input_id)


def _png(h: int = 40, w: int = 36) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((h, w)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------------------------
def test_store_writes_an_owner_only_folder_and_the_job_json_bytes(tmp_path):
    store = JobStore(tmp_path / "runs")
    job = _job(store)
    store.create(job)
    store.write_upload(job, b"stored bytes", b"mask png")
    assert job.upload_path.name == "upload.png" and job.upload_path.read_bytes() == b"stored bytes"
    assert (job.run_dir / "mask-upload.png").read_bytes() == b"mask png"
    assert (job.run_dir / JOB_FILE).read_bytes() == json.dumps(job.to_json(), indent=2).encode()
    assert stat.S_IMODE(job.run_dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in job.run_dir.iterdir()} == {0o600}
    with pytest.raises(FileExistsError):
        store.create(job)  # an existing folder is never reused
    store.remove(job)
    assert not job.run_dir.exists()
    store.remove(job)  # gone already: no error
    assert [store.upload_name(f) for f in ("dicom", "png", "jpeg", "tiff")] == [
        "upload.dcm", "upload.png", "upload.jpg", "upload.bin"]


def test_a_job_json_from_before_map_polarities_reads_as_both(tmp_path):
    """Jobs written before issue 16 mapped both directions: re-read (and re-run), they still do, whatever the
    model's default polarity is now; a job with one keeps it."""
    store = JobStore(tmp_path / "runs")
    job = _job(store, state=JobState.DONE)
    stored = job.to_json()
    assert stored["request"]["map_polarity"] is None
    old = {**stored, "request": {k: v for k, v in stored["request"].items() if k != "map_polarity"}}
    assert Job.from_json(job.run_dir, old).request.map_polarity == "both"
    newer = {**stored, "request": {**stored["request"], "map_polarity": "removed"}}
    assert Job.from_json(job.run_dir, newer).request.map_polarity == "removed"


def test_a_job_json_from_before_map_smoothing_reads_as_unsmoothed(tmp_path):
    """Jobs written before map smoothing made unsmoothed maps: re-read (and re-run), they still do, whatever the
    model's default smoothing is now; a job with one keeps it."""
    store = JobStore(tmp_path / "runs")
    job = _job(store, state=JobState.DONE)
    stored = job.to_json()
    old = {**stored, "request": {k: v for k, v in stored["request"].items() if k != "map_smoothing"}}
    assert Job.from_json(job.run_dir, old).request.map_smoothing == 0.0
    newer = {**stored, "request": {**stored["request"], "map_smoothing": 4.0}}
    assert Job.from_json(job.run_dir, newer).request.map_smoothing == 4.0


def test_store_deidentifies_uploads_unless_the_site_keeps_them(tmp_path):
    data = _png()
    kept = JobStore(tmp_path / "a", identified_uploads=True).stored_upload(data, "png")
    assert kept is data
    stripped = JobStore(tmp_path / "b").stored_upload(data, "png")
    assert np.array_equal(imaging.decode_image(stripped).pixels, imaging.decode_image(data).pixels)


def test_store_history_marks_unfinished_jobs_and_takes_the_records_word(tmp_path):
    store = JobStore(tmp_path / "runs")
    done, waiting, recorded, misplaced = (_job(store, state=s) for s in (
        JobState.DONE, JobState.QUEUED, JobState.RUNNING, JobState.DONE))
    for job in (done, waiting, recorded, misplaced):
        store.create(job)
        store.save(job)
    moved = tmp_path / "runs" / ("0" * 32)
    misplaced.run_dir.rename(moved)  # its job.json now names another folder
    (store.run_dir("f" * 32)).mkdir()
    (store.run_dir("f" * 32) / JOB_FILE).write_text("{not json")
    loaded = {j.id: j for j in store.load_history(lambda j: JobState.CANCELLED if j.id == recorded.id else None)}
    assert set(loaded) == {done.id, waiting.id, recorded.id}
    assert loaded[done.id].state is JobState.DONE and loaded[done.id].finished_at is None  # untouched
    assert loaded[waiting.id].state is JobState.INTERRUPTED and "server stopped" in loaded[waiting.id].error
    assert loaded[recorded.id].state is JobState.CANCELLED and loaded[recorded.id].error is None
    saved = json.loads((waiting.run_dir / JOB_FILE).read_text())  # and saved so
    assert saved["state"] == "interrupted" and saved["finished_at"] is not None


def test_store_thumbnail_waits_for_the_input_and_is_cached(tmp_path):
    store = JobStore(tmp_path / "runs", thumbnail_size=16)
    job = _job(store)
    store.create(job)
    assert store.thumbnail_png(job) is None and not (job.run_dir / THUMBNAIL).exists()
    assert store.thumbnail_png(job) is None  # an input.png alone is not the run's until its record lists it
    data = imaging.to_png_bytes(np.linspace(0, 1, 40 * 20).reshape(40, 20), bits=16)
    (job.run_dir / "input.png").write_bytes(data)
    assert store.thumbnail_png(job) is None
    (job.run_dir / "record.json").write_text(json.dumps({"artifacts_sha256": {"input.png": sha256_bytes(data)}}))
    png = store.thumbnail_png(job)
    assert png is not None and Image.open(io.BytesIO(png)).size == (8, 16)
    assert (job.run_dir / THUMBNAIL).read_bytes() == png
    (job.run_dir / "input.png").unlink()
    assert store.thumbnail_png(job) == png  # from the cache


# ----------------------------------------------------------------------------------------------------------------
# the recorders
# ----------------------------------------------------------------------------------------------------------------
def test_null_recorder_keeps_nothing_and_hands_out_fresh_job_ids(tmp_path):
    rec = NullRecorder()
    store = JobStore(tmp_path / "runs")
    job = _job(store)
    decoded = imaging.decode_image(_png())
    rec.require_user(None)  # any owner string will do
    ids = {rec.record_submission(None, b"x", decoded, job.request, [1], False, None, "5e" * 32) for _ in range(3)}
    assert len(ids) == 3 and all(input_id is None and len(job_id) == 32 for input_id, job_id in ids)
    assert all(int(job_id, 16) >= 0 for _, job_id in ids)
    rec.refused(None, b"x", ValueError("no"))
    rec.start(job)
    rec.finish(job, JobState.DONE, None, artifact_hashes={"input.png": "00"})
    rec.deleted(job, None)
    assert rec.recorded_status(job) is None


@pytest.fixture
def db(tmp_path):
    engine = audit.init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    yield engine
    engine.dispose()


def test_audit_recorder_records_the_life_of_a_run(tmp_path, db):
    from tests.accounts import add_user

    with pytest.raises(ValueError, match="uid_secret"):
        AuditRecorder(db, None)
    rec = AuditRecorder(db, SECRET)
    with pytest.raises(ValueError, match=r"audit.User"):
        rec.require_user(None)
    alice = add_user(db, "alice")
    store = JobStore(tmp_path / "runs")
    data = _png()
    decoded = imaging.decode_image(data)
    request = ReviewRequest(strength=0.5, steps=4, seed=3, case_label="bed 4")
    input_id, job_id = rec.record_submission(alice, data, decoded, request, [3], False, "ab" * 16, "5e" * 32)
    run = audit.get_run(db, uuid.UUID(job_id))
    assert str(run.input_id) == input_id and run.status == "queued" and run.model_sha256 == "5e" * 32
    assert run.params["rerun_of"] == "ab" * 16 and "case_label" not in run.params and run.params["mask"] is False
    job = _job(store, input_id=input_id)
    job.id = job_id
    job.started_at = datetime.now(UTC)
    rec.start(job)
    assert rec.recorded_status(job) is JobState.RUNNING
    rec.finish(job, JobState.DONE, None, artifact_hashes={"input.png": "00" * 32})
    assert rec.recorded_status(job) is JobState.DONE
    assert audit.get_run(db, uuid.UUID(job_id)).artifact_hashes == {"input.png": "00" * 32}
    job.state = JobState.DONE
    rec.deleted(job, None)  # by its submitter when no one else is named
    [event] = audit.query_events(db, action="run_delete")
    assert event.object_id == str(uuid.UUID(job_id)) and event.detail == {"state": "done"}
    rec.refused(alice, b"12345", imaging.UnsupportedImageError("no"))
    refused = audit.query_events(db, action="upload")[0]
    assert refused.detail == {"refused": "UnsupportedImageError", "size_bytes": 5}
    # a job without a recorded input has no run: nothing to start, finish or look up
    orphan = _job(store)
    rec.start(orphan)
    rec.finish(orphan, JobState.FAILED, "x")
    assert rec.recorded_status(orphan) is None


# ----------------------------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------------------------
def test_estimator_knows_nothing_before_the_first_run():
    est = RateEstimator()
    assert not est.measured and est.run_s(100) is None and est.wait_s([10, 20], 30, None) is None


def test_estimator_learns_a_rate_and_an_overhead_as_exponential_averages():
    est = RateEstimator()
    est.learn(0.06, 2, 2, 0.5)  # 2 evaluations x 2 samples in 0.06 s; 0.44 s besides
    assert est.measured
    assert est.seconds_per_eval == pytest.approx(0.015) and est.overhead_s == pytest.approx(0.44)
    est.learn(0.3, 3, 1, 0.2)  # 0.1 s per evaluation; run shorter than denoising: no negative overhead
    assert est.seconds_per_eval == pytest.approx(0.7 * 0.015 + 0.3 * 0.1)
    assert est.overhead_s == pytest.approx(0.7 * 0.44)
    est.learn(0.1, 1, 0, 0.1)  # samples=0 counts as one
    assert est.seconds_per_eval == pytest.approx(0.7 * (0.7 * 0.015 + 0.3 * 0.1) + 0.3 * 0.1)


def test_estimator_waits_for_the_runs_ahead_and_what_the_running_one_has_left():
    est = RateEstimator()
    est.learn(1.0, 100, 1, 3.0)  # 0.01 s per step-sample, 2 s overhead
    assert est.run_s(50) == pytest.approx(2.5)
    assert est.wait_s([], None, None) == 0.0
    assert est.wait_s([50, 100], None, None) == pytest.approx(2.5 + 3.0)
    assert est.wait_s([50], 100, None) == pytest.approx(2.5 + 3.0)  # before its first step: counts whole
    assert est.wait_s([50], 100, 0.4) == pytest.approx(2.5 + 0.4 + 1.0)  # left + half the overhead


# ----------------------------------------------------------------------------------------------------------------
# the queue policy
# ----------------------------------------------------------------------------------------------------------------
def test_a_jobs_cost_is_job_cost_with_the_map_methods_factor(tmp_path):
    """The budget and the job table's cost column read Job.cost: it counts DDIM inversion's two passes."""
    store = JobStore(tmp_path / "runs")
    job = _job(store, steps=4, samples=2)
    assert job.cost == job_cost(job.request) == (2 + 1) * 2
    for method, factor in METHOD_COST_FACTOR.items():
        job.request = ReviewRequest(strength=0.5, steps=4, samples=2, seed=1, map_method=method)
        assert job.cost == job_cost(job.request) == (2 + 1) * 2 * factor == 12


def test_limits_refuse_large_requests_and_a_queue_of_nothing():
    with pytest.raises(ValueError, match="queue_size=0"):
        Limits(queue_size=0)
    limits = Limits(max_steps=50, max_samples=2)
    limits.check_request(ReviewRequest(steps=50, samples=2))
    with pytest.raises(ValueError, match="steps=51 exceeds this server's limit of 50"):
        limits.check_request(ReviewRequest(steps=51))
    with pytest.raises(ValueError, match="samples=3 exceeds this server's limit of 2"):
        limits.check_request(ReviewRequest(steps=10, samples=3))


def test_limits_admit_by_user_share_then_length_then_cost(tmp_path):
    store = JobStore(tmp_path / "runs")
    running = _job(store, "alice")
    running.eta_s = 12.7
    waiting = [_job(store, "alice", steps=20), _job(store, "bob", steps=20)]  # 11 step-samples each
    limits = Limits(queue_size=3, max_jobs_per_user=2, cost_budget=30)
    with pytest.raises(UserQueueLimitError) as e:
        limits.admit("alice", 1, waiting, running)
    assert (e.value.active, e.value.limit, e.value.retry_after_s) == (2, 2, 12)
    limits.admit("bob", 8, waiting, running)  # 22 + 8 = 30: fits exactly
    with pytest.raises(QueueFullError) as full:
        limits.admit("bob", 9, waiting, running)
    assert (full.value.queued_cost, full.value.cost, full.value.budget) == (22, 9, 30)
    limits.admit("carol", 10_000, [], None)  # an empty queue takes any run
    assert not limits.is_full(waiting) and limits.is_full([*waiting, _job(store, "carol")])
    with pytest.raises(QueueFullError, match="3 of 3"):
        Limits(queue_size=3).admit("dave", 1, [*waiting, _job(store, "carol")], None)


def test_limits_and_fair_order_count_every_running_job_of_several_workers(tmp_path):
    store = JobStore(tmp_path / "runs")
    running = [_job(store, "alice"), _job(store, "alice"), _job(store, "bob")]
    running[1].eta_s = 8.2
    with pytest.raises(UserQueueLimitError) as e:
        Limits(max_jobs_per_user=2).admit("alice", 1, [], running)
    assert (e.value.active, e.value.retry_after_s) == (2, 8)
    Limits(max_jobs_per_user=2).admit("bob", 1, [], running)
    a2, c1 = _job(store, "alice"), _job(store, "carol")
    a2.queued_tick, c1.queued_tick = 1, 2
    # alice and bob are being served: carol, who waits, goes first although alice queued earlier
    assert fair_order([a2, c1], {}, ["alice", "bob"], 3) == [c1, a2]


def test_fair_order_takes_users_in_turn(tmp_path):
    store = JobStore(tmp_path / "runs")
    a2, a3 = _job(store, "alice", tick=2), _job(store, "alice", tick=3)
    b1, b2 = _job(store, "bob", tick=4), _job(store, "bob", tick=5)
    c1 = _job(store, "carol", tick=6)
    pending = [a2, a3, b1, b2, c1]
    # alice's first job runs: everyone else goes before her next one, one run each in turn
    assert fair_order(pending, {}, "alice", 7) == [b1, c1, a2, b2, a3]
    # nothing runs: alice queued first; bob's last run ended after carol queued, so carol goes before him
    assert fair_order(pending, {"bob": 7}, None, 8) == [a2, c1, b1, a3, b2]
    # ... but had it ended when she queued, his older job would go first
    assert fair_order(pending, {"bob": 6}, None, 8) == [a2, b1, c1, a3, b2]
    assert fair_order([], {"alice": 1}, "alice", 2) == []


# ----------------------------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------------------------
def test_from_settings_builds_the_servers_manager(tmp_path, db):
    settings = Settings(data_dir=tmp_path / "data", queue_size=5, max_jobs_per_user=2, queue_cost_budget=500,
                        max_steps=100, max_samples=4, preview_size=64, thumbnail_size=48,
                        store_identified_uploads=True, store_plain_uids=True)
    engine: Any = object()
    m = JobManager.from_settings(settings, engine, db=db, uid_secret=SECRET, classifier="clf")
    assert m.limits == Limits(queue_size=5, max_jobs_per_user=2, cost_budget=500, max_steps=100, max_samples=4)
    assert isinstance(m.recorder, AuditRecorder) and m.recorder.store_plain_uids
    assert m.store.runs_dir == settings.runs_dir and Path(m.store.runs_dir).is_dir()
    assert m.store.thumbnail_size == 48 and m.store.identified_uploads
    assert m.preview_size == 64 and m.engine is engine and m.classifier == "clf" and m.segmenter is None
    assert isinstance(JobManager.from_settings(settings, engine, db=None).recorder, NullRecorder)
    with pytest.raises(ValueError, match="uid_secret"):
        JobManager.from_settings(settings, engine, db=db)
