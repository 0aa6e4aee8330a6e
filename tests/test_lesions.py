"""The lung-only lesion classifier (app.lesions), its training (app.train.lesions) and the map methods that use
it or the engine (app.mapmethods)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import mapmethods
from app.lesions import LesionClassifier, LesionNet, lung_box, prepare, save_classifier


def _lungs(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return (((xx - 0.3) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1) | (
        ((xx - 0.7) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1)


@pytest.fixture()
def tiny_classifier(tmp_path: Path) -> LesionClassifier:
    torch.manual_seed(0)
    save_classifier(tmp_path / "clf", LesionNet((4, 8)), size=16, name="tiny", metrics={}, training={})
    return LesionClassifier(tmp_path / "clf")


def test_lung_box_widens_by_the_margin_and_falls_back_to_the_image() -> None:
    m = np.zeros((100, 100), bool)
    m[20:60, 30:70] = True
    assert lung_box(m) == (15, 65, 25, 75)
    assert lung_box(np.zeros((10, 12), bool)) == (0, 10, 0, 12)


def test_prepare_shows_only_the_lungs_standardised_and_is_differentiable() -> None:
    lungs = _lungs(64)
    img = torch.rand(64, 64, requires_grad=True)
    x = prepare(img, lungs, 32)
    assert x.shape == (1, 1, 32, 32)
    inside = x[x != 0]
    assert abs(float(inside.mean())) < 0.1 and abs(float(inside.std()) - 1) < 0.1
    x.sum().backward()
    assert img.grad is not None
    outside = ~lungs
    outside[:, 5:59] = False  # the box margin may reach a few outside pixels; the far edges never count
    assert float(img.grad[torch.from_numpy(outside)].abs().sum()) == 0.0


def test_classifier_round_trip_probability_and_gradient_map(tiny_classifier: LesionClassifier) -> None:
    lungs = _lungs(32)
    img = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    p = tiny_classifier.probability(img, lungs)
    assert 0.0 < p < 1.0 and len(tiny_classifier.info["sha256"]) == 64
    g = mapmethods.classifier_gradient(tiny_classifier, img, lungs, draws=2)
    assert g.shape == (32, 32) and g.dtype == np.float32 and g.min() >= 0
    with pytest.raises(FileNotFoundError, match=r"classifier.json"):
        LesionClassifier(Path("/nonexistent"))


def test_diffedit_contrast_is_a_model_frame_map(tiny_engine) -> None:
    img = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    m = mapmethods.diffedit_contrast(tiny_engine, img, draws=2, seed=3)
    assert m.shape == (32, 32) and m.dtype == np.float32 and m.min() >= 0 and m.max() > 0
    np.testing.assert_array_equal(m, mapmethods.diffedit_contrast(tiny_engine, img, draws=2, seed=3))


def test_ddim_inversion_reconstructs_and_the_prompt_makes_the_difference(tiny_engine) -> None:
    """Deterministic; with guidance 1 and the empty prompt the counterfactual *is* the reconstruction (the same
    inverted latent, the same denoising), so the map is zero: only the prompt creates a difference."""
    img = np.random.default_rng(4).random((32, 32), dtype=np.float32)
    kw = {"strength": 0.3, "steps": 10}
    a = mapmethods.ddim_inversion(tiny_engine, img, guidance_scale=3.0, **kw)
    b = mapmethods.ddim_inversion(tiny_engine, img, guidance_scale=3.0, **kw)
    assert a.counterfactuals.shape == (1, 32, 32) and a.reconstruction.shape == (32, 32)
    assert a.counterfactuals.dtype == np.float32 and 0.0 <= a.counterfactuals.min() <= a.counterfactuals.max() <= 1.0
    np.testing.assert_array_equal(a.counterfactuals, b.counterfactuals)
    assert float(np.abs(a.counterfactuals[0] - a.reconstruction).max()) > 1e-4
    same = mapmethods.ddim_inversion(tiny_engine, img, prompt="", guidance_scale=1.0, **kw)
    np.testing.assert_allclose(same.counterfactuals[0], same.reconstruction, atol=1e-5)


def test_classifier_guidance_lowers_the_disease_logit(tiny_engine, tiny_classifier: LesionClassifier) -> None:
    img = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    lungs = _lungs(32)
    kw = {"strength": 0.5, "steps": 10, "guidance_scale": 2.0, "seed": 0}
    plain = mapmethods.classifier_guided(tiny_engine, tiny_classifier, img, lungs, classifier_scale=0.0, **kw)
    guided = mapmethods.classifier_guided(tiny_engine, tiny_classifier, img, lungs, classifier_scale=2.0, **kw)
    assert guided.counterfactuals.shape == (1, 32, 32) and guided.reconstruction.shape == (32, 32)
    assert guided.logit_input == plain.logit_input
    assert guided.logit_counterfactual < plain.logit_counterfactual
    assert np.abs(guided.counterfactuals - plain.counterfactuals).max() > 1e-3


def test_train_lesions_on_synthetic_opacities(tmp_path: Path) -> None:
    """Disease = a bright blob inside a lung; the classifier must learn it (validation AUROC recorded)."""
    from app.train.lesions import main, parse_args

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = ["path,split,label"]
    lungs = _lungs(64)
    for i in range(48):
        sick = i % 2 == 1
        img = np.where(lungs, 0.25, 0.7) + rng.normal(0, 0.03, lungs.shape)
        if sick:
            r, c = int(rng.integers(24, 40)), int(rng.choice([19, 45]))
            img[r - 5 : r + 5, c - 4 : c + 4] += 0.35
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'val' if i >= 36 else 'train'},{'pneumonia' if sick else 'no_finding'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    # the classifier sees only what the segmenter calls lung: train a tiny segmenter on these lungs first
    from app.train import lungs as train_lungs

    (tmp_path / "masks" / "images").mkdir(parents=True)
    (tmp_path / "masks" / "masks").mkdir()
    for i in range(8):
        Image.open(root / "img" / f"{i}.png").save(tmp_path / "masks" / "images" / f"{i}.png")
        Image.fromarray(np.where(lungs, 255, 0).astype(np.uint8)).save(tmp_path / "masks" / "masks" / f"{i}.png")
    seg_dir = tmp_path / "seg"
    assert train_lungs.main(train_lungs.parse_args([
        "--data", str(tmp_path / "masks"), "--output-dir", str(seg_dir), "--size", "32", "--channels", "8,16",
        "--steps", "100", "--batch-size", "8", "--learning-rate", "5e-3", "--threads", "1"])) == 0
    out = tmp_path / "clf"
    args = parse_args(["--data", str(root / "labels.csv"), "--segmenter", str(seg_dir), "--output-dir", str(out),
                       "--size", "32", "--steps", "60", "--batch-size", "16", "--validate-every", "30",
                       "--learning-rate", "3e-3", "--threads", "1"])
    assert main(args) == 0
    clf = LesionClassifier(out)
    assert clf.info["metrics"]["best_val_mean_auroc"] >= 0.8
    assert (out / "cache.npz").is_file() and (out / "checkpoint.pt").is_file()
