"""The model folder on disk: check it, read its manifest, name its content (the model hash), load it as a pipeline
and describe it (:class:`ModelInfo`), write one, assemble one from a Stable Diffusion folder and a BERT-family text
encoder. Inference on the loaded pipeline (device, precision, generation) lives above, in ``app.engine``.

A model folder is a diffusers-format folder (``model_index.json``; ``unet/``, ``vae/``, ``scheduler/``,
``tokenizer/``, ``text_encoder/``) plus VALD-MD's manifest ``vald_md.json`` (name, class prompts, presets,
provenance and the folder's own :func:`model_hash`). Every writer here and in ``app.train`` builds the new folder
as ``<out>.partial`` (:func:`staging_folder`) and renames it over ``out`` once the manifest is in
(:func:`finish_model_folder`), so a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.fileio import sha256_bytes, sha256_file
from app.generation import model_presets
from app.provenance import library_versions

__all__ = ["DEFAULT_MODEL_DIR", "MANIFEST", "WEIGHT_SUFFIXES", "ModelFolderError", "ModelInfo", "assemble_model",
           "check_model_folder", "finish_model_folder", "load_model", "model_hash", "read_manifest",
           "seeded_img2img_pipeline_class", "staging_folder", "write_model_folder"]

MANIFEST = "vald_md.json"
"""The manifest's file name inside a model folder."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt")
"""The files :func:`model_hash` covers (weights, configurations, vocabularies); MODEL_CARD.md and docs are not."""
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model_weights" / "vald-md-mini"
"""The embedded model (``model_weights/vald-md-mini``)."""


class ModelFolderError(ValueError):
    """The model folder is missing, incomplete or malformed. The message says what is missing and where."""


