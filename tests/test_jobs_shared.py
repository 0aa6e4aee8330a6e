"""Several front processes on one database and one runs folder (``VALD_MD_JOB_STATE=database``, app/jobs/jobtable.py).

Each test builds two :class:`JobManager` fronts in this process sharing an audit database and a data folder, with
the fake engine and runners of ``test_jobs.py``: every job runs exactly once, limits count across fronts, a cancel
reaches the front running the job, a restart re-queues accepted jobs, and a running job whose front died is queued
again once (attempt 2) or failed with a clear message. The two-front test runs on SQLite and on a throw-away
PostgreSQL server (``tests/postgres.py``; skipped with the reason without one, failed under
``VALD_MD_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from app import audit
from app.config import Settings
from app.jobs import (
    JOB_FILE,
    AuditRecorder,
    Job,
    JobManager,
    JobState,
    JobStore,
    Limits,
    QueueFullError,
    UserQueueLimitError,
    shared,
)
from app.jobs.errors import JobNotFoundError
from app.jobs.job import now
from app.jobs.jobtable import MAX_ATTEMPTS, STALE_FAILED, CancelRequest, JobTable, Recovered
from tests.accounts import add_user
from tests.factories import png_bytes
from tests.test_jobs import FakeEngine, GatedRunner, req, wait_for

SECRET = bytes(range(32))
HEARTBEAT_S = 0.05

Front = Callable[..., JobManager]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The shared database: SQLite in the data folder, or an empty database on the test PostgreSQL server."""
    if request.param == "sqlite":
        engine = audit.init_db(f"sqlite:///{tmp_path / 'shared.db'}")
    else:
        engine = audit.init_db(request.getfixturevalue("postgres_url"),
                               keys=audit.AuditKeyRing.from_keys([os.urandom(32)]))
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Engine]:
    engine = audit.init_db(f"sqlite:///{tmp_path / 'shared.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    """Builds a started front process on ``db`` and the shared ``tmp_path/runs``; stops them all at the end."""
    made: list[tuple[JobManager, GatedRunner]] = []

    def make(db: Engine, name: str, runner: GatedRunner, *, limits: Limits | None = None,
             stale_after_s: float = 30.0) -> JobManager:
        m = JobManager(FakeEngine(), JobStore(tmp_path / "runs"), AuditRecorder(db, SECRET),
                       limits or Limits(queue_size=64), runner=runner, preview_size=64,
                       table=JobTable(db, name, stale_after_s=stale_after_s), heartbeat_s=HEARTBEAT_S)
        m.start()
        made.append((m, runner))
        return m

    yield make
    for m, runner in made:
        runner.gate.set()
        for job in list(m._running):
            job.cancel_event.set()
        m.stop(timeout=5)


def _rows(db: Engine) -> dict[str, audit.JobRecord]:
    with audit.read_session(db) as session:
        return {row.id: row for row in session.query(audit.JobRecord).all()}


def _crash(m: JobManager) -> None:
    """Make ``m`` behave like a front that died: its claims are no longer renewed (its worker stays blocked)."""
    assert m.table is not None
    m.table.heartbeat = lambda *_args: None  # type: ignore[method-assign]


def test_two_fronts_run_every_job_exactly_once_and_see_each_others_jobs(any_db, front):
    alice, bob = add_user(any_db, "alice"), add_user(any_db, "bob")
    ra, rb = GatedRunner(gated=False), GatedRunner(gated=False)
    a, b = front(any_db, "front-a", ra), front(any_db, "front-b", rb)
    jobs = [(a if i % 2 else b).submit(user, png_bytes(), req(seed=i))
            for i in range(12) for user in [(alice, bob)[i % 2]]]
    for job in jobs:
        for m in (a, b):  # both fronts see every job end, whoever accepted and whoever ran it
            wait_for(lambda m=m, job=job: m.get(job.id, job.owner).state.finished)
            assert m.get(job.id, job.owner).state is JobState.DONE
    assert sorted(ra.calls + rb.calls) == sorted(j.id for j in jobs)  # each job ran once, on one front
    rows = _rows(any_db)
    assert {rows[j.id].state for j in jobs} == {"done"} and {rows[j.id].attempts for j in jobs} == {1}
    assert {rows[j.id].claimed_by for j in jobs} <= {"front-a", "front-b"}
    for job in jobs:
        assert audit.get_run(any_db, uuid.UUID(job.id)).status == "done"
        assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "done"
        other = b if job in [j for j in jobs if j.owner == str(bob.id)] else a
        seen = other.get(job.id, job.owner)
        assert seen.seeds == [job.request.seed] and "run" in seen.timings_s  # the final job.json, read back
    result = audit.verify_chain(any_db)  # both fronts wrote to one audit chain
    assert result.ok, result.reason


def test_limits_count_across_fronts_and_a_cancel_reaches_the_front_running_the_job(sqlite_db, front):
    alice, bob = add_user(sqlite_db, "alice"), add_user(sqlite_db, "bob")
    limits = Limits(queue_size=1, max_jobs_per_user=2)
    ra, rb = GatedRunner(), GatedRunner()
    a, b = front(sqlite_db, "front-a", ra, limits=limits), front(sqlite_db, "front-b", rb, limits=limits)
    first = a.submit(alice, png_bytes(), req())
    wait_for(lambda: ra.started.is_set() or rb.started.is_set())  # claimed: the site's queue (size 1) is empty
    second = b.submit(alice, png_bytes(), req())
    wait_for(lambda: ra.started.is_set() and rb.started.is_set())  # one job on each front
    with pytest.raises(UserQueueLimitError):
        a.submit(alice, png_bytes(), req())  # alice's two jobs run on two fronts: her limit, counted by the table
    waiting = b.submit(bob, png_bytes(), req())
    with pytest.raises(QueueFullError):
        a.submit(bob, png_bytes(), req())  # the site's queue (size 1) holds bob's job accepted by front b
    # cancel alice's job through the front that does not run it
    on_a = first.id if first.id in ra.calls else second.id
    b.cancel(on_a, str(alice.id))
    wait_for(lambda: a.get(on_a, str(alice.id)).state is JobState.CANCELLED)
    wait_for(lambda: b.get(on_a, str(alice.id)).state is JobState.CANCELLED)
    assert audit.get_run(sqlite_db, uuid.UUID(on_a)).status == "cancelled"
    ra.gate.set()
    rb.gate.set()
    wait_for(lambda: b.get(waiting.id, str(bob.id)).state is JobState.DONE)
    assert _rows(sqlite_db)[on_a].state == "cancelled"


def test_a_restarted_front_loses_no_accepted_job_and_reruns_a_dead_claim_once(any_db, front, tmp_path):
    alice = add_user(any_db, "alice")
    dead = GatedRunner()  # never released: the process is gone
    old = front(any_db, "front-a", dead)
    running = old.submit(alice, png_bytes(), req())
    assert dead.started.wait(5)
    queued = [old.submit(alice, png_bytes(), req()) for _ in range(2)]
    _crash(old)
    # the restart: a new process on the same database and data folder
    fresh = GatedRunner(gated=False)
    new = front(any_db, "front-a-restarted", fresh, stale_after_s=0.5)
    for job in (running, *queued):
        wait_for(lambda job=job: new.get(job.id, job.owner).state.finished)
        assert new.get(job.id, job.owner).state is JobState.DONE
        assert audit.get_run(any_db, uuid.UUID(job.id)).status == "done"
    assert sorted(fresh.calls) == sorted(j.id for j in (running, *queued))
    rows = _rows(any_db)
    assert rows[running.id].attempts == 2 and [rows[j.id].attempts for j in queued] == [1, 1]
    # the dead front wakes up after all: it keeps nothing of its run (the job's record stays the new front's)
    for stale in list(old._running):
        stale.cancel_event.set()
    wait_for(lambda: old._running == [])
    assert json.loads((running.run_dir / JOB_FILE).read_text())["state"] == "done"
    assert _rows(any_db)[running.id].state == "done"


def _stalled_front(db: Engine, front: Front) -> tuple[JobManager, GatedRunner, Job]:
    """Front ``front-a`` running one of alice's jobs (held by its runner's gate), then stalled (:func:`_crash`)."""
    runner = GatedRunner()
    m = front(db, "front-a", runner)
    job = m.submit(add_user(db, "alice"), png_bytes(), req())
    assert runner.started.wait(5)
    _crash(m)
    return m, runner, job


def test_a_job_whose_front_died_twice_fails_with_a_clear_message(sqlite_db, front):
    _old, _dead, job = _stalled_front(sqlite_db, front)
    with sqlite_db.begin() as connection:  # as if this were its second attempt already
        connection.execute(update(audit.JobRecord).where(audit.JobRecord.id == job.id)
                           .values(attempts=MAX_ATTEMPTS))
    fresh = GatedRunner(gated=False)
    new = front(sqlite_db, "front-b", fresh, stale_after_s=0.5)
    wait_for(lambda: new.get(job.id, job.owner).state.finished)
    seen = new.get(job.id, job.owner)
    assert seen.state is JobState.FAILED and seen.error == STALE_FAILED and fresh.calls == []
    wait_for(lambda: json.loads((job.run_dir / JOB_FILE).read_text())["error"] == STALE_FAILED)  # saved after
    run = audit.get_run(sqlite_db, uuid.UUID(job.id))
    assert run.status == "failed" and run.reason == STALE_FAILED
    assert _rows(sqlite_db)[job.id].state == "failed"


def test_no_case_label_reaches_the_database(sqlite_db, front, tmp_path):
    """The case label is free text that may name the patient: job.json keeps it, the database never does."""
    label = "Doe, Jane MRN 12345"
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), replace(req(), case_label=label))
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.DONE)
    assert json.loads((job.run_dir / JOB_FILE).read_text())["request"]["case_label"] == label
    assert "request" not in audit.JobRecord.model_fields and job.id in _rows(sqlite_db)
    with sqlite3.connect(tmp_path / "shared.db") as dump:  # every table, every column
        assert "MRN 12345" not in "\n".join(dump.iterdump())


def test_a_front_that_lost_its_claim_records_nothing_and_the_new_owner_records_its_end(sqlite_db, front):
    a, ra, job = _stalled_front(sqlite_db, front)  # front a stalls: its claim is no longer renewed
    rb = GatedRunner()
    b = front(sqlite_db, "front-b", rb, stale_after_s=0.5)
    assert rb.started.wait(20)  # b claimed the job again (attempt 2) and runs it
    assert _rows(sqlite_db)[job.id].claimed_by == "front-b"
    ra.gate.set()  # a wakes up and ends its stale attempt first: it keeps nothing of it
    wait_for(lambda: not a._running)
    run, row = audit.get_run(sqlite_db, uuid.UUID(job.id)), _rows(sqlite_db)[job.id]
    assert (row.state, row.claimed_by, row.attempts) == ("running", "front-b", 2)
    assert run.status == "running" and not run.artifact_hashes
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "running"
    assert a.get(job.id, job.owner).state is JobState.RUNNING  # what the row says: b runs it
    rb.gate.set()  # b's end is the one recorded
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.DONE)
    assert audit.get_run(sqlite_db, uuid.UUID(job.id)).status == "done" and ra.calls == rb.calls == [job.id]
    # job.json lands right after the state shows in memory (the atomic write of the end)
    wait_for(lambda: json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "done")
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.DONE)  # a shows b's end
    result = audit.verify_chain(sqlite_db)
    assert result.ok, result.reason


def _cancelled_by(db: Engine, job_id: str) -> list[str | None]:
    return [e.username for e in audit.query_events(db, action="cancel", object_id=str(uuid.UUID(job_id)))]


@pytest.mark.parametrize("where", ["same front", "other front"])
def test_an_administrators_cancel_is_recorded_as_theirs_on_any_front(sqlite_db, front, where):
    alice, admin = add_user(sqlite_db, "alice"), add_user(sqlite_db, "root", role="admin")
    ra = GatedRunner()
    a = front(sqlite_db, "front-a", ra)
    job = a.submit(alice, png_bytes(), req())
    assert ra.started.wait(10)
    via = a if where == "same front" else front(sqlite_db, "front-b", GatedRunner())
    via.cancel(job.id, str(admin.id), any_owner=True, actor=admin)
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.CANCELLED)
    assert _cancelled_by(sqlite_db, job.id) == ["root"]
    assert _rows(sqlite_db)[job.id].cancel_requested_by == (admin.id if where == "other front" else None)


def test_a_slow_database_insert_does_not_hold_the_managers_lock(sqlite_db, front):
    """Status reads (fair_order: every poll and progress tick) never wait for a submission's database write."""
    alice = add_user(sqlite_db, "alice")
    a = front(sqlite_db, "front-a", GatedRunner())
    assert a.table is not None
    real = a.table.insert
    entered = threading.Event()

    def slow_insert(*args: Any) -> None:
        entered.set()
        time.sleep(2.0)
        real(*args)

    a.table.insert = slow_insert  # type: ignore[method-assign]
    submitting = threading.Thread(target=lambda: a.submit(alice, png_bytes(), req()))
    submitting.start()
    assert entered.wait(20)
    t0 = time.monotonic()
    a.fair_order()
    waited = time.monotonic() - t0
    submitting.join()
    assert waited < 0.5, f"a status read waited {waited:.2f} s for the submission's database insert"
    assert len(a.list_jobs(None)) == 1 and len(_rows(sqlite_db)) == 1  # queued once, known once


