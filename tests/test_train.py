"""Training smoke runs on tiny in-code models: from-scratch (vae -> unet -> package) and dreambooth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import engine
from app.train.__main__ import main
from app.train.arguments import parse_args
from app.train.common import latest_checkpoint
from app.train.config import parse_config
from app.train.dreambooth import parse_stages, prior_preservation_loss
from app.train.vae import build_vae, package_with_decoder
from tests.tiny_model import write_tiny_model

TINY_TOML = """
[data]
image_size = 32
[vae]
block_out_channels = [32, 64]
layers_per_block = 1
latent_channels = 4
norm_num_groups = 32
kl_weight = 1e-6
lr = 1e-3
warmup_steps = 1
batch_size = 2
crop_size = 16
steps = 3
whole_image_steps = 1
whole_image_batch = 2
checkpoint_every = 2
validate_every = 2
[vae_decoder]
lr = 1e-3
warmup_steps = 1
batch_size = 2
crop_size = 16
ssim_weight = 1.0
steps = 2
checkpoint_every = 2
validate_every = 1
[unet]
block_out_channels = [32, 64]
layers_per_block = 1
attention_head_dim = 2
cross_attention_dim = 384
lr = 1e-3
warmup_steps = 1
batch_size = 2
steps = 2
caption_dropout = 0.5
ema_decay = 0.9
checkpoint_every = 1
validate_every = 1
[text_encoder]
source = "minilm"
max_length = 8
[prompts]
healthy = "normal chest x-ray"
normal = ["normal chest x-ray", "Normal chest scan"]
covid = ["COVID 19"]
"""


def _dataset(root: Path, size: int = 32) -> Path:
    """Synthetic labelled images: 'covid' images carry a bright blob, 'normal' ones do not."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 4), ("val", 2)):
        for label in ("normal", "covid"):
            for i in range(n):
                img = (rng.random((size, size)) * 80 + 60).astype(np.uint8)
                if label == "covid":
                    img[8:16, 8:16] = 230
                path = root / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
                rows.append((path.relative_to(root).as_posix(), split, label))
    csv_path = root / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split", "label"])
        w.writerows(rows)
    return csv_path


def test_prior_preservation_loss_on_known_tensors():
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    target = torch.zeros(3, 2)
    total, inst, prior = prior_preservation_loss(pred, target, n_instance=1, prior_weight=0.5)
    assert inst.item() == pytest.approx(1.0)          # mean((1,1)^2)
    assert prior.item() == pytest.approx(4.5)         # mean((0,0,3,3)^2) = 18/4
    assert total.item() == pytest.approx(1.0 + 0.5 * 4.5)
    total, inst, prior = prior_preservation_loss(pred, target, n_instance=3, prior_weight=1.0)
    assert prior.item() == 0.0 and total.item() == pytest.approx(inst.item())


def test_parse_stages_paper_order_and_errors():
    assert parse_stages("auto", {"covid", "normal", "viral_pneumonia"}) == [
        ("normal", 1200), ("covid", 500), ("viral_pneumonia", 500)]
    assert parse_stages("covid:3,normal:2", {"covid", "normal"}) == [("covid", 3), ("normal", 2)]
    with pytest.raises(ValueError, match="LABEL:STEPS"):
        parse_stages("cardio:3", {"covid", "normal"})


def test_incompatible_flags_rejected():
    with pytest.raises(SystemExit):
        parse_args(["unet", "--data", "x.csv", "--output-dir", "o", "--config", "c.toml"])  # no --vae
    with pytest.raises(SystemExit):
        parse_args(["vae", "--data", "x.csv", "--output-dir", "o", "--config", "c", "--package", "p"])


