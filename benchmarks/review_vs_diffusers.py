"""The review run end to end against a plain diffusers img2img call doing the same diffusion (issue 15).

Per repetition, alternating which goes first: ``app.runs.review.run_review`` (decode -> counterfactual ->
attribution maps -> PNG files -> record.json, into a temporary folder) and a plain ``StableDiffusionImg2ImgPipeline``
call with the same prompt, strength, guidance, steps and seed, ``output_type="pt"``, no files. The ratio review /
plain (medians) is the number the issue asks for: below 1.0, the whole review run is faster than the plain call
alone; ``speedup_plain_over_review`` is its inverse (the GPU goal is >= 1.7).

The plain call, by device:

* CPU (default): built from the engine's own components (UNet, text encoder, tokenizer; the autoencoder loaded
  again from the same folder in diffusers' stock layout; a fresh scheduler of the same class and configuration),
  float32 as diffusers runs on a CPU. ``--plain-autocast`` also times it under the engine's bf16 autocast.
* CUDA (``--device cuda``): plain diffusers as a user would run it: ``StableDiffusionImg2ImgPipeline.from_pretrained``
  of the same folder in ``--plain-dtype`` (default fp16) with diffusers' default attention (SDPA), sharing nothing
  with the engine (whose UNet ``--compile`` may have compiled). Every timed call ends with ``torch.cuda.synchronize``.

Everything runs on the main thread, which also loads the model: torch's OpenMP keeps one thread team per thread
that ran parallel work, so loading on one thread and running on another is slower
(app.engine.load_engine_in_short_lived_thread).
Also reported: the latency of the first progress event of the review run (from the call to the first callback:
step 0, the input encoded and noised, since the thirteenth session) and of its first denoising step (step 1).
The review run gets the embedded lung segmenter, as the server's runs do (the map restricted to the lungs, and
``lung_mask.png`` written); ``--lung-segmenter none`` leaves it out (the numbers before 2026-12-07's seventh
session were measured without it). The review run shows the model's counterfactual (the embedded model: one more
sample edited only where the map is above normal, since the eighth session); ``--counterfactual-edit redraw`` shows
the first sample instead, as before.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/review_vs_diffusers.py --threads 2 --runs 7 \\
        --image ../shared/data/cxr256/test/covid/COVID-1.png [--setting paper] [--no-cpu-autocast]
    python3 benchmarks/review_vs_diffusers.py --device cuda --dtype bf16 --sd-sized --setting paper \\
        --setting fast --runs 3 [--compile reduce-overhead]                                  # on a GPU host

The model: ``--model DIR`` (default the embedded model_weights/vald-md-mini), ``--sd-sized`` (a Stable Diffusion
v1.x-sized architecture with random weights at ``--size`` px, built in code: benchmarks/engine_breakdown.py) or
``--tiny-model`` (the tests' 32 px model; dry runs). ``--setting`` may be given several times; the model is loaded
(and compiled) once; ``--samples N`` (>= 1) replaces the setting's number of samples on both sides. The input is
``--image`` or a synthetic 16-bit PNG of ``--input-size`` px.

Prints one JSON object (with several settings: ``{"results": [one object per setting]}``) and a markdown table
row per setting; ``--json PATH`` writes the JSON too. ``--app-root DIR`` imports ``app`` from another checkout
(e.g. ``git archive HEAD app | tar -x -C /tmp/head``) for before/after numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SETTINGS: dict[str, dict[str, Any] | str | None] = {
    "default": None,  # the model's own healthy preset
    "paper": {"strength": 0.85, "guidance_scale": 7.5, "steps": 75, "scheduler": "pndm",
              "prompt": "normal chest x-ray"},
    "fast": "healthy-fast",  # the engine's fast preset (DPM-Solver++ 20 steps x 0.85, CFG 7.5)
}
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = ("fp32", "fp16", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "model_weights" / "vald-md-mini",
                   help="model folder (default: the embedded model_weights/vald-md-mini)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sd-sized", action="store_true",
                       help="build a Stable Diffusion v1.x-sized model with random weights at --size px instead")
    which.add_argument("--tiny-model", action="store_true",
                       help="build the tests' tiny 32 px model instead (dry runs of the GPU check)")
    p.add_argument("--size", type=int, default=512, help="--sd-sized image size in px, multiple of 8 (default 512)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where built models are kept and reused (default: a temporary folder, removed at the end)")
    p.add_argument("--setting", choices=sorted(SETTINGS), action="append", default=None,
                   help="'default': the model's healthy preset; 'paper': 75 PNDM steps x 0.85, CFG 7.5; 'fast': "
                        "the healthy-fast preset (DPM-Solver++ 20 x 0.85, CFG 7.5). Repeatable (default: default)")
    p.add_argument("--image", type=Path, default=None,
                   help="input file (DICOM/PNG/JPEG); default: a synthetic 16-bit PNG of --input-size px")
    p.add_argument("--input-size", type=int, default=512, help="side of the synthetic input in px (default 512)")
    p.add_argument("--runs", type=int, default=7, help="timed repetitions of each call, >= 1 (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each call first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of both calls (default 0)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples of both calls instead of the setting's (e.g. 8 for the default at half the diffusion)")
    p.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'/'cuda:N'")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the engine's weights (default: the engine's choice: fp32 on a CPU, bf16/fp16 on CUDA)")
    p.add_argument("--plain-dtype", choices=DTYPES, default=None,
                   help="the plain call's weights on CUDA (default fp16; on a CPU it is always fp32)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the engine's UNet in this mode, applied here (default none; "
                        "'reduce-overhead' = CUDA graphs); the plain call is never compiled")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; 'aot_eager' for quick dry runs on a CPU)")
    p.add_argument("--no-cpu-autocast", dest="cpu_autocast", action="store_false",
                   help="engine in float32 (default: bf16 autocast where the CPU has AMX bf16)")
    p.add_argument("--plain-autocast", action="store_true",
                   help="CPU only: also time the plain call under the engine's bf16 autocast")
    p.add_argument("--lung-segmenter", default=None,
                   help="lung segmenter folder handed to the review run, as the server does (default: the app root's "
                        "embedded model_weights/lungs-unet when it is there); 'none': the map is not restricted")
    p.add_argument("--counterfactual-edit", default=None, choices=["map_region", "redraw"],
                   help="the review run's counterfactual_edit (default: the model's; the embedded model's map_region "
                        "adds one sample's denoising after the map, which the plain call does not do)")
    p.add_argument("--app-root", type=Path, default=ROOT, help="checkout whose app/ is imported (default: this)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON result here too")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error(f"--runs must be >= 1 and --warmup >= 0 (got {args.runs}, {args.warmup})")
    if args.size < 64 or args.size % 8:
        p.error(f"--size={args.size} must be a multiple of 8, at least 64")
    if args.input_size < 16:
        p.error(f"--input-size={args.input_size} must be at least 16")
    cuda = args.device.startswith("cuda")
    if args.plain_autocast and cuda:
        p.error("--plain-autocast is for the CPU; on CUDA choose --plain-dtype")
    if args.plain_dtype is not None and not cuda:
        p.error("--plain-dtype is for CUDA; the plain call on a CPU runs in fp32")
    args.setting = args.setting or ["default"]
    args.plain_dtype = args.plain_dtype or ("fp16" if cuda else "fp32")
    return args


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(a)), 4), "min": round(float(a.min()), 4),
            "max": round(float(a.max()), 4), "n": int(a.size)}


def load_segmenter(args: argparse.Namespace) -> Any:
    """The lung segmenter the review run gets (``--lung-segmenter``), or ``None``."""
    if args.lung_segmenter == "none":
        return None
    folder = Path(args.lung_segmenter) if args.lung_segmenter else args.app_root / "model_weights" / "lungs-unet"
    if args.lung_segmenter is None and not folder.is_dir():
        return None  # an older checkout without a segmenter
    from app.lungs import LungSegmenter

    return LungSegmenter(folder)


def resolve_model(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(model folder, how it was obtained). Built models are kept in ``work`` and reused when already there."""
    if args.sd_sized:
        folder = work / f"sd-size-{args.size}"
        if not (folder / "model_index.json").is_file():
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from engine_breakdown import build_sd_size_model

            build_sd_size_model(folder, args.size, args.device)
        return folder, f"SD v1.x-sized, random weights, {args.size} px"
    if args.tiny_model:
        folder = work / "tiny"
        if not (folder / "model_index.json").is_file():
            sys.path.insert(0, str(ROOT))
            from tests.tiny_model import write_tiny_model

            write_tiny_model(folder)
        return folder, "tiny in-code model (tests/tiny_model.py)"
    packed = args.model / "gpu_check_packed.json"  # benchmarks/gpu_check.py pack-model / unpack-model
    if packed.is_file():
        return args.model, "folder packed for the GPU check: text encoder with seeded random weights (timing only)"
    return args.model, "folder"