def test_the_job_state_setting(tmp_path, sqlite_db):
    assert Settings(data_dir=tmp_path).job_state == "files"  # the single-process default
    files = JobManager.from_settings(Settings(data_dir=tmp_path), FakeEngine(), db=None)
    assert files.table is None
    shared = Settings(data_dir=tmp_path, job_state="database", front_id="host-1:web")
    with pytest.raises(ValueError, match="needs the database"):
        JobManager.from_settings(shared, FakeEngine(), db=None)
    m = JobManager.from_settings(shared, FakeEngine(), db=sqlite_db, uid_secret=SECRET)
    assert m.table is not None and m.table.front_id == "host-1:web"
    with pytest.raises(ValueError, match="job_stale_after_s"):
        Settings(data_dir=tmp_path, job_heartbeat_s=5, job_stale_after_s=10)


def test_two_server_fronts_share_one_queue_over_the_api(tiny_engine, tmp_path):
    """Two review servers (create_app) on one data folder and database: a job submitted to one is seen to its end,
    with its result, through the other (a load balancer may send a user's next request to either)."""
    from fastapi.testclient import TestClient

    from app.engine import CounterfactualEngine
    from app.web import create_app
    from app.web.auth import CSRF_HEADER
    from tests.accounts import sign_in
    from tests.test_web import submit, wait_state
    from tests.tiny_model import write_tiny_model

    data = tmp_path / "data"
    common: dict[str, Any] = dict(data_dir=data, queue_size=4, job_state="database", job_heartbeat_s=0.2,
                                  job_stale_after_s=5, lung_segmenter=tmp_path / "none",
                                  lesion_classifier=tmp_path / "none")
    second_engine = CounterfactualEngine(write_tiny_model(tmp_path / "tiny-b"), device="cpu")  # one model per front
    a_app = create_app(Settings(front_id="web-a", **common), engine=tiny_engine)
    b_app = create_app(Settings(front_id="web-b", **common), engine=second_engine)
    with TestClient(a_app) as a, TestClient(b_app) as b:
        sign_in(a, a_app, add_user(a_app.state.db, "clinician-s"))
        b.cookies.update(a.cookies)  # the same session, kept in the shared database
        b.headers[CSRF_HEADER] = a.headers[CSRF_HEADER]
        job_ids = []
        for client in (a, b, a):
            r = submit(client)
            assert r.status_code == 202, r.text
            job_ids.append(r.json()["job_id"])
        for job_id in job_ids:
            for client in (b, a):
                assert wait_state(client, job_id)["state"] == "done"
        listed = {j["job_id"] for j in b.get("/api/v1/jobs").json()["jobs"]}
        assert set(job_ids) <= listed
        for client in (a, b):  # the run folders are on the one data volume
            assert client.get(f"/api/v1/jobs/{job_ids[0]}/thumbnail.png").status_code == 200
    db = audit.make_engine(f"sqlite:///{data / 'vald-md.db'}")
    try:
        rows = _rows(db)
    finally:
        db.dispose()
    assert {rows[i].state for i in job_ids} == {"done"} and {rows[i].claimed_by for i in job_ids} <= {"web-a", "web-b"}


