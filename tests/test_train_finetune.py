"""`vald-md train lesion-finetune` (app.train.finetune) on the tiny in-code model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.lungs import LungUNet, save_segmenter


def _source(root: Path, labels: tuple[str, str], n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = ["path,split,label"]
    for i in range(n):
        img = rng.random((32, 32)) * 0.5 + 0.2
        img[2:5, 26:30] = 1.0  # a burned-in marker in the corner
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'val' if i % 4 == 3 else 'train'},{labels[i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture()
def everything_lung(tmp_path: Path) -> Path:
    net = LungUNet((4, 8))
    torch.nn.init.constant_(net.head.bias, 10.0)
    save_segmenter(tmp_path / "seg", net, size=32, name="all-lung", metrics={}, training={})
    return tmp_path / "seg"


def test_finetune_trains_resumes_and_packages_a_loadable_model(tmp_path: Path, everything_lung: Path) -> None:
    from app import engine, modelfolder
    from app.train.finetune import main, parse_args
    from tests.tiny_model import write_tiny_model

    base = write_tiny_model(tmp_path / "base")
    a = _source(tmp_path / "nih256", ("no_finding", "pneumonia"), 8, 0)
    b = _source(tmp_path / "cxr256", ("normal", "viral_pneumonia"), 8, 1)
    cfg = tmp_path / "ft.toml"
    cfg.write_text("[finetune]\nimage_size = 32\nlr = 1e-3\nwarmup_steps = 1\nbatch_size = 4\nsteps = 4\n"
                   "caption_dropout = 0.1\nema_decay = 0.9\noutside_weight = 0.2\ncheckpoint_every = 2\n"
                   "validate_every = 2\n[prompts]\nhealthy = \"normal chest x-ray\"\n"
                   "no_finding = [\"normal chest x-ray\"]\nnormal = [\"normal chest x-ray\"]\n"
                   "pneumonia = [\"lung opacity\"]\n")
    common = ["--model", str(base), "--data", str(a), "--data", str(b), "--config", str(cfg), "--segmenter",
              str(everything_lung), "--output-dir", str(tmp_path / "run"), "--threads", "1"]
    assert main(parse_args([*common, "--max-steps", "2"])) == 0
    lat = torch.load(tmp_path / "run" / "latents.pt", weights_only=False)
    assert len(lat["mean"]) == 6 + 4  # nih256 train rows + cxr256 "normal" train rows (viral_pneumonia skipped)
    assert lat["shares"].shape == (10, 16, 16) and float(lat["shares"].min()) == 1.0
    assert main(parse_args([*common, "--resume", "latest", "--package", str(tmp_path / "pkg")])) == 0
    assert [r.split(",")[0] for r in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]] == [
        "1", "2", "3", "4"]
    manifest = json.loads((tmp_path / "pkg" / modelfolder.MANIFEST).read_text())
    assert manifest["training"]["mode"] == "lesion-finetune" and manifest["training"]["unet"] == "unet-step000004"
    assert manifest["model_hash"] == modelfolder.model_hash(tmp_path / "pkg") != modelfolder.model_hash(base)
    assert manifest["class_prompts"]["pneumonia"] == "lung opacity"
    # the same UNet packaged from another folder gives the same model: no training path in the hashed config
    from app.train.finetune import package

    moved = tmp_path / "elsewhere" / "unet-step000004"
    shutil.copytree(tmp_path / "run" / "unet-step000004", moved)
    assert package(base, moved, tmp_path / "pkg2", {}, {}) == manifest["model_hash"]
    assert json.loads((tmp_path / "pkg" / "unet" / "config.json").read_text())["_name_or_path"] == "unet"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (base / part).iterdir():
            assert (tmp_path / "pkg" / part / f.name).read_bytes() == f.read_bytes()
    eng = engine.CounterfactualEngine(tmp_path / "pkg", device="cpu")
    res = eng.generate(np.full((32, 32), 0.5, np.float32), "normal chest x-ray", strength=0.5, steps=4, seed=0)
    assert res.counterfactuals.shape == (1, 32, 32)


def test_finetune_rejects_an_outside_weight_out_of_range() -> None:
    from app.train.finetune import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--data", "d", "--config", "c", "--output-dir", "o", "--outside-weight", "2"])


def test_top_attention_starts_as_the_identity_and_trains() -> None:
    """--attention-32: cross-attention added at the top latent level predicts exactly what the plain UNet did,
    and its new weights receive gradients."""
    from diffusers import UNet2DConditionModel

    from app.train.finetune import with_top_attention

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    new = with_top_attention(unet).eval()
    assert new.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert new.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    z, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(z, t, encoder_hidden_states=emb).sample,
                                   unet(z, t, encoder_hidden_states=emb).sample)
    new(z, t, encoder_hidden_states=emb).sample.square().mean().backward()
    grad = new.down_blocks[0].attentions[0].proj_out.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert with_top_attention(new) is new

