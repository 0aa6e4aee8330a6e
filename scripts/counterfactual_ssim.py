"""SSIM of the counterfactual shown to its input, as the product makes it (issue 16's "counterfactual SSIM").

Runs the whole review run (:func:`app.runs.review.run_review`: the model's healthy preset, the embedded lung
segmenter, the map, the files) on the first ``--per-class`` images of each class of a split, in the stable
pseudo-random order `vald-md evaluate` uses, and reports, per class, the SSIM (:func:`app.metrics.ssim`) to
``input.png`` of:

- ``shown``: ``counterfactual.png``, what the viewer shows (with the preset's ``counterfactual_edit``
  ``map_region``, the edit restricted to the map's above-normal region);
- ``first_sample``: the first of the samples behind the map (``counterfactual-0.png`` when the shown one is the edit,
  else ``counterfactual.png``): the whole image redrawn;
- ``reconstruction``: the autoencoder's round trip (what an edit of nothing would show);

with the edit region's share of the image and the run's wall time. Every run uses ``--seed``.

Usage:
    OMP_NUM_THREADS=2 python scripts/counterfactual_ssim.py --data ../shared/data/cxr256/labels.csv --split test \
        --per-class 16 --out runs/cf-ssim.json [--model DIR] [--edit map_region|redraw] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app import datasets, imaging, metrics
from app.engine import CounterfactualEngine
from app.evaluate.common import stable_order
from app.lungs import LungSegmenter
from app.modelfolder import DEFAULT_MODEL_DIR
from app.provenance import library_versions
from app.runs import folder
from app.runs.review import ReviewRequest, run_review

SEGMENTER = Path(__file__).resolve().parents[1] / "model_weights" / "lungs-unet"


def _unit(path: Path) -> np.ndarray:
    return imaging.decode_image(path.read_bytes()).pixels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="labelled CSV with a split column (cxr256/labels.csv)")
    p.add_argument("--split", default="test")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--labels", default="covid,viral_pneumonia", help="comma-separated classes")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--segmenter", default=str(SEGMENTER))
    p.add_argument("--edit", default=None, choices=["map_region", "redraw"],
                   help="counterfactual_edit (default: the model's healthy preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-autocast", action="store_true", help="bf16 autocast where the CPU has AMX (as the server)")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    eng = CounterfactualEngine(args.model, device="cpu", cpu_autocast=args.cpu_autocast)
    seg = LungSegmenter(args.segmenter)
    _, rows = datasets.read_labelled(Path(args.data), args.split)
    wanted = [label.strip() for label in args.labels.split(",") if label.strip()]
    by_label: dict[str, list[datasets.LabelledImage]] = {label: [] for label in wanted}
    for r in sorted(rows, key=lambda r: stable_order(r.rel)):
        if r.label in by_label and len(by_label[r.label]) < args.per_class:
            by_label[r.label].append(r)
    req = ReviewRequest.from_preset(eng.info.presets.get("healthy"), seed=args.seed, counterfactual_edit=args.edit)
    per_image: list[dict[str, object]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for label, items in by_label.items():
            for i, item in enumerate(items):
                out = Path(tmp) / f"{label}-{i}"
                t = time.perf_counter()
                rec = run_review(eng, item.path.read_bytes(), req, out, segmenter=seg)
                wall = time.perf_counter() - t
                img = _unit(out / folder.INPUT)
                first = folder.EDITED_FIRST_SAMPLE if rec.edited else folder.COUNTERFACTUAL
                first_img = _unit(out / first)
                if first_img.shape != img.shape:  # a model-frame sample of a non-square input
                    first_img = imaging.content_to_native(first_img, imaging.letterbox(img, eng.info.image_size)[1])
                shown = _unit(out / folder.COUNTERFACTUAL)
                row = {"label": label, "image": item.rel, "shown": metrics.ssim(img, shown),
                       "first_sample": metrics.ssim(img, first_img),
                       "reconstruction": metrics.ssim(img, _unit(out / folder.RECONSTRUCTION)),
                       "edited": rec.edited, "edit_region_fraction": (rec.counterfactual_edit or {}).get(
                           "region_fraction"), "wall_s": round(wall, 3)}
                per_image.append(row)
                sys.stderr.write(f"{label} {i + 1}/{len(items)} {item.rel}: shown {row['shown']:.3f}, first sample "
                                 f"{row['first_sample']:.3f}, reconstruction {row['reconstruction']:.3f}, region "
                                 f"{row['edit_region_fraction']}, {wall:.1f} s\n")
    summary: dict[str, dict[str, float]] = {}
    for label in by_label:
        rows_l = [r for r in per_image if r["label"] == label]
        if not rows_l:
            continue
        summary[label] = {k: round(float(np.mean([float(r[k]) for r in rows_l])), 4)  # type: ignore[arg-type]
                          for k in ("shown", "first_sample", "reconstruction")}
        summary[label].update({f"{k}_min": round(float(min(float(r[k]) for r in rows_l)), 4)  # type: ignore[arg-type]
                               for k in ("shown", "first_sample")})
        summary[label]["shown_max"] = round(float(max(float(r["shown"]) for r in rows_l)), 4)  # type: ignore[arg-type]
        summary[label]["n"] = len(rows_l)
    result = {"summary": summary, "per_image": per_image, "request": {
        **req.parameters(args.seed), "counterfactual_edit": req.counterfactual_edit}, "split": args.split,
        "model_hash": eng.info.model_hash, "compute": eng.compute_record(), "library_versions": library_versions(),
        "command": " ".join(sys.argv), "wall_s": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for label, s in summary.items():
        sys.stdout.write(f"{label}: n {s['n']}, SSIM shown {s['shown']:.3f} (min {s['shown_min']:.3f}, max "
                         f"{s['shown_max']:.3f}), first sample {s['first_sample']:.3f}, reconstruction "
                         f"{s['reconstruction']:.3f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