def test_from_scratch_vae_unet_package_resume_and_generate(tmp_path):
    csv_path = _dataset(tmp_path / "data")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    run = tmp_path / "run"
    common = ["--data", str(csv_path), "--output-dir", str(run), "--config", str(cfg), "--threads", "1"]
    # stage 1, interrupted after 2 steps, then resumed to the end
    assert main(parse_args(["vae", *common, "--max-steps", "2"])) == 0
    assert latest_checkpoint(run).name == "step-000002.pt"
    assert main(parse_args(["vae", *common, "--resume", "latest"])) == 0
    rows = list(csv.DictReader((run / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # resumed at 3, not restarted
    assert (run / "vae-best" / "config.json").is_file() and (run / "loss.png").is_file()
    # stage 2 + package
    urun = tmp_path / "urun"
    model = tmp_path / "model"
    assert main(parse_args(
        ["unet", "--data", str(csv_path), "--output-dir", str(urun), "--config", str(cfg), "--vae",
         str(run / "vae-best"), "--package", str(model), "--threads", "1"])) == 0
    manifest = json.loads((model / "vald_md.json").read_text())
    assert manifest["data"]["counts"] == {"covid": 4, "normal": 4}
    assert len(manifest["preview_projection"]) == 5
    eng = engine.CounterfactualEngine(model, device="cpu")
    assert eng.info.text_encoder_type == "BertModel" and eng.info.model_hash == manifest["model_hash"]
    r = eng.generate(np.full((40, 30), 0.5, np.float32), "normal chest x-ray", strength=0.5, steps=4, seed=0)
    assert r.counterfactuals.shape == (1, 40, 30)

    # stage 1b: a sharper decoder for the packaged model; encoder, latents and UNet stay as they were
    drun, model2 = tmp_path / "drun", tmp_path / "model2"
    assert main(parse_args(
        ["vae-decoder", "--data", str(csv_path), "--output-dir", str(drun), "--config", str(cfg), "--vae",
         str(run / "vae-best"), "--model", str(model), "--package", str(model2), "--threads", "1"])) == 0
    val_rows = [r for r in csv.DictReader((drun / "loss.csv").read_text().splitlines()) if r["val_name"]]
    assert [(r["step"], r["val_name"]) for r in val_rows] == [("0", "val_ssim"), ("1", "val_ssim"), ("2", "val_ssim")]
    old, new = eng.pipe, engine.CounterfactualEngine(model2, device="cpu").pipe
    enc_old, enc_new = old.vae.state_dict(), new.vae.state_dict()
    assert all(torch.equal(enc_old[k], enc_new[k]) for k in enc_old if k.startswith(("encoder.", "quant_conv.")))
    from diffusers import AutoencoderKL

    last = AutoencoderKL.from_pretrained(drun / "vae-last").state_dict()
    best = AutoencoderKL.from_pretrained(drun / "vae-best").state_dict()
    assert any(not torch.equal(enc_old[k], last[k].half()) for k in enc_old if k.startswith("decoder."))  # it learnt
    assert all(torch.equal(best[k].half().float(), enc_new[k].float()) for k in best if k.startswith("decoder."))
    assert {f.stat().st_size for f in (model2 / "vae").glob("*.safetensors")} == {
        f.stat().st_size for f in (model / "vae").glob("*.safetensors")}  # same dtype as the model stored
    assert new.vae.config.scaling_factor == old.vae.config.scaling_factor
    assert json.loads((model2 / "vae" / "config.json").read_text())["_name_or_path"] == "vae"  # no folder path
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):  # copied byte for byte
        for f in (model / part).iterdir():
            assert (model2 / part / f.name).read_bytes() == f.read_bytes(), f
    manifest2 = json.loads((model2 / "vald_md.json").read_text())
    assert manifest2["training"]["vae_decoder"]["config"]["ssim_weight"] == 1.0
    assert manifest2["preview_projection"] == manifest["preview_projection"]
    assert manifest2["model_hash"] != manifest["model_hash"]
    # a second, lower-rate round from the first round's decoder: --learning-rate overrides the config, rounds kept
    drun2, model4 = tmp_path / "drun2", tmp_path / "model4"
    assert main(parse_args(
        ["vae-decoder", "--data", str(csv_path), "--output-dir", str(drun2), "--config", str(cfg), "--vae",
         str(drun / "vae-best"), "--model", str(model2), "--package", str(model4), "--threads", "1",
         "--learning-rate", "2e-4", "--max-steps", "1"])) == 0
    lrs = [float(r["lr"]) for r in csv.DictReader((drun2 / "loss.csv").read_text().splitlines()) if r["step"] != "0"]
    assert lrs == [2e-4]
    rounds = json.loads((model4 / "vald_md.json").read_text())["training"]["vae_decoder"]
    assert [r["config"]["lr"] for r in rounds] == [1e-3, 2e-4]
    assert [r["from_vae"] for r in rounds] == [str(run / "vae-best"), str(drun / "vae-best")]
    # a different encoder would not match the UNet's latents: refused
    other = build_vae(parse_config(TINY_TOML).vae, 32)
    other.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(ValueError, match="different encoder"):
        package_with_decoder(model, tmp_path / "other-vae", tmp_path / "model3",
                                   parse_args(["vae-decoder", "--data", "x", "--output-dir", str(drun),
                                                     "--config", str(cfg), "--vae", "v"]),
                                   parse_config(TINY_TOML))


def test_dreambooth_prior_preservation_text_encoder_resume(tmp_path):
    csv_path = _dataset(tmp_path / "data")
    base = write_tiny_model(tmp_path / "base")
    out = tmp_path / "db"
    common = ["dreambooth", "--data", str(csv_path), "--model", str(base), "--output-dir", str(out),
              "--resolution", "32", "--train-batch-size", "1", "--mixed-precision", "no", "--num-class-images", "2",
              "--prior-steps", "2", "--checkpointing-steps", "2", "--validation-steps", "0", "--threads", "1"]
    assert main(parse_args([*common, "--stages", "normal:2"])) == 0
    encoder = engine.CounterfactualEngine(out / "model", device="cpu").pipe.text_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert main(parse_args([*common, "--stages", "normal:2,covid:2", "--resume", "latest",
                                        "--validation-steps", "4"])) == 0
    steps = [int(r["step"]) for r in csv.DictReader((out / "loss.csv").read_text().splitlines())]
    assert steps == [1, 2, 3, 4]
    assert list((out / "validation").glob("step000004-*.png"))
    eng = engine.CounterfactualEngine(out / "model", device="cpu")
    after = eng.pipe.text_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "text encoder was not trained"
    manifest = json.loads((out / "model" / "vald_md.json").read_text())
    assert manifest["training"]["stages"] == [["normal", 2], ["covid", 2]]
    assert (out / "model" / "MODEL_CARD.md").read_text().count("Not for diagnosis") == 1
    r = eng.generate(np.full((32, 32), 0.5, np.float32), "COVID 19", strength=0.5, steps=4, seed=0)
    assert r.counterfactuals.shape == (1, 32, 32)
