"""Throughput of the Ray Serve backend: jobs/min with 1 and 2 replicas, and the Ray path's overhead on one replica
against the in-process path (issue 14; target <= 10 %).

Every configuration runs the same batch through a :class:`app.jobs.JobManager` (no web app, no audit database):
a warm-up job, then ``--jobs`` jobs submitted at once, timed from the first submission to the last job's end.
Configurations:

- ``local-T``: the in-process backend (``VALD_MD_BACKEND=local``), torch on ``T`` threads (``--local-threads``);
- ``ray-N``: ``N`` replicas on a local Ray cluster on 127.0.0.1 (``--replicas``), each reserving ``--threads`` CPUs
  (Ray gives each replica's torch that many threads).

The overhead of the Ray path (a streaming call per job, progress events with previews, the replica reading the
upload and writing the artifacts) is measured in pairs while one replica is deployed: ``--pairs`` times, one job
in process (torch on ``--threads`` threads), then the same job on the replica (the same threads), each alone on the
machine; overhead = median Ray job / median in-process job - 1, each job timed from submission to its end. Pairs
keep the drifting load of a shared machine out of the comparison. The model's fast preset (``healthy-fast``:
DPM-Solver++, 20 steps at 0.85) on the embedded model, or the tiny in-code model with ``--tiny``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_throughput.py                  # embedded model, 10 jobs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_throughput.py --tiny --jobs 20
    .venv/bin/python benchmarks/ray_throughput.py --replicas 1,2,4 --threads 1 --local-threads 1,4   # N GPUs/cores

On a GPU host the replicas take one GPU each (``deployment_options``): ``--replicas 1,2,...,N`` measures the
scaling over N GPUs (see docs/DEPLOYMENT.md for a multi-host cluster: the benchmark then attaches with
``--address``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny in-code model instead of the embedded one")
    p.add_argument("--image", type=Path, default=ROOT.parent / "shared" / "data" / "cxr256" / "test" / "covid" /
                   "COVID-1.png", help="input image (default: ../shared/data/cxr256/test/covid/COVID-1.png)")
    p.add_argument("--jobs", type=int, default=10, help="timed jobs per configuration (default 10)")
    p.add_argument("--replicas", default="1,2", help="replica counts to measure (default 1,2)")
    p.add_argument("--threads", type=float, default=1.0, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--local-threads", default="1,2", help="torch threads of the in-process runs (default 1,2)")
    p.add_argument("--pairs", type=int, default=8, help="in-process/Ray job pairs for the overhead (default 8)")
    p.add_argument("--device", default="cpu", help="device of the in-process runs and of CPU replicas (default cpu; "
                                                   "on a cluster with GPUs every replica takes one GPU)")
    p.add_argument("--address", default=None, help="attach to this Ray cluster instead of starting a local one")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _model(tiny: bool, scratch: Path) -> Path:
    if not tiny:
        return ROOT / "model_weights" / "vald-md-mini"
    from tests.tiny_model import write_tiny_model

    return write_tiny_model(scratch / "tiny")


def _image(path: Path) -> bytes:
    if path.is_file():
        return path.read_bytes()
    import numpy as np

    from app import imaging

    rng = np.random.default_rng(0)
    return imaging.to_png_bytes(rng.random((256, 256)).astype(np.float32), bits=8)


def _batch(manager: Any, data: bytes, request: Any, jobs: int) -> dict[str, Any]:
    """A warm-up job, then ``jobs`` submitted at once; the batch's wall time and the jobs' run times."""
    from dataclasses import replace

    def wait(batch: list[Any]) -> None:
        while not all(j.state.finished for j in batch):
            time.sleep(0.02)

    wait([manager.submit("bench", data, replace(request, seed=0))])
    t0 = time.perf_counter()
    batch = [manager.submit("bench", data, replace(request, seed=1 + i)) for i in range(jobs)]
    wait(batch)
    elapsed = time.perf_counter() - t0
    states = [j.state.value for j in batch]
    runs = [j.timings_s.get("run", 0.0) for j in batch if j.state.value == "done"]
    return {"jobs": jobs, "done": states.count("done"), "failed": jobs - states.count("done"),
            "elapsed_s": round(elapsed, 2), "jobs_per_min": round(60 * jobs / elapsed, 1),
            "run_p50_s": round(statistics.median(runs), 3) if runs else None}


def _pairs(local: Any, ray: Any, data: bytes, request: Any, pairs: int) -> dict[str, Any]:
    """``pairs`` times a job in process, then the same on Ray, one at a time; medians of submission-to-end."""
    from dataclasses import replace

    times: dict[str, list[float]] = {"local": [], "ray": []}
    for i in range(pairs):
        for name, manager in (("local", local), ("ray", ray)):
            t0 = time.perf_counter()
            job = manager.submit("bench", data, replace(request, seed=100 + i))
            while not job.state.finished:
                time.sleep(0.005)
            assert job.state.value == "done", job.error
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": pairs, "local_median_s": round(med["local"], 3), "ray_median_s": round(med["ray"], 3),
            "local_s": [round(t, 3) for t in times["local"]], "ray_s": [round(t, 3) for t in times["ray"]],
            "overhead_pct": round(100 * (med["ray"] / med["local"] - 1), 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from app.config import Settings
    from app.engine import load_engine_in_short_lived_thread
    from app.generation import PRESETS
    from app.jobs import JobManager, JobStore, Limits, NullRecorder
    from app.runs.review import ReviewRequest
    from app.serving import RayBackend, load_segmenter

    scratch = Path(tempfile.mkdtemp(prefix="vald-md-ray-bench-"))
    model = _model(args.tiny, scratch)
    data = _image(args.image)
    request = ReviewRequest.from_preset(PRESETS["healthy-fast"], seed=0)
    limits = Limits(queue_size=args.jobs + 2)
    results: dict[str, Any] = {"model": model.name, "preset": "healthy-fast", "image": args.image.name,
                               "load_before": os.getloadavg(), "configurations": {}}
    autocast = Settings().cpu_autocast  # VALD_MD_CPU_AUTOCAST, as the server and its replicas take it
    results["cpu_autocast"] = autocast
    engine = load_engine_in_short_lived_thread(model, device=args.device, cpu_autocast=autocast)
    segmenter = load_segmenter(ROOT / "model_weights" / "lungs-unet")

    def manager(name: str, backend: Any = None) -> JobManager:
        store = JobStore(scratch / name / "runs")
        m = JobManager(engine, store, NullRecorder(), limits, segmenter=segmenter, backend=backend)
        m.start()
        return m

    def local(threads: int, name: str) -> None:
        torch.set_num_threads(threads)
        m = manager(name)
        results["configurations"][name] = _batch(m, data, request, args.jobs)
        m.stop()
        print(name, results["configurations"][name], flush=True)

    for threads in [int(t) for t in args.local_threads.split(",") if t]:
        local(threads, f"local-{threads}")
    torch.set_num_threads(1)  # the front only validates while replicas run

    import ray
    from ray import serve

    if args.address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, namespace="vald-md")
    for replicas in [int(r) for r in args.replicas.split(",") if r]:
        settings = Settings(data_dir=scratch / "data", backend="ray", model_dir=model, ray_replicas=replicas,
                            ray_cpus_per_replica=args.threads, ray_address=args.address, device=args.device,
                            cpu_autocast=autocast)
        t0 = time.perf_counter()
        backend = RayBackend.from_settings(settings, redeploy=True)
        deploy_s = time.perf_counter() - t0
        m = manager(f"ray-{replicas}", backend)
        results["configurations"][f"ray-{replicas}"] = {**_batch(m, data, request, args.jobs),
                                                        "deploy_s": round(deploy_s, 1)}
        print(f"ray-{replicas}", results["configurations"][f"ray-{replicas}"], flush=True)
        if replicas == 1 and args.pairs:
            torch.set_num_threads(int(args.threads))
            in_process = manager("pairs-local")
            results["overhead"] = _pairs(in_process, m, data, request, args.pairs)
            in_process.stop()
            torch.set_num_threads(1)
            print("overhead", results["overhead"], flush=True)
        m.stop()
    serve.shutdown()
    ray.shutdown()
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
