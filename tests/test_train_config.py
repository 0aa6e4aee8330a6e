"""Typed config tables of `vald-md train` (app.train.config): a TOML typo fails at start, naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.train.__main__ import run
from app.train.config import ConfigError, TrainConfig, load_config, parse_config
from tests.test_train import TINY_TOML as VAE

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["vald-md-mini.toml", "vald-md-lesion.toml"])
def test_the_shipped_configs_parse_and_keep_their_raw_tables(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.raw == tomllib.loads((CONFIGS / name).read_text())
    assert cfg.prompts["healthy"] == "normal chest x-ray"


def test_the_embedded_models_config_is_typed() -> None:
    cfg = load_config(CONFIGS / "vald-md-mini.toml", needs=("data", "vae", "vae_decoder", "unet", "text_encoder"))
    assert cfg.vae is not None and cfg.vae.block_out_channels == [32, 64, 128, 128]
    assert cfg.vae.whole_image_steps == 150 and cfg.vae.kl_weight == pytest.approx(1e-6)
    assert cfg.unet is not None and cfg.unet.attention_levels == [False, True, True]
    assert cfg.text_encoder is not None and cfg.text_encoder.max_length == 32
    assert cfg.finetune is None


@pytest.mark.parametrize("edit,message", [
    (("lr = 1e-3", "lr_rate = 1e-3"), "[vae] has unknown key 'lr_rate'"),
    (("lr = 1e-3", 'lr = "fast"'), "[vae] lr = 'fast' should be a number"),
    (("steps = 3", "steps = 3.5"), "[vae] steps = 3.5 should be an integer"),
    (("steps = 3", "steps = true"), "[vae] steps = True should be an integer"),
    (("block_out_channels = [32, 64]", 'block_out_channels = [32, "64"]'), "should be a list of integer"),
    (("crop_size = 16\n", ""), "[vae] lacks required key 'crop_size'"),
    (("[vae]", "[vea]"), "unknown table [vea]"),
    (("whole_image_batch = 2", "whole_image_batch = 0"), "whole_image_steps = 1 needs whole_image_batch >= 1"),
    (("covid = [\"COVID 19\"]", "covid = 3"), "[prompts] covid = 3 should be a string or a list of strings"),
    (("image_size = 32", "image_size = "), "not valid TOML"),
])
def test_a_bad_table_is_refused_naming_the_file_table_and_key(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(VAE.replace(*edit, 1), "tiny.toml")
    assert str(err.value).startswith("tiny.toml: ") and message in str(err.value)


def test_numbers_given_as_integers_are_floats_and_the_raw_table_is_kept() -> None:
    cfg = parse_config(VAE.replace("kl_weight = 1e-6", "kl_weight = 1"))
    assert cfg.vae is not None and cfg.vae.kl_weight == 1.0 and isinstance(cfg.vae.kl_weight, float)
    assert cfg.raw["vae"]["kl_weight"] == 1 and isinstance(cfg.raw["vae"]["kl_weight"], int)


def test_a_table_the_mode_needs_must_be_present(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(VAE.split("[unet]")[0])
    with pytest.raises(ConfigError, match=r"needs a \[unet\] table"):
        load_config(tmp_path / "c.toml", needs=("data", "unet"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_with_lr_replaces_the_rate_in_the_typed_and_the_raw_table() -> None:
    cfg = parse_config(VAE).with_lr("vae", 2e-4)
    assert isinstance(cfg, TrainConfig) and cfg.vae is not None and cfg.vae.lr == 2e-4
    assert cfg.raw["vae"]["lr"] == 2e-4 and cfg.raw["vae"]["steps"] == 3
    assert cfg.vae_decoder is not None and cfg.vae_decoder.lr == cfg.raw["vae_decoder"]["lr"] == 1e-3


def test_vald_md_train_stops_before_any_work_on_a_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.toml").write_text(VAE.replace("validate_every", "validate_evry"))
    out = tmp_path / "run"
    rc = run(["vae", "--data", str(tmp_path / "labels.csv"), "--output-dir", str(out), "--config",
              str(tmp_path / "c.toml")])
    assert rc == 2 and not out.exists()
    assert "[vae] has unknown key 'validate_evry'" in capsys.readouterr().err
