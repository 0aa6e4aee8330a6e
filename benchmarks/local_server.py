"""A `vald-md serve` process of our own on loopback, for the benchmarks (not part of the app).

The server runs in its own process, as in production, so that the benchmark client never shares a Python
interpreter (and its GIL) with the server's worker thread.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

FINISHED = {"done", "failed", "cancelled", "interrupted"}
"""Job states after which a job changes no more (``GET /api/v1/jobs/{id}`` ``state``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_token(data_dir: Path, username: str = "bench") -> str:
    """A clinician user without a password and an API token, in the database a server with ``--data-dir data_dir``
    will use; returns the token (shown once, like `vald-md users token`)."""
    from app import audit
    from app.config import Settings

    data_dir.mkdir(parents=True, exist_ok=True)
    db = audit.init_db(Settings(data_dir=data_dir).resolved_database_url)
    with audit.write_session(db) as session:
        user = audit.User(username=username, password_hash="!unusable", role="clinician")
        session.add(user)
    return audit.create_api_token(db, user, f"{username} benchmark")


def spawn_server(model: Path, work: Path, *, queue_size: int | None = None, device: str | None = None,
                 max_jobs_per_user: int | None = None,
                 ready_timeout_s: float = 90.0) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start `vald-md serve --model model` on 127.0.0.1 and a free port, with data under ``work/data`` and its log in
    ``work/server.log``; wait until /readyz answers 200.

    Returns (process, base URL, API token). VALD_MD_* variables of this process are not passed on, so the server
    runs on its defaults (``device``: its ``--device``, default automatic; ``max_jobs_per_user``: its
    VALD_MD_MAX_JOBS_PER_USER, since one token submits everything); OMP_NUM_THREADS and the like are.
    """
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALD_MD_")}
    if queue_size:
        env["VALD_MD_QUEUE_SIZE"] = str(queue_size)
    if max_jobs_per_user:
        env["VALD_MD_MAX_JOBS_PER_USER"] = str(max_jobs_per_user)
    token = make_token(work / "data")
    exe = Path(sys.executable).parent / "vald-md"
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
           "--data-dir", str(work / "data")] + (["--device", device] if device else [])
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base, token
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the spawned server did not become ready; see {work / 'server.log'}")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Ask the server to shut down (SIGTERM), kill it if it has not within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
