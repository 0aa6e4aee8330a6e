"""`vald-md train lesions`: train the lung-only lesion classifier (``app.lesions.LesionNet``).

One readable file, ``parse_args(argv)`` -> ``main(args)``. Data: labelled CSVs (path, split, label), e.g.
``shared/data/nih256/labels.csv`` (one source: no_finding vs pneumonia) and ``shared/data/cxr256/labels.csv``
(covid vs normal; viral_pneumonia is left out by default: it is mostly paediatric, an age shortcut). Labels are
mapped to disease (1) or normal (0) with ``--positive`` / ``--negative``. Every image is segmented by the lung
segmenter once (cached in OUT/cache.npz) and only its lung field is shown to the network (``app.lesions``).

Sampling is balanced over (source, label) groups, so a source cannot stand in for the label. Augmentation:
random resized crop of the lung box (scale 0.8-1), horizontal flip, gamma 0.7-1.4, Gaussian noise. The checkpoint
with the best mean validation AUROC over the sources is kept. Writes OUT/classifier.json + OUT/model.safetensors,
OUT/loss.csv, OUT/checkpoint.pt (``--resume`` continues).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.lesions import LesionNet, lung_box, save_classifier, standardize
from app.lungs import LungSegmenter, resize_float
from app.train.schedule import warmup_cosine_to_zero

PROBE_SIZE = 256


def read_rows(csv_path: Path, positive: set[str], negative: set[str]) -> list[tuple[Path, str, int, str]]:
    """(image path, split, label 0/1, source name) for the rows whose label is in ``positive`` or ``negative``."""
    rows = []
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["label"] in positive or r["label"] in negative:
                rows.append((csv_path.parent / r["path"], r.get("split", "train"), int(r["label"] in positive),
                             csv_path.parent.name))
    return rows


def crop_raw(img: np.ndarray, lungs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The lung box of ``img`` resized to ``size``: raw float32 intensities and float32 mask {0, 1}."""
    r0, r1, c0, c1 = lung_box(lungs)
    crop = resize_float(img[r0:r1, c0:c1], size, size)
    m = resize_float(lungs[r0:r1, c0:c1].astype(np.float32), size, size) >= 0.5
    return crop, m.astype(np.float32)


def build_cache(rows: list[tuple[Path, str, int, str]], seg: LungSegmenter, size: int,
                cache: Path) -> dict[str, np.ndarray]:
    """Segment and crop every image once; arrays x (N, size, size), m (N, size, size), y, split, source."""
    if cache.is_file():
        data = dict(np.load(cache, allow_pickle=False))
        if len(data["y"]) == len(rows):
            return data
    xs, ms = [], []
    t0 = time.time()
    for i, (path, _, _, _) in enumerate(rows):
        with Image.open(path) as im:
            img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        if img.shape != (PROBE_SIZE, PROBE_SIZE):
            img = np.clip(resize_float(img, PROBE_SIZE, PROBE_SIZE), 0, 1)
        x, m = crop_raw(img, seg.segment(img), size)
        xs.append(x)
        ms.append(m)
        if (i + 1) % 200 == 0:
            sys.stderr.write(f"\rsegmenting {i + 1}/{len(rows)} {time.time() - t0:.0f} s")
    data = {"x": np.stack(xs).astype(np.float16), "m": np.stack(ms).astype(np.uint8),
            "y": np.array([r[2] for r in rows], np.int64), "split": np.array([r[1] for r in rows]),
            "source": np.array([r[3] for r in rows])}
    np.savez(cache, **data)
    return data


