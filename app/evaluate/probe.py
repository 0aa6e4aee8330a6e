"""``vald-md evaluate probe``: a fast localization probe with a shortcut report, for choosing checkpoints,
recipes and map methods, and for the issue's targets.

Every image of ``lesions-rsna`` labelled ``opacity`` (boxes scaled from 512 px) is read at the model's size
(256 px), segmented by the lung segmenter, and scored for each map method inside the lungs and over the whole
image. RSNA-normal images (``--normals``) give the image-level AUROC (opacity vs normal) of each map's mean value
inside the lungs (``image_auroc_lungs``) and of its RMS there, the energy per lung pixel, which is what a run's
``map_summary`` reports as ``rms_in_mask`` (``image_auroc_lungs_rms``: ``[auroc, ci_lo, ci_hi]``, a 95 %
bootstrap interval resampling each class). Methods:

====================  ============================================================================================
``product``           the product map ``|reference - counterfactual|`` at the model's healthy preset (reference =
                      the manifest's ``map_reference``), one sample
``product_pos``       the same, signed and positive part only: density the counterfactual removed
``product_meanS``     ``|reference - mean of S counterfactuals|`` (``--samples S`` > 1)
``product_meanS_pos`` ``reference - mean of S counterfactuals``, positive part (the product's map with S samples
                      and ``map_polarity`` "removed")
``product_pos_meanS`` the mean over the S samples of each ``reference - counterfactual``'s positive part (a candidate:
                      the mean plus a term that grows where the samples disagree; docs/EVALUATION.md, eighth round)
``<product map>_sG``  with ``--map-smoothing G`` > 0, each ``product*`` map above also with the reference and the
                      counterfactuals Gaussian smoothed by sigma G px (the product's ``map_smoothing``: the
                      probe's 256-px images are the embedded model's frame), e.g. ``product_mean8_pos_s4``
``paper``             ``|input - counterfactual|`` (the paper's map)
``empty``             baseline: the product map with the empty prompt ``""``
``diffedit``          DiffEdit noise contrast "normal chest x-ray" vs ``--disease-prompt`` (``app.mapmethods``)
``classifier_grad``   SmoothGrad of the lesion classifier (``--classifier``), positive part
``classifier_guided`` classifier-guided counterfactual (``--classifier``), ``|reference - counterfactual|``
``random``            baseline: uniform noise
``intensity``         baseline: the image itself (dense = bright)
``edges``             baseline: ``|x - gaussian_blur(x, 3 px)|``
``lung_prior``        baseline: the mean lung mask of the probed images
====================  ============================================================================================

Per image and method: pixel AUROC, pointing game, IoU of the top-(lesion area) pixels (Gifsplanation protocol),
and the shortcut report: the share of map energy (|values|, whole image) on the outer 5 % frame, outside the lungs,
on letterbox padding (uniform edge rows/columns) and on burned-in markers (small bright components outside the
lungs), and the share of the map's top 5 % pixels in the outer frame. Aggregates are means with bootstrap 95 %
CIs; paired differences of each method against each baseline are bootstrapped over images.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from app import metrics
from app.evaluate.common import load_gray, now_iso, stable_order, write_json
from app.evaluate.localize import BOX_FRAME, read_lesion_cases
from app.generation import GenerationRequest, Scheduler
from app.lungs import marker_mask, resize_float

PROBE_SIZE = 256
FRAME_FRACTION = 0.05
BASELINES = ("random", "intensity", "edges", "lung_prior", "empty")
MODEL_METHODS = ("product", "product_pos", "paper", "empty", "diffedit", "ddim_inversion", "ddim_inversion_pos")
CLASSIFIER_METHODS = ("classifier_grad", "classifier_guided")
SCORES = ("pixel_auroc", "pointing_game", "iou_area")
DISPLAYED = "@lungs"
"""Suffix of a model map restricted to the lungs, as the viewer shows it by default (zero outside the lungs): scored
over the whole image (inside the lungs it is the map itself)."""
CANDIDATE_MAPS = ("product_pos_mean",)
"""Prefixes of ``product*`` maps the probe reports as candidates, not as the product's map (``probe-compare``
never takes them as a run's default method)."""
SHORTCUTS = ("frame_energy", "outside_lung_energy", "padding_energy", "marker_energy", "top5_in_frame")


