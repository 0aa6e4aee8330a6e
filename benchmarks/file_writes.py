"""The file stage of a review run on its own: encode and write its PNGs one after another or in a thread pool.

A review run writes input.png, counterfactual.png and reconstruction.png (16-bit gray) and overlay.png (8-bit RGB)
at the input's native size. This times ``app.imaging.to_png_bytes`` + an atomic write for those four files from a
synthetic chest-like image of ``--size`` px, sequentially and with ``--workers`` threads (what
``app.runs.review.run_review`` does, ``FILE_WRITERS``), at zlib levels ``--levels``, and prints medians and bytes.

    .venv/bin/python benchmarks/file_writes.py --size 1024 --runs 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    p.add_argument("--runs", type=int, default=7, help="timed repetitions (default 7)")
    p.add_argument("--workers", type=int, default=2, help="threads of the pool (default 2)")
    p.add_argument("--levels", default="1,3,6", help="zlib levels to compare, comma-separated (default 1,3,6)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from PIL import Image

    from app import imaging

    rng = np.random.default_rng(0)
    _, x = np.mgrid[0:args.size, 0:args.size] / args.size
    base = 0.55 + 0.25 * np.exp(-((x - 0.5) ** 2) / 0.08)
    imgs = [np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32) for _ in range(3)]
    overlay = (np.stack([imgs[0]] * 3, -1) * 255).astype(np.uint8)
    jobs = [("input.png", imgs[0], 16), ("counterfactual.png", imgs[1], 16), ("reconstruction.png", imgs[2], 16),
            ("overlay.png", overlay, 8)]
    out = Path(tempfile.mkdtemp(prefix="vald-md-files-"))
    save = Image.Image.save
    result: dict[str, object] = {"size": args.size, "runs": args.runs, "workers": args.workers,
                                 "load_average": [round(v, 2) for v in os.getloadavg()]}
    for level in (int(v) for v in args.levels.split(",")):
        def save_at(self, fp, format=None, **kw):
            kw["compress_level"] = level  # noqa: B023 - used in this iteration only
            return save(self, fp, format, **kw)

        def one(job: tuple[str, np.ndarray, int]) -> int:
            name, img, bits = job
            data = imaging.to_png_bytes(img, bits=bits)
            tmp = out / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            return len(data)

        with mock.patch.object(Image.Image, "save", save_at):
            seq, par = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                sizes = [one(j) for j in jobs]
                seq.append(time.perf_counter() - t)
                t = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.workers) as pool:
                    list(pool.map(one, jobs))
                par.append(time.perf_counter() - t)
        result[f"level_{level}"] = {"sequential_ms": round(1e3 * float(np.median(seq)), 1),
                                    "pool_ms": round(1e3 * float(np.median(par)), 1),
                                    "bytes": dict(zip([j[0] for j in jobs], sizes, strict=True))}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
