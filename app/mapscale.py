"""The map's absolute scale: |M| as an x-fold of what a model's maps show on normal chests.

Without a scale of its own, a map drawn against its own high percentile makes a normal chest look as red as a
diseased one, and a share "above the 95th percentile" is 5 % by construction. So each model is calibrated once
(``scripts/calibrate_map.py``): its healthy preset runs on N normal validation images, and the 99th percentile of
|M| inside the lungs, pooled over those images, becomes the **normal level** (1×). The manifest stores it under
``"map_scale"`` (``vald_md.json`` is not part of the model hash, so calibrating does not change the model's
identity). The calibration also records the samples averaged, the map polarity and the map smoothing it measured
(the healthy preset's ``samples``, its (else the manifest's) ``map_polarity`` and ``map_smoothing``; 1, ``"both"``
and 0 in calibrations from before; the smoothing under the key ``"map_smoothing"``). A run whose map method,
reference, samples, polarity and map smoothing are the calibration's then reports:

=========================  ==========================================================================================
``threshold_fold``         the level the changed area is counted above, as an x-fold of the normal level (default 1)
``changed_area_fraction``  share of the region (lungs) with ``|M| >= threshold_fold * level``; about 1 % on normals
                           at 1× by construction of the 99th percentile, more where the model changed more
``rms_vs_normal``          RMS of M inside the region / the normals' RMS inside the lungs: 1 = as much change as on
                           a typical normal chest
``max_fold``               the region's largest |M| / level
=========================  ==========================================================================================

and the overlay draws ``|M| / level`` from 0 to :data:`FULL_SCALE_FOLD` (full colour at 2× the normal level).
Runs of an uncalibrated model (or another method, reference, sample count, polarity or map smoothing) fall back to the
per-image scale
(``scale.kind == "relative"``) and say so.

Pure numpy, like :mod:`app.attribution` whose maps it measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from app.attribution import DEFAULT_THRESHOLD_PERCENTILE, MAP_POLARITIES, AttributionMap, summarize

__all__ = [
    "DEFAULT_THRESHOLD_FOLD",
    "FULL_SCALE_FOLD",
    "NORMAL_PERCENTILE",
    "RELATIVE_SCALE_PERCENTILE",
    "MapCalibration",
    "calibration_for_run",
    "measure_normals",
    "scale_from_record",
    "summarize_scaled",
]

NORMAL_PERCENTILE = 99.0
"""The percentile of |M| inside the lungs of normal images that defines the normal level (1×)."""
FULL_SCALE_FOLD = 2.0
"""The overlay's full colour, as an x-fold of the normal level (the legend runs 0×, 1×, 2×)."""
DEFAULT_THRESHOLD_FOLD = 1.0
"""The level the record's changed area is counted above: the normal level itself."""
RELATIVE_SCALE_PERCENTILE = 99.5
"""Uncalibrated runs: the percentile of the map's own |M| drawn at full colour (``rendering``'s default)."""
MAX_THRESHOLD_FOLD = 10.0
"""The highest threshold the review page's slider offers, x-fold of the normal level."""


