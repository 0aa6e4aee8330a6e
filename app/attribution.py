"""Attribution maps: reference − counterfactual and their statistics (drawing them is :mod:`app.rendering`).

VALD-MD (Siddiqui et al., Sci Rep 2025) explains an abnormal chest X-ray by generating a healthy
counterfactual; the attribution map is the pixel-wise difference ``M = reference − counterfactual``, shown in the
native image frame (a review run with map smoothing takes the mean and the SD over samples in the model frame and
resizes them: :func:`sample_statistics`, :func:`map_from_statistics`, ``app.runs.review.attribution_map``).
``reference`` is normally the original image; passing the autoencoder's reconstruction of the input instead
cancels the blur that the autoencoder adds to every counterfactual.

Sign convention: ``M > 0`` where the original is brighter than the counterfactual, i.e. where the
counterfactual *removed* density (drawn red); ``M < 0`` where it *added* density (drawn blue in signed mode).

All images are float32 ``(H, W)`` arrays of intensities in [0, 1] (0 = black); map values are in the same
intensity units, so a value of 0.1 means "10 % of the display range". Everything here is pure numpy/scipy/
Pillow: arrays in, arrays (or one ``PIL.Image``) out, no I/O besides decoding PNG bytes handed in.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_THRESHOLD_PERCENTILE",
    "MAP_POLARITIES",
    "AttributionMap",
    "MapSummary",
    "changed_region",
    "difference_map",
    "load_mask_png",
    "map_from_statistics",
    "sample_statistics",
    "summarize",
    "threshold_value",
]

logger = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]

THRESHOLD_MODES = ("percentile", "absolute")
MAP_POLARITIES = ("both", "removed")
"""What a map keeps of the signed difference: ``"both"`` every sign (``magnitude = |signed|``), ``"removed"`` only
its positive part, the density the counterfactual removed (``signed = magnitude = max(signed, 0)``)."""
DEFAULT_THRESHOLD_PERCENTILE = 95.0
"""Percentile used where a threshold is needed (summary, outline) and none was given."""
MAX_MASK_PIXELS = 8192 * 8192
"""Refuse mask PNGs larger than this (decompression-bomb guard)."""

_RANGE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttributionMap:
    """A difference map in the native image frame.

    Attributes:
        signed: ``reference − counterfactual`` (mean over samples, after smoothing), float32 ``(H, W)``,
            intensity units, roughly in [-1, 1]; with polarity ``"removed"`` its positive part, in [0, 1].
        magnitude: ``|signed|``, float32 ``(H, W)``, in [0, 1] (``signed`` itself for polarity ``"removed"``).
        std: Per-pixel standard deviation of the (smoothed) difference across samples (``ddof=1``),
            float32 ``(H, W)``; ``None`` when ``n_samples == 1``. Taken in the frame of the differences: a review
            run with map smoothing resizes the model frame's SD, an upper bound of the resized differences' SD.
        n_samples: Number of counterfactual samples averaged (>= 1).
        mask: Region of interest, bool ``(H, W)``, or ``None`` for the whole frame. The maps themselves are
            *not* zeroed outside it; thresholds, summaries and overlays are restricted to it.
    """

    signed: FloatImage
    magnitude: FloatImage
    std: FloatImage | None
    n_samples: int
    mask: BoolImage | None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the map in pixels."""
        return (int(self.signed.shape[0]), int(self.signed.shape[1]))

    def region_mask(self) -> BoolImage:
        """The mask, or an all-True ``(H, W)`` array when there is none."""
        return self.mask if self.mask is not None else np.ones(self.shape, dtype=bool)


