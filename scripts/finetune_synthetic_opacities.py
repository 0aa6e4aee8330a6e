"""Fine-tune a model's UNet to redraw synthetic lung opacities as healthy lung (issue 16; docs/EVALUATION.md,
eighth round).

The map is the density the model's healthy redraws remove; on dense opacities they removed less than was there.
This recipe teaches the removal on healthy images the model already knows: each healthy training image is taken
once as it is and once with one or two synthetic opacities pasted inside its lungs (found by the project's lung
segmenter): soft ellipses, radii 12-40 px at 256 px, edges blurred by 4-10 px, clipped to the lungs, with a
low-frequency texture, brightening a pixel ``x`` (in [0, 1]) by ``a * (0.95 - x)`` with ``a`` drawn from 0.15-0.45.
Both versions are encoded once with the model's autoencoder (posterior means, scaled). Half of every batch is an
image with opacities noised at a timestep ``t >= --t-min`` whose target is the *healthy* latent ``z0`` (epsilon
target ``(x_t - sqrt(abar_t) z0) / sqrt(1 - abar_t)``: the clean latent the UNet implies is the healthy one); the
other half is the plain healthy image with the usual epsilon loss. The prompt is always the model's healthy one
("normal chest x-ray"); min-SNR-5 weights, AdamW, warm-up then cosine, EMA, bf16 autocast on the CPU.

Every ``--save-every`` steps the EMA UNet is written as ``OUT/unet-stepXXXXXX`` (the localization probe chooses
among them, not the loss) and a resumable checkpoint as ``OUT/checkpoints/`` (``--resume latest``); the encoded
latents are cached as ``OUT/latents.pt``. ``--package DIR`` writes a complete model folder from the last EMA UNet
(``app.train.finetune.package``).

Measured (2026-12-08, 2-core Intel Xeon with AMX, 2 threads): 978 images (700 of cxr256's training normals, all
278 of nih256's training ``no_finding``) encoded in 12 min under load; 900 steps at lr 1e-4 in 16.6 min. On the
localization probe's development set: pixel AUROC in the lungs 0.758 vs 0.734 for vald-md-mini (paired +0.024
[+0.011, +0.036]); at lr 5e-5 and 600 steps +0.003.

Usage:
    OMP_NUM_THREADS=2 python scripts/finetune_synthetic_opacities.py --model model_weights/vald-md-mini \
        --data ../shared/data/cxr256/labels.csv --data ../shared/data/nih256/labels.csv \
        --max-per-source 700 --steps 900 --lr 1e-4 --threads 2 --output-dir runs/ft-opacities \
        [--resume latest] [--package runs/vald-md-mini-opacities]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

HEALTHY_LABELS = ("normal", "no_finding")
"""The labels of healthy images in cxr256 (``normal``) and nih256 (``no_finding``)."""
SIZE = 256
"""Image side in px (the embedded model's frame)."""


def synthetic_opacities(x: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` float32 (SIZE, SIZE) in [0, 1] with one or two synthetic opacities inside ``lungs`` (bool, same shape);
    returned as uint8. See the module docstring for the shapes and the brightening."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    g = np.zeros((SIZE, SIZE), np.float32)
    ly, lx = np.nonzero(lungs)
    if len(ly):
        for _ in range(rng.integers(1, 3)):
            k = rng.integers(len(ly))
            cy, cx = ly[k], lx[k]
            ry, rx = rng.uniform(12, 40, 2)
            th = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(th) + dy * np.sin(th)) / rx
            v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
            g = np.maximum(g, (u * u + v * v <= 1).astype(np.float32))
    g = ndimage.gaussian_filter(g, rng.uniform(4, 10)) * ndimage.gaussian_filter(lungs.astype(np.float32), 3)
    tex = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)).astype(np.float32), 4)
    g = g * np.clip(0.75 + 0.25 * tex / (tex.std() + 1e-6), 0.3, 1.2)
    a = rng.uniform(0.15, 0.45)
    out: np.ndarray = np.clip((x + a * g * (0.95 - x).clip(0, None)) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="model_weights/vald-md-mini", help="model folder to start from")
    p.add_argument("--data", action="append", required=True,
                   help="labels CSV (path,split,label); healthy rows of its train split are used; repeatable")
    p.add_argument("--max-per-source", type=int, default=700, help="at most this many images per CSV (default 700)")
    p.add_argument("--steps", type=int, default=900, help="optimiser steps (default 900)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, half with opacities (default 16)")
    p.add_argument("--t-min", type=int, default=400, help="lowest timestep of the opacity half (default 400)")
    p.add_argument("--save-every", type=int, default=150, help="EMA UNet and checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output-dir", required=True, help="run folder (latents, EMA UNets, checkpoints)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint file in the run folder")
    p.add_argument("--package", default=None, help="write a complete model folder from the last EMA UNet here")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    import tomllib

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from app.lungs import LungSegmenter
    from app.modelfolder import model_hash
    from app.train.common import (
        ema_weights,
        encode_prompt_embeddings,
        save_unet_checkpoint,
        unet_optimisation,
        unet_step,
    )
    from app.train.finetune import package, prepare_images, read_sources
    from app.train.unet import encode_latents, min_snr_weights, sd_noise_scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    prompts = tomllib.loads((root / "configs" / "vald-md-lesion.toml").read_text())["prompts"]
    healthy_prompt = prompts["healthy"]
    out, model = Path(args.output_dir), Path(args.model)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    cache = out / "latents.pt"
    if cache.exists():
        lat = torch.load(cache)
    else:
        t0 = time.time()
        chosen = []
        for csv in args.data:
            rows = [r for r in read_sources([csv], "train", prompts) if r[0].label in HEALTHY_LABELS]
            if len(rows) > args.max_per_source:
                rows = [rows[i] for i in sorted(rng.choice(len(rows), args.max_per_source, replace=False))]
            chosen += rows
        if not chosen:
            raise SystemExit(f"no healthy ({', '.join(HEALTHY_LABELS)}) training rows in {args.data}")
        seg = LungSegmenter(None)
        imgs, _ = prepare_images(chosen, seg, SIZE, False, 8)
        with_opacities = np.stack([synthetic_opacities(x, seg.segment(x), rng)
                                   for x in (im.astype(np.float32) / 255 for im in imgs)])
        vae = AutoencoderKL.from_pretrained(model / "vae").float().eval()
        with torch.no_grad():
            healthy, _ = encode_latents(vae, imgs)
            opaque, _ = encode_latents(vae, with_opacities)
        sf = float(vae.config.scaling_factor)
        lat = {"z0": healthy * sf, "zb": opaque * sf}
        torch.save(lat, cache)
        sys.stderr.write(f"encoded {len(imgs)} images twice in {time.time() - t0:.0f} s\n")
    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = AutoModel.from_pretrained(model / "text_encoder").eval()
    cond = encode_prompt_embeddings(tok, text_encoder, [healthy_prompt])[0][None]
    unet = UNet2DConditionModel.from_pretrained(model / "unet").float()
    noise_sched = sd_noise_scheduler()
    o = unet_optimisation(unet, lr=args.lr, warmup_steps=30, total=args.steps, ema_decay=0.995, out=out,
                          resume=args.resume, rng=rng)
    opt, sched, ema, start, rng = o.opt, o.sched, o.ema, o.start, o.rng
    abar = noise_sched.alphas_cumprod
    z0, zb = lat["z0"], lat["zb"]
    n, b = len(z0), args.batch_size
    if not 2 <= b <= n:
        raise SystemExit(f"--batch-size {b}: needs 2 to {n} (the images encoded)")
    opaque_half = torch.arange(b) < b // 2
    unet.train()
    t0 = time.time()
    for step in range(start, args.steps):
        idx = torch.from_numpy(rng.choice(n, b, replace=False))
        t_plain = torch.randint(0, 1000, (b,))  # drawn first, as the committed model's run drew them
        t = torch.where(opaque_half, torch.randint(args.t_min, 1000, (b,)), t_plain)
        z_in = torch.where(opaque_half[:, None, None, None], zb[idx], z0[idx])
        noise = torch.randn_like(z_in)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z_in + (1 - a).sqrt() * noise
        target = (x_t - a.sqrt() * z0[idx]) / (1 - a).sqrt()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(x_t, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(noise_sched, t)).mean()
        unet_step(unet, loss, opt, sched, ema)
        if (step + 1) % 25 == 0:
            sys.stderr.write(f"step {step + 1}: loss {loss.item():.4f} (opacities {per[opaque_half].mean():.4f}, "
                             f"plain {per[~opaque_half].mean():.4f}) {time.time() - t0:.0f} s\n")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            with ema_weights(unet, ema):
                unet.save_pretrained(out / f"unet-step{step + 1:06d}")
            save_unet_checkpoint(out, step + 1, unet, opt, sched, ema, best=float("nan"),
                                 elapsed=time.time() - t0, rng=rng)
    if args.package:
        last = sorted(out.glob("unet-step*"))[-1]
        digest = package(model, last, Path(args.package), {
            "mode": "synthetic-opacity fine-tune (scripts/finetune_synthetic_opacities.py)",
            "from": model_hash(model), "unet": last.name, "args": vars(args)}, {"normal": prompts["normal"]})
        sys.stderr.write(f"packaged {args.package} ({digest[:12]})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
