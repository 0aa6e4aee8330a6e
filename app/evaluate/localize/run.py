"""The localization run (``vald-md evaluate localize``): generate on every lesion case, score every map, summarise."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from app import imaging
from app.engine import CounterfactualEngine
from app.evaluate.common import (
    Progress,
    append_jsonl,
    check_same_settings,
    hot_colormap,
    image_grid,
    item_seed,
    load_gray,
    load_mask,
    now_iso,
    read_jsonl,
    write_atomic,
    write_json,
)
from app.evaluate.localize.cases import BOX_FRAME, lesion_mask, read_lesion_cases
from app.evaluate.localize.scores import (
    describe_method,
    localization_markdown,
    method_maps,
    score_map,
    summarize_localization,
    write_per_image_csv,
)
from app.generation import GenerationRequest
from app.provenance import library_versions

__all__ = ["RUN_KEYS", "LocalizeSettings", "localize_run"]

logger = logging.getLogger("vald_md.evaluate.localize")

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
    assert st.seed is not None  # check() refused a missing base seed
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
    write_per_image_csv(out / "per_image.csv", records)
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
