"""Overhead of the HTTP path: JSON API submit + wait until done, against a direct ``run_review`` call.

Both paths do the same work (decode, generate, attribution map, write the artifacts) for the same request and
seed; the difference is what the web app adds: multipart upload, synchronous decode for validation,
de-identification, the audit records, queueing, the worker hand-off, progress bookkeeping and the progress
channel. Target: <= 5 % overhead.

Layout (defaults are production's): ``--server process`` runs `vald-md serve` in its own process, as deployed;
``--wait sse`` follows the job's server-sent event stream, as the browser does. ``--server thread`` (uvicorn in
this process, sharing one interpreter and its GIL with the client) and ``--wait poll`` (a status GET every
``--poll`` seconds, as scripts may do) measure the less favourable layouts.

    .venv/bin/python benchmarks/web_overhead.py                       # embedded model if present, else tiny
    .venv/bin/python benchmarks/web_overhead.py --model DIR --image x.dcm --steps 50 --repeats 3
    .venv/bin/python benchmarks/web_overhead.py --server thread --wait poll --poll 0.05
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.local_server import FINISHED, free_port, make_token, spawn_server, stop_server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="model folder (default: model_weights/vald-md-mini if it exists, else a tiny in-code model)")
    p.add_argument("--image", type=Path, default=None,
                   help="input image (default: ../shared/data/dicom/siim_cr_chest.dcm if present, else synthetic)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: 75 for a real model, 40 for tiny)")
    p.add_argument("--strength", type=float, default=0.85, help="strength (default 0.85)")
    p.add_argument("--samples", type=int, default=1, help="samples per run (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each path (default 3)")
    p.add_argument("--server", choices=["process", "thread"], default="process",
                   help="`vald-md serve` in its own process (default, as deployed) or uvicorn in a thread of this one")
    p.add_argument("--wait", choices=["sse", "poll"], default="sse",
                   help="follow the job's event stream (default, as the browser does) or poll its status")
    p.add_argument("--poll", type=float, default=0.05, help="--wait poll: seconds between polls (default 0.05)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: auto)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _image_bytes(path: Path | None) -> tuple[bytes, str]:
    if path is not None:
        return path.read_bytes(), path.name
    shared = ROOT.parent / "shared" / "data" / "dicom" / "siim_cr_chest.dcm"
    if shared.is_file():
        return shared.read_bytes(), "siim_cr_chest.dcm"
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((512, 512)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue(), "synthetic 512x512 PNG"


def main(args: argparse.Namespace) -> int:
    import httpx
    import uvicorn

    from app import imaging
    from app.config import EMBEDDED_MODEL_DIR, Settings
    from app.engine import CounterfactualEngine
    from app.runs.review import ReviewRequest, run_review
    from app.web import create_app

    tmp = Path(tempfile.mkdtemp(prefix="vald-md-bench-"))
    model = args.model
    if model is None:
        if EMBEDDED_MODEL_DIR.is_dir():
            model = EMBEDDED_MODEL_DIR
        else:
            from tests.tiny_model import write_tiny_model

            model = write_tiny_model(tmp / "tiny")
    is_tiny = model.name == "tiny"
    steps = args.steps or (40 if is_tiny else 75)
    data, image_name = _image_bytes(args.image)
    engine = CounterfactualEngine(model, device=args.device)
    print(f"model {engine.info.name} ({model}) on {engine.device}; image {image_name}; steps {steps}, strength "
          f"{args.strength}, samples {args.samples}; {args.repeats} repeats; server in a {args.server}, "
          f"client waits by {args.wait}")

    def request(seed: int) -> ReviewRequest:
        return ReviewRequest(prompt="normal chest x-ray", strength=args.strength, steps=steps, seed=seed,
                             samples=args.samples)

    # 1. direct: decode + run_review, as the CLI does
    stages: dict[str, dict[str, float]] = {}  # per-stage seconds of the last run of each path

    def direct(i: int) -> float:
        t = time.perf_counter()
        decoded = imaging.decode_image(data)
        record = run_review(engine, data, request(i), tmp / "direct" / str(i), decoded=decoded)
        stages["direct"] = record.timings_s
        return time.perf_counter() - t

    # 2. HTTP: the real server on a free port
    if args.server == "process":
        proc, base, token = spawn_server(model, tmp, device=args.device)
        server = thread = None
    else:
        port = free_port()
        app = create_app(Settings(data_dir=tmp / "server", port=port, queue_size=4), engine=engine)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        token = make_token(tmp / "server")
        proc, base = None, f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Bearer {token}"})

    def wait_sse(url: str) -> dict:
        with client.stream("GET", url) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    st = json.loads(line[5:])
                    if st["state"] in FINISHED:
                        return st
        raise SystemExit("the event stream ended before the job did")

    def wait_poll(url: str) -> dict:
        while True:
            st = client.get(url).json()
            if st["state"] in FINISHED:
                return st
            time.sleep(args.poll)

    submit: list[float] = []  # seconds from the start of the upload to the 202 answer

    def http(i: int) -> float:
        fields = {"prompt": "normal chest x-ray", "strength": str(args.strength), "steps": str(steps),
                  "seed": str(i), "samples": str(args.samples)}
        t = time.perf_counter()
        r = client.post("/api/v1/counterfactuals", data=fields, files={"file": ("upload", data)})
        r.raise_for_status()
        submit.append(time.perf_counter() - t)
        body = r.json()
        st = wait_sse(body["events_url"]) if args.wait == "sse" else wait_poll(body["status_url"])
        elapsed = time.perf_counter() - t
        stages["http"] = st.get("timings_s", {})
        if st["state"] != "done":
            raise SystemExit(f"HTTP run ended {st['state']}: {st['error']}")
        return elapsed

    try:
        direct(0), http(0)  # warm-up: prompt cache, allocator, first-request imports
        d, h = [], []
        for i in range(1, args.repeats + 1):  # interleaved, so background load hits both paths alike
            d.append(direct(i))
            h.append(http(i))
    finally:
        client.close()
        if proc is not None:
            stop_server(proc)
        else:
            server.should_exit = True
            thread.join(10)

    md, mh = statistics.median(d), statistics.median(h)
    print(f"direct run_review  : median {md:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in d)})")
    print(f"HTTP submit+{args.wait:<5}: median {mh:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in h)})")
    for name in sorted(set(stages.get("direct", {})) | set(stages.get("http", {}))):
        print(f"  stage {name:<15}: direct {stages.get('direct', {}).get(name, float('nan')):8.3f} s   "
              f"HTTP {stages.get('http', {}).get(name, float('nan')):8.3f} s")
    print(f"  of which submit : median {statistics.median(submit[1:]):.3f} s (upload, validation decode, "
          "de-identification, audit records, 202)")
    print(f"overhead           : {mh - md:+.3f} s = {100 * (mh / md - 1):+.1f} %  (target <= 5 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
