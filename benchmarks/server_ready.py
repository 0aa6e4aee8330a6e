"""Seconds from `vald-md serve` starting to its first HTTP 200 on /readyz (issue 15: "server ready <= 5 s").

Starts the server (``python -m app.cli serve``, what the ``vald-md`` entry point runs, with the ``app`` beside this
script first on ``PYTHONPATH``; the output's ``app`` names the folder measured) with the embedded model (or
--model) on 127.0.0.1 and a free port, with a fresh data folder each time (the first start: database created,
migrations, audit key, chain), N times, and prints the times (median, each) as JSON. The time covers the
interpreter's start, the imports, the database's start-up, the model load (and, with ``--compile``, its compilation
and warm-up), until /readyz answers 200. Beside the wall times: the CPU seconds the server process had used by then
(user + system, from /proc; less sensitive to other work on the machine than the wall time) and the load average
before and after.

    .venv/bin/python benchmarks/server_ready.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.local_server import free_port, stop_server  # noqa: E402


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (Linux /proc), or None where unknown."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_env() -> dict[str, str]:
    """The environment the server starts in: this one without ``VALD_MD_*`` settings, with this checkout first on
    ``PYTHONPATH``, so that the ``app`` measured is the one beside this script (the venv's ``vald-md`` entry point
    would import whichever checkout the venv was installed from)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VALD_MD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def app_location() -> str:
    """The folder of the ``app`` package the server starts with (:func:`server_env`)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import app, pathlib; print(pathlib.Path(app.__file__).parent)"],
                         env=server_env(), cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def time_to_ready(model: Path, work: Path, timeout_s: float = 120.0,
                  extra: tuple[str, ...] = ()) -> tuple[float, float | None]:
    """(seconds from starting `vald-md serve` (a fresh data folder under ``work``, ``extra`` arguments) to /readyz
    answering 200, CPU seconds the server had used by then)."""
    import subprocess

    import httpx

    port = free_port()
    env = server_env()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", str(model),
           "--data-dir", str(work / "data"), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout_s and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - t0, cpu_seconds(proc.pid)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit("the server did not become ready")
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    """Measure and print; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "model_weights" / "vald-md-mini", help="model folder")
    p.add_argument("--runs", type=int, default=3, help="server starts to time (default 3)")
    p.add_argument("--compile", action="store_true", help="start with vald-md serve --compile (UNet compiled and "
                                                          "warmed up before ready)")
    args = p.parse_args(argv)
    import os

    load_before = os.getloadavg()[0]
    times, cpus = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = time_to_ready(args.model, Path(tmp), extra=("--compile",) if args.compile else ())
            times.append(round(wall, 2))
            cpus.append(None if cpu is None else round(cpu, 2))
    known = [c for c in cpus if c is not None]
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "runs_s": times,
                      "cpu_median_s": statistics.median(known) if known else None, "cpu_s": cpus,
                      "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                      "model": str(args.model), "app": app_location()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
