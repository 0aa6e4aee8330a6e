"""The ``vald-md`` command.

Sub-commands: ``counterfactual`` (files in, artifacts out), ``model info|assemble``, ``train`` (see ``app/train/``),
``serve`` (the review web app), ``ray-serve`` (deploy the model on a Ray cluster), ``evaluate`` (paper tables and
localization), ``users`` and ``audit`` (accounts and the audit trail). Errors a user can fix print one readable line
and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.generation import SCHEDULERS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from app.config import Settings

    Message = MutableMapping[str, Any]

logger = logging.getLogger("vald_md.cli")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the embedded model_weights/vald-md-mini)")
    p.add_argument("--prompt", default=None, help="target prompt (default: the model's healthy preset's, a healthy "
                                                 "counterfactual; the embedded model: 'normal chest x-ray')")
    p.add_argument("--negative-prompt", default="", help="text to steer away from")
    p.add_argument("--strength", type=float, default=None, help="(0, 1]; default: the model's healthy preset")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance, 1..30; default: preset")
    p.add_argument("--steps", type=int, default=None, help="scheduler steps at strength 1; default: preset")
    p.add_argument("--seed", type=int, default=0, help="seed (sample i uses seed+i); default 0")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per input, 1..16 (mean and std maps); default: the model's healthy preset (else 1)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS,
                   help="sampler (default: the model's preset (the embedded model: dpm++))")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--no-cpu-autocast", dest="cpu_autocast", action="store_false",
                   help="compute in float32 on the CPU (default: bf16 autocast where the CPU has AMX or AVX-512 bf16; "
                        "record.json states it under compute)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``vald-md`` argument parser (``train`` forwards its arguments to app.train.__main__)."""
    p = argparse.ArgumentParser(prog="vald-md", description="VALD-MD: counterfactual attribution for chest X-rays")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("counterfactual", help="make counterfactuals and attribution maps for image files")
    c.add_argument("inputs", nargs="+", help="DICOM, PNG or JPEG files")
    _add_generation_args(c)
    c.add_argument("--mask", default=None, help="region mask PNG (e.g. lungs), resized to each input; wins over "
                                                "the lung segmenter")
    c.add_argument("--no-lung-mask", dest="lung_mask", action="store_false",
                   help="do not restrict the map to the lungs (default: restrict it with the lung segmenter)")
    c.add_argument("--lung-segmenter", default=None,
                   help="lung segmenter folder (default: the embedded model_weights/lungs-unet; when it is missing "
                        "the maps are not restricted, with a warning)")
    c.add_argument("--map-method", default=None, choices=["sdedit", "classifier_guided", "ddim_inversion"],
                   help="attribution-map method: the paper's SDEdit difference, a counterfactual guided by the "
                        "lesion classifier (one sample; needs the lung segmenter), or DDIM inversion instead of "
                        "SDEdit noise (one sample, deterministic); default: the model's recommendation (manifest "
                        "map_method), else sdedit")
    c.add_argument("--map-polarity", default=None, choices=["both", "removed"],
                   help="what the map keeps of reference - counterfactual: both directions, or only the density the "
                        "counterfactual removed (its positive part); default: the model's healthy preset, else its "
                        "manifest (map_polarity), else both")
    c.add_argument("--map-smoothing", type=float, default=None, metavar="SIGMA",
                   help="Gaussian smoothing of the map in the model's frame: sigma in pixels of the model's square "
                        "input (the embedded model: 256 px), 0..16, 0 = off; default: the model's healthy preset, "
                        "else its manifest (map_smoothing), else 0")
    c.add_argument("--counterfactual-edit", default=None, choices=["map_region", "redraw"],
                   help="the counterfactual written as counterfactual.png: map_region = one more sample that changes "
                        "the image only where the map is above the model's normal level (DiffEdit-style; the first "
                        "sample is then counterfactual-0.png), redraw = the first sample; default: the model's "
                        "healthy preset, else its manifest (counterfactual_edit), else redraw")
    c.add_argument("--classifier-scale", type=float, default=0.3,
                   help="classifier_guided: step against the disease gradient per denoising step, 0..5 (default 0.3)")
    c.add_argument("--lesion-classifier", default=None,
                   help="lesion classifier folder for classifier_guided (default: model_weights/lesion-classifier)")
    c.add_argument("--window", default="auto",
                   help="DICOM window: 'auto' (first file preset, else VOI LUT, else percentile), a preset index "
                        "N, or 'percentile'")
    c.add_argument("--reference", default=None, choices=["input", "reconstruction"],
                   help="map reference: the input (paper) or the autoencoder's reconstruction of it; "
                        "default: the model's recommendation")
    c.add_argument("--out", required=True, help="output folder; one sub-folder per input")

    m = sub.add_parser("model", help="inspect or assemble model folders")
    msub = m.add_subparsers(dest="model_command", required=True)
    mi = msub.add_parser("info", help="components, parameter counts, text encoder type and hash")
    mi.add_argument("folder", nargs="?", default=None, help="model folder (default: the embedded model)")
    ma = msub.add_parser("assemble", help="combine an SD v1.x folder with a BERT text encoder")
    ma.add_argument("--base", required=True, help="Stable Diffusion v1.x diffusers folder")
    ma.add_argument("--text-encoder", required=True, help="transformers folder of a BERT-family encoder")
    ma.add_argument("--out", required=True, help="new model folder")

    sub.add_parser("train", help="train models (vald-md train --help)", add_help=False)
    sub.add_parser("evaluate", help="paper tables, validity and localization (vald-md evaluate --help)",
                   add_help=False)

    s = sub.add_parser("serve", help="run the review web app (one process holding one model copy)",
                       description="Serve the review web app. Unset options come from VALD_MD_* environment "
                                   "variables, then the defaults (see app/config.py).")
    s.add_argument("--model", default=None,
                   help="model folder (default: VALD_MD_MODEL_DIR, else the embedded model_weights/vald-md-mini)")
    s.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1; others need "
                                                "VALD_MD_ALLOW_REMOTE=1 behind an authenticating proxy)")
    s.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    s.add_argument("--data-dir", default=None, help="folder for uploads and run artifacts (default: data/)")
    s.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    s.add_argument("--compile", dest="compile_unet", action="store_const", const=True, default=None,
                   help="compile the UNet (torch.compile) and run warm-up generations before /readyz says ready; "
                        "takes minutes, needs a C++ compiler; on a CPU the UNet then runs ~1.2-1.4x faster "
                        "(default: VALD_MD_COMPILE_UNET, else off)")
    s.add_argument("--backend", default=None, choices=["local", "ray"],
                   help="where runs execute: this process (local, the default) or Ray Serve replicas of the model "
                        "(ray; VALD_MD_RAY_* settings, docs/DEPLOYMENT.md)")

    r = sub.add_parser("ray-serve", help="deploy the model on a Ray cluster for `vald-md serve --backend ray`",
                       description="Attach to a running Ray cluster (`ray start --head`), deploy (or redeploy) the "
                                   "model as the Ray Serve application 'vald-md', print its replicas and exit; the "
                                   "deployment keeps running in the cluster. Unset options come from VALD_MD_* "
                                   "environment variables (VALD_MD_RAY_*), then the defaults.")
    r.add_argument("--address", default=None, help="Ray cluster address (default: VALD_MD_RAY_ADDRESS, else 'auto': "
                                                  "the cluster `ray start` runs on this machine)")
    r.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    r.add_argument("--replicas", type=int, default=None, help="replicas (default: VALD_MD_RAY_REPLICAS, else 1)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    r.add_argument("--device", default=None, help="device of CPU replicas (GPU replicas use their GPU)")

    from app.manage import add_parsers  # users, audit

    add_parsers(sub)
    return p


def _window_arg(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def cmd_counterfactual(args: argparse.Namespace) -> int:
    """Write input/counterfactual/overlay PNGs, attribution.npy and record.json per input."""
    from app import attribution, imaging
    from app.config import DEFAULT_LESION_CLASSIFIER_DIR
    from app.engine import CounterfactualEngine
    from app.lesions import LesionClassifier
    from app.lungs import LungSegmenter, SegmenterFolderError
    from app.runs.review import ReviewRequest, resolve_request, run_review

    eng = CounterfactualEngine(args.model, device=args.device, cpu_autocast=args.cpu_autocast)
    method = args.map_method or str(eng.info.manifest.get("map_method", "sdedit"))
    segmenter: LungSegmenter | None = None
    classifier: LesionClassifier | None = None
    if method == "classifier_guided":
        try:
            classifier = LesionClassifier(args.lesion_classifier or DEFAULT_LESION_CLASSIFIER_DIR)
        except (OSError, ValueError, KeyError) as e:
            sys.stderr.write(f"vald-md: the classifier-guided map needs a lesion classifier (--lesion-classifier): "
                             f"{e}\n")
            return 2
    if (args.lung_mask and not args.mask) or method == "classifier_guided":
        try:
            segmenter = LungSegmenter(args.lung_segmenter)
        except SegmenterFolderError as e:
            if args.lung_segmenter or method == "classifier_guided":  # a mistake the user can fix
                sys.stderr.write(f"vald-md: --lung-segmenter: {e}\n")
                return 2
            logger.warning("no lung segmenter (%s); the maps are not restricted to the lungs", e)
    try:
        req = resolve_request(ReviewRequest.from_preset(
            eng.info.presets.get("healthy"), prompt=args.prompt, negative_prompt=args.negative_prompt,
            strength=args.strength, guidance_scale=args.guidance, steps=args.steps, seed=args.seed,
            scheduler=args.scheduler, samples=args.samples, window=_window_arg(args.window),
            reference=args.reference or eng.info.manifest.get("map_reference", "input"), lung_mask=args.lung_mask,
            map_method=method, map_polarity=args.map_polarity, map_smoothing=args.map_smoothing,
            counterfactual_edit=args.counterfactual_edit, classifier_scale=args.classifier_scale), eng.info,
            classifier=classifier, segmenter=segmenter)
    except ValueError as e:
        sys.stderr.write(f"vald-md: {e}\n")
        return 2
    mask_bytes = Path(args.mask).read_bytes() if args.mask else None
    out = Path(args.out)
    failures = 0
    for i, name in enumerate(args.inputs):
        # output folders are numbered, never named after the input (file names can carry patient data)
        target = out / f"{i:04d}"
        try:
            data = Path(name).read_bytes()
            decoded = imaging.decode_image(data, window=req.window)
            mask = attribution.load_mask_png(mask_bytes, decoded.pixels.shape) if mask_bytes else None
            rec = run_review(eng, data, req, target, mask=mask, decoded=decoded, segmenter=segmenter,
                             classifier=classifier)
        except (imaging.ImagingError, ValueError, OSError) as e:
            failures += 1
            sys.stderr.write(f"input {i + 1} of {len(args.inputs)}: {e}\n")
            continue
        t = rec.timings_s["total"]
        sys.stdout.write(f"input {i + 1}: {target}  ({rec.effective_steps} steps, seed {rec.seeds[0]}, "
                         f"{t:.1f} s, mean |M| {rec.map_summary['mean_abs_in_mask']:.4f})\n")
    return 1 if failures else 0


def cmd_model(args: argparse.Namespace) -> int:
    """``model info`` prints JSON; ``model assemble`` writes the combined folder and prints a summary."""
    from app import engine

    if args.model_command == "info":
        eng = engine.CounterfactualEngine(args.folder, device="cpu")
        info = eng.info
        sys.stdout.write(json.dumps({
            "name": info.name, "path": info.path, "model_hash": info.model_hash, "components": info.components,
            "parameters_millions": info.parameters_m, "text_encoder_type": info.text_encoder_type,
            "image_size": info.image_size, "image_channels": info.image_channels,
            "class_prompts": info.class_prompts, "presets": info.presets}, indent=2) + "\n")
        return 0
    from app.modelfolder import assemble_model

    summary = assemble_model(Path(args.base), Path(args.text_encoder), Path(args.out))
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def _settings(command: str, overrides: dict[str, Any]) -> Settings | None:
    """``Settings`` from the environment and the options given (``None`` = not given), or ``None`` after printing
    each invalid setting as one line."""
    from pydantic import ValidationError

    from app.config import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            sys.stderr.write(f"vald-md {command}: {where}: {err['msg'].removeprefix('Value error, ')}\n")
        return None


START_UP_GARBAGE_DELAY_S = 5.0
"""Seconds after ready at which the start-up's cyclic garbage is collected (:class:`_CollectGarbageWhenReady`)."""


def _collect_start_up_garbage() -> None:
    """One full pass of the cyclic garbage collector over everything, the start-up's frozen objects included."""
    gc.unfreeze()
    gc.collect()


class _CollectGarbageWhenReady:
    """ASGI wrapper of the review app: when its lifespan reports the start-up complete (model loaded, worker started:
    the moment ``/readyz`` turns 200), the start-up's objects are frozen (``gc.freeze``: out of the collector's
    sight) and Python's cyclic garbage collector, which :func:`main` turned off for ``serve``, back on; the one full
    pass that frees the start-up's cyclic garbage runs :data:`START_UP_GARBAGE_DELAY_S` later on the event loop
    (:func:`_collect_start_up_garbage`), after ready rather than before it. Everything else passes through untouched.

    Why (issue 15, docs/PERFORMANCE.md "Server ready"): the start-up creates about 900 000 Python objects (torch,
    diffusers, transformers, the model), of which about 550 000 stay; with the collector on, its automatic full passes
    over that growing heap (8 of them) cost about 1 s of CPU before ready. The one pass costs about 0.5 s of CPU and
    frees about 10 MiB; nothing the server does needs it done before the first request. A request that arrives in
    that half second waits for it (the pass holds the interpreter lock).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], *,
                 garbage_delay_s: float = START_UP_GARBAGE_DELAY_S) -> None:
        self.app = app
        self.garbage_delay_s = garbage_delay_s

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_freezing(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and not gc.isenabled():
                import asyncio

                gc.freeze()
                gc.enable()
                asyncio.get_running_loop().call_later(self.garbage_delay_s, _collect_start_up_garbage)
            await send(message)

        await self.app(scope, receive, send_after_freezing)


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate the settings and the model folder, then run uvicorn with ONE worker process."""
    import uvicorn

    from app import filemodes
    from app.modelfolder import check_model_folder
    from app.web import create_app
    from app.web.accesslog import uvicorn_log_config

    settings = _settings("serve", {"model_dir": args.model, "host": args.host, "port": args.port,
                                   "data_dir": args.data_dir, "device": args.device, "backend": args.backend,
                                   "compile_unet": args.compile_unet})
    if settings is None:
        return 2
    check_model_folder(settings.resolved_model_dir)  # a readable error now rather than a failed start-up later
    logger.info("serving on http://%s:%d (model %s, data %s)", settings.host, settings.port,
                settings.resolved_model_dir, settings.data_dir)
    if settings.allow_remote and not settings.trusted_hosts:
        logger.warning("VALD_MD_TRUSTED_HOSTS is not set: requests that name any host but %s get HTTP 400; set it "
                       "to the name users reach the server by (docs/DEPLOYMENT.md)", ", ".join(settings.allowed_hosts))
    # files and folders the server creates (runs, the database and its journals, exports) are the owner's only
    os.umask(filemodes.SERVE_UMASK)
    # one process: every worker process would load its own model copy and run its own queue. Forwarded headers
    # are the app's business (VALD_MD_TRUSTED_PROXIES, create_app): uvicorn's own handling would trust
    # 127.0.0.1 (and FORWARDED_ALLOW_IPS) by default, letting a local client choose its address
    # the access log keeps paths, never query strings (PACS search terms and UIDs travel in them)
    uvicorn.run(_CollectGarbageWhenReady(create_app(settings)), host=settings.host, port=settings.port, workers=1,
                proxy_headers=False, forwarded_allow_ips="", log_level="debug" if args.verbose else "info",
                log_config=uvicorn_log_config())
    return 0


def cmd_ray_serve(args: argparse.Namespace) -> int:
    """Attach to a Ray cluster, deploy the model as the Serve application ``vald-md``, print it, exit."""
    from app.jobs import BackendError
    from app.modelfolder import check_model_folder

    settings = _settings("ray-serve", {
        "model_dir": args.model, "device": args.device, "backend": "ray", "ray_replicas": args.replicas,
        "ray_min_replicas": args.min_replicas, "ray_max_replicas": args.max_replicas,
        "ray_address": args.address or os.environ.get("VALD_MD_RAY_ADDRESS") or "auto"})
    if settings is None:
        return 2
    check_model_folder(settings.resolved_model_dir)
    from app.serving import RayBackend

    try:
        backend = RayBackend.from_settings(settings, redeploy=True)
    except BackendError as e:
        sys.stderr.write(f"vald-md ray-serve: {e}\n")
        return 2
    described = backend.handle.describe.remote().result(timeout_s=300)
    sys.stdout.write(json.dumps({"application": "vald-md", "replicas": list(settings.ray_replica_bounds),
                                 "autoscaling": settings.ray_autoscaling, "model": described["model_name"],
                                 "model_sha256": described["model_sha256"], "device": described["device"]},
                                indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vald-md`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if "-v" in argv or "--verbose" in argv else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # alembic announces its plugins when imported and its migration context on every database open: seven INFO
    # lines before any command's own output. Its warnings and errors still show (and -v shows everything).
    if "-v" not in argv and "--verbose" not in argv:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if argv and argv[0] == "train":
        from app.train.__main__ import run as train

        return train(argv[1:])
    if argv and argv[0] == "evaluate":
        from app import evaluate

        return evaluate.main(evaluate.parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # the collector stays off until the server is ready (_CollectGarbageWhenReady), from here, before torch
        gc.disable()
    from app.modelfolder import ModelFolderError

    try:
        if args.command == "counterfactual":
            return cmd_counterfactual(args)
        if args.command == "model":
            return cmd_model(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "ray-serve":
            return cmd_ray_serve(args)
        if args.command in ("users", "audit"):
            from app.manage import run

            return run(args)
    except ModelFolderError as e:
        sys.stderr.write(f"vald-md: {e}\n")
        return 2
    finally:
        if args.command == "serve":
            # on again already after a complete start-up; this is for a server that stopped before (or before the
            # delayed pass over the start-up's frozen objects)
            gc.unfreeze()
            gc.enable()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
