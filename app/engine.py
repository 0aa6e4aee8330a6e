"""The counterfactual engine: a diffusers model folder in, healthy (or diseased) counterfactuals out.

The engine wraps the stock ``StableDiffusionImg2ImgPipeline`` (SDEdit-style img2img, Meng et al. 2022) with
components injected from a local folder: a UNet, an ``AutoencoderKL`` (3-channel SD or 1-channel VALD-MD),
a scheduler, and a text encoder that may be CLIP or any BERT-family model (the paper's RadBERT, the embedded
model's MiniLM). Nothing is fetched from a hub. The folder itself (checked, hashed, loaded as a pipeline, described
by ``ModelInfo``; written by training) is ``app.modelfolder``'s; the engine places the loaded pipeline on its device
and precision and generates.

Order of operations in :meth:`CounterfactualEngine.generate_request` (one frozen ``app.generation.GenerationRequest``;
:meth:`~CounterfactualEngine.generate` builds one from keywords):
  1. check inputs; 2. letterbox the native image to the model's square input; 3. encode the prompt (cached);
  4. run img2img (strength -> effective steps ``int(steps * strength)``); 5. autoencoder reconstruction of the
  input (reference for attribution maps), in the native frame. The samples stay in the model frame; the result
  brings them to the native frame on demand (:meth:`CounterfactualResult.counterfactual`).

One lock serialises calls: the pipeline is not thread-safe.

Size (about 730 lines, over the project's ~500): one concern, inference (device and precision, bf16 autocast on CPUs
with AMX or AVX-512 bf16, the seeded generation with its progress previews, cancellation and edit region, the
reconstruction, loading on a short-lived thread), plus ~40 lines of compatibility re-exports of names that moved to
``app.modelfolder`` and ``app.provenance``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app import imaging
from app.generation import PRESETS as PRESETS  # re-exported: the presets' and schedulers' public home was here
from app.generation import SCHEDULERS as SCHEDULERS
from app.generation import GenerationRequest as GenerationRequest
from app.generation import Preset as Preset
from app.generation import Scheduler as Scheduler
from app.generation import draw_seed
from app.generation import effective_steps as effective_steps
from app.modelfolder import DEFAULT_MODEL_DIR, load_model

# compatibility: the model folder (checked, hashed, read, written, assembled) moved to app.modelfolder and the
# library versions to app.provenance (issue 17); the old public names stay importable from here, and are listed in
# __all__. ``img2img_pipeline_class`` is now ``app.modelfolder.seeded_img2img_pipeline_class``;
# ``load_in_passing_thread`` is now :func:`load_engine_in_short_lived_thread` (aliased at the end).
# ``encode_prompt_embeddings`` moved to ``app.train.common`` and is NOT re-exported: the engine may not import the
# training layer (tests/test_layering.py).
from app.modelfolder import MANIFEST as MANIFEST
from app.modelfolder import WEIGHT_SUFFIXES as WEIGHT_SUFFIXES
from app.modelfolder import ModelFolderError as ModelFolderError  # re-exported: the constructor raises it
from app.modelfolder import ModelInfo as ModelInfo
from app.modelfolder import assemble_model as assemble_model
from app.modelfolder import check_model_folder as check_model_folder
from app.modelfolder import model_hash as model_hash
from app.modelfolder import read_manifest as read_manifest
from app.modelfolder import seeded_img2img_pipeline_class as img2img_pipeline_class
from app.modelfolder import write_model_folder as write_model_folder
from app.provenance import library_versions as library_versions

__all__ = [
    "DEFAULT_MODEL_DIR",
    "MANIFEST",
    "PRESETS",
    "SCHEDULERS",
    "WEIGHT_SUFFIXES",
    "CounterfactualEngine",
    "CounterfactualResult",
    "GenerationCancelled",
    "GenerationRequest",
    "ModelFolderError",
    "ModelInfo",
    "Preset",
    "ProgressCallback",
    "Scheduler",
    "assemble_model",
    "check_model_folder",
    "cpu_has_amx_bf16",
    "cpu_has_fast_bf16",
    "effective_steps",
    "img2img_pipeline_class",
    "library_versions",
    "load_engine_in_short_lived_thread",
    "load_in_passing_thread",
    "model_hash",
    "pick_device",
    "read_manifest",
    "write_model_folder",
]

logger = logging.getLogger("vald_md.engine")


class _WithholdPromptText(logging.Filter):
    """diffusers logs the cut-off part of a prompt longer than the text encoder's token limit. Prompts are free
    text a clinician may fill with patient details, and logs never carry them: keep the fact, drop the words."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncated" in str(record.msg):
            record.msg, record.args = "a prompt was cut to the text encoder's token limit (text withheld)", ()
        return True


