"""One generation request: what a counterfactual is asked for, built once at an entry point, frozen thereafter.

:class:`GenerationRequest` is the one type that describes a generation (prompt, strength, guidance, steps, seed,
scheduler, samples). Every entry point -- the web form, the JSON API, ``vald-md counterfactual``, ``vald-md
evaluate`` -- builds it from the model's preset with :meth:`GenerationRequest.from_preset` (the one place that
falls back to the paper's 0.85 / 7.5 / 75 and reads the preset's ``scheduler``), checks it once
(:meth:`GenerationRequest.check`), and hands it down unchanged: it is frozen, and later layers derive a new one
with :func:`dataclasses.replace` where they must (a drawn seed). ``app.runs.review.ReviewRequest`` extends it with
the attribution map's options. Pure Python: no torch, so any layer may import it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Self


class Scheduler(StrEnum):
    """The samplers the engine supports (a ``str``: it compares equal to, and serialises as, its value)."""

    PNDM = "pndm"  # the paper's (Stable Diffusion v1's) sampler
    DDIM = "ddim"
    DPM_PP = "dpm++"  # DPM-Solver++ (multistep)
    EULER = "euler"

    @classmethod
    def parse(cls, value: str | Scheduler, *, where: str = "") -> Scheduler:
        """The scheduler named ``value``.

        Args:
            value: a scheduler name ('pndm', 'ddim', 'dpm++', 'euler') or a :class:`Scheduler`.
            where: what named it, for the message (e.g. ``"the model's preset 'healthy'"``); '' = the request.

        Raises:
            ValueError: the name is not a scheduler this engine supports (the message lists those it does).
        """
        try:
            return cls(value)
        except ValueError:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}scheduler={value!r} is not supported by this engine; choose one of "
                             f"{', '.join(SCHEDULERS)}") from None


SCHEDULERS: tuple[str, ...] = tuple(s.value for s in Scheduler)
"""Scheduler names, in the order the form and the CLI offer them."""


def effective_steps(steps: int, strength: float) -> int:
    """Denoising steps img2img actually runs: ``min(int(steps * strength), steps)`` (diffusers' quantisation)."""
    return min(int(steps * strength), steps)


SEED_DRAW_LIMIT = 2**31 - 1
"""A drawn base seed lies in ``[0, SEED_DRAW_LIMIT)``: sample i's ``seed + i`` stays a 32-bit signed integer."""


def draw_seed() -> int:
    """A random base seed for a request that gave none (``seed=None``), uniform on ``[0, 2**31 - 1)``; the one
    draw of every entry point (the engine, the review run, the job queue), recorded so the run can be repeated."""
    return secrets.randbelow(SEED_DRAW_LIMIT)


@dataclass(frozen=True)
class Preset:
    """A named set of generation parameters. strength in (0, 1], guidance_scale >= 1, steps >= 1, samples 1..16
    (counterfactuals averaged into the map). A preset (or a manifest's, a dict) may also name a ``map_polarity``,
    a ``map_smoothing`` (sigma in model-frame pixels, 0..16; 0 = none) and a ``counterfactual_edit`` (``"redraw"``
    or ``"map_region"``: the counterfactual shown, ``app.runs.review``)."""

    name: str
    prompt: str
    strength: float
    guidance_scale: float
    steps: int
    description: str = ""
    scheduler: Scheduler = Scheduler.PNDM
    samples: int = 1
    map_polarity: str | None = None  # None: the model's; the paper's settings name "both" (its map, |M|)
    map_smoothing: float | None = None  # None: the model's; the paper's settings name 0.0 (its map is unsmoothed)
    counterfactual_edit: str | None = None  # None: the model's; the paper's settings name "redraw" (its output)


PRESETS: dict[str, Preset] = {
    "healthy": Preset("healthy", "normal chest x-ray", 0.85, 7.5, 75,
                      "Healthy counterfactual, the paper's setting "
                      "(Sec. 4: strength 0.85, guidance 7.5, 75 PNDM steps)"),
    "paper": Preset("paper", "normal chest x-ray", 0.85, 7.5, 75,
                    "The paper's healthy-counterfactual setting; stays available when a model's manifest "
                    "recommends its own 'healthy' preset", map_polarity="both", map_smoothing=0.0,
                    counterfactual_edit="redraw"),
    "training-section": Preset("training-section", "normal chest x-ray", 0.55, 4.0, 75,
                               "The paper's training-section setting (strength 0.55, guidance 4)",
                               map_polarity="both", map_smoothing=0.0, counterfactual_edit="redraw"),
    "healthy-fast": Preset("healthy-fast", "normal chest x-ray", 0.85, 7.5, 20,
                           "Opt-in faster sampler: DPM-Solver++ with 20 steps (17 effective) instead of 75 PNDM "
                           "steps; SSIM to the paper's 75-step PNDM counterfactual 0.990 (vald-md-mini, 6 test "
                           "images, seed 0; docs/PERFORMANCE.md)",
                           scheduler=Scheduler.DPM_PP, map_polarity="both", map_smoothing=0.0,
                           counterfactual_edit="redraw"),
}
"""The built-in presets; a model's manifest (``vald_md.json`` ``"presets"``) overlays them (:func:`model_presets`)."""

_PAPER = PRESETS["paper"]


def model_presets(manifest_presets: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The built-in :data:`PRESETS` overlaid with a model manifest's presets, as plain dicts (``ModelInfo.presets``).

    Raises:
        ValueError: a preset names a scheduler the engine does not support (the message names the preset).
    """
    presets: dict[str, dict[str, Any]] = {k: {f.name: getattr(v, f.name) for f in fields(v)}
                                          for k, v in PRESETS.items()}
    presets.update({k: dict(v) for k, v in manifest_presets.items()})
    for name, p in presets.items():
        if "scheduler" in p:
            Scheduler.parse(p["scheduler"], where=f"the model's preset {name!r}")
    return presets


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation asks for (ranges as :meth:`check` enforces them). Frozen: derive with
    :func:`dataclasses.replace`.

    Attributes:
        prompt: target description, at most 1000 characters. negative_prompt: text to steer away from.
        strength: (0, 1], share of the noise schedule re-run. guidance_scale: classifier-free guidance, [1, 30].
        steps: scheduler steps at strength 1, 1..1000. seed: 0 <= seed < 2**63, None = draw one; sample i uses
            ``seed + i``. scheduler: the sampler (a name is parsed into :class:`Scheduler`). samples: 1..16.
    """

    prompt: str = _PAPER.prompt
    negative_prompt: str = ""
    strength: float = _PAPER.strength
    guidance_scale: float = _PAPER.guidance_scale
    steps: int = _PAPER.steps
    seed: int | None = None
    scheduler: Scheduler = _PAPER.scheduler
    samples: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.scheduler, Scheduler):
            object.__setattr__(self, "scheduler", Scheduler.parse(self.scheduler))

    @classmethod
    def from_preset(cls, preset: Preset | Mapping[str, Any] | None, *, preset_name: str = "healthy",
                    **given: Any) -> Self:
        """A request with the fields ``given``; a preset field (prompt, strength, guidance_scale, steps,
        scheduler, samples) given as ``None`` (or not given) comes from ``preset``, then the paper's setting (one
        sample). A field of ``cls`` that a preset may name (``map_polarity``, ``map_smoothing`` and
        ``counterfactual_edit`` of ``ReviewRequest``) given as ``None`` (or not given) comes from the preset when
        it names one, else stays ``None``.

        Args:
            preset: a :class:`Preset` or a ``ModelInfo.presets`` entry (a dict); ``None`` = the paper's setting.
            preset_name: the preset's name, for the message of an unsupported scheduler.
            given: any field of ``cls`` (``ReviewRequest`` adds the map's); ``None`` for a preset field = preset.

        Raises:
            ValueError: the preset names a scheduler the engine does not support.
        """
        p: Mapping[str, Any] = ({f.name: getattr(preset, f.name) for f in fields(preset)}
                                if isinstance(preset, Preset) else preset or {})
        chosen = {k: v for k, v in given.items() if v is not None or k not in _PRESET_FIELDS}
        for key, convert in _PRESET_FIELDS.items():
            if key not in chosen:
                chosen[key] = convert(p.get(key, getattr(_PAPER, key)))
        names = {f.name for f in fields(cls)}
        for key, convert in _OPTIONAL_PRESET_FIELDS.items():
            if key in names and chosen.get(key) is None and p.get(key) is not None:
                chosen[key] = convert(p[key])
        if "scheduler" not in given or given["scheduler"] is None:
            chosen["scheduler"] = Scheduler.parse(chosen["scheduler"], where=f"the model's preset {preset_name!r}")
        return cls(**chosen)

    def check(self) -> None:
        """Reject out-of-range values with a message that quotes the value and says what is allowed.

        Raises:
            ValueError: a field is out of range.
        """
        if not isinstance(self.prompt, str) or len(self.prompt) > 1000:
            raise ValueError("prompt must be text of at most 1000 characters")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength={self.strength} must be in (0, 1]; the paper uses {_PAPER.strength}")
        if not 1.0 <= self.guidance_scale <= 30.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be in [1, 30]; the paper uses "
                             f"{_PAPER.guidance_scale}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps={self.steps} must be in [1, 1000]; the paper uses {_PAPER.steps}")
        if effective_steps(self.steps, self.strength) < 1:
            raise ValueError(f"steps={self.steps} x strength={self.strength} gives no denoising step; raise either")
        if not 1 <= self.samples <= 16:
            raise ValueError(f"samples={self.samples} must be in [1, 16]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be a non-negative integer below 2**63")

    @property
    def effective_steps(self) -> int:
        """``int(steps * strength)``: the denoising steps the engine runs."""
        return effective_steps(self.steps, self.strength)

    def parameters(self, seed: int | None) -> dict[str, Any]:
        """The record's ``"parameters"``: every generation field, with ``seed`` the one used (JSON-ready)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "strength": self.strength,
                "guidance_scale": self.guidance_scale, "steps": self.steps, "seed": seed,
                "scheduler": self.scheduler.value, "samples": self.samples}


_PRESET_FIELDS: dict[str, Any] = {"prompt": str, "strength": float, "guidance_scale": float, "steps": int,
                                  "scheduler": str, "samples": int}
"""Fields a preset supplies, with the type its (JSON) value is read as."""
_OPTIONAL_PRESET_FIELDS: dict[str, Any] = {"map_polarity": str, "map_smoothing": float, "counterfactual_edit": str}
"""Fields a preset may name, for the request types that have them (``ReviewRequest``)."""
