"""``vald-md train vae`` and ``vae-decoder``: stage 1 and 1b of the from-scratch recipe (the autoencoder).

* ``vae``         -- train a 1-channel ``AutoencoderKL`` (8x down-sampling, 4 latent channels) on random crops,
                     then on whole images (``[vae]`` of the config).
* ``vae-decoder`` -- fine-tune only the decoder of a stage-1 autoencoder with L1 + SSIM loss (``[vae_decoder]``);
                     the encoder is frozen, so the latents and a UNet trained on them stay valid.
                     ``--model M --package OUT`` writes M with the sharper decoder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.provenance import library_versions
from app.train.common import (
    LossLog,
    Progress,
    banner,
    git_revision,
    load_gray,
    out_of_time,
    read_labels,
    restore_scratch,
    resume_state,
    save_checkpoint,
    to_model_range,
)
from app.train.config import TrainConfig, VaeDecoderSection, VaeSection
from app.train.schedule import warmup_cosine_to_floor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of two batches in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def build_vae(section: VaeSection, image_size: int) -> Any:
    """A 1-channel ``AutoencoderKL`` (diffusers) with 2^(levels-1) down-sampling from the ``[vae]`` table.

    Args:
        section: the ``[vae]`` table; 4 ``block_out_channels`` = 8x down-sampling.
        image_size: training image side in pixels (recorded as ``sample_size``).
    """
    from diffusers import AutoencoderKL

    n = len(section.block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(section.block_out_channels),
        layers_per_block=section.layers_per_block,
        latent_channels=section.latent_channels,
        norm_num_groups=section.norm_num_groups,
        sample_size=image_size,
    )


def train_vae(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Stage 1 (see module docstring). Writes ``OUT/vae-best`` (best validation PSNR) and ``OUT/vae-last``.

    Args:
        args: parsed ``vald-md train vae`` arguments.
        cfg: the checked config; needs ``[data]`` and ``[vae]``.

    Returns:
        0 (the process exit code).
    """
    assert cfg.data is not None and cfg.vae is not None  # load_config(needs=...) checked
    vae = build_vae(cfg.vae, cfg.data.image_size)
    return _autoencoder_loop(args, cfg.data.image_size, vae, cfg.vae)


def train_vae_decoder(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Stage 1b: fine-tune only the decoder of a trained autoencoder (``--vae``) for sharper reconstructions.

    The encoder (and ``quant_conv``) stay frozen, so the latents -- and a UNet already trained on them -- stay
    valid; only ``decoder`` and ``post_quant_conv`` learn, on random crops (``crop_size`` px), with L1 plus
    ``ssim_weight`` x (1 - SSIM) (as Stable Diffusion's ft-MSE decoder was made from its original autoencoder).
    Writes ``OUT/vae-best`` (best validation SSIM) and ``OUT/vae-last``; with ``--model M --package P`` it
    also writes model folder P: M with its autoencoder replaced (scaling factor kept) and the manifest extended.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).float()
    assert cfg.data is not None and cfg.vae_decoder is not None  # load_config(needs=...) checked
    rc = _autoencoder_loop(args, cfg.data.image_size, vae, cfg.vae_decoder)
    if rc == 0 and args.package:
        package_with_decoder(Path(args.model), Path(args.output_dir) / "vae-best", Path(args.package), args, cfg)
    return rc


def _autoencoder_loop(args: argparse.Namespace, size: int, vae: Any, section: VaeSection | VaeDecoderSection) -> int:
    """The shared optimisation loop of stages 1 (``section`` a ``[vae]`` table) and 1b (``[vae_decoder]``).

    Images are ``size`` px squares; stage 1b trains the decoder only, with L1 + ``ssim_weight`` x (1 - SSIM). The model
    with the best validation figure (PSNR in dB for stage 1, SSIM for stage 1b; 32 val images, posterior mode)
    is saved to ``OUT/vae-best``.
    """
    from app import metrics

    decoder_only = isinstance(section, VaeDecoderSection)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = read_labels(Path(args.data), "train")
    val_rows = read_labels(Path(args.data), "val")
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    train = load_gray([r.path for r in train_rows], size)
    val_idx = rng.choice(len(val_rows), size=min(32, len(val_rows)), replace=False)
    val = to_model_range(load_gray([val_rows[i].path for i in sorted(val_idx)], size))

    if decoder_only:
        for p in vae.parameters():
            p.requires_grad_(False)
        params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=section.lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = args.max_steps or section.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_floor(section.warmup_steps, total))
    start, best, elapsed0 = 0, -math.inf, 0.0
    st = resume_state(out, args.resume)
    if st is not None:
        start, best, elapsed0, rng = restore_scratch(st, vae, opt, sched)
    mode = "vae-decoder" if decoder_only else "vae"
    banner(mode, args, {"trainable_params_M": sum(p.numel() for p in params) / 1e6, "start": start,
                        "total": total, "train_images": len(train)})
    log, prog, t0 = LossLog(out), Progress(start, total), time.time()
    if decoder_only and st is None:  # the starting decoder is the one to beat
        v_psnr, v_ssim = validate_autoencoder(vae, val)
        best = v_ssim
        vae.save_pretrained(out / "vae-best")
        log.row(0, float("nan"), 0.0, 0.0, "val_ssim", f"{v_ssim:.4f}")
        sys.stderr.write(f"[val] step 0 (the starting autoencoder): PSNR {v_psnr:.3f} dB, SSIM {v_ssim:.4f}\n")
    crop = section.crop_size
    whole_from = total - (section.whole_image_steps if isinstance(section, VaeSection) else 0)
    val_name = "val_ssim" if decoder_only else "val_psnr_db"
    vae.train()
    for step in range(start, total):
        if step < whole_from:
            idx = rng.integers(0, len(train), section.batch_size)
            ys = rng.integers(0, size - crop + 1, len(idx))
            xs = rng.integers(0, size - crop + 1, len(idx))
            b = np.stack([train[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs, strict=True)])
        else:
            assert isinstance(section, VaeSection)  # whole_from == total for stage 1b
            b = train[rng.integers(0, len(train), section.whole_image_batch)]
        flip = rng.random(len(b)) < 0.5
        b = np.where(flip[:, None, None], b[:, :, ::-1], b)
        x = to_model_range(np.ascontiguousarray(b))
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        if isinstance(section, VaeDecoderSection):
            ssim = metrics.ssim_batch(rec.clamp(-1, 1), x, data_range=2.0).mean()
            loss = F.l1_loss(rec, x) + section.ssim_weight * (1 - ssim)
        else:
            loss = F.l1_loss(rec, x) + section.kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        prog(step, loss_value)
        elapsed = elapsed0 + time.time() - t0
        last = step + 1 == total or out_of_time(args, t0)
        shown, val_value = "", ""
        if (step + 1) % section.validate_every == 0 or last:
            v_psnr, v_ssim = validate_autoencoder(vae, val)
            vae.train()
            value = v_ssim if decoder_only else v_psnr
            shown, val_value = val_name, f"{value:.4f}"
            if value > best:
                best = value
                vae.save_pretrained(out / "vae-best")
            sys.stderr.write(f"\n[val] step {step + 1}: PSNR {v_psnr:.3f} dB, SSIM {v_ssim:.4f} "
                             f"(best {val_name} {best:.4f})\n")
        log.row(step + 1, loss_value, float(sched.get_last_lr()[0]), elapsed, shown, val_value)
        if (step + 1) % section.checkpoint_every == 0 or last:
            save_checkpoint(out, step + 1, {"model": vae.state_dict(), "opt": opt.state_dict(),
                                            "sched": sched.state_dict(), "step": step + 1, "best": best,
                                            "elapsed": elapsed, "np_rng": rng, "torch_rng": torch.get_rng_state()})
            log.plot()
        if last:
            break
    vae.save_pretrained(out / "vae-last")
    log.plot()
    sys.stderr.write(f"\n{mode} done: best {val_name} {best:.4f}, wall {(elapsed0 + time.time() - t0) / 60:.1f} min\n")
    return 0


