"""Generation parameters as the web app receives them (multipart form fields), shared by the JSON API and the page.

A field left out means "the loaded model's healthy preset" (``engine.info.presets["healthy"]``, its scheduler and
samples included; the map polarity and map smoothing: the preset's, else the manifest's), so the API and the form
default to the same values; both build the run's frozen ``ReviewRequest``
with :meth:`app.generation.GenerationRequest.from_preset`. Ranges here repeat the request's so that a bad value is
a 422 naming the field before anything is decoded; the job manager checks the request once more, as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.generation import SCHEDULERS, GenerationRequest, effective_steps
from app.modelfolder import ModelInfo
from app.runs.review import (
    COUNTERFACTUAL_EDITS,
    MAP_METHODS,
    MAP_POLARITIES,
    MAX_CASE_LABEL,
    MAX_CLASSIFIER_SCALE,
    MAX_MAP_SMOOTHING,
    ReviewRequest,
    with_model_defaults,
)

SchedulerName = Literal["pndm", "ddim", "dpm++", "euler"]
if set(SCHEDULERS) != {"pndm", "ddim", "dpm++", "euler"}:  # a Literal cannot be built from the tuple
    raise ImportError("app.web.forms.SchedulerName is out of step with app.engine.SCHEDULERS; update it")

EXAMPLE_PROMPTS = ("large lung opacity on the left", "cardiomegaly")
"""Examples offered under the prompt box besides the healthy preset and the model's class prompts."""


class GenerationParams(BaseModel):
    """Parameters of ``POST /api/v1/counterfactuals`` (and of the review form). ``None`` = model preset."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(None, max_length=1000,
                               description="target description; default: the model's healthy preset (the embedded "
                                           "model: 'normal chest x-ray')")
    negative_prompt: str = Field("", max_length=1000, description="text to steer away from")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="share of the schedule re-run, (0, 1]")
    guidance_scale: float | None = Field(None, ge=1.0, le=30.0, description="classifier-free guidance, 1..30")
    steps: int | None = Field(None, ge=1, le=1000, description="scheduler steps at strength 1, 1..1000")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed; sample i uses seed+i; empty = random")
    samples: int | None = Field(None, ge=1, le=16,
                                description="counterfactual samples averaged into the map, 1..16 (>1 adds a "
                                            "stability map); default: the model's healthy preset (else 1)")
    scheduler: SchedulerName | None = Field(None, description="sampler; default: the model's preset (the embedded "
                                                           "model: dpm++)")
    window: str = Field("auto", max_length=20, description="'auto', 'percentile' or a file preset index 0, 1, ...")
    lung_mask: bool = Field(True, description="restrict the map to the lungs (the server's lung segmenter); "
                                              "an uploaded region mask wins")
    map_method: str | None = Field(None, description="attribution-map method: 'sdedit' (the paper's SDEdit "
                                                     "difference), 'classifier_guided' (needs the server's lesion "
                                                     "classifier; one sample) or 'ddim_inversion' (one sample, "
                                                     "deterministic); empty = the model's recommendation")
    map_polarity: Literal["removed", "both"] | None = Field(
        None, description="what the map keeps of reference - counterfactual: 'removed' (its positive part, the "
                          "density the healthy counterfactual removed, e.g. an opacity) or 'both' (the signed "
                          "difference, magnitude = its absolute value); empty = the model's default (manifest "
                          "map_polarity, else 'both')")
    map_smoothing: float | None = Field(
        None, ge=0.0, le=MAX_MAP_SMOOTHING,
        description="Gaussian smoothing of the map in the model's frame: sigma in pixels of the model's square "
                    f"input (the embedded model: 256 px), 0..{MAX_MAP_SMOOTHING:g}, 0 = off; empty = the model's "
                    "default (its healthy preset's map_smoothing, else the manifest's, else 0)")
    counterfactual_edit: Literal["map_region", "redraw"] | None = Field(
        None, description="the counterfactual shown: 'map_region' (one more sample that changes the image only "
                          "where the map is above the model's normal level, DiffEdit-style: this patient's "
                          "radiograph with the flagged density removed) or 'redraw' (the first sample, the whole "
                          "image redrawn); empty = the model's default (its healthy preset's, else the "
                          "manifest's counterfactual_edit, else 'redraw')")
    classifier_scale: float = Field(0.3, ge=0.0, le=MAX_CLASSIFIER_SCALE,
                                    description="classifier_guided: step against the disease gradient, 0..5")

    @model_validator(mode="before")
    @classmethod
    def _blank_means_default(cls, data: Any) -> Any:
        """An empty form field (a cleared number box) means "not given", not "invalid"."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and v.strip() == "")}
        return data

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: str) -> str:
        if v in ("auto", "percentile") or (v.isascii() and v.isdigit()):
            return v
        raise ValueError("window must be 'auto', 'percentile' or a preset number written with the digits 0-9 "
                         "(0, 1, ...)")

    @field_validator("map_method")
    @classmethod
    def _check_map_method(cls, v: str | None) -> str | None:
        if v is None or v in MAP_METHODS:
            return v
        raise ValueError(f"map method {v!r} is unknown; choose one of {', '.join(MAP_METHODS)}")

    def check_server_limits(self, max_steps: int, max_samples: int) -> None:
        """This server's limits (``Settings.max_steps`` / ``max_samples``), the ones the form's controls and the OpenAPI
        document state, on top of the engine's absolute ranges above: the API and the form refuse the same values,
        with the same field-named 422 as any other out-of-range field.

        Raises:
            RequestValidationError: ``steps`` or ``samples`` above the limit.
        """
        errors = [{"type": "less_than_equal", "loc": ("body", name), "input": value, "ctx": {"le": top},
                   "msg": f"Input should be less than or equal to {top} (this server's limit, VALD_MD_{env})"}
                  for name, value, top, env in (("steps", self.steps, max_steps, "MAX_STEPS"),
                                                ("samples", self.samples, max_samples, "MAX_SAMPLES"))
                  if value is not None and value > top]
        if errors:
            raise RequestValidationError(errors)

    def to_request(self, info: ModelInfo) -> ReviewRequest:
        """The run's :class:`ReviewRequest`, filling unset fields from the model's healthy preset.

        Raises:
            ValueError: the preset names a scheduler the engine does not support.
        """
        return self._request(info)

    def _request(self, info: ModelInfo, **fields: Any) -> ReviewRequest:
        """The request of these fields, ``fields`` overriding them (the form's seed mode, lung mask, case label)."""
        given: dict[str, Any] = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "strength": self.strength,
            "guidance_scale": self.guidance_scale, "steps": self.steps, "seed": self.seed,
            "scheduler": self.scheduler, "samples": self.samples,
            "window": int(self.window) if self.window.isdigit() else self.window,
            "reference": ("reconstruction" if self.map_method == "ddim_inversion"
                          else str(info.manifest.get("map_reference", "input"))), "lung_mask": self.lung_mask,
            "map_method": self.map_method, "map_polarity": self.map_polarity, "map_smoothing": self.map_smoothing,
            "counterfactual_edit": self.counterfactual_edit, "classifier_scale": self.classifier_scale}
        return ReviewRequest.from_preset(info.presets.get("healthy"), **{**given, **fields})