def test_a_front_whose_worker_cannot_start_disposes_of_its_database(tiny_engine, tmp_path, monkeypatch):
    """With job_state=database, starting the worker reads and writes the job table: when that fails, the start-up
    fails and the database's connections are released, as for any other start-up step."""
    from fastapi.testclient import TestClient

    from app.jobs.backend import LocalBackend
    from app.web import create_app

    disposed: list[Engine] = []
    closed: list[LocalBackend] = []
    monkeypatch.setattr(LocalBackend, "close", lambda self: closed.append(self))
    real_init_db = audit.init_db

    def init_db(*args: Any, **kwargs: Any) -> Engine:
        engine = real_init_db(*args, **kwargs)
        real_dispose = engine.dispose
        engine.dispose = lambda *a, **k: (disposed.append(engine), real_dispose(*a, **k))[1]  # type: ignore[method-assign]
        return engine

    def cannot_start(self: JobManager) -> None:
        raise RuntimeError("the job table cannot be read")

    monkeypatch.setattr(audit, "init_db", init_db)
    monkeypatch.setattr(JobManager, "start", cannot_start)
    app = create_app(Settings(data_dir=tmp_path / "data", job_state="database", lung_segmenter=tmp_path / "none",
                              lesion_classifier=tmp_path / "none"), engine=tiny_engine)
    with pytest.raises(RuntimeError, match="the job table cannot be read"), TestClient(app):
        pass
    assert len(disposed) == 1 and len(closed) == 1  # the backend made for the worker is closed too


