"""The localization probe and its shortcut report (app.evaluate.probe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.evaluate import probe
from app.lungs import LungSegmenter, LungUNet, save_segmenter


def _lungs(size: int = 100) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[20:80, 15:45] = True
    m[20:80, 55:85] = True
    return m


def test_frame_mask_covers_the_outer_five_percent() -> None:
    f = probe.frame_mask((100, 200))
    assert f[0, 100] and f[99, 100] and f[50, 0] and f[50, 199] and not f[50, 100]
    assert f[:, 100].sum() == 10 and f[50].sum() == 20


def test_padding_mask_finds_uniform_letterbox_bands_only() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((60, 80)).astype(np.float32)
    img[:, :10] = 0.0
    img[:, -7:] = 0.0
    pad = probe.padding_mask(img)
    assert pad[:, :10].all() and pad[:, -7:].all() and not pad[:, 10:-7].any()
    assert not probe.padding_mask(rng.random((20, 20))).any()


def test_marker_mask_finds_small_bright_text_outside_the_lungs() -> None:
    img = np.full((100, 100), 0.4, np.float32)
    img[5:10, 88:94] = 1.0  # an "L" marker in a corner
    img[40:45, 25:30] = 1.0  # a bright spot inside a lung is no marker
    m = probe.marker_mask(img, _lungs())
    assert m[7, 90] and not m[42, 27]


def test_shortcut_report_of_a_map_on_the_frame_and_in_the_lungs() -> None:
    img = np.full((100, 100), 0.4, np.float32)
    lungs = _lungs()
    on_frame = probe.frame_mask((100, 100)).astype(np.float32)
    r = probe.shortcut_report(on_frame, img, lungs)
    assert r["frame_energy"] == pytest.approx(1.0) and r["top5_in_frame"] == pytest.approx(1.0)
    assert r["outside_lung_energy"] == pytest.approx(1.0)
    r = probe.shortcut_report(lungs.astype(np.float32), img, lungs)
    assert r["frame_energy"] == 0.0 and r["outside_lung_energy"] == 0.0


def test_score_one_perfect_and_inverted_maps() -> None:
    lesion = np.zeros((100, 100), bool)
    lesion[30:50, 20:40] = True
    lungs = _lungs()
    perfect = probe.score_one(lesion.astype(np.float32), lesion, lungs)
    assert perfect == {"pixel_auroc": 1.0, "pointing_game": 1.0, "iou_area": 1.0}
    inverted = probe.score_one((~lesion).astype(np.float32), lesion, None)
    assert inverted["pixel_auroc"] == 0.0 and inverted["iou_area"] == 0.0


def test_edge_map_is_zero_on_flat_images() -> None:
    assert probe.edge_map(np.full((30, 30), 0.5, np.float32)).max() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.shared_data
def test_probe_runs_on_lesions_rsna_with_a_model_and_writes_its_report(shared_data: Path, tmp_path: Path,
                                                                        tiny_engine) -> None:
    torch.manual_seed(0)
    net = LungUNet((4, 8))
    torch.nn.init.constant_(net.head.bias, 10.0)  # everything is lung: the probe's regions are then known
    save_segmenter(tmp_path / "seg", net, size=32, name="tiny", metrics={}, training={})
    seg = LungSegmenter(tmp_path / "seg")
    fn = probe.model_map_fn(tiny_engine, ["product", "empty"], strength=0.5, guidance=2.0, steps=4, samples=1,
                            disease_prompt="covid")
    summary = probe.run_probe(shared_data / "lesions-rsna", tmp_path / "out", segmenter=seg, map_fn=fn,
                              methods=["product", "empty"], limit=3, normals=2)
    assert summary["images"] == 3 and summary["normals"] == 2
    for m in ("product", "product_pos", "empty", "random", "intensity", "edges", "lung_prior"):
        assert 0.0 <= summary["whole"][m]["pixel_auroc"]["mean"] <= 1.0
        assert 0.0 <= summary["whole"][m]["frame_energy"]["mean"] <= 1.0
    assert summary["whole"]["lung_prior"]["frame_energy"]["mean"] == pytest.approx(0.19, abs=0.01)
    assert "product - lung_prior" in summary["paired_auroc_whole"]
    assert set(summary["image_auroc_lungs"]) >= {"product", "random"}
    auroc, lo, hi = summary["image_auroc_lungs_rms"]["product"]
    assert 0.0 <= lo <= auroc <= hi <= 1.0
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["segmenter"]["sha256"] == seg.info.sha256
    assert len((tmp_path / "out" / "probe_rows.jsonl").read_text().splitlines()) == 3
    assert "| product |" in (tmp_path / "out" / "probe.md").read_text()


class _HalfLungs:
    """A stand-in segmenter (the probe's regions, not the segmenter, are under test): the left half is lung."""

    class info:  # mirrors LungSegmenter.info
        @staticmethod
        def record() -> dict[str, str]:
            return {"sha256": "0" * 64}

    @staticmethod
    def segment(img: np.ndarray) -> np.ndarray:
        m = np.zeros(img.shape, bool)
        m[:, : img.shape[1] // 2] = True
        return m


def test_probe_scores_model_maps_as_shown_restricted_to_the_lungs_over_the_whole_image(shared_data: Path,
                                                                                        tmp_path: Path) -> None:
    def fn(img: np.ndarray, lungs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {"product": np.ones(img.shape, np.float32)}  # flat: energy everywhere, frame and markers included

    summary = probe.run_probe(shared_data / "lesions-rsna", tmp_path / "out", segmenter=_HalfLungs(), map_fn=fn,
                              methods=["product"], limit=2, normals=1)
    shown = "product" + probe.DISPLAYED
    assert summary["whole"]["product"]["outside_lung_energy"]["mean"] == pytest.approx(0.5)
    assert summary["whole"][shown]["outside_lung_energy"]["mean"] == 0.0
    assert shown not in summary["lungs"]  # inside the lungs it is the map itself: not scored twice
    assert f"{shown} - lung_prior" in summary["paired_auroc_whole"]
    assert "paired AUROC difference (whole image" in (tmp_path / "out" / "probe.md").read_text()


@pytest.mark.parametrize(("methods", "message"), [("bogus", "unknown bogus"),
                                                  ("classifier_grad", "needs --classifier")])
def test_probe_command_refuses_bad_methods_with_one_line(methods: str, message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from app import evaluate

    args = evaluate.parse_args(["probe", "--data", str(tmp_path), "--methods", methods, "--out", str(tmp_path / "o")])
    assert evaluate.main(args) == 2
    assert message in capsys.readouterr().err


def test_probe_reports_the_product_maps_also_smoothed_under_their_own_names(shared_data: Path, tmp_path: Path,
                                                                           tiny_engine) -> None:
    """``smoothing`` S > 0 (``--map-smoothing S``): each product map again with reference and counterfactuals
    Gaussian smoothed by sigma S, named ``<map>_s<S>``; the unsmoothed maps stay as they were."""
    from scipy import ndimage

    from app.generation import GenerationRequest

    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    lungs = np.ones((32, 32), bool)
    settings = {"strength": 0.5, "guidance": 2.0, "steps": 4, "samples": 2, "disease_prompt": "covid"}
    plain = probe.model_map_fn(tiny_engine, ["product"], **settings)(img, lungs, 5)
    maps = probe.model_map_fn(tiny_engine, ["product"], **settings, smoothing=4.0)(img, lungs, 5)
    names = ("product", "product_pos", "product_mean2", "product_mean2_pos", "product_pos_mean2")
    assert list(plain) == ["product", "product_pos", "paper", "product_mean2", "product_mean2_pos",
                           "product_pos_mean2"]
    assert set(maps) == set(plain) | {f"{m}_s4" for m in names}
    for m in plain:
        assert np.array_equal(maps[m], plain[m]), m
    res = tiny_engine.generate_request(img, GenerationRequest.from_preset(
        tiny_engine.info.presets.get("healthy"), strength=0.5, guidance_scale=2.0, steps=4, samples=2, seed=5))
    ref = img if tiny_engine.info.manifest.get("map_reference", "input") == "input" else res.reconstruction
    diffs = ndimage.gaussian_filter(ref[None] - res.counterfactuals, (0, 4, 4), mode="reflect")
    assert np.allclose(maps["product_mean2_pos_s4"], np.clip(diffs.mean(0), 0, None), atol=1e-6)
    assert np.allclose(maps["product_s4"], np.abs(diffs[0]), atol=1e-6)
    # the candidate of the eighth round: each sample's positive part, then the mean (>= the mean's positive part)
    assert np.allclose(maps["product_pos_mean2_s4"], np.clip(diffs, 0, None).mean(0), atol=1e-6)
    assert (maps["product_pos_mean2"] >= maps["product_mean2_pos"] - 1e-7).all()
    assert np.abs(np.diff(maps["product_s4"])).mean() < np.abs(np.diff(maps["product"])).mean()
    with pytest.raises(ValueError, match="smoothing"):
        probe.model_map_fn(tiny_engine, ["product"], **settings, smoothing=-1.0)

    # run_probe keeps and scores them (its filter keeps every "product*" map)
    def fn(image: np.ndarray, lung: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {"product": image, "product_mean2_pos_s4": image}

    summary = probe.run_probe(shared_data / "lesions-rsna", tmp_path / "out", segmenter=_HalfLungs(), map_fn=fn,
                              methods=["product"], limit=1)
    assert "product_mean2_pos_s4" in summary["whole"] and "product_mean2_pos_s4" in summary["lungs"]


def test_probe_maps_with_another_prompt_are_the_engines_maps_for_that_prompt(tmp_path: Path, tiny_engine) -> None:
    """``prompt`` (``--prompt``): the product maps are made with that prompt instead of the healthy preset's, with
    every other setting kept; ``""`` is the empty-prompt control at the product's own setting (all samples, unlike
    the one-sample ``empty`` baseline), and the cache keeps the prompt among its settings."""
    from app.generation import GenerationRequest

    img = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    lungs = np.ones((32, 32), bool)
    settings = {"strength": 0.5, "guidance": 2.0, "steps": 4, "samples": 2, "disease_prompt": "covid"}
    healthy = probe.model_map_fn(tiny_engine, ["product"], **settings)(img, lungs, 3)
    empty = probe.model_map_fn(tiny_engine, ["product"], **settings, prompt="",
                               cache=tmp_path / "cache")(img, lungs, 3)
    res = tiny_engine.generate_request(img, GenerationRequest.from_preset(
        tiny_engine.info.presets.get("healthy"), prompt="", strength=0.5, guidance_scale=2.0, steps=4, samples=2,
        seed=3))
    ref = img if tiny_engine.info.manifest.get("map_reference", "input") == "input" else res.reconstruction
    assert np.allclose(empty["product_mean2_pos"], np.clip((ref[None] - res.counterfactuals).mean(0), 0, None),
                       atol=1e-6)
    assert not np.allclose(empty["product_mean2_pos"], healthy["product_mean2_pos"])
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["parameters"]["prompt"] == ""
    from app import evaluate

    base = ["probe", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert evaluate.parse_args(base).prompt is None
    assert evaluate.parse_args([*base, "--prompt", ""]).prompt == ""


def test_probe_command_takes_the_map_smoothing(tmp_path: Path) -> None:
    from app import evaluate

    base = ["probe", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert evaluate.parse_args(base).map_smoothing == 0.0
    assert evaluate.parse_args([*base, "--map-smoothing", "4"]).map_smoothing == 4.0


def test_image_auroc_separates_by_the_score_given_with_a_stratified_bootstrap() -> None:
    """Perfectly separated scores: 1.0 with a CI of [1, 1]; reversed 0.0; ties 0.5; without ci the bounds are nan."""
    sep = {"opacity": [0.5, 0.6, 0.7], "normal": [0.1, 0.2]}
    assert probe.image_auroc(sep, ci=True) == (1.0, 1.0, 1.0)
    assert probe.image_auroc({"opacity": sep["normal"], "normal": sep["opacity"]})[0] == 0.0
    est, lo, hi = probe.image_auroc({"opacity": [0.3, 0.3], "normal": [0.3, 0.3]})
    assert est == 0.5 and np.isnan(lo) and np.isnan(hi)
    mixed = {"opacity": [0.1, 0.5, 0.9, 0.7], "normal": [0.2, 0.6, 0.3]}
    est, lo, hi = probe.image_auroc(mixed, ci=True)
    assert est == pytest.approx(8 / 12) and 0.0 <= lo < est < hi <= 1.0


def test_format_probe_shows_both_image_level_aurocs() -> None:
    """The table's image-level columns: the mean's AUROC, and the RMS's with its interval; '-' where unmeasured."""
    cell = {"mean": 0.7, "ci": [0.6, 0.8]}
    summary = {"images": 2, "normals": 2, "size": 256, "segmenter": {"sha256": "ab" * 32}, "wall_s": 1.0,
               "whole": {"product": {"pixel_auroc": cell}, "random": {"pixel_auroc": cell}},
               "lungs": {"product": {"pixel_auroc": cell}}, "paired_auroc_lungs": {}, "paired_auroc_whole": {},
               "image_auroc_lungs": {"product": 0.78, "random": 0.5},
               "image_auroc_lungs_rms": {"product": [0.834, 0.769, 0.888]}}
    table = probe.format_probe(summary)
    assert "image AUROC (mean) | image AUROC (RMS) [95% CI]" in table
    assert "| 0.780 | 0.834 [0.769, 0.888] |" in table
    row = next(line for line in table.splitlines() if line.startswith("| random |"))
    assert "| 0.500 | - |" in row


def test_probe_cache_keeps_the_counterfactuals_and_refuses_other_settings_or_images(tmp_path: Path,
                                                                                   tiny_engine, monkeypatch) -> None:
    """``--cache DIR``: the second run of the same settings takes each image's reconstruction and counterfactuals
    from DIR (no diffusion) and gives the same maps; other settings, another image under a seed, or a damaged
    entry are refused with a message that names the folder."""
    rng = np.random.default_rng(0)
    img, other = (rng.random((32, 32)).astype(np.float32) for _ in range(2))
    lungs = np.ones((32, 32), bool)
    settings = {"strength": 0.5, "guidance": 2.0, "steps": 4, "samples": 2, "disease_prompt": "covid",
                "smoothing": 2.0}
    cache = tmp_path / "cache"
    made = probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)(img, lungs, 7)
    assert sorted(p.name for p in cache.iterdir()) == ["7.npz", "cache.json"]
    assert json.loads((cache / "cache.json").read_text())["parameters"]["strength"] == 0.5

    def no_diffusion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached image was diffused again")

    monkeypatch.setattr(tiny_engine, "generate_request", no_diffusion)
    again = probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)(img, lungs, 7)
    assert made.keys() == again.keys()
    for m in made:
        assert np.array_equal(made[m], again[m]), m
    with pytest.raises(ValueError, match="another image"):
        probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)(other, lungs, 7)
    # the same values written another way (guidance 2 and 2.0) are the same settings
    again = probe.model_map_fn(tiny_engine, ["product"], **{**settings, "guidance": 2}, cache=cache)(img, lungs, 7)
    assert np.array_equal(made["product_mean2_pos_s2"], again["product_mean2_pos_s2"])
    with pytest.raises(ValueError, match=r"other settings \(parameters\.strength: 0\.5 vs 0\.75\)"):
        probe.model_map_fn(tiny_engine, ["product"], **{**settings, "strength": 0.75}, cache=cache)
    fn = probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)
    entry = (cache / "7.npz").read_bytes()
    with np.load(cache / "7.npz") as z:
        parts = dict(z)
    for damage, message in [(b"not a zip file", "unreadable"), (b"", "unreadable"),
                            ({**parts, "counterfactuals": parts["counterfactuals"][:, :8]}, "unreadable"),
                            ({**parts, "settings_sha256": np.array("0" * 64)}, "made with other settings than")]:
        if isinstance(damage, bytes):
            (cache / "7.npz").write_bytes(damage)
        else:
            np.savez(cache / "7.npz", **damage)
        with pytest.raises(ValueError, match=rf"7\.npz .*{message}"):
            fn(img, lungs, 7)
    (cache / "7.npz").write_bytes(entry)
    # a settings file that is not an object, and entries without any settings file, are refused
    (cache / "cache.json").write_text("[]")
    with pytest.raises(ValueError, match="not a settings object"):
        probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)
    (cache / "cache.json").unlink()
    with pytest.raises(ValueError, match=r"entries but no cache\.json"):
        probe.model_map_fn(tiny_engine, ["product"], **settings, cache=cache)
    # a file where the folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        probe.model_map_fn(tiny_engine, ["product"], **settings, cache=tmp_path / "file")


def test_probe_command_runs_from_a_cache_and_refuses_a_damaged_one_with_one_line(
        shared_data: Path, tmp_path: Path, tiny_engine, capsys: pytest.CaptureFixture[str]) -> None:
    from app import evaluate

    base = ["probe", "--data", str(shared_data / "lesions-rsna"), "--limit", "1", "--methods", "product",
            "--model", str(tiny_engine.info.path), "--strength", "0.5", "--guidance", "2", "--steps", "4",
            "--samples", "2", "--device", "cpu"]
    assert evaluate.parse_args([*base, "--out", str(tmp_path / "o")]).cache is None
    cache = tmp_path / "c"
    assert evaluate.main(evaluate.parse_args([*base, "--cache", str(cache), "--out", str(tmp_path / "a")])) == 0
    assert evaluate.main(evaluate.parse_args([*base, "--cache", str(cache), "--out", str(tmp_path / "b")])) == 0
    a, b = (json.loads((tmp_path / o / "probe.json").read_text()) for o in ("a", "b"))
    assert b["settings"]["cache"] == str(cache) and b["lungs"] == a["lungs"]
    capsys.readouterr()
    for entry in cache.glob("*.npz"):
        entry.write_bytes(b"")
    assert evaluate.main(evaluate.parse_args([*base, "--cache", str(cache), "--out", str(tmp_path / "c2")])) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert evaluate.main(evaluate.parse_args([*base, "--cache", " ", "--out", str(tmp_path / "d")])) == 2
    assert "--cache: give a folder" in capsys.readouterr().err