# ----------------------------------------------------------------------------------------------------------------
# regions of the shortcut report
# ----------------------------------------------------------------------------------------------------------------
def frame_mask(shape: tuple[int, int], fraction: float = FRAME_FRACTION) -> NDArray[np.bool_]:
    """bool (H, W): the outer ``fraction`` of rows and columns on every side."""
    h, w = shape
    m = np.zeros(shape, bool)
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    m[:bh], m[-bh:], m[:, :bw], m[:, -bw:] = True, True, True, True
    return m


def padding_mask(img: NDArray[Any], tol: float = 2.0 / 255) -> NDArray[np.bool_]:
    """bool (H, W): uniform bands at the edges (letterbox padding): edge rows/columns whose spread is <= ``tol``."""
    h, w = img.shape
    m = np.zeros(img.shape, bool)
    for axis, n in ((1, h), (0, w)):
        spread = np.ptp(img, axis=axis)
        for order in (range(n), range(n - 1, -1, -1)):
            for i in order:
                if spread[i] > tol:
                    break
                if axis == 1:
                    m[i] = True
                else:
                    m[:, i] = True
    return m


def shortcut_report(values: NDArray[Any], img: NDArray[Any], lungs: NDArray[np.bool_]) -> dict[str, float]:
    """Shares of a map's |energy| on the frame, outside the lungs, on padding and on markers; top 5 % in frame."""
    e = np.abs(values.astype(np.float64))
    total = float(e.sum())
    frame = frame_mask(img.shape)
    out: dict[str, float] = {}
    for name, region in (("frame_energy", frame), ("outside_lung_energy", ~lungs),
                         ("padding_energy", padding_mask(img)), ("marker_energy", marker_mask(img, lungs))):
        out[name] = float(e[region].sum()) / total if total > 0 else math.nan
    k = max(1, round(0.05 * e.size))
    top = np.argsort(-e.ravel(), kind="stable")[:k]
    out["top5_in_frame"] = float(frame.ravel()[top].mean())
    return out


def edge_map(img: NDArray[Any], sigma: float = 3.0) -> NDArray[np.float32]:
    """``|x - gaussian_blur(x, sigma)|``: the edge baseline of the issue (sigma in pixels at 256 px)."""
    x = img.astype(np.float32)
    edges: NDArray[np.float32] = np.abs(x - ndimage.gaussian_filter(x, sigma)).astype(np.float32)
    return edges


def score_one(values: NDArray[Any], lesion: NDArray[np.bool_], region: NDArray[np.bool_] | None) -> dict[str, float]:
    """pixel AUROC, pointing game and IoU at the lesion's own area (top-(area) pixels), inside ``region``."""
    v = values.astype(np.float64)
    area_pct = 100.0 * float(lesion[region].sum() if region is not None else lesion.sum()) / float(
        region.sum() if region is not None else lesion.size)
    iou, _ = metrics.topk_iou_dice(v, lesion, min(100.0, max(area_pct, 1e-3)), region)
    return {"pixel_auroc": metrics.pixel_auroc(v, lesion, region),
            "pointing_game": float(metrics.pointing_game(v, lesion, region)), "iou_area": iou}


# ----------------------------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------------------------
MapFn = Callable[[NDArray[np.float32], NDArray[np.bool_], int], dict[str, NDArray[np.float32]]]