class _AcceptAnyTextEncoder(logging.Filter):
    """Building a Stable Diffusion pipeline around a BERT text encoder (RadBERT, the paper's; the embedded model's)
    makes diffusers warn "Expected types for text_encoder: CLIPTextModel, got BertModel", which reads like an
    error at every start. The engine supports both encoders on purpose (``text_encoder_type`` in the model info),
    so only that one message is dropped; every other warning of the pipeline loader still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Expected types for text_encoder:")


logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_AcceptAnyTextEncoder())


class _NoImageProcessorNeeded(logging.Filter):
    """Importing the img2img pipeline's module touches ``transformers.CLIPImageProcessor``; transformers 5 without
    torchvision then warns "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil` ... Install torchvision" (and the same for ``SiglipImageProcessor``) at every start.
    VALD-MD loads no image processor (no feature extractor, no safety checker), so the advice to install a
    library is wrong for it; only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in str(record.msg)


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorNeeded())


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off while a model folder loads (the server's log is not a
    terminal: the bars' carriage returns end up in it), restored afterwards. The switches are process-wide."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in was:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            if enabled:
                lib.enable_progress_bar()


def model_hash(folder: Path | str) -> str:
    """SHA-256 over (relative path, SHA-256 of content) of every weight/config file in the folder, sorted.

    Identifies a model independent of where it lies on disk: 64 lowercase hex digits. The manifest, MODEL_CARD.md
    and other docs are excluded (:data:`WEIGHT_SUFFIXES`).
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    lines = [f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n" for f in files if f.name != MANIFEST]
    return sha256_bytes("".join(lines).encode())


def check_model_folder(folder: Path | str) -> dict[str, Any]:
    """Validate a diffusers-format folder and return its ``model_index.json``.

    Raises:
        ModelFolderError: folder or a required component (unet, vae, scheduler, tokenizer, text_encoder) missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"Model folder '{folder}' does not exist. Pass --model DIR with a diffusers-format folder "
            f"(unet/, vae/, scheduler/, tokenizer/, text_encoder/, model_index.json); the embedded default "
            f"model lives in model_weights/vald-md-mini.")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"'{folder}' has no model_index.json: it is not a diffusers model folder.")
    try:
        spec: dict[str, Any] = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"'{index}' is not valid JSON ({e.msg} at line {e.lineno}).") from None
    missing = [c for c in ("unet", "vae", "scheduler", "tokenizer", "text_encoder")
               if c not in spec or not (folder / c).is_dir()]
    if missing:
        raise ModelFolderError(f"'{folder}' lacks component(s) {', '.join(missing)}: each needs an entry in "
                               f"model_index.json and a sub-folder of that name.")
    return spec


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The folder's ``vald_md.json`` manifest (class prompts, presets, provenance), or {} when absent."""
    p = Path(folder) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else {}


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: folder, content hash, component classes and parameter counts (millions)."""

    path: str
    name: str
    model_hash: str
    components: dict[str, str]
    parameters_m: dict[str, float]
    text_encoder_type: str
    image_size: int
    image_channels: int
    class_prompts: dict[str, str]
    presets: dict[str, dict[str, Any]]
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


@functools.cache
def seeded_img2img_pipeline_class() -> type[Any]:
    """``StableDiffusionImg2ImgPipeline`` whose random draws do not depend on the model's dtype or device.

    The stock pipeline draws its two random tensors -- the autoencoder's posterior sample and the SDEdit noise --
    in the model's dtype. torch's CPU generator yields other numbers for a half-precision tensor than for a
    float32 one on some builds (measured: torch 2.11 on the GPU machine, where a bf16/fp16 run from the same
    seed gave a different counterfactual, mean |difference| 0.16-0.19 on [0, 1], while torch 2.13 here agreed),
    so a record made on a GPU in bf16 could not be reproduced in fp32 on a CPU. This subclass draws both in
    float32 from the same per-sample CPU generators, in the stock order (every posterior sample, then every
    noise tensor), and casts the noised latents to the model dtype afterwards: with one generator per sample (as
    the engine passes them) float32 results are bit-for-bit the stock pipeline's, half-precision ones differ from
    them by rounding only. Image inputs only (no pre-encoded latents); ``generator`` is a list of
    ``batch_size x num_images_per_prompt`` generators, or one (then drawn from sample by sample) or None.
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class SeededImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
        # components set by DiffusionPipeline.register_modules at run time; declared for the type checker (mypy
        # sees diffusers' placeholder class for this pipeline, which has no attributes)
        vae: Any
        scheduler: Any
        # set by the engine for one call: called once the starting latents are made (input encoded and noised)
        on_latents_ready: Callable[[], None] | None = None

        def prepare_latents(self, image: torch.Tensor, timestep: torch.Tensor, batch_size: int,
                            num_images_per_prompt: int, dtype: torch.dtype, device: torch.device | str,
                            generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
            n = batch_size * num_images_per_prompt
            gens = generator if isinstance(generator, list) else [generator] * n
            if len(gens) != n:
                raise ValueError(f"{len(gens)} generators for a batch of {n}")
            image = image.to(device=device, dtype=self.vae.dtype)
            if image.shape[0] not in (1, n):
                raise ValueError(f"cannot spread {image.shape[0]} images over a batch of {n}")
            dist = self.vae.encode(image).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            z = torch.cat([mean[i % len(mean)][None] + std[i % len(std)][None]
                           * randn_tensor((1, *mean.shape[1:]), generator=g, device=device, dtype=torch.float32)
                           for i, g in enumerate(gens)])
            # kept for the engine's reconstruction (the posterior mode of the same encode: no second VAE encode)
            self.posterior_mean = mean
            z = self.vae.config.scaling_factor * z
            noise = torch.cat([randn_tensor((1, *z.shape[1:]), generator=g, device=device, dtype=torch.float32)
                               for g in gens])
            # kept for an edit restricted to a region (the engine's ``edit_region``): outside it, each step's
            # latent is this clean latent noised with this noise to the step's level
            self.init_latents, self.init_noise = z, noise
            noised: torch.Tensor = self.scheduler.add_noise(z, noise, timestep).to(dtype)
            started = getattr(self, "on_latents_ready", None)
            if started is not None:  # the engine's step-0 progress event, before the first UNet evaluation
                started()
            return noised

    return SeededImg2ImgPipeline


def load_model(folder: Path, dtype: torch.dtype) -> tuple[Any, ModelInfo]:
    """Load a model folder as the seeded img2img pipeline (:func:`seeded_img2img_pipeline_class`; on the CPU,
    weights in ``dtype``, progress bars off: the loaders' and the denoising loop's) and describe it
    (:class:`ModelInfo`, the manifest's presets checked).

    The content hash (68 MB of SHA-256 for the embedded model) runs in a thread beside the load: hashlib releases
    the GIL.

    Raises:
        ModelFolderError: the folder is missing or malformed, a component does not load, or the manifest's
            presets are not valid.
    """
    spec = check_model_folder(folder)
    with ThreadPoolExecutor(1, thread_name_prefix="vald-md-model-hash") as hasher:
        digest = hasher.submit(model_hash, folder)
        try:
            pipeline_class = seeded_img2img_pipeline_class()
            with _no_loading_bars():
                pipe = pipeline_class.from_pretrained(
                    folder, local_files_only=True, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ModelFolderError(f"Could not load the model in '{folder}': {e}") from None
        folder_hash = digest.result()
    pipe.set_progress_bar_config(disable=True)
    manifest = read_manifest(folder)
    try:
        presets = model_presets(manifest.get("presets", {}))
    except ValueError as e:
        raise ModelFolderError(f"'{folder / MANIFEST}': {e}") from None
    info = ModelInfo(
        path=str(folder), name=manifest.get("name", folder.name), model_hash=folder_hash,
        components={k: f"{v[0]}.{v[1]}" for k, v in spec.items()
                    if isinstance(v, list) and len(v) == 2 and v[0] is not None},
        parameters_m={n: round(sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6, 2)
                      for n in ("unet", "vae", "text_encoder")},
        text_encoder_type=type(pipe.text_encoder).__name__,
        image_size=int(getattr(pipe.unet.config, "sample_size", 64)) * pipe.vae_scale_factor,
        image_channels=int(pipe.vae.config.in_channels), class_prompts=manifest.get("class_prompts", {}),
        presets=presets, manifest=manifest)
    return pipe, info


def staging_folder(out: Path) -> Path:
    """``<out>.partial`` beside ``out``, where a new model folder is built; a leftover of an earlier, interrupted
    write is removed first, so the returned path does not exist."""
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def finish_model_folder(staging: Path, out: Path, manifest: dict[str, Any]) -> str:
    """Hash the complete folder ``staging``, write ``manifest`` with that ``model_hash`` (last key) into it as
    ``vald_md.json``, and rename it to ``out`` (an old ``out`` is replaced). Returns the model hash."""
    digest = model_hash(staging)
    (staging / MANIFEST).write_text(json.dumps({**manifest, "model_hash": digest}, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return digest


def write_model_folder(out: Path, *, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                       manifest: dict[str, Any], dtype: torch.dtype = torch.float16,
                       scheduler: Any | None = None) -> str:
    """Write a complete diffusers-format model folder (safetensors) plus ``vald_md.json``; return its model hash.

    The components are saved in ``dtype`` and left in float32 afterwards. The scheduler defaults to Stable
    Diffusion v1's PNDM configuration (the paper's sampler).
    """
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline

    out = Path(out)
    if scheduler is None:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                                  steps_offset=1)
    # Any: mypy sees diffusers' placeholder class for the pipeline, without its methods
    pipe: Any = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    pipe.to(dtype)
    staging = staging_folder(out)
    pipe.save_pretrained(staging, safe_serialization=True)
    pipe.to(torch.float32)
    return finish_model_folder(staging, out, manifest)


def assemble_model(base: Path, text_encoder_dir: Path, out: Path) -> dict[str, Any]:
    """Combine a Stable Diffusion v1.x folder with a BERT-family text encoder (e.g. RadBERT) into a new folder.

    The UNet, autoencoder and scheduler come from ``base``; tokenizer and encoder from ``text_encoder_dir``
    (a transformers folder). When the encoder's hidden size differs from the UNet's ``cross_attention_dim``, a
    linear projection is added with diffusers' own mechanism (``encoder_hid_dim_type="text_proj"``), newly
    initialised; otherwise nothing is added. The result is the starting point for ``vald-md train dreambooth``.

    Returns:
        A summary: {"projection": bool, "hidden_size": int, "cross_attention_dim": int, "model_hash": str}.

    Raises:
        ModelFolderError: either folder is missing or malformed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import PNDMScheduler
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    check_model_folder(base)
    if not (Path(text_encoder_dir) / "config.json").is_file():
        raise ModelFolderError(f"'{text_encoder_dir}' has no config.json: not a transformers text-encoder folder")
    cfg = AutoConfig.from_pretrained(text_encoder_dir, local_files_only=True)
    hidden = int(cfg.hidden_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir, local_files_only=True)
        encoder = AutoModel.from_pretrained(text_encoder_dir, local_files_only=True, add_pooling_layer=False)
    except TypeError:
        encoder = AutoModel.from_pretrained(text_encoder_dir, local_files_only=True)
    if tokenizer.model_max_length > 512:
        tokenizer.model_max_length = 77  # SD's prompt length; BERT tokenizers often say "unlimited"
    unet_cfg = UNet2DConditionModel.load_config(Path(base) / "unet")
    cross = int(unet_cfg["cross_attention_dim"])
    projection = hidden != cross
    extra = {"encoder_hid_dim": hidden, "encoder_hid_dim_type": "text_proj"} if projection else {}
    unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet", low_cpu_mem_usage=False, **extra)
    vae = AutoencoderKL.from_pretrained(Path(base) / "vae")
    scheduler = PNDMScheduler.from_pretrained(Path(base) / "scheduler")
    manifest = {"name": Path(out).name, "assembled_from": {"base": str(Path(base).name),
                                                           "base_hash": model_hash(base),
                                                           "text_encoder": str(Path(text_encoder_dir).name),
                                                           "text_encoder_hash": model_hash(text_encoder_dir)},
                "projection": projection, "library_versions": library_versions()}
    digest = write_model_folder(out, unet=unet, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                manifest=manifest, dtype=torch.float32, scheduler=scheduler)
    return {"projection": projection, "hidden_size": hidden, "cross_attention_dim": cross, "model_hash": digest}
