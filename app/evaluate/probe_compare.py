"""``vald-md evaluate probe-compare``: two probe runs of the same images, compared image by image.

The probe (``app.evaluate.probe``) is how checkpoints, recipes and map settings are chosen; a choice between two of
them needs the *paired* difference, since images differ far more from each other than two models differ on one
image. Given two probe folders (``probe.json`` + ``probe_rows.jsonl``, written by ``vald-md evaluate probe`` with
the same ``--data``, ``--limit`` and ``--seed``: the same images and per-image seeds), this pairs every opacity image
present in both and reports, for one map method of each run (they may differ: ``product`` vs ``product_mean16_pos_s4``),
the mean of each score in A and in B and the mean of B − A with a 95 % bootstrap interval over images, inside the
lungs and over the whole image; plus each run's image-level AUROC (map RMS inside the lungs, opacity vs normal),
which is not per image and so is given side by side, not paired.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.evaluate.probe import SCORES

PARTS = ("lungs", "whole")


class ProbeCompareError(ValueError):
    """The two runs cannot be paired (missing files, no common images, an unknown method)."""


def read_probe(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(``probe.json``'s summary, the per-image rows of ``probe_rows.jsonl`` keyed by image name) of one run."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "probe.json").read_text())
        lines = (folder / "probe_rows.jsonl").read_text().splitlines()
    except FileNotFoundError as e:
        raise ProbeCompareError(f"'{folder}' is not a probe run folder: {Path(e.filename).name} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeCompareError(f"'{folder}': probe.json is not readable JSON ({e})") from e
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows[r["image"]] = r
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ProbeCompareError(f"'{folder}/probe_rows.jsonl' line {n} is not a probe row ({e})") from e
    return summary, rows


def default_method(summary: dict[str, Any]) -> str:
    """The run's model map as the product shows it: the last ``product*`` method scored (the probe lists the
    plain map first and the smoothed / positive variants after it), else ``product``."""
    names = [m for m in summary.get("lungs", {}) if m.startswith("product")]
    return names[-1] if names else "product"


def compare_probes(a: Path, b: Path, *, method_a: str | None = None, method_b: str | None = None,
                   n_boot: int = 2000) -> dict[str, Any]:
    """Pair run ``b`` against run ``a`` image by image.

    Args:
        a, b: probe run folders. method_a, method_b: the map method of each (default: :func:`default_method`).
        n_boot: bootstrap resamples of the paired differences.

    Returns:
        ``{"a": {...}, "b": {...}, "images": N, "only_in_a": k, "only_in_b": k, "lungs": {score: {...}},
        "whole": {...}, "image_auroc_rms": {"a": [auroc, lo, hi] | None, "b": ...}}``; each score's entry holds
        ``a`` and ``b`` (means over the paired images), ``diff`` (mean of b − a) with ``ci`` (95 %) and ``n``.
        Scores with no finite pair are left out.

    Raises:
        ProbeCompareError: unreadable folders, an unknown method, or no image in common.
    """
    sa, ra = read_probe(a)
    sb, rb = read_probe(b)
    ma = method_a or default_method(sa)
    mb = method_b or default_method(sb)
    for name, rows, m in (("A", ra, ma), ("B", rb, mb)):
        known = sorted({k for r in rows.values() for k in r.get("whole", {})})
        if rows and not any(m in r.get("whole", {}) for r in rows.values()):
            raise ProbeCompareError(f"run {name} has no method '{m}'; it has: {', '.join(known)}")
    common = [k for k in ra if k in rb]
    if not common:
        raise ProbeCompareError("the two runs share no image: run both with the same --data and --limit")
    out: dict[str, Any] = {
        "a": {"folder": str(a), "method": ma, "settings": sa.get("settings", {})},
        "b": {"folder": str(b), "method": mb, "settings": sb.get("settings", {})},
        "images": len(common), "only_in_a": len(ra) - len(common), "only_in_b": len(rb) - len(common),
        "image_auroc_rms": {"a": sa.get("image_auroc_lungs_rms", {}).get(ma),
                            "b": sb.get("image_auroc_lungs_rms", {}).get(mb)},
    }
    for part in PARTS:
        out[part] = {}
        for s in SCORES:
            pairs = [(ra[k][part][ma].get(s, math.nan), rb[k][part][mb].get(s, math.nan)) for k in common
                     if ma in ra[k].get(part, {}) and mb in rb[k].get(part, {})]
            pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            if not pairs:
                continue
            va, vb = np.array(pairs, dtype=np.float64).T
            est, lo, hi = metrics.bootstrap_ci(vb - va, n_boot=n_boot)
            out[part][s] = {"a": float(va.mean()), "b": float(vb.mean()), "diff": est, "ci": [lo, hi],
                            "n": len(pairs)}
    return out


def format_comparison(c: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare_probes`' result."""
    a, b = c["a"], c["b"]
    lines = [f"A: {a['folder']} `{a['method']}`", f"B: {b['folder']} `{b['method']}`",
             f"{c['images']} images in both (only in A: {c['only_in_a']}, only in B: {c['only_in_b']})", "",
             "| score | A | B | B − A [95% CI] | n |", "|---|---|---|---|---|"]
    for part in PARTS:
        for s, d in c[part].items():
            lines.append(f"| {s}, {part} | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f} "
                         f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d['n']} |")
    ia, ib = c["image_auroc_rms"]["a"], c["image_auroc_rms"]["b"]
    if ia is not None or ib is not None:
        def cell(v: Any) -> str:
            return "-" if v is None or not math.isfinite(v[0]) else f"{v[0]:.3f}"

        lines.append(f"| image AUROC (RMS), not paired | {cell(ia)} | {cell(ib)} | | |")
    return "\n".join(lines) + "\n"
