"""The laterality of localized disease induction (``vald-md evaluate laterality``): induce "opacity in the left
lung" and "... right lung" on normal images and report the share of each map's energy on the named side; the
patient's left is the image's right (PA view convention)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from app import metrics
from app.engine import CounterfactualEngine
from app.evaluate.common import HEALTHY_LABEL, prompt_side, write_atomic, write_json
from app.evaluate.generate import GenerateSettings, generate_run, read_run
from app.generation import GenerationRequest
from app.provenance import library_versions

__all__ = ["LATERALITY_PROMPTS", "LateralitySettings", "image_right_share", "laterality_markdown", "laterality_run",
           "laterality_summary"]

LATERALITY_PROMPTS = ("opacity in the left lung", "opacity in the right lung")


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
            ValueError: a field out of range, no base seed; a prompt names no side or both.
        """
        super().check()
        if self.seed is None:
            raise ValueError("laterality needs a base seed (--seed)")
        for p in self.prompts:
            if prompt_side(p) is None:
                raise ValueError(f"prompt {p!r} must name exactly one side ('left' or 'right')")


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
    assert st.seed is not None  # check() refused a missing base seed
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
