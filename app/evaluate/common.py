"""Shared pieces of the evaluation: labelled data, seeds, run folders, JSONL records, progress lines, figures.

Everything here is numpy, Pillow and the standard library (plus :mod:`app.imaging` for decoding), so that the
table and localization code can be tested without a model.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from app import fileio, imaging
from app.datasets import IMAGE_SUFFIXES
from app.datasets import LabelledImage as Item
from app.datasets import read_labelled as read_items

__all__ = [
    "HEALTHY_LABEL",
    "IMAGE_SUFFIXES",  # re-exported from app.datasets for the evaluation modules
    "PAPER_DISEASE_LABELS",
    "PAPER_INDUCED_LABELS",
    "PROMPT_LABELS",
    "SEED_RULE",
    "FloatImage",
    "Item",  # app.datasets.LabelledImage
    "Progress",
    "append_jsonl",
    "check_same_settings",
    "format_duration",
    "hot_colormap",
    "image_grid",
    "item_seed",
    "load_gray",
    "load_mask",
    "load_u8",
    "mean_sd",
    "now_iso",
    "prompt_side",
    "read_items",  # app.datasets.read_labelled: (root, rows) of a data set
    "read_jsonl",
    "select",
    "slug",
    "stable_order",
    "write_atomic",
    "write_json",
]

HEALTHY_LABEL = "normal"
# The classes of the paper's tables; the report lists those the data lacks (this project's cxr256 has no
# lung_opacity and no cardiomegaly images).
PAPER_DISEASE_LABELS = ("covid", "viral_pneumonia", "lung_opacity")
PAPER_INDUCED_LABELS = ("covid", "viral_pneumonia", "lung_opacity", "cardiomegaly")
# Prompts of the paper (Sec. 3.1) and the label each induces; used when --induce names no --induce-label.
PROMPT_LABELS = {"covid 19": "covid", "covid-19": "covid", "covid": "covid", "viral pneumonia": "viral_pneumonia",
                 "lung opacity": "lung_opacity", "cardiomegaly": "cardiomegaly"}

FloatImage = NDArray[np.float32]


# ----------------------------------------------------------------------------------------------------------------
# labelled data
# ----------------------------------------------------------------------------------------------------------------
def stable_order(rel: str) -> str:
    """Sort key that shuffles images reproducibly and independently of the other images (SHA-256 of the path)."""
    return fileio.sha256_bytes(rel.encode())


def select(items: Sequence[Item], labels: Sequence[str], limit: int | None) -> list[Item]:
    """The first ``limit`` images of each label in :func:`stable_order` (all when ``limit`` is None).

    The order depends only on each image's path, so raising ``limit`` later extends the same selection (which
    keeps resumed runs consistent). Labels are kept in the order given.

    Raises:
        ValueError: a label has no image; the message lists the labels present.
    """
    present = sorted({it.label for it in items})
    out: list[Item] = []
    for label in labels:
        chosen = sorted((it for it in items if it.label == label), key=lambda it: stable_order(it.rel))
        if not chosen:
            raise ValueError(f"label {label!r} has no image in this split; labels present: {', '.join(present)}")
        out.extend(chosen if limit is None else chosen[:limit])
    return out


def item_seed(base_seed: int, rel: str) -> int:
    """Per-image seed: ``(base_seed + int(sha256(rel)[:8], 16)) mod 2**31``; sample i of the image uses seed + i.

    Depends only on the base seed and the image's relative path, so a resumed or re-limited run regenerates an
    image bit-identically.
    """
    return (base_seed + int(fileio.sha256_bytes(rel.encode())[:8], 16)) % 2**31


SEED_RULE = "per image: (seed + int(sha256(relative input path)[:8], 16)) mod 2**31; sample i uses that + i"


def load_gray(path: Path) -> FloatImage:
    """Decode an image file (PNG, JPEG or DICOM) to float32 (H, W) in [0, 1] with :func:`app.imaging.decode_image`."""
    return imaging.decode_image(Path(path).read_bytes()).pixels.astype(np.float32)


def load_u8(path: Path) -> NDArray[np.uint8]:
    """An image file as uint8 (H, W) (the 8-bit view every FID input gets, real and generated alike)."""
    return imaging.to_uint8(load_gray(path))


def load_mask(path: Path, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """A mask image (any non-zero pixel = inside), resized to ``shape`` (H, W) with nearest neighbour."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    if arr.shape != shape:
        arr = np.asarray(Image.fromarray(arr).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return arr > 0


# ----------------------------------------------------------------------------------------------------------------
# run folders
# ----------------------------------------------------------------------------------------------------------------
def now_iso() -> str:
    """Current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`app.fileio.write_atomic`, the umask's mode: evaluation outputs
    are shared results), creating its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_atomic(path, data, mode=None)


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, atomically; numpy scalars and paths are converted."""
    write_atomic(path, (json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn line (a crash mid-write) is ignored, and with ``repair`` dropped from the
    file so that appending can go on (only the writer of the file may repair it)."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    out: list[dict[str, Any]] = []
    good: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            continue
    if repair and (not text.endswith("\n") or len(good) != sum(1 for ln in lines if ln.strip())):
        write_atomic(path, "".join(g + "\n" for g in good).encode())
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line and flush it to disk (the line is what marks an image as done)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_same_settings(path: Path, settings: dict[str, Any], keys: Iterable[str]) -> None:
    """Refuse to resume a run folder made with other settings.

    Raises:
        ValueError: ``path`` (a ``run.json``) holds a different value for one of ``keys``; the message names them.
    """
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diff = [k for k in keys if old.get(k) != settings.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
        raise ValueError(f"{path.parent} was made with other settings ({shown}); resume with the same settings "
                         "or pass another --out")


def prompt_side(prompt: str) -> str | None:
    """``'left'`` or ``'right'`` when a prompt names exactly one side (the patient's), else None."""
    sides = {s for s in ("left", "right") if re.search(rf"\b{s}\b", prompt.lower())}
    return sides.pop() if len(sides) == 1 else None


def slug(text: str) -> str:
    """Lower-case file-name-safe form of a prompt: ``'Opacity in the LEFT lung'`` -> ``'opacity-in-the-left-lung'``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:60] or "empty"


# ----------------------------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``65`` -> ``'1m05s'``; ``4.2`` -> ``'4s'``."""
    s = round(max(0.0, seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """One progress line per finished item on a stream (stderr), with rate and ETA over the items actually run.

    Skipped (already done) items count towards the position but not towards the rate.
    """

    def __init__(self, total: int, what: str, stream: IO[str] | None = None) -> None:
        self.total = total
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.skipped = 0
        self.run = 0
        self.t0 = time.perf_counter()

    def skip(self) -> None:
        """Count an item that was already done."""
        self.done += 1
        self.skipped += 1

    def step(self, note: str = "") -> None:
        """Count an item just finished and print ``what i/N (k skipped)  x.x s/item  ETA ...  note``."""
        self.done += 1
        self.run += 1
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / self.run
        eta = rate * (self.total - self.done)
        skipped = f" ({self.skipped} skipped)" if self.skipped else ""
        self.stream.write(f"{self.what} {self.done}/{self.total}{skipped}  {rate:.2f} s/item  "
                          f"ETA {format_duration(eta)}  {note}\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def hot_colormap(values: NDArray[np.floating[Any]], scale: float | None = None) -> NDArray[np.uint8]:
    """Black -> red -> yellow -> white rendering of a non-negative map, uint8 RGB (H, W, 3).

    ``scale`` (the value drawn white) defaults to the map's 99.5th percentile.
    """
    v = np.asarray(values, dtype=np.float64)
    top = float(np.percentile(v, 99.5)) if scale is None else scale
    t = np.clip(v / top, 0.0, 1.0) if top > 0 else np.zeros_like(v)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    out: NDArray[np.uint8] = np.rint(rgb * 255).astype(np.uint8)
    return out


def _panel(img: NDArray[Any], size: int) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = imaging.to_uint8(arr)
    pil = Image.fromarray(arr).convert("RGB")
    scale = size / max(pil.size)
    return pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                      Image.Resampling.BILINEAR)


def image_grid(rows: Sequence[Sequence[NDArray[Any]]], *, column_titles: Sequence[str],
               row_titles: Sequence[str] | None = None, title: str = "", panel: int = 192) -> Image.Image:
    """Lay out panels in rows and columns with titles, like the paper's Figures 2 and 3.

    Args:
        rows: per row, one panel per column: float (H, W) in [0, 1] (gray) or uint8 (H, W) / (H, W, 3).
        column_titles: one per column. row_titles: one per row, drawn on the left (or None).
        title: a line above everything. panel: the longer side of each panel in pixels.

    Returns:
        An RGB image.
    """
    font = ImageFont.load_default()
    line = 14
    left = 0 if not row_titles else max(8 + int(font.getlength(t)) for t in row_titles) + 8
    ncol = len(column_titles)
    top = line * (2 if title else 1) + 6
    width = left + ncol * (panel + 4) + 4
    height = top + len(rows) * (panel + 4) + 4
    canvas = Image.new("RGB", (width, height), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(235, 235, 235), font=font)
    for j, ct in enumerate(column_titles):
        draw.text((left + 4 + j * (panel + 4), top - line - 2), ct, fill=(235, 235, 235), font=font)
    for i, row in enumerate(rows):
        y = top + i * (panel + 4)
        if row_titles:
            draw.text((4, y + panel // 2 - 6), row_titles[i], fill=(235, 235, 235), font=font)
        for j, img in enumerate(row):
            canvas.paste(_panel(img, panel), (left + 4 + j * (panel + 4), y))
    return canvas


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof=1; NaN for fewer than 2 values) of the finite values."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan
