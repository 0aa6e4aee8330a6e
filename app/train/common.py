"""What every ``vald-md train`` technique shares: data loading, checkpoints, the loss log, progress, run records.

Checkpoints are ``OUT/checkpoints/step-XXXXXX.pt`` (``torch.save`` of a dict; the newest two kept), so that
``--resume latest`` continues a run; ``loss.csv`` gets one row per step and ``loss.png`` is redrawn from it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.datasets import RASTER_SUFFIXES, LabelledImage, read_labelled

HEALTHY_PROMPT = "normal chest x-ray"


# data
def read_labels(data: Path, split: str | None = None) -> list[LabelledImage]:
    """The rows of a labelled CSV or class-folder tree (``app.datasets.read_labelled``; PNG/JPEG files only, as
    training decodes with Pillow)."""
    return read_labelled(data, split, RASTER_SUFFIXES)[1]


def load_gray(paths: list[Path], size: int) -> np.ndarray:
    """Load images as 8-bit grayscale, resized to ``size`` x ``size``. Returns uint8 (N, size, size)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as f:
            im = f.convert("L")
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



def encode_prompt_embeddings(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Token embeddings exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (no LoRA, no clip-skip),
    so that a UNet trained on embeddings cached with it sees at generation what it saw in training.

    Pads to ``tokenizer.model_max_length``; passes the attention mask only when the text encoder's config asks for
    it (``use_attention_mask``), as diffusers does. Returns float32 (len(prompts), max_length, hidden_size).
    """
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    mask = ids.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        hidden: torch.Tensor = text_encoder(ids.input_ids.to(text_encoder.device), attention_mask=mask)[0].float()
    return hidden


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



# run bookkeeping: checkpoints, loss log, progress, run records
def out_of_time(args: argparse.Namespace, t0: float) -> bool:
    """True once this invocation has run ``--max-minutes`` (the run then validates, checkpoints and stops)."""
    return bool(getattr(args, "max_minutes", None)) and (time.time() - t0) / 60 >= args.max_minutes


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


@dataclass
class UnetOptimisation:
    """A UNet stage's optimiser, LR schedule and EMA, and where the run stands (fresh or resumed).

    Attributes:
        opt: AdamW (weight decay 1e-2). sched: warm-up then cosine to ``warmup_cosine_to_floor``'s floor.
        ema: the weights' exponential moving average (warm-up power 2/3). start: the next step (0 when fresh).
        best: the best validation figure so far (inf when fresh). elapsed: seconds trained by earlier invocations.
        rng: the numpy generator to go on with (the checkpoint's when resumed, else the one given).
    """

    opt: torch.optim.Optimizer
    sched: Any
    ema: Any
    start: int
    best: float
    elapsed: float
    rng: np.random.Generator


def unet_optimisation(unet: torch.nn.Module, *, lr: float, warmup_steps: int, total: int, ema_decay: float,
                      out: Path, resume: str | None, rng: np.random.Generator) -> UnetOptimisation:
    """The optimiser, schedule and EMA of a UNet stage, restored from ``out``'s checkpoint when ``resume`` names one
    (:func:`resume_state`, :func:`restore_scratch`; :func:`save_unet_checkpoint` writes what this reads)."""
    from diffusers.training_utils import EMAModel

    from app.train.schedule import warmup_cosine_to_floor

    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_floor(warmup_steps, total))
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=2 / 3)
    start, best, elapsed = 0, float("inf"), 0.0
    st = resume_state(out, resume)
    if st is not None:
        start, best, elapsed, rng = restore_scratch(st, unet, opt, sched)
        ema.load_state_dict(st["ema"])
    return UnetOptimisation(opt, sched, ema, start, best, elapsed, rng)


def unet_step(unet: torch.nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, ema: Any) -> None:
    """One optimiser step of a UNet stage: backward, gradient norm clipped to 1.0, optimiser, LR schedule, EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.step(unet.parameters())


@contextmanager
def ema_weights(unet: torch.nn.Module, ema: Any) -> Iterator[None]:
    """Validate with the EMA weights: ``unet`` holds them (in eval mode) inside the block, its own after it."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        ema.restore(unet.parameters())
        unet.train()


def save_unet_checkpoint(out: Path, step: int, unet: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                         ema: Any, *, best: float, elapsed: float, rng: np.random.Generator) -> None:
    """:func:`save_checkpoint` of a UNet stage (model, optimiser, schedule, EMA, step, best, elapsed, both RNGs):
    what :func:`restore_scratch` and ``ema.load_state_dict`` resume from."""
    save_checkpoint(out, step, {"model": unet.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "ema": ema.state_dict(), "step": step, "best": best, "elapsed": elapsed,
                                "np_rng": rng, "torch_rng": torch.get_rng_state()})


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
        self.fh = open(self.path, "a", newline="")  # noqa: SIM115 - open for the log's lifetime, flushed per row
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
        d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=(200, 0, 0), width=2)
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