def input_bytes(args: argparse.Namespace) -> bytes:
    """The input file's bytes, or a synthetic chest-radiograph-like 16-bit PNG (benchmarks/engine_breakdown.py)."""
    if args.image is not None:
        return args.image.read_bytes()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine_breakdown import synthetic_png

    return synthetic_png(args.input_size)


def compile_unet(eng: Any, mode: str, backend: str) -> None:
    """``torch.compile`` the engine's UNet (the engine's own ``compile_unet`` is max-autotune without CUDA graphs,
    whose autotuning takes minutes: too long for one device check)."""
    import torch

    kwargs: dict[str, Any] = {"backend": backend, "fullgraph": False}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode
    eng.pipe.unet = torch.compile(eng.pipe.unet, **kwargs)


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(args.app_root.resolve()))
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline

    from app import imaging
    from app.engine import CounterfactualEngine
    from app.runs.review import ReviewRequest, run_review

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    cuda = args.device.startswith("cuda")
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    tmp = tempfile.TemporaryDirectory(prefix="vald-md-rvd-")
    work = args.work_dir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    # 1. the model, loaded on this (the running) thread
    t = time.perf_counter()
    folder, origin = resolve_model(args, work)
    build_s = time.perf_counter() - t
    kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if "cpu_autocast" in inspect.signature(CounterfactualEngine.__init__).parameters:
        kwargs["cpu_autocast"] = args.cpu_autocast
    t = time.perf_counter()
    eng = CounterfactualEngine(folder, **kwargs)
    load_s = time.perf_counter() - t
    if args.compile != "none":
        compile_unet(eng, args.compile, args.compile_backend)
    autocast = getattr(eng, "autocast_dtype", None)
    segmenter = load_segmenter(args)

    # 2. the input, and the plain pipeline's input as the engine letterboxes it
    data = input_bytes(args)
    pixels = imaging.decode_image(data).pixels
    img_model, _ = imaging.letterbox(pixels, eng.info.image_size)
    image = torch.from_numpy(np.ascontiguousarray(img_model))[None, None].repeat(1, eng.info.image_channels, 1, 1)

    # 3. the plain pipeline
    p = eng.pipe
    if cuda:
        # plain diffusers as a user runs it on a GPU: its own copy of every component in --plain-dtype, default
        # attention processor (SDPA on torch 2), nothing compiled, nothing shared with the engine
        plain = StableDiffusionImg2ImgPipeline.from_pretrained(
            folder, dtype=dtypes[args.plain_dtype], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True).to(args.device)
    else:
        # the autoencoder is loaded again from the folder: the engine may have switched its own to channels-last for
        # its bf16 autocast, which would also speed up the plain call; the denominator is stock diffusers. For the
        # same reason the plain call gets the UNet as loaded, not the engine's --compile wrapper of it
        stock_vae = AutoencoderKL.from_pretrained(Path(eng.info.path) / "vae", torch_dtype=torch.float32).eval()
        stock_unet = getattr(p.unet, "_orig_mod", p.unet)
        plain = StableDiffusionImg2ImgPipeline(vae=stock_vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                               unet=stock_unet, scheduler=p.scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    attention = sorted({type(a).__name__ for a in plain.unet.attn_processors.values()})
    context = {
        "model": eng.info.name, "model_origin": origin, "model_hash": eng.info.model_hash,
        "model_build_s": round(build_s, 3), "model_load_s": round(load_s, 3),
        "image": str(args.image) if args.image else f"synthetic {args.input_size} px 16-bit PNG",
        "image_shape": list(pixels.shape), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "engine_autocast": "bf16" if autocast is not None else None, "app_root": str(args.app_root),
        "runs": args.runs, "warmup": args.warmup, "device": str(eng.device),
        "engine_dtype": str(eng.dtype).removeprefix("torch."), "plain_dtype": args.plain_dtype,
        "plain_attention": attention, "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile != "none" else None,
        "gpu": torch.cuda.get_device_name(eng.device) if cuda else None,
        "load_average_at_start": [round(x, 2) for x in load_start],
        "lung_segmenter": None if segmenter is None else segmenter.info.name,
    }

    results: list[dict[str, Any]] = []
    for name in args.setting:
        results.append(measure(args, name, eng, plain, data, image, context,
                               partial(run_review, segmenter=segmenter), ReviewRequest, sync))
        if args.json:  # after every setting: a run stopped at its time limit keeps the settings already done
            write_json(args.json, results, len(args.setting))
    tmp.cleanup()
    sys.stdout.write(json.dumps(results_object(results, len(args.setting)), indent=2) + "\n")
    for r in results:
        sys.stdout.write(table_row(r) + "\n")
    return 0


def results_object(results: list[dict[str, Any]], asked: int) -> dict[str, Any]:
    """One setting asked: its result object itself (the script's output before settings were repeatable); several:
    ``{"results": [...]}`` with the settings measured so far."""
    return results[0] if asked == 1 else {"results": results}


def write_json(path: Path, results: list[dict[str, Any]], asked: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_object(results, asked), indent=2) + "\n")