@dataclass(frozen=True)
class MapCalibration:
    """A model's normal level, as ``vald_md.json`` stores it under ``"map_scale"``.

    Attributes:
        level: The :data:`NORMAL_PERCENTILE`-th percentile of |M| inside the lungs, pooled over the normal images,
            intensity units (> 0): the map's 1×.
        percentile: The percentile ``level`` is (99).
        rms: RMS of M inside the lungs over the same pixels, intensity units (> 0).
        mean_abs: Mean |M| inside the lungs over the same pixels, intensity units.
        n_images: Number of normal images measured.
        map_method: The map method measured (``"sdedit"``); another method's maps are not on this scale.
        reference: The map reference measured (``"input"`` or ``"reconstruction"``).
        preset: The generation settings measured (prompt, strength, guidance_scale, steps, scheduler).
        samples: Counterfactual samples averaged per map (>= 1; the mean over more samples is smaller).
        polarity: The map polarity measured (``"both"``: |M|; ``"removed"``: the positive part of M).
        smoothing: The map smoothing measured: Gaussian sigma in model-frame pixels (>= 0; 0 = unsmoothed), stored
            under ``"map_smoothing"`` (smoothing lowers the high percentiles).
        data: Which images: the labels file, split and label, and its SHA-256.
        created: ISO date of the measurement.
        per_image: Spread of the per-image 99th percentiles (``min``, ``median``, ``max``), intensity units.
        command: The command that measured it.
    """

    level: float
    percentile: float = NORMAL_PERCENTILE
    rms: float = 0.0
    mean_abs: float = 0.0
    n_images: int = 0
    map_method: str = "sdedit"
    reference: str = "reconstruction"
    preset: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    per_image: dict[str, float] = field(default_factory=dict)
    command: str = ""
    samples: int = 1
    polarity: str = "both"
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level) and self.level > 0):
            raise ValueError(f"map_scale.level must be a positive intensity difference; got {self.level!r}. "
                             "Run scripts/calibrate_map.py again.")
        if not (isinstance(self.samples, int) and self.samples >= 1) or self.polarity not in MAP_POLARITIES:
            raise ValueError(f"map_scale: samples must be a whole number >= 1 and polarity one of {MAP_POLARITIES}; "
                             f"got {self.samples!r}, {self.polarity!r}. Run scripts/calibrate_map.py again.")
        if not (isinstance(self.smoothing, int | float) and math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ValueError(f"map_scale: map_smoothing must be a sigma >= 0 in model pixels; got "
                             f"{self.smoothing!r}. Run scripts/calibrate_map.py again.")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> MapCalibration | None:
        """The manifest's ``"map_scale"``, or ``None`` when the model is not calibrated.

        Raises:
            ValueError: a ``map_scale`` entry without a positive ``level``.
        """
        entry = manifest.get("map_scale")
        if not isinstance(entry, dict):
            return None
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__ and k != "smoothing"}
        if "level" not in known:
            raise ValueError("vald_md.json's map_scale has no 'level'; run scripts/calibrate_map.py again.")
        known["level"] = float(known["level"])
        if entry.get("map_smoothing") is not None:
            known["smoothing"] = float(entry["map_smoothing"])
        return cls(**known)

    def to_manifest(self) -> dict[str, Any]:
        """The ``"map_scale"`` entry for ``vald_md.json`` (the smoothing under ``"map_smoothing"``)."""
        entry = asdict(self)
        entry["map_smoothing"] = entry.pop("smoothing")
        return entry

    @property
    def full_scale(self) -> float:
        """|M| drawn at full colour: :data:`FULL_SCALE_FOLD` × ``level``, intensity units."""
        return FULL_SCALE_FOLD * self.level

    def describe(self) -> str:
        """One line for legends and captions: what 1× is."""
        return (f"1× = {self.percentile:g}th percentile of |M| in the lungs of {self.n_images} normal images "
                f"({self.level:.3g})")


def calibration_for_run(calibration: MapCalibration | None, *, map_method: str, reference: str,
                        smoothing_sigma: float = 0.0, samples: int = 1, polarity: str = "both",
                        map_smoothing: float = 0.0) -> tuple[MapCalibration | None, str]:
    """The calibration a run's map may be read against, or ``None`` and the reason why not.

    A calibration holds for maps without ``smoothing_sigma`` (native pixels) of its own method, reference, number of
    samples, polarity and map smoothing (``map_smoothing``, model-frame pixels) (smoothing, and the mean over more
    samples, lower the high percentiles; the positive part is another distribution than |M|); anything else falls
    back to the per-image scale.
    """
    if calibration is None:
        return None, "this model has no map calibration (scripts/calibrate_map.py)"
    if map_method != calibration.map_method:
        return None, f"the calibration was measured for the {calibration.map_method} map, not {map_method}"
    if reference != calibration.reference:
        return None, f"the calibration was measured against the {calibration.reference}, not the {reference}"
    if smoothing_sigma > 0:
        return None, "the calibration was measured on unsmoothed maps"
    if samples != calibration.samples:
        measured = ("single-sample maps" if calibration.samples == 1
                    else f"maps averaged over {calibration.samples} samples")
        run = "a single sample" if samples == 1 else f"the mean over {samples} samples"
        return None, (f"the calibration was measured on {measured}; {run} is "
                      f"{'smaller' if samples > calibration.samples else 'larger'} by construction")
    if polarity != calibration.polarity:
        return None, (f"the calibration was measured on maps of polarity '{calibration.polarity}', not "
                      f"'{polarity}'")
    if map_smoothing != calibration.smoothing:
        return None, (f"the calibration was measured on {_smoothed(calibration.smoothing)}, not on "
                      f"{_smoothed(map_smoothing)} (map smoothing)")
    return calibration, ""


