"""`vald-md train lungs`: train the lung-field segmenter (``app.lungs.LungUNet``) on the project's lung masks.

One readable file, ``parse_args(argv)`` -> ``main(args)``. Data: pairs of image and lung mask (non-zero = lung)
from one or more folders laid out as ``images/`` + ``masks/`` (V7 Labs) or the COVID-QU-Ex tree (``images/`` +
``lung masks/`` below any depth). Each source is split by a stable hash of the file name into train and held-out
parts (``--holdout-fraction``); sources named with ``--external`` are never trained on and give the
other-source Dice. Strong augmentation on every batch (affine, flips, gamma/contrast, blur, noise, burned-in
"marker" rectangles, black letterbox bands) because there are few masks (57 + 12).

Writes OUT/segmenter.json + OUT/model.safetensors (the folder ``app.lungs.LungSegmenter`` loads), OUT/loss.csv,
and checkpoints OUT/checkpoint.pt every ``--checkpoint-every`` steps (``--resume`` continues from it).
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

from app.lungs import (  # the pairs and their Dice live with the segmenter (vald-md evaluate lungs reads them too)
    LungSegmenter,
    LungUNet,
    MaskPair,
    evaluate_dice,
    find_pairs,
    is_holdout,
    normalize_intensity,
    resize_float,
    save_segmenter,
)
from app.train.schedule import warmup_cosine_to_zero


def load_pair(pair: MaskPair, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) resized to ``size`` x ``size``: float32 normalised image in [0, 1], float32 mask in {0, 1}."""
    with Image.open(pair.image) as im:
        img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    with Image.open(pair.mask) as im:
        m = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    x = normalize_intensity(resize_float(img, size, size))
    y = (resize_float(m, size, size) >= 0.5).astype(np.float32)
    return x, y


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random geometric and photometric augmentation of a batch (N, 1, S, S) of images and masks."""
    n, _, s, _ = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen)

    # 1. affine: rotation +-12 deg, isotropic scale 0.8-1.2 with +-10 % anisotropy, shift +-10 %, horizontal flip
    ang = u(-12, 12) * math.pi / 180
    scale = u(0.8, 1.2)
    sx, sy = scale * u(0.9, 1.1), scale * u(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sx * flip, -torch.sin(ang) / sx
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sy * flip, torch.cos(ang) / sy
    theta[:, :, 2] = u(-0.2, 0.2, n, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    # 2. photometric: gamma 0.6-1.7, contrast 0.7-1.3 about the mean, brightness +-0.1
    x = x.clamp(0, 1) ** u(0.6, 1.7)[:, None, None, None]
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * u(0.7, 1.3)[:, None, None, None] + mean + u(-0.1, 0.1)[:, None, None, None]
    # 3. blur (half the images) and noise
    blur = torch.rand(n, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        kern = (k[:, None] * k[None, :])[None, None]
        x[blur] = F.conv2d(F.pad(x[blur], (2, 2, 2, 2), mode="replicate"), kern)
    x = x + torch.randn(x.shape, generator=gen) * u(0.0, 0.04)[:, None, None, None]
    # 4. burned-in markers: up to 3 bright or dark rectangles anywhere (the mask is unchanged)
    for i in range(n):
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            h, w = (int(v) for v in torch.randint(3, s // 6, (2,), generator=gen))
            r, c = (int(v) for v in torch.randint(0, s - max(h, w), (2,), generator=gen))
            x[i, :, r : r + h, c : c + w] = float(torch.rand(1, generator=gen) > 0.3)
    # 5. letterbox bands: black bars on two opposite sides (a third of the batch)
    for i in range(n):
        if float(torch.rand(1, generator=gen)) < 0.33:
            b = int(torch.randint(2, s // 6, (1,), generator=gen))
            if float(torch.rand(1, generator=gen)) < 0.5:
                x[i, :, :b], x[i, :, -b:] = 0.0, 0.0
                y[i, :, :b], y[i, :, -b:] = 0.0, 0.0
            else:
                x[i, :, :, :b], x[i, :, :, -b:] = 0.0, 0.0
                y[i, :, :, :b], y[i, :, :, -b:] = 0.0, 0.0
    return x.clamp(0, 1), y


def dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the batch."""
    p = torch.sigmoid(logits)
    inter = (p * y).sum(dim=(1, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)) + 1)).mean()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments of ``vald-md train lungs``."""
    p = argparse.ArgumentParser(prog="vald-md train lungs", description="train the lung-field segmenter")
    p.add_argument("--data", action="append", required=True,
                   help="mask folder to train on (held-out part split off); repeat for more sources")
    p.add_argument("--external", action="append", default=[],
                   help="mask folder never trained on: the other-source Dice; repeatable")
    p.add_argument("--output-dir", required=True, help="segmenter folder to write (checkpoints go inside)")
    p.add_argument("--name", default="lungs-unet", help="name written into segmenter.json (default lungs-unet)")
    p.add_argument("--size", type=int, default=128, help="input side in pixels, divisible by 8 (default 128)")
    p.add_argument("--channels", default="16,32,64,128", help="channels per U-Net level (default 16,32,64,128)")
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps (default 2500)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="peak AdamW rate, cosine decay (default 2e-3)")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of each --data source held out for Dice, by file-name hash (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and augmentation (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    args = p.parse_args(argv)
    if args.size % 8:
        p.error(f"--size {args.size} must be divisible by 8")
    if not 0.0 <= args.holdout_fraction < 1.0:
        p.error(f"--holdout-fraction {args.holdout_fraction} must be in [0, 1)")
    return args


def main(args: argparse.Namespace) -> int:
    """Train, checkpoint, write the segmenter folder with its held-out and external Dice; returns 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs: list[MaskPair] = []
    holdout: list[MaskPair] = []
    for folder in args.data:
        for pair in find_pairs(Path(folder)):
            (holdout if is_holdout(pair, args.holdout_fraction) else train_pairs).append(pair)
    external = [pair for folder in args.external for pair in find_pairs(Path(folder))]
    channels = tuple(int(c) for c in args.channels.split(","))
    loaded = [load_pair(p, args.size) for p in train_pairs]
    xs = torch.from_numpy(np.stack([a for a, _ in loaded]))[:, None]
    ys = torch.from_numpy(np.stack([b for _, b in loaded]))[:, None]
    model = LungUNet(channels)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_zero(args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    start = 0
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        start = int(st["step"])
    sys.stderr.write(json.dumps({"mode": "lungs", "train": len(train_pairs), "holdout": len(holdout),
                                 "external": len(external), "params_M": sum(p.numel() for p in model.parameters())
                                 / 1e6, "threads": torch.get_num_threads(), "start": start}) + "\n")
    t0 = time.time()
    log = open(out / "loss.csv", "a", newline="")  # noqa: SIM115 - open across the training loop, closed after it
    writer = csv.writer(log)
    model.train()
    for step in range(start, args.steps):
        idx = torch.randint(0, len(xs), (args.batch_size,), generator=gen)
        x, y = augment(xs[idx].clone(), ys[idx].clone(), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        writer.writerow([step + 1, f"{loss.item():.5f}"])
        if (step + 1) % 50 == 0:
            rate = (time.time() - t0) / (step + 1 - start)
            sys.stderr.write(f"\rstep {step + 1}/{args.steps} loss {loss.item():.4f} "
                             f"eta {(args.steps - step - 1) * rate / 60:.1f} min")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            log.flush()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step + 1}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    log.close()
    model.eval()
    training = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "seed": args.seed, "size": args.size, "holdout_fraction": args.holdout_fraction,
                "train_images": len(train_pairs), "sources": [str(d) for d in args.data],
                "external": [str(d) for d in args.external], "wall_min": round((time.time() - t0) / 60, 2),
                "torch": torch.__version__}
    save_segmenter(out, model, size=args.size, name=args.name, metrics={}, training=training)
    seg = LungSegmenter(out)
    metrics = {"dice": {"holdout": evaluate_dice(seg, holdout), "external": evaluate_dice(seg, external)}}
    save_segmenter(out, model, size=args.size, name=args.name, metrics=metrics, training=training)
    summary = {k: {kk: v[kk] for kk in ("mean", "min", "n")} for k, v in metrics["dice"].items()}
    sys.stderr.write(f"\nlungs done: {json.dumps(summary)}\n")
    return 0