def measure(args: argparse.Namespace, setting: str, eng: Any, plain: Any, data: bytes, image: Any,
            context: dict[str, Any], run_review: Callable[..., dict[str, Any]], review_request: type,
            sync: Callable[[], None]) -> dict[str, Any]:
    """Warm up, then time the review run and the plain call alternately for one setting; the result object."""
    import torch

    s = SETTINGS[setting]
    s = eng.info.presets["healthy" if s is None else s] if not isinstance(s, dict) else s
    params = {k: s[k] for k in ("prompt", "strength", "guidance_scale", "steps")} | {
        "scheduler": str(s.get("scheduler", "pndm")),
        "samples": args.samples if args.samples is not None else int(s.get("samples", 1))}
    if params["samples"] < 1:
        raise SystemExit(f"--samples {params['samples']}: at least 1")
    req_kwargs = dict(prompt=params["prompt"], strength=float(params["strength"]),
                      guidance_scale=float(params["guidance_scale"]), steps=int(params["steps"]), seed=args.seed,
                      scheduler=params["scheduler"], samples=params["samples"],
                      **({"counterfactual_edit": args.counterfactual_edit} if args.counterfactual_edit else {}))
    eng._scheduler_for(params["scheduler"])  # the engine's scheduler of this kind, for its class and configuration
    sched = eng._schedulers[params["scheduler"]]
    plain.scheduler = type(sched).from_config(sched.config)
    cuda = args.device.startswith("cuda")

    def plain_call(with_autocast: bool = False) -> float:
        gen = torch.Generator("cpu").manual_seed(args.seed)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if with_autocast else torch.autocast("cpu", enabled=False)
        sync()
        t = time.perf_counter()
        with torch.no_grad(), ctx:
            plain(prompt=params["prompt"], image=image, strength=params["strength"],
                  guidance_scale=params["guidance_scale"], num_inference_steps=params["steps"], generator=gen,
                  num_images_per_prompt=params["samples"], output_type="pt")
        sync()
        return time.perf_counter() - t

    tmp = tempfile.TemporaryDirectory(prefix="vald-md-rvd-runs-")
    runs = Path(tmp.name)

    def review_call(i: int) -> tuple[float, float, float, dict[str, Any]]:
        """(seconds, first progress event, first denoising step (step >= 1), record) of one review run."""
        first: dict[str, float] = {}

        def progress(step: int, *rest: Any) -> None:
            now = time.perf_counter()
            first.setdefault("event", now)
            if step >= 1:
                first.setdefault("step", now)

        sync()
        t = time.perf_counter()
        record = run_review(eng, data, review_request(**req_kwargs), runs / f"{i:04d}", progress=progress)
        sync()
        return (time.perf_counter() - t, first.get("event", float("nan")) - t, first.get("step", float("nan")) - t,
                record)

    # warm-up (the first call compiles when --compile), then alternate
    t = time.perf_counter()
    for i in range(args.warmup):
        review_call(-1 - i)
        plain_call()
        if args.plain_autocast:
            plain_call(True)
    warmup_s = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    review_s: list[float] = []
    first_s: list[float] = []
    first_step_s: list[float] = []
    plain_s: list[float] = []
    plain_ac_s: list[float] = []
    engine_timings: list[dict[str, float]] = []
    edit_s: list[float] = []  # the edited counterfactual's extra sample (counterfactual_edit map_region)
    unet_evaluations = 0
    loads = []
    for i in range(args.runs):
        loads.append(os.getloadavg()[0])
        order = ("review", "plain") if i % 2 == 0 else ("plain", "review")
        for which in order:
            if which == "plain":
                plain_s.append(plain_call())
                if args.plain_autocast:
                    plain_ac_s.append(plain_call(True))
            else:
                dt, first, first_step, record = review_call(i)
                review_s.append(dt)
                first_s.append(first)
                first_step_s.append(first_step)
                engine_timings.append(record.timings_s)
                unet_evaluations = int(record.unet_evaluations or 0)
                edit = getattr(record, "counterfactual_edit", None) or {}
                if edit.get("applied"):
                    edit_s.append(float(edit["seconds"]))
    tmp.cleanup()

    review, plain_st = stats(review_s), stats(plain_s)
    timings = {k: round(float(np.median([t[k] for t in engine_timings])), 4) for k in engine_timings[0]}
    result: dict[str, Any] = {
        "setting": setting, "parameters": params, **context,
        "load_average_1min_during": [round(min(loads), 2), round(max(loads), 2)],
        "warmup_s": round(warmup_s, 3), "unet_evaluations": unet_evaluations,
        "review_s": review, "plain_s": plain_st, "first_progress_s": stats(first_s),
        "first_step_s": stats(first_step_s),
        "engine_timings_median_s": timings,
        "counterfactual_edit_s": stats(edit_s) if edit_s else None,
        "per_denoising_step_ms": round(1e3 * timings.get("denoising", float("nan"))
                                       / max(1, unet_evaluations - 1), 3),
        "ratio_review_over_plain": round(review["median"] / plain_st["median"], 3),
        "speedup_plain_over_review": round(plain_st["median"] / review["median"], 3),
    }
    if cuda:
        result["cuda_max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if plain_ac_s:
        result["plain_autocast_s"] = stats(plain_ac_s)
        result["ratio_review_over_plain_autocast"] = round(review["median"] / result["plain_autocast_s"]["median"], 3)
    return result


def table_row(r: dict[str, Any]) -> str:
    """One markdown row: setting, precision, review run, plain call, ratio, first progress, load."""
    prm = r["parameters"]
    precision = r["engine_dtype"] if r["device"] != "cpu" else (r["engine_autocast"] or "fp32")
    if r["compile"] != "none":
        precision += f", compile {r['compile']}"
    return (f"| {r['setting']} ({prm['scheduler']} {prm['steps']} x {prm['strength']}, CFG "
            f"{prm['guidance_scale']}) | {precision} | {r['review_s']['median']:.3f} s | "
            f"{r['plain_s']['median']:.3f} s | **{r['ratio_review_over_plain']:.3f}** | "
            f"{r['first_progress_s']['median'] * 1e3:.0f} ms (step 1: {r['first_step_s']['median'] * 1e3:.0f} ms) | "
            f"{r['load_average_at_start'][0]:.2f} "
            f"({r['load_average_1min_during'][0]:.2f}-{r['load_average_1min_during'][1]:.2f}) |")


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
