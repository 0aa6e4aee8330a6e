"""The scores of a localization run: every metric of one map, the compared maps, and their summary (means with
bootstrap CIs, paired comparisons, the reference verdict) as JSON, per-image CSV and markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app import attribution, metrics
from app.evaluate.common import now_iso, write_atomic

__all__ = ["K_PERCENTS", "METRICS", "PRIMARY_METRIC", "describe_method", "localization_markdown", "method_maps",
           "score_map", "summarize_localization", "write_per_image_csv"]

K_PERCENTS = (5.0, 10.0)
METRICS = ("pointing_game", "pixel_auroc", "pixel_auprc", "iou_top5", "dice_top5", "iou_top10", "dice_top10",
           "energy_share")
PRIMARY_METRIC = "pixel_auroc"


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


def write_per_image_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """One CSV row per image and method: image, method, seed, lesion fraction and every metric (6 decimals)."""
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