def _smoothed(sigma: float) -> str:
    """Maps of a map smoothing (sigma in model-frame pixels), in words."""
    return "unsmoothed maps" if sigma == 0 else f"maps smoothed by sigma {sigma:g} model pixels"


def _preset_matches(calibration: MapCalibration, parameters: dict[str, Any]) -> bool:
    keys = ("prompt", "strength", "guidance_scale", "steps", "scheduler")
    return all(k not in calibration.preset or parameters.get(k) == calibration.preset[k] for k in keys)


def summarize_scaled(amap: AttributionMap, calibration: MapCalibration | None, *,
                     threshold_fold: float = DEFAULT_THRESHOLD_FOLD, parameters: dict[str, Any] | None = None,
                     reason: str = "") -> dict[str, Any]:
    """The record's ``map_summary``: :func:`app.attribution.summarize` plus the scale it was read on.

    Args:
        amap: The map (restricted to its region).
        calibration: The model's calibration when it holds for this run (:func:`calibration_for_run`), else None.
        threshold_fold: Calibrated runs: the changed area counts ``|M| >= threshold_fold * level`` (>= 0).
        parameters: The run's generation parameters, to say whether they are the calibration's preset.
        reason: Uncalibrated runs: why (shown beside the relative scale).

    Returns:
        A JSON-ready dict: every :class:`app.attribution.MapSummary` field, and ``"scale"``: ``{"kind":
        "calibrated", "level", "percentile", "full_scale_fold", "n_images", "preset", "preset_matches", ...}``
        with ``threshold_fold``, ``rms_in_mask``, ``rms_vs_normal`` and ``max_fold``; or ``{"kind": "relative",
        "percentile": 99.5, "reason"}`` with the changed area above the map's own 95th percentile (5 % by
        construction).
    """
    region = amap.region_mask()
    rms = float(np.sqrt(np.mean(np.square(amap.signed[region].astype(np.float64)))))
    if calibration is None:
        out = summarize(amap).to_dict()
        out["rms_in_mask"] = rms
        out["scale"] = {"kind": "relative", "percentile": RELATIVE_SCALE_PERCENTILE,
                        "threshold_percentile": DEFAULT_THRESHOLD_PERCENTILE, "reason": reason}
        return out
    if not (math.isfinite(threshold_fold) and threshold_fold >= 0):
        raise ValueError(f"threshold_fold must be a finite x-fold >= 0 of the normal level; got {threshold_fold!r}.")
    out = summarize(amap, threshold=threshold_fold * calibration.level, mode="absolute").to_dict()
    out.update({
        "threshold_fold": threshold_fold,
        "rms_in_mask": rms,
        "rms_vs_normal": rms / calibration.rms if calibration.rms > 0 else None,
        "max_fold": out["max_abs_in_mask"] / calibration.level,
        "scale": {"kind": "calibrated", "level": calibration.level, "percentile": calibration.percentile,
                  "rms": calibration.rms, "full_scale_fold": FULL_SCALE_FOLD, "n_images": calibration.n_images,
                  "map_method": calibration.map_method, "reference": calibration.reference,
                  "preset": calibration.preset, "created": calibration.created,
                  "preset_matches": _preset_matches(calibration, parameters or {}),
                  **_calibration_run_keys(calibration)},
    })
    return out


