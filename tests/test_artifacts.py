"""One review run end to end (``app.runs.review.run_review``) on the tiny in-code model, with and without the lung mask.

The lung segmenters are built in code (``tests/tiny_lungs.py``): a tiny random-weight ``LungUNet`` folder, whose
provenance and hash a record must carry, and a subclass whose lung field is known (two boxes), so that "nothing
outside the lungs" can be checked pixel by pixel.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app import imaging
from app.fileio import sha256_bytes as sha256
from app.lungs import LungSegmenter, folder_hash
from app.rendering import OverlayOptions
from app.runs import exports
from app.runs.record import RunRecord
from app.runs.review import ReviewRequest, lung_region, run_review
from tests.factories import png_bytes
from tests.tiny_lungs import DICE, BoxSegmenter, box_lungs, write_tiny_segmenter

H, W = 40, 36
FAST: dict[str, Any] = {"strength": 0.5, "steps": 4, "guidance_scale": 5.0, "seed": 11}


class EmptySegmenter(LungSegmenter):
    """Finds no lung at all (e.g. an image that is not a chest radiograph)."""

    def probability(self, image: Any) -> np.ndarray:
        return np.zeros(np.asarray(image).shape, dtype=np.float32)


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_segmenter(tmp_path_factory.mktemp("segmenter") / "tiny-lungs")


@pytest.fixture(scope="module")
def box_segmenter(segmenter_dir: Path) -> BoxSegmenter:
    return BoxSegmenter(segmenter_dir)


def run(engine: Any, out: Path, *, segmenter: LungSegmenter | None = None, mask: np.ndarray | None = None,
        **req: Any) -> RunRecord:
    return run_review(engine, png_bytes(), ReviewRequest(**{**FAST, **req}), out, mask=mask, segmenter=segmenter)


def rgb_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def lung_run(tiny_engine, box_segmenter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lungs"
    run(tiny_engine, out, segmenter=box_segmenter)
    return out


@pytest.fixture(scope="module")
def plain_run(tiny_engine, box_segmenter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "plain"
    run(tiny_engine, out, segmenter=box_segmenter, lung_mask=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# lung mask on (the default)
# ----------------------------------------------------------------------------------------------------------------
def test_lung_mask_png_is_0_255_at_native_size(lung_run):
    with Image.open(lung_run / "lung_mask.png") as im:
        assert im.mode == "L" and im.size == (W, H)
        arr = np.asarray(im)
    assert set(np.unique(arr)) == {0, 255}
    np.testing.assert_array_equal(arr == 255, box_lungs((H, W)))


def test_record_carries_the_segmenter_provenance_and_the_flag(lung_run, segmenter_dir):
    record = json.loads((lung_run / "record.json").read_text())
    assert record["request"]["lung_mask"] is True and record["request"]["mask"] is False
    assert record["map_region"] == "lungs"
    lung = record["lung_mask"]
    assert lung["applied"] is True
    assert lung["sha256"] == folder_hash(segmenter_dir) and len(lung["sha256"]) == 64
    assert lung["name"] == "tiny-lungs" and lung["size"] == 32 and lung["threshold"] == 0.5
    assert lung["dice"] == DICE
    assert lung["lung_fraction"] == pytest.approx(box_lungs((H, W)).mean(), abs=1e-6)
    assert record["artifacts_sha256"]["lung_mask.png"] == sha256((lung_run / "lung_mask.png").read_bytes())
    assert record["map_summary"]["mask_area_px"] == int(box_lungs((H, W)).sum())


def test_map_is_zero_outside_the_lungs(lung_run, plain_run):
    """Nothing is drawn outside the lung field: overlay.png is the gray input there (R = G = B), and so is every
    re-rendered overlay (the page's overlay.png, the annotated export) whatever the display options."""
    outside = ~box_lungs((H, W))
    overlay = rgb_png(lung_run / "overlay.png")
    assert (overlay[outside, 0] == overlay[outside, 1]).all() and (overlay[outside, 1] == overlay[outside, 2]).all()
    inside = box_lungs((H, W))
    assert (overlay[inside, 0] > overlay[inside, 1]).any(), "the map is drawn inside the lungs"
    # the same seed without the lung mask: an unrestricted map, coloured outside the lungs as well
    free = rgb_png(plain_run / "overlay.png")
    assert (free[outside, 0] > free[outside, 1]).any()
    # attribution.npy keeps full-frame values (as with a user mask); what is shown and summarised is restricted
    np.testing.assert_array_equal(np.load(lung_run / "attribution.npy"), np.load(plain_run / "attribution.npy"))
    for options in ({}, {"mode": "signed", "opacity": 1.0}, {"mode": "outline", "threshold": 50.0}):
        png = exports.export_annotated_png(lung_run, OverlayOptions(**options))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from app.runs.read import open_run, read_map  # the export re-renders with the lung mask as the region

    _, amap = read_map(open_run(lung_run))
    assert amap.mask is not None and np.array_equal(amap.mask, inside)


def test_annotated_export_draws_the_lung_outline_on_request(lung_run, plain_run):
    plain = exports.export_annotated_png(lung_run)
    outlined = exports.export_annotated_png(lung_run, OverlayOptions(lung_outline=True))
    assert outlined != plain
    text = Image.open(io.BytesIO(outlined)).text  # type: ignore[attr-defined]
    assert json.loads(text["vald_md:overlay"])["lung_outline"] is True
    assert text["vald_md:map_region"] == "lungs"
    green = np.asarray(Image.open(io.BytesIO(outlined)).convert("RGB")).reshape(-1, 3)
    assert ((green == (0, 230, 118)).all(axis=1)).sum() > 0
    with pytest.raises(exports.ExportError, match="no lung mask"):
        exports.export_annotated_png(plain_run, OverlayOptions(lung_outline=True))


def test_bundle_carries_the_lung_mask(lung_run):
    import zipfile

    content, _ = exports.build_export(lung_run, "bundle.zip")
    names = zipfile.ZipFile(io.BytesIO(content)).namelist()
    assert "lung_mask.png" in names and names.index("lung_mask.png") < names.index("record.json")


# ----------------------------------------------------------------------------------------------------------------
# lung mask off, no segmenter, a user mask, nothing found
# ----------------------------------------------------------------------------------------------------------------
def test_lung_mask_off_gives_an_unrestricted_map(plain_run):
    assert not (plain_run / "lung_mask.png").exists()
    record = json.loads((plain_run / "record.json").read_text())
    assert record["request"]["lung_mask"] is False
    assert record["map_region"] == "whole_image"
    assert record["lung_mask"] == {"applied": False, "reason": "switched off (lung_mask=false)"}
    assert "lung_mask.png" not in record["artifacts_sha256"]
    assert record["map_summary"]["mask_area_px"] == H * W


def test_missing_segmenter_does_not_fail_the_run(tiny_engine, tmp_path):
    record = run(tiny_engine, tmp_path / "run", segmenter=None)
    assert not (tmp_path / "run" / "lung_mask.png").exists()
    assert record.request["lung_mask"] is True and record.map_region == "whole_image"
    assert record.lung_mask["applied"] is False and "no lung segmenter" in record.lung_mask["reason"]
    assert json.loads((tmp_path / "run" / "record.json").read_text())["lung_mask"] == record.lung_mask


def test_user_mask_wins_over_the_lungs(tiny_engine, box_segmenter, tmp_path):
    user = np.zeros((H, W), dtype=bool)
    user[5:15, 5:30] = True
    record = run(tiny_engine, tmp_path / "run", segmenter=box_segmenter, mask=user)
    assert (tmp_path / "run" / "mask.png").exists() and not (tmp_path / "run" / "lung_mask.png").exists()
    assert record.map_region == "user_mask" and record.request["mask"] is True
    assert record.lung_mask["applied"] is False and "user-supplied" in record.lung_mask["reason"]
    assert record.map_summary["mask_area_px"] == int(user.sum())


def test_no_lung_found_leaves_the_map_unrestricted(segmenter_dir):
    pixels = imaging.decode_image(png_bytes()).pixels
    mask, rec = lung_region(EmptySegmenter(segmenter_dir), pixels, requested=True, user_mask=False)
    assert mask is None and rec["applied"] is False and "no lung field" in rec["reason"]
    assert rec["sha256"] == folder_hash(segmenter_dir)


def test_random_weight_segmenter_runs_at_native_size(segmenter_dir):
    """The real inference path (resize, U-Net, resize back, clean) on an image of odd size: a bool mask of the
    image's shape, applied or explained."""
    pixels = imaging.decode_image(png_bytes(57, 43, seed=3)).pixels
    mask, rec = lung_region(LungSegmenter(segmenter_dir), pixels, requested=True, user_mask=False)
    if rec["applied"]:
        assert mask is not None and mask.shape == (57, 43) and mask.dtype == bool
        assert 0 < rec["lung_fraction"] <= 1
    else:
        assert mask is None and rec["reason"]


def test_segmentation_failure_is_recorded_not_raised(segmenter_dir):
    class Broken(LungSegmenter):
        def probability(self, image: Any) -> np.ndarray:
            raise ValueError("image must be at least 8 x 8 pixels")

    mask, rec = lung_region(Broken(segmenter_dir), np.zeros((4, 4), np.float32), requested=True, user_mask=False)
    assert mask is None and rec == {"applied": False, "reason": "lung segmentation failed: image must be at least "
                                                                 "8 x 8 pixels"}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def test_cli_counterfactual_has_no_lung_mask_flag():
    from app.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["counterfactual", "x.png", "--out", "o"]).lung_mask is True
    args = parser.parse_args(["counterfactual", "x.png", "--out", "o", "--no-lung-mask"])
    assert args.lung_mask is False


