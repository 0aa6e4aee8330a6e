"""The paper's Tables 1-4, counterfactual validity and Figures 2/3 from a run folder of ``generate`` sub-runs.

* **Table 1** per disease class C: FID(real C, generated healthy from C), FID(real C, real healthy) and their
  relative absolute difference ``|a - b| / b`` -- a healthy counterfactual set should sit as far from C as
  real healthy images do.
* **Table 2** per C: FID(real healthy, generated healthy from C), and all disease classes pooled; counterfactuals
  of normal images (``generate --labels ...,normal``) get a Table 2 row of their own but no Table 1 row.
* **Table 3** per C: MS-SSIM and SSIM between each diseased image and its counterfactual, mean +- sd.
* **Table 4** per induced class X (``generate --induce``): FID(real X, generated X), FID(real healthy,
  generated X).
* **Validity**: share of diseased images the oracle (``train-oracle``) calls normal, originals vs counterfactuals;
  for induction, share of normal images it calls abnormal, originals vs induced.
* **Laterality** of localized induction prompts ("opacity in the left lung"), when such sub-runs exist.

Generated images enter FID as their 8-bit PNGs, real images as their 8-bit files, both decoded the same way.
The first sample of each image is used when a run made several. FID's trace term is computed exactly in the
span of the samples (:func:`frechet_distance_lowrank`), equal to ``tr sqrtm(S1 S2)`` without a 2048-d ``sqrtm``;
``fid_method="sqrtm"`` uses :func:`app.metrics.fid_from_features` instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from app import imaging, metrics
from app.evaluate.common import (
    HEALTHY_LABEL,
    PAPER_DISEASE_LABELS,
    PAPER_INDUCED_LABELS,
    hot_colormap,
    image_grid,
    load_gray,
    load_u8,
    mean_sd,
    now_iso,
    prompt_side,
    read_items,
    select,
    slug,
    write_atomic,
    write_json,
)
from app.evaluate.generate import find_subruns, read_run
from app.provenance import library_versions

logger = logging.getLogger("vald_md.evaluate.tables")

FID_METHODS = ("lowrank", "sqrtm")


class FeatureExtractor(Protocol):
    """What FID needs: ``features(images) -> (N, D)`` and ``describe() -> dict`` (see FIDFeatureExtractor)."""

    def features(self, images: Iterable[Any]) -> NDArray[np.float64]:
        """(N, D) features of (H, W) uint8 or [0, 1] float images."""
        ...

    def describe(self) -> dict[str, Any]:
        """Implementation and weights, for the report."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------------
def frechet_distance_lowrank(f1: NDArray[Any], f2: NDArray[Any]) -> float:
    """FID of two feature sets, with the trace of the matrix square root computed in the samples' span.

    With centred features ``A = (f1 - mu1) / sqrt(n1 - 1)`` and ``B = (f2 - mu2) / sqrt(n2 - 1)``, the covariances
    are ``S1 = A^T A`` and ``S2 = B^T B``; the non-zero eigenvalues of ``S1 S2`` are the squared singular values
    of ``A B^T`` (n1 x n2), so ``tr sqrtm(S1 S2) = ||A B^T||_*`` (nuclear norm) exactly. This costs
    ``O(n1 n2 D)`` instead of a ``D x D`` ``sqrtm`` (~45 s at D = 2048 on a CPU) and avoids ``sqrtm``'s
    inaccuracy on the singular covariances of sets smaller than D.

    Args:
        f1: (N1, D) features, N1 >= 2. f2: (N2, D) features, N2 >= 2.

    Returns:
        ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 ||A B^T||_*`` (>= 0 up to rounding).

    Raises:
        ValueError: not 2-D, different D, or fewer than 2 samples.
    """
    a, b = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID: expected (N, D) feature arrays with N >= 2 and one D, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    ca = (a - mu1) / math.sqrt(len(a) - 1)
    cb = (b - mu2) / math.sqrt(len(b) - 1)
    nuclear = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * nuclear)