def _set_row(db: Engine, job_id: str, **values: Any) -> None:
    with db.begin() as connection:
        connection.execute(update(audit.JobRecord).where(audit.JobRecord.id == job_id).values(**values))


def test_a_front_whose_heartbeat_finds_its_claim_gone_stops_the_run_and_keeps_nothing(sqlite_db, front):
    runner = GatedRunner()
    a = front(sqlite_db, "front-a", runner)
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    assert runner.started.wait(10)
    assert a.table is not None and a.table.heartbeat(job.id, 0, 0) is None  # still its claim
    _set_row(sqlite_db, job.id, claimed_by="front-x")  # another front claimed it again meanwhile
    wait_for(lambda: not a._running)  # the next beat renews no row: the run is cancelled
    assert job.cancel_event.is_set() and job._cancel_reason == shared.CLAIM_LOST
    row = _rows(sqlite_db)[job.id]
    assert (row.state, row.claimed_by) == ("running", "front-x")  # front-x's run, untouched
    assert audit.get_run(sqlite_db, uuid.UUID(job.id)).status == "running"  # a kept nothing of its attempt
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "running"
    assert a.table.heartbeat(job.id, 0, 0) == CancelRequest(lost=True)


def test_a_job_the_table_gave_up_while_it_ran_here_is_stopped_and_recorded_failed(sqlite_db, front):
    a, _runner, job = _stalled_front(sqlite_db, front)  # stalled: it renews nothing, so only _recover can act
    _set_row(sqlite_db, job.id, state="failed", error=STALE_FAILED, finished_at=now())
    a._recover(Recovered(failed=[job.id]))
    assert job.cancel_event.is_set() and job._cancel_reason == shared.CLAIM_LOST  # the run stops
    assert a.get(job.id, job.owner).state is JobState.FAILED and job.error == STALE_FAILED
    run = audit.get_run(sqlite_db, uuid.UUID(job.id))
    assert run.status == "failed" and run.reason == STALE_FAILED
    assert json.loads((job.run_dir / JOB_FILE).read_text())["error"] == STALE_FAILED


