"""Lung-field segmentation: the project's embedded segmenter (a small U-Net) and its inference.

The segmenter restricts attribution maps to the lungs (as the paper does), keeps them off the letterbox, the
image borders and burned-in markers, and gives training and evaluation an anatomical frame. It is trained by
``vald-md train lungs`` (``app/train/lungs.py``) on the lung masks of ``shared/data/lungmasks-v7labs``; its
Dice on held-out and other-source images is in ``model_weights/lungs-unet/MODEL_CARD.md``.

Inference (:meth:`LungSegmenter.segment`): the native image (H, W) in [0, 1] is resized to ``size`` x ``size``
(no letterbox: training resized alike), normalised per image (1st-99th percentile to [0, 1]), the U-Net's
probability is resized back to (H, W) bilinearly and thresholded at 0.5, then cleaned: the two largest
connected components are kept (a component below 0.5 % of the image is dropped) and holes are filled.

Agreement with drawn lung masks (:func:`find_pairs`, :func:`is_holdout`, :func:`evaluate_dice`: Dice, coverage,
precision) is here too, for the training command and ``vald-md evaluate lungs`` alike.

Imports: torch, numpy, scipy, Pillow, safetensors, ``app.fileio``; nothing of the web, the engine or the audit trail.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from app.fileio import sha256_bytes

CONFIG_NAME = "segmenter.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_SEGMENTER_DIR = Path(__file__).resolve().parent.parent / "model_weights" / "lungs-unet"
MIN_COMPONENT_FRACTION = 0.005  # a lung component below 0.5 % of the image is noise


class SegmenterFolderError(ValueError):
    """A segmenter folder is missing files or holds an unreadable configuration."""


class LungUNet(nn.Module):
    """A small 2-D U-Net: (N, 1, S, S) normalised image -> (N, 1, S, S) lung logits.

    Args:
        channels: feature channels per level, e.g. (16, 32, 64, 128); S must be divisible by 2**(levels - 1).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.SiLU())

        self.down = nn.ModuleList()
        cin = 1
        for c in self.channels:
            self.down.append(block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for c_skip in reversed(self.channels[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c_skip, 2, stride=2))
            self.fuse.append(block(2 * c_skip, c_skip))
            cin = c_skip
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1]), strict=True):
            x = fuse(torch.cat([up(x), skip], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits


def normalize_intensity(img: NDArray[Any]) -> NDArray[np.float32]:
    """Per-image intensity normalisation: the 1st-99th percentile range mapped to [0, 1], clipped.

    Args:
        img: (H, W) float image (any range). Returns float32 (H, W) in [0, 1].
    """
    x = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(x, (1.0, 99.0))
    if hi - lo < 1e-6:
        return np.zeros_like(x)
    out: NDArray[np.float32] = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def resize_float(img: NDArray[Any], height: int, width: int) -> NDArray[np.float32]:
    """Bilinear resize of a float (H, W) image to (height, width) with Pillow's 'F' mode (no 8-bit rounding)."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.shape == (height, width):
        return arr.copy()
    im = Image.fromarray(arr, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def clean_mask(mask: NDArray[np.bool_], *, keep: int = 2,
               min_fraction: float = MIN_COMPONENT_FRACTION) -> NDArray[np.bool_]:
    """Keep the ``keep`` largest connected components (each >= ``min_fraction`` of the image), fill their holes.

    Args:
        mask: bool (H, W). Returns bool (H, W).
    """
    from scipy import ndimage  # scipy (~0.3 s to import) with the first use, not the server's start-up

    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # pixels per component (labels 1..n)
    order = np.argsort(-sizes, kind="stable")[:keep]  # equal sizes: the first label (raster order)
    min_size = min_fraction * mask.size
    keep_label = np.zeros(n + 1, dtype=bool)  # a lookup by label: 0 (background) is never kept
    keep_label[[i + 1 for i in order if sizes[i] >= min_size]] = True
    return np.asarray(ndimage.binary_fill_holes(keep_label[labels]), dtype=bool)


def folder_hash(folder: Path, names: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME)) -> str:
    """SHA-256 over the named files of a small-model folder (name and bytes, in order): by default the segmenter's
    configuration and weights."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SegmenterInfo:
    """What a record says about the segmenter that drew a lung mask."""

    name: str
    sha256: str
    size: int
    threshold: float
    metrics: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The provenance written into ``record.json`` (name, hash, input size, threshold, held-out and
        other-source Dice as mean/min/N)."""
        dice = {part: {k: v for k, v in d.items() if k in ("mean", "min", "n")}
                for part, d in self.metrics.get("dice", {}).items() if isinstance(d, dict)}
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "threshold": self.threshold,
                "dice": dice}


def save_segmenter(folder: Path, model: LungUNet, *, size: int, name: str, metrics: dict[str, Any],
                   training: dict[str, Any]) -> str:
    """Write a segmenter folder (``segmenter.json`` + ``model.safetensors``, fp32); returns its hash."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    cfg = {"name": name, "architecture": "LungUNet", "channels": list(model.channels), "size": size,
           "threshold": 0.5, "normalization": "per-image 1st-99th percentile to [0, 1]",
           "metrics": metrics, "training": training}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder_hash(folder)


class LungSegmenter:
    """The lung-field segmenter, loaded from a folder (default: the embedded ``model_weights/lungs-unet``).

    Thread-safe: one lock around the forward pass. CPU inference at 128 px takes ~10-20 ms.

    Raises:
        SegmenterFolderError: the folder lacks ``segmenter.json`` or ``model.safetensors``.
    """

    def __init__(self, folder: Path | str | None = None, *, device: str = "cpu") -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder) if folder is not None else DEFAULT_SEGMENTER_DIR
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (self.folder / n).is_file()]
        if missing:
            raise SegmenterFolderError(f"{self.folder} is not a lung segmenter folder: missing {', '.join(missing)}")
        try:
            cfg = json.loads((self.folder / CONFIG_NAME).read_text())
            self.size = int(cfg["size"])
            self.threshold = float(cfg.get("threshold", 0.5))
            self.model = LungUNet(tuple(cfg["channels"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SegmenterFolderError(f"{self.folder / CONFIG_NAME} is unreadable: {e}") from e
        self.model.load_state_dict(load_file(str(self.folder / WEIGHTS_NAME)))
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.info = SegmenterInfo(name=str(cfg.get("name", self.folder.name)), sha256=folder_hash(self.folder),
                                  size=self.size, threshold=self.threshold, metrics=dict(cfg.get("metrics", {})))
        self._lock = threading.Lock()

    def probability(self, image: NDArray[Any]) -> NDArray[np.float32]:
        """Lung probability per pixel.

        Args:
            image: (H, W) grayscale, float in [0, 1] (any range is normalised per image).

        Returns:
            float32 (H, W) in [0, 1], the input's frame.
        """
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2 or min(img.shape) < 8:
            raise ValueError(f"image must be a 2-D (H, W) array of at least 8 x 8 pixels, got shape {img.shape}")
        small = normalize_intensity(resize_float(img, self.size, self.size))
        x = torch.from_numpy(small)[None, None].to(self.device)
        with self._lock, torch.inference_mode():
            prob = torch.sigmoid(self.model(x))[0, 0].float().cpu().numpy()
        return np.clip(resize_float(prob, *img.shape), 0.0, 1.0)

    def segment(self, image: NDArray[Any]) -> NDArray[np.bool_]:
        """The cleaned lung mask: bool (H, W), the input's frame (see the module docstring for the steps)."""
        return clean_mask(self.probability(image) >= self.threshold)


def marker_mask(img: NDArray[Any], lungs: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """bool (H, W): burned-in markers: bright (>= max(0.9, 99.5th percentile)) connected components smaller than
    1 % of the image, outside the lungs dilated by 3 %, dilated by 2 px."""
    thr = max(0.9, float(np.percentile(img, 99.5)))
    grow = max(1, round(0.03 * img.shape[0]))
    from scipy import ndimage

    outside = ~ndimage.binary_dilation(lungs, iterations=grow)
    labels, n = ndimage.label((img >= thr) & outside)
    if n == 0:
        return np.zeros(img.shape, bool)
    sizes = ndimage.sum(np.ones(img.shape), labels, index=np.arange(1, n + 1))
    small = np.isin(labels, np.flatnonzero(sizes < 0.01 * img.size) + 1)
    return np.asarray(ndimage.binary_dilation(small, iterations=2), dtype=bool)


def mask_png_bytes(mask: NDArray[np.bool_]) -> bytes:
    """A bool (H, W) mask as an 8-bit PNG with values 0 / 255."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def dice(pred: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two bool masks of one shape (1.0 when both are empty)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / denom


# ----------------------------------------------------------------------------------------------------------------
# agreement with drawn lung masks (``vald-md train lungs`` at the end of training, ``vald-md evaluate lungs``)
# ----------------------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class MaskPair:
    """One image and its lung mask (paths), with the source folder's name."""

    image: Path
    mask: Path
    source: str


def find_pairs(folder: Path) -> list[MaskPair]:
    """Image/lung-mask pairs in ``folder``: ``images/`` + ``masks/`` or ``images/`` + ``lung masks/`` at any depth.

    Raises:
        FileNotFoundError: ``folder`` is missing or holds no pair.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    pairs: list[MaskPair] = []
    for img_dir in sorted(p for p in folder.rglob("images") if p.is_dir()):
        for mask_name in ("masks", "lung masks"):
            mask_dir = img_dir.parent / mask_name
            if not mask_dir.is_dir():
                continue
            for f in sorted(img_dir.iterdir()):
                m = mask_dir / f.name
                if f.suffix.lower() in IMAGE_SUFFIXES and m.is_file():
                    pairs.append(MaskPair(f, m, folder.name))
    if not pairs:
        raise FileNotFoundError(f"{folder}: no images/ + masks/ (or 'lung masks/') pairs found")
    return pairs


def is_holdout(pair: MaskPair, fraction: float) -> bool:
    """Stable split: the first 8 hex digits of SHA-256(file name) mod 1000 below ``fraction`` x 1000."""
    return int(sha256_bytes(pair.image.name.encode())[:8], 16) % 1000 < fraction * 1000


def evaluate_dice(seg: LungSegmenter, pairs: list[MaskPair]) -> dict[str, Any]:
    """The cleaned mask against each drawn mask, at the image's native size (the drawn mask resized to it).

    Returns:
        ``mean``, ``min``, ``n`` (= the number of pairs) and ``per_image`` (name -> Dice) of the Dice, and the means
        of how it splits: ``coverage_mean`` (share of the drawn lung inside the segmenter's mask, 0..1: low = lung
        missed), ``precision_mean`` (share of the segmenter's mask inside the drawn lung, 0..1: low = more than the
        drawn lung marked) and ``area_ratio_mean`` (segmenter / drawn area); ``per_image_detail`` gives the four per
        image. A figure that is undefined for an image (coverage and area ratio of an empty drawn mask, precision of
        an empty segmenter mask) is NaN there and left out of its mean; a mean over nothing is NaN. Images are named
        by file name, or by their path below the pairs' common folder where two file names repeat.

    Raises:
        ValueError: an image or mask cannot be read (the message names the file).
    """
    names = [p.image.name for p in pairs]
    if len(set(names)) < len(names):
        root = Path(os.path.commonpath([str(p.image) for p in pairs]))
        names = [str(p.image.relative_to(root)) for p in pairs]
    per: dict[str, float] = {}
    detail: dict[str, dict[str, float]] = {}
    for name, p in zip(names, pairs, strict=True):
        img = _read_gray(p.image).astype(np.float32) / 255.0
        truth = _read_gray(p.mask) >= 128
        if truth.shape != img.shape:
            truth = resize_float(truth.astype(np.float32), *img.shape) >= 0.5
        pred = seg.segment(img)
        both, drawn, marked = float(np.logical_and(pred, truth).sum()), float(truth.sum()), float(pred.sum())
        per[name] = dice(pred, truth)
        detail[name] = {"dice": per[name], "coverage": both / drawn if drawn else math.nan,
                        "precision": both / marked if marked else math.nan,
                        "area_ratio": marked / drawn if drawn else math.nan}

    def mean(key: str) -> float:
        vals = [d[key] for d in detail.values() if not math.isnan(d[key])]
        return float(np.mean(vals)) if vals else math.nan

    vals = list(per.values())
    return {"mean": float(np.mean(vals)) if vals else math.nan, "min": float(np.min(vals)) if vals else math.nan,
            "n": len(vals), "per_image": per, "coverage_mean": mean("coverage"),
            "precision_mean": mean("precision"), "area_ratio_mean": mean("area_ratio"), "per_image_detail": detail}


def _read_gray(path: Path) -> NDArray[np.uint8]:
    """An image file as 8-bit gray (H, W). Raises ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
