"""Localization of attribution maps against radiologist lesions, and the laterality of localized induction.

``localize_run`` scores, on the same images and seeds, every map a user could be shown plus baselines:

==========================  ==============================================================================
``cf_input``                ``|input - counterfactual|``, one sample (the paper's map)
``cf_recon``                ``|reconstruction - counterfactual|``, one sample (reference = autoencoder round trip)
``cf_input_meanS``          ``|input - mean of S counterfactuals|`` (``--samples S`` > 1)
``cf_recon_meanS``          ``|reconstruction - mean of S counterfactuals|``
``empty_input``             the same pipeline with the empty prompt ``""`` (what img2img changes anyway)
``empty_recon``             the empty-prompt map with the reconstruction as reference
``intensity``               the input's own intensity (bright = dense), no model
``random``                  uniform random values, no model
==========================  ==============================================================================

Metrics per image and map (``app.metrics``): pointing game, pixel AUROC and AUPRC, IoU and Dice of the top 5 %
and 10 % of the map's pixels, and the share of the map's |energy| inside the lesions; all restricted to the
optional region mask alike. Aggregates are means with percentile-bootstrap 95 % CIs over images; paired
comparisons (e.g. reconstruction vs input reference) bootstrap the per-image differences.

``laterality_run`` induces "opacity in the left lung" and "... right lung" on normal images and reports the share
of each map's energy on the named side; the patient's left is the image's right (PA view convention).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from app import attribution, imaging, metrics
from app.engine import CounterfactualEngine
from app.evaluate.common import (
    HEALTHY_LABEL,
    IMAGE_SUFFIXES,
    Progress,
    append_jsonl,
    check_same_settings,
    hot_colormap,
    image_grid,
    item_seed,
    load_gray,
    load_mask,
    now_iso,
    prompt_side,
    read_jsonl,
    stable_order,
    write_atomic,
    write_json,
)
from app.evaluate.generate import GenerateSettings, generate_run, read_run
from app.generation import GenerationRequest
from app.provenance import library_versions

logger = logging.getLogger("vald_md.evaluate.localize")

BOX_FRAME = 512  # lesions-rsna boxes.csv coordinates are in the 512 px frame of its images
BOX_LABEL = "opacity"
K_PERCENTS = (5.0, 10.0)
METRICS = ("pointing_game", "pixel_auroc", "pixel_auprc", "iou_top5", "dice_top5", "iou_top10", "dice_top10",
           "energy_share")
PRIMARY_METRIC = "pixel_auroc"
LATERALITY_PROMPTS = ("opacity in the left lung", "opacity in the right lung")
RUN_KEYS = ("prompt", "strength", "guidance_scale", "steps", "samples", "seed", "scheduler", "model_hash",
            "masks", "regions")


@dataclass(frozen=True)
class LocalizeSettings(GenerationRequest):
    """What :func:`localize_run` scores and how (``vald-md evaluate localize``'s flags): the one generation request
    (:class:`app.generation.GenerationRequest`; its ``seed`` is the base seed, see
    :func:`app.evaluate.common.item_seed`; ``samples`` 1..16, default 4) plus the cases and the statistics.

    Attributes:
        masks, regions, limit: the cases; see :func:`read_lesion_cases`.
        n_boot: bootstrap resamples for the CIs (>= 1). figure_rows: cases in ``figures/localize_examples.png``.
    """

    seed: int | None = 0
    samples: int = 4
    masks: Path | None = None
    regions: Path | None = None
    limit: int | None = None
    n_boot: int = 2000
    figure_rows: int = 4

    def check(self) -> None:
        """Reject settings out of range (the request's ranges, a seed given).

        Raises:
            ValueError: a generation field out of range, or no base seed.
        """
        super().check()
        if self.seed is None:
            raise ValueError("localize needs a base seed (--seed)")


@dataclass(frozen=True)
class LateralitySettings(GenerationRequest):
    """What :func:`laterality_run` induces (``vald-md evaluate laterality``'s flags): the generation request (its
    ``prompt`` unused: each of ``prompts`` is induced in turn; ``seed`` the base seed) plus the images.

    Attributes:
        prompts: localized prompts, each naming exactly one side.
        split, limit: the normal images; see :class:`app.evaluate.generate.GenerateSettings`.
    """

    seed: int | None = 0
    prompts: tuple[str, ...] = LATERALITY_PROMPTS
    split: str | None = "test"
    limit: int | None = None

    def check(self) -> None:
        """Reject out-of-range generation fields and prompts without exactly one side.

        Raises:
            ValueError: a field out of range; a prompt names no side or both.
        """
        super().check()
        for p in self.prompts:
            if prompt_side(p) is None:
                raise ValueError(f"prompt {p!r} must name exactly one side ('left' or 'right')")


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


def score_map(values: NDArray[Any], lesion: NDArray[np.bool_], region: NDArray[np.bool_] | None) -> dict[str, float]:
    """Every localization metric of one map (higher = better for all), restricted to ``region`` when given."""
    out: dict[str, float] = {
        "pointing_game": float(metrics.pointing_game(values, lesion, region)),
        "pixel_auroc": metrics.pixel_auroc(values, lesion, region),
        "pixel_auprc": metrics.pixel_auprc(values, lesion, region),
    }
    for k in K_PERCENTS:
        iou, dice = metrics.topk_iou_dice(values, lesion, k, region)
        out[f"iou_top{k:g}"], out[f"dice_top{k:g}"] = iou, dice
    out["energy_share"] = metrics.energy_share(values, lesion, region) if np.abs(values).sum() > 0 else math.nan
    return out


def method_maps(x: NDArray[np.float32], cfs: NDArray[np.float32], recon: NDArray[np.float32],
                empty_cf: NDArray[np.float32], rng_seed: int) -> dict[str, NDArray[np.float32]]:
    """Every compared map for one image (see the module docstring); all (H, W) float32, higher = more attributed."""
    s = len(cfs)
    maps = {
        "cf_input": attribution.difference_map(x, cfs[0]).magnitude,
        "cf_recon": attribution.difference_map(recon, cfs[0]).magnitude,
    }
    if s > 1:
        maps[f"cf_input_mean{s}"] = attribution.difference_map(x, cfs).magnitude
        maps[f"cf_recon_mean{s}"] = attribution.difference_map(recon, cfs).magnitude
    maps["empty_input"] = attribution.difference_map(x, empty_cf).magnitude
    maps["empty_recon"] = attribution.difference_map(recon, empty_cf).magnitude
    maps["intensity"] = x.astype(np.float32)
    maps["random"] = np.random.default_rng(rng_seed).random(x.shape, dtype=np.float32)
    return maps


def describe_method(method: str) -> str:
    """Human description of a method id."""
    fixed = {"cf_input": "counterfactual map, reference = input, 1 sample (paper)",
             "cf_recon": "counterfactual map, reference = autoencoder reconstruction, 1 sample",
             "empty_input": "baseline: empty prompt \"\" through the same pipeline, reference = input",
             "empty_recon": "baseline: empty prompt \"\", reference = reconstruction",
             "intensity": "baseline: plain image intensity", "random": "baseline: uniform random map"}
    if method in fixed:
        return fixed[method]
    ref = "input" if method.startswith("cf_input") else "reconstruction"
    return f"counterfactual map, reference = {ref}, mean of {method.rsplit('mean', 1)[1]} samples"


def _outline(img: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    rgb = np.repeat(imaging.to_uint8(img)[..., None], 3, axis=2)
    width = max(1, min(img.shape) // 256)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    rgb[edge] = (255, 40, 40)
    return rgb


# ----------------------------------------------------------------------------------------------------------------
# localization run
# ----------------------------------------------------------------------------------------------------------------
def localize_run(engine: CounterfactualEngine, data: Path, out: Path, settings: LocalizeSettings | None = None, *,
                 stream: IO[str] | None = None) -> dict[str, Any]:
    """Score every map of every case; write per-image CSV, summary JSON/markdown and an example figure.

    Order: 1. check settings, read cases (and earlier results: the run resumes, ``per_image.jsonl`` marks done
    images); 2. per image: one healthy generation with ``samples`` samples and one empty-prompt generation, both
    with the image's seed; all maps; all metrics; 3. aggregates with bootstrap CIs and paired comparisons.

    Args:
        engine: a loaded engine. data: see :func:`read_lesion_cases`.
        out: the run folder. settings: what to score and how (default :class:`LocalizeSettings`).
        stream: progress lines (stderr by default).

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        ValueError: bad settings or a folder made with other settings. FileNotFoundError: see read_lesion_cases.
    """
    # 1. settings, cases and the run record
    st = settings if settings is not None else LocalizeSettings()
    st.check()
    stream = stream if stream is not None else sys.stderr
    cases = read_lesion_cases(Path(data), masks=st.masks, regions=st.regions, limit=st.limit)
    out = Path(out)
    run_record = {"vald_md_localize": 1, "prompt": st.prompt, "strength": st.strength,
                  "guidance_scale": st.guidance_scale, "steps": st.steps, "samples": st.samples, "seed": st.seed,
                  "scheduler": st.scheduler.value, "model_hash": engine.info.model_hash, "model": engine.info.path,
                  "data": str(data), "masks": str(st.masks) if st.masks else None,
                  "regions": str(st.regions) if st.regions else None,
                  "box_frame": BOX_FRAME if st.masks is None else None, "library_versions": library_versions(),
                  "created_at": now_iso()}
    check_same_settings(out / "run.json", run_record, RUN_KEYS)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run.json").is_file():
        write_json(out / "run.json", run_record)
    done = {r["image"]: r for r in read_jsonl(out / "per_image.jsonl", repair=True)}

    # 2. per image
    progress = Progress(len(cases), "localize", stream)
    examples: list[list[NDArray[Any]]] = []
    example_names: list[str] = []
    example_titles: list[str] = []
    for case in cases:
        if case.name in done and len(examples) >= st.figure_rows:
            progress.skip()
            continue
        x = load_gray(case.path)
        lesion = lesion_mask(case, x.shape)
        region = load_mask(case.region_path, x.shape) if case.region_path else None
        inside = lesion if region is None else lesion & region
        if not inside.any() or (region is None and inside.all()) or (region is not None and (region <= lesion).all()):
            logger.warning("%s: lesion mask empty or covering the whole region; skipped", case.name)
            progress.step(f"{case.name}: skipped (degenerate lesion mask)")
            continue
        s = item_seed(st.seed, case.name)
        res = engine.generate_request(x, replace(st, seed=s))
        empty = engine.generate_request(x, replace(st, prompt="", seed=s, samples=1))
        maps = method_maps(x, res.counterfactuals, res.reconstruction, empty.counterfactuals[0], s)
        if len(examples) < st.figure_rows:
            shown = [k for k in maps if k.startswith(("cf_", "empty_input"))]
            examples.append([_outline(x, lesion), *(hot_colormap(maps[k]) for k in shown)])
            example_names.append(case.name)
            example_titles = ["input + lesion", *shown]
        if case.name in done:
            progress.skip()
            continue
        rec = {"image": case.name, "seed": s, "shape": list(x.shape),
               "lesion_fraction": float(inside.sum() / (region.sum() if region is not None else x.size)),
               "scores": {k: score_map(m, lesion, region) for k, m in maps.items()},
               "effective_steps": res.effective_steps, "timings_s": {"healthy": round(res.timings_s["total"], 3),
                                                                     "empty": round(empty.timings_s["total"], 3)}}
        append_jsonl(out / "per_image.jsonl", rec)
        done[case.name] = rec
        progress.step(f"{case.name} seed {s}")

    # 3. aggregates
    records = [done[c.name] for c in cases if c.name in done]
    summary = summarize_localization(records, n_boot=st.n_boot)
    summary["settings"] = json.loads((out / "run.json").read_text())
    summary["methods"] = {m: describe_method(m) for m in summary["aggregate"]}
    _write_per_image_csv(out / "per_image.csv", records)
    if examples:
        image_grid(examples, column_titles=example_titles, row_titles=example_names,
                   title="Localization examples (each map scaled to its own 99.5th percentile)").save(
            _mkdir(out / "figures") / "localize_examples.png")
        summary["figures"] = ["figures/localize_examples.png"]
    write_json(out / "summary.json", summary)
    write_atomic(out / "summary.md", localization_markdown(summary).encode())
    return summary


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _write_per_image_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "method", "seed", "lesion_fraction", *METRICS])
    for r in records:
        for method, sc in r["scores"].items():
            w.writerow([r["image"], method, r["seed"], f"{r['lesion_fraction']:.6f}",
                        *(f"{sc[m]:.6f}" for m in METRICS)])
    write_atomic(path, buf.getvalue().encode())


def _paired(records: Sequence[dict[str, Any]], a: str, b: str, metric: str, n_boot: int) -> dict[str, Any] | None:
    """Mean per-image difference ``a - b`` of ``metric`` with its bootstrap CI; None if either is missing."""
    d = [r["scores"][a][metric] - r["scores"][b][metric] for r in records
         if a in r["scores"] and b in r["scores"]
         and math.isfinite(r["scores"][a][metric]) and math.isfinite(r["scores"][b][metric])]
    if not d:
        return None
    est, lo, hi = metrics.bootstrap_ci(d, n_boot=n_boot)
    verdict = f"{a} better" if lo > 0 else f"{b} better" if hi < 0 else "no significant difference"
    return {"a": a, "b": b, "metric": metric, "mean_difference": est, "ci95": [lo, hi], "n": len(d),
            "verdict": verdict}


def summarize_localization(records: Sequence[dict[str, Any]], *, n_boot: int = 2000) -> dict[str, Any]:
    """Aggregate per-image scores: mean and 95 % CI per method and metric, paired comparisons, a reference verdict.

    Returns:
        ``{"n_images", "chance", "aggregate": {method: {metric: {mean, ci95, n}}}, "comparisons": [...],
        "reference": {...}}``.
    """
    if not records:
        return {"n_images": 0, "aggregate": {}, "comparisons": [], "reference": None, "chance": {}}
    methods = list(records[0]["scores"])
    agg: dict[str, dict[str, Any]] = {}
    for m in methods:
        agg[m] = {}
        for metric in METRICS:
            v = [r["scores"][m][metric] for r in records if math.isfinite(r["scores"][m][metric])]
            if v:
                est, lo, hi = metrics.bootstrap_ci(v, n_boot=n_boot)
                agg[m][metric] = {"mean": est, "ci95": [lo, hi], "n": len(v)}
            else:
                agg[m][metric] = {"mean": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    frac = float(np.mean([r["lesion_fraction"] for r in records]))
    chance = {"pixel_auroc": 0.5, "pixel_auprc": frac, "energy_share": frac, "pointing_game": frac}
    mean_ids = [m for m in methods if m.startswith("cf_input_mean")]
    pairs = [("cf_recon", "cf_input")]
    if mean_ids:
        s = mean_ids[0].removeprefix("cf_input_mean")
        pairs += [(f"cf_recon_mean{s}", f"cf_input_mean{s}"), (f"cf_input_mean{s}", "cf_input"),
                  (f"cf_recon_mean{s}", "cf_recon")]
    pairs += [("cf_input", "empty_input"), ("cf_recon", "empty_recon"), ("cf_input", "intensity"),
              ("cf_input", "random")]
    comparisons = [c for a, b in pairs for metric in METRICS if (c := _paired(records, a, b, metric, n_boot))]

    # which reference localizes better: primary metric on the best-averaged maps, and a tally over all metrics
    a, b = (f"cf_recon_mean{mean_ids[0].removeprefix('cf_input_mean')}", mean_ids[0]) if mean_ids else (
        "cf_recon", "cf_input")
    primary = next((c for c in comparisons if (c["a"], c["b"], c["metric"]) == (a, b, PRIMARY_METRIC)), None)
    ref_cmp = [c for c in comparisons if (c["a"], c["b"]) in (("cf_recon", "cf_input"), (a, b))]
    tally = {"reconstruction": sum(c["mean_difference"] > 0 for c in ref_cmp),
             "input": sum(c["mean_difference"] < 0 for c in ref_cmp), "comparisons": len(ref_cmp)}
    if primary is None:
        reference: dict[str, Any] = {"better": None, "statement": "no comparison possible"}
    else:
        better = "reconstruction" if primary["mean_difference"] > 0 else "input"
        significant = primary["verdict"] != "no significant difference"
        lo, hi = primary["ci95"]
        reference = {
            "better": better, "significant": significant, "primary": primary, "tally": tally,
            "statement": (
                f"Map reference: '{better}' localizes better by {PRIMARY_METRIC} ({a} - {b} = "
                f"{primary['mean_difference']:+.4f}, 95 % CI [{lo:+.4f}, {hi:+.4f}], N = {primary['n']}); "
                + ("the difference is significant at this N" if significant
                   else "the CI includes 0, so the difference is not significant at this N")
                + f". Over all metrics and both sample counts, reconstruction is ahead in {tally['reconstruction']} "
                  f"and input in {tally['input']} of {tally['comparisons']} comparisons."),
        }
    return {"n_images": len(records), "chance": chance, "aggregate": agg, "comparisons": comparisons,
            "reference": reference, "created_at": now_iso()}


def _ci(cell: dict[str, Any], digits: int = 3) -> str:
    lo, hi = cell["ci95"]
    return "n/a" if not math.isfinite(cell["mean"]) else f"{cell['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def localization_markdown(summary: dict[str, Any]) -> str:
    """The localization summary as markdown: verdict first, then the method table and paired comparisons."""
    st = summary.get("settings", {})
    lines = ["# VALD-MD localization", "",
             f"N = {summary['n_images']} images with lesions; data `{st.get('data')}`"
             + (f", region masks `{st['regions']}`" if st.get("regions") else "") + "; model hash "
             f"`{st.get('model_hash')}`; prompt {st.get('prompt')!r}, strength {st.get('strength')}, guidance "
             f"{st.get('guidance_scale')}, steps {st.get('steps')}, samples {st.get('samples')}, base seed "
             f"{st.get('seed')} (per-image seeds in per_image.jsonl), scheduler {st.get('scheduler')}.", ""]
    ref = summary.get("reference") or {}
    lines += ["## Which map reference localizes better", "", ref.get("statement", "n/a"), ""]
    ch = summary.get("chance", {})
    lines += ["## Metrics per method (mean [95 % bootstrap CI] over images)", "",
              (f"Chance levels: pixel AUROC 0.5; AUPRC and energy share ≈ lesion fraction "
              f"{ch.get('pixel_auprc', math.nan):.3f}."), "",
              "| Method | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for m, cells in summary["aggregate"].items():
        lines.append(f"| `{m}` | " + " | ".join(_ci(cells[k]) for k in METRICS) + " |")
    lines += ["", "Methods: " + "; ".join(f"`{k}` = {v}" for k, v in summary.get("methods", {}).items()), "",
              "## Paired comparisons (per-image difference a - b, mean [95 % CI])", "",
              "| a | b | metric | a - b | verdict |", "|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lo, hi = c["ci95"]
        lines.append(f"| `{c['a']}` | `{c['b']}` | {c['metric']} | {c['mean_difference']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {c['verdict']} |")
    for f in summary.get("figures", []):
        lines += ["", f"![{f}]({f})"]
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in st.get("library_versions", {}).items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# laterality of localized disease induction
# ----------------------------------------------------------------------------------------------------------------
def image_right_share(values: NDArray[Any]) -> float:
    """Share of ``sum |values|`` in the image's right half (the middle column of an odd width is left out)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    w = v.shape[1]
    left, right = v[:, : w // 2].sum(), v[:, w - w // 2:].sum()
    return float(right / (left + right)) if left + right > 0 else math.nan


def laterality_summary(subruns: Sequence[Path], *, n_boot: int = 2000) -> dict[str, Any]:
    """Energy on the named side for induce sub-runs whose prompt names one side.

    The map is ``|map.npy|`` (input - counterfactual, mean over samples). The patient's left is the image's right
    (PA view), so for "left" the named-side share is the image-right share.

    Returns:
        ``{"prompts": [{prompt, side, n, named_side_share: {mean, ci95}, fraction_named_side_majority}],
        "paired": {...} | None, "convention": str}``.
    """
    per_prompt: list[dict[str, Any]] = []
    right_share: dict[str, dict[str, float]] = {}
    for run in subruns:
        meta, recs = read_run(Path(run))
        side = prompt_side(meta["prompt"])
        if side is None:
            continue
        shares = {r["input"]: image_right_share(np.load(Path(run) / r["outputs"]["map"]).astype(np.float32))
                  for r in recs}
        shares = {k: v for k, v in shares.items() if math.isfinite(v)}
        right_share[side] = shares
        named = [v if side == "left" else 1 - v for v in shares.values()]
        if not named:
            continue
        est, lo, hi = metrics.bootstrap_ci(named, n_boot=n_boot)
        per_prompt.append({"prompt": meta["prompt"], "side": side, "folder": str(run), "n": len(named),
                           "named_side_share": {"mean": est, "ci95": [lo, hi]},
                           "fraction_named_side_majority": float(np.mean([v > 0.5 for v in named]))})
    paired = None
    if "left" in right_share and "right" in right_share:
        common = sorted(set(right_share["left"]) & set(right_share["right"]))
        if common:
            d = [right_share["left"][k] - right_share["right"][k] for k in common]
            est, lo, hi = metrics.bootstrap_ci(d, n_boot=n_boot)
            paired = {"n": len(common), "mean_difference": est, "ci95": [lo, hi],
                      "meaning": "image-right energy share under the 'left' prompt minus under the 'right' prompt, "
                                 "same image and seed; > 0 means the prompts move the change to the named side"}
    return {"prompts": per_prompt, "paired": paired,
            "convention": "patient's left = image right (PA view); share = sum|M| on the named half / both halves"}


def laterality_markdown(lat: dict[str, Any]) -> list[str]:
    """Markdown lines of a laterality summary."""
    lines = ["## Laterality of localized disease induction", "", f"Convention: {lat['convention']}.", "",
             "| Prompt | Side | N | Energy share on named side (mean [95 % CI]) | Images with > 50 % on named side |",
             "|---|---|---|---|---|"]
    for p in lat["prompts"]:
        s = p["named_side_share"]
        lines.append(f"| {p['prompt']!r} | {p['side']} | {p['n']} | {s['mean']:.3f} [{s['ci95'][0]:.3f}, "
                     f"{s['ci95'][1]:.3f}] | {100 * p['fraction_named_side_majority']:.1f} % |")
    if lat.get("paired"):
        pr = lat["paired"]
        lines += ["", (f"Paired (N = {pr['n']}): {pr['meaning']}: {pr['mean_difference']:+.4f} "
                      f"[{pr['ci95'][0]:+.4f}, {pr['ci95'][1]:+.4f}].")]
    return lines


def laterality_run(engine: CounterfactualEngine, data: Path, out: Path, settings: LateralitySettings | None = None,
                   *, stream: IO[str] | None = None) -> dict[str, Any]:
    """Induce each localized prompt on the same normal images (``generate --induce``, resumable) and summarise.

    Writes ``out/induce-<prompt>/`` sub-runs (readable by ``tables``) and ``laterality.json`` / ``.md``.

    Args:
        engine: a loaded engine. data: labels CSV or class-folder tree. out: the run folder.
        settings: what to induce (default :class:`LateralitySettings`). stream: progress lines (stderr by default).

    Raises:
        ValueError: a prompt names no side or both, or see :func:`generate_run`.
    """
    st = settings if settings is not None else LateralitySettings()
    st.check()
    runs = []
    for p in st.prompts:
        s = GenerateSettings(mode="induce", prompt=p, strength=st.strength, guidance_scale=st.guidance_scale,
                             steps=st.steps, split=st.split, labels=(HEALTHY_LABEL,), limit=st.limit,
                             samples=st.samples, seed=st.seed, scheduler=st.scheduler, target_label=None)
        runs.append(generate_run(engine, Path(data), Path(out), s, stream=stream).folder)
    summary = laterality_summary(runs)
    summary["model_hash"] = engine.info.model_hash
    summary["library_versions"] = library_versions()
    write_json(Path(out) / "laterality.json", summary)
    md = ["# VALD-MD laterality check", "", f"Model hash `{engine.info.model_hash}`; strength {st.strength}, "
          f"guidance {st.guidance_scale}, steps {st.steps}, samples {st.samples}, base seed {st.seed}; sub-runs "
          + ", ".join(f"`{r.name}`" for r in runs) + " (per-image seeds in their records.jsonl).", "",
          *laterality_markdown(summary), "",
          "Library versions: " + ", ".join(f"{k} {v}" for k, v in summary["library_versions"].items())]
    write_atomic(Path(out) / "laterality.md", ("\n".join(md) + "\n").encode())
    return summary