def test_cli_counterfactual_writes_the_lung_mask(tiny_engine, segmenter_dir, tmp_path, monkeypatch):
    from app import cli, lungs

    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: tiny_engine)
    monkeypatch.setattr(lungs, "LungSegmenter", BoxSegmenter)
    src = tmp_path / "scan.png"
    src.write_bytes(png_bytes())
    common = ["counterfactual", str(src), "--steps", "4", "--strength", "0.5", "--lung-segmenter", str(segmenter_dir)]
    assert cli.main([*common, "--out", str(tmp_path / "on")]) == 0
    assert (tmp_path / "on" / "0000" / "lung_mask.png").exists()
    assert cli.main([*common, "--out", str(tmp_path / "off"), "--no-lung-mask"]) == 0
    assert not (tmp_path / "off" / "0000" / "lung_mask.png").exists()
    rec = json.loads((tmp_path / "off" / "0000" / "record.json").read_text())
    assert rec["request"]["lung_mask"] is False
    assert cli.main([*common[:-1], str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------------------------------------------
# map methods: sdedit (the paper's, the default) and classifier_guided (a tiny lesion classifier built in code)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from app.lesions import LesionNet, save_classifier

    folder = tmp_path_factory.mktemp("classifier") / "tiny-lesions"
    torch.manual_seed(0)
    save_classifier(folder, LesionNet((4, 8)), size=16, name="tiny", metrics={}, training={})
    return folder


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path):
    from app.lesions import LesionClassifier

    return LesionClassifier(classifier_dir)


def guided(engine: Any, out: Path, *, classifier: Any, segmenter: LungSegmenter | None, **req: Any) -> RunRecord:
    request = ReviewRequest(**{**FAST, "map_method": "classifier_guided", **req})
    return run_review(engine, png_bytes(), request, out, segmenter=segmenter, classifier=classifier)


@pytest.fixture(scope="module")
def guided_run(tiny_engine, box_segmenter, classifier, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "guided"
    guided(tiny_engine, out, classifier=classifier, segmenter=box_segmenter)
    return out


def test_classifier_guided_writes_the_same_artifacts_at_native_size(guided_run, lung_run, classifier_dir):
    from app.lesions import folder_hash as classifier_hash

    assert {p.name for p in guided_run.iterdir()} == {p.name for p in lung_run.iterdir()}
    with Image.open(guided_run / "counterfactual.png") as im:
        assert im.size == (W, H)
    assert np.load(guided_run / "attribution.npy").shape == (H, W)
    record = json.loads((guided_run / "record.json").read_text())
    assert record["map_method"] == "classifier_guided" and record["request"]["map_method"] == "classifier_guided"
    assert record["classifier"]["sha256"] == classifier_hash(classifier_dir) and record["classifier"]["name"] == "tiny"
    assert record["classifier_scale"] == 0.3
    assert np.isfinite(record["logit_input"]) and np.isfinite(record["logit_counterfactual"])
    assert record["parameters"]["scheduler"] == "ddim" and record["seeds"] == [FAST["seed"]]
    # the record's parameters as the model-frame methods always wrote them (one DDIM sample, no negative prompt)
    assert record["parameters"] == {"prompt": ReviewRequest().prompt, "negative_prompt": "", "strength": 0.5,
                                    "guidance_scale": 5.0, "steps": 4, "seed": 11, "scheduler": "ddim", "samples": 1,
                                    "classifier_scale": 0.3}
    assert list(record["parameters"]) == ["prompt", "negative_prompt", "strength", "guidance_scale", "steps", "seed",
                                          "scheduler", "samples", "classifier_scale"]
    assert record["map_region"] == "lungs"
    for name, digest in record["artifacts_sha256"].items():
        assert sha256((guided_run / name).read_bytes()) == digest


def test_classifier_guided_is_reproducible(tiny_engine, box_segmenter, classifier, guided_run, tmp_path):
    guided(tiny_engine, tmp_path / "again", classifier=classifier, segmenter=box_segmenter)
    assert np.array_equal(np.load(tmp_path / "again" / "attribution.npy"), np.load(guided_run / "attribution.npy"))


def test_classifier_guided_refusals(tiny_engine, box_segmenter, classifier, tmp_path):
    with pytest.raises(ValueError, match=r"samples=2.*one counterfactual"):
        guided(tiny_engine, tmp_path / "a", classifier=classifier, segmenter=box_segmenter, samples=2)
    with pytest.raises(ValueError, match="no lesion classifier is loaded"):
        guided(tiny_engine, tmp_path / "b", classifier=None, segmenter=box_segmenter)
    with pytest.raises(ValueError, match="needs the lung segmenter"):
        guided(tiny_engine, tmp_path / "c", classifier=classifier, segmenter=None)
    with pytest.raises(ValueError, match="classifier_scale=9"):
        guided(tiny_engine, tmp_path / "d", classifier=classifier, segmenter=box_segmenter, classifier_scale=9)
    with pytest.raises(ValueError, match="is not a map method"):
        run(tiny_engine, tmp_path / "e", map_method="gradcam")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_ddim_inversion_run_maps_against_its_own_reconstruction(tiny_engine, box_segmenter, lung_run, tmp_path):
    """The DDIM-inversion method writes the same artifacts; its map is reconstruction - counterfactual, both from
    the same inverted latent; it is deterministic (the seed does not matter) and refuses what it cannot honour."""
    record = run(tiny_engine, tmp_path / "inv", segmenter=box_segmenter, map_method="ddim_inversion")
    assert {p.name for p in (tmp_path / "inv").iterdir()} == {p.name for p in lung_run.iterdir()}
    assert record.map_method == "ddim_inversion" and record.request["reference"] == "reconstruction"
    assert record.parameters.scheduler == "ddim" and record.map_region == "lungs"
    again = run(tiny_engine, tmp_path / "again", segmenter=box_segmenter, map_method="ddim_inversion", seed=99)
    signed = np.load(tmp_path / "inv" / "attribution.npy")
    assert np.array_equal(signed, np.load(tmp_path / "again" / "attribution.npy")) and again.seeds == [99]
    rec = imaging.decode_image((tmp_path / "inv" / "reconstruction.png").read_bytes()).pixels
    cf = imaging.decode_image((tmp_path / "inv" / "counterfactual.png").read_bytes()).pixels
    lungs = imaging.decode_image((tmp_path / "inv" / "lung_mask.png").read_bytes()).pixels > 0.5
    np.testing.assert_allclose(signed[lungs], (rec - cf)[lungs], atol=2e-4)  # 16-bit PNG rounding
    for bad, message in [({"samples": 2}, "samples=2.*one counterfactual"),
                         ({"negative_prompt": "blurry"}, "uses no negative prompt"),
                         ({"reference": "input"}, "against its own reconstruction")]:
        with pytest.raises(ValueError, match=message):
            run(tiny_engine, tmp_path / "bad", segmenter=box_segmenter, map_method="ddim_inversion", **bad)
    assert not (tmp_path / "bad").exists()


def test_sdedit_is_the_default_and_unchanged(lung_run, tiny_engine, box_segmenter, tmp_path):
    record = json.loads((lung_run / "record.json").read_text())
    assert record["map_method"] == "sdedit" and "classifier" not in record
    run(tiny_engine, tmp_path / "explicit", segmenter=box_segmenter, map_method="sdedit")
    assert np.array_equal(np.load(tmp_path / "explicit" / "attribution.npy"), np.load(lung_run / "attribution.npy"))


def test_default_map_method_follows_the_manifest(tiny_engine, box_segmenter, classifier, tmp_path, monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_method", "classifier_guided")
    record = run_review(tiny_engine, png_bytes(), ReviewRequest(**FAST), tmp_path / "run", segmenter=box_segmenter,
                        classifier=classifier)
    assert record.map_method == "classifier_guided" and record.request["map_method"] == "classifier_guided"
    with pytest.raises(ValueError, match="no lesion classifier"):
        run(tiny_engine, tmp_path / "none", segmenter=box_segmenter)


def test_cli_counterfactual_map_method(tiny_engine, segmenter_dir, classifier_dir, tmp_path, monkeypatch):
    from app import cli, lungs
    from app.lesions import folder_hash as classifier_hash

    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: tiny_engine)
    monkeypatch.setattr(lungs, "LungSegmenter", BoxSegmenter)
    src = tmp_path / "scan.png"
    src.write_bytes(png_bytes())
    common = ["counterfactual", str(src), "--steps", "4", "--strength", "0.5", "--lung-segmenter", str(segmenter_dir),
              "--map-method", "classifier_guided", "--classifier-scale", "0.5"]
    assert cli.main([*common, "--lesion-classifier", str(classifier_dir), "--out", str(tmp_path / "g")]) == 0
    rec = json.loads((tmp_path / "g" / "0000" / "record.json").read_text())
    assert rec["map_method"] == "classifier_guided" and rec["classifier_scale"] == 0.5
    assert rec["classifier"]["sha256"] == classifier_hash(classifier_dir)
    assert cli.main([*common, "--lesion-classifier", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert cli.main([*common, "--lesion-classifier", str(classifier_dir), "--samples", "2",
                     "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------------------------------------------
# the map's scale and label
# ----------------------------------------------------------------------------------------------------------------
CALIBRATION = {"level": 0.05, "percentile": 99.0, "rms": 0.02, "mean_abs": 0.015, "n_images": 3,
               "map_method": "sdedit", "reference": "input", "preset": {"strength": 0.5, "steps": 4},
               "data": {"dataset": "synthetic"}, "created": "2026-12-06"}


def test_uncalibrated_model_records_the_relative_scale(plain_run):
    record = json.loads((plain_run / "record.json").read_text())
    scale = record["map_summary"]["scale"]
    assert scale["kind"] == "relative" and "no map calibration" in scale["reason"]
    assert record["map_label"] == "original − counterfactual" == exports.rendering.map_label("input")


def test_calibrated_model_reads_the_map_against_the_normal_level(tiny_engine, box_segmenter, tmp_path, monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", CALIBRATION)
    record = run(tiny_engine, tmp_path / "cal", segmenter=box_segmenter, reference="input")
    summary = record.map_summary
    assert summary["scale"]["kind"] == "calibrated" and summary["scale"]["level"] == 0.05
    assert summary["scale"]["preset_matches"] is True and summary["threshold_fold"] == 1.0
    amap = np.load(tmp_path / "cal" / "attribution.npy")
    lungs = box_lungs((H, W))
    assert summary["changed_area_fraction"] == pytest.approx((np.abs(amap[lungs]) >= 0.05).mean())
    rms = float(np.sqrt(np.mean(amap[lungs].astype(np.float64) ** 2)))
    assert summary["rms_vs_normal"] == pytest.approx(rms / 0.02, rel=1e-5)
    # the calibration holds for its own reference only: a reconstruction-referenced map falls back, and says why
    other = run(tiny_engine, tmp_path / "rec", segmenter=box_segmenter, reference="reconstruction")
    assert other.map_summary["scale"]["kind"] == "relative"
    assert "reconstruction" in other.map_summary["scale"]["reason"]
    assert other.map_label == "autoencoder reconstruction − counterfactual"


# ----------------------------------------------------------------------------------------------------------------
# issue 16: the map's polarity
# ----------------------------------------------------------------------------------------------------------------
REMOVED_LABEL = "max(original − counterfactual, 0): density removed"


def test_map_polarity_both_is_the_old_map_and_removed_its_positive_part(lung_run, tiny_engine, box_segmenter,
                                                                        tmp_path):
    """``both`` (and the default of a model without ``map_polarity``) writes the map and overlay as before, bit for
    bit; ``removed`` the same run's map clipped at 0, named so in the record, the legend and the exports."""
    old = np.load(lung_run / "attribution.npy")
    assert (old < 0).any() and (old > 0).any()
    assert json.loads((lung_run / "record.json").read_text())["request"]["map_polarity"] == "both"
    both = run(tiny_engine, tmp_path / "both", segmenter=box_segmenter, map_polarity="both")
    for name in ("attribution.npy", "overlay.png", "counterfactual.png"):
        assert (tmp_path / "both" / name).read_bytes() == (lung_run / name).read_bytes(), name
    assert both.label == "original − counterfactual" == both.map_label and both.polarity == "both"
    removed = run(tiny_engine, tmp_path / "removed", segmenter=box_segmenter, map_polarity="removed")
    clipped = np.load(tmp_path / "removed" / "attribution.npy")
    assert np.array_equal(clipped, np.maximum(old, 0)) and clipped.min() == 0.0
    assert (tmp_path / "removed" / "counterfactual.png").read_bytes() == (lung_run / "counterfactual.png").read_bytes()
    assert removed.request["map_polarity"] == "removed" and removed.polarity == "removed"
    assert removed.map_label == REMOVED_LABEL == removed.label
    inside = box_lungs((H, W))
    assert removed.map_summary["max_abs_in_mask"] == pytest.approx(float(np.maximum(old, 0)[inside].max()))
    assert removed == RunRecord.from_json((tmp_path / "removed" / "record.json").read_bytes())
    # the exports re-render the clipped map and say what it is; the signed mode draws red only
    png = exports.export_annotated_png(tmp_path / "removed", OverlayOptions(mode="signed", opacity=1.0))
    assert Image.open(io.BytesIO(png)).text["vald_md:map_label"] == REMOVED_LABEL  # type: ignore[attr-defined]
    content, _ = exports.build_export(tmp_path / "removed", "bundle.zip")
    assert content[:2] == b"PK"
    from app.runs.read import open_run, read_map

    _, amap = read_map(open_run(tmp_path / "removed"))
    assert np.array_equal(amap.magnitude, clipped) and (amap.signed >= 0).all()
    with pytest.raises(ValueError, match=r"map_polarity='positive'.*'removed'.*'both'"):
        ReviewRequest(map_polarity="positive").check()


def test_map_polarity_defaults_to_the_manifests(lung_run, tiny_engine, box_segmenter, tmp_path, monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_polarity", "removed")
    default = run(tiny_engine, tmp_path / "default", segmenter=box_segmenter)
    assert default.request["map_polarity"] == "removed" and default.map_label == REMOVED_LABEL
    old = np.load(lung_run / "attribution.npy")
    assert np.array_equal(np.load(tmp_path / "default" / "attribution.npy"), np.maximum(old, 0))
    both = run(tiny_engine, tmp_path / "both", segmenter=box_segmenter, map_polarity="both")  # the request wins
    assert both.request["map_polarity"] == "both"
    assert (tmp_path / "both" / "attribution.npy").read_bytes() == (lung_run / "attribution.npy").read_bytes()


def test_a_calibration_of_samples_and_polarity_holds_for_runs_of_both(tiny_engine, box_segmenter, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", {**CALIBRATION, "samples": 2, "polarity": "removed"})
    record = run(tiny_engine, tmp_path / "cal", segmenter=box_segmenter, reference="input", samples=2,
                 map_polarity="removed")
    scale = record.map_summary["scale"]
    assert scale["kind"] == "calibrated" and scale["samples"] == 2 and scale["polarity"] == "removed"
    assert record.calibration is not None and record.calibration.samples == 2
    one = run(tiny_engine, tmp_path / "one", segmenter=box_segmenter, reference="input", map_polarity="removed")
    assert one.map_summary["scale"]["kind"] == "relative" and "2 samples" in one.scale_reason
    signed = run(tiny_engine, tmp_path / "signed", segmenter=box_segmenter, reference="input", samples=2,
                 map_polarity="both")
    assert signed.map_summary["scale"]["kind"] == "relative" and "'removed'" in signed.scale_reason


# ----------------------------------------------------------------------------------------------------------------
# issue 16: the map's smoothing in the model's frame
# ----------------------------------------------------------------------------------------------------------------
def _smoothed_map(engine: Any, sigma: float, region: np.ndarray | None, **req: Any) -> np.ndarray:
    """The map of ``run``'s request computed by hand: the counterfactuals again (same seed), reference and
    counterfactuals smoothed inside the model frame's content box and unletterboxed, then differenced."""
    from app.attribution import difference_map

    pixels = imaging.decode_image(png_bytes()).pixels
    result = engine.generate_request(pixels, ReviewRequest(**{**FAST, **req}))
    lb = result.letterbox
    ref = imaging.unletterbox(result.input_model, lb, smoothing_sigma=sigma)
    cfs = np.stack([imaging.unletterbox(c, lb, smoothing_sigma=sigma) for c in result.counterfactuals_model])
    return difference_map(ref, cfs, mask=region).signed


def test_map_smoothing_zero_is_the_old_map_and_above_zero_smooths_in_the_model_frame(lung_run, tiny_engine,
                                                                                     box_segmenter, tmp_path):
    """0 (the default of a model without ``map_smoothing``) writes the map and overlay as before, bit for bit, and
    records 0.0; sigma 2 (model px) maps the smoothed reference minus the smoothed counterfactuals, records it, and
    leaves the counterfactual itself alone."""
    old = np.load(lung_run / "attribution.npy")
    assert json.loads((lung_run / "record.json").read_text())["request"]["map_smoothing"] == 0.0
    off = run(tiny_engine, tmp_path / "off", segmenter=box_segmenter, map_smoothing=0.0)
    for name in ("attribution.npy", "overlay.png", "counterfactual.png"):
        assert (tmp_path / "off" / name).read_bytes() == (lung_run / name).read_bytes(), name
    assert off.map_smoothing == 0.0 and off.request["map_smoothing"] == 0.0
    smoothed = run(tiny_engine, tmp_path / "s2", segmenter=box_segmenter, map_smoothing=2.0, samples=2)
    assert smoothed.request["map_smoothing"] == 2.0 and smoothed.map_smoothing == 2.0
    assert smoothed == RunRecord.from_json((tmp_path / "s2" / "record.json").read_bytes())
    got = np.load(tmp_path / "s2" / "attribution.npy")
    want = _smoothed_map(tiny_engine, 2.0, box_lungs((H, W)), samples=2)
    assert got.shape == (H, W) and np.allclose(got, want, atol=1e-6)
    assert (tmp_path / "s2" / "attribution_std.npy").is_file()  # the SD map sees the smoothed differences too
    # smoother than the unsmoothed map: neighbouring pixels differ less
    assert np.abs(np.diff(got, axis=1)).mean() < 0.5 * np.abs(np.diff(old, axis=1)).mean()
    one = run(tiny_engine, tmp_path / "s1", segmenter=box_segmenter, map_smoothing=2.0)
    assert (tmp_path / "s1" / "counterfactual.png").read_bytes() == (lung_run / "counterfactual.png").read_bytes()
    assert one.map_smoothing == 2.0 and not np.array_equal(np.load(tmp_path / "s1" / "attribution.npy"), old)
    # the exports say it: a PNG text chunk and a line of the burned-in parameters
    png = Image.open(io.BytesIO(exports.export_annotated_png(tmp_path / "s2")))
    assert png.text["vald_md:map_smoothing"] == "2"  # type: ignore[attr-defined]
    assert Image.open(io.BytesIO(exports.export_annotated_png(lung_run))).text[  # type: ignore[attr-defined]
        "vald_md:map_smoothing"] == "0"
    with pytest.raises(ValueError, match=r"map_smoothing=17.0 must be within \[0, 16\]"):
        ReviewRequest(map_smoothing=17.0).check()
    with pytest.raises(ValueError, match="map_smoothing"):
        ReviewRequest(map_smoothing=-1.0).check()


def test_map_smoothing_against_the_reconstruction_uses_it_in_the_model_frame(tiny_engine, tmp_path, monkeypatch):
    """Reference "reconstruction": the engine keeps the model-frame reconstruction it unletterboxed, and the map
    smooths that; a result without it (another maker) letterboxes the native reconstruction again."""
    from app.runs.review import map_inputs

    monkeypatch.setitem(tiny_engine.info.manifest, "map_smoothing", 1.5)
    record = run(tiny_engine, tmp_path / "rec", reference="reconstruction", lung_mask=False)
    assert record.map_smoothing == 1.5  # the manifest's default
    pixels = imaging.decode_image(png_bytes()).pixels
    result = tiny_engine.generate_request(pixels, ReviewRequest(**FAST))
    assert result.reconstruction_model is not None and result.reconstruction_model.shape == (32, 32)
    assert np.array_equal(imaging.unletterbox(result.reconstruction_model, result.letterbox), result.reconstruction)
    ref, cfs = map_inputs(result, pixels, reference="reconstruction", map_smoothing=1.5)
    assert np.array_equal(ref, imaging.unletterbox(result.reconstruction_model, result.letterbox,
                                                   smoothing_sigma=1.5))
    assert cfs.shape == (1, H, W)
    from app.attribution import difference_map

    assert np.allclose(np.load(tmp_path / "rec" / "attribution.npy"), difference_map(ref, cfs).signed, atol=1e-6)
    from dataclasses import replace

    again, _ = map_inputs(replace(result, reconstruction_model=None), pixels, reference="reconstruction",
                          map_smoothing=1.5)
    assert again.shape == (H, W) and np.abs(again - ref).max() < 0.05  # a second letterbox, close to the first
    plain_ref, plain_cfs = map_inputs(result, pixels, reference="input")
    assert plain_ref is pixels and plain_cfs is result.counterfactuals  # 0: exactly the native images


@pytest.mark.parametrize(("reference", "shape"), [("input", (90, 70)), ("reconstruction", (90, 70)),
                                                  ("input", (20, 27))])
def test_the_smoothed_map_is_taken_in_the_model_frame_and_resized_once(tiny_engine, reference, shape):
    """With map smoothing on (the default presets), the map's mean and SD are taken in the model frame and resized
    once: the mean equals the per-sample native path's (map_inputs, then difference_map) to float32 rounding, for
    both polarities; the SD bounds the native path's from above (the SD of an interpolation is at most the
    interpolation of the SDs) and stays close to it. A native smoothing_sigma takes the native path."""
    from app.attribution import difference_map
    from app.runs.review import attribution_map, map_inputs

    pixels = imaging.decode_image(png_bytes(*shape)).pixels  # larger, then smaller than the tiny model's 32-px frame
    result = tiny_engine.generate_request(pixels, ReviewRequest(**{**FAST, "samples": 3}))
    region = box_lungs(pixels.shape)
    ref, cfs = map_inputs(result, pixels, reference=reference, map_smoothing=1.5)
    for polarity in ("both", "removed"):
        req = ReviewRequest(**{**FAST, "samples": 3}, reference=reference, map_smoothing=1.5, map_polarity=polarity)
        fast = attribution_map(result, pixels, req, region=region)
        slow = difference_map(ref, cfs, mask=region, polarity=polarity)
        assert fast.n_samples == 3 and fast.shape == pixels.shape and np.array_equal(fast.mask, region)
        assert np.allclose(fast.signed, slow.signed, atol=1e-6) and np.allclose(fast.magnitude, slow.magnitude,
                                                                                 atol=1e-6)
        assert fast.std is not None and slow.std is not None
        assert (fast.std >= slow.std - 1e-6).all() and np.abs(fast.std - slow.std).max() < 0.25 * slow.std.max()
    native = ReviewRequest(**{**FAST, "samples": 3}, reference=reference, map_smoothing=1.5, map_polarity="both",
                           smoothing_sigma=2.0)
    want = difference_map(ref, cfs, mask=region, smoothing_sigma=2.0)
    got = attribution_map(result, pixels, native, region=region)
    assert np.array_equal(got.signed, want.signed) and np.array_equal(got.std, want.std)


def test_the_other_samples_are_kept_as_the_model_made_them(tiny_engine, tmp_path):
    """counterfactual.png is native size; counterfactual-<i>.png (i > 0) is the model frame's content box, not
    resized, as the record's sample_files says; resized it is the native sample (to 16-bit rounding). A one-sample
    run has no sample_files."""
    data = png_bytes(h=90, w=70)
    record = run_review(tiny_engine, data, ReviewRequest(**{**FAST, "samples": 3}), tmp_path / "r")
    result = tiny_engine.generate_request(imaging.decode_image(data).pixels, ReviewRequest(**{**FAST, "samples": 3}))
    lb = result.letterbox
    assert record.to_dict()["sample_files"] == {
        "first": {"file": "counterfactual.png", "frame": "native", "shape": [90, 70]},
        "others": {"frame": "model_content", "shape": [lb.content_height, lb.content_width],
                   "content_box": list(lb.content_box), "model_size": 32}}
    first = imaging.read_png_unit(tmp_path / "r" / "counterfactual.png")
    assert first.shape == (90, 70) and np.abs(first - result.counterfactual(0)).max() < 1e-4
    for i in (1, 2):
        other = imaging.read_png_unit(tmp_path / "r" / f"counterfactual-{i}.png")
        assert other.shape == (lb.content_height, lb.content_width) == (32, 25)
        assert np.abs(other - imaging.content_of(result.counterfactuals_model[i], lb)).max() < 1e-4
        assert np.abs(imaging.content_to_native(other, lb) - result.counterfactuals[i]).max() < 1e-4
    assert set(record.artifacts_sha256) >= {"counterfactual.png", "counterfactual-1.png", "counterfactual-2.png"}
    single = run_review(tiny_engine, data, ReviewRequest(**FAST), tmp_path / "one")
    assert "sample_files" not in single.to_dict()


class _RecordingSegmenter(BoxSegmenter):
    """The box segmenter, noting whether the run's first progress event came before it was asked."""

    def __init__(self, folder: Path, progressed: list[int]) -> None:
        super().__init__(folder)
        self.progressed = progressed
        self.progress_before: bool | None = None

    def probability(self, image: Any) -> np.ndarray:
        self.progress_before = bool(self.progressed)
        return super().probability(image)


class _BrokenSegmenter(BoxSegmenter):
    """Fails as an unexpected bug would (not the ValueError/RuntimeError lung_region turns into a reason)."""

    def probability(self, image: Any) -> np.ndarray:
        raise KeyError("broken segmenter")


def test_the_lungs_are_segmented_after_the_first_progress_event_and_the_files_keep_their_order(
        tiny_engine, segmenter_dir, tmp_path):
    """The first progress event does not wait for the segmentation; the record lists the files in the order it
    always has (images, counterfactuals by sample, reconstruction, overlay, maps, masks), whatever order the pool
    finished them in."""
    progressed: list[int] = []
    seg = _RecordingSegmenter(segmenter_dir, progressed)
    record = run_review(tiny_engine, png_bytes(), ReviewRequest(**{**FAST, "samples": 3}), tmp_path / "r",
                        mask=None, segmenter=seg, progress=lambda step, *_: progressed.append(step))
    assert seg.progress_before is True and progressed
    assert list(record.artifacts_sha256) == [
        "input.png", "counterfactual.png", "counterfactual-1.png", "counterfactual-2.png", "reconstruction.png",
        "overlay.png", "attribution.npy", "attribution_std.npy", "lung_mask.png"]
    user = np.zeros((H, W), bool)
    user[5:30, 5:30] = True
    masked = run(tiny_engine, tmp_path / "m", mask=user)
    assert list(masked.artifacts_sha256)[-2:] == ["attribution.npy", "mask.png"]


def test_a_run_that_fails_after_its_diffusion_leaves_no_files(tiny_engine, segmenter_dir, tmp_path):
    """The images are being written while the lungs are segmented; when that (or the map) fails, the error reaches
    the caller and the folder keeps no file of the run (and no record.json)."""
    out = tmp_path / "failed"
    with pytest.raises(KeyError, match="broken segmenter"):
        run(tiny_engine, out, segmenter=_BrokenSegmenter(segmenter_dir), samples=2)
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_calibration_holds_for_its_own_map_smoothing(tiny_engine, box_segmenter, tmp_path, monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", CALIBRATION)
    smoothed = run(tiny_engine, tmp_path / "s", segmenter=box_segmenter, reference="input", map_smoothing=2.0)
    assert smoothed.map_summary["scale"]["kind"] == "relative"
    assert "unsmoothed maps, not on maps smoothed by sigma 2 model pixels" in smoothed.scale_reason
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", {**CALIBRATION, "map_smoothing": 2.0})
    record = run(tiny_engine, tmp_path / "cal", segmenter=box_segmenter, reference="input", map_smoothing=2.0)
    scale = record.map_summary["scale"]
    assert scale["kind"] == "calibrated" and scale["map_smoothing"] == 2.0
    plain = run(tiny_engine, tmp_path / "plain", segmenter=box_segmenter, reference="input")
    assert plain.map_summary["scale"]["kind"] == "relative"
    assert "smoothed by sigma 2 model pixels, not on unsmoothed maps" in plain.scale_reason


def test_case_label_stays_out_of_the_record_and_is_checked(tiny_engine, tmp_path):
    """The operator's free-text label may name the patient: record.json is exported (the ZIP, beside a
    de-identified Secondary Capture), so the label lives only in the job (job.json), never in the record."""
    record = run(tiny_engine, tmp_path / "lab", case_label="teaching case 3")
    assert "case_label" not in record.to_dict()
    assert "teaching case 3" not in (tmp_path / "lab" / "record.json").read_text()
    with pytest.raises(ValueError, match="case_label"):
        ReviewRequest(case_label="two\nlines").check()


def test_every_record_round_trips_byte_for_byte(lung_run, plain_run, guided_run, tiny_engine, box_segmenter,
                                                tmp_path):
    """What run_review returns is what any reader of its record.json gets, and RunRecord writes the file back byte
    for byte: one sample or several, lungs, a user mask, no region, every map method."""
    user = np.zeros((H, W), dtype=bool)
    user[5:15, 5:30] = True
    made = {"multi": run(tiny_engine, tmp_path / "multi", samples=2, lung_mask=False),
            "user": run(tiny_engine, tmp_path / "user", segmenter=box_segmenter, mask=user),
            "inv": run(tiny_engine, tmp_path / "inv", segmenter=box_segmenter, map_method="ddim_inversion")}
    for name, record in made.items():
        assert record == RunRecord.from_json((tmp_path / name / "record.json").read_bytes())
    assert made["multi"].n_samples == 2 and made["user"].region == "user_mask" and made["inv"].method == \
        "ddim_inversion"
    for folder in (lung_run, plain_run, guided_run, *(tmp_path / n for n in made)):
        data = (folder / "record.json").read_bytes()
        record = RunRecord.from_json(data)
        assert record.to_json() == data and RunRecord.from_json(record.to_json()) == record
        assert record.to_dict() == json.loads(data)


def test_calibrate_map_measures_the_presets_samples_and_the_models_polarity(tiny_engine, segmenter_dir, tmp_path,
                                                                            monkeypatch):
    """scripts/calibrate_map.py runs the healthy preset as the product does, its samples included, with the
    manifest's map polarity and map smoothing, and stores them in map_scale; a run of that preset then reads on the
    calibrated scale."""
    import importlib.util
    import shutil

    from app import engine, modelfolder

    model = tmp_path / "model"
    shutil.copytree(tiny_engine.info.path, model)
    manifest = json.loads((model / modelfolder.MANIFEST).read_text())
    healthy = {"prompt": "normal chest x ray", "strength": 0.5, "steps": 4, "guidance_scale": 5.0, "samples": 2}
    manifest.update({"map_polarity": "removed", "map_smoothing": 2.0, "map_reference": "input",
                     "presets": {"healthy": healthy}})
    (model / modelfolder.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "data").mkdir()
    for i in range(2):
        (tmp_path / "data" / f"n{i}.png").write_bytes(png_bytes(seed=i))
    (tmp_path / "data" / "labels.csv").write_text("path,label,split\nn0.png,normal,val\nn1.png,normal,val\n")
    spec = importlib.util.spec_from_file_location("calibrate_map", Path(__file__).parent.parent / "scripts" /
                                                  "calibrate_map.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "LungSegmenter", BoxSegmenter)
    args = script.parse_args(["--model", str(model), "--data", str(tmp_path / "data" / "labels.csv"), "--n", "2",
                              "--segmenter", str(segmenter_dir), "--out", str(tmp_path / "cal.json"),
                              "--write-manifest"])
    assert script.main(args) == 0
    scale = json.loads((model / modelfolder.MANIFEST).read_text())["map_scale"]
    assert scale["samples"] == 2 and scale["polarity"] == "removed" and scale["reference"] == "input"
    assert scale["map_smoothing"] == 2.0 and "smoothing" not in scale
    assert scale["level"] > 0 and scale["n_images"] == 2
    calibrated = engine.CounterfactualEngine(model, device="cpu")
    record = run_review(calibrated, png_bytes(), ReviewRequest.from_preset(calibrated.info.presets["healthy"],
                                                                           seed=0),
                        tmp_path / "run", segmenter=BoxSegmenter(segmenter_dir))
    assert record.n_samples == 2 and record.polarity == "removed" and record.map_smoothing == 2.0
    assert record.map_summary["scale"]["kind"] == "calibrated" and record.map_summary["scale"]["polarity"] == \
        "removed"
    assert record.map_summary["scale"]["map_smoothing"] == 2.0 and record.calibration is not None
    assert record.calibration.smoothing == 2.0