def _calibration_run_keys(calibration: MapCalibration) -> dict[str, Any]:
    """``samples``, ``polarity`` and ``map_smoothing`` of a calibration for the record's ``scale``, only where they
    differ from what every calibration before them measured (1, ``"both"``, 0): the records of those calibrations
    stay as they were."""
    out: dict[str, Any] = {}
    if calibration.samples != 1:
        out["samples"] = calibration.samples
    if calibration.polarity != "both":
        out["polarity"] = calibration.polarity
    if calibration.smoothing != 0:
        out["map_smoothing"] = calibration.smoothing
    return out


def scale_from_record(record: dict[str, Any]) -> MapCalibration | None:
    """The calibration a run was read against (its ``map_summary.scale``), or ``None`` for a relative-scale run
    (and for records written before calibration existed)."""
    scale = (record.get("map_summary") or {}).get("scale") or {}
    if scale.get("kind") != "calibrated":
        return None
    try:
        return MapCalibration(level=float(scale["level"]), percentile=float(scale.get("percentile", 99.0)),
                              rms=float(scale.get("rms") or 0.0), n_images=int(scale.get("n_images") or 0),
                              map_method=str(scale.get("map_method", "sdedit")),
                              reference=str(scale.get("reference", "reconstruction")),
                              preset=dict(scale.get("preset") or {}), created=str(scale.get("created", "")),
                              samples=int(scale.get("samples") or 1), polarity=str(scale.get("polarity", "both")),
                              smoothing=float(scale.get("map_smoothing") or 0.0))
    except (KeyError, TypeError, ValueError):
        return None


def measure_normals(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike | None], *,
                    percentile: float = NORMAL_PERCENTILE) -> dict[str, Any]:
    """The normal level of a set of maps of normal images (what ``scripts/calibrate_map.py`` stores).

    Args:
        maps: Signed maps M, float ``(H, W)`` each, intensity units.
        masks: The lung mask of each map, bool ``(H, W)``, or ``None`` for the whole frame.
        percentile: The percentile of the pooled |M| that becomes the level.

    Returns:
        ``{"level", "percentile", "rms", "mean_abs", "n_images", "n_pixels", "per_image": {"min", "median",
        "max"}}``: the percentile, RMS and mean of |M| over the pooled in-lung pixels, and the spread of the
        per-image percentiles.

    Raises:
        ValueError: no maps, mismatched lengths or shapes, or only zeros (a level of 0 scales nothing).
    """
    if not maps or len(maps) != len(masks):
        raise ValueError(f"need one mask (or None) per map; got {len(maps)} maps and {len(masks)} masks.")
    pooled: list[np.ndarray] = []
    per_image: list[float] = []
    for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
        arr = np.abs(np.asarray(m, dtype=np.float64))
        if k is not None:
            region = np.asarray(k, dtype=bool)
            if region.shape != arr.shape:
                raise ValueError(f"map {i} has shape {arr.shape} but its mask {region.shape}.")
            arr = arr[region]
        values = arr.ravel()
        if values.size:
            pooled.append(values)
            per_image.append(float(np.percentile(values, percentile)))
    if not pooled:
        raise ValueError("every mask is empty; no lung pixels to measure.")
    allv = np.concatenate(pooled)
    level = float(np.percentile(allv, percentile))
    if level <= 0:
        raise ValueError("the maps are zero at the requested percentile; nothing to calibrate against.")
    return {"level": level, "percentile": percentile, "rms": float(np.sqrt(np.mean(allv**2))),
            "mean_abs": float(allv.mean()), "n_images": len(per_image), "n_pixels": int(allv.size),
            "per_image": {"min": float(np.min(per_image)), "median": float(np.median(per_image)),
                          "max": float(np.max(per_image))}}
