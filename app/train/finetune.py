"""`vald-md train lesion-finetune`: fine-tune a model folder's UNet against the shortcuts of mixed-source data.

One readable file, ``parse_args(argv)`` -> ``main(args)``. The recipe, each step measured with
``vald-md evaluate probe`` (docs/EVALUATION.md):

1. **Same-source data beside the mixed one.** Several labelled CSVs (``--data``, repeatable), e.g.
   ``nih256/labels.csv`` (no_finding vs pneumonia, one hospital) and ``cxr256/labels.csv`` (covid vs normal);
   labels outside ``[prompts]`` of the config are skipped (viral_pneumonia: mostly paediatric, an age shortcut).
2. **Balanced sampling** over (source, label) groups, so neither a source nor a class dominates a batch.
3. **Markers erased.** Burned-in markers (small bright components outside the lungs,
   ``app.lungs.marker_mask``) are painted over with the image's median before encoding, so no prompt can be
   tied to them.
4. **Anatomy-weighted loss.** The noise-prediction loss of every latent pixel is weighted by
   ``outside + (1 - outside) x lung share`` of its 8 x 8 block (lung masks of the project's segmenter), so the
   model spends its capacity, and the prompt its effect, on the lungs (``--outside-weight``, default 0.2).
5. bf16 autocast on the CPU (AMX), EMA weights, min-SNR weighting, caption dropout (classifier-free guidance).
6. Optionally (``--attention-32``) cross-attention at the top latent level (32 x 32 at 256 px) too, where the
   starting UNet has plain blocks: the new transformer blocks start as the identity (zero output projection), so
   training starts from the starting model's exact predictions (``with_top_attention``).

Resumable (``--resume latest``, checkpoints under OUT/checkpoints, ``--max-minutes`` to stop cleanly).
``--package DIR`` writes DIR: the starting model folder copied byte for byte with its UNet replaced by the EMA
weights of the last validation, and the manifest extended with this run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.datasets import RASTER_SUFFIXES, LabelledImage, read_labelled
from app.lungs import LungSegmenter, marker_mask
from app.train.config import load_config


def read_sources(csvs: list[str], split: str, prompts: dict[str, Any]) -> list[tuple[LabelledImage, str]]:
    """(row, source) of every row of ``split`` whose label has prompts; source = the CSV's folder name."""
    rows = []
    for c in csvs:
        for r in read_labelled(Path(c), split, RASTER_SUFFIXES)[1]:
            if r.label in prompts:
                rows.append((r, Path(c).parent.name))
    return rows


