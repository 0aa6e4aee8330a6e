"""Where the time of one review run goes: per-stage breakdown, end-to-end latency, and the plain diffusers call.

Two set-ups (docs/PERFORMANCE.md):

* default: a model folder (``--model``; default the embedded ``model_weights/vald-md-mini`` when it exists, else a
  model built in code: ``--arch tiny`` (the tests' 32 px model) or ``--arch mini`` (the embedded model's
  architecture from configs/vald-md-mini.toml, random weights, 256 px)) on the CPU with the model's healthy preset;
* ``--sd-size``: a Stable Diffusion v1.x-sized architecture with random weights (UNet 320/640/1280/1280, cross
  attention 768, 3-channel VAE 128/256/512/512, a BERT-base-sized random text encoder with a written vocabulary;
  nothing downloaded) at 512 px on the GPU when there is one, with the paper's setting (75 PNDM steps, strength 0.85,
  guidance 7.5).

Every repetition runs ``app.runs.review.run_review`` (decode -> engine -> attribution -> PNGs -> files: the
end-to-end latency; the engine's own ``timings_s`` come from its record) and, interleaved, a plain
``StableDiffusionImg2ImgPipeline`` call on the same components with the same parameters and seed. Decode,
uncached text encoding, attribution and PNG encoding are also timed on their own. Reported: median, min, max and
IQR over ``--runs``, peak RSS and, on CUDA, ``torch.cuda.max_memory_allocated``; a markdown table on stdout and
``--json PATH``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_breakdown.py --runs 5 --threads 1 --json out.json
    .venv/bin/python benchmarks/engine_breakdown.py --sd-size --runs 10 --json sd.json      # on a GPU host
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAST_PATH_OPTIONS = ("channels_last", "compile_unet")
"""Constructor options of CounterfactualEngine this script passes through when the engine has them."""

STAGES: list[tuple[str, str]] = [
    ("decode", "decode (imaging.decode_image)"),
    ("preprocess", "preprocess: letterbox to the model frame"),
    ("text_encoding", "text encoding, as the engine runs it (cached after the first call)"),
    ("text_encoding_uncached", "text encoding, uncached (pipe.encode_prompt, CFG pair)"),
    ("prepare_latents", "img2img start: VAE encode + noise + denoising step 1"),
    ("denoising", "denoising steps 2..n"),
    ("per_unet_evaluation", "  per denoising step (CFG batch of 2)"),
    ("vae_decode", "VAE decode (after the last step)"),
    ("postprocess", "postprocess: reconstruction (VAE decode of the encoded posterior), un-letterboxed"),
    ("engine_total", "engine.generate total"),
    ("attribution", "attribution: difference map + overlay + summary"),
    ("png_encoding", "PNG encoding (input, counterfactuals, reconstruction: 16-bit; overlay: 8-bit)"),
    ("end_to_end", "end to end: runs.review.run_review (incl. file writes, hashes, record)"),
    ("plain_img2img", "plain StableDiffusionImg2ImgPipeline call, same components and parameters"),
]


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="diffusers model folder (default: model_weights/vald-md-mini if present, else --arch)")
    p.add_argument("--arch", choices=["tiny", "mini"], default="tiny",
                   help="model built in code when there is no folder: 'tiny' (tests' 32 px model) or 'mini' "
                        "(vald-md-mini's architecture, random weights, 256 px). Default: tiny")
    p.add_argument("--sd-size", action="store_true",
                   help="SD v1.x-sized random-weight model at --size px (GPU when available)")
    p.add_argument("--size", type=int, default=512, help="--sd-size image size in px, multiple of 8 (default 512)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cpu for model folders, cuda when available for --sd-size)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weights dtype (default: the engine's choice: fp32 on CPU, bf16/fp16 on CUDA)")
    p.add_argument("--runs", type=int, default=5, help="timed repetitions, >= 1 (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--preset", default="healthy",
                   help="the model's preset the parameters default to (default 'healthy', the paper's setting; "
                        "'healthy-fast' = DPM-Solver++ 20 steps where the engine has it)")
    p.add_argument("--steps", type=int, default=None, help="scheduler steps (default: the preset's)")
    p.add_argument("--strength", type=float, default=None, help="(0, 1] (default: the preset's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the preset's)")
    p.add_argument("--scheduler", choices=["pndm", "ddim", "dpm++", "euler"], default=None,
                   help="sampler (default: the preset's, else pndm)")
    p.add_argument("--samples", type=int, default=1, help="samples per run, one batch (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the engine and the plain call (default 0)")
    p.add_argument("--image", type=Path, default=None,
                   help="input file (DICOM/PNG/JPEG); default: a synthetic 1024x1024 16-bit PNG")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain diffusers comparison")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last UNet/VAE: passed to the engine if it has the option, else applied here to "
                        "the shared components (engine and plain call alike)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: passed to the engine if it has the option, else applied here")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where built-in models are written (default: a temporary folder, removed at the end)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.sd_size and args.model is not None:
        p.error("--sd-size builds its own model; drop --model")
    if args.runs < 1 or args.warmup < 0:
        p.error(f"--runs must be >= 1 and --warmup >= 0 (got {args.runs}, {args.warmup})")
    if args.sd_size and (args.size < 64 or args.size % 8):
        p.error(f"--size={args.size} must be a multiple of 8, at least 64")
    if args.samples < 1 or args.samples > 16:
        p.error(f"--samples={args.samples} must be within 1..16")
    return args


# ----------------------------------------------------------------------------------------------------------------
# models built in code (random weights; nothing downloaded)
# ----------------------------------------------------------------------------------------------------------------
def write_vocab(path: Path, size: int = 30522) -> Path:
    """A BERT-style vocabulary of ``size`` entries: specials, a few radiology words, then ``[unusedN]`` fillers."""
    words = ("normal chest x ray - healthy scan covid 19 viral pneumonia lung opacity left right cardiomegaly "
             "effusion no findings with large small").split()
    entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    entries += [f"[unused{i}]" for i in range(size - len(entries))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(entries) + "\n")
    return path


def build_sd_size_model(out: Path, size: int, device: str) -> Path:
    """SD v1.x-sized UNet + 3-channel VAE + BERT-base-sized text encoder, random weights, written as a folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from app.modelfolder import write_model_folder

    init_device = device if device.startswith("cuda") else "cpu"
    torch.manual_seed(0)
    with torch.device(init_device):  # random init of ~1 G parameters is several times faster on the GPU
        unet = UNet2DConditionModel(
            sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, latent_channels=4, sample_size=size)
        vocab = write_vocab(out.parent / f"{out.name}-vocab" / "vocab.txt")
        tok = BertTokenizerFast(vocab_file=str(vocab), model_max_length=77)
        enc = BertModel(BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, max_position_embeddings=512),
                        add_pooling_layer=False).eval()
    write_model_folder(out, unet=unet, vae=vae, text_encoder=enc, tokenizer=tok, dtype=torch.float16,
                       manifest={"name": f"sd-v1-size-random-{size}px"})
    del unet, vae, enc
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def build_mini_model(out: Path) -> Path:
    """vald-md-mini's architecture (configs/vald-md-mini.toml) with random UNet/VAE and the packaged MiniLM."""
    import torch

    from app.modelfolder import write_model_folder
    from app.train.config import load_config
    from app.train.unet import build_unet, load_minilm
    from app.train.vae import build_vae

    cfg = load_config(ROOT / "configs" / "vald-md-mini.toml", needs=("data", "vae", "unet", "text_encoder"))
    assert cfg.data and cfg.vae and cfg.unet and cfg.text_encoder
    size = cfg.data.image_size
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, size)
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    unet = build_unet(cfg.unet, size // factor, cfg.vae.latent_channels)
    enc, tok = load_minilm(cfg.text_encoder.max_length)
    write_model_folder(out, unet=unet, vae=vae, text_encoder=enc, tokenizer=tok, dtype=torch.float16,
                       manifest={"name": "vald-md-mini-architecture-random"})
    return out


def resolve_model(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(model folder, how it was obtained)."""
    from app.modelfolder import DEFAULT_MODEL_DIR

    if args.sd_size:
        return build_sd_size_model(work / "sd-size", args.size, args.device), f"SD v1.x-sized, random, {args.size}px"
    if args.model is not None:
        return args.model, "folder"
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return DEFAULT_MODEL_DIR, "embedded"
    if args.arch == "mini":
        return build_mini_model(work / "mini"), "vald-md-mini architecture, random weights"
    from tests.tiny_model import write_tiny_model

    return write_tiny_model(work / "tiny"), "tiny in-code model (tests/tiny_model.py)"


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------
def synthetic_png(size: int = 1024) -> bytes:
    """A chest-radiograph-like 16-bit PNG: smooth body, two dark lung fields, noise. Deterministic."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    body = 0.55 + 0.25 * np.exp(-((x - 0.5) ** 2) / 0.08)
    lungs = sum(np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.45) / 0.25) ** 2)) for cx in (0.32, 0.68))
    img = np.clip(body - 0.35 * lungs + np.random.default_rng(0).normal(0, 0.02, (size, size)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def stats(values: list[float]) -> dict[str, float]:
    """median / min / max / q1 / q3 (seconds) and n."""
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "max": float(a.max()), "q1": float(q1), "q3": float(q3),
            "n": int(a.size)}


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def apply_fast_paths(args: argparse.Namespace, eng: Any, engine_kwargs: dict[str, Any]) -> dict[str, str]:
    """Fast paths the engine does not take as options, applied to the (shared) components here."""
    import torch

    applied: dict[str, str] = {}
    if args.channels_last and "channels_last" not in engine_kwargs:
        eng.pipe.unet.to(memory_format=torch.channels_last)
        eng.pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = "applied by the benchmark to the shared UNet and VAE"
    if args.compile and "compile_unet" not in engine_kwargs:
        eng.pipe.unet = torch.compile(eng.pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
        applied["compile_unet"] = "applied by the benchmark (torch.compile of the shared UNet)"
    for name in engine_kwargs:
        applied[name] = "passed to CounterfactualEngine"
    return applied


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from app import attribution, imaging, rendering
    from app.engine import CounterfactualEngine, effective_steps
    from app.provenance import library_versions
    from app.runs.review import ReviewRequest, run_review

    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # "expected CLIPTextModel" for BERT encoders; a design choice
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    if args.device is None:
        args.device = "cuda" if args.sd_size and torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    tmp = tempfile.TemporaryDirectory(prefix="vald-md-bench-")
    work = args.work_dir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    load_avg_start = os.getloadavg()

    # 1. the model
    t = time.perf_counter()
    folder, origin = resolve_model(args, work)
    build_s = time.perf_counter() - t
    accepted = set(inspect.signature(CounterfactualEngine.__init__).parameters)
    wanted = {"channels_last": args.channels_last, "compile_unet": args.compile}
    engine_kwargs = {k: True for k, v in wanted.items() if v and k in accepted}
    t = time.perf_counter()
    eng = CounterfactualEngine(folder, device=args.device, dtype=args.dtype, **engine_kwargs)
    load_s = time.perf_counter() - t
    fast_paths = apply_fast_paths(args, eng, engine_kwargs)
    if args.preset not in eng.info.presets:
        raise SystemExit(f"--preset={args.preset!r}: the model has presets {', '.join(sorted(eng.info.presets))}")
    preset = eng.info.presets[args.preset]
    args.scheduler = args.scheduler or str(preset.get("scheduler", "pndm"))
    params = {"preset": args.preset, "prompt": str(preset.get("prompt", "normal chest x-ray")), "negative_prompt": "",
              "strength": args.strength if args.strength is not None else float(preset.get("strength", 0.85)),
              "guidance_scale": (args.guidance if args.guidance is not None
                                 else float(preset.get("guidance_scale", 7.5))),
              "steps": args.steps if args.steps is not None else int(preset.get("steps", 75)),
              "scheduler": args.scheduler, "samples": args.samples, "seed": args.seed}
    req = ReviewRequest(prompt=params["prompt"], strength=params["strength"], guidance_scale=params["guidance_scale"],
                        steps=params["steps"], seed=args.seed, scheduler=args.scheduler, samples=args.samples,
                        reference=str(eng.info.manifest.get("map_reference", "input")))

    # 2. the input
    data = args.image.read_bytes() if args.image else synthetic_png()
    decoded = imaging.decode_image(data)
    pixels = decoded.pixels
    img_model, _ = imaging.letterbox(pixels, eng.info.image_size)
    image_tensor = (torch.from_numpy(np.ascontiguousarray(img_model))[None, None]
                    .repeat(1, eng.info.image_channels, 1, 1).to(eng.device, eng.dtype))

    # 3. the plain diffusers pipeline on the same components (fresh scheduler of the same class and config)
    eng.generate(pixels, params["prompt"], strength=params["strength"], guidance_scale=params["guidance_scale"],
                 steps=params["steps"], seed=args.seed, scheduler=args.scheduler, samples=args.samples)
    plain = None
    if not args.no_plain:
        p = eng.pipe
        plain = StableDiffusionImg2ImgPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                                               unet=p.unet, scheduler=type(p.scheduler).from_config(p.scheduler.config),
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
        plain.set_progress_bar_config(disable=True)

    def plain_call() -> np.ndarray:
        assert plain is not None
        gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.samples)]
        with torch.no_grad():
            out = plain(prompt=params["prompt"], negative_prompt=params["negative_prompt"], image=image_tensor,
                        strength=params["strength"], guidance_scale=params["guidance_scale"],
                        num_inference_steps=params["steps"], num_images_per_prompt=args.samples, generator=gens,
                        output_type="pt")
        return out.images.float().mean(1).clamp(0, 1).cpu().numpy()

    # 4. warm-up (first calls allocate, pick kernels, fill the prompt cache) and the same-work check
    out_dir = work / "runs"
    for i in range(args.warmup):
        run_review(eng, data, req, out_dir / f"warmup-{i}")
        if plain is not None:
            plain_call()
    check = eng.generate(pixels, params["prompt"], strength=params["strength"],
                         guidance_scale=params["guidance_scale"], steps=params["steps"], seed=args.seed,
                         scheduler=args.scheduler, samples=args.samples)
    same_work: dict[str, Any] = {}
    if plain is not None:
        ref = plain_call()
        same_work = {"max_abs_difference_engine_vs_plain": float(np.abs(ref - check.counterfactuals_model).max())}

    # 5. timed repetitions: run_review and the plain call interleaved, so drift hits both alike
    def attribution_stage() -> Any:  # the unsmoothed map (the paper's): every sample brought to the native frame
        amap = attribution.difference_map(pixels, check.counterfactuals)
        rendering.render_overlay(pixels, amap)
        attribution.summarize(amap)
        return amap

    def png_stage(overlay: np.ndarray) -> None:
        imaging.to_png_bytes(pixels, bits=16)
        imaging.to_png_bytes(check.counterfactual(0), bits=16)  # as run_review writes them: the first native,
        for cf in check.counterfactuals_model[1:]:  # the others at the model's resolution
            imaging.to_png_bytes(imaging.content_of(cf, check.letterbox), bits=16)
        imaging.to_png_bytes(check.reconstruction, bits=16)
        imaging.to_png_bytes(overlay)

    def uncached_text_encoding() -> Any:
        with torch.no_grad():
            return eng.pipe.encode_prompt(params["prompt"], eng.device, 1, True, "")

    samples: dict[str, list[float]] = {k: [] for k, _ in STAGES}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.runs):
        dt, record = timed(partial(run_review, eng, data, req, out_dir / f"{i:04d}"), sync)
        samples["end_to_end"].append(dt)
        for k in ("preprocess", "text_encoding", "prepare_latents", "denoising", "vae_decode", "postprocess"):
            samples[k].append(float(record.timings_s[k]))
        samples["engine_total"].append(float(record.timings_s["total"]))
        samples["per_unet_evaluation"].append(record.timings_s["denoising"]
                                              / max(1, (record.unet_evaluations or 1) - 1))
        if plain is not None:
            samples["plain_img2img"].append(timed(plain_call, sync)[0])
        samples["decode"].append(timed(partial(imaging.decode_image, data), sync)[0])
        samples["text_encoding_uncached"].append(timed(uncached_text_encoding, sync)[0])
        dt, amap = timed(attribution_stage, sync)
        samples["attribution"].append(dt)
        samples["png_encoding"].append(timed(partial(png_stage, rendering.render_overlay(pixels, amap)), sync)[0])

    results = {k: stats(v) for k, v in samples.items() if v}
    ratios: dict[str, float] = {}
    if plain is not None:
        core = [a + b + c + d for a, b, c, d in zip(samples["text_encoding"], samples["prepare_latents"],
                                                   samples["denoising"], samples["vae_decode"], strict=True)]
        plain_med = results["plain_img2img"]["median"]
        ratios = {"engine_img2img_part_over_plain": float(np.median(core)) / plain_med,
                  "engine_total_over_plain": results["engine_total"]["median"] / plain_med,
                  "end_to_end_over_plain": results["end_to_end"]["median"] / plain_med,
                  # under CPU contention the minimum is the better estimate of the uncontended cost
                  "engine_img2img_part_over_plain_min": min(core) / results["plain_img2img"]["min"]}
    memory = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if cuda:
        memory["cuda_max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    tmp.cleanup()
    return {
        "setup": "sd-size" if args.sd_size else "model",
        "model": {"name": eng.info.name, "origin": origin, "path": str(folder) if origin in ("folder", "embedded")
                  else None, "model_hash": eng.info.model_hash, "parameters_millions": eng.info.parameters_m,
                  "image_size": eng.info.image_size, "image_channels": eng.info.image_channels,
                  "text_encoder": eng.info.text_encoder_type},
        "device": str(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(eng.device) if cuda else None,
        "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load_avg_start],
        "platform": platform.platform(), "library_versions": library_versions(),
        "parameters": params, "effective_steps": effective_steps(params["steps"], params["strength"]),
        "unet_evaluations": check.unet_evaluations,
        "input": {"shape": list(pixels.shape), "source": str(args.image) if args.image else "synthetic 1024x1024"},
        "runs": args.runs, "warmup": args.warmup, "model_build_s": round(build_s, 3), "model_load_s": round(load_s, 3),
        "fast_paths": fast_paths, "fast_path_options_in_engine": sorted(set(FAST_PATH_OPTIONS) & accepted),
        "results_s": results, "ratios": ratios, "same_work": same_work, "memory": memory,
    }


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table (milliseconds) plus a few lines of context."""
    res = report["results_s"]
    e2e = res["end_to_end"]["median"]
    m = report["model"]
    lines = [
        f"**{m['name']}** ({m['origin']}; {m['image_size']} px, {m['image_channels']}-channel, "
        f"params M {m['parameters_millions']}) on {report['device']} {report['dtype']}"
        + (f" ({report['gpu']})" if report["gpu"] else f", {report['torch_threads']} torch thread(s)")
        + f"; preset {report['parameters']['preset']}: {report['parameters']['scheduler']} "
          f"{report['parameters']['steps']} steps x strength "
          f"{report['parameters']['strength']} = {report['effective_steps']} effective "
          f"({report['unet_evaluations']} UNet evaluations), CFG {report['parameters']['guidance_scale']}, "
          f"{report['parameters']['samples']} sample(s); input {report['input']['shape']}; median of "
          f"{report['runs']} runs after {report['warmup']} warm-up; load average at start "
          f"{report['load_average_at_start'][0]}.",
        "",
        "| stage | median ms | min ms | max ms | IQR ms | share of end to end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in STAGES:
        if key not in res:
            continue
        s = res[key]
        share = "" if key in ("end_to_end", "plain_img2img", "per_unet_evaluation", "engine_total",
                              "text_encoding_uncached") else f"{100 * s['median'] / e2e:.1f} %"
        lines.append(f"| {label} | {1e3 * s['median']:.1f} | {1e3 * s['min']:.1f} | {1e3 * s['max']:.1f} | "
                     f"{1e3 * (s['q3'] - s['q1']):.1f} | {share} |")
    lines.append("")
    if report["ratios"]:
        r = report["ratios"]
        lines.append(f"Engine vs plain diffusers call (same run): img2img part / plain = "
                     f"{r['engine_img2img_part_over_plain']:.3f}; engine.generate / plain = "
                     f"{r['engine_total_over_plain']:.3f}; end to end / plain = {r['end_to_end_over_plain']:.3f}; "
                     f"img2img part / plain, ratio of the minima = {r['engine_img2img_part_over_plain_min']:.3f}; "
                     f"max |engine - plain| at the same seed = "
                     f"{report['same_work']['max_abs_difference_engine_vs_plain']:.2e}.")
    mem = report["memory"]
    lines.append(f"Peak RSS {mem['peak_rss_mib']:.0f} MiB"
                 + (f"; torch.cuda.max_memory_allocated {mem['cuda_max_memory_allocated_mib']:.0f} MiB"
                    if "cuda_max_memory_allocated_mib" in mem else "")
                 + f"; model load {report['model_load_s']:.1f} s. Fast paths: "
                 + (", ".join(f"{k} ({v})" for k, v in report["fast_paths"].items()) or "none")
                 + "; engine options available: " + (", ".join(report["fast_path_options_in_engine"]) or "none")
                 + ".")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    sys.stderr.write(f"engine_breakdown: {'sd-size' if args.sd_size else 'model'} set-up, runs={args.runs}, "
                     f"warmup={args.warmup}, device={args.device or 'auto'}, threads={args.threads or 'default'}\n")
    report = run(args)
    sys.stdout.write(markdown(report) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        sys.stderr.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
