"""Bulk counterfactuals for the evaluation: healthy counterfactuals of diseased images, or disease induction.

A *run folder* (``--out RUN_DIR``) holds one sub-run per generation setting:

* ``RUN_DIR/healthy/`` -- healthy counterfactuals (prompt ``"normal chest x-ray"``) of the diseased test images;
* ``RUN_DIR/induce-<prompt slug>/`` -- disease induction on normal images (``--induce "COVID 19"``).

Each sub-run contains ``run.json`` (every setting, model hash, library versions), ``records.jsonl`` (one line per
finished image) and ``items/<input path without suffix>/`` with ``counterfactual.png`` (8-bit; further samples
``counterfactual-<i>.png``), ``map.npy`` (float16 signed ``input - mean(counterfactuals)``, native frame) and
``reconstruction.png`` (16-bit autoencoder round trip of the input). A line in ``records.jsonl`` is written
last, so an image counts as done only when all its files exist; a rerun skips done images (resumable).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from app import attribution, imaging
from app.engine import CounterfactualEngine
from app.evaluate.common import (
    HEALTHY_LABEL,
    PROMPT_LABELS,
    SEED_RULE,
    Item,
    Progress,
    append_jsonl,
    check_same_settings,
    item_seed,
    load_gray,
    now_iso,
    read_items,
    read_jsonl,
    select,
    slug,
    write_atomic,
    write_json,
)
from app.generation import GenerationRequest
from app.provenance import library_versions

logger = logging.getLogger("vald_md.evaluate")

MODES = ("healthy", "induce")
RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"
# settings that must match for a resumed sub-run (labels and limit may grow)
IDENTITY_KEYS = ("mode", "prompt", "negative_prompt", "strength", "guidance_scale", "steps", "scheduler", "samples",
                 "seed", "split", "model_hash")


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(GenerationRequest):
    """What one sub-run generates: the generation (:class:`app.generation.GenerationRequest`; ``prompt`` the
    target prompt, ``seed`` the base seed, see :data:`app.evaluate.common.SEED_RULE`) plus the selection.

    Attributes:
        mode: ``"healthy"`` (counterfactuals of diseased images) or ``"induce"`` (disease induction on normals).
        labels: the classes whose images are used. limit: images per class (None = all).
        target_label: for ``induce``, the class the prompt induces (Table 4), or None (e.g. laterality prompts).
    """

    mode: str
    seed: int = 0
    split: str | None = "test"
    labels: tuple[str, ...] = ()
    limit: int | None = None
    target_label: str | None = None

    def check(self) -> None:
        """Reject bad settings before the first image (the generation's ranges, :meth:`GenerationRequest.check`,
        included).

        Raises:
            ValueError: a generation field out of range, unknown mode, no labels, a non-positive limit or a
                negative seed.
        """
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        if not self.labels:
            raise ValueError("labels is empty; pass --labels covid,viral_pneumonia (healthy) or normal (induce)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be >= 1 image per class")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed} must be >= 0")
        super().check()

    @property
    def subrun(self) -> str:
        """Name of the sub-run folder: ``healthy`` or ``induce-<prompt slug>``."""
        return "healthy" if self.mode == "healthy" else f"induce-{slug(self.prompt)}"


def induced_label(prompt: str, class_prompts: dict[str, str] | None = None) -> str | None:
    """The class a disease-induction prompt names, from the model's class prompts or the paper's; else None."""
    key = prompt.strip().lower()
    for label, text in (class_prompts or {}).items():
        if text.strip().lower() == key and label != HEALTHY_LABEL:
            return label
    return PROMPT_LABELS.get(key)


@dataclass
class GenerateSummary:
    """Outcome of :func:`generate_run`: folder, counts and failures (``(input, message)``)."""

    folder: Path
    total: int
    generated: int
    skipped: int
    failures: list[tuple[str, str]] = field(default_factory=list)


def item_dir(run: Path, rel: str) -> Path:
    """Output folder of one input inside a sub-run: ``items/<rel without suffix>``."""
    return run / "items" / Path(rel).with_suffix("")


def _npy_f16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


# run.json's settings in the order the files have always had (before GenerateSettings became a GenerationRequest):
# resumed and compared sub-runs read the same bytes; a field added later follows these
RUN_SETTINGS_ORDER = ("mode", "prompt", "strength", "guidance_scale", "steps", "split", "labels", "limit", "samples",
                      "seed", "scheduler", "negative_prompt", "target_label")


def _settings_in_run_order(settings: GenerateSettings) -> dict[str, Any]:
    """``asdict(settings)`` with the keys in :data:`RUN_SETTINGS_ORDER`, any other field after them."""
    fields = asdict(settings)
    return {key: fields[key] for key in RUN_SETTINGS_ORDER if key in fields} | fields


def _outputs_exist(run: Path, rec: dict[str, Any]) -> bool:
    files = [*rec.get("outputs", {}).get("counterfactuals", []), rec.get("outputs", {}).get("map"),
             rec.get("outputs", {}).get("reconstruction")]
    return all(f and (run / f).is_file() for f in files)


def generate_run(engine: CounterfactualEngine, data: Path, out: Path, settings: GenerateSettings, *,
                 stream: IO[str] | None = None) -> GenerateSummary:
    """Generate counterfactuals for every selected image into ``out/<settings.subrun>``, skipping done images.

    Order (the code's numbered comments): 1. check settings and the folder's earlier settings, write
    ``run.json``; 2. select images (``limit`` per class, stable order) and read which are done; 3. per image:
    decode, generate with the image's own seed, write PNGs, map and reconstruction, append its ``records.jsonl``
    line, and write a progress line with ETA on ``stream`` (stderr).

    Args:
        engine: a loaded engine. data: labels CSV or class-folder tree. out: the run folder.
        settings: what to generate. stream: where progress lines go (default stderr).

    Returns:
        A :class:`GenerateSummary`; images that failed to decode or generate are listed, not fatal.

    Raises:
        ValueError: bad settings, a label without images, or a sub-run folder made with other settings.
    """
    # 1. settings
    settings.check()
    run = Path(out) / settings.subrun
    root, items = read_items(Path(data), settings.split)
    info = engine.info
    run_meta: dict[str, Any] = {
        "vald_md_eval_run": 1, **_settings_in_run_order(settings), "labels": list(settings.labels),
        "effective_steps": settings.effective_steps, "seed_rule": SEED_RULE,
        "data_root": str(root), "data": str(data),
        "model": {"name": info.name, "path": info.path, "image_size": info.image_size},
        "model_hash": info.model_hash, "library_versions": library_versions(), "created_at": now_iso(),
        "map": "map.npy = float16 signed input - mean over samples of the counterfactuals, native frame",
    }
    check_same_settings(run / RUN_FILE, run_meta, IDENTITY_KEYS)
    if (run / RUN_FILE).is_file():  # keep the creation date, record the widest selection
        old = json.loads((run / RUN_FILE).read_text())
        run_meta["created_at"] = old.get("created_at", run_meta["created_at"])
        run_meta["resumed_at"] = now_iso()
        run_meta["labels"] = sorted(set(old.get("labels", [])) | set(settings.labels))
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / RUN_FILE, run_meta)

    # 2. selection and what is already done
    chosen = select(items, settings.labels, settings.limit)
    done = {r["input"] for r in read_jsonl(run / RECORDS_FILE, repair=True) if _outputs_exist(run, r)}
    progress = Progress(len(chosen), f"generate[{settings.subrun}]", stream)
    summary = GenerateSummary(run, len(chosen), 0, 0)

    # 3. one image at a time
    for it in chosen:
        if it.rel in done:
            progress.skip()
            summary.skipped += 1
            continue
        try:
            rec = _generate_one(engine, run, it, settings)
        except (imaging.ImagingError, OSError, ValueError) as e:
            summary.failures.append((it.rel, str(e)))
            logger.warning("%s: %s", it.rel, e)
            progress.step(f"{it.rel}: FAILED ({e})")
            continue
        append_jsonl(run / RECORDS_FILE, rec)
        summary.generated += 1
        progress.step(f"{it.label} {it.rel} seed {rec['seed']} {rec['timings_s'].get('total', 0):.2f} s")
    return summary


def _generate_one(engine: CounterfactualEngine, run: Path, it: Item, s: GenerateSettings) -> dict[str, Any]:
    """Generate and write one image's outputs; return its ``records.jsonl`` line."""
    pixels = load_gray(it.path)
    seed = item_seed(s.seed, it.rel)
    result = engine.generate_request(pixels, replace(s, seed=seed))
    target = item_dir(run, it.rel)
    target.mkdir(parents=True, exist_ok=True)
    rel_dir = target.relative_to(run).as_posix()
    cf_names: list[str] = []
    for i, cf in enumerate(result.counterfactuals):
        name = "counterfactual.png" if i == 0 else f"counterfactual-{i}.png"
        write_atomic(target / name, imaging.to_png_bytes(cf, bits=8))
        cf_names.append(f"{rel_dir}/{name}")
    amap = attribution.difference_map(pixels, result.counterfactuals)
    write_atomic(target / "map.npy", _npy_f16(amap.signed))
    write_atomic(target / "reconstruction.png", imaging.to_png_bytes(result.reconstruction, bits=16))
    rec = result.record()
    return {
        "input": it.rel, "label": it.label, "target_label": s.target_label, "mode": s.mode, "prompt": s.prompt,
        "seed": seed, "seeds": rec["seeds"], "effective_steps": rec["effective_steps"],
        "unet_evaluations": rec["unet_evaluations"], "timings_s": rec["timings_s"], "model_hash": rec["model_hash"],
        "shape": list(pixels.shape), "map_mean_abs": float(amap.magnitude.mean()),
        "outputs": {"counterfactuals": cf_names, "map": f"{rel_dir}/map.npy",
                    "reconstruction": f"{rel_dir}/reconstruction.png"},
        "created_at": now_iso(),
    }


def read_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A sub-run's ``run.json`` and its records (in file order, one per image; the last wins for duplicates).

    Raises:
        FileNotFoundError: ``run`` has no ``run.json``.
    """
    meta_path = Path(run) / RUN_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run} is not a generate sub-run (no {RUN_FILE}); run `vald-md evaluate generate`")
    meta = json.loads(meta_path.read_text())
    by_input: dict[str, dict[str, Any]] = {}
    for r in read_jsonl(Path(run) / RECORDS_FILE):
        by_input[r["input"]] = r
    return meta, list(by_input.values())


def _is_generate_run(folder: Path) -> bool:
    try:
        return "mode" in json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def find_subruns(run_dir: Path) -> list[Path]:
    """Sub-runs of a run folder (folders whose ``run.json`` a ``generate`` run wrote), or the folder itself when it
    is one; sorted. Other folders with a ``run.json`` (a ``localize`` output kept beside them) are passed over."""
    run_dir = Path(run_dir)
    if _is_generate_run(run_dir):
        return [run_dir]
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir} does not exist")
    found = sorted(p for p in run_dir.iterdir() if _is_generate_run(p))
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no generate sub-run (no */{RUN_FILE}); run "
                                "`vald-md evaluate generate --out` first")
    return found
