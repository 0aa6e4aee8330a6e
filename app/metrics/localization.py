"""Localization of attribution maps (original - counterfactual) against radiologist lesion masks.

Pointing game, pixel AUROC / average precision, top-k% IoU / Dice, energy share, each optionally restricted to a
region mask (e.g. the lungs); :func:`boxes_to_mask` rasterises (x, y, w, h) boxes. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from app.metrics.stats import auroc

__all__ = ["boxes_to_mask", "energy_share", "pixel_auprc", "pixel_auroc", "pointing_game", "topk_iou_dice"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _select(
    attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike, region_mask: npt.ArrayLike | None, what: str,
    need_negatives: bool = False,
) -> tuple[FloatArray, BoolArray]:
    """Map values and lesion labels of the region's pixels, in row-major order, after checking inputs."""
    m, lesion = np.asarray(attribution), np.asarray(lesion_mask)
    region = np.ones(lesion.shape, bool) if region_mask is None else np.asarray(region_mask)
    if m.ndim != 2 or lesion.shape != m.shape or region.shape != m.shape:
        raise ValueError(f"{what}: map {m.shape}, lesion_mask {lesion.shape} and region_mask {region.shape} must "
                         "be one (H, W) shape")
    if lesion.dtype != np.bool_ or region.dtype != np.bool_:
        raise ValueError(f"{what}: masks must be bool arrays, got {lesion.dtype} and {region.dtype}")
    if not np.isfinite(m).all():
        raise ValueError(f"{what}: the map contains NaN or infinity")
    values, labels = m[region].astype(np.float64), lesion[region]
    if not labels.any():
        raise ValueError(f"{what}: no lesion pixel inside the region; the metric is undefined for this image")
    if need_negatives and labels.all():
        raise ValueError(f"{what}: every pixel of the region is lesion; the metric is undefined for this image")
    return values, labels


def pointing_game(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                  region_mask: npt.ArrayLike | None = None) -> bool:
    """Pointing game: is the map's maximum inside the lesion?

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given (pass ``np.abs(map)`` for an
            unsigned score).
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; the maximum is sought only there (e.g. the lungs).

    Returns:
        True when the argmax (the first in row-major order among ties) is a lesion pixel.

    Raises:
        ValueError: shapes differ, masks are not bool, the map is not finite, or no lesion pixel is in the region.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pointing_game")
    return bool(labels[int(np.argmax(values))])


def pixel_auroc(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                region_mask: npt.ArrayLike | None = None) -> float:
    """Pixel-level :func:`auroc` of the map as a lesion detector.

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count (e.g. the lungs).

    Returns:
        AUROC in [0, 1]: 1 perfect, 0.5 chance, 0 inverted.

    Raises:
        ValueError: as :func:`pointing_game`, or the region holds no non-lesion pixel.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pixel_auroc", need_negatives=True)
    return auroc(values, labels)