@torch.no_grad()
def validate_autoencoder(vae: Any, val: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB, peak-to-peak 2) and SSIM of posterior-mode reconstructions of ``val`` ((N, 1, H, W), [-1, 1])."""
    from app import metrics

    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(val[i : i + 8]).latent_dist.mode()).sample
                     for i in range(0, len(val), 8)]).clamp(-1, 1)
    return psnr(rec, val), float(metrics.ssim_batch(rec, val, data_range=2.0).mean())


def package_with_decoder(model: Path, vae_dir: Path, out: Path, args: argparse.Namespace,
                         cfg: TrainConfig) -> str:
    """Write model folder ``out``: ``model`` with the fine-tuned decoder of ``vae_dir``; returns the new hash.

    Every other component (UNet, text encoder, tokenizer, scheduler) is copied byte for byte; only ``vae/`` is
    rewritten, in the dtype ``model`` stores its autoencoder in, with its scaling factor. Refuses when the encoders
    differ (the UNet of ``model`` was trained on that encoder's latents).
    """
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from app.modelfolder import MANIFEST, finish_model_folder, staging_folder

    stored = sorted((model / "vae").glob("*.safetensors"))
    with safe_open(str(stored[0]), "pt") as fh:
        dtype = fh.get_tensor(next(iter(fh.keys()))).dtype  # the dtype the model folder stores (fp16 here)
    base = AutoencoderKL.from_pretrained(model / "vae").float()
    tuned = AutoencoderKL.from_pretrained(vae_dir).float()
    old, new = base.state_dict(), tuned.state_dict()
    enc = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    if any(not torch.allclose(old[k], new[k].to(dtype).float(), atol=1e-3) for k in enc):
        raise ValueError(f"{vae_dir} has a different encoder from {model}/vae: its latents would not match the UNet")
    base.load_state_dict({**old, **{k: v for k, v in new.items() if k.startswith(("decoder.", "post_quant_conv."))}})
    base.to(dtype)
    base.register_to_config(_name_or_path="vae")  # not the source folder's path: it would enter the model hash
    manifest = json.loads((model / MANIFEST).read_text())
    manifest.pop("model_hash", None)
    manifest["name"] = out.name
    with open(Path(args.output_dir) / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = [float(r["val_value"]) for r in rows if r["val_name"] == "val_ssim"]
    this_round = {
        "from_vae": str(args.vae), "config": cfg.raw["vae_decoder"], "git_revision": git_revision(),
        "steps": int(rows[-1]["step"]), "wall_min": round(float(rows[-1]["elapsed_s"]) / 60, 1),
        "best_val_ssim": max(val) if val else None, "loss_csv": str(Path(args.output_dir) / "loss.csv")}
    training = manifest.setdefault("training", {})
    earlier = training.get("vae_decoder")  # a decoder fine-tuned before: keep its rounds, in order
    earlier = [] if earlier is None else earlier if isinstance(earlier, list) else [earlier]
    training["vae_decoder"] = [*earlier, this_round] if earlier else this_round
    manifest["library_versions"] = library_versions()
    tmp = staging_folder(out)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("vae", MANIFEST, "*.md"))
    base.save_pretrained(tmp / "vae", safe_serialization=True)
    digest = finish_model_folder(tmp, out, manifest)
    sys.stderr.write(f"model folder written to {out} (hash {digest[:12]})\n")
    return digest
