"""A bounded load run against the review server's JSON API on this machine (loopback only).

C client threads each submit ``POST /api/v1/counterfactuals`` (multipart: a PNG and the generation fields), then
poll ``GET /api/v1/jobs/{id}`` until the job has finished, and go again, until ``--requests`` submissions have been
made or ``--duration`` seconds have passed; what is still queued or running then is cancelled, so the run leaves
the server idle. A 503 (queue full) or 429 (the user's own limit of runs, VALD_MD_MAX_JOBS_PER_USER) is counted
and retried after a pause; ``--spawn`` raises that limit to the concurrency, since one token submits everything. A
monitor thread samples ``/readyz`` (queue length, room) while it runs.

Reported: completed jobs per minute sustained (first submission to last completion), client-side latency
(submit -> finished) p50/p95, the server's own queued/run seconds, the 503 count, and the queue's length over time.

    vald-md serve &                                                    # or any server on 127.0.0.1
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --concurrency 4 --requests 20
    .venv/bin/python benchmarks/load_test.py --spawn --queue-size 2 --concurrency 6 --requests 24   # tiny model

Only loopback addresses are accepted as targets (127.0.0.0/8, ::1, localhost).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.local_server import FINISHED, spawn_server, stop_server  # noqa: E402

MAX_REQUESTS = 1000
MAX_DURATION_S = 3600.0


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="server base URL on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=os.environ.get("VALD_MD_TOKEN"),
                   help="API token for --url (vald-md users token NAME); default $VALD_MD_TOKEN")
    p.add_argument("--spawn", action="store_true",
                   help="start `vald-md serve` on 127.0.0.1 and a free port for the run (tiny model unless --model)")
    p.add_argument("--model", type=Path, default=None, help="--spawn: model folder (default: tests' tiny model)")
    p.add_argument("--queue-size", type=int, default=None, help="--spawn: VALD_MD_QUEUE_SIZE of the server")
    p.add_argument("--concurrency", type=int, default=4, help="client threads, 1..64 (default 4)")
    p.add_argument("--requests", type=int, default=20,
                   help=f"submissions in total, 503s included, 1..{MAX_REQUESTS} (default 20)")
    p.add_argument("--duration", type=float, default=300.0,
                   help=f"wall-clock budget in seconds, at most {MAX_DURATION_S:.0f} (default 300)")
    p.add_argument("--image", type=Path, default=None, help="file to upload (default: a synthetic 512x512 PNG)")
    p.add_argument("--steps", type=int, default=None, help="steps field (default: the server's preset)")
    p.add_argument("--strength", type=float, default=None, help="strength field (default: the server's preset)")
    p.add_argument("--scheduler", default=None, help="scheduler field (default: the server's, pndm)")
    p.add_argument("--poll-interval", type=float, default=0.25, help="seconds between status polls (default 0.25)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.token:
        HEADERS["Authorization"] = f"Bearer {args.token}"
    if (args.url is None) == (not args.spawn):
        p.error("give exactly one of --url or --spawn")
    if args.url is not None:
        check_loopback(p, args.url)
    if not 1 <= args.concurrency <= 64:
        p.error(f"--concurrency={args.concurrency} must be within 1..64")
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests={args.requests} must be within 1..{MAX_REQUESTS} (the run is bounded)")
    if not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration={args.duration} must be within (0, {MAX_DURATION_S:.0f}] seconds (the run is bounded)")
    if not 0.05 <= args.poll_interval <= 5:
        p.error(f"--poll-interval={args.poll_interval} must be within 0.05..5 seconds")
    return args


def check_loopback(p: argparse.ArgumentParser, url: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        p.error(f"--url={url!r}: use http://127.0.0.1:PORT")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    p.error(f"--url={url!r}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed")


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One accepted submission."""

    job_id: str
    submitted_at: float
    queue_position_at_submit: int | None
    finished_at: float | None = None
    state: str | None = None
    server_timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at