def pixel_auprc(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                region_mask: npt.ArrayLike | None = None) -> float:
    """Pixel-level average precision (area under the precision-recall curve, step-wise).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct map values as thresholds, highest first; tied pixels
    enter together (equals ``sklearn.metrics.average_precision_score``; no interpolation).

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count.

    Returns:
        AP in (0, 1]; chance level is the lesion's share of the region's pixels.

    Raises:
        ValueError: as :func:`pointing_game`.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "pixel_auprc")
    order = np.argsort(-values, kind="mergesort")
    sv, sl = values[order], labels[order]
    last = np.concatenate((np.flatnonzero(np.diff(sv)), [len(sv) - 1]))  # last index of each tie group
    tp = np.cumsum(sl)[last]
    precision = tp / (last + 1.0)
    recall = tp / float(tp[-1])
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def topk_iou_dice(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike, k_percent: float,
                  region_mask: npt.ArrayLike | None = None) -> tuple[float, float]:
    """IoU and Dice between the top ``k_percent`` % of the map's pixels and the lesion.

    Exactly ``max(1, round(k_percent / 100 * n))`` pixels of the region's ``n`` are selected; ties at the cut are
    broken by row-major position (first wins), so the result is deterministic.

    Args:
        attribution: (H, W) float map, higher = more attributed; used as given.
        lesion_mask: (H, W) bool, True on lesion pixels.
        k_percent: share of the region's pixels to select, in (0, 100].
        region_mask: optional (H, W) bool; only these pixels count (both for selection and for the overlap).

    Returns:
        ``(iou, dice)``, each in [0, 1].

    Raises:
        ValueError: ``k_percent`` outside (0, 100], or as :func:`pointing_game`.
    """
    if not 0 < k_percent <= 100:
        raise ValueError(f"topk_iou_dice: k_percent must be in (0, 100], got {k_percent!r}")
    values, labels = _select(attribution, lesion_mask, region_mask, "topk_iou_dice")
    k = max(1, math.floor(k_percent / 100.0 * len(values) + 0.5))
    selected = np.zeros(len(values), bool)
    selected[np.argsort(-values, kind="stable")[:k]] = True
    inter = int(np.sum(selected & labels))
    union = int(np.sum(selected | labels))
    return inter / union, 2.0 * inter / (k + int(labels.sum()))


def energy_share(attribution: npt.ArrayLike, lesion_mask: npt.ArrayLike,
                 region_mask: npt.ArrayLike | None = None) -> float:
    """Share of the map's absolute energy that falls inside the lesion: ``sum|m|[lesion] / sum|m|``.

    Args:
        attribution: (H, W) float map (signed; absolute values are summed).
        lesion_mask: (H, W) bool, True on lesion pixels.
        region_mask: optional (H, W) bool; only these pixels count in numerator and denominator.

    Returns:
        Share in [0, 1]; chance level is the lesion's share of the region's pixels.

    Raises:
        ValueError: the map is zero over the region, or as :func:`pointing_game`.
    """
    values, labels = _select(attribution, lesion_mask, region_mask, "energy_share")
    energy = np.abs(values)
    total = float(energy.sum())
    if total == 0:
        raise ValueError("energy_share: the map is zero over the region; the share is undefined")
    return float(energy[labels].sum()) / total


def boxes_to_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int], scale: float = 1.0) -> BoolArray:
    """Rasterise (x, y, w, h) boxes into a bool mask.

    A box covers every pixel it touches: columns ``floor(x*s) .. ceil((x+w)*s) - 1``, rows likewise, clipped to
    the image. ``x`` is the column and ``y`` the row of the top-left corner, in pixels of the image the boxes
    were drawn on (e.g. the 1024x1024 NIH ChestX-ray14 ``BBox_List_2017.csv``).

    Args:
        boxes: iterable of ``(x, y, w, h)`` with ``w, h > 0``; may be empty.
        shape: ``(H, W)`` of the output mask.
        scale: factor from box coordinates to mask pixels (> 0), e.g. ``512 / 1024``.

    Returns:
        (H, W) bool mask, True inside any box.

    Raises:
        ValueError: a box does not have 4 finite numbers with ``w, h > 0``, or ``scale`` <= 0.
    """
    if not scale > 0:
        raise ValueError(f"boxes_to_mask: scale must be > 0, got {scale!r}")
    h_img, w_img = shape
    mask = np.zeros((h_img, w_img), bool)
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"boxes_to_mask: box {tuple(box)!r} must be (x, y, w, h) with finite values, w, h > 0")
        x, y, w, h = (float(v) * scale for v in box)
        # 1e-9 keeps float noise (e.g. 15.000000001) from adding a pixel row/column
        c0, c1 = max(0, math.floor(x + 1e-9)), min(w_img, math.ceil(x + w - 1e-9))
        r0, r1 = max(0, math.floor(y + 1e-9)), min(h_img, math.ceil(y + h - 1e-9))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask
