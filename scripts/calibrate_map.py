"""Calibrate a model's attribution map on normal validation images: the map's absolute scale (app/mapscale.py).

Runs the product's own review (``app.runs.review.run_review``: the model's healthy preset with its samples, its map
method, map reference, map polarity and map smoothing, the lung segmenter) on the first ``--n`` normal images of the
validation split, in the stable pseudo-random order ``vald-md evaluate`` uses, with seed ``--seed`` for every image,
and measures |M| inside the lungs, pooled over the images (the positive part of M for the polarity ``removed``). Its
99th percentile becomes the model's normal level (1×), stored with the RMS, the mean, N, the preset, the samples,
the polarity, the map smoothing, the data and the date under ``"map_scale"`` in the model's ``vald_md.json`` (with
``--write-manifest``; the manifest is not part of the model hash, so the model's identity does not change).

Usage:
    OMP_NUM_THREADS=1 python scripts/calibrate_map.py --model model_weights/vald-md-mini \
        --data ../shared/data/cxr256/labels.csv --label normal --n 24 --threads 1 --out runs/map-calibration.json \
        [--write-manifest]

nih256 works the same (``--data ../shared/data/nih256/labels.csv --label no_finding``, when its CSV has a split
column). Never calibrate on test images: the test split measures the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app import datasets, engine, mapscale, modelfolder
from app.evaluate.common import stable_order
from app.lungs import LungSegmenter
from app.runs import folder, review
from app.runs.folder import RunFolder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(modelfolder.DEFAULT_MODEL_DIR), help="model folder (default: embedded model)")
    p.add_argument("--data", required=True, help="labelled CSV with a split column (cxr256/labels.csv)")
    p.add_argument("--split", default="val", help="split to draw the normal images from (never 'test')")
    p.add_argument("--label", default="normal", help="the normal class's label ('normal'; nih256: 'no_finding')")
    p.add_argument("--n", type=int, default=24, help="number of normal images (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generation (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--segmenter", default=None, help="lung segmenter folder (default: model_weights/lungs-unet)")
    p.add_argument("--out", required=True, help="JSON report (per-image figures and the calibration)")
    p.add_argument("--write-manifest", action="store_true", help="store map_scale in the model's vald_md.json")
    args = p.parse_args(argv)
    if args.split == "test":
        p.error("--split test: calibrate on validation images; the test split is for measuring the model")
    if not 1 <= args.n <= 2000:
        p.error(f"--n {args.n}: choose 1..2000 images")
    return args


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    # 1. model, segmenter, images
    eng = engine.CounterfactualEngine(args.model, device="cpu")
    seg = LungSegmenter(args.segmenter)
    preset = eng.info.presets["healthy"]
    _, rows = datasets.read_labelled(Path(args.data), args.split)
    chosen = sorted((r for r in rows if r.label == args.label), key=lambda r: stable_order(r.rel))[: args.n]
    if not chosen:
        raise SystemExit(f"{args.data}: no '{args.label}' images in split '{args.split}'")
    sys.stderr.write(f"calibrate-map: {eng.info.name} {eng.info.model_hash[:12]}, {len(chosen)} '{args.label}' "
                     f"images of {args.data} ({args.split}), preset {preset}\n")

    # 2. the product's review of each image; the map and its lung mask
    maps, masks, per_image, method, reference, samples, polarity, smoothing = [], [], [], "", "", 1, "both", 0.0
    t0 = time.time()
    # the preset as the product runs it: its samples (and its map polarity and smoothing, else the manifest's:
    # run_review)
    # the map only: the edited counterfactual the preset may show is not needed to measure it
    req = review.ReviewRequest.from_preset(preset, preset_name="healthy", seed=args.seed, counterfactual_edit="redraw")
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(chosen):
            out = Path(tmp) / f"{i:04d}"
            record = review.run_review(eng, row.path.read_bytes(), req, out, segmenter=seg)
            method, reference = str(record.method), str(record.reference)
            samples, polarity, smoothing = record.n_samples, record.polarity, record.map_smoothing
            run = RunFolder(out)
            m = run.read_npy(folder.ATTRIBUTION)
            k = run.read_png_unit(folder.LUNG_MASK) > 0.5 if run.has(folder.LUNG_MASK) else None
            maps.append(m)
            masks.append(k)
            region = m[k] if k is not None else m.ravel()
            per_image.append({"path": row.rel, "lungs": k is not None,
                              "p99_abs": float(np.percentile(np.abs(region), mapscale.NORMAL_PERCENTILE)),
                              "rms": float(np.sqrt(np.mean(region.astype(np.float64) ** 2)))})
            sys.stderr.write(f"  {i + 1}/{len(chosen)} {row.rel}: p99 |M| {per_image[-1]['p99_abs']:.4f} "
                             f"({time.time() - t0:.0f} s)\n")

    # 3. the normal level
    stats = mapscale.measure_normals(maps, masks)
    csv_sha = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    cal = mapscale.MapCalibration(
        level=stats["level"], percentile=stats["percentile"], rms=stats["rms"], mean_abs=stats["mean_abs"],
        n_images=stats["n_images"], map_method=method, reference=reference, samples=samples, polarity=polarity,
        smoothing=smoothing,
        preset={k: preset[k] for k in ("prompt", "strength", "guidance_scale", "steps", "scheduler") if k in preset},
        data={"csv": Path(args.data).name, "dataset": Path(args.data).parent.name, "split": args.split,
              "label": args.label, "sha256": csv_sha, "seed": args.seed,
              "lung_masked_images": sum(k is not None for k in masks)},
        created=datetime.now(UTC).date().isoformat(), per_image=stats["per_image"],
        command=("scripts/calibrate_map.py --data " + f"{Path(args.data).parent.name}/{Path(args.data).name} "
                 f"--split {args.split} --label {args.label} --n {args.n} --seed {args.seed}"))
    report = {"map_scale": cal.to_manifest(), "model_hash": eng.info.model_hash, "images": per_image,
              "n_pixels": stats["n_pixels"], "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    sys.stdout.write(json.dumps(cal.to_manifest(), indent=2) + "\n")
    if args.write_manifest:
        mpath = Path(args.model) / modelfolder.MANIFEST
        manifest = json.loads(mpath.read_text())
        manifest["map_scale"] = cal.to_manifest()
        mpath.write_text(json.dumps(manifest, indent=2))
        sys.stderr.write(f"wrote map_scale to {mpath} (not part of the model hash)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