def test_a_database_error_at_a_runs_end_is_tried_again(sqlite_db, front, monkeypatch):
    monkeypatch.setattr(shared, "END_RETRY_S", (0.01, 0.01, 0.01))
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    assert a.table is not None
    real, calls = a.table.finish, []

    def flaky(*args: Any) -> bool:
        calls.append(args)
        if len(calls) < 3:
            raise RuntimeError("the database hiccuped")
        return real(*args)

    a.table.finish = flaky  # type: ignore[method-assign]
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.DONE)
    assert len(calls) == 3 and _rows(sqlite_db)[job.id].state == "done"
    assert audit.get_run(sqlite_db, uuid.UUID(job.id)).status == "done"


def test_a_runs_end_the_database_refuses_is_kept_and_written_later_by_the_heartbeat(sqlite_db, front, monkeypatch):
    monkeypatch.setattr(shared, "END_RETRY_S", (0.01, 0.01, 0.01))
    runner = GatedRunner(gated=False)
    a = front(sqlite_db, "front-a", runner)
    assert a.table is not None
    real, broken = a.table.finish, threading.Event()
    broken.set()

    def failing(*args: Any) -> bool:
        if broken.is_set():
            raise RuntimeError("the database is down")
        return real(*args)

    a.table.finish = failing  # type: ignore[method-assign]
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.DONE)  # the finished run is kept
    assert audit.get_run(sqlite_db, uuid.UUID(job.id)).status == "done"
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "done"
    time.sleep(5 * HEARTBEAT_S)  # beats see the row still running: the job stays done here
    assert _rows(sqlite_db)[job.id].state == "running" and job.id in a._pending_ends
    assert a.get(job.id, job.owner).state is JobState.DONE
    broken.clear()  # the database is back: the heartbeat thread writes the end
    wait_for(lambda: _rows(sqlite_db)[job.id].state == "done")
    wait_for(lambda: not a._pending_ends)
    assert runner.calls == [job.id]


