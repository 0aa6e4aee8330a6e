"""``vald-md evaluate probe-compare``: two probe runs of the same images, compared image by image.

The probe (``app.evaluate.probe``) is how checkpoints, recipes and map settings are chosen; a choice between two of
them needs the *paired* difference, since images differ far more from each other than two models differ on one
image. Given two probe folders (``probe.json`` + ``probe_rows.jsonl``, written by ``vald-md evaluate probe`` with
the same ``--data``, ``--limit`` and ``--seed``: the same images and per-image seeds), this pairs every opacity image
present in both and reports, for one map method of each run (they may differ: ``product`` vs ``product_mean16_pos_s4``),
the mean of each score in A and in B over the paired images and the mean of B − A with a 95 % bootstrap interval over
images: inside the lungs (``lungs``), over the whole image for the unrestricted map (``whole``) and, where both runs
scored it, for the map as the viewer shows it, zero outside the lungs (``shown``: the probe's ``<method>@lungs``);
plus each run's image-level AUROC (map RMS inside the lungs, opacity vs normal) with its interval, which is not per
image and so is given side by side, not paired. Runs that differ in data, seed, image size or lung segmenter are
still paired, with a warning: their "lungs" are then not the same pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from app import metrics
from app.evaluate.probe import DISPLAYED, SCORES

PARTS = ("lungs", "whole", "shown")
"""Where each score is paired: inside the lungs, the whole image (unrestricted map), the whole image as shown."""
CHECKED = ("data", "seed", "size", "normals")
"""``probe.json`` fields that should agree between two runs being paired (and the segmenter's hash)."""


class ProbeCompareError(ValueError):
    """The two runs cannot be paired (missing files, no common images, an unknown method)."""


def read_probe(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(``probe.json``'s summary, the per-image rows of ``probe_rows.jsonl`` keyed by image name) of one run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeCompareError(f"'{folder}' is not a probe run folder (a folder with probe.json and "
                                "probe_rows.jsonl, written by vald-md evaluate probe --out)")
    texts = {}
    for name in ("probe.json", "probe_rows.jsonl"):
        try:
            texts[name] = (folder / name).read_text()
        except FileNotFoundError:
            raise ProbeCompareError(f"'{folder}' is not a probe run folder: {name} is missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProbeCompareError(f"'{folder / name}' cannot be read ({e})") from None
    try:
        summary = json.loads(texts["probe.json"])
    except json.JSONDecodeError as e:
        raise ProbeCompareError(f"'{folder / 'probe.json'}' is not readable JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ProbeCompareError(f"'{folder / 'probe.json'}' is not a probe summary (a JSON object)")
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(texts["probe_rows.jsonl"].splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows[r["image"]] = r
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ProbeCompareError(f"'{folder}/probe_rows.jsonl' line {n} is not a probe row ({e})") from None
    return summary, rows


def _is_number(v: Any) -> bool:
    """A JSON number (int or float, NaN included), not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _score(row: dict[str, Any], part: str, method: str, score: str) -> float:
    """One score of one row (NaN where the row has none); ``part`` "shown" is the whole-image score of the map
    restricted to the lungs. Raises ProbeCompareError for a value that is not a number."""
    key, m = ("whole", method + DISPLAYED) if part == "shown" else (part, method)
    scores = row.get(key)
    entry = scores.get(m) if isinstance(scores, dict) else None
    v = entry.get(score, math.nan) if isinstance(entry, dict) else math.nan
    if v is None:
        return math.nan
    if not _is_number(v):
        raise ProbeCompareError(f"image {row.get('image')!r}: {score} of {m} is not a number ({v!r})")
    return float(v)


def mismatches(sa: dict[str, Any], sb: dict[str, Any]) -> list[str]:
    """What two probe summaries disagree on that changes which pixels or images are compared."""
    out = [f"{k}: A {sa.get(k)!r}, B {sb.get(k)!r}" for k in CHECKED if sa.get(k) != sb.get(k)]
    ha, hb = ((s.get("segmenter") or {}).get("sha256") for s in (sa, sb))
    if ha != hb:
        out.append(f"lung segmenter: A {str(ha)[:8]}, B {str(hb)[:8]} (the lungs are not the same pixels)")
    return out


def default_method(summary: dict[str, Any]) -> str:
    """The run's own model map: the last ``product*`` method scored (the probe lists the plain map first and the
    smoothed / positive variants after it; e.g. ``product_mean16_pos_s4``), candidates that are not the product's
    map left aside (``product_pos_mean*``, :data:`app.evaluate.probe.CANDIDATE_MAPS`), else ``product``. Its
    whole-image scores as the viewer shows it (restricted to the lungs) are the ``shown`` part of
    :func:`compare_probes`."""
    from app.evaluate.probe import CANDIDATE_MAPS

    names = [m for m in summary.get("lungs", {}) if m.startswith("product") and not m.startswith(CANDIDATE_MAPS)]
    return names[-1] if names else "product"


def compare_probes(a: Path, b: Path, *, method_a: str | None = None, method_b: str | None = None,
                   n_boot: int = 2000) -> dict[str, Any]:
    """Pair run ``b`` against run ``a`` image by image.

    Args:
        a, b: probe run folders. method_a, method_b: the map method of each (default: :func:`default_method`).
        n_boot: bootstrap resamples of the paired differences.

    Returns:
        ``{"a": {...}, "b": {...}, "images": N, "only_in_a": k, "only_in_b": k, "warnings": [str],
        "lungs": {score: {...}}, "whole": {...}, "shown": {...}, "image_auroc_rms": {"a": [auroc, lo, hi] | None,
        "b": ...}}``; each score's entry holds ``a`` and ``b`` (means over the paired images), ``diff`` (mean of
        b − a) with ``ci`` (95 %; NaN for a single pair) and ``n``. Scores with no finite pair are left out.

    Raises:
        ProbeCompareError: unreadable folders, an unknown method, or no image in common.
    """
    sa, ra = read_probe(a)
    sb, rb = read_probe(b)
    ma = method_a or default_method(sa)
    mb = method_b or default_method(sb)
    for name, folder, rows, m in (("A", a, ra, ma), ("B", b, rb, mb)):
        if not rows:
            raise ProbeCompareError(f"run {name} ('{folder}') has no opacity image rows")
        known = sorted({k for r in rows.values() for k in r.get("whole", {})})
        if not any(m in r.get("whole", {}) for r in rows.values()):
            raise ProbeCompareError(f"run {name} has no method '{m}'; it has: {', '.join(known)}")
    common = [k for k in ra if k in rb]
    if not common:
        raise ProbeCompareError("the two runs share no image: run both with the same --data and --limit")
    out: dict[str, Any] = {
        "a": {"folder": str(a), "method": ma, "settings": sa.get("settings", {})},
        "b": {"folder": str(b), "method": mb, "settings": sb.get("settings", {})},
        "images": len(common), "only_in_a": len(ra) - len(common), "only_in_b": len(rb) - len(common),
        "warnings": mismatches(sa, sb),
        "image_auroc_rms": {"a": sa.get("image_auroc_lungs_rms", {}).get(ma),
                            "b": sb.get("image_auroc_lungs_rms", {}).get(mb)},
    }
    for part in PARTS:
        out[part] = {}
        for s in SCORES:
            pairs = [(_score(ra[k], part, ma, s), _score(rb[k], part, mb, s)) for k in common]
            pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            if not pairs:
                continue
            va, vb = np.array(pairs, dtype=np.float64).T
            # one pair gives no interval (a bootstrap of one value is that value)
            est, lo, hi = (metrics.bootstrap_ci(vb - va, n_boot=n_boot) if len(pairs) > 1
                           else (float(vb[0] - va[0]), math.nan, math.nan))
            out[part][s] = {"a": float(va.mean()), "b": float(vb.mean()), "diff": est, "ci": [lo, hi],
                            "n": len(pairs)}
    return out


_PART_LABEL = {"lungs": "lungs", "whole": "whole image, unrestricted", "shown": "whole image as shown"}


def format_comparison(c: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare_probes`' result (means over the paired images), warnings first."""
    a, b = c["a"], c["b"]
    lines = [f"warning: the runs differ in {w}" for w in c.get("warnings", [])]
    lines += [f"A: {a['folder']} `{a['method']}`", f"B: {b['folder']} `{b['method']}`",
              f"{c['images']} images in both (only in A: {c['only_in_a']}, only in B: {c['only_in_b']}); "
              "A and B are means over the paired images", "",
              "| score | A | B | B − A [95% CI] | n |", "|---|---|---|---|---|"]
    for part in PARTS:
        for s, d in c[part].items():
            lo, hi = d["ci"]
            ci = f" [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else " (no interval: n = 1)"
            lines.append(f"| {s}, {_PART_LABEL[part]} | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f}{ci} | "
                         f"{d['n']} |")
    ia, ib = c["image_auroc_rms"]["a"], c["image_auroc_rms"]["b"]
    if ia is not None or ib is not None:
        def cell(v: Any) -> str:
            vals = ([float(x) if _is_number(x) else math.nan for x in v] if isinstance(v, list) and len(v) == 3
                    else [math.nan] * 3)
            if not math.isfinite(vals[0]):
                return "-"
            return f"{vals[0]:.3f}" + (f" [{vals[1]:.3f}, {vals[2]:.3f}]" if math.isfinite(vals[1]) else "")

        lines.append(f"| image AUROC (RMS) [95% CI], not paired | {cell(ia)} | {cell(ib)} | | |")
    return "\n".join(lines) + "\n"
