"""The run record (``record.json``) as a type: :class:`RunRecord` and its :class:`RunParameters`.

A record is written once, by :func:`app.runs.review.run_review`, and read by the jobs, the pages, the exports and
the PACS store. The file's bytes are the contract (tests pin them; exports ship them byte for byte; the audit trail
and PNG exports carry their SHA-256), so the type is a faithful view of the JSON, never a re-interpretation:

- values are kept exactly as the JSON holds them (no coercion: a ``1`` stays an ``int``);
- the file's keys and their order are kept (``key_order``), and keys this version does not know are kept
  (``unknown``), so ``RunRecord.from_json(data).to_json() == data`` for every record ever written, including
  records of older versions that lack keys (a missing key reads as the field's default and is not written back);
- ``RunRecord.from_json(record.to_json()) == record`` (equality compares the values, not the key order).

The fallbacks older records need (a missing ``map_region``, map method, map polarity, map smoothing or sample count)
live in the properties here, once, rather than as ``or {}`` at every reader.

Keys of a record, in the order :func:`~app.runs.review.run_review` writes them: ``vald_md_record`` (format version,
1), ``created_at`` (ISO 8601, UTC), ``input`` (the upload's SHA-256, the decoded pixels' SHA-256 and the public
header summary), ``parameters`` (:class:`RunParameters`), ``effective_steps``, ``start_timestep``,
``unet_evaluations``, ``seeds`` (one per sample), ``timings_s``, ``model_hash``, ``letterbox``,
``library_versions``, ``compute`` (when known), ``request`` (window, reference, smoothing_sigma, mask, lung_mask,
map_method, map_polarity, map_smoothing, counterfactual_edit), ``map_method``, the classifier-guided fields
(``classifier``, ``classifier_scale``, ``logit_input``, ``logit_counterfactual``, ``classifier_lung_fraction``),
``map_label``, ``map_region``, ``lung_mask``, ``map_summary``, ``counterfactual_edit`` (since 2026-12-07: what
``counterfactual.png`` shows, the mode, whether it applied and, for an edit to the map's region, its threshold,
region and seed; :func:`app.runs.review.edited_counterfactual`), ``sample_files`` (runs of more than one sample or
with an edited counterfactual, since 2026-12-07: the file, size and frame of the first sample, and of
``counterfactual-<i>.png``, the model frame's content box; :func:`app.runs.review.sample_files`),
``model_limitations``, ``artifacts_sha256`` (file name -> SHA-256) and ``disclaimer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from app import mapscale, rendering
from app.mapscale import MapCalibration

__all__ = ["COUNTERFACTUAL_EDITS", "MAP_METHODS", "MAP_POLARITIES", "RECORD_VERSION", "RunParameters", "RunRecord"]

RECORD_VERSION = 1
"""``vald_md_record`` of the records this version writes."""
MAP_METHODS = {"sdedit": "SDEdit difference (paper)", "classifier_guided": "Classifier-guided counterfactual",
               "ddim_inversion": "DDIM inversion difference"}
"""The attribution-map methods a run may ask for (``request.map_method``), with their labels in the review form."""
MAP_POLARITIES = {"removed": "Density removed (positive part)", "both": "Both directions"}
"""The map polarities a run may ask for (``request.map_polarity``; :data:`app.attribution.MAP_POLARITIES`), with
their form labels."""
COUNTERFACTUAL_EDITS = {"map_region": "Only where the map is above normal (DiffEdit-style edit)",
                        "redraw": "The whole image redrawn (the first sample)"}
"""What ``counterfactual.png`` shows (``request.counterfactual_edit``), with the form's labels."""
_BOOKKEEPING = ("unknown", "key_order")

_T = TypeVar("_T", bound="_JsonObject")