class FeatureCache:
    """Features per image set, computed once per ``tables`` call and cached on disk by content of the request.

    The disk key is the SHA-256 of the extractor's ``describe()`` and each file's path, size and mtime, so a
    regenerated image or another network never reuses stale features.
    """

    def __init__(self, extractor: FeatureExtractor, folder: Path | None) -> None:
        self.extractor = extractor
        self.folder = folder
        self._ident = json.dumps(extractor.describe(), sort_keys=True, default=str)

    def get(self, paths: Sequence[Path]) -> NDArray[np.float64]:
        """(N, D) features of the image files (8-bit view), in order."""
        h = hashlib.sha256(self._ident.encode())
        for p in paths:
            st = Path(p).stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        target = self.folder / f"{h.hexdigest()[:32]}.npy" if self.folder else None
        if target is not None and target.is_file():
            return np.asarray(np.load(target), dtype=np.float64)
        feats = np.asarray(self.extractor.features(load_u8(p) for p in paths), dtype=np.float64)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, feats)
        return feats


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pm(mean: float, sd: float, digits: int = 4) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}"


def _share(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def build_tables(run_dir: Path, data: Path | None = None, *, out: Path | None = None, split: str | None = None,
                 extractor: FeatureExtractor | None = None, oracle_dir: Path | None = None,
                 real_limit: int | None = None, figure_rows: int = 4, fid_method: str = "lowrank",
                 device: str = "cpu", stream: IO[str] | None = None) -> dict[str, Any]:
    """Compute every table of the run folder and write ``tables.md``, ``tables.json`` and ``figures/*.png``.

    Args:
        run_dir: a run folder (``generate --out``) or one sub-run. data: the labels CSV / folder the run used
            (default: the one its ``run.json`` names). out: output folder (default ``run_dir/tables``).
        split: split of the real reference sets (default: the healthy sub-run's). extractor: FID features
            (default :class:`app.metrics.FIDFeatureExtractor` on ``device``). oracle_dir: ``train-oracle``
            output for the validity table (None = skipped). real_limit: cap per real set (None = the whole
            split). figure_rows: examples per figure. fid_method: ``lowrank`` (exact, fast) or ``sqrtm``.
        stream: progress messages (stderr by default).

    Returns:
        The JSON report (also written to ``tables.json``).

    Raises:
        FileNotFoundError: no sub-run in ``run_dir``. ValueError: bad ``fid_method`` or too few images for FID.
    """
    # 1. check inputs; read the sub-runs
    if fid_method not in FID_METHODS:
        raise ValueError(f"fid_method={fid_method!r} must be one of {', '.join(FID_METHODS)}")
    stream = stream if stream is not None else sys.stderr
    subruns = [(p, *read_run(p)) for p in find_subruns(Path(run_dir))]
    healthy = [s for s in subruns if s[1]["mode"] == "healthy"]
    induced = [s for s in subruns if s[1]["mode"] == "induce"]
    first_meta = (healthy or induced)[0][1]
    split = split if split is not None else first_meta.get("split")
    data = Path(data) if data is not None else Path(first_meta["data"])
    root, items = read_items(data, split)
    out = Path(out) if out is not None else Path(run_dir) / "tables"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    if extractor is None:
        extractor = metrics.FIDFeatureExtractor(device=device)
    cache = FeatureCache(extractor, out / "fid_cache")
    fid_fn: Callable[[NDArray[Any], NDArray[Any]], float] = (
        frechet_distance_lowrank if fid_method == "lowrank" else metrics.fid_from_features)
    present = sorted({it.label for it in items})

    def real_paths(label: str) -> list[Path]:
        return [it.path for it in select(items, [label], real_limit)] if label in present else []

    def fid(name: str, p1: list[Path], p2: list[Path]) -> dict[str, Any]:
        stream.write(f"tables: FID {name} ({len(p1)} vs {len(p2)} images)\n")
        stream.flush()
        if len(p1) < 2 or len(p2) < 2:
            return {"fid": None, "n1": len(p1), "n2": len(p2), "note": "FID needs >= 2 images per set"}
        return {"fid": fid_fn(cache.get(p1), cache.get(p2)), "n1": len(p1), "n2": len(p2)}

    real_healthy = real_paths(HEALTHY_LABEL)
    report: dict[str, Any] = {"vald_md_tables": 1, "created_at": now_iso(), "run_dir": str(run_dir),
                              "data": str(data), "split": split, "labels_in_data": present}

    # 2. Tables 1-3 from the healthy sub-run
    t1: list[dict[str, Any]] = []
    t2: list[dict[str, Any]] = []
    t3: list[dict[str, Any]] = []
    for run, _meta, recs in healthy:
        by_label: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            by_label.setdefault(r["label"], []).append(r)
        pooled: list[Path] = []
        for label in sorted(by_label):
            rs = by_label[label]
            gen = [run / r["outputs"]["counterfactuals"][0] for r in rs]
            if label != HEALTHY_LABEL:  # Table 1 and the pooled row are about disease classes (as the paper's)
                pooled += gen
                real_c = real_paths(label)
                a = fid(f"real {label} vs generated healthy", real_c, gen)
                b = fid(f"real {label} vs real healthy", real_c, real_healthy)
                rel = (abs(a["fid"] - b["fid"]) / b["fid"]
                       if a["fid"] is not None and b["fid"] is not None and b["fid"] > 1e-6 else None)
                t1.append({"class": label, "fid_class_vs_generated_healthy": a["fid"],
                           "fid_class_vs_real_healthy": b["fid"], "relative_absolute_difference": rel,
                           "n_real_class": len(real_c), "n_generated_healthy": len(gen),
                           "n_real_healthy": len(real_healthy)})
            c = fid(f"real healthy vs generated healthy from {label}", real_healthy, gen)
            t2.append({"generated_from": label, "fid_real_healthy_vs_generated_healthy": c["fid"],
                       "n_real_healthy": len(real_healthy), "n_generated_healthy": len(gen)})
            ssims, msssims, change_input, change_recon = [], [], [], []
            for r in rs:
                gray = load_gray(root / r["input"])
                orig = imaging.to_uint8(gray).astype(np.float64) / 255.0  # the 8-bit view, as load_u8 gives
                cf = load_u8(run / r["outputs"]["counterfactuals"][0]).astype(np.float64) / 255.0
                ssims.append(metrics.ssim(orig, cf))
                msssims.append(metrics.ms_ssim(orig, cf) if min(orig.shape) > 160 else math.nan)
                m_in, m_rec = _map_change(run, r, gray)
                change_input.append(m_in)
                change_recon.append(m_rec)
            ms_mean, ms_sd = mean_sd(msssims)
            s_mean, s_sd = mean_sd(ssims)
            ci_mean, ci_sd = mean_sd(change_input)
            cr_mean, cr_sd = mean_sd(change_recon)
            t3.append({"class": label, "ms_ssim_mean": ms_mean, "ms_ssim_sd": ms_sd, "ssim_mean": s_mean,
                       "ssim_sd": s_sd, "n": len(rs),
                       "mean_abs_map_input_mean": ci_mean, "mean_abs_map_input_sd": ci_sd,
                       "mean_abs_map_reconstruction_mean": cr_mean, "mean_abs_map_reconstruction_sd": cr_sd,
                       "note": None if all(map(math.isfinite, msssims)) else "MS-SSIM needs images > 160 px"})
        if len([lab for lab in by_label if lab != HEALTHY_LABEL]) > 1:
            c = fid("real healthy vs generated healthy from all disease classes", real_healthy, pooled)
            t2.append({"generated_from": "all disease classes", "fid_real_healthy_vs_generated_healthy": c["fid"],
                       "n_real_healthy": len(real_healthy), "n_generated_healthy": len(pooled)})
    report.update(table1=t1, table2=t2, table3=t3)

    # 3. Table 4 from the disease-induction sub-runs that name a class
    t4: list[dict[str, Any]] = []
    for run, meta, recs in induced:
        target = meta.get("target_label")
        if not target:
            continue
        gen = [run / r["outputs"]["counterfactuals"][0] for r in recs]
        real_x = real_paths(target)
        a = fid(f"real {target} vs induced {target}", real_x, gen)
        b = fid(f"real healthy vs induced {target}", real_healthy, gen)
        t4.append({"induced_class": target, "prompt": meta["prompt"], "fid_real_class_vs_generated": a["fid"],
                   "fid_real_healthy_vs_generated": b["fid"], "n_real_class": len(real_x),
                   "n_generated": len(gen), "n_real_healthy": len(real_healthy),
                   "note": None if real_x else f"the data has no real '{target}' images"})
    report["table4"] = t4

    # 4. validity by the oracle
    if oracle_dir is not None:
        report["validity"] = _validity(Path(oracle_dir), root, healthy, induced)

    # 5. laterality of localized prompts
    lateral = [s[0] for s in induced if not s[1].get("target_label") and prompt_side(s[1]["prompt"])]
    if lateral:
        from app.evaluate.localize import laterality_summary

        report["laterality"] = laterality_summary(lateral)

    # 6. figures like the paper's Figures 2 (healthy counterfactuals) and 3 (induction)
    figures: list[str] = []
    for run, meta, recs in healthy:
        for label in sorted({r["label"] for r in recs}):
            rs = [r for r in recs if r["label"] == label][:figure_rows]
            name = f"figure2_healthy_from_{slug(label)}.png"
            _figure(out / "figures" / name, root, run, rs, f"Healthy counterfactuals of {label} ({meta['prompt']!r})",
                    ("original", "generated healthy", "|difference|"))
            figures.append(f"figures/{name}")
    for run, meta, recs in induced:
        name = f"figure3_{run.name}.png"
        _figure(out / "figures" / name, root, run, recs[:figure_rows], f"Disease induction: {meta['prompt']!r}",
                ("original (normal)", "generated", "|difference|"))
        figures.append(f"figures/{name}")
    report["figures"] = figures

    # 7. provenance
    report["provenance"] = {
        "fid_features": extractor.describe(),
        "fid_method": ("exact low-rank trace: tr sqrtm(S1 S2) = nuclear norm of A B^T "
                       "(app.evaluate.tables.frechet_distance_lowrank)" if fid_method == "lowrank"
                       else "app.metrics.fid_from_features (scipy.linalg.sqrtm)"),
        "fid_inputs": "8-bit images (real files and generated PNGs), first sample per image",
        "runs": [{"folder": str(run), **{k: meta.get(k) for k in (
            "mode", "prompt", "negative_prompt", "target_label", "strength", "guidance_scale", "steps",
            "effective_steps", "scheduler", "samples", "seed", "seed_rule", "split", "labels", "limit", "model_hash",
            "model", "library_versions", "created_at")}, "n_images": len(recs)} for run, meta, recs in subruns],
        "model_hashes": sorted({meta["model_hash"] for _, meta, _ in subruns}),
        "library_versions": library_versions(),
        "real_limit_per_set": real_limit,
        "classes_absent": {
            "tables_1_to_3": [c for c in PAPER_DISEASE_LABELS if c not in present],
            "table_4": [c for c in PAPER_INDUCED_LABELS if c not in present]},
    }
    write_json(out / "tables.json", report)
    write_atomic(out / "tables.md", render_markdown(report).encode())
    return report


def _validity(oracle_dir: Path, root: Path, healthy: list[Any], induced: list[Any]) -> dict[str, Any]:
    """Oracle calls on originals vs generated images, per class (healthy) and per prompt (induction)."""
    from app.evaluate.oracle import Oracle

    oracle = Oracle(oracle_dir)
    thr = oracle.threshold
    rows: list[dict[str, Any]] = []
    for run, _meta, recs in healthy:
        for label in sorted({r["label"] for r in recs}):
            rs = [r for r in recs if r["label"] == label]
            p_orig = oracle.p_abnormal(load_u8(root / r["input"]) for r in rs)
            p_cf = oracle.p_abnormal(load_u8(run / r["outputs"]["counterfactuals"][0]) for r in rs)
            rows.append({"class": label, "n": len(rs), "called_normal_original": _share(list(p_orig < thr)),
                         "called_normal_counterfactual": _share(list(p_cf < thr)),
                         "mean_p_abnormal_original": float(p_orig.mean()),
                         "mean_p_abnormal_counterfactual": float(p_cf.mean())})
    induce_rows: list[dict[str, Any]] = []
    for run, meta, recs in induced:
        p_orig = oracle.p_abnormal(load_u8(root / r["input"]) for r in recs)
        p_gen = oracle.p_abnormal(load_u8(run / r["outputs"]["counterfactuals"][0]) for r in recs)
        induce_rows.append({"prompt": meta["prompt"], "n": len(recs),
                            "called_abnormal_original": _share(list(p_orig >= thr)),
                            "called_abnormal_generated": _share(list(p_gen >= thr))})
    return {"oracle": oracle.describe(), "healthy": rows, "induction": induce_rows}


def _map_change(run: Path, rec: dict[str, Any], inp: NDArray[np.floating[Any]]) -> tuple[float, float]:
    """Mean |M| over the image of one record's map, with the input and with the reconstruction as reference.

    ``inp`` is the record's input image, float (H, W) in [0, 1] (native frame).

    ``map.npy`` holds ``input - mean(counterfactuals)`` (float16, native frame), so the reconstruction-referenced
    map is ``map - (input - reconstruction)``; NaN when the record has no reconstruction of the input's shape.
    """
    m = np.load(run / rec["outputs"]["map"]).astype(np.float64)
    with_input = float(np.abs(m).mean())
    rec_rel = rec["outputs"].get("reconstruction")
    if not rec_rel:
        return with_input, math.nan
    inp = np.asarray(inp, dtype=np.float64)
    recon = load_gray(run / rec_rel).astype(np.float64)
    if inp.shape != m.shape or recon.shape != m.shape:
        return with_input, math.nan
    return with_input, float(np.abs(m - (inp - recon)).mean())


def _figure(path: Path, root: Path, run: Path, recs: list[dict[str, Any]], title: str,
            columns: tuple[str, str, str]) -> None:
    """Original | generated | |map| rows with one colour scale for the whole figure."""
    if not recs:
        return
    maps = [np.abs(np.load(run / r["outputs"]["map"]).astype(np.float32)) for r in recs]
    scale = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99.5)) or 1.0
    rows = [[load_u8(root / r["input"]), load_u8(run / r["outputs"]["counterfactuals"][0]), hot_colormap(m, scale)]
            for r, m in zip(recs, maps, strict=True)]
    grid = image_grid(rows, column_titles=columns, row_titles=[r["label"] for r in recs],
                      title=f"{title}  |difference| white = {scale:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------------------
def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown in the paper's table layout, followed by validity, laterality and provenance."""
    prov = report["provenance"]
    lines = ["# VALD-MD evaluation tables", "",
             (f"Run `{report['run_dir']}`, data `{report['data']}` (split `{report['split']}`), "
             f"created {report['created_at']}."), "",
             ("FID is biased upwards for small sets and is only comparable between sets of equal size: every FID "
             "below states its N. The paper used the full test split."), ""]
    absent = prov["classes_absent"]
    if absent["tables_1_to_3"] or absent["table_4"]:
        t13, t4 = ", ".join(absent["tables_1_to_3"]) or "none", ", ".join(absent["table_4"]) or "none"
        lines += [(f"Classes of the paper absent from this data (no images, so no rows): Tables 1-3: {t13}; "
                  f"Table 4: {t4}."), ""]
    lines += ["## Table 1 — FID of each disease class to generated vs real healthy images", "",
              ("| Class | FID(class, generated healthy) | FID(class, real healthy) | Relative absolute difference | "
              "N class / generated / real healthy |"), "|---|---|---|---|---|"]
    for r in report["table1"]:
        rel = r["relative_absolute_difference"]
        lines.append(f"| {r['class']} | {_fmt(r['fid_class_vs_generated_healthy'])} | "
                     f"{_fmt(r['fid_class_vs_real_healthy'])} | {'n/a' if rel is None else f'{100 * rel:.1f} %'} | "
                     f"{r['n_real_class']} / {r['n_generated_healthy']} / {r['n_real_healthy']} |")
    lines += ["", "## Table 2 — FID between real healthy and generated healthy images", "",
              "| Generated healthy from | FID(real healthy, generated healthy) | N real healthy / generated |",
              "|---|---|---|"]
    for r in report["table2"]:
        lines.append(f"| {r['generated_from']} | {_fmt(r['fid_real_healthy_vs_generated_healthy'])} | "
                     f"{r['n_real_healthy']} / {r['n_generated_healthy']} |")
    lines += ["", "## Table 3 — similarity of each diseased image to its healthy counterfactual", "",
              "| Class | MS-SSIM (mean ± sd) | SSIM (mean ± sd) | N |", "|---|---|---|---|"]
    for r in report["table3"]:
        lines.append(f"| {r['class']} | {_pm(r['ms_ssim_mean'], r['ms_ssim_sd'])} | "
                     f"{_pm(r['ssim_mean'], r['ssim_sd'])} | {r['n']} |")
    lines += ["", "## How much the healthy prompt changes each class (attribution map, mean |M| over the image)", "",
              "Reference = input: M = input − counterfactual (`map.npy`); reference = reconstruction: M = the "
              "autoencoder's reconstruction of the input − counterfactual (cancels the autoencoder's blur). A map "
              "that reacts to disease changes diseased images more than normal ones.", "",
              "| Class | mean \\|M\\|, reference input (mean ± sd) | "
              "mean \\|M\\|, reference reconstruction (mean ± sd) | N |",
              "|---|---|---|---|"]
    for r in report["table3"]:
        lines.append(f"| {r['class']} | {_pm(r['mean_abs_map_input_mean'], r['mean_abs_map_input_sd'])} | "
                     f"{_pm(r['mean_abs_map_reconstruction_mean'], r['mean_abs_map_reconstruction_sd'])} | "
                     f"{r['n']} |")
    lines += ["", "## Table 4 — disease induction on healthy images", "",
              ("| Induced class (prompt) | FID(real X, generated X) | FID(real healthy, generated X) | "
              "N real X / generated / real healthy |"), "|---|---|---|---|"]
    for r in report["table4"]:
        lines.append(f"| {r['induced_class']} ({r['prompt']!r}) | {_fmt(r['fid_real_class_vs_generated'])} | "
                     f"{_fmt(r['fid_real_healthy_vs_generated'])} | {r['n_real_class']} / {r['n_generated']} / "
                     f"{r['n_real_healthy']} |")
    if not report["table4"]:
        lines.append("| (no `generate --induce` sub-run in this run folder) | | | |")
    if "validity" in report:
        v = report["validity"]
        t = v["oracle"].get("test") or {}
        lines += ["", "## Counterfactual validity (oracle)", "",
                  (f"Oracle: {v['oracle'].get('architecture')}; threshold {_fmt(v['oracle'].get('threshold'), 3)} "
                  f"({v['oracle'].get('threshold_rule')}); test accuracy {_fmt(t.get('accuracy'), 3)}, "
                  f"AUROC {_fmt(t.get('auroc'), 3)} (N {t.get('n')})."), "",
                  ("| Class | N | Called normal: original | Called normal: counterfactual | "
                  "Mean p(abnormal) original → counterfactual |"), "|---|---|---|---|---|"]
        for r in v["healthy"]:
            lines.append(f"| {r['class']} | {r['n']} | {_fmt(100 * r['called_normal_original'], 1)} % | "
                         f"{_fmt(100 * r['called_normal_counterfactual'], 1)} % | "
                         f"{_fmt(r['mean_p_abnormal_original'], 3)} → {_fmt(r['mean_p_abnormal_counterfactual'], 3)} |")
        if v["induction"]:
            lines += ["", "| Induction prompt | N | Called abnormal: original | Called abnormal: generated |",
                      "|---|---|---|---|"]
            for r in v["induction"]:
                lines.append(f"| {r['prompt']!r} | {r['n']} | {_fmt(100 * r['called_abnormal_original'], 1)} % | "
                             f"{_fmt(100 * r['called_abnormal_generated'], 1)} % |")
    if "laterality" in report:
        from app.evaluate.localize import laterality_markdown

        lines += ["", *laterality_markdown(report["laterality"])]
    if report["figures"]:
        lines += ["", "## Figures (original | generated | difference)", ""]
        lines += [f"![{f}]({f})" for f in report["figures"]]
    fx = prov["fid_features"]
    lines += ["", "## Provenance", "",
              (f"- FID features: {fx.get('implementation')}; weights `{fx.get('weights_file')}` "
              f"sha256 `{fx.get('weights_sha256')}`; pre-processing: {fx.get('preprocessing')}"),
              f"- FID computation: {prov['fid_method']}; inputs: {prov['fid_inputs']}",
              f"- Real sets: split `{report['split']}`, cap per set: {prov['real_limit_per_set'] or 'none'}",
              f"- Model hash(es): {', '.join(f'`{h}`' for h in prov['model_hashes'])}"]
    for r in prov["runs"]:
        lines.append(f"- Sub-run `{Path(r['folder']).name}`: mode {r['mode']}, prompt {r['prompt']!r}, strength "
                     f"{r['strength']}, guidance {r['guidance_scale']}, steps {r['steps']} (effective "
                     f"{r['effective_steps']}), scheduler {r['scheduler']}, samples {r['samples']}, base seed "
                     f"{r['seed']} ({r['seed_rule']}; each image's seed is in records.jsonl), {r['n_images']} images")
    lines.append("- Library versions: " + ", ".join(f"{k} {v}" for k, v in prov["library_versions"].items()))
    return "\n".join(lines) + "\n"