class ReviewFormParams(GenerationParams):
    """The review page's form: the API fields plus the seed mode and "reuse the image of run X".

    ``lung_mask`` is a checkbox there, and an unticked checkbox sends nothing; so the form also sends
    ``lung_mask_field=checkbox``, and with it a missing ``lung_mask`` means "off" (without it, the API's default).
    """

    seed_mode: Literal["random", "fixed"] = "random"
    reuse_input: str | None = Field(None, pattern=r"^[0-9a-f]{32}$", description="job id whose upload to reuse")
    lung_mask_field: Literal["checkbox"] | None = None
    case_label: str = Field("", max_length=MAX_CASE_LABEL,
                            description="the operator's own label for the case (optional; never taken from the "
                                        "file, never logged); shown on the result")

    @field_validator("case_label")
    @classmethod
    def _check_case_label(cls, v: str) -> str:
        v = v.strip()
        if not v.isprintable():
            raise ValueError("the case label must be one line of printable characters")
        return v

    def to_request(self, info: ModelInfo) -> ReviewRequest:
        """As :meth:`GenerationParams.to_request`; ``seed_mode="random"`` ignores the seed field."""
        if self.seed_mode == "fixed" and self.seed is None:
            raise ValueError("seed: choose 'Random' or enter a seed (a whole number of 0 or more)")
        unticked = self.lung_mask_field == "checkbox" and "lung_mask" not in self.model_fields_set
        return self._request(info, case_label=self.case_label, lung_mask=self.lung_mask and not unticked,
                             seed=None if self.seed_mode == "random" else self.seed)


@dataclass
class FormValues:
    """What the review form shows: a run's parameters, or the model's preset for a new run."""

    prompt: str
    negative_prompt: str
    strength: float
    guidance_scale: float
    steps: int
    seed: int | None
    seed_mode: str
    scheduler: str
    samples: int
    window: str
    lung_mask: bool = True
    map_method: str = "sdedit"
    map_polarity: str = "both"
    map_smoothing: float = 0.0
    counterfactual_edit: str = "redraw"
    classifier_scale: float = 0.3
    case_label: str = ""
    reuse_input: str | None = None
    facts: dict[str, Any] | None = None
    thumbnail_url: str | None = None

    @property
    def effective_steps(self) -> int:
        """``int(steps * strength)``, as the engine will run."""
        return effective_steps(self.steps, self.strength)

    @classmethod
    def defaults(cls, info: ModelInfo) -> FormValues:
        """The healthy preset of the loaded model (its scheduler and samples included), random seed; the model's
        map method, polarity, smoothing and counterfactual shown (the preset's, else the manifest's, else ``"both"``,
        0 and ``"redraw"``).

        Raises:
            ValueError: the preset names a scheduler the engine does not support.
        """
        req = with_model_defaults(ReviewRequest.from_preset(info.presets.get("healthy")), info)
        return cls(prompt=req.prompt, negative_prompt="", strength=req.strength, guidance_scale=req.guidance_scale,
                   steps=req.steps, seed=None, seed_mode="random", scheduler=req.scheduler.value, samples=req.samples,
                   window="auto", map_method=str(req.map_method), map_polarity=str(req.map_polarity),
                   map_smoothing=float(req.map_smoothing or 0.0), counterfactual_edit=str(req.counterfactual_edit))

    @classmethod
    def from_request(cls, req: ReviewRequest, *, seed: int | None, reuse_input: str | None = None,
                     facts: dict[str, Any] | None = None, thumbnail_url: str | None = None) -> FormValues:
        """A past run's parameters with its seed fixed (so that "reuse" reproduces the run)."""
        return cls(prompt=req.prompt, negative_prompt=req.negative_prompt, strength=req.strength,
                   guidance_scale=req.guidance_scale, steps=req.steps, seed=seed,
                   seed_mode="fixed" if seed is not None else "random", scheduler=req.scheduler.value,
                   samples=req.samples, window=str(req.window if req.window is not None else "auto"),
                   lung_mask=req.lung_mask, map_method=req.map_method or "sdedit",
                   map_polarity=req.map_polarity or "both", map_smoothing=float(req.map_smoothing or 0.0),
                   counterfactual_edit=req.counterfactual_edit or "redraw", classifier_scale=req.classifier_scale,
                   case_label=req.case_label, reuse_input=reuse_input, facts=facts, thumbnail_url=thumbnail_url)


