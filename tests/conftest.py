"""Shared fixtures. Each fixture is self-contained; append new ones below."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's test data folder (``../shared/data``; README "Test and training data").

    ``VALD_MD_SHARED_DATA`` overrides the location (CI sets it). When the folder is absent the test is skipped
    with the reason, unless ``VALD_MD_REQUIRE_SHARED_DATA=1`` (CI), where it fails instead.
    """
    configured = os.environ.get("VALD_MD_SHARED_DATA")
    path = Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        reason = f"shared test data not found at {path} (set VALD_MD_SHARED_DATA to its location)"
        if os.environ.get("VALD_MD_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory):
    """A :class:`app.engine.CounterfactualEngine` on the tiny in-code model (32 px), CPU, loaded once per session."""
    from app.engine import CounterfactualEngine
    from tests.tiny_model import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
    return CounterfactualEngine(folder, device="cpu")


def pytest_configure(config: pytest.Config) -> None:
    """Tiny test models run fastest on one thread, and a second torch thread pool (a training run beside the
    tests) makes spinning OpenMP threads oversubscribe the cores by orders of magnitude.

    Starlette's ``TestClient`` sends ``Host: testserver``, which the app serves only when it is a trusted host."""
    os.environ.setdefault("VALD_MD_TRUSTED_HOSTS", "testserver")
    # tests compare exact outputs: float32 everywhere, also where the CPU would take bf16 autocast
    os.environ.setdefault("VALD_MD_CPU_AUTOCAST", "0")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(int(os.environ.get("VALD_MD_TEST_THREADS", "1")))


SECURITY_COUNTS = pytest.StashKey[dict[str, int]]()


@pytest.fixture(scope="session")
def security_counts(request: pytest.FixtureRequest) -> dict[str, int]:
    """Counters that ``test_security.py`` fills (audit events written, fuzz cases run, 5xx responses seen); the
    terminal summary prints them so a run's numbers can be quoted."""
    return request.config.stash.setdefault(SECURITY_COUNTS, {})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    counts = config.stash.get(SECURITY_COUNTS, None)
    if counts:
        terminalreporter.section("security counts")
        terminalreporter.write_line(", ".join(f"{k}={v}" for k, v in counts.items()))


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server for the session (``tests/postgres.py``), or ``None`` when
    ``VALD_TEST_POSTGRES_URL`` names an existing empty database instead.

    Skipped with the reason when the PostgreSQL binaries or psycopg are missing, unless ``VALD_MD_REQUIRE_POSTGRES=1``
    (CI), where it fails instead."""
    if os.environ.get("VALD_TEST_POSTGRES_URL"):
        yield None
        return
    from tests import postgres

    reason = postgres.missing_reason()
    if reason is not None:
        if os.environ.get("VALD_MD_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    server = postgres.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL of an empty PostgreSQL database: a new one on the session's server, or
    ``VALD_TEST_POSTGRES_URL`` (used as is: it must be empty)."""
    if postgres_server is None:
        return os.environ["VALD_TEST_POSTGRES_URL"]
    return str(postgres_server.new_database())