@dataclass(frozen=True)
class MapSummary:
    """Summary figures of a map, restricted to its mask (or the whole frame).

    Attributes:
        n_samples: Number of counterfactual samples averaged.
        threshold_mode: ``"percentile"`` or ``"absolute"``.
        threshold_parameter: The threshold as given (a percentile, or an absolute value).
        threshold_value: The threshold in intensity units of |M|.
        mask_area_px: Pixels inside the mask (``H * W`` without a mask).
        changed_area_px: Pixels inside the mask with ``|M| >= threshold_value`` (and ``|M| > 0``).
        changed_area_fraction: ``changed_area_px / mask_area_px``, in [0, 1].
        mean_abs_in_mask: Mean |M| inside the mask, intensity units.
        max_abs_in_mask: Maximum |M| inside the mask, intensity units.
        centroid_xy: ``(x, y)`` in pixels (column, row; origin top-left) of the |M|-weighted changed region,
            or ``None`` when the region is empty.
        energy_share_in_mask: ``sum(M**2 inside mask) / sum(M**2)`` over the frame, in [0, 1]; ``None`` when
            the map is identically zero.
        mean_std_in_mask: Mean per-pixel sample SD inside the mask, or ``None`` for a single sample.
    """

    n_samples: int
    threshold_mode: str
    threshold_parameter: float
    threshold_value: float
    mask_area_px: int
    changed_area_px: int
    changed_area_fraction: float
    mean_abs_in_mask: float
    max_abs_in_mask: float
    centroid_xy: tuple[float, float] | None
    energy_share_in_mask: float | None
    mean_std_in_mask: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain ``int``/``float``/``None``; the centroid as ``[x, y]``)."""
        return {
            "n_samples": self.n_samples,
            "threshold_mode": self.threshold_mode,
            "threshold_parameter": self.threshold_parameter,
            "threshold_value": self.threshold_value,
            "mask_area_px": self.mask_area_px,
            "changed_area_px": self.changed_area_px,
            "changed_area_fraction": self.changed_area_fraction,
            "mean_abs_in_mask": self.mean_abs_in_mask,
            "max_abs_in_mask": self.max_abs_in_mask,
            "centroid_xy": None if self.centroid_xy is None else [self.centroid_xy[0], self.centroid_xy[1]],
            "energy_share_in_mask": self.energy_share_in_mask,
            "mean_std_in_mask": self.mean_std_in_mask,
        }


# --------------------------------------------------------------------------------------------------------------
# Input checks (errors quote the bad value and say how to fix it)
# --------------------------------------------------------------------------------------------------------------


def check_unit_image(name: str, value: ArrayLike, ndims: tuple[int, ...] = (2,)) -> FloatImage:
    arr = np.asarray(value)
    if arr.ndim not in ndims:
        wanted = " or ".join({2: "(H, W)", 3: "(S, H, W)"}[n] for n in ndims)
        raise ValueError(
            f"{name} must have shape {wanted}; got shape {arr.shape}. "
            "Pass single-channel images (convert RGB to grayscale first)."
        )
    if arr.size == 0 or min(arr.shape[-2:]) < 1:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass an image with at least one pixel.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}. Convert it with np.asarray(x, np.float32).")
    out = arr.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf); replace them (e.g. np.nan_to_num) first."
        )
    lo, hi = float(out.min()), float(out.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must hold intensities in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]. "
            "Divide 8-bit data by 255 (16-bit by 65535) and clip to [0, 1]."
        )
    return out


def _check_mask(mask: ArrayLike, shape: tuple[int, int]) -> BoolImage:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(
            f"mask has shape {m.shape} but the image is {shape}; resize it to the image "
            "(load_mask_png(data, shape) does this for PNG masks)."
        )
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number) or not np.isin(m, (0, 1)).all():
            raise ValueError(
                f"mask must be boolean or hold only 0/1; got dtype {m.dtype} with values in "
                f"[{np.nanmin(m)!r}, {np.nanmax(m)!r}]. Threshold it first, e.g. mask > 0.5."
            )
        m = m != 0
    if not m.any():
        raise ValueError("mask selects no pixels; pass mask=None for the whole frame or a mask with a region.")
    return m


def _check_sigma(sigma: float) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"smoothing_sigma must be a finite number of pixels >= 0; got {sigma!r}. Use 0 for none.")


def _check_threshold_mode(mode: str) -> None:
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}; got {mode!r}.")


def check_threshold(threshold: float, mode: str) -> None:
    _check_threshold_mode(mode)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold!r}.")
    if mode == "percentile" and not 0.0 <= threshold <= 100.0:
        raise ValueError(
            f"a percentile threshold must be in [0, 100]; got {threshold!r}. "
            "For an absolute |M| value use threshold_mode='absolute'."
        )
    if mode == "absolute" and threshold < 0:
        raise ValueError(f"an absolute threshold is a magnitude and must be >= 0; got {threshold!r}.")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


# --------------------------------------------------------------------------------------------------------------
# Maps and statistics
# --------------------------------------------------------------------------------------------------------------


def difference_map(
    reference: ArrayLike,
    counterfactuals: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    smoothing_sigma: float = 0.0,
    polarity: str = "both",
) -> AttributionMap:
    """Compute ``M = reference − counterfactual``, averaged over samples, with per-pixel SD.

    Order of operations: :func:`sample_statistics` (checks; per-sample difference ``reference −
    counterfactual[s]``, each Gaussian smoothed, ``sigma`` in pixels, reflect at the borders; mean and SD over
    samples), then :func:`map_from_statistics` (polarity ``"removed"``: the mean clipped at 0, only the density the
    counterfactual removed; ``|signed|`` → ``magnitude``). Smoothing is linear, so smoothing-then-averaging equals
    averaging-then-smoothing. The mask is stored, not applied: maps keep full-frame values so that the energy share
    inside the mask can be reported.

    Args:
        reference: The original image, or the autoencoder's reconstruction of it, float ``(H, W)`` in [0, 1].
        counterfactuals: One counterfactual ``(H, W)`` or ``S`` samples ``(S, H, W)``, float in [0, 1], in the
            same frame as ``reference``.
        mask: Optional region of interest (e.g. lungs), bool or 0/1 ``(H, W)``.
        smoothing_sigma: Gaussian standard deviation in pixels; 0 disables smoothing.
        polarity: One of :data:`MAP_POLARITIES`: ``"both"`` (the signed map) or ``"removed"`` (its positive part).

    Returns:
        The :class:`AttributionMap` (float32 maps in intensity units).

    Raises:
        ValueError: On shape mismatch, non-finite values, values outside [0, 1], a bad mask, sigma or polarity.
    """
    mean, std, n_samples = sample_statistics(reference, counterfactuals, smoothing_sigma=smoothing_sigma)
    return map_from_statistics(mean, std, n_samples=n_samples, mask=mask, polarity=polarity)


def sample_statistics(reference: ArrayLike, counterfactuals: ArrayLike, *,
                      smoothing_sigma: float = 0.0) -> tuple[FloatImage, FloatImage | None, int]:
    """The mean and the SD over samples of ``reference − counterfactual[s]`` (each difference smoothed first).

    Computed in float64 (so that identical samples give an SD of exactly zero) and returned as float32. Any frame
    works, as long as both inputs share it: the review run takes them in the model frame's content box and resizes
    the two statistics to the native frame (:func:`app.runs.review.attribution_map`).

    Args:
        reference: float ``(H, W)`` in [0, 1].
        counterfactuals: ``(H, W)`` or ``(S, H, W)``, float in [0, 1], the same frame.
        smoothing_sigma: Gaussian standard deviation in pixels of that frame; 0 disables smoothing.

    Returns:
        ``(mean, std, S)``: float32 ``(H, W)`` signed mean in intensity units, the SD over samples (``ddof=1``,
        float32 ``(H, W)``, ``None`` when ``S == 1``) and the number of samples.

    Raises:
        ValueError: On shape mismatch, non-finite values, values outside [0, 1] or a bad sigma.
    """
    ref = check_unit_image("reference", reference)
    cfs = check_unit_image("counterfactuals", counterfactuals, ndims=(2, 3))
    if cfs.ndim == 2:
        cfs = cfs[None]
    if cfs.shape[1:] != ref.shape:
        raise ValueError(
            f"counterfactuals have frame {cfs.shape[1:]} but reference is {ref.shape}; map both to the same "
            "frame (e.g. undo the letterbox) before differencing."
        )
    _check_sigma(smoothing_sigma)
    diffs = ref[None].astype(np.float64) - cfs.astype(np.float64)
    if smoothing_sigma > 0:
        from scipy import ndimage  # scipy (~0.3 s to import) with the first use, not the server's start-up

        diffs = ndimage.gaussian_filter(diffs, sigma=(0.0, smoothing_sigma, smoothing_sigma), mode="reflect")
    n_samples = int(diffs.shape[0])
    std = diffs.std(axis=0, ddof=1).astype(np.float32) if n_samples > 1 else None
    return diffs.mean(axis=0).astype(np.float32), std, n_samples


def map_from_statistics(mean: ArrayLike, std: ArrayLike | None, *, n_samples: int, mask: ArrayLike | None = None,
                        polarity: str = "both") -> AttributionMap:
    """The :class:`AttributionMap` of a mean difference and its SD over samples (:func:`sample_statistics`).

    Args:
        mean: Signed mean ``reference − counterfactual``, float ``(H, W)``, intensity units (finite).
        std: Its per-pixel SD over samples, float ``(H, W)`` >= 0, or ``None`` (one sample).
        n_samples: Samples behind the mean (>= 1; ``std`` is given exactly when it is above 1).
        mask: Optional region of interest, bool or 0/1 ``(H, W)``.
        polarity: ``"both"`` keeps the signed mean; ``"removed"`` keeps its positive part.

    Raises:
        ValueError: On non-finite values, mismatched shapes, a bad mask or polarity, or ``std`` not matching
            ``n_samples``.
    """
    check_choice("polarity", polarity, MAP_POLARITIES)
    signed = np.asarray(mean, dtype=np.float32)
    if signed.ndim != 2 or not np.isfinite(signed).all():
        raise ValueError(f"mean must be a finite (H, W) map; got shape {signed.shape}.")
    if (std is None) != (n_samples == 1) or n_samples < 1:
        raise ValueError(f"an SD map comes with more than one sample; got n_samples={n_samples} and "
                         f"{'no' if std is None else 'an'} SD map.")
    sd = None if std is None else np.asarray(std, dtype=np.float32)
    if sd is not None and (sd.shape != signed.shape or not np.isfinite(sd).all() or float(sd.min()) < 0):
        raise ValueError(f"std must be a finite, non-negative map of the mean's shape {signed.shape}; got shape "
                         f"{sd.shape}.")
    if polarity == "removed":
        signed = np.where(signed > 0, signed, np.float32(0.0))
    return AttributionMap(signed=signed, magnitude=np.abs(signed), std=sd, n_samples=int(n_samples),
                          mask=None if mask is None else _check_mask(mask, signed.shape))


def threshold_value(
    magnitude: ArrayLike,
    *,
    threshold: float,
    mode: str = "percentile",
    mask: ArrayLike | None = None,
) -> float:
    """Turn a threshold setting into a value in the units of ``magnitude``.

    Args:
        magnitude: Non-negative map ``(H, W)`` (|M| or an SD map), intensity units.
        threshold: A percentile in [0, 100] (``mode="percentile"``) or an absolute value >= 0.
        mode: ``"percentile"`` (of the values inside ``mask``) or ``"absolute"`` (returned unchanged).
        mask: Optional bool or 0/1 ``(H, W)`` region the percentile is taken over.

    Returns:
        The threshold in intensity units.

    Raises:
        ValueError: On a bad mode, an out-of-range threshold, or a mask that does not fit.
    """
    check_threshold(threshold, mode)
    if mode == "absolute":
        return float(threshold)
    mag = np.asarray(magnitude, dtype=np.float32)
    values = mag[_check_mask(mask, mag.shape)] if mask is not None else mag.ravel()
    return float(np.percentile(values, threshold))


def changed_region(values: ArrayLike, threshold: float, mask: ArrayLike | None = None) -> BoolImage:
    """Pixels counted as changed: ``values >= threshold``, ``values > 0`` and inside ``mask``.

    Unchanged pixels (``values == 0``) never count, so a percentile threshold that falls on zero does not
    flood the frame.

    Args:
        values: Non-negative map ``(H, W)``, intensity units.
        threshold: Threshold in the same units (see :func:`threshold_value`).
        mask: Optional bool or 0/1 ``(H, W)`` region.

    Returns:
        Bool ``(H, W)``.
    """
    v = np.asarray(values, dtype=np.float32)
    region = (v >= threshold) & (v > 0)
    if mask is not None:
        region &= _check_mask(mask, v.shape)
    return region


def summarize(amap: AttributionMap, *, threshold: float | None = None, mode: str = "percentile") -> MapSummary:
    """Summary figures of a map inside its mask.

    Args:
        amap: The map.
        threshold: Percentile in [0, 100] or absolute |M| (see ``mode``); ``None`` uses the
            :data:`DEFAULT_THRESHOLD_PERCENTILE` (so the changed area is then ~5 % by construction; pass an
            absolute threshold to compare areas between images).
        mode: ``"percentile"`` or ``"absolute"``.

    Returns:
        A :class:`MapSummary`.

    Raises:
        ValueError: On a bad threshold or mode.
    """
    if threshold is None:
        threshold, mode = DEFAULT_THRESHOLD_PERCENTILE, "percentile"
    region = amap.region_mask()
    mag = amap.magnitude
    thr = threshold_value(mag, threshold=threshold, mode=mode, mask=amap.mask)
    changed = changed_region(mag, thr, amap.mask)

    inside = mag[region].astype(np.float64)
    # the centroid from the weights' row and column sums: no (H, W) coordinate grids (a 2-Mpx map's summary
    # is on a review run's critical path)
    weights = np.where(changed, mag, np.float32(0.0)).astype(np.float64)
    total_weight = float(weights.sum())
    centroid: tuple[float, float] | None = None
    if total_weight > 0:
        centroid = (float(weights.sum(axis=0) @ np.arange(mag.shape[1])) / total_weight,
                    float(weights.sum(axis=1) @ np.arange(mag.shape[0])) / total_weight)
    flat = mag.ravel().astype(np.float64)
    total_energy = float(flat @ flat)
    inside_energy = float(inside @ inside)
    return MapSummary(
        n_samples=amap.n_samples,
        threshold_mode=mode,
        threshold_parameter=float(threshold),
        threshold_value=thr,
        mask_area_px=int(region.sum()),
        changed_area_px=int(changed.sum()),
        changed_area_fraction=float(changed.sum() / region.sum()),
        mean_abs_in_mask=float(inside.mean()),
        max_abs_in_mask=float(inside.max()),
        centroid_xy=centroid,
        energy_share_in_mask=inside_energy / total_energy if total_energy > 0 else None,
        mean_std_in_mask=None if amap.std is None else float(amap.std[region].astype(np.float64).mean()),
    )


def load_mask_png(data: bytes, shape: tuple[int, int]) -> BoolImage:
    """Decode a mask image (e.g. a user-supplied lung mask PNG) into a bool mask of ``shape``.

    Order of operations: decode with Pillow; colour → luminance, multiplied by alpha when present (so a
    transparent background counts as outside); normalise by the bit depth's full scale (255 or 65535) — except
    label images whose maximum is 1, which are taken as 0/1; threshold ``> 0.5``; resize nearest-neighbour
    to ``shape``.

    Args:
        data: The encoded image bytes (PNG; any format Pillow reads is accepted).
        shape: Target ``(H, W)`` in pixels, the native frame of the image the mask belongs to.

    Returns:
        Bool ``(H, W)``.

    Raises:
        ValueError: If the bytes are not an image, the image is too large, or the mask is empty.
    """
    h, w = (int(shape[0]), int(shape[1]))
    if h < 1 or w < 1:
        raise ValueError(f"shape must be a positive (H, W); got {shape!r}.")
    # Pillow's own messages are not passed on: they quote internals (``<_io.BytesIO object at 0x...>``)
    too_large = f"masks must be at most {MAX_MASK_PIXELS} pixels"
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, checked before ours could be
        raise ValueError(f"mask image is too large: {too_large}.") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"mask is not a readable image ({len(data)} bytes). Upload a PNG mask.") from exc
    if img.width * img.height > MAX_MASK_PIXELS:
        raise ValueError(f"mask image is {img.width}x{img.height} pixels; {too_large}.")
    try:
        img.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError("mask image could not be decoded (damaged or cut short). Re-save it as PNG.") from exc

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.float64)
        full_scale = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
    elif img.mode == "1":
        values, full_scale = np.asarray(img, dtype=np.float64), 1.0
    else:
        alpha = np.asarray(img.getchannel("A"), dtype=np.float64) / 255.0 if "A" in img.getbands() else None
        decoded: Image.Image = img
        if img.mode == "P" and "transparency" in img.info:
            decoded = img.convert("RGBA")
            alpha = np.asarray(decoded.getchannel("A"), dtype=np.float64) / 255.0
        values = np.asarray(decoded.convert("L"), dtype=np.float64)
        if alpha is not None:
            values = values * alpha
        full_scale = 255.0
    if values.max() == 1.0:  # a 0/1 label image
        full_scale = 1.0
    binary = values / full_scale > 0.5
    if not binary.any():
        raise ValueError(
            f"mask is empty: no pixel is above half of full scale ({full_scale:g}); masks must mark the region "
            "in white (or 1) on black (0)."
        )
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    out = np.asarray(resized) > 127
    if not out.any():
        raise ValueError(
            f"mask region vanished when resized to {shape}; draw a larger region or pass the full-size mask."
        )
    return out