def map_polarity_options() -> list[tuple[str, str]]:
    """(value, label) of every map polarity for the form's select."""
    return list(MAP_POLARITIES.items())


def counterfactual_edit_options() -> list[tuple[str, str]]:
    """(value, label) of every choice of the counterfactual shown, for the form's select."""
    return list(COUNTERFACTUAL_EDITS.items())


def map_method_options(jobs: Any) -> list[tuple[str, str, bool]]:
    """(value, label, available) of every map method for the form: ``classifier_guided`` needs the job manager's
    lesion classifier and lung segmenter."""
    ready = getattr(jobs, "classifier", None) is not None and getattr(jobs, "segmenter", None) is not None
    return [(m, label, m != "classifier_guided" or ready) for m, label in MAP_METHODS.items()]


PRESET_ORDER = ("healthy", "paper", "healthy-fast", "induce")
"""Parameter presets offered first, in this order (then any other preset of the model, by name)."""

PARAMETER_HELP = {
    "strength": "How much of the image the model may redraw: the share of the noise schedule re-run from the "
                "original, (0, 1]. Low (0.2-0.4) keeps the anatomy and changes subtle densities only; high (0.8-1) "
                "can redraw whole regions and invent anatomy, so the map shows more, and less specific, change.",
    "guidance_scale": "How hard the result is pushed towards the prompt (classifier-free guidance), 1-30. Higher "
                      "makes the target (the finding, or its absence) more pronounced but adds artefacts that "
                      "also show in the map; 1 ignores the prompt.",
    "steps": "Denoising steps of the full schedule; the model runs int(steps x strength) of them (the effective "
             "steps shown below). More steps give a finer result and take longer; past about 50 little changes.",
}
"""What strength, guidance and steps do, in a reader's terms: the form's tooltips and help text."""


def parameter_presets(info: ModelInfo) -> list[dict[str, Any]]:
    """The model's parameter presets as one-click choices for the form: ``key``, ``label``, ``prompt``,
    ``strength``, ``guidance_scale``, ``steps``, ``scheduler``, ``samples``, ``map_polarity``, ``map_smoothing`` and
    ``counterfactual_edit``
    (``None`` when the preset names none: the button leaves the form's choice) and ``description`` (the tooltip),
    healthy first
    (:data:`PRESET_ORDER`). Built-in presets (``app.engine.PRESETS``) overlaid with the manifest's."""
    keys = [k for k in PRESET_ORDER if k in info.presets] + sorted(k for k in info.presets if k not in PRESET_ORDER)
    out = []
    for key in keys:
        p = info.presets[key]
        req = ReviewRequest.from_preset(p, preset_name=key)
        out.append({"key": key, "label": key.replace("-", " ").capitalize(), "prompt": req.prompt,
                    "strength": req.strength, "guidance_scale": req.guidance_scale, "steps": req.steps,
                    "scheduler": req.scheduler.value, "samples": req.samples, "map_polarity": req.map_polarity,
                    "map_smoothing": req.map_smoothing, "counterfactual_edit": req.counterfactual_edit,
                    "description": str(p.get("description", ""))})
    return out


def prompt_presets(info: ModelInfo) -> list[tuple[str, str]]:
    """(label, prompt) pairs offered as one-click prompts: healthy, the model's classes, then examples."""
    healthy = GenerationRequest.from_preset(info.presets.get("healthy")).prompt
    out: list[tuple[str, str]] = [("Healthy counterfactual", healthy)]
    for label, prompt in info.class_prompts.items():
        if all(prompt != p for _, p in out):
            out.append((label.replace("_", " ").capitalize(), prompt))
    for example in EXAMPLE_PROMPTS:
        if all(example != p for _, p in out):
            out.append((example.capitalize(), example))
    return out
