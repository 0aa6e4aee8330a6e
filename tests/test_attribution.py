"""Tests for app.attribution on synthetic images whose changed region is known."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFont

from app import rendering as attr
from app.attribution import (
    AttributionMap,
    changed_region,
    difference_map,
    load_mask_png,
    summarize,
    threshold_value,
)
from app.rendering import (
    BANNER_TEXT,
    OverlayOptions,
    fonts,
    palette,
    render_annotated_export,
    render_legend,
    render_overlay,
)
from app.runs.record import RunRecord
from tests.factories import encode_png

H, W = 64, 80
CENTRE = (50.0, 24.0)  # (x, y)
RADIUS = 10.0
DELTA = 0.3


def disk(
    cx: float = CENTRE[0], cy: float = CENTRE[1], r: float = RADIUS, shape: tuple[int, int] = (H, W)
) -> np.ndarray:
    ys, xs = np.indices(shape)
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2


def background(seed: int = 0, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """A smooth, textured 'anatomy' in [0.2, 0.6]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.indices(shape)
    base = 0.4 + 0.1 * np.sin(xs / 9.0) * np.cos(ys / 7.0) + 0.05 * rng.random(shape)
    return base.astype(np.float32)


def lesion_pair(seed: int = 0, delta: float = DELTA) -> tuple[np.ndarray, np.ndarray]:
    """(original with a bright disk, counterfactual without it)."""
    counterfactual = background(seed)
    original = counterfactual.copy()
    original[disk()] += delta
    return original, counterfactual


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------------------------------------------------------
# difference_map / summarize
# ---------------------------------------------------------------------------------------------------------------


def test_removed_disk_is_found() -> None:
    original, cf = lesion_pair()
    amap = difference_map(original, cf)
    assert amap.signed.dtype == np.float32 and amap.signed.shape == (H, W)
    assert amap.n_samples == 1 and amap.std is None and amap.mask is None
    y, x = np.unravel_index(np.argmax(amap.magnitude), amap.shape)
    assert disk()[y, x]
    assert np.all(amap.signed[disk()] > 0)  # brighter in the original = removed by the counterfactual

    summary = summarize(amap, threshold=DELTA / 2, mode="absolute")
    cx, cy = summary.centroid_xy or (np.nan, np.nan)
    assert abs(cx - CENTRE[0]) < 0.5 and abs(cy - CENTRE[1]) < 0.5
    assert summary.changed_area_px == disk().sum()
    assert summary.max_abs_in_mask == pytest.approx(DELTA, abs=1e-5)
    assert summary.energy_share_in_mask == 1.0


@pytest.mark.parametrize(("threshold", "mode"), [(DELTA / 2, "absolute"), (100 * (1 - disk().mean()), "percentile")])
def test_thresholded_region_matches_disk(threshold: float, mode: str) -> None:
    original, cf = lesion_pair()
    amap = difference_map(original, cf, smoothing_sigma=1.0)
    thr = threshold_value(amap.magnitude, threshold=threshold, mode=mode)
    assert iou(changed_region(amap.magnitude, thr), disk()) > 0.9


def test_mask_restricts_statistics_and_overlay() -> None:
    original, cf = lesion_pair()
    second = disk(cx=15.0, cy=45.0, r=6.0)
    original[second] = np.clip(original[second] + 0.5, 0, 1)
    lung = np.zeros((H, W), dtype=bool)
    lung[:, 32:] = True  # contains the first disk only
    amap = difference_map(original, cf, mask=lung.astype(np.uint8))
    assert amap.mask is not None and amap.mask.dtype == bool

    summary = summarize(amap, threshold=0.1, mode="absolute")
    cx, cy = summary.centroid_xy or (np.nan, np.nan)
    assert abs(cx - CENTRE[0]) < 0.5 and abs(cy - CENTRE[1]) < 0.5  # the brighter disk outside is ignored
    assert summary.mask_area_px == lung.sum()
    assert summary.changed_area_fraction == pytest.approx(disk().sum() / lung.sum())
    assert summary.max_abs_in_mask == pytest.approx(DELTA, abs=1e-5)
    energy = np.square(original.astype(np.float64) - cf)
    assert summary.energy_share_in_mask == pytest.approx(energy[lung].sum() / energy.sum(), rel=1e-4)
    assert 0.0 < summary.energy_share_in_mask < 0.9  # type: ignore[operator]

    overlay = render_overlay(original, amap, OverlayOptions(opacity=1.0)).astype(int)
    gray = np.rint(np.clip(original, 0, 1) * 255).astype(int)
    assert np.array_equal(overlay[~lung, 0], gray[~lung])  # nothing drawn outside the mask
    assert (overlay[disk(), 0] > overlay[disk(), 1]).all()


def test_multi_sample_mean_and_std() -> None:
    original, cf = lesion_pair()
    same = difference_map(original, np.stack([cf, cf, cf]))
    assert same.n_samples == 3 and same.std is not None
    np.testing.assert_allclose(same.std, 0.0, atol=1e-7)
    np.testing.assert_allclose(same.signed, difference_map(original, cf).signed, atol=1e-6)

    other = cf.copy()
    varying = disk(cx=20.0, cy=40.0, r=5.0)
    other[varying] += 0.2
    amap = difference_map(original, np.stack([cf, other]), smoothing_sigma=0.0)
    assert amap.std is not None
    assert (amap.std[varying] > 0.1).all() and np.allclose(amap.std[~varying], 0.0, atol=1e-7)
    np.testing.assert_allclose(amap.signed[varying], -0.1, atol=1e-6)
    summary = summarize(amap)
    assert summary.n_samples == 2 and summary.mean_std_in_mask is not None and summary.mean_std_in_mask > 0
    json.dumps(summary.to_dict())  # JSON-ready