for _name in ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
              "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"):
    logging.getLogger(_name).addFilter(_WithholdPromptText())


class GenerationCancelled(Exception):
    """Raised inside the denoising loop when the caller's cancel event is set (stops within one step)."""


# ----------------------------------------------------------------------------------------------------------------
# presets and schedulers (defined in app.generation; re-exported here)
# ----------------------------------------------------------------------------------------------------------------
def _scheduler_classes() -> dict[Scheduler, Any]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    return {Scheduler.PNDM: PNDMScheduler, Scheduler.DDIM: DDIMScheduler, Scheduler.DPM_PP: DPMSolverMultistepScheduler,
            Scheduler.EULER: EulerDiscreteScheduler}


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
ProgressCallback = Callable[[int, int, float, "np.ndarray | None"], None]
"""progress(step, total, elapsed_s, preview) -- denoising step ``step`` of ``total`` = the effective steps
(``int(steps * strength)``), counting from 1, as the form and the record count them (PNDM's one extra UNet
evaluation repeats the last step); before the first UNet evaluation ``step`` 0 is sent once, when the input is
encoded and noised (its preview: the input's latent), so that a run shows it has started before its first step's
compute; preview is float32 (h, w) in [0, 1] or None."""


@dataclass
class CounterfactualResult:
    """Output of :meth:`CounterfactualEngine.generate`.

    Attributes:
        counterfactuals_model: float32 (S, size, size) in [0, 1], the model's letterboxed frame (what the model
            made; :attr:`counterfactuals` and :meth:`counterfactual` bring them to the native frame on demand).
        input_model: float32 (size, size): the letterboxed input exactly as the model saw it.
        reconstruction: float32 (H, W): autoencoder round trip of the input, native frame (attribution reference).
        letterbox: geometry between the native and the model frame.
        effective_steps: denoising steps (``int(steps * strength)``); start_timestep: first timestep used;
            unet_evaluations: denoising iterations actually run (PNDM's PLMS warm-up adds one).
        seeds: one per sample. timings_s: per-stage wall time in seconds. parameters: every request parameter.
        compute: where and in which precision the run was computed (:meth:`CounterfactualEngine.compute_record`):
            ``autocast`` ``"bf16"`` when the CPU ran the autoencoder under bf16 autocast, else ``None``.
        reconstruction_model: float32 (size, size): the reconstruction in the model's letterboxed frame (what
            ``reconstruction`` was unletterboxed from), for maps smoothed in the model frame; ``None`` when the
            maker of the result did not keep it (then letterbox ``reconstruction`` again).
    """

    counterfactuals_model: np.ndarray
    input_model: np.ndarray
    reconstruction: np.ndarray
    letterbox: Any
    effective_steps: int
    start_timestep: int
    unet_evaluations: int
    seeds: list[int]
    timings_s: dict[str, float]
    model_hash: str
    parameters: dict[str, Any]
    compute: dict[str, Any] = field(default_factory=dict)
    reconstruction_model: np.ndarray | None = None

    @functools.cached_property
    def counterfactuals(self) -> np.ndarray:
        """float32 (S, H, W) in [0, 1]: every sample in the native frame of the input (unletterboxed on first use
        and kept; a review run needs only the first at native size, :meth:`counterfactual`)."""
        return np.stack([self.counterfactual(i) for i in range(len(self.counterfactuals_model))])

    def counterfactual(self, sample: int) -> np.ndarray:
        """float32 (H, W) in [0, 1]: sample ``sample`` (0-based) in the native frame of the input."""
        if "counterfactuals" in self.__dict__:  # where functools.cached_property keeps the stack once made
            return np.asarray(self.__dict__["counterfactuals"][sample])
        return imaging.unletterbox(self.counterfactuals_model[sample], self.letterbox).astype(np.float32, copy=False)

    def record(self) -> dict[str, Any]:
        """JSON-ready description of the run (no pixel data)."""
        lb = self.letterbox
        return {
            "parameters": self.parameters,
            "effective_steps": self.effective_steps,
            "start_timestep": self.start_timestep,
            "unet_evaluations": self.unet_evaluations,
            "seeds": self.seeds,
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "model_hash": self.model_hash,
            "letterbox": asdict(lb) if hasattr(lb, "__dataclass_fields__") else str(lb),
            "library_versions": library_versions(),
            **({"compute": self.compute} if self.compute else {}),
        }


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def pick_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16/fp16 when available, else CPU fp32. ``device``/``dtype`` ('fp32','fp16','bf16') override."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype:
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    elif dev.type == "cuda":
        dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dt = torch.float32
    return dev, dt


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; Linux x86-64); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16`` in /proc/cpuinfo; Linux x86-64). False where unknown."""
    return "amx_bf16" in _cpu_flags()


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix work is markedly faster than fp32 on this CPU: AMX bf16 tiles (``amx_bf16``; Intel
    Sapphire Rapids and later: the mini VAE decode 1.7x) or AVX-512 bf16 dot products (``avx512_bf16``; e.g. AMD
    Zen 4: the mini VAE decode 1.8-2.3x, its UNet at batch 32 1.5x; docs/PERFORMANCE.md). False where unknown."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


class _Switch:
    """A wrapper of model components that acts only while ``active``: :meth:`on` is the context of one generation."""

    active = False

    @contextlib.contextmanager
    def on(self) -> Any:
        self.active = True
        try:
            yield
        finally:
            self.active = False


class _AutoencoderAutocast(_Switch):
    """bf16 autocast for the autoencoder's encoder and decoder only, switched on per call (``active``).

    Measured on the embedded model (256 px, 1 thread, AMX CPU): the decoder 455 -> 127 ms and the encoder 233 ->
    68 ms with bf16 autocast and channels-last weights (oneDNN's AMX kernels want NHWC), while the small UNet gets
    slower under autocast at batch 2 (74.7 -> 82.8 ms per CFG step; 91 ms channels-last): so the UNet stays float32
    here (batches of :data:`UNET_AUTOCAST_MIN_BATCH` or more gain, and take :class:`_UNetAutocast`).
    The decoder's last layer stays float32 so that images keep float32 resolution (bf16 would quantise [0, 1]
    to steps of up to 2**-9, coarser than a 16-bit PNG). Wrapping the two sub-modules' ``forward`` on the
    instance, not the classes, leaves every other user of the classes alone; with ``active`` False (a plain
    diffusers call on the same components, the DDIM map methods) they run as before, in float32.
    """

    def __init__(self, vae: Any, dtype: torch.dtype) -> None:
        self.active = False
        vae.to(memory_format=torch.channels_last)
        for module in (vae.encoder, vae.decoder):
            module.forward = self._autocast_forward(module.forward, dtype)
        conv_out = vae.decoder.conv_out
        conv_out.forward = self._float32_forward(conv_out.forward)

    def _autocast_forward(self, forward: Callable[..., Any], dtype: torch.dtype) -> Callable[..., Any]:
        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return forward(*args, **kwargs)
            with torch.autocast("cpu", dtype=dtype):
                out = forward(*args, **kwargs)
            # float32 out, as the layers after it (quant_conv, the pipeline) expect
            return out.float() if isinstance(out, torch.Tensor) else out

        return autocast_forward

    @staticmethod
    def _float32_forward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fp32_forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return forward(x.float())

        return fp32_forward


UNET_AUTOCAST_MIN_BATCH = 16
"""The smallest UNet batch (samples x 2 with classifier-free guidance) that runs under bf16 autocast on an AMX CPU
when ``cpu_autocast`` is on. The embedded model's UNet, one CFG step at 32 x 32 latents, 2 threads: batch 2 57.9
ms fp32 vs 57.8 ms bf16 (1 thread: 66 vs 75 ms, slower; docs/PERFORMANCE.md), batch 16 (8 samples) 243 vs 165 ms
(1.48x): autocast pays only where the batch is large enough to leave the UNet's per-layer overhead behind."""


