"""Tiny lung segmenters built in code, for the tests of the lung-mask integration (runs, server, exports).

``write_tiny_segmenter`` writes a random-weight ``LungUNet((4, 8))`` at 32 px with ``app.lungs.save_segmenter``:
a real segmenter folder whose provenance and hash a record must carry. Random weights find no predictable lung
field, so :class:`BoxSegmenter` keeps that folder's provenance but returns a known one (two boxes), which makes
"nothing is drawn outside the lungs" checkable pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.lungs import LungSegmenter, LungUNet, save_segmenter

DICE = {"holdout": {"mean": 0.5, "n": 2}}


def write_tiny_segmenter(folder: Path, *, seed: int = 0) -> Path:
    """A seeded random-weight segmenter folder (``segmenter.json`` + ``model.safetensors``); returns ``folder``."""
    torch.manual_seed(seed)
    save_segmenter(folder, LungUNet((4, 8)), size=32, name="tiny-lungs", metrics={"dice": DICE},
                   training={"steps": 0})
    return folder


def box_lungs(shape: tuple[int, int]) -> np.ndarray:
    """Two upright boxes left and right of the midline, bool (H, W): :class:`BoxSegmenter`'s lung field."""
    h, w = shape
    m = np.zeros(shape, dtype=bool)
    m[h // 5: 4 * h // 5, w // 8: w // 2 - 2] = True
    m[h // 5: 4 * h // 5, w // 2 + 2: 7 * w // 8] = True
    return m


class BoxSegmenter(LungSegmenter):
    """A segmenter folder's provenance, with the probability of :func:`box_lungs` (so the mask is known)."""

    def probability(self, image: Any) -> np.ndarray:
        return box_lungs(np.asarray(image).shape).astype(np.float32)
