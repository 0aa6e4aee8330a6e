"""CUDA paths that CPU CI cannot reach: the engine on a GPU (fp32 and its automatic bf16/fp16) and the
paper-faithful ``vald-md train dreambooth`` with mixed precision, gradient checkpointing, EMA and text-encoder
training. Skipped where torch sees no CUDA device; run them on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from app import engine
from app.train.__main__ import main
from app.train.arguments import parse_args
from tests.test_train import _dataset
from tests.tiny_model import write_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def _image() -> np.ndarray:
    """A 40 x 30 float32 image in [0, 1] with a bright square (non-square, not a multiple of 8)."""
    img = np.full((40, 30), 0.4, np.float32)
    img[10:20, 8:18] = 0.9
    return img


def test_engine_on_cuda_matches_cpu_and_runs_in_half_precision(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    kw = {"prompt": "normal chest x-ray", "strength": 0.5, "guidance_scale": 7.5, "steps": 8, "seed": 3}
    cpu = engine.CounterfactualEngine(folder, device="cpu").generate(_image(), **kw)
    gpu32 = engine.CounterfactualEngine(folder, device="cuda", dtype="fp32")
    assert gpu32.device.type == "cuda" and gpu32.dtype == torch.float32
    r32 = gpu32.generate(_image(), **kw)
    # the same seeds (CPU generators) give the same counterfactual on either device, up to kernel rounding
    assert np.abs(r32.counterfactuals - cpu.counterfactuals).max() < 2e-3
    auto = engine.CounterfactualEngine(folder, device="cuda")
    assert auto.dtype in (torch.bfloat16, torch.float16)
    rh = auto.generate(_image(), **{**kw, "samples": 2})
    assert rh.counterfactuals.shape == (2, 40, 30) and np.isfinite(rh.counterfactuals).all()
    # the seeded draws are made in float32 whatever the dtype (modelfolder.seeded_img2img_pipeline_class), so half
    # precision gives the fp32 counterfactual up to rounding
    assert np.abs(rh.counterfactuals[0] - cpu.counterfactuals[0]).mean() < 0.03
    plain = {**kw, "guidance_scale": 1.0}
    half, full = auto.generate(_image(), **plain), gpu32.generate(_image(), **plain)
    assert np.abs(half.counterfactuals - full.counterfactuals).mean() < 0.01


def test_edit_region_on_cuda_matches_cpu(tmp_path):
    """The masked edit (``edit_region``) keeps its latents on the GPU: an empty region gives the CPU's result (the
    input's own latent, decoded) up to kernel rounding, and a region of ones the unrestricted generation."""
    from app.generation import GenerationRequest

    folder = write_tiny_model(tmp_path / "tiny")
    req = GenerationRequest(prompt="normal chest x-ray", strength=0.5, guidance_scale=7.5, steps=8, seed=3,
                            scheduler="dpm++", samples=2)
    cpu, gpu = engine.CounterfactualEngine(folder, device="cpu"), engine.CounterfactualEngine(folder, device="cuda",
                                                                                             dtype="fp32")
    size = cpu.info.image_size
    zeros, ones = np.zeros((size, size), np.float32), np.ones((size, size), np.float32)
    a = cpu.generate_request(_image(), req, edit_region=zeros).counterfactuals_model
    b = gpu.generate_request(_image(), req, edit_region=zeros).counterfactuals_model
    assert np.abs(a - b).max() < 2e-3
    full = gpu.generate_request(_image(), req).counterfactuals_model
    assert np.abs(full - gpu.generate_request(_image(), req, edit_region=ones).counterfactuals_model).max() < 1e-4
    # in the GPU's own half precision the blend casts back: finite, and the input kept where the region is empty
    half = engine.CounterfactualEngine(folder, device="cuda")
    h = half.generate_request(_image(), req, edit_region=zeros).counterfactuals_model
    assert np.isfinite(h).all() and np.abs(h - a).mean() < 0.03


def test_dreambooth_bf16_checkpointing_ema_text_encoder_on_cuda(tmp_path):
    csv_path = _dataset(tmp_path / "data")
    base = write_tiny_model(tmp_path / "base")
    out = tmp_path / "db"
    args = parse_args(
        ["dreambooth", "--data", str(csv_path), "--model", str(base), "--output-dir", str(out),
         "--stages", "normal:3,covid:3", "--resolution", "32", "--train-batch-size", "2",
         "--mixed-precision", "bf16", "--gradient-checkpointing", "--use-ema", "--use-8bit-adam",
         "--gradient-accumulation-steps", "1", "--num-class-images", "2", "--prior-steps", "2",
         "--checkpointing-steps", "3", "--validation-steps", "6", "--save-fp16"])
    assert main(args) == 0
    rows = list(csv.DictReader((out / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) and np.isfinite(float(r["val_value"])) for r in rows)
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert list((out / "validation").glob("step000006-*.png"))
    manifest = json.loads((out / "model" / "vald_md.json").read_text())
    assert manifest["training"]["stages"] == [["normal", 3], ["covid", 3]]
    before = engine.CounterfactualEngine(base, device="cuda", dtype="fp32").pipe.text_encoder.state_dict()
    tuned = engine.CounterfactualEngine(out / "model", device="cuda")
    after = tuned.pipe.text_encoder.state_dict()
    assert any(not torch.allclose(before[k].float(), after[k].float()) for k in before), "text encoder not trained"
    r = tuned.generate(_image(), "COVID 19", strength=0.5, steps=4, seed=0)
    assert r.counterfactuals.shape == (1, 40, 30) and np.isfinite(r.counterfactuals).all()