class _UNetAutocast(_Switch):
    """bf16 autocast for the UNet's ``forward`` on calls with at least ``min_batch`` latents, while ``active``.

    Wraps ``forward`` on the instance (the classes stay untouched); the output is cast back to float32, as the
    scheduler expects. Smaller batches, and every call while inactive (a plain diffusers call on the same
    components, the DDIM map methods), run in float32 as before.
    """

    def __init__(self, unet: Any, dtype: torch.dtype, min_batch: int = UNET_AUTOCAST_MIN_BATCH) -> None:
        self.active = False
        self.min_batch = min_batch
        forward = unet.forward

        def autocast_forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.active or sample.shape[0] < self.min_batch:
                return forward(sample, *args, **kwargs)
            with torch.autocast("cpu", dtype=dtype):
                out = forward(sample, *args, **kwargs)
            if isinstance(out, tuple):
                return (out[0].float(), *out[1:])
            out.sample = out.sample.float()
            return out

        unet.forward = autocast_forward


class CounterfactualEngine:
    """A model folder loaded once and kept resident; ``generate`` makes counterfactuals.

    Args:
        model_dir: diffusers-format folder (unet, vae, scheduler, tokenizer, text_encoder [, vald_md.json]).
        device: 'cuda', 'cuda:1', 'cpu' or None (auto). dtype: 'fp32' | 'fp16' | 'bf16' | None (auto).
        cpu_autocast: on a CPU with fast bf16 (:func:`cpu_has_fast_bf16`: AMX or AVX-512 bf16) and fp32 weights,
            run the autoencoder (encoder and decoder, channels-last) under ``torch.autocast("cpu",
            torch.bfloat16)``; the UNet and
            the decoder's last layer stay float32 (:class:`_AutoencoderAutocast`), and the UNet joins for batches
            of :data:`UNET_AUTOCAST_MIN_BATCH` or more (:class:`_UNetAutocast`); ignored elsewhere. Off by default
            here (bit-exact fp32, as the tests expect); the server and the CLI turn it on
            (``Settings.cpu_autocast``). Records state it under ``compute``.

    Raises:
        ModelFolderError: the folder is missing or malformed.
    """

    def __init__(self, model_dir: Path | str | None = None, *, device: str | None = None,
                 dtype: str | None = None, compile_unet: bool = False, cpu_autocast: bool = False) -> None:
        folder = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        self.device, self.dtype = pick_device(device, dtype)
        self.autocast_dtype: torch.dtype | None = (
            torch.bfloat16 if cpu_autocast and self.device.type == "cpu" and self.dtype == torch.float32
            and cpu_has_fast_bf16() else None)
        t = time.perf_counter()
        pipe, self.info = load_model(folder, self.dtype)
        if self.device.type == "cuda":
            # GPU fast path: SDPA attention kernels and NHWC convolutions (tensor cores)
            from diffusers.models.attention_processor import AttnProcessor2_0

            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self.pipe = pipe.to(self.device)
        if self.device.type == "cpu":
            # one image at a time through the autoencoder: the decoder's full-resolution activations of a whole
            # batch overflow the CPU's caches (16 samples at 256 px, 2 threads, fp32 on an AVX2 CPU: 8.9 -> 5.6 s;
            # docs/PERFORMANCE.md, "Tenth session"); the results are the batched ones to rounding
            pipe.vae.enable_slicing()
        self._vae_autocast = (_AutoencoderAutocast(pipe.vae, self.autocast_dtype)
                              if self.autocast_dtype is not None else None)
        self._unet_autocast = (_UNetAutocast(pipe.unet, self.autocast_dtype)
                               if self.autocast_dtype is not None else None)
        self.compiled: str | None = compile_mode(self.device) if compile_unet else None
        if self.compiled is not None:
            # opt-in: compiled lazily by torch; the first generate() of each batch shape pays the compilation, which
            # the server's --compile start-up does before it says ready (warm_up(), load_engine_in_short_lived_thread)
            self.pipe.unet = torch.compile(self.pipe.unet, mode=self.compiled, fullgraph=False)
        self.lock = threading.Lock()
        self._prompt_cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[Scheduler, Any] = {}
        self._preview_weights = self._preview_projection(self.info.manifest)
        logger.info("model %s loaded on %s/%s in %.1f s", self.info.name, self.device, self.dtype,
                    time.perf_counter() - t)

    def warm_up(self) -> float:
        """Run short generations (compile kernels, fill caches); returns their wall time in seconds.

        The server runs it at start-up when the UNet is compiled (``Settings.compile_unet``), so that requests do
        not pay the compilation: one generation with the healthy preset's ``samples`` (the default request's batch
        shape, and its bf16 autocast where that applies) and, when that is more than one, one with a single sample
        (the paper's setting, ``minimal-edit``). Each distinct batch shape compiles once (on 2 CPU cores: ~15 s at
        batch 2, ~85 s at a batch of 32 under autocast; docs/PERFORMANCE.md). The prompt cache
        keeps the default prompt's embeddings."""
        t = time.perf_counter()
        size = self.info.image_size
        image = np.full((size, size), 0.5, np.float32)
        # the preset's guidance too: with guidance <= 1 there is no CFG batch, i.e. another shape
        default = GenerationRequest.from_preset(self.info.presets.get("healthy"), strength=0.5, steps=4, seed=0)
        for samples in dict.fromkeys((default.samples, 1)):
            self.generate_request(image, replace(default, samples=samples))
        return time.perf_counter() - t

    # -- helpers ------------------------------------------------------------------------------------------------
    def _preview_projection(self, manifest: dict[str, Any]) -> np.ndarray:
        """(C+1,) weights mapping unscaled latents to gray: from the manifest, else SD's RGB factors averaged."""
        proj = manifest.get("preview_projection")
        if proj:
            return np.asarray(proj, dtype=np.float32)
        sd_rgb = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]], dtype=np.float32)
        c = self.pipe.unet.config.in_channels
        w = sd_rgb.mean(1)[:c] if c <= 4 else np.full(c, 1.0 / c, dtype=np.float32)
        return np.concatenate([w, [0.5]]).astype(np.float32)

    def predicted_clean(self, latents: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The clean latent the sampler currently predicts for ``latents`` (just stepped from ``timestep``), for the
        live preview: PNDM from its last noise prediction (``x0 = (x - sqrt(1 - a) eps) / sqrt(a)`` at the level
        the step reached), DPM-Solver++ from its last data prediction; other samplers: ``latents`` unchanged (the
        noisy latent). Shapes as ``latents``."""
        sched = self.pipe.scheduler
        ets = getattr(sched, "ets", None)
        if ets:
            eps: torch.Tensor = ets[-1].to(latents.dtype)
            if eps.shape != latents.shape:
                return latents
            stride = sched.config.num_train_timesteps // max(1, int(sched.num_inference_steps or 1))
            t = int(timestep) - stride
            a: torch.Tensor = (sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod).to(latents.dtype)
            return (latents - (1 - a).sqrt() * eps) / a.sqrt()
        outputs = getattr(sched, "model_outputs", None)
        if getattr(sched.config, "algorithm_type", "") == "dpmsolver++" and outputs and outputs[-1] is not None:
            x0: torch.Tensor = outputs[-1]
            return x0.to(latents.dtype) if x0.shape == latents.shape else latents
        return latents

    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """Cheap preview of a latent (the predicted clean one during generation, see :meth:`predicted_clean`): a
        linear latent->gray projection, float32 (h, w) in [0, 1]."""
        z = latents[0].float().cpu().numpy() / float(self.pipe.vae.config.scaling_factor)
        img = np.tensordot(self._preview_weights[:-1], z, axes=(0, 0)) + self._preview_weights[-1]
        out: np.ndarray = np.clip(img, 0.0, 1.0).astype(np.float32)
        return out

    def _scheduler_for(self, name: Scheduler | str) -> Any:
        """The diffusers scheduler for ``name``, built once from the model's scheduler configuration.

        Raises:
            ValueError: ``name`` is not a supported scheduler.
        """
        sched = Scheduler.parse(name)
        if sched not in self._schedulers:
            cls = _scheduler_classes()[sched]
            extra = {"algorithm_type": "dpmsolver++"} if sched is Scheduler.DPM_PP else {}
            self._schedulers[sched] = cls.from_config(self._base_scheduler_config, **extra)
        return self._schedulers[sched]

    def prompt_embeddings(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeddings (1, L, D) on the model's device, cached for repeated prompts (LRU 64)."""
        key = (prompt, negative_prompt)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        with torch.no_grad():
            pos, neg = self.pipe.encode_prompt(prompt, self.device, 1, True, negative_prompt)
        self._prompt_cache[key] = (pos, neg)
        if len(self._prompt_cache) > 64:
            self._prompt_cache.popitem(last=False)
        return pos, neg

    def to_model_tensor(self, img: np.ndarray) -> torch.Tensor:
        """A letterboxed image as the model's input: float32 (size, size) in [0, 1] -> (1, C, size, size) in [0, 1]
        on the model's device and dtype, C = the autoencoder's channels (the image repeated)."""
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        return x.repeat(1, self.info.image_channels, 1, 1).to(self.device, self.dtype)

    def _to_gray(self, t: torch.Tensor) -> np.ndarray:
        """(S, C, h, w) in [-1, 1] -> float32 (S, h, w) in [0, 1] (channel mean for RGB models)."""
        return ((t.float().mean(1).clamp(-1, 1) + 1) / 2).cpu().numpy().astype(np.float32)

    @contextlib.contextmanager
    def autocast(self) -> Any:
        """The precision context of a generation: on a fast-bf16 CPU with ``cpu_autocast``, the autoencoder in bf16
        autocast, and the UNet too for batches of :data:`UNET_AUTOCAST_MIN_BATCH` latents or more; else a no-op."""
        if self._vae_autocast is None or self._unet_autocast is None:
            yield
            return
        with self._vae_autocast.on(), self._unet_autocast.on():
            yield

    def compute_record(self, unet_batch: int = 0) -> dict[str, Any]:
        """``{"device", "dtype", "autocast", "autocast_components", "compiled"}`` for a record of a run made under
        :meth:`autocast` whose UNet ran ``unet_batch`` latents per call (samples x 2 with guidance; 0 = not
        counted): the weights' device and dtype, and ``"bf16"`` with ``["vae"]`` (``["vae", "unet"]`` from
        :data:`UNET_AUTOCAST_MIN_BATCH` latents) when the autoencoder ran under bf16 autocast, else ``None`` and
        ``[]``; ``compiled`` is the UNet's ``torch.compile`` mode (:func:`compile_mode`; its kernels round
        differently from eager float32, so a replay without it differs by rounding), else ``None``."""
        on = self._vae_autocast is not None
        unet = on and self._unet_autocast is not None and unet_batch >= self._unet_autocast.min_batch
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "autocast": "bf16" if on else None,
                "autocast_components": ["vae", "unet"] if unet else ["vae"] if on else [],
                "compiled": self.compiled}

    @torch.no_grad()
    def reconstruct_model_frame(self, img_model: np.ndarray, posterior_mean: torch.Tensor | None = None) -> np.ndarray:
        """Autoencoder round trip (posterior mode) of a letterboxed image: float32 (size, size) in [0, 1].

        ``posterior_mean``: the (1, c, h, w) posterior mean of ``img_model`` when already encoded (``generate``
        passes the one img2img computed; the mode of a diagonal Gaussian is its mean): skips the encoder.
        """
        with self.autocast():
            if posterior_mean is None:
                x = self.to_model_tensor(img_model) * 2 - 1
                posterior_mean = self.pipe.vae.encode(x).latent_dist.mode()
            recon: np.ndarray = self._to_gray(self.pipe.vae.decode(posterior_mean.to(self.pipe.vae.dtype)).sample)[0]
            return recon

    def _edit_region_tensor(self, edit_region: np.ndarray) -> torch.Tensor:
        """A checked edit region (see :meth:`generate_request`), area-averaged once to the latent grid: a
        (1, 1, size / f, size / f) float32 tensor on the model's device, f = the autoencoder's down-sampling.

        Raises:
            ValueError: not a finite (size, size) array in [0, 1].
        """
        size = self.info.image_size
        arr = np.asarray(edit_region, dtype=np.float32)
        if arr.shape != (size, size) or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"edit_region must be a ({size}, {size}) array in [0, 1] in the model's frame; got "
                             f"shape {arr.shape}")
        latent = size // int(self.pipe.vae_scale_factor)
        region = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        return torch.nn.functional.adaptive_avg_pool2d(region, (latent, latent)).to(self.device)

    def _keep_outside(self, latents: torch.Tensor, m: torch.Tensor, sched: Any, next_index: int) -> torch.Tensor:
        """``latents`` (just stepped) with the input's latent, noised to the level of ``sched.timesteps[next_index]``
        (the clean latent after the last step), put back outside the latent-grid region ``m``
        (:meth:`_edit_region_tensor`). The noise level comes from ``scheduler.add_noise``: the given timestep for
        PNDM and DDIM, the scheduler's own step index (already advanced to the next step) for DPM-Solver++ and
        Euler."""
        z, noise = self.pipe.init_latents, self.pipe.init_noise
        known: torch.Tensor = (sched.add_noise(z, noise, sched.timesteps[next_index:next_index + 1])
                               if next_index < len(sched.timesteps) else z)
        kept: torch.Tensor = (m * latents.float() + (1 - m) * known.float()).to(latents.dtype)
        return kept

    # -- the public call ----------------------------------------------------------------------------------------
    def check_inputs(self, image: np.ndarray, *, request: GenerationRequest) -> None:
        """Reject a bad image or request with a message that quotes the value and says what is allowed.

        Raises:
            ValueError: the image is not a 2-D array in [0, 1], or a request field is out of range
                (:meth:`GenerationRequest.check`).
        """
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.size == 0:
            raise ValueError(f"image must be a 2-D float array (H, W); got shape {getattr(image, 'shape', None)}")
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError("image values must be finite and within [0, 1] (use app.imaging.decode_image)")
        request.check()

    def generate(self, image: np.ndarray, prompt: str = GenerationRequest.prompt, *, negative_prompt: str = "",
                 strength: float = GenerationRequest.strength, guidance_scale: float = GenerationRequest.guidance_scale,
                 steps: int = GenerationRequest.steps, seed: int | None = None,
                 scheduler: Scheduler | str = GenerationRequest.scheduler, samples: int = 1,
                 progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> CounterfactualResult:
        """:meth:`generate_request` with a :class:`GenerationRequest` of these fields (see there for ranges).

        Raises:
            ValueError: a parameter is out of range, or the scheduler is not supported.
            GenerationCancelled: ``cancel`` was set.
        """
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, strength=strength,
                                    guidance_scale=guidance_scale, steps=steps, seed=seed,
                                    scheduler=Scheduler.parse(scheduler), samples=samples)
        return self.generate_request(image, request, progress=progress, cancel=cancel)

    def generate_request(self, image: np.ndarray, request: GenerationRequest, *,
                         progress: ProgressCallback | None = None,
                         cancel: threading.Event | None = None,
                         edit_region: np.ndarray | None = None,
                         reconstruction: CounterfactualResult | None = None) -> CounterfactualResult:
        """Make ``request.samples`` counterfactuals of ``image`` as ``request`` asks (its scheduler included).

        Args:
            image: float32 (H, W) in [0, 1], display-ready (from ``app.imaging.decode_image``), native size.
            request: prompt (e.g. "normal chest x-ray" for a healthy counterfactual, or "cardiomegaly"), negative
                prompt, strength ((0, 1]; quantised to ``int(steps * strength)`` steps), guidance (1 = off .. 30),
                steps (1..1000), seed (None draws one; sample i uses ``seed + i``), scheduler ('pndm' the
                paper's, 'ddim', 'dpm++', 'euler') and samples (1..16, run as one batch). Read, never changed.
            progress: called with step 0 once the input is encoded and noised, then after every denoising step.
            cancel: set it to stop within one step.
            edit_region: ``None`` (the whole image is redrawn, SDEdit), or float (size, size) in [0, 1] in the
                model's letterboxed frame (``imaging.letterbox``): where the counterfactual may differ from the
                input (1) and where it keeps the input (0). Area-averaged to the latent grid (m); after every
                denoising step the latents become ``m * latents + (1 - m) * known``, ``known`` being the input's own
                latent (the posterior sample img2img started from) noised to the next step's level with the same
                noise the start used (``scheduler.add_noise``), and at the last step that clean latent itself: the
                masked edit of DiffEdit (Couairon et al., ICLR 2023; RePaint's known-region replacement). With
                ``edit_region`` all ones the result is exactly the unrestricted one.
            reconstruction: an earlier result for the same ``image`` whose autoencoder reconstruction is taken
                as this one's instead of decoding it again (it depends on the image only: the posterior mode);
                the review run's edit passes the samples' result.

        Raises:
            ValueError: a parameter is out of range (message says which and the allowed range), or
                ``edit_region`` is not a (size, size) array in [0, 1].
            GenerationCancelled: ``cancel`` was set.
        """
        self.check_inputs(image, request=request)
        region = None if edit_region is None else self._edit_region_tensor(edit_region)
        prompt, negative_prompt, strength = request.prompt, request.negative_prompt, request.strength
        guidance_scale, steps, samples, seed = request.guidance_scale, request.steps, request.samples, request.seed
        if seed is None:
            seed = draw_seed()
        seeds = [seed + i for i in range(samples)]
        params = request.parameters(seed)
        timings: dict[str, float] = {}
        with self.lock:
            t0 = time.perf_counter()
            # 1. geometry: letterbox to the model's square frame
            img_model, lb = imaging.letterbox(image.astype(np.float32), self.info.image_size)
            timings["preprocess"] = time.perf_counter() - t0
            # 2. prompt embeddings (cached)
            t = time.perf_counter()
            pos, neg = self.prompt_embeddings(prompt, negative_prompt)
            timings["text_encoding"] = time.perf_counter() - t
            # 3. img2img with per-step progress and cooperative cancellation
            sched = self._scheduler_for(request.scheduler)
            self.pipe.scheduler = sched
            n_eff = effective_steps(steps, strength)
            # the number of UNet evaluations img2img will make (PNDM adds one, multistep orders differ)
            sched.set_timesteps(steps, device=self.device)
            first_idx = (steps - n_eff) * sched.order
            n_calls = len(sched.timesteps) - first_idx
            start_t = int(sched.timesteps[first_idx])
            marks: dict[str, float] = {}
            t_start = time.perf_counter()

            def on_step(pipe: Any, i: int, t_step: Any, kw: dict[str, Any]) -> dict[str, Any]:
                now = time.perf_counter()
                marks.setdefault("first", now)
                marks["last"] = now
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled("cancelled by the user")
                if region is not None:
                    kw["latents"] = self._keep_outside(kw["latents"], region, sched, first_idx + i + 1)
                if progress is not None:
                    # evaluation i + 1 of n_calls as a denoising step of n_eff (the form's "effective steps"):
                    # PNDM's one extra evaluation reports the last step again rather than a step n_eff + 1
                    progress(min(i + 1, n_eff or n_calls), n_eff or n_calls, now - t_start,
                             self.preview(self.predicted_clean(kw["latents"], t_step)))
                return kw

            def on_latents_ready() -> None:
                # step 0 of n_eff: the input is encoded and noised, the first UNet evaluation starts now (on a
                # CPU a 16-sample step takes a third of a second; the user sees the run start before it)
                cancelled = cancel is not None and cancel.is_set()
                if not cancelled and progress is not None:
                    progress(0, n_eff or n_calls, time.perf_counter() - t_start, self.preview(self.pipe.init_latents))
                    cancelled = cancel is not None and cancel.is_set()  # set while the callback ran
                if cancelled:
                    raise GenerationCancelled("cancelled by the user")

            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("cancelled before start")
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            self.pipe.posterior_mean = None
            self.pipe.on_latents_ready = on_latents_ready
            try:
                with self.autocast():
                    out = self.pipe(prompt_embeds=pos, negative_prompt_embeds=neg,
                                    image=self.to_model_tensor(img_model), strength=strength,
                                    guidance_scale=guidance_scale, num_inference_steps=steps,
                                    num_images_per_prompt=samples, generator=gens, output_type="pt",
                                    callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
                mean = getattr(self.pipe, "posterior_mean", None)
            finally:  # also after a cancel or an error: nothing of this call stays on the shared pipeline
                self.pipe.on_latents_ready = None
                self.pipe.posterior_mean = self.pipe.init_latents = self.pipe.init_noise = None
            t_end = time.perf_counter()
            timings["prepare_latents"] = marks.get("first", t_end) - t_start
            timings["denoising"] = marks.get("last", t_end) - marks.get("first", t_start)
            timings["vae_decode"] = t_end - marks.get("last", t_end)
            cf_model = out.images.float().mean(1).clamp(0, 1).cpu().numpy().astype(np.float32)
            # 4. autoencoder reconstruction (attribution reference), in the native frame (the counterfactuals are
            # brought there on demand: CounterfactualResult.counterfactual)
            t = time.perf_counter()
            if (reconstruction is not None and reconstruction.reconstruction_model is not None
                    and np.array_equal(reconstruction.input_model, img_model)):
                recon_model, recon = reconstruction.reconstruction_model, reconstruction.reconstruction
            else:
                recon_model = self.reconstruct_model_frame(img_model, None if mean is None else mean[:1])
                recon = imaging.unletterbox(recon_model, lb)
            timings["postprocess"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0
        return CounterfactualResult(
            counterfactuals_model=cf_model, input_model=img_model,
            reconstruction=recon.astype(np.float32), letterbox=lb, effective_steps=n_eff, start_timestep=start_t,
            unet_evaluations=n_calls,
            seeds=seeds, timings_s=timings, model_hash=self.info.model_hash, parameters=params,
            compute=self.compute_record(samples * (2 if guidance_scale > 1 else 1)),
            reconstruction_model=recon_model.astype(np.float32))


def compile_mode(device: torch.device) -> str:
    """``torch.compile`` mode of ``compile_unet``: on CUDA max-autotune without CUDA graphs (the progress callback
    runs between steps); on the CPU inductor's default, whose fused kernels take the small UNet's per-step overhead:
    one CFG step at batch 2 52.0 -> 38.4 ms on 2 threads, the paper's request 3.54 -> 2.66 s (docs/PERFORMANCE.md;
    max-autotune's GEMM autotuning was not measured on the CPU)."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"


# ----------------------------------------------------------------------------------------------------------------
# loading off the serving thread
# ----------------------------------------------------------------------------------------------------------------
def load_engine_in_short_lived_thread(*args: Any, warm_up: bool = False, **kwargs: Any) -> CounterfactualEngine:
    """``CounterfactualEngine(*args, **kwargs)``, built in a thread of its own that ends when the model is loaded
    (and, with ``warm_up``, after :meth:`CounterfactualEngine.warm_up`: the server's ``--compile`` start-up).

    Why: torch's CPU kernels run on OpenMP (libgomp), which keeps one team of helper threads per thread that has
    started parallel work. Once more such threads exist in a process than there are cores, libgomp stops
    spinning at its barriers and every parallel region pays a sleep/wake-up; with a small model (thousands of
    short kernels per counterfactual) that made the server's worker thread 1.7-1.9x slower than the same call on
    the thread that loaded the model (2-core CPU, 2 threads; `benchmarks/web_overhead.py`). Loading in a
    thread that then exits leaves the worker thread as the only one with a team. Exceptions of the constructor
    are re-raised in the caller.
    """
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            # one OpenMP thread while loading: the load's many small tensor operations (casts, copies) cost about
            # twice the CPU on two threads when the machine is busy (benchmarks/server_ready.py, PERFORMANCE). The
            # count is thread-local here and restored before the thread ends; only a thread that first runs torch
            # work meanwhile takes 1 as its default (the segmenter's and classifier's loaders, which end too)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                eng = CounterfactualEngine(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)
            if warm_up:
                logger.info("warm-up generation took %.1f s", eng.warm_up())
            box["engine"] = eng
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            box["error"] = e

    t = threading.Thread(target=load, name="vald-md-model-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    engine: CounterfactualEngine = box["engine"]
    return engine


# compatibility: renamed to load_engine_in_short_lived_thread (issue 17)
load_in_passing_thread = load_engine_in_short_lived_thread