@dataclass(frozen=True)
class _JsonObject:
    """A JSON object read into typed fields; unknown keys and the key order are kept (see the module docstring)."""

    _NESTED: ClassVar[dict[str, type[_JsonObject]]] = {}

    @classmethod
    def _known(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in _BOOKKEEPING)

    @classmethod
    def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
        """Read a parsed JSON object; keys missing from ``data`` take the field's default.

        Raises:
            ValueError: ``data`` (or a nested object this type reads) is not a JSON object.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object for a {cls.__name__}, got {type(data).__name__}")
        known = set(cls._known())
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                nested = cls._NESTED.get(key)
                values[key] = nested.from_dict(value) if nested is not None else value
        unknown = {k: v for k, v in data.items() if k not in known}
        return cls(**values, unknown=unknown, key_order=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys read (in their order), or every field for an object built in code."""
        keys = self.key_order or (*self._known(), *self.unknown)
        out: dict[str, Any] = {}
        for key in keys:
            if key in self.unknown:
                out[key] = self.unknown[key]
            else:
                value = getattr(self, key)
                out[key] = value.to_dict() if isinstance(value, _JsonObject) else value
        return out

    unknown: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class RunParameters(_JsonObject):
    """The generation parameters a run used (``record["parameters"]``), as the engine reports them.

    ``seed`` is the first sample's seed as requested (``None``: drawn; the drawn ones are ``RunRecord.seeds``);
    ``classifier_scale`` only for the classifier-guided map.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    seed: int | None = None
    scheduler: str | None = None
    samples: int | None = None
    classifier_scale: float | None = None


@dataclass(frozen=True)
class RunRecord(_JsonObject):
    """One run's ``record.json`` (see the module docstring for the keys and the byte-compatibility contract).

    Nested objects other than ``parameters`` stay plain JSON (``dict``): they are shown or exported as they are.
    """

    _NESTED: ClassVar[dict[str, type[_JsonObject]]] = {"parameters": RunParameters}

    vald_md_record: int | None = None
    created_at: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    parameters: RunParameters = field(default_factory=RunParameters)
    effective_steps: int | None = None
    start_timestep: int | None = None
    unet_evaluations: int | None = None
    seeds: list[int] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    model_hash: str | None = None
    letterbox: dict[str, Any] | str | None = None
    library_versions: dict[str, str] = field(default_factory=dict)
    compute: dict[str, Any] | None = None
    request: dict[str, Any] = field(default_factory=dict)
    map_method: str | None = None
    classifier: dict[str, Any] | None = None
    classifier_scale: float | None = None
    logit_input: float | None = None
    logit_counterfactual: float | None = None
    classifier_lung_fraction: float | None = None
    map_label: str | None = None
    map_region: str | None = None
    lung_mask: dict[str, Any] = field(default_factory=dict)
    map_summary: dict[str, Any] = field(default_factory=dict)
    counterfactual_edit: dict[str, Any] | None = None
    sample_files: dict[str, Any] | None = None
    model_limitations: Any = None
    artifacts_sha256: dict[str, str] = field(default_factory=dict)
    disclaimer: str | None = None

    # -- the file ------------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: bytes | str) -> RunRecord:
        """Parse ``record.json``'s bytes.

        Raises:
            ValueError: not JSON, or not a JSON object (the message says which).
        """
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"record.json is not valid JSON ({exc})") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"record.json holds a {type(parsed).__name__}, not a run record")
        return cls.from_dict(parsed)

    def to_json(self) -> bytes:
        """The bytes of ``record.json``: 2-space indented JSON, ASCII (``\\u`` escapes), no trailing newline;
        values JSON cannot hold are written as their ``str()``."""
        return json.dumps(self.to_dict(), indent=2, default=str).encode()

    # -- what the readers ask, with the fallbacks of older records in one place -----------------------------------
    @property
    def reference(self) -> str | None:
        """The map's reference (``"input"`` or ``"reconstruction"``); ``None`` in records from before it was
        recorded (read as ``"input"`` by :func:`app.rendering.map_label`)."""
        value = self.request.get("reference")
        return str(value) if value is not None else None

    @property
    def method(self) -> str | None:
        """The map method (``sdedit``, ``classifier_guided``, ``ddim_inversion``); ``None`` before methods."""
        value = self.map_method or self.request.get("map_method")
        return str(value) if value is not None else None

    @property
    def polarity(self) -> str:
        """The map's polarity (``request.map_polarity``): ``"removed"`` (only the density the counterfactual
        removed) or ``"both"``; records from before it was recorded are ``"both"``."""
        value = self.request.get("map_polarity")
        return str(value) if value is not None else "both"

    @property
    def map_smoothing(self) -> float:
        """The map's smoothing (``request.map_smoothing``): Gaussian sigma in model-frame pixels, 0 = none; records
        from before it was recorded are 0.0."""
        value = self.request.get("map_smoothing")
        return float(value) if value is not None else 0.0

    @property
    def edited(self) -> bool:
        """Whether ``counterfactual.png`` is the edit restricted to the map's above-normal region (the record's
        ``counterfactual_edit.applied``), not the first sample; records from before it are not."""
        return bool(isinstance(self.counterfactual_edit, dict) and self.counterfactual_edit.get("applied"))

    @property
    def label(self) -> str:
        """What the map is the difference of, in words (:func:`app.rendering.map_label` of the reference, method
        and polarity)."""
        return rendering.map_label(self.reference, self.method, self.polarity)

    @property
    def region(self) -> str:
        """``lungs``, ``user_mask`` or ``whole_image``; records from before lung masks say only
        ``request.mask``."""
        if isinstance(self.map_region, str):
            return self.map_region
        return "user_mask" if self.request.get("mask") else "whole_image"

    @property
    def n_samples(self) -> int:
        """Samples behind the map (the summary's count, else the parameters', else 1)."""
        return int(self.map_summary.get("n_samples") or self.parameters.samples or 1)

    @property
    def calibration(self) -> MapCalibration | None:
        """The calibration the map was read against, or ``None`` on the relative (per-image) scale."""
        return mapscale.scale_from_record({"map_summary": self.map_summary})

    @property
    def scale_reason(self) -> str:
        """Why the map is on the scale it is on (``map_summary.scale.reason``), ``""`` when unsaid."""
        scale = self.map_summary.get("scale")
        return str(scale.get("reason") or "") if isinstance(scale, dict) else ""

    @property
    def input_sha256(self) -> str | None:
        """The uploaded file's SHA-256."""
        value = self.input.get("sha256")
        return str(value) if value is not None else None

    @property
    def model_frame(self) -> int | None:
        """The model's square frame in pixels (``letterbox.size``), ``None`` when not recorded."""
        size = self.letterbox.get("size") if isinstance(self.letterbox, dict) else None
        return int(size) if isinstance(size, int) else None