def _product_maps(ref: NDArray[np.float32], cfs: NDArray[np.float32], samples: int,
                  suffix: str = "") -> dict[str, NDArray[np.float32]]:
    """The ``product*`` maps of a reference (H, W) and its counterfactuals (S, H, W), named with ``suffix``."""
    signed = ref - cfs[0]
    out = {f"product{suffix}": np.abs(signed), f"product_pos{suffix}": np.clip(signed, 0, None)}
    if samples > 1:
        mean_signed = ref - cfs.mean(0)
        out[f"product_mean{samples}{suffix}"] = np.abs(mean_signed)
        out[f"product_mean{samples}_pos{suffix}"] = np.clip(mean_signed, 0, None)
        out[f"product_pos_mean{samples}{suffix}"] = np.clip(ref[None] - cfs, 0, None).mean(0)
    return out


def model_map_fn(engine: Any, methods: Sequence[str], *, strength: float, guidance: float, steps: int,
                 samples: int, disease_prompt: str, classifier: Any = None, guided_scale: float = 30.0,
                 scheduler: Scheduler | str | None = None, smoothing: float = 0.0,
                 cache: Path | None = None, prompt: str | None = None) -> MapFn:
    """A function (image 256 px, lung mask, seed) -> {method: map} for the model-based methods.

    The SDEdit maps run the healthy preset's request (prompt, and scheduler unless ``scheduler`` is given) with
    these settings; DDIM inversion and the classifier-guided map use DDIM whatever the scheduler. ``smoothing``
    (sigma in pixels of the probe's 256-px image, >= 0): above 0 the ``product*`` maps are also reported with the
    reference and the counterfactuals Gaussian smoothed (mode ``"reflect"``), named with the suffix ``_s<sigma>``.
    ``cache``: a folder of :class:`app.evaluate.probe_cache.ProbeCache` entries for these settings; the SDEdit
    maps (``product*``, ``paper``) then take each image's reconstruction and counterfactuals from it when there,
    and keep them there when made (entries depend on the model, the generation parameters but the seed, the
    engine's device and precision and the library versions; not on the smoothing, the map reference or the
    thread count). ``prompt``: the prompt of every model method instead of the healthy preset's (``""``: the same
    pipeline with the empty prompt, the control at the product's own setting; the ``empty`` baseline is one
    sample only).

    Raises:
        ValueError: a setting out of range, the preset names a scheduler the engine does not support, or
            ``cache`` holds entries made with other settings. The returned function raises ValueError when the
            cache's entry for an image is damaged, made with other settings or made from another image.
    """
    from app import mapmethods

    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing={smoothing!r} must be a sigma of 0 or more pixels (0 = none)")

    request = GenerationRequest.from_preset(engine.info.presets.get("healthy"), prompt=prompt, strength=strength,
                                            guidance_scale=guidance, steps=steps, samples=samples,
                                            scheduler=scheduler)
    request.check()
    healthy_prompt = request.prompt
    reference = str(engine.info.manifest.get("map_reference", "input"))
    store = None
    if cache is not None and any(m.startswith(("product", "paper")) for m in methods):
        from app.evaluate.probe_cache import ProbeCache
        from app.provenance import library_versions

        params = request.parameters(None)
        params.pop("seed")
        store = ProbeCache(cache, {"model_hash": engine.info.model_hash, "parameters": params, "size": PROBE_SIZE,
                                   "compute": engine.compute_record(samples * (2 if guidance > 1 else 1)),
                                   "libraries": library_versions()})

    def sdedit(img: NDArray[np.float32], seed: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(reconstruction, counterfactuals (S, H, W)) of ``img``: from the cache when there, else made (and kept)."""
        hit = store.get(img, seed) if store is not None else None
        if hit is not None:
            return hit
        res = engine.generate_request(img, replace(request, seed=seed))
        if store is not None:
            store.put(img, seed, res.reconstruction, res.counterfactuals)
        return res.reconstruction, res.counterfactuals

    def fn(img: NDArray[np.float32], lungs: NDArray[np.bool_], seed: int) -> dict[str, NDArray[np.float32]]:
        out: dict[str, NDArray[np.float32]] = {}
        if any(m.startswith(("product", "paper")) for m in methods):
            recon, cfs = sdedit(img, seed)
            ref = recon if reference == "reconstruction" else img
            product = _product_maps(ref, cfs, samples)
            out.update({"product": product.pop("product"), "product_pos": product.pop("product_pos"),
                        "paper": np.abs(img - cfs[0]), **product})
            if smoothing > 0:  # smoothing is linear: the same as smoothing each sample's difference
                out.update(_product_maps(
                    ndimage.gaussian_filter(ref, smoothing, mode="reflect"),
                    ndimage.gaussian_filter(cfs, (0, smoothing, smoothing), mode="reflect"),
                    samples, f"_s{smoothing:g}"))
        if "empty" in methods:
            res = engine.generate_request(img, replace(request, prompt="", samples=1, seed=seed))
            ref = res.reconstruction if reference == "reconstruction" else img
            out["empty"] = np.abs(ref - res.counterfactuals[0])
        if "diffedit" in methods:
            out["diffedit"] = mapmethods.diffedit_contrast(engine, img, healthy_prompt=healthy_prompt,
                                                           disease_prompt=disease_prompt, strength=0.5, seed=seed)
        if any(m.startswith("ddim_inversion") for m in methods):
            inv = mapmethods.ddim_inversion(engine, img, prompt=healthy_prompt, strength=strength, steps=steps,
                                            guidance_scale=guidance)
            signed = inv.reconstruction - inv.counterfactuals[0]
            out["ddim_inversion"] = np.abs(signed)
            out["ddim_inversion_pos"] = np.clip(signed, 0, None)
        if classifier is not None and "classifier_grad" in methods:
            out["classifier_grad"] = mapmethods.classifier_gradient(classifier, img, lungs, seed=seed)
        if classifier is not None and "classifier_guided" in methods:
            res = mapmethods.classifier_guided(engine, classifier, img, lungs, prompt=healthy_prompt,
                                               strength=strength, steps=steps, guidance_scale=guidance,
                                               classifier_scale=guided_scale, seed=seed)
            ref = res.reconstruction if reference == "reconstruction" else img
            out["classifier_guided"] = np.abs(ref - res.counterfactuals[0])
        return {k: v.astype(np.float32) for k, v in out.items()}

    return fn


def _summary(rows: list[dict[str, Any]], methods: Sequence[str], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in methods:
        vals = [r[key][m] for r in rows if m in r[key]]
        if not vals:
            continue
        out[m] = {}
        for s in (*SCORES, *SHORTCUTS):
            v = np.array([x[s] for x in vals if s in x and np.isfinite(x[s])])
            if len(v):
                est, lo, hi = metrics.bootstrap_ci(v, n_boot=1000)
                out[m][s] = {"mean": est, "ci": [lo, hi], "n": len(v)}
    return out


def _paired(rows: list[dict[str, Any]], methods: Sequence[str], baselines: Sequence[str], key: str,
            score: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in methods:
        for b in baselines:
            if m == b:
                continue
            d = np.array([r[key][m][score] - r[key][b][score] for r in rows if m in r[key] and b in r[key]])
            if len(d):
                est, lo, hi = metrics.bootstrap_ci(d, n_boot=1000)
                out[f"{m} - {b}"] = {"mean": est, "ci": [lo, hi], "n": len(d)}
    return out


def run_probe(data: Path, out: Path, *, segmenter: Any, map_fn: MapFn | None, methods: Sequence[str],
              limit: int | None = None, normals: int = 0, seed: int = 0,
              settings: dict[str, Any] | None = None, stream: Any = None) -> dict[str, Any]:
    """Score every method on ``limit`` opacity images (and ``normals`` RSNA-normal images); write probe.json.

    Args:
        data: the lesions-rsna folder (boxes.csv + images/). segmenter: an ``app.lungs.LungSegmenter``.
        map_fn: model-based maps (``model_map_fn``) or None for baselines only.
        methods: the method ids to score (baselines are always scored).

    Returns:
        The summary written to ``out/probe.json``.
    """
    stream = stream or sys.stderr
    t0 = time.time()
    cases = read_lesion_cases(data, limit=limit)
    normal_names: list[str] = []
    if normals:
        with open(Path(data) / "boxes.csv", newline="") as fh:
            normal_names = sorted({r["image"] for r in csv.DictReader(fh) if r["label"] == "normal"},
                                  key=stable_order)[:normals]
    img_dir = Path(data) / "images"
    items: list[tuple[str, Path, Any]] = [(c.name, c.path, c) for c in cases] + [
        (n, img_dir / n, None) for n in normal_names]
    loaded = []
    for name, path, case in items:
        img = _to_probe_size(load_gray(path))
        lungs = segmenter.segment(img)
        loaded.append((name, img, lungs, case))
    prior = np.mean([lm.astype(np.float32) for _, _, lm, _ in loaded], axis=0).astype(np.float32)
    rows: list[dict[str, Any]] = []
    means: dict[str, dict[str, list[float]]] = {}  # per method: the mean of the map inside the lungs
    rms: dict[str, dict[str, list[float]]] = {}  # per method: its RMS there (the record's map_summary rms_in_mask)
    all_methods: list[str] = []
    for i, (name, img, lungs, case) in enumerate(loaded):
        s = seed + int(stable_order(name)[:8], 16) % (2**31 - 1)
        maps: dict[str, NDArray[np.float32]] = {
            "random": np.random.default_rng(s).random(img.shape, dtype=np.float32),
            "intensity": img, "edges": edge_map(img), "lung_prior": prior}
        if map_fn is not None:
            model_maps = {k: v for k, v in map_fn(img, lungs, s).items()
                          if k in methods or k.removesuffix("_pos") in methods or k.startswith("product")}
            maps.update(model_maps)
            # as the viewer shows them by default: restricted to the lungs (scored over the whole image only)
            maps.update({k + DISPLAYED: np.where(lungs, v, 0).astype(np.float32) for k, v in model_maps.items()})
        for m in maps:
            if m not in all_methods:
                all_methods.append(m)
        for m, v in maps.items():
            inside = v[lungs].astype(np.float64) if lungs.any() else np.full(1, math.nan)
            kind = "opacity" if case else "normal"
            means.setdefault(m, {"opacity": [], "normal": []})[kind].append(float(inside.mean()))
            rms.setdefault(m, {"opacity": [], "normal": []})[kind].append(float(np.sqrt(np.mean(inside ** 2))))
        if case is not None:
            lesion = metrics.boxes_to_mask(case.boxes, img.shape, scale=img.shape[1] / BOX_FRAME)
            row: dict[str, Any] = {"image": name, "lung_fraction": float(lungs.mean()),
                                   "lesion_in_lungs": float(lesion[lungs].sum() / max(1, lesion.sum())),
                                   "whole": {}, "lungs": {}}
            region = lungs if (lesion & lungs).any() and (~lesion & lungs).any() else None
            for m, v in maps.items():
                row["whole"][m] = {**score_one(v, lesion, None), **shortcut_report(v, img, lungs)}
                if region is not None and not m.endswith(DISPLAYED):
                    row["lungs"][m] = score_one(v, lesion, region)
            rows.append(row)
        stream.write(f"\rprobe {i + 1}/{len(loaded)} {time.time() - t0:.0f} s")
    stream.write("\n")
    model_methods = [m for m in all_methods if m not in BASELINES]
    summary = {
        "created_at": now_iso(), "data": str(data), "images": len(rows), "normals": len(normal_names),
        "size": PROBE_SIZE, "seed": seed, "settings": settings or {}, "segmenter": segmenter.info.record(),
        "wall_s": round(time.time() - t0, 1),
        "whole": _summary(rows, all_methods, "whole"), "lungs": _summary(rows, all_methods, "lungs"),
        "paired_auroc_lungs": _paired(rows, model_methods, BASELINES, "lungs", "pixel_auroc"),
        "paired_auroc_whole": _paired(rows, model_methods, BASELINES, "whole", "pixel_auroc"),
        # opacity images positive, normal images negative; by the map's mean inside the lungs, and by its RMS
        # there (the energy per lung pixel) with a bootstrap CI
        "image_auroc_lungs": {m: image_auroc(e)[0] for m, e in means.items()} if normal_names else {},
        "image_auroc_lungs_rms": {m: image_auroc(e, ci=True) for m, e in rms.items()} if normal_names else {},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", summary)
    with open(out / "probe_rows.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    (out / "probe.md").write_text(format_probe(summary))
    return summary


def image_auroc(scores: dict[str, list[float]], *, ci: bool = False) -> tuple[float, float, float]:
    """AUROC of one score per image, opacity images (``scores["opacity"]``) positive against normal ones
    (``scores["normal"]``); with ``ci`` its 95 % stratified bootstrap interval (:func:`app.metrics.auroc_ci`), else
    ``(auroc, nan, nan)``."""
    pos, neg = scores["opacity"], scores["normal"]
    if ci and pos and neg and np.isfinite(pos).all() and np.isfinite(neg).all():
        return metrics.auroc_ci(pos, neg)
    return metrics.auroc(list(pos) + list(neg), [True] * len(pos) + [False] * len(neg)), math.nan, math.nan


def _to_probe_size(img: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.clip(resize_float(img, PROBE_SIZE, PROBE_SIZE), 0, 1) if img.shape != (PROBE_SIZE,) * 2 else img


def format_probe(summary: dict[str, Any]) -> str:
    """A Markdown table of the probe: per method, lungs and whole-image scores and the shortcut report."""
    lines = [f"probe: {summary['images']} opacity images, {summary['normals']} normals, {summary['size']} px, "
             f"segmenter {summary['segmenter']['sha256'][:8]}, {summary['wall_s']} s", "",
             "| method | AUROC lungs [95% CI] | pointing lungs | IoU(area) lungs | AUROC whole | pointing whole | "
             "IoU(area) whole | image AUROC (mean) | image AUROC (RMS) [95% CI] | frame E | outside-lung E | "
             "marker E | top5 in frame |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def g(part: str, m: str, s: str, ci: bool = False) -> str:
        d = summary[part].get(m, {}).get(s)
        if not d:
            return "-"
        return f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" if ci else f"{d['mean']:.3f}"

    for m in summary["whole"]:
        ia = summary["image_auroc_lungs"].get(m)
        ir = summary.get("image_auroc_lungs_rms", {}).get(m)
        rms_cell = "-" if ir is None or not np.isfinite(ir[0]) else (
            f"{ir[0]:.3f}" + (f" [{ir[1]:.3f}, {ir[2]:.3f}]" if np.isfinite(ir[1]) else ""))
        lines.append(f"| {m} | {g('lungs', m, 'pixel_auroc', True)} | {g('lungs', m, 'pointing_game')} | "
                     f"{g('lungs', m, 'iou_area')} | {g('whole', m, 'pixel_auroc')} | "
                     f"{g('whole', m, 'pointing_game')} | {g('whole', m, 'iou_area')} | "
                     f"{'-' if ia is None or not np.isfinite(ia) else f'{ia:.3f}'} | {rms_cell} | "
                     f"{g('whole', m, 'frame_energy')} | {g('whole', m, 'outside_lung_energy')} | "
                     f"{g('whole', m, 'marker_energy')} | {g('whole', m, 'top5_in_frame')} |")
    for part, title in (("lungs", "paired AUROC difference (lungs)"),
                        ("whole", f"paired AUROC difference (whole image, maps shown as `{DISPLAYED}`)")):
        pairs = {k: d for k, d in summary[f"paired_auroc_{part}"].items()
                 if part == "lungs" or k.split(" - ")[0].endswith(DISPLAYED)}
        if pairs:
            lines += ["", f"| {title} | mean [95% CI] |", "|---|---|"]
            lines += [f"| {k} | {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |" for k, d in pairs.items()]
    return "\n".join(lines) + "\n"