def test_smoothing_spreads_but_keeps_mean() -> None:
    original, cf = lesion_pair()
    raw = difference_map(original, cf)
    smooth = difference_map(original, cf, smoothing_sigma=2.0)
    assert smooth.magnitude.max() < raw.magnitude.max()
    assert smooth.signed.sum() == pytest.approx(raw.signed.sum(), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"counterfactuals": np.zeros((H, W + 1), np.float32)}, "same frame"),
        ({"reference": np.full((H, W), np.nan, np.float32)}, "non-finite"),
        ({"reference": np.full((H, W), 255.0, np.float32)}, "Divide 8-bit data by 255"),
        ({"reference": np.zeros((H, W, 3), np.float32)}, "convert RGB to grayscale"),
        ({"mask": np.ones((H + 1, W), bool)}, "resize it to the image"),
        ({"mask": np.full((H, W), 0.7)}, "mask > 0.5"),
        ({"mask": np.zeros((H, W), bool)}, "selects no pixels"),
        ({"smoothing_sigma": -1.0}, "-1.0"),
        ({"smoothing_sigma": float("nan")}, "smoothing_sigma"),
    ],
)
def test_difference_map_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "reference": np.zeros((H, W), np.float32),
        "counterfactuals": np.zeros((H, W), np.float32),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        difference_map(args.pop("reference"), args.pop("counterfactuals"), **args)  # type: ignore[arg-type]