def test_a_row_read_before_a_jobs_end_does_not_bring_it_back(sqlite_db, front):
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    wait_for(lambda: a.get(job.id, job.owner).state is JobState.DONE)
    for state in ("queued", "running"):
        stale = audit.JobRecord(id=job.id, owner=job.owner, state=state, cost=job.cost, created_at=job.created_at,
                                updated_at=now(), started_at=now())
        with a._cond:
            a._apply_row(job, stale)
        assert job.state is JobState.DONE and job not in a._pending


def test_a_run_deleted_on_one_front_is_forgotten_by_the_others(sqlite_db, front):
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    b = front(sqlite_db, "front-b", GatedRunner(gated=False))
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    for m in (a, b):
        wait_for(lambda m=m: m.get(job.id, job.owner).state is JobState.DONE)
    a.delete(job.id, job.owner)
    wait_for(lambda: job.id not in b._jobs)
    with pytest.raises(JobNotFoundError):
        b.get(job.id, job.owner)
    assert job.id not in {j.id for j in b.list_jobs(None)}


def test_the_first_cancel_request_is_kept_and_a_stale_cancelled_job_is_not_run_again(sqlite_db, front):
    admin = add_user(sqlite_db, "root", role="admin")
    a, _runner, job = _stalled_front(sqlite_db, front)
    assert a.table is not None
    a.table.request_cancel(job.id, admin.id)  # an administrator first
    a.table.request_cancel(job.id, None)  # then its owner
    assert _rows(sqlite_db)[job.id].cancel_requested_by == admin.id
    fresh = GatedRunner(gated=False)
    b = front(sqlite_db, "front-b", fresh, stale_after_s=0.5)  # a's claim goes stale: b ends it, as asked
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.CANCELLED)
    assert fresh.calls == [] and _rows(sqlite_db)[job.id].state == "cancelled"
    assert audit.get_run(sqlite_db, uuid.UUID(job.id)).status == "cancelled"
    assert _cancelled_by(sqlite_db, job.id) == ["root"]