@dataclass
class Shared:
    """State shared by the client threads (guarded by ``lock``)."""

    budget: int
    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: int = 0
    rejected_503: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    queue_samples: list[tuple[float, int | None, bool | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def take_ticket(self) -> bool:
        with self.lock:
            if self.submitted >= self.budget or time.monotonic() >= self.deadline:
                return False
            self.submitted += 1
            return True

    def error(self, what: str) -> None:
        with self.lock:
            self.other_errors[what] = self.other_errors.get(what, 0) + 1


def synthetic_png(size: int = 512) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.6 + 0.2 * np.sin(6 * x) * np.cos(4 * y) + np.random.default_rng(0).normal(0, 0.02, (size, size))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def client(base: str, data: bytes, fields: dict[str, str], shared: Shared, poll_s: float, seed0: int) -> None:
    """One client: submit, poll to the end, repeat while the run's budget lasts."""
    import httpx

    with httpx.Client(base_url=base, timeout=30.0, headers=HEADERS) as http:
        n = 0
        while not shared.stop.is_set() and shared.take_ticket():
            n += 1
            t0 = time.monotonic()
            try:
                r = http.post("/api/v1/counterfactuals", files={"file": ("load-test.png", data, "image/png")},
                              data={**fields, "seed": str(seed0 + n)})
            except httpx.HTTPError as e:
                shared.error(type(e).__name__)
                continue
            if r.status_code in (429, 503):
                with shared.lock:
                    shared.rejected_503 += 1
                retry = float(r.headers.get("Retry-After", "1") or 1)
                shared.stop.wait(min(retry, 2.0))  # the queue is full: back off briefly, then try again
                continue
            if r.status_code != 202:
                shared.error(f"HTTP {r.status_code}")
                continue
            body = r.json()
            out = Outcome(body["job_id"], t0, body.get("queue_position"))
            with shared.lock:
                shared.outcomes.append(out)
            while not shared.stop.is_set():
                try:
                    status = http.get(f"/api/v1/jobs/{out.job_id}").json()
                except (httpx.HTTPError, ValueError) as e:
                    shared.error(f"poll {type(e).__name__}")
                    shared.stop.wait(poll_s)
                    continue
                if status["state"] in FINISHED:
                    out.finished_at, out.state = time.monotonic(), status["state"]
                    out.server_timings_s = {k: float(v) for k, v in (status.get("timings_s") or {}).items()
                                            if isinstance(v, (int, float))}
                    break
                shared.stop.wait(poll_s)


def monitor(base: str, shared: Shared, t_start: float) -> None:
    """Sample /readyz every 0.5 s: (seconds since start, queue_length, queue_has_room)."""
    import httpx

    with httpx.Client(base_url=base, timeout=10.0, headers=HEADERS) as http:
        while not shared.stop.wait(0.5):
            try:
                body = http.get("/readyz").json()
                sample = (time.monotonic() - t_start, body.get("queue_length"), body.get("queue_has_room"))
            except (httpx.HTTPError, ValueError):
                sample = (time.monotonic() - t_start, None, None)
            with shared.lock:
                shared.queue_samples.append(sample)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(args: argparse.Namespace, base: str) -> dict[str, Any]:
    import httpx

    data = args.image.read_bytes() if args.image else synthetic_png()
    fields = {k: str(v) for k, v in {"steps": args.steps, "strength": args.strength,
                                     "scheduler": args.scheduler}.items() if v is not None}
    model = httpx.get(f"{base}/api/v1/model", timeout=30, headers=HEADERS).json()
    shared = Shared(budget=args.requests, deadline=time.monotonic() + args.duration)
    t_start = time.monotonic()
    mon = threading.Thread(target=monitor, args=(base, shared, t_start), daemon=True)
    mon.start()
    threads = [threading.Thread(target=client, args=(base, data, fields, shared, args.poll_interval, 1000 * i),
                                daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, shared.deadline - time.monotonic()) + 1.0)
    shared.stop.set()
    for t in threads:
        t.join(timeout=10)
    mon.join(timeout=5)
    # leave the server idle: cancel whatever this run left queued or running
    unfinished = [o for o in shared.outcomes if o.finished_at is None]
    with httpx.Client(base_url=base, timeout=10.0, headers=HEADERS) as http:
        for o in unfinished:
            with contextlib.suppress(httpx.HTTPError):
                http.post(f"/api/v1/jobs/{o.job_id}/cancel")
    wall = time.monotonic() - t_start

    done = [o for o in shared.outcomes if o.state == "done"]
    lat = [o.latency_s for o in done if o.latency_s is not None]
    first = min((o.submitted_at for o in shared.outcomes), default=t_start)
    last = max((o.finished_at for o in done if o.finished_at is not None), default=first)
    span = max(last - first, 1e-9)
    queued = [o.server_timings_s["queued"] for o in done if "queued" in o.server_timings_s]
    ran = [o.server_timings_s["run"] for o in done if "run" in o.server_timings_s]
    lengths = [q for _, q, _ in shared.queue_samples if q is not None]
    full = [room is False for _, _, room in shared.queue_samples if room is not None]
    return {
        "target": base, "model": {k: model.get(k) for k in ("name", "model_hash", "image_size")},
        "limits": model.get("limits"), "concurrency": args.concurrency, "request_budget": args.requests,
        "duration_budget_s": args.duration, "wall_s": round(wall, 2), "fields": fields,
        "submitted": shared.submitted, "accepted": len(shared.outcomes), "rejected_503": shared.rejected_503,
        "other_errors": shared.other_errors,
        "finished": {s: sum(o.state == s for o in shared.outcomes) for s in sorted(FINISHED)},
        "unfinished_cancelled_at_end": len(unfinished),
        "completed_per_minute": round(60.0 * len(done) / span, 2) if done else 0.0,
        "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "max": max(lat) if lat else None},
        "server_queued_s": {"p50": percentile(queued, 50), "p95": percentile(queued, 95)},
        "server_run_s": {"p50": percentile(ran, 50), "p95": percentile(ran, 95)},
        "queue": {"samples": len(shared.queue_samples), "max_length": max(lengths) if lengths else None,
                  "mean_length": round(float(np.mean(lengths)), 2) if lengths else None,
                  "share_of_samples_full": round(sum(full) / len(full), 3) if full else None,
                  "timeline": [{"t_s": round(t, 2), "queue_length": q, "has_room": r}
                               for t, q, r in shared.queue_samples]},
        "outcomes": [{**asdict(o), "latency_s": o.latency_s} for o in shared.outcomes],
    }


def markdown(r: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    q = r["queue"]
    full = "-" if q["share_of_samples_full"] is None else f"{100 * q['share_of_samples_full']:.0f} %"
    return "\n".join([
        f"Load run against {r['target']} (model {r['model']['name']}; queue size "
        f"{(r['limits'] or {}).get('queue_size')}): concurrency {r['concurrency']}, budget {r['request_budget']} "
        f"submissions / {r['duration_budget_s']:.0f} s, took {r['wall_s']:.1f} s.",
        "",
        "| submitted | accepted | 503/429 (queue or user limit) | done | failed | cancelled at end | "
        "jobs/min sustained | latency p50 s | latency p95 s | server queued p50 s | server run p50 s | queue max | "
        "queue mean | time full |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['submitted']} | {r['accepted']} | {r['rejected_503']} | {r['finished']['done']} | "
        f"{r['finished']['failed']} | {r['unfinished_cancelled_at_end']} | {r['completed_per_minute']:.1f} | "
        f"{s(r['latency_s']['p50'])} | {s(r['latency_s']['p95'])} | {s(r['server_queued_s']['p50'])} | "
        f"{s(r['server_run_s']['p50'])} | {q['max_length']} | {q['mean_length']} | "
        f"{full} |",
        "" if not r["other_errors"] else f"\nOther errors: {r['other_errors']}",
    ])


# ----------------------------------------------------------------------------------------------------------------
# optional: a server of our own on loopback
# ----------------------------------------------------------------------------------------------------------------
HEADERS: dict[str, str] = {}
"""Sent with every request: ``Authorization: Bearer <token>`` (``--token``, ``VALD_MD_TOKEN``, or made by --spawn)."""


def main(args: argparse.Namespace) -> int:
    sys.stderr.write(f"load_test: concurrency={args.concurrency} requests<={args.requests} "
                     f"duration<={args.duration:.0f}s target={'spawned server' if args.spawn else args.url}\n")
    with tempfile.TemporaryDirectory(prefix="vald-md-load-") as tmp:
        proc = None
        base = args.url.rstrip("/") if args.url else ""
        if args.spawn:
            if args.model is None:
                from tests.tiny_model import write_tiny_model

                args.model = write_tiny_model(Path(tmp) / "tiny")
            proc, base, token = spawn_server(args.model, Path(tmp), queue_size=args.queue_size,
                                             max_jobs_per_user=args.concurrency)
            HEADERS["Authorization"] = f"Bearer {token}"
        try:
            report = run(args, base)
        finally:
            if proc is not None:
                stop_server(proc, 30)
    sys.stdout.write(markdown(report) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        sys.stderr.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