def prepare_images(rows: list[tuple[LabelledImage, str]], seg: LungSegmenter, size: int, erase_markers: bool,
                   factor: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, size, size) with markers erased, and float32 lung shares per ``factor`` x ``factor`` block
    (the autoencoder's down-sampling): (N, size/factor, size/factor)."""
    from app.train.common import load_gray

    imgs = load_gray([r.path for r, _ in rows], size)
    k = size // factor
    shares = np.empty((len(rows), k, k), np.float32)
    t0 = time.time()
    for i in range(len(rows)):
        x = imgs[i].astype(np.float32) / 255.0
        lungs = seg.segment(x)
        if erase_markers:
            mk = marker_mask(x, lungs)
            if mk.any():
                imgs[i][mk] = np.uint8(np.median(imgs[i]))
        shares[i] = lungs.reshape(k, factor, k, factor).mean(axis=(1, 3))
        if (i + 1) % 250 == 0:
            sys.stderr.write(f"\rsegmenting {i + 1}/{len(rows)} {time.time() - t0:.0f} s")
    return imgs, shares


def with_top_attention(unet: Any) -> Any:
    """``unet`` (a diffusers ``UNet2DConditionModel``) rebuilt with cross-attention blocks at its top latent level.

    The first down block and the last up block become ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``; every
    existing weight is copied, and the new transformers' ``proj_out`` is zeroed so that each is the identity (their
    residual adds nothing): the returned model predicts exactly what ``unet`` predicts until it is trained.
    Returns ``unet`` itself when its top level already has attention.
    """
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if down[0].startswith("CrossAttn") and up[-1].startswith("CrossAttn"):
        return unet
    cfg["down_block_types"] = ["CrossAttnDownBlock2D", *down[1:]]
    cfg["up_block_types"] = [*up[:-1], "CrossAttnUpBlock2D"]
    new = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    new_keys = ("down_blocks.0.attentions.", f"up_blocks.{len(up) - 1}.attentions.")
    if unexpected or any(not k.startswith(new_keys) for k in missing):
        raise RuntimeError(f"top attention: unexpected weights {unexpected[:3]} / missing {missing[:3]}")
    with torch.no_grad():
        for block in (new.down_blocks[0], new.up_blocks[-1]):
            for attn in block.attentions:
                attn.proj_out.weight.zero_()
                attn.proj_out.bias.zero_()
    dtype = next(unet.parameters()).dtype
    return new if dtype == torch.float32 else new.to(dtype)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments of ``vald-md train lesion-finetune``."""
    p = argparse.ArgumentParser(prog="vald-md train lesion-finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="starting model folder (e.g. model_weights/vald-md-mini)")
    p.add_argument("--data", action="append", required=True, help="labelled CSV (path,split,label); repeatable")
    p.add_argument("--config", required=True, help="TOML with [finetune] and [prompts] (configs/vald-md-lesion.toml)")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, loss.csv, unet-best")
    p.add_argument("--segmenter", default=None, help="lung segmenter folder (default: model_weights/lungs-unet)")
    p.add_argument("--outside-weight", type=float, default=None,
                   help="loss weight of latent pixels outside the lungs, 0..1 (default: the config's)")
    p.add_argument("--no-erase-markers", dest="erase_markers", action="store_false",
                   help="keep burned-in markers in the training images")
    p.add_argument("--attention-32", dest="attention_32", action="store_true",
                   help="add cross-attention at the top latent level (32 x 32 at 256 px) before training")
    p.add_argument("--max-steps", type=int, default=None, help="override the configured number of steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop this invocation after N minutes")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint file")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--package", default=None, help="write the fine-tuned model folder here at the end")
    args = p.parse_args(argv)
    if args.outside_weight is not None and not 0.0 <= args.outside_weight <= 1.0:
        p.error(f"--outside-weight {args.outside_weight} must be within [0, 1]")
    return args


def main(args: argparse.Namespace) -> int:
    """Fine-tune (see the module docstring); returns 0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from app.modelfolder import model_hash
    from app.train.common import (
        LossLog,
        Progress,
        all_captions,
        banner,
        caption_for,
        ema_weights,
        encode_prompt_embeddings,
        out_of_time,
        save_unet_checkpoint,
        unet_optimisation,
        unet_step,
    )
    from app.train.unet import encode_latents, min_snr_weights, sd_noise_scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, needs=("finetune", "prompts"))
    assert cfg.finetune is not None  # load_config checked
    fcfg, prompts = cfg.finetune, cfg.prompts
    outside = args.outside_weight if args.outside_weight is not None else fcfg.outside_weight
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    size = fcfg.image_size
    rows = read_sources(args.data, "train", prompts)
    val_rows = read_sources(args.data, "val", prompts)
    vae = AutoencoderKL.from_pretrained(model / "vae").float().eval()
    vae.requires_grad_(False)
    sf = float(vae.config.scaling_factor)
    # 1. images with markers erased, lung shares, latents: computed once and cached
    cache = out / "latents.pt"
    if cache.exists():
        lat = torch.load(cache, weights_only=False)
    else:
        t_encode = time.time()
        seg = LungSegmenter(args.segmenter)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        imgs, shares = prepare_images(rows, seg, size, args.erase_markers, factor)
        mean, std = encode_latents(vae, imgs)
        vidx = sorted(rng.choice(len(val_rows), size=min(64, len(val_rows)), replace=False).tolist())
        vimgs, vshares = prepare_images([val_rows[i] for i in vidx], seg, size, args.erase_markers, factor)
        vmean, _ = encode_latents(vae, vimgs)
        lat = {"mean": mean, "std": std, "shares": torch.from_numpy(shares), "val_mean": vmean,
               "val_shares": torch.from_numpy(vshares), "val_idx": vidx, "encode_s": time.time() - t_encode,
               "segmenter": seg.info.record()}
        torch.save(lat, cache)
    # 2. prompt embeddings with the model's own frozen text encoder (a handful of prompts)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = AutoModel.from_pretrained(model / "text_encoder").eval()
    as_rows = [r for r, _ in rows]
    captions = sorted(all_captions(as_rows, prompts) | {""})
    emb = {c: encode_prompt_embeddings(tokenizer, text_encoder, [c])[0] for c in captions}
    # 3. balanced sampling weights over (source, label)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (r, src) in enumerate(rows):
        groups.setdefault((src, r.label), []).append(i)
    weights = np.zeros(len(rows))
    for members in groups.values():
        weights[members] = 1.0 / (len(groups) * len(members))
    # 4. model, optimiser, EMA
    unet = UNet2DConditionModel.from_pretrained(model / "unet").float()
    if args.attention_32:
        unet = with_top_attention(unet)
    noise_sched = sd_noise_scheduler()
    total = args.max_steps or fcfg.steps
    o = unet_optimisation(unet, lr=fcfg.lr, warmup_steps=fcfg.warmup_steps, total=total, ema_decay=fcfg.ema_decay,
                          out=out, resume=args.resume, rng=rng)
    opt, sched, ema, start, best, elapsed0, rng = o.opt, o.sched, o.ema, o.start, o.best, o.elapsed, o.rng
    banner("lesion-finetune", args, {"start": start, "total": total, "groups": {f"{s}/{lab}": len(v)
                                     for (s, lab), v in sorted(groups.items())}, "outside_weight": outside,
                                     "unet_params": sum(p.numel() for p in unet.parameters())})
    g = torch.Generator().manual_seed(1234)
    v_lat = lat["val_mean"] * sf
    v_noise = torch.randn(v_lat.shape, generator=g)
    v_t = torch.randint(0, 1000, (len(v_lat),), generator=g)
    v_cond = torch.stack([emb.get(caption_for(val_rows[i][0], prompts, np.random.default_rng(0)), emb[""])
                          for i in lat["val_idx"]])

    def weight_map(shares: torch.Tensor) -> torch.Tensor:
        w = outside + (1 - outside) * shares[:, None]
        return w / w.mean(dim=(1, 2, 3), keepdim=True)

    log, prog, t0 = LossLog(out), Progress(start, total), time.time()
    unet.train()
    for step in range(start, total):
        idx = rng.choice(len(rows), size=fcfg.batch_size, p=weights)
        z = (lat["mean"][idx] + lat["std"][idx] * torch.randn_like(lat["mean"][idx])) * sf
        caps = ["" if rng.random() < fcfg.caption_dropout
                else caption_for(as_rows[i], prompts, rng) for i in idx]
        cond = torch.stack([emb[c] for c in caps])
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        per = (F.mse_loss(pred.float(), noise, reduction="none") * weight_map(lat["shares"][idx])).mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(noise_sched, t)).mean()
        unet_step(unet, loss, opt, sched, ema)
        prog(step, loss.item())
        elapsed = elapsed0 + time.time() - t0
        last = step + 1 == total or out_of_time(args, t0)
        val_name, val_value = "", ""
        if (step + 1) % fcfg.validate_every == 0 or last:
            with ema_weights(unet, ema):
                vl = [float((F.mse_loss(unet(noise_sched.add_noise(v_lat[i:i + 16], v_noise[i:i + 16],
                                                                   v_t[i:i + 16]), v_t[i:i + 16],
                                             encoder_hidden_states=v_cond[i:i + 16]).sample, v_noise[i:i + 16],
                                        reduction="none") * weight_map(lat["val_shares"][i:i + 16])).mean())
                      for i in range(0, len(v_lat), 16)]
                val_name, val_value = "val_weighted_eps_mse_ema", f"{float(np.mean(vl)):.5f}"
                best = min(best, float(val_value))
                unet.save_pretrained(out / f"unet-step{step + 1:06d}")  # every validated EMA state: the probe chooses
            sys.stderr.write(f"\n[val] step {step + 1}: weighted EMA eps-MSE {val_value}\n")
        log.row(step + 1, loss.item(), float(sched.get_last_lr()[0]), elapsed, val_name, val_value)
        if (step + 1) % fcfg.checkpoint_every == 0 or last:
            save_unet_checkpoint(out, step + 1, unet, opt, sched, ema, best=best, elapsed=elapsed, rng=rng)
            log.plot()
        if last:
            break
    wall = elapsed0 + time.time() - t0
    sys.stderr.write(f"\nlesion-finetune done: wall {wall / 60:.1f} min\n")
    if args.package:
        chosen = sorted(out.glob("unet-step*"))[-1]
        package(model, chosen, Path(args.package), {
            "mode": "lesion-finetune", "from": model_hash(model), "unet": chosen.name,
            "wall_min": round(wall / 60, 1), "args": vars(args), "config": cfg.raw,
            "segmenter": lat.get("segmenter"), "groups": {f"{s}/{lab}": len(v) for (s, lab), v in groups.items()}},
            prompts)
    return 0


def package(model: Path, unet_dir: Path, out: Path, record: dict[str, Any], prompts: dict[str, Any]) -> str:
    """Write ``out``: ``model`` copied byte for byte with ``unet/`` replaced by ``unet_dir`` in fp16 (its config's
    ``_name_or_path`` set to ``unet``, so that the hash does not depend on where the UNet was trained); the manifest
    gets the fine-tuning record and the new class prompts. Returns the new model hash."""
    from diffusers import UNet2DConditionModel

    from app.modelfolder import MANIFEST, finish_model_folder, staging_folder

    tmp = staging_folder(out)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("MODEL_CARD.md"))
    shutil.rmtree(tmp / "unet")
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    unet.register_to_config(_name_or_path="unet")  # not the training folder's path: it would enter the model hash
    unet.to(torch.float16).save_pretrained(tmp / "unet")
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest.pop("model_hash", None)
    manifest.pop("figures", None)
    manifest["name"] = out.name
    manifest.setdefault("history", []).append(manifest.pop("training", None))
    manifest["training"] = record
    manifest["class_prompts"] = {**manifest.get("class_prompts", {}),
                                 **{k: (v[0] if isinstance(v, list) else v) for k, v in prompts.items()}}
    return finish_model_folder(tmp, out, manifest)