def test_difference_map_is_sample_statistics_then_map_from_statistics() -> None:
    """The two halves compose to the whole, for both polarities; the statistics work in any frame."""
    from app.attribution import map_from_statistics, sample_statistics

    original, cf = lesion_pair()
    other = np.clip(cf + 0.05 * disk(cx=20.0, cy=40.0, r=5.0), 0, 1)
    mean, std, n = sample_statistics(original, np.stack([cf, other]), smoothing_sigma=1.0)
    assert n == 2 and mean.dtype == np.float32 and std is not None and std.dtype == np.float32
    for polarity in ("both", "removed"):
        whole = difference_map(original, np.stack([cf, other]), smoothing_sigma=1.0, polarity=polarity)
        halves = map_from_statistics(mean, std, n_samples=n, polarity=polarity)
        assert np.array_equal(whole.signed, halves.signed) and np.array_equal(whole.std, halves.std)
        assert np.array_equal(whole.magnitude, halves.magnitude)
    assert sample_statistics(original, cf)[1:] == (None, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"std": None}, "n_samples=2 and no SD map"),
        ({"n_samples": 1}, "n_samples=1 and an SD map"),
        ({"std": np.full((H, W), -0.1, np.float32)}, "non-negative"),
        ({"std": np.zeros((H, W + 1), np.float32)}, "non-negative map of the mean's shape"),
        ({"mean": np.full((H, W), np.inf, np.float32)}, "finite"),
        ({"polarity": "added"}, "polarity"),
        ({"mask": np.zeros((H, W), bool)}, "selects no pixels"),
    ],
)
def test_map_from_statistics_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    from app.attribution import map_from_statistics

    args: dict[str, object] = {"mean": np.zeros((H, W), np.float32), "std": np.zeros((H, W), np.float32),
                               "n_samples": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        map_from_statistics(args.pop("mean"), **args)  # type: ignore[arg-type]


def test_threshold_validation_and_settings() -> None:
    mag = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    assert threshold_value(mag, threshold=50, mode="percentile") == pytest.approx(0.5, abs=1e-3)
    assert threshold_value(mag, threshold=0.25, mode="absolute") == 0.25
    with pytest.raises(ValueError, match="150"):
        threshold_value(mag, threshold=150, mode="percentile")
    with pytest.raises(ValueError, match="'otsu'"):
        threshold_value(mag, threshold=1, mode="otsu")
    with pytest.raises(ValueError, match=r"-0\.1"):
        threshold_value(mag, threshold=-0.1, mode="absolute")


# ---------------------------------------------------------------------------------------------------------------
# Overlay
# ---------------------------------------------------------------------------------------------------------------


def test_overlay_alpha_monotone_in_magnitude() -> None:
    original = np.full((H, W), 0.5, np.float32)
    ramp = np.tile(np.linspace(0.0, 0.5, W, dtype=np.float32), (H, 1))  # removed density grows to the right
    amap = difference_map(original, original - ramp)
    out = render_overlay(original, amap, OverlayOptions(opacity=0.8, scale=0.4))
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    redness = out[0, :, 0].astype(int) - out[0, :, 1].astype(int)
    assert np.all(np.diff(redness) >= 0) and redness[0] == 0 and redness[-1] > 150
    assert np.array_equal(out[0, -1], out[0, -2])  # saturated beyond the scale


def test_signed_mode_colours() -> None:
    original = np.full((H, W), 0.5, np.float32)
    cf = original.copy()
    cf[:, : W // 2] -= 0.3  # the counterfactual darkens the left half: removed -> red
    cf[:, W // 2 :] += 0.3  # and brightens the right half: added -> blue
    amap = difference_map(original, cf)
    out = render_overlay(original, amap, OverlayOptions(mode="signed", opacity=1.0)).astype(int)
    left, right = out[H // 2, 5], out[H // 2, -5]
    assert left[0] > 200 and left[2] < 60
    assert right[2] > 200 and right[0] < 100
    magnitude = render_overlay(original, difference_map(original, cf), OverlayOptions(mode="magnitude", opacity=1.0))
    assert magnitude[H // 2, -5, 0] > 200  # magnitude mode is single-hue red everywhere


@pytest.mark.parametrize("signed", [False, True])
def test_the_overlay_blend_has_the_bytes_of_the_whole_image_formula(signed: bool) -> None:
    """The blend, made one channel at a time, has exactly the bytes of
    ``to_uint8((1 - alpha) * gray + alpha * hue)`` over a full (H, W, 3) float image (red, or red/blue by sign)."""
    from app.rendering.overlay import _blend
    from app.rendering.palette import BLUE, RED, to_uint8

    rng = np.random.default_rng(7)
    gray = rng.random((H, W), dtype=np.float32)
    alpha = (rng.random((H, W), dtype=np.float32) * 1.2 - 0.1).clip(0, 1).astype(np.float32)
    positive = rng.random((H, W)) > 0.5
    hue = np.empty((H, W, 3), np.float32)
    hue[:] = np.where(positive[..., None], np.asarray(RED), np.asarray(BLUE)) if signed else RED
    expected = to_uint8((1.0 - alpha[..., None]) * gray[..., None] + alpha[..., None] * hue)
    got = _blend(gray, alpha, RED, positive, BLUE) if signed else _blend(gray, alpha, RED)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    # computed in float32 whatever it is given; a second hue needs its where, and the other way round
    assert np.array_equal(_blend(gray.astype(np.float64), alpha.astype(np.float64), RED), _blend(gray, alpha, RED))
    with pytest.raises(ValueError, match="both"):
        _blend(gray, alpha, RED, positive)


def test_fixed_scale_makes_overlays_comparable() -> None:
    original_a, cf_a = lesion_pair(seed=1)
    cf_b = cf_a.copy()
    original_b = original_a.copy()
    extra = disk(cx=15.0, cy=45.0, r=6.0)
    original_b[extra] = np.clip(original_b[extra] + 0.6, 0, 1)  # image B also has a much stronger change
    map_a, map_b = difference_map(original_a, cf_a), difference_map(original_b, cf_b)
    d = disk()
    fixed_a = render_overlay(original_a, map_a, OverlayOptions(scale=0.5))
    fixed_b = render_overlay(original_b, map_b, OverlayOptions(scale=0.5))
    assert np.array_equal(fixed_a[d], fixed_b[d])
    own_a, own_b = render_overlay(original_a, map_a), render_overlay(original_b, map_b)
    assert own_a[d, 0].mean() > own_b[d, 0].mean()  # own-percentile scaling is not comparable


def test_threshold_hides_small_values() -> None:
    original, cf = lesion_pair()
    cf_faint = cf.copy()
    faint = disk(cx=15.0, cy=45.0, r=6.0)
    cf_faint[faint] -= 0.05
    amap = difference_map(original, cf_faint)
    gray = np.rint(original * 255).astype(np.uint8)
    shown = render_overlay(original, amap, OverlayOptions(scale=0.3))
    hidden = render_overlay(original, amap, OverlayOptions(scale=0.3, threshold=0.1, threshold_mode="absolute"))
    assert not np.array_equal(shown[faint, 0], gray[faint])
    assert np.array_equal(hidden[faint, 0], gray[faint])
    assert np.array_equal(hidden[disk()], shown[disk()])


def test_outline_mode_draws_contour_only() -> None:
    original, cf = lesion_pair()
    amap = difference_map(original, cf)
    out = render_overlay(original, amap, OverlayOptions(mode="outline", threshold=DELTA / 2, threshold_mode="absolute",
                                                        opacity=1.0))
    red = (out[..., 0] == 255) & (out[..., 1] == 0)
    inner = disk(r=RADIUS - 2)
    assert red.sum() > 0 and not red[inner].any() and not red[~disk()].any()
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - CENTRE[0]) < 1 and abs(ys.mean() - CENTRE[1]) < 1


@pytest.mark.parametrize("opacity", [0.05, 0.3, 0.6])
def test_outline_stays_visible_at_low_opacity(opacity) -> None:
    """A thin contour blended at the opacity that suits a filled map fades away (issue 12): it is drawn at least at
    MIN_CONTOUR_OPACITY, and not at all when the overlay is hidden (opacity 0)."""
    original, cf = lesion_pair()
    amap = difference_map(original, cf)
    kw = {"mode": "outline", "threshold": DELTA / 2, "threshold_mode": "absolute"}
    full = render_overlay(original, amap, OverlayOptions(opacity=1.0, **kw))
    out = render_overlay(original, amap, OverlayOptions(opacity=opacity, **kw))
    gray = np.rint(original * 255).astype(np.uint8)
    contour = full[..., 1] != gray  # where the opaque contour changed the image
    assert contour.any()
    a = max(opacity, attr.MIN_CONTOUR_OPACITY)
    expected = np.rint((1 - a) * original[contour] * 255 + a * 255).astype(int)
    assert np.abs(out[contour][:, 0].astype(int) - expected).max() <= 1
    assert attr.MIN_CONTOUR_OPACITY >= 0.8
    assert np.array_equal(render_overlay(original, amap, OverlayOptions(opacity=0.0, **kw))[..., 0], gray)


def test_stability_mode_needs_samples() -> None:
    original, cf = lesion_pair()
    with pytest.raises(ValueError, match="S > 1"):
        render_overlay(original, difference_map(original, cf), OverlayOptions(mode="stability"))
    other = cf.copy()
    other[disk()] += 0.1
    out = render_overlay(original, difference_map(original, np.stack([cf, other])),
                         OverlayOptions(mode="stability", opacity=1.0))
    assert out[int(CENTRE[1]), int(CENTRE[0]), 1] > out[5, 5, 1]  # amber where samples disagree


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opacity": 1.5}, "1.5"),
        ({"opacity": float("nan")}, "opacity"),
        ({"scale": 0.0}, "scale"),
        ({"mode": "heat"}, "'heat'"),
        ({"threshold": 101.0}, "101.0"),
        ({"legend_position": "left"}, "'left'"),
    ],
)
def test_overlay_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    original, cf = lesion_pair()
    with pytest.raises(ValueError, match=message):
        options = {k: v for k, v in kwargs.items() if k != "legend_position"}
        render_overlay(original, difference_map(original, cf), OverlayOptions(**options),  # type: ignore[arg-type]
                       legend_position=str(kwargs.get("legend_position", "right")))


def test_overlay_rejects_shape_mismatch() -> None:
    original, cf = lesion_pair()
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        render_overlay(np.zeros((32, 32), np.float32), difference_map(original, cf))


@pytest.mark.parametrize("mode", ["magnitude", "signed", "outline", "stability"])
def test_legend_adds_columns_or_rows(mode: str) -> None:
    original, cf = lesion_pair()
    amap = difference_map(original, np.stack([cf, np.clip(cf + 0.01, 0, 1)]))
    right = render_overlay(original, amap, OverlayOptions(mode=mode, legend=True))
    assert right.shape[0] == H and right.shape[1] > W and right.dtype == np.uint8
    bottom = render_overlay(original, amap, OverlayOptions(mode=mode, legend=True), legend_position="bottom")
    assert bottom.shape[1] == W and bottom.shape[0] > H
    plain = render_overlay(original, amap, OverlayOptions(mode=mode))
    assert np.array_equal(right[:, :W], plain) and np.array_equal(bottom[:H], plain)


def test_legend_gradient_and_scaling() -> None:
    small, large = render_legend(256, 0.2, "magnitude"), render_legend(1024, 0.2, "magnitude")
    assert small.shape[0] == 256 and large.shape[0] == 1024 and large.shape[1] > small.shape[1]
    column = small[:, 6 + 4]  # inside the bar: red rises towards the top
    reds = column[:, 0].astype(int) - column[:, 1].astype(int)
    assert reds[20] > reds[-20] + 100
    strip = render_legend(300, 0.2, "signed", position="bottom")
    assert strip.shape[1] == 300
    with pytest.raises(ValueError, match="-1"):
        render_legend(256, -1.0, "magnitude")


# ---------------------------------------------------------------------------------------------------------------
# Mask loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_mask_png_resizes_nearest() -> None:
    small = np.zeros((16, 20), np.uint8)
    small[:, 10:] = 255  # right half
    mask = load_mask_png(encode_png(small), (H, W))
    assert mask.dtype == bool and mask.shape == (H, W)
    assert mask[:, W // 2 :].all() and not mask[:, : W // 2].any()


@pytest.mark.parametrize("kind", ["label01", "rgba", "uint16"])
def test_load_mask_png_formats(kind: str) -> None:
    region = np.zeros((H, W), bool)
    region[10:30, 20:60] = True
    if kind == "label01":
        data = encode_png(region.astype(np.uint8))
    elif kind == "rgba":  # white everywhere, opaque only inside the region
        rgba = np.full((H, W, 4), 255, np.uint8)
        rgba[..., 3] = region * 255
        data = encode_png(rgba)
    else:
        data = encode_png((region * 65535).astype(np.uint16))
    assert np.array_equal(load_mask_png(data, (H, W)), region)


def test_load_mask_png_rejects_garbage_and_empty() -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        load_mask_png(b"not a png", (H, W))
    with pytest.raises(ValueError, match="mask is empty"):
        load_mask_png(encode_png(np.zeros((8, 8), np.uint8)), (H, W))


# ---------------------------------------------------------------------------------------------------------------
# Annotated export and text
# ---------------------------------------------------------------------------------------------------------------


def test_annotated_export_has_banner_panels_and_params() -> None:
    original, cf = lesion_pair()
    overlay = render_overlay(original, difference_map(original, cf), OverlayOptions(legend=True))
    params = {"model": "vald-md-default", "seed": "1234", "steps": "50", "sha256": "ab" * 32}
    img = render_annotated_export(original, overlay, params=params, title="Case 1")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width > W + overlay.shape[1] and img.height > H + 4 * len(params)
    pixels = np.asarray(img)
    banner_colour = np.all(pixels == palette.BANNER_BACKGROUND, axis=-1)
    assert banner_colour[0].all()  # the banner spans the full width at the top
    banner_rows = np.flatnonzero(banner_colour.mean(axis=1) > 0.5)
    band = pixels[: banner_rows.max() + 1]
    text_pixels = np.all(band < 100, axis=-1)  # dark text on the amber band
    assert text_pixels.sum() > 50
    # both panels are pasted unchanged
    assert any(
        np.array_equal(pixels[y : y + H, x : x + overlay.shape[1]], overlay) for y, x in _candidates(pixels, overlay)
    )
    # the parameter block sits below the images
    assert (pixels[-(3 * 12) :] > 150).any()
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def _candidates(pixels: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    ys, xs = np.nonzero(np.all(pixels == patch[0, 0], axis=-1))
    return [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)][:200]


def test_export_text_scales_with_image_size() -> None:
    def banner_ink_height(size: int) -> int:
        """Height in pixels of the first line of dark banner text."""
        original = np.full((size, size), 0.5, np.float32)
        overlay = np.repeat((original[..., None] * 255).astype(np.uint8), 3, axis=2)
        pixels = np.asarray(render_annotated_export(original, overlay, params={"seed": "1"}, title="t"))
        in_banner = np.all(pixels[:, 0] == palette.BANNER_BACKGROUND, axis=-1)
        band = pixels[: np.flatnonzero(in_banner).max() + 1]
        rows = np.flatnonzero(np.all(band < 100, axis=-1).any(axis=1))
        first_line = rows[: np.argmax(np.diff(np.append(rows, rows[-1] + 99)) > 1) + 1]
        return int(first_line[-1] - first_line[0] + 1)

    small, large = banner_ink_height(128), banner_ink_height(1024)
    assert large >= 20  # ~31 px type at 1024 px images
    assert large >= 1.8 * small


def test_export_rejects_mismatched_overlay() -> None:
    with pytest.raises(ValueError, match="uint8"):
        render_annotated_export(np.zeros((H, W), np.float32), np.zeros((H, W, 3)), params={}, title="t")
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        render_annotated_export(np.zeros((32, 32), np.float32), np.zeros((H, W, 3), np.uint8), params={}, title="t")


@pytest.mark.parametrize("font_source", ["builtin", "preferred"])
def test_em_dash_renders_as_a_dash(font_source: str) -> None:
    """The banner's em dash must be a long rule, not a .notdef box or a hyphen, whatever font is found."""
    font = ImageFont.load_default(size=24) if font_source == "builtin" else fonts.load_font(24)
    em = fonts.text_image("—", font, (255, 255, 255), (0, 0, 0))
    ink = np.asarray(em)[..., 0] > 128
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    assert rows.size and rows.size <= 4  # a thin horizontal rule, not a box
    assert cols.size >= 0.6 * 24  # at least ~ an em wide
    hyphen = np.asarray(fonts.text_image("-", font, (255, 255, 255), (0, 0, 0)))[..., 0] > 128
    assert cols.size > 1.5 * np.flatnonzero(hyphen.any(axis=0)).size


def test_resolve_threshold_puts_the_threshold_in_the_maps_units() -> None:
    """A "normal" threshold is an x-fold of the normal level; a calibrated outline defaults to 1x; else as given."""
    fold = OverlayOptions(threshold=1.5, threshold_mode=attr.THRESHOLD_NORMAL)
    assert attr.resolve_threshold(fold, 0.1) == pytest.approx((0.15, "absolute"))
    assert attr.resolve_threshold(OverlayOptions(threshold_mode="normal"), 0.1) == (None, "percentile")
    outline = OverlayOptions(mode="outline", threshold_mode="normal")
    assert attr.resolve_threshold(outline, 0.1) == pytest.approx((0.1, "absolute"))
    assert attr.resolve_threshold(OverlayOptions(mode="outline"), None) == (None, "percentile")
    assert attr.resolve_threshold(OverlayOptions(threshold=90), 0.1) == (90, "percentile")
    with pytest.raises(ValueError, match="calibrated"):
        attr.resolve_threshold(fold, None)
    with pytest.raises(ValueError, match="'fold'"):
        attr.resolve_threshold(OverlayOptions(threshold_mode="fold"), 0.1)
    # render_overlay takes the same value: a "normal" threshold draws as its absolute equivalent
    original, cf = lesion_pair()
    amap = difference_map(original, cf)
    absolute = OverlayOptions(threshold=0.15, threshold_mode="absolute")
    assert np.array_equal(render_overlay(original, amap, fold, normal_level=0.1),
                          render_overlay(original, amap, absolute, normal_level=0.1))


def test_wrap_splits_long_words() -> None:
    font = fonts.load_font(12)
    lines = fonts.wrap_text("sha256: " + "f" * 200, font, 150)
    assert len(lines) > 2 and all(fonts.text_width(line, font) <= 150 for line in lines)
    assert "".join(lines[1:]) == "f" * 200 or "".join(lines).replace(" ", "").endswith("f" * 200)


def test_attribution_map_region_mask() -> None:
    amap = AttributionMap(
        signed=np.zeros((4, 5), np.float32), magnitude=np.zeros((4, 5), np.float32), std=None, n_samples=1, mask=None
    )
    assert amap.shape == (4, 5) and amap.region_mask().all()
    assert BANNER_TEXT.startswith("AI-generated counterfactual")


# ---------------------------------------------------------------------------------------------------------------
# region outlines (the lung mask drawn over an image)
# ---------------------------------------------------------------------------------------------------------------


def test_mask_outline_is_the_inner_boundary() -> None:
    region = disk()
    edge = attr.mask_outline(region, width=1)
    assert edge.any() and not (edge & ~region).any(), "the outline lies inside the region"
    assert not edge[int(CENTRE[1]), int(CENTRE[0])], "the interior is not outlined"
    assert attr.mask_outline(region, width=3).sum() > edge.sum()
    assert not attr.mask_outline(np.zeros((H, W), bool)).any()
    full = attr.mask_outline(np.ones((H, W), bool), width=1)
    assert full[0].all() and full[:, -1].all() and not full[1:-1, 1:-1].any(), "the image border closes a region"
    assert attr.mask_outline(np.ones((1024, 512), bool)).sum(axis=0)[256] == 2 * 4, "width max(H, W) / 256"


def test_outline_layer_and_painted_outline() -> None:
    region = disk()
    rgba = attr.render_mask_outline_rgba(region)
    assert rgba.shape == (H, W, 4) and rgba.dtype == np.uint8
    edge = attr.mask_outline(region)
    assert (rgba[edge] == (*attr.OUTLINE_COLOUR, 255)).all() and (rgba[~edge] == 0).all()
    original, counterfactual = lesion_pair()
    overlay = render_overlay(original, difference_map(original, counterfactual), OverlayOptions(legend=True))
    painted = attr.draw_mask_outline(overlay, region)
    assert painted.shape == overlay.shape
    assert (painted[:, :W][edge] == attr.OUTLINE_COLOUR).all()
    np.testing.assert_array_equal(painted[:, :W][~edge], overlay[:, :W][~edge])
    np.testing.assert_array_equal(painted[:, W:], overlay[:, W:])  # the legend is untouched
    with pytest.raises(ValueError, match="at least as large"):
        attr.draw_mask_outline(overlay[:10], region)


# ---------------------------------------------------------------------------------------------------------------
# the absolute (calibrated) scale and the map's label
# ---------------------------------------------------------------------------------------------------------------


def test_calibrated_scale_renders_maps_of_different_magnitude_differently() -> None:
    # two maps of the same shape, one twice as strong: the per-image scale draws them alike, the calibrated one not
    counterfactual = background(seed=3)
    weak, strong = counterfactual.copy(), counterfactual.copy()
    weak[disk()] += 0.1
    strong[disk()] += 0.2
    map_weak, map_strong = difference_map(weak, counterfactual), difference_map(strong, counterfactual)
    d = disk()
    opaque = OverlayOptions(opacity=1.0)
    own_weak, own_strong = render_overlay(weak, map_weak, opaque), render_overlay(strong, map_strong, opaque)
    assert abs(own_weak[d, 0].astype(int) - own_strong[d, 0].astype(int)).max() <= 1  # relative: alike
    level = 0.1  # the normal level: the weak change is 1x, the strong one 2x (full colour)
    cal_weak = render_overlay(weak, map_weak, OverlayOptions(opacity=1.0), normal_level=level).astype(int)
    cal_strong = render_overlay(strong, map_strong, OverlayOptions(opacity=1.0), normal_level=level).astype(int)
    assert (cal_strong[d, 0] - cal_strong[d, 1]).mean() > (cal_weak[d, 0] - cal_weak[d, 1]).mean() + 60
    assert cal_strong[d, 1].max() == 0  # 2x normal = FULL_SCALE_FOLD: pure red at opacity 1
    # and the legend says which scale it is: fold labels differ from per-image intensity labels
    assert not np.array_equal(render_legend(256, 0.2, "magnitude", unit=0.1),
                              render_legend(256, 0.2, "magnitude", relative=True))


def test_measure_normals_and_the_scaled_summary() -> None:
    from app import mapscale

    rng = np.random.default_rng(0)
    maps = [rng.normal(0.0, 0.05, (H, W)).astype(np.float32) for _ in range(4)]
    masks = [disk(r=20.0)] * 4
    stats = mapscale.measure_normals(maps, masks)
    pooled = np.abs(np.concatenate([m[k] for m, k in zip(maps, masks, strict=True)]))
    assert stats["level"] == pytest.approx(np.percentile(pooled, 99))
    assert stats["n_images"] == 4 and stats["rms"] == pytest.approx(np.sqrt(np.mean(pooled**2)))
    cal = mapscale.MapCalibration(level=stats["level"], rms=stats["rms"], n_images=4,
                                  preset={"strength": 0.3}, map_method="sdedit", reference="input")
    # a normal-like map: about 1 % above 1x; the same map doubled: far more, and twice the energy
    normal = AttributionMap(signed=maps[0], magnitude=np.abs(maps[0]), std=None, n_samples=1, mask=masks[0])
    doubled = AttributionMap(signed=2 * maps[0], magnitude=2 * np.abs(maps[0]), std=None, n_samples=1,
                             mask=masks[0])
    s1 = mapscale.summarize_scaled(normal, cal, parameters={"strength": 0.3})
    s2 = mapscale.summarize_scaled(doubled, cal, parameters={"strength": 0.5})
    assert s1["scale"]["kind"] == "calibrated" and s1["threshold_fold"] == 1.0
    assert s1["changed_area_fraction"] < 0.03 < 0.15 < s2["changed_area_fraction"]
    assert s2["rms_vs_normal"] == pytest.approx(2 * s1["rms_vs_normal"], rel=1e-6)
    assert s1["scale"]["preset_matches"] is True and s2["scale"]["preset_matches"] is False
    # the threshold (x-fold) changes the area, unlike the per-image percentile
    higher = mapscale.summarize_scaled(doubled, cal, threshold_fold=2.0)
    assert higher["changed_area_fraction"] < s2["changed_area_fraction"]
    relative = mapscale.summarize_scaled(normal, None, reason="no calibration")
    assert relative["scale"]["kind"] == "relative"
    assert relative["changed_area_fraction"] == pytest.approx(0.05, abs=0.01)  # by construction
    # a record round-trips the calibration; a relative record has none
    assert mapscale.scale_from_record({"map_summary": s2}).level == cal.level  # type: ignore[union-attr]
    assert mapscale.scale_from_record({"map_summary": relative}) is None
    assert mapscale.calibration_for_run(cal, map_method="ddim_inversion", reference="input")[0] is None
    assert mapscale.calibration_for_run(cal, map_method="sdedit", reference="input")[0] is cal
    # the mean over several samples is smaller by construction: not on the single-sample scale
    off, why = mapscale.calibration_for_run(cal, map_method="sdedit", reference="input", samples=4)
    assert off is None and "single-sample" in why
    with pytest.raises(ValueError, match="positive"):
        mapscale.MapCalibration(level=0.0)


@pytest.mark.parametrize(("reference", "method", "label"), [
    ("input", "sdedit", "original − counterfactual"),
    ("reconstruction", "sdedit", "autoencoder reconstruction − counterfactual"),
    ("reconstruction", "classifier_guided", "autoencoder reconstruction − counterfactual"),
    ("reconstruction", "ddim_inversion", "DDIM reconstruction − counterfactual"),
    (None, None, "original − counterfactual"),
])
def test_map_label_follows_the_reference(reference, method, label) -> None:
    assert attr.map_label(reference, method) == label
    record = RunRecord.from_dict({"request": {"reference": reference}, "map_method": method})
    assert record.label == label


# ----------------------------------------------------------------------------------------------------------------
# issue 16: the map's polarity (only the density the counterfactual removed)
# ----------------------------------------------------------------------------------------------------------------
def test_polarity_both_is_the_signed_map_and_removed_its_positive_part() -> None:
    from app.attribution import MAP_POLARITIES

    rng = np.random.default_rng(3)
    ref = rng.random((H, W)).astype(np.float32)
    cfs = np.clip(ref[None] + rng.normal(0.0, 0.1, (3, H, W)), 0, 1).astype(np.float32)
    for sigma in (0.0, 1.5):
        old = difference_map(ref, cfs, smoothing_sigma=sigma, mask=disk())
        both = difference_map(ref, cfs, smoothing_sigma=sigma, mask=disk(), polarity="both")
        removed = difference_map(ref, cfs, smoothing_sigma=sigma, mask=disk(), polarity="removed")
        for got in (both.signed, both.magnitude, both.std):
            assert got is not None and got.dtype == np.float32
        assert both.signed.tobytes() == old.signed.tobytes() and both.magnitude.tobytes() == old.magnitude.tobytes()
        assert (old.signed < 0).any() and (old.signed > 0).any()
        # clipped after the mean over samples and after the smoothing; the SD map is the per-sample one as before
        assert np.array_equal(removed.signed, np.maximum(old.signed, 0)) and removed.signed.min() == 0.0
        assert np.array_equal(removed.magnitude, removed.signed)
        assert removed.std is not None and old.std is not None and np.array_equal(removed.std, old.std)
        assert removed.n_samples == 3 and np.array_equal(removed.region_mask(), old.region_mask())
    assert MAP_POLARITIES == ("both", "removed")
    with pytest.raises(ValueError, match="polarity must be one of"):
        difference_map(ref, cfs, polarity="positive")


def test_the_signed_overlay_of_a_removed_map_is_red_only() -> None:
    ref = disk().astype(np.float32) * 0.6 + 0.2
    cf = np.full((H, W), 0.5, dtype=np.float32)
    both = difference_map(ref, cf)
    removed = difference_map(ref, cf, polarity="removed")
    opts = OverlayOptions(mode="signed", opacity=1.0)
    drawn_both = render_overlay(ref, both, opts).astype(int)
    drawn = render_overlay(ref, removed, opts, label=attr.map_label("input", "sdedit", "removed")).astype(int)
    blue = drawn_both[..., 2] - drawn_both[..., 0] > 40
    assert blue.any() and not (drawn[..., 2] - drawn[..., 0] > 40).any()
    red = drawn[..., 0] - drawn[..., 2] > 40
    assert red[disk()].mean() > 0.5 and not red[~disk()].any()  # outside the disk the map is negative: clipped


@pytest.mark.parametrize(("reference", "method", "polarity", "label"), [
    ("reconstruction", "sdedit", "removed", "max(autoencoder reconstruction − counterfactual, 0): density removed"),
    ("input", "sdedit", "removed", "max(original − counterfactual, 0): density removed"),
    ("reconstruction", "ddim_inversion", "removed", "max(DDIM reconstruction − counterfactual, 0): density removed"),
    ("reconstruction", "sdedit", "both", "autoencoder reconstruction − counterfactual"),
    ("reconstruction", "sdedit", None, "autoencoder reconstruction − counterfactual"),
])
def test_map_label_names_the_polarity(reference, method, polarity, label) -> None:
    from app.rendering import map_label_of_record

    assert attr.map_label(reference, method, polarity) == label
    request = {"reference": reference} if polarity is None else {"reference": reference, "map_polarity": polarity}
    record = {"request": request, "map_method": method}
    assert RunRecord.from_dict(record).label == label == map_label_of_record(record)
    assert RunRecord.from_dict(record).polarity == (polarity or "both")
    with pytest.raises(ValueError, match="polarity"):
        attr.map_label(reference, method, "positive")


def test_a_calibration_holds_for_its_own_samples_and_polarity() -> None:
    from app import mapscale

    old = mapscale.MapCalibration.from_manifest({"map_scale": {"level": 0.1, "map_method": "sdedit",
                                                                "reference": "reconstruction"}})
    assert old is not None and old.samples == 1 and old.polarity == "both"
    entry = {**old.to_manifest(), "samples": 4, "polarity": "removed"}
    cal = mapscale.MapCalibration.from_manifest({"map_scale": entry})
    assert cal is not None and cal.samples == 4 and cal.polarity == "removed"
    assert cal.to_manifest()["samples"] == 4 and cal.to_manifest()["polarity"] == "removed"
    run = {"map_method": "sdedit", "reference": "reconstruction"}
    assert mapscale.calibration_for_run(cal, **run, samples=4, polarity="removed") == (cal, "")
    off, why = mapscale.calibration_for_run(cal, **run, samples=1, polarity="removed")
    assert off is None and "averaged over 4 samples" in why and "a single sample" in why
    off, why = mapscale.calibration_for_run(cal, **run, samples=4, polarity="both")
    assert off is None and "'removed'" in why and "'both'" in why
    assert mapscale.calibration_for_run(old, **run)[0] is old  # an old calibration: single samples, both signs
    assert mapscale.calibration_for_run(old, **run, polarity="removed")[0] is None
    # the record's scale names samples and polarity (only where they are not the old 1 / both) and reads back
    signed = np.abs(np.random.default_rng(0).normal(0, 0.05, (H, W))).astype(np.float32)
    amap = AttributionMap(signed=signed, magnitude=signed, std=None, n_samples=4, mask=None)
    scale = mapscale.summarize_scaled(amap, cal)["scale"]
    assert scale["samples"] == 4 and scale["polarity"] == "removed"
    back = mapscale.scale_from_record({"map_summary": {"scale": scale}})
    assert back is not None and back.samples == 4 and back.polarity == "removed"
    assert not {"samples", "polarity"} & set(mapscale.summarize_scaled(amap, old)["scale"])
    with pytest.raises(ValueError, match="polarity"):
        mapscale.MapCalibration(level=0.1, polarity="positive")
    with pytest.raises(ValueError, match="samples"):
        mapscale.MapCalibration(level=0.1, samples=0)


def test_a_calibration_holds_for_its_own_map_smoothing() -> None:
    """Issue 16, map smoothing: stored under the manifest's (and the record's) key ``map_smoothing``, absent = 0."""
    from app import mapscale

    old = mapscale.MapCalibration.from_manifest({"map_scale": {"level": 0.1}})
    assert old is not None and old.smoothing == 0.0 and old.to_manifest()["map_smoothing"] == 0.0
    cal = mapscale.MapCalibration.from_manifest({"map_scale": {**old.to_manifest(), "map_smoothing": 4}})
    assert cal is not None and cal.smoothing == 4.0 and "smoothing" not in cal.to_manifest()
    assert mapscale.MapCalibration.from_manifest({"map_scale": cal.to_manifest()}) == cal
    run = {"map_method": "sdedit", "reference": "reconstruction"}
    assert mapscale.calibration_for_run(cal, **run, map_smoothing=4.0) == (cal, "")
    off, why = mapscale.calibration_for_run(cal, **run)
    assert off is None and "by sigma 4 model pixels, not on unsmoothed maps" in why
    off, why = mapscale.calibration_for_run(old, **run, map_smoothing=2.5)
    assert off is None and "on unsmoothed maps, not on maps smoothed by sigma 2.5 model" in why
    assert mapscale.calibration_for_run(old, **run, map_smoothing=0.0)[0] is old
    signed = np.abs(np.random.default_rng(1).normal(0, 0.05, (H, W))).astype(np.float32)
    amap = AttributionMap(signed=signed, magnitude=signed, std=None, n_samples=1, mask=None)
    scale = mapscale.summarize_scaled(amap, cal)["scale"]
    assert scale["map_smoothing"] == 4.0
    back = mapscale.scale_from_record({"map_summary": {"scale": scale}})
    assert back is not None and back.smoothing == 4.0
    assert "map_smoothing" not in mapscale.summarize_scaled(amap, old)["scale"]  # old records' scale unchanged
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="map_smoothing"):
            mapscale.MapCalibration(level=0.1, smoothing=bad)
