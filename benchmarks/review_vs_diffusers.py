"""The review run end to end against a plain diffusers img2img call doing the same diffusion (issue 15).

Per repetition, alternating which goes first: ``app.artifacts.run_review`` (decode -> counterfactual ->
attribution maps -> PNG files -> record.json, into a temporary folder) and a plain ``StableDiffusionImg2ImgPipeline``
built from the engine's own components (UNet, text encoder, tokenizer; the autoencoder loaded again from the same
folder in diffusers' stock layout; a fresh scheduler of the same class and configuration) with the same prompt, strength, guidance, steps and seed, ``output_type="pt"``, no files,
float32 as diffusers runs on a CPU. The ratio review / plain (medians) is the number the issue asks for: below 1.0,
the whole review run is faster than the plain call alone. ``--plain-autocast`` also times the plain call under the
same bf16 autocast as the engine (what the plain call would gain from the same switch).

Everything runs on the main thread, which also loads the model: torch's OpenMP keeps one thread team per thread
that ran parallel work, so loading on one thread and running on another is slower (app.engine.load_engine_in_short_lived_thread).
Also reported: the latency of the first progress event of the review run (from the call to the first callback).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/review_vs_diffusers.py --threads 2 --runs 7 \\
        --image ../shared/data/cxr256/test/covid/COVID-1.png [--setting paper] [--no-cpu-autocast]

Prints one JSON object and a markdown table row; ``--json PATH`` writes the JSON too. ``--app-root DIR`` imports
``app`` from another checkout (e.g. ``git archive HEAD app | tar -x -C /tmp/head``) for before/after numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = {
    "default": None,  # the model's own healthy preset
    "paper": {"strength": 0.85, "guidance_scale": 7.5, "steps": 75, "scheduler": "pndm",
              "prompt": "normal chest x-ray"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "model_weights" / "vald-md-mini",
                   help="model folder (default: the embedded model_weights/vald-md-mini)")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="default",
                   help="'default': the model's healthy preset; 'paper': 75 PNDM steps x 0.85, CFG 7.5")
    p.add_argument("--image", type=Path, required=True, help="input file (DICOM/PNG/JPEG)")
    p.add_argument("--runs", type=int, default=7, help="timed repetitions of each call, >= 1 (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each call first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of both calls (default 0)")
    p.add_argument("--no-cpu-autocast", dest="cpu_autocast", action="store_false",
                   help="engine in float32 (default: bf16 autocast where the CPU has AMX bf16)")
    p.add_argument("--plain-autocast", action="store_true",
                   help="also time the plain call under the engine's bf16 autocast")
    p.add_argument("--app-root", type=Path, default=ROOT, help="checkout whose app/ is imported (default: this)")
    p.add_argument("--json", type=Path, default=None, help="write the JSON result here too")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error(f"--runs must be >= 1 and --warmup >= 0 (got {args.runs}, {args.warmup})")
    return args


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(a)), 4), "min": round(float(a.min()), 4),
            "max": round(float(a.max()), 4), "n": int(a.size)}


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(args.app_root.resolve()))
    import torch
    import diffusers
    import transformers
    from diffusers import StableDiffusionImg2ImgPipeline

    from app import imaging
    from app.artifacts import ReviewRequest, run_review
    from app.engine import CounterfactualEngine

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    # 1. the model, loaded on this (the running) thread
    kwargs: dict[str, Any] = {"device": "cpu"}
    if "cpu_autocast" in inspect.signature(CounterfactualEngine.__init__).parameters:
        kwargs["cpu_autocast"] = args.cpu_autocast
    eng = CounterfactualEngine(args.model, **kwargs)
    autocast = getattr(eng, "autocast_dtype", None)
    s = SETTINGS[args.setting] or eng.info.presets["healthy"]
    params = {k: s[k] for k in ("prompt", "strength", "guidance_scale", "steps")} | {
        "scheduler": str(s.get("scheduler", "pndm"))}
    req_kwargs = dict(prompt=params["prompt"], strength=float(params["strength"]),
                      guidance_scale=float(params["guidance_scale"]), steps=int(params["steps"]), seed=args.seed,
                      scheduler=params["scheduler"])

    # 2. the plain pipeline on the same components; its input as the engine letterboxes it
    data = args.image.read_bytes()
    pixels = imaging.decode_image(data).pixels
    img_model, _ = imaging.letterbox(pixels, eng.info.image_size)
    image = torch.from_numpy(np.ascontiguousarray(img_model))[None, None].repeat(1, eng.info.image_channels, 1, 1)
    # the autoencoder is loaded again from the folder: the engine may have switched its own to channels-last for
    # its bf16 autocast, which would also speed up the plain call; the denominator is stock diffusers
    from diffusers import AutoencoderKL

    p = eng.pipe
    stock_vae = AutoencoderKL.from_pretrained(Path(eng.info.path) / "vae", torch_dtype=torch.float32).eval()
    eng._scheduler(params["scheduler"])  # the engine's scheduler of this kind, for its class and configuration
    sched = eng._schedulers[params["scheduler"]]
    plain = StableDiffusionImg2ImgPipeline(vae=stock_vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                           unet=p.unet, scheduler=type(sched).from_config(sched.config),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)

    def plain_call(with_autocast: bool = False) -> float:
        gen = torch.Generator("cpu").manual_seed(args.seed)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if with_autocast else torch.autocast("cpu", enabled=False)
        t = time.perf_counter()
        with torch.no_grad(), ctx:
            plain(prompt=params["prompt"], image=image, strength=params["strength"],
                  guidance_scale=params["guidance_scale"], num_inference_steps=params["steps"], generator=gen,
                  output_type="pt")
        return time.perf_counter() - t

    tmp = tempfile.TemporaryDirectory(prefix="vald-md-rvd-")
    runs = Path(tmp.name)

    def review_call(i: int) -> tuple[float, float, dict[str, Any]]:
        first: list[float] = []
        t = time.perf_counter()
        record = run_review(eng, data, ReviewRequest(**req_kwargs), runs / f"{i:04d}",
                            progress=lambda *a: first.append(time.perf_counter()) if not first else None)
        return time.perf_counter() - t, (first[0] - t) if first else float("nan"), record

    # 3. warm-up, then alternate
    for i in range(args.warmup):
        review_call(-1 - i)
        plain_call()
        if args.plain_autocast:
            plain_call(True)
    review_s: list[float] = []
    first_s: list[float] = []
    plain_s: list[float] = []
    plain_ac_s: list[float] = []
    engine_timings: list[dict[str, float]] = []
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
                dt, first, record = review_call(i)
                review_s.append(dt)
                first_s.append(first)
                engine_timings.append(record["timings_s"])
    tmp.cleanup()

    review, plain_st = stats(review_s), stats(plain_s)
    result: dict[str, Any] = {
        "setting": args.setting, "parameters": params, "model": eng.info.name, "model_hash": eng.info.model_hash,
        "image": str(args.image), "image_shape": list(pixels.shape), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "engine_autocast": "bf16" if autocast is not None else None,
        "app_root": str(args.app_root), "runs": args.runs, "warmup": args.warmup,
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_1min_during": [round(min(loads), 2), round(max(loads), 2)],
        "review_s": review, "plain_s": plain_st, "first_progress_s": stats(first_s),
        "engine_timings_median_s": {k: round(float(np.median([t[k] for t in engine_timings])), 4)
                                    for k in engine_timings[0]},
        "ratio_review_over_plain": round(review["median"] / plain_st["median"], 3),
    }
    if plain_ac_s:
        result["plain_autocast_s"] = stats(plain_ac_s)
        result["ratio_review_over_plain_autocast"] = round(review["median"] / result["plain_autocast_s"]["median"], 3)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(
        f"| {args.setting} ({params['scheduler']} {params['steps']} x {params['strength']}, CFG "
        f"{params['guidance_scale']}) | {result['engine_autocast'] or 'fp32'} | {review['median']:.3f} s | "
        f"{plain_st['median']:.3f} s | **{result['ratio_review_over_plain']:.3f}** | "
        f"{result['first_progress_s']['median'] * 1e3:.0f} ms | {load_start[0]:.2f} "
        f"({result['load_average_1min_during'][0]:.2f}-{result['load_average_1min_during'][1]:.2f}) |\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
