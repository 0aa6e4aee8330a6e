"""The cases of a localization run: images with radiologist lesions (boxes or masks), read in a stable order."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app import metrics
from app.evaluate.common import IMAGE_SUFFIXES, load_mask, stable_order

__all__ = ["BOX_FRAME", "BOX_LABEL", "LesionCase", "lesion_mask", "read_lesion_cases"]

logger = logging.getLogger("vald_md.evaluate.localize")

BOX_FRAME = 512  # lesions-rsna boxes.csv coordinates are in the 512 px frame of its images
BOX_LABEL = "opacity"


@dataclass(frozen=True)
class LesionCase:
    """One image with its lesions: ``boxes`` (x, y, w, h in the ``BOX_FRAME`` frame) or a ``mask_path``."""

    path: Path
    name: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    mask_path: Path | None = None
    region_path: Path | None = None


def _find_mask(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / f"{Path(name).stem}.png"):
        if cand.is_file():
            return cand
    return None


def read_lesion_cases(data: Path, *, masks: Path | None = None, regions: Path | None = None,
                      limit: int | None = None) -> list[LesionCase]:
    """Images with lesions, in a stable pseudo-random order (SHA-256 of the name), at most ``limit``.

    Args:
        data: a folder with ``boxes.csv`` (image,label,x,y,width,height; rows labelled ``opacity`` carry boxes)
            and ``images/``; or, with ``masks``, any folder of images (or its ``images/`` sub-folder).
        masks: folder of lesion masks named like the images (non-zero = lesion).
        regions: optional folder of region masks (e.g. lungs) named like the images; images without one are
            skipped.

    Raises:
        FileNotFoundError: ``data`` has no ``boxes.csv`` and no ``masks`` was given, or a folder is missing.
        ValueError: no image has a lesion.
    """
    data = Path(data)
    img_dir = data / "images" if (data / "images").is_dir() else data
    cases: list[LesionCase] = []
    if masks is None:
        boxes_csv = data / "boxes.csv"
        if not boxes_csv.is_file():
            raise FileNotFoundError(f"{data} has no boxes.csv; pass --masks DIR with lesion masks named like the "
                                    "images")
        grouped: dict[str, list[tuple[float, float, float, float]]] = {}
        with open(boxes_csv, newline="") as fh:
            for row in csv.DictReader(fh):
                if row["label"] != BOX_LABEL or not row.get("width"):
                    continue
                grouped.setdefault(row["image"], []).append(
                    (float(row["x"]), float(row["y"]), float(row["width"]), float(row["height"])))
        cases = [LesionCase(img_dir / name, name, boxes=tuple(b)) for name, b in grouped.items()
                 if (img_dir / name).is_file()]
    else:
        if not Path(masks).is_dir():
            raise FileNotFoundError(f"--masks {masks} is not a folder")
        for f in sorted(img_dir.iterdir()):
            m = _find_mask(Path(masks), f.name) if f.suffix.lower() in IMAGE_SUFFIXES else None
            if m is not None:
                cases.append(LesionCase(f, f.name, mask_path=m))
    if regions is not None:
        if not Path(regions).is_dir():
            raise FileNotFoundError(f"--region-masks {regions} is not a folder")
        with_region = []
        for c in cases:
            r = _find_mask(Path(regions), c.name)
            if r is None:
                logger.warning("%s: no region mask in %s; skipped", c.name, regions)
                continue
            with_region.append(LesionCase(c.path, c.name, c.boxes, c.mask_path, r))
        cases = with_region
    if not cases:
        raise ValueError(f"{data}: no image with a lesion was found")
    cases.sort(key=lambda c: stable_order(c.name))
    return cases if limit is None else cases[:limit]


def lesion_mask(case: LesionCase, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """The case's lesion mask in the image frame ``shape`` (H, W) (boxes scaled from the 512 px frame)."""
    if case.mask_path is not None:
        return load_mask(case.mask_path, shape)
    return metrics.boxes_to_mask(case.boxes, shape, scale=shape[1] / BOX_FRAME)
