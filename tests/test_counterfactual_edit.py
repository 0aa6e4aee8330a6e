"""The counterfactual shown, edited only where the map is above normal (issue 16: DiffEdit-style masked edit).

The engine's ``edit_region`` keeps the input's latent outside the region at every step; the review run derives the
region from the map and its calibrated normal level and writes the edit as ``counterfactual.png`` (the first sample
as ``counterfactual-0.png``), with what it did in the record's ``counterfactual_edit``. Tiny in-code model (32 px).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app import attribution, imaging
from app.generation import GenerationRequest
from app.jobs.job import job_cost
from app.runs import folder as names
from app.runs.read import run_facts
from app.runs.record import RunRecord
from app.runs.review import (
    EDIT_DILATION_PX,
    ReviewRequest,
    edit_region,
    resolve_request,
    run_review,
    with_model_defaults,
)
from tests.factories import png_bytes
from tests.tiny_lungs import BoxSegmenter, write_tiny_segmenter

FAST: dict[str, Any] = {"strength": 0.5, "steps": 4, "guidance_scale": 5.0, "seed": 11}
CALIBRATION = {"level": 0.02, "percentile": 99.0, "rms": 0.01, "mean_abs": 0.008, "n_images": 3,
               "map_method": "sdedit", "reference": "input", "preset": {"strength": 0.5, "steps": 4},
               "data": {"dataset": "synthetic"}, "created": "2026-12-07"}


@pytest.fixture(scope="module")
def box_segmenter(tmp_path_factory: pytest.TempPathFactory) -> BoxSegmenter:
    return BoxSegmenter(write_tiny_segmenter(tmp_path_factory.mktemp("segmenter") / "tiny-lungs"))


@pytest.fixture()
def calibrated(tiny_engine, monkeypatch):
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", CALIBRATION)
    return tiny_engine


def _image(tiny_engine) -> np.ndarray:
    return imaging.decode_image(png_bytes()).pixels


# ----------------------------------------------------------------------------------------------------------------
# the engine's edit region
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["pndm", "dpm++", "ddim", "euler"])
def test_an_edit_region_of_ones_is_the_unrestricted_generation(tiny_engine, scheduler):
    req = GenerationRequest(**FAST, scheduler=scheduler, samples=2)
    size = tiny_engine.info.image_size
    plain = tiny_engine.generate_request(_image(tiny_engine), req).counterfactuals_model
    ones = tiny_engine.generate_request(_image(tiny_engine), req, edit_region=np.ones((size, size), np.float32))
    assert np.array_equal(plain, ones.counterfactuals_model)


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++", "ddim", "euler"])
def test_an_edit_region_of_zeros_keeps_the_input_whatever_the_prompt(tiny_engine, scheduler):
    """Outside the region every step's latent is the input's own, noised to the step's level, and after the last
    step the clean latent itself: with no region at all, the prompt and the guidance change nothing, and the result
    is the autoencoder's decode of the input's latent (the posterior sample img2img started from)."""
    size = tiny_engine.info.image_size
    zeros = np.zeros((size, size), np.float32)
    a = tiny_engine.generate_request(_image(tiny_engine), GenerationRequest(**FAST, scheduler=scheduler),
                                     edit_region=zeros)
    b = tiny_engine.generate_request(_image(tiny_engine), GenerationRequest(
        **{**FAST, "guidance_scale": 9.0}, prompt="COVID 19", scheduler=scheduler), edit_region=zeros)
    assert np.array_equal(a.counterfactuals_model, b.counterfactuals_model)
    # the input's latent as img2img drew it (posterior mean + SD x the seed's first draw), decoded
    vae = tiny_engine.pipe.vae
    with torch.no_grad():
        dist = vae.encode(tiny_engine.to_model_tensor(a.input_model) * 2 - 1).latent_dist
        draw = torch.randn(dist.mean.shape, generator=torch.Generator("cpu").manual_seed(FAST["seed"]))
        decoded = vae.decode(dist.mean + dist.std * draw).sample
    expected = (decoded.mean(1) / 2 + 0.5).clamp(0, 1)[0].numpy()
    assert np.abs(a.counterfactuals_model[0] - expected).max() < 1e-4


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++", "ddim", "euler"])
def test_the_kept_latent_is_noised_to_the_level_of_the_next_unet_call(tiny_engine, scheduler, monkeypatch):
    """After step i the input's latent is put back at the noise level the UNet is then called at (step i + 1):
    ``add_noise`` is given that timestep (PNDM, DDIM), and the scheduler's own step index, which DPM-Solver++ and
    Euler use instead, points at it; after the last step there is no next call and the clean latent is used."""
    unet_t: list[float] = []
    kept: list[tuple[int, float | None, int | None]] = []
    unet = tiny_engine.pipe.unet
    forward = unet.forward

    def spy_forward(sample: Any, timestep: Any, *a: Any, **k: Any) -> Any:
        unet_t.append(float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep))
        return forward(sample, timestep, *a, **k)

    keep = tiny_engine._keep_outside

    def spy_keep(latents: Any, region: Any, sched: Any, next_index: int) -> Any:
        t = float(sched.timesteps[next_index]) if next_index < len(sched.timesteps) else None
        kept.append((next_index, t, getattr(sched, "step_index", None)))
        return keep(latents, region, sched, next_index)

    monkeypatch.setattr(unet, "forward", spy_forward)
    monkeypatch.setattr(tiny_engine, "_keep_outside", spy_keep)
    size = tiny_engine.info.image_size
    tiny_engine.generate_request(_image(tiny_engine), GenerationRequest(**{**FAST, "steps": 8}, scheduler=scheduler),
                                 edit_region=np.full((size, size), 0.5, np.float32))
    assert len(kept) == len(unet_t) >= 3 and kept[-1][1] is None
    for i, (next_index, t, step_index) in enumerate(kept[:-1]):
        assert t == unet_t[i + 1], (scheduler, i)
        if scheduler in ("dpm++", "euler"):
            assert step_index == next_index


def test_the_edit_takes_the_reconstruction_of_the_samples_instead_of_decoding_it_again(tiny_engine, monkeypatch):
    """The reconstruction depends on the image only, so the edit pass reuses the samples' (no second decode of it);
    an earlier result of another image is not reused."""
    image, size = _image(tiny_engine), tiny_engine.info.image_size
    req = GenerationRequest(**FAST, samples=2)
    first = tiny_engine.generate_request(image, req)
    decodes: list[int] = []
    original = type(tiny_engine).reconstruct_model_frame
    monkeypatch.setattr(type(tiny_engine), "reconstruct_model_frame",
                        lambda self, *a, **k: decodes.append(1) or original(self, *a, **k))
    region = np.zeros((size, size), np.float32)
    region[: size // 2] = 1.0
    edit = tiny_engine.generate_request(image, req, edit_region=region, reconstruction=first)
    assert decodes == []
    assert np.array_equal(edit.reconstruction, first.reconstruction)
    assert np.array_equal(edit.reconstruction_model, first.reconstruction_model)
    fresh = tiny_engine.generate_request(image, req, edit_region=region)
    assert decodes == [1]
    assert np.array_equal(edit.counterfactuals_model, fresh.counterfactuals_model)
    np.testing.assert_allclose(fresh.reconstruction_model, first.reconstruction_model, atol=1e-6)
    other = tiny_engine.generate_request(np.flipud(image).copy(), req, edit_region=region, reconstruction=first)
    assert decodes == [1, 1] and not np.array_equal(other.reconstruction_model, first.reconstruction_model)


def test_a_bad_edit_region_is_refused(tiny_engine):
    size = tiny_engine.info.image_size
    for bad in (np.ones((size, size + 1), np.float32), np.full((size, size), 1.5, np.float32),
                np.full((size, size), np.nan, np.float32)):
        with pytest.raises(ValueError, match="edit_region must be"):
            tiny_engine.generate_request(_image(tiny_engine), GenerationRequest(**FAST), edit_region=bad)


# ----------------------------------------------------------------------------------------------------------------
# the region from the map
# ----------------------------------------------------------------------------------------------------------------
def test_the_edit_region_is_the_map_above_the_level_inside_its_region_grown_and_feathered():
    lb = imaging.letterbox(np.zeros((64, 64), np.float32), 64)[1]
    signed = np.zeros((64, 64), np.float32)
    signed[30:34, 10:14] = 0.5  # above the level, inside the mask
    signed[30:34, 50:54] = 0.5  # above the level, outside the mask
    signed[5:8, 5:8] = 0.01  # inside the mask, below the level
    mask = np.zeros((64, 64), bool)
    mask[:, :40] = True
    amap = attribution.AttributionMap(signed=signed, magnitude=signed, std=None, n_samples=1, mask=mask)
    above, region = edit_region(amap, 0.1, lb)
    assert above.sum() == 16 and above[30:34, 10:14].all() and not above[:, 40:].any()
    assert region.shape == (64, 64) and region.dtype == np.float32 and region.min() >= 0 and region.max() <= 1
    assert region[31, 11] > 0.95  # the flagged pixels are edited (the feather leaves ~0.97 at a small region)
    assert region[31, 11 + EDIT_DILATION_PX + 1] > 0.3  # grown by the dilation, then feathered
    assert region[31, 52] < 1e-3 and region[60, 60] < 1e-3  # nothing outside the map's region, nothing far away
    nothing = attribution.AttributionMap(signed=signed * 0, magnitude=signed * 0, std=None, n_samples=1, mask=mask)
    above0, region0 = edit_region(nothing, 0.1, lb)
    assert not above0.any() and float(region0.max()) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# the review run
# ----------------------------------------------------------------------------------------------------------------
def _run(engine: Any, out: Path, segmenter: Any = None, **req: Any) -> RunRecord:
    return run_review(engine, png_bytes(), ReviewRequest(**{**FAST, **req}), out, segmenter=segmenter)


def test_the_edited_counterfactual_is_shown_and_the_first_sample_kept(calibrated, box_segmenter, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(calibrated.info.manifest, "map_scale", {**CALIBRATION, "samples": 2})
    record = _run(calibrated, tmp_path / "e", box_segmenter, reference="input", samples=2,
                  counterfactual_edit="map_region")
    edit = record.counterfactual_edit
    assert record.edited and edit is not None and edit["applied"] is True and edit["mode"] == "map_region"
    assert edit["threshold"] == 0.02 and edit["seed"] == 11 and edit["unet_evaluations"] == record.unet_evaluations
    assert 0 < edit["region_fraction"] <= 1 and edit["compute"]["device"] == "cpu"
    assert record.request["counterfactual_edit"] == "map_region"
    # the region the record states is the map's above-normal share inside the lungs
    amap = np.load(tmp_path / "e" / "attribution.npy")
    lungs = imaging.read_png_unit(tmp_path / "e" / "lung_mask.png") > 0.5
    assert edit["region_fraction"] == pytest.approx(((np.abs(amap) >= 0.02) & (amap != 0) & lungs).mean(), abs=1e-6)
    files = set(record.artifacts_sha256)
    assert {"counterfactual.png", "counterfactual-0.png", "counterfactual-1.png"} <= files
    assert record.to_dict()["sample_files"]["first"]["file"] == "counterfactual-0.png"
    # the first sample is the plain run's first sample (model frame), the shown one the edit
    plain = _run(calibrated, tmp_path / "p", box_segmenter, reference="input", samples=2,
                 counterfactual_edit="redraw")
    assert not plain.edited and plain.counterfactual_edit == {"mode": "redraw", "applied": False}
    assert "counterfactual-0.png" not in plain.artifacts_sha256
    result = calibrated.generate_request(_image(calibrated), ReviewRequest(**{**FAST, "samples": 2}))
    first = imaging.read_png_unit(tmp_path / "e" / "counterfactual-0.png")
    assert np.abs(first - imaging.content_of(result.counterfactuals_model[0], result.letterbox)).max() < 1e-4
    shown = imaging.read_png_unit(tmp_path / "e" / "counterfactual.png")
    assert shown.shape == amap.shape
    # and the map is the same either way (the edit changes what is shown, not the map)
    assert np.array_equal(amap, np.load(tmp_path / "p" / "attribution.npy"))
    # the run folder reads the shown counterfactual first
    folder = names.RunFolder(tmp_path / "e")
    assert folder.counterfactuals()[:2] == ["counterfactual.png", "counterfactual-0.png"]


def test_with_nothing_above_normal_the_edit_keeps_the_whole_image(calibrated, box_segmenter, tmp_path, monkeypatch):
    """A map nowhere above the normal level leaves no region to edit: the counterfactual shown is the input's own
    latent decoded (what the engine makes with an empty edit region), whatever the prompt; the first sample, kept
    beside it, is the redraw."""
    monkeypatch.setitem(calibrated.info.manifest, "map_scale", {**CALIBRATION, "level": 1e6})
    record = _run(calibrated, tmp_path / "e", box_segmenter, reference="input", counterfactual_edit="map_region")
    assert record.edited and record.counterfactual_edit is not None
    assert record.counterfactual_edit["region_fraction"] == 0.0
    size = calibrated.info.image_size
    kept = calibrated.generate_request(_image(calibrated), GenerationRequest(**FAST, prompt="anything"),
                                       edit_region=np.zeros((size, size), np.float32))
    shown = imaging.read_png_unit(tmp_path / "e" / "counterfactual.png")
    assert np.abs(shown - kept.counterfactual(0)).max() < 1e-4
    first = imaging.read_png_unit(tmp_path / "e" / "counterfactual-0.png")
    assert np.abs(first - imaging.content_of(kept.counterfactuals_model[0], kept.letterbox)).max() > 1e-2


def test_without_a_calibration_the_first_sample_is_shown_and_the_record_says_why(tiny_engine, box_segmenter,
                                                                                   tmp_path):
    record = _run(tiny_engine, tmp_path / "u", box_segmenter, counterfactual_edit="map_region")
    edit = record.counterfactual_edit
    assert edit is not None and edit["applied"] is False and edit["mode"] == "map_region"
    assert "no calibrated normal level" in edit["reason"] and "first sample is shown" in edit["reason"]
    assert not record.edited and "counterfactual-0.png" not in record.artifacts_sha256


def test_the_edited_run_is_reproducible_and_its_record_round_trips(calibrated, box_segmenter, tmp_path):
    a = _run(calibrated, tmp_path / "a", box_segmenter, reference="input", counterfactual_edit="map_region")
    b = _run(calibrated, tmp_path / "b", box_segmenter, reference="input", counterfactual_edit="map_region")
    assert a.artifacts_sha256["counterfactual.png"] == b.artifacts_sha256["counterfactual.png"]
    data = (tmp_path / "a" / "record.json").read_bytes()
    assert RunRecord.from_json(data).to_json() == data
    assert run_facts(a)["counterfactual"] == "edited where the map is above normal"


def test_the_edit_follows_the_preset_then_the_manifest_and_one_sample_methods_redraw(tiny_engine, monkeypatch):
    info = tiny_engine.info
    assert with_model_defaults(ReviewRequest(**FAST), info).counterfactual_edit == "redraw"
    monkeypatch.setitem(info.manifest, "counterfactual_edit", "map_region")
    assert with_model_defaults(ReviewRequest(**FAST), info).counterfactual_edit == "map_region"
    assert with_model_defaults(ReviewRequest(**FAST, map_method="ddim_inversion", samples=1),
                               info).counterfactual_edit == "redraw"
    preset = {"prompt": "normal chest x-ray", "strength": 0.5, "steps": 4, "counterfactual_edit": "redraw"}
    assert ReviewRequest.from_preset(preset).counterfactual_edit == "redraw"
    assert ReviewRequest.from_preset(preset, counterfactual_edit="map_region").counterfactual_edit == "map_region"


def test_one_sample_methods_show_their_own_counterfactual_whatever_the_preset(tiny_engine, monkeypatch):
    """A preset that shows the edit (vald-md-mini's healthy one) does not make a DDIM inversion or classifier-guided
    request fail: without an explicit choice those show their own counterfactual."""
    preset = {"prompt": "normal chest x-ray", "strength": 0.5, "steps": 4, "samples": 4,
              "counterfactual_edit": "map_region"}
    for method in ("ddim_inversion", "classifier_guided"):
        req = ReviewRequest.from_preset(preset, map_method=method)
        assert req.samples == 1 and req.counterfactual_edit == "redraw"
    req = resolve_request(ReviewRequest.from_preset(preset, map_method="ddim_inversion", reference="reconstruction"),
                          tiny_engine.info)
    assert req.counterfactual_edit == "redraw"
    assert ReviewRequest.from_preset(preset).counterfactual_edit == "map_region"


def test_bad_edit_choices_are_refused_with_a_readable_message(tiny_engine):
    with pytest.raises(ValueError, match=r"counterfactual_edit='whole'.*'map_region'.*'redraw'"):
        resolve_request(ReviewRequest(**FAST, counterfactual_edit="whole"), tiny_engine.info)
    with pytest.raises(ValueError, match="DDIM inversion difference map shows its own counterfactual"):
        resolve_request(ReviewRequest(**FAST, map_method="ddim_inversion", samples=1,
                                      counterfactual_edit="map_region"), tiny_engine.info)


def test_an_edit_costs_one_more_sample_in_the_queue():
    base = ReviewRequest(**FAST, samples=4, counterfactual_edit="redraw")
    edited = ReviewRequest(**FAST, samples=4, counterfactual_edit="map_region")
    assert job_cost(edited) - job_cost(base) == job_cost(ReviewRequest(**FAST, samples=1))


def test_the_cli_writes_the_edit(calibrated, tmp_path, monkeypatch):
    from app import cli

    src = tmp_path / "in.png"
    src.write_bytes(png_bytes())
    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: calibrated)
    rc = cli.main(["counterfactual", str(src), "--strength", "0.5", "--steps", "4", "--seed", "3",
                   "--reference", "input", "--no-lung-mask", "--counterfactual-edit", "map_region",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    record = json.loads(next((tmp_path / "out").rglob("record.json")).read_text())
    assert record["request"]["counterfactual_edit"] == "map_region"
    assert record["counterfactual_edit"]["applied"] is True
