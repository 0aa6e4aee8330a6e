"""Autoencoder reconstruction quality of a model folder on a labelled split: PSNR (dB), SSIM and optionally FID.

Each image is encoded (posterior mode) and decoded at the model's size; PSNR is over [0, 1] pixels (peak 1),
SSIM is app.metrics.ssim (Wang et al., 11-tap Gaussian window, sigma 1.5). With ``--fid``, also FID between the
reconstructions and their originals, per class and over the split (app.metrics, InceptionV3 pool3): how far
the autoencoder alone moves images from real radiographs, a floor under any FID of the model's outputs.

Usage:
    python scripts/measure_vae.py --model model_weights/vald-md-mini --data ../shared/data/cxr256/labels.csv \
        --split test [--limit N] [--fid] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from app import datasets, engine, imaging, metrics, modelfolder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(modelfolder.DEFAULT_MODEL_DIR), help="model folder")
    p.add_argument("--data", required=True, help="labelled CSV")
    p.add_argument("--split", default="test", help="split to measure (default test)")
    p.add_argument("--limit", type=int, default=None, help="at most N images (evenly spaced)")
    p.add_argument("--fid", action="store_true", help="also FID(reconstructions, originals), per class and overall")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    eng = engine.CounterfactualEngine(args.model, device="cpu")
    _, rows = datasets.read_labelled(Path(args.data), args.split)
    if args.limit:
        rows = rows[:: max(1, len(rows) // args.limit)][: args.limit]
    psnrs, ssims, originals, recons = [], [], [], []
    t0 = time.time()
    for r in rows:
        img = imaging.decode_image(r.path.read_bytes()).pixels
        boxed, _ = imaging.letterbox(img, eng.info.image_size)
        rec = eng.reconstruct_model_frame(boxed)
        mse = float(np.mean((rec - boxed) ** 2))
        psnrs.append(10 * np.log10(1.0 / max(mse, 1e-12)))
        ssims.append(metrics.ssim(boxed, rec))
        if args.fid:
            originals.append(boxed)
            recons.append(np.clip(rec, 0, 1))
    out = {"model_hash": eng.info.model_hash, "split": args.split, "n": len(rows),
           "psnr_db_mean": float(np.mean(psnrs)), "psnr_db_sd": float(np.std(psnrs)),
           "ssim_mean": float(np.mean(ssims)), "ssim_sd": float(np.std(ssims)), "wall_s": round(time.time() - t0, 1)}
    if args.fid:
        fx = metrics.FIDFeatureExtractor()
        f_orig, f_rec = fx.features(originals), fx.features(recons)
        labels = np.array([r.label for r in rows])
        out["fid_reconstruction_vs_original"] = {
            **{lab: round(metrics.fid_from_features(f_rec[labels == lab], f_orig[labels == lab]), 2)
               for lab in sorted(set(labels))},
            "all": round(metrics.fid_from_features(f_rec, f_orig), 2)}
        out["wall_s"] = round(time.time() - t0, 1)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