def _late_final_save(m: JobManager, monkeypatch: pytest.MonkeyPatch) -> list[Job]:
    """Hold back ``m``'s saves of finished jobs (their final ``job.json``); returns the held jobs, to save late."""
    held: list[Job] = []
    save = m.store.save

    def late(job: Job) -> None:
        if job.state.finished:
            held.append(job)
        else:
            save(job)

    monkeypatch.setattr(m.store, "save", late)
    return held


def test_a_final_job_json_written_after_its_row_left_the_poll_window_still_shows_on_the_other_front(
        sqlite_db, front, monkeypatch):
    runner = GatedRunner()
    a = front(sqlite_db, "front-a", runner)
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    assert runner.started.wait(5)
    b = front(sqlite_db, "front-b", GatedRunner())
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.RUNNING)
    held = _late_final_save(a, monkeypatch)
    runner.gate.set()
    wait_for(lambda: _rows(sqlite_db)[job.id].state == "done" and bool(held))
    wait_for(lambda: job.id in b._awaiting_final)  # b saw the ended row, but no final job.json yet
    _set_row(sqlite_db, job.id, updated_at=now() - timedelta(minutes=1))  # the row is out of b's poll window
    time.sleep(5 * HEARTBEAT_S)
    assert not b.get(job.id, job.owner).state.finished
    JobStore.save(a.store, held[0])  # job.json lands late
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.DONE)
    assert b.get(job.id, job.owner).seeds == [job.request.seed] and job.id not in b._awaiting_final


def test_a_starting_front_leaves_a_job_whose_row_ended_to_the_front_that_ended_it(sqlite_db, front, monkeypatch):
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    held = _late_final_save(a, monkeypatch)
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    wait_for(lambda: _rows(sqlite_db)[job.id].state == "done" and bool(held))
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "running"
    b = front(sqlite_db, "front-b", GatedRunner())  # starts between the row's end and job.json's
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "running"  # not b's to write
    assert not b.get(job.id, job.owner).state.finished
    JobStore.save(a.store, held[0])
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.DONE)
    assert b.get(job.id, job.owner).seeds == [job.request.seed] and job.id not in b._awaiting_final
    assert json.loads((job.run_dir / JOB_FILE).read_text())["state"] == "done"


def test_a_row_that_ended_a_stale_delay_ago_without_job_json_shows_its_end(sqlite_db, front, monkeypatch):
    """The front that ended a job died between the row's end and job.json: after a stale delay the others show
    the row's end (never an unfinished job for ever)."""
    a = front(sqlite_db, "front-a", GatedRunner(gated=False))
    held = _late_final_save(a, monkeypatch)  # a never writes the final job.json
    job = a.submit(add_user(sqlite_db, "alice"), png_bytes(), req())
    wait_for(lambda: _rows(sqlite_db)[job.id].state == "done" and bool(held))
    b = front(sqlite_db, "front-b", GatedRunner())
    wait_for(lambda: job.id in b._awaiting_final)
    assert not b.get(job.id, job.owner).state.finished
    _set_row(sqlite_db, job.id, finished_at=now() - timedelta(minutes=5))  # ended a stale delay (30 s) ago
    wait_for(lambda: b.get(job.id, job.owner).state is JobState.DONE)
    assert job.id not in b._awaiting_final