def augment(x: torch.Tensor, m: torch.Tensor, out: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (scale 0.8-1) to ``out``, flip, gamma 0.7-1.4, noise; x raw [0, 1], m {0, 1}."""
    n = x.shape[0]
    scale = 0.8 + 0.2 * torch.rand(n, generator=gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = (1 - scale)[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1)
    grid = F.affine_grid(theta, [n, 1, out, out], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    m = (F.grid_sample(m, grid, mode="bilinear", align_corners=False) >= 0.5).float()
    x = x.clamp(1e-4, 1) ** (0.7 + 0.7 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.02 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x, m


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AUROC (ties 1/2); NaN when a class is missing."""
    p, n = scores[labels == 1], scores[labels == 0]
    if len(p) == 0 or len(n) == 0:
        return math.nan
    return float(((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n)))


@torch.no_grad()
def predict(model: LesionNet, x: torch.Tensor, m: torch.Tensor, size: int) -> np.ndarray:
    """Logits of raw crops (N, 1, S0, S0) resized to ``size``, standardised."""
    model.eval()
    xs = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    ms = (F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) >= 0.5).float()
    out = torch.cat([model(standardize(xs[i : i + 128], ms[i : i + 128])) for i in range(0, len(xs), 128)])
    model.train()
    return out.numpy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments of ``vald-md train lesions``."""
    p = argparse.ArgumentParser(prog="vald-md train lesions", description="train the lung-only lesion classifier")
    p.add_argument("--data", action="append", required=True, help="labelled CSV (path,split,label); repeatable")
    p.add_argument("--positive", default="covid,pneumonia", help="disease labels (default covid,pneumonia)")
    p.add_argument("--negative", default="normal,no_finding", help="normal labels (default normal,no_finding)")
    p.add_argument("--segmenter", default=None, help="lung segmenter folder (default: model_weights/lungs-unet)")
    p.add_argument("--output-dir", required=True, help="classifier folder to write")
    p.add_argument("--name", default="lesion-classifier", help="name in classifier.json")
    p.add_argument("--size", type=int, default=128, help="network input side (default 128)")
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps (default 2500)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW rate, cosine decay (default 1e-3)")
    p.add_argument("--validate-every", type=int, default=250, help="steps between validations (default 250)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Train with balanced sampling, keep the best validation checkpoint, write the classifier folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pos, neg = set(args.positive.split(",")), set(args.negative.split(","))
    rows = [r for d in args.data for r in read_rows(Path(d), pos, neg)]
    seg = LungSegmenter(args.segmenter)
    raw = args.size + args.size // 8
    data = build_cache(rows, seg, raw, out / "cache.npz")
    x_all = torch.from_numpy(data["x"].astype(np.float32))[:, None]
    m_all = torch.from_numpy(data["m"].astype(np.float32))[:, None]
    y_all, split, source = data["y"], data["split"], data["source"]
    tr = np.flatnonzero(split == "train")
    va = np.flatnonzero(split == "val")
    groups = {(s, int(y)) for s, y in zip(source[tr], y_all[tr], strict=True)}
    weights = np.zeros(len(tr))
    for s, y in groups:
        sel = (source[tr] == s) & (y_all[tr] == y)
        weights[sel] = 1.0 / (len(groups) * sel.sum())
    model = LesionNet()
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_zero(args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start, best, best_state, history = 0, -1.0, None, []
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        rng = st["rng"]
        start, best, best_state, history = st["step"], st["best"], st["best_state"], st["history"]
    sys.stderr.write(json.dumps({"mode": "lesions", "train": len(tr), "val": len(va), "groups": sorted(
        f"{s}:{y}:{int(((source[tr] == s) & (y_all[tr] == y)).sum())}" for s, y in groups),
        "threads": torch.get_num_threads(), "start": start}) + "\n")
    t0 = time.time()
    log = open(out / "loss.csv", "a", newline="")  # noqa: SIM115 - open across the training loop, closed after it
    writer = csv.writer(log)
    model.train()
    for step in range(start, args.steps):
        idx = tr[rng.choice(len(tr), size=args.batch_size, p=weights)]
        x, m = augment(x_all[idx], m_all[idx], args.size, gen)
        target = torch.from_numpy(y_all[idx]).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(standardize(x, m))
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        writer.writerow([step + 1, f"{loss.item():.5f}"])
        if (step + 1) % args.validate_every == 0 or step + 1 == args.steps:
            scores = predict(model, x_all[va], m_all[va], args.size)
            per = {s: auroc(scores[source[va] == s], y_all[va][source[va] == s]) for s in sorted(set(source[va]))}
            mean = float(np.nanmean(list(per.values())))
            history.append({"step": step + 1, "val_auroc": per, "mean": mean})
            if mean > best:
                best, best_state = mean, {k: v.clone() for k, v in model.state_dict().items()}
            sys.stderr.write(f"\rstep {step + 1}/{args.steps} loss {loss.item():.3f} val {json.dumps(per)} "
                             f"{(time.time() - t0) / 60:.1f} min\n")
            log.flush()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "rng": rng, "step": step + 1, "best": best,
                        "best_state": best_state, "history": history}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    log.close()
    assert best_state is not None
    model.load_state_dict(best_state)
    training = {"data": args.data, "positive": sorted(pos), "negative": sorted(neg), "steps": args.steps,
                "batch_size": args.batch_size, "learning_rate": args.learning_rate, "seed": args.seed,
                "segmenter": seg.info.record(), "wall_min": round((time.time() - t0) / 60, 2),
                "torch": torch.__version__, "history": history}
    h = save_classifier(out, model, size=args.size, name=args.name,
                        metrics={"best_val_mean_auroc": best}, training=training)
    sys.stderr.write(f"lesions done: best mean val AUROC {best:.3f}, hash {h[:12]}\n")
    return 0
