"""The one generation request (app/generation.py): presets to requests, schedulers, and every entry point running
the scheduler a model's preset names (the tiny model with a DPM-Solver++ preset)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import engine, modelfolder
from app.generation import PRESETS, GenerationRequest, Preset, Scheduler, model_presets
from app.runs.review import ReviewRequest, run_review


# ----------------------------------------------------------------------------------------------------------------
# the request on its own
# ----------------------------------------------------------------------------------------------------------------
def test_from_preset_fills_unset_fields_from_the_preset_then_the_paper():
    req = GenerationRequest.from_preset({"prompt": "clear lungs", "strength": 0.6, "scheduler": "dpm++"},
                                        steps=None, seed=3, samples=2)
    assert (req.prompt, req.strength, req.guidance_scale, req.steps) == ("clear lungs", 0.6, 7.5, 75)
    assert req.scheduler is Scheduler.DPM_PP and (req.seed, req.samples) == (3, 2)
    assert GenerationRequest.from_preset(None) == GenerationRequest()
    assert GenerationRequest.from_preset(PRESETS["healthy-fast"]).scheduler is Scheduler.DPM_PP


def test_given_fields_win_over_the_preset():
    req = GenerationRequest.from_preset({"scheduler": "dpm++", "steps": 20}, scheduler="ddim", steps=8)
    assert req.scheduler is Scheduler.DDIM and req.steps == 8


def test_an_unsupported_preset_scheduler_fails_with_the_preset_named():
    with pytest.raises(ValueError, match=r"preset 'fancy'.*scheduler='unipc' is not supported.*pndm, ddim"):
        GenerationRequest.from_preset({"scheduler": "unipc"}, preset_name="fancy")
    with pytest.raises(ValueError, match="preset 'healthy'"):
        model_presets({"healthy": {"scheduler": "unipc"}})


def test_requests_are_frozen_and_names_become_schedulers():
    req = ReviewRequest(scheduler="euler", map_method="sdedit")
    assert req.scheduler is Scheduler.EULER and req.scheduler == "euler"
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.seed = 1  # type: ignore[misc]
    assert json.dumps(dataclasses.asdict(req)["scheduler"]) == '"euler"'
    assert GenerationRequest(seed=5).parameters(5)["scheduler"] == "pndm"


def test_check_refuses_out_of_range_values_once():
    with pytest.raises(ValueError, match=r"strength=1\.5"):
        GenerationRequest(strength=1.5).check()
    with pytest.raises(ValueError, match="no denoising step"):
        ReviewRequest(steps=2, strength=0.2).check()


def test_builtin_presets_keep_their_fields():
    assert PRESETS["healthy"] == Preset("healthy", "normal chest x-ray", 0.85, 7.5, 75, PRESETS["healthy"].description)
    assert engine.PRESETS is PRESETS and engine.SCHEDULERS == ("pndm", "ddim", "dpm++", "euler")


# ----------------------------------------------------------------------------------------------------------------
# a model whose presets recommend DPM-Solver++: every entry point must run it
# ----------------------------------------------------------------------------------------------------------------
DPM_PRESETS = {"healthy": {"prompt": "normal chest x ray", "strength": 0.5, "guidance_scale": 2.0, "steps": 8,
                           "scheduler": "dpm++"},
               "induce": {"prompt": "cardiomegaly", "strength": 0.5, "guidance_scale": 2.0, "steps": 6,
                          "scheduler": "euler"}}


def _with_presets(src: str, out: Path, presets: dict) -> Path:
    shutil.copytree(src, out)
    manifest = json.loads((out / modelfolder.MANIFEST).read_text())
    (out / modelfolder.MANIFEST).write_text(json.dumps({**manifest, "presets": presets}))
    return out


@pytest.fixture(scope="module")
def dpm_engine(tiny_engine, tmp_path_factory):
    folder = _with_presets(tiny_engine.info.path, tmp_path_factory.mktemp("dpm") / "tiny-dpm", DPM_PRESETS)
    return engine.CounterfactualEngine(folder, device="cpu")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 32)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_unsupported_scheduler_in_a_manifest_preset_refuses_the_model(tiny_engine, tmp_path):
    folder = _with_presets(tiny_engine.info.path, tmp_path / "bad", {"healthy": {"scheduler": "unipc"}})
    with pytest.raises(modelfolder.ModelFolderError, match=r"preset 'healthy'.*'unipc' is not supported"):
        engine.CounterfactualEngine(folder, device="cpu")


def test_the_engine_runs_the_scheduler_the_preset_names(dpm_engine, tmp_path):
    from app.web.forms import GenerationParams

    req = GenerationParams().to_request(dpm_engine.info)
    assert req.scheduler is Scheduler.DPM_PP and req.steps == 8
    record = run_review(dpm_engine, _png(), dataclasses.replace(req, seed=1), tmp_path / "dpm")
    assert record.parameters.scheduler == "dpm++"
    assert type(dpm_engine.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # DPM-Solver++ evaluates the UNet once per step; PNDM (what ran before the fix) adds a warm-up evaluation
    assert record.unet_evaluations == record.effective_steps == 4
    pndm = run_review(dpm_engine, _png(), dataclasses.replace(req, seed=1, scheduler=Scheduler.PNDM),
                      tmp_path / "pndm")
    assert pndm.unet_evaluations == 5 and type(dpm_engine.pipe.scheduler).__name__ == "PNDMScheduler"


def test_the_form_and_the_api_default_to_the_preset_scheduler(dpm_engine):
    from app.web.forms import FormValues, GenerationParams, ReviewFormParams, parameter_presets

    assert FormValues.defaults(dpm_engine.info).scheduler == "dpm++"
    assert ReviewFormParams.model_validate({}).to_request(dpm_engine.info).scheduler is Scheduler.DPM_PP
    assert GenerationParams.model_validate({"scheduler": "ddim"}).to_request(dpm_engine.info).scheduler == "ddim"
    shown = {p["key"]: p["scheduler"] for p in parameter_presets(dpm_engine.info)}
    assert shown["healthy"] == "dpm++" and shown["induce"] == "euler" and shown["healthy-fast"] == "dpm++"


def test_the_cli_runs_the_preset_scheduler(dpm_engine, tmp_path, monkeypatch):
    from app import cli

    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: dpm_engine)
    src = tmp_path / "scan.png"
    src.write_bytes(_png())
    assert cli.main(["counterfactual", str(src), "--no-lung-mask", "--out", str(tmp_path / "a")]) == 0
    params = json.loads((tmp_path / "a" / "0000" / "record.json").read_text())["parameters"]
    assert (params["scheduler"], params["steps"], params["strength"]) == ("dpm++", 8, 0.5)
    assert cli.main(["counterfactual", str(src), "--no-lung-mask", "--scheduler", "pndm",
                     "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "0000" / "record.json").read_text())["parameters"]["scheduler"] == "pndm"


def test_evaluate_takes_the_named_preset_scheduler(dpm_engine):
    from app.evaluate.command import _request
    from app.evaluate.generate import GenerateSettings

    args = argparse.Namespace(prompt=None, strength=None, guidance=None, steps=None, samples=1, seed=0,
                              scheduler=None)
    assert _request(dpm_engine, args).scheduler is Scheduler.DPM_PP
    settings = _request(dpm_engine, args, "induce", GenerateSettings, mode="induce", prompt="cardiomegaly",
                        labels=("normal",))
    assert isinstance(settings, GenerateSettings)
    assert (settings.scheduler, settings.steps, settings.prompt) == (Scheduler.EULER, 6, "cardiomegaly")
    with pytest.raises(ValueError, match=r"strength=2.0"):
        _request(dpm_engine, argparse.Namespace(**{**vars(args), "strength": 2.0}))


def test_one_seed_draw_for_every_entry_point(monkeypatch):
    from app import generation

    seeds = {generation.draw_seed() for _ in range(50)}
    assert all(isinstance(s, int) and 0 <= s < generation.SEED_DRAW_LIMIT == 2**31 - 1 for s in seeds)
    assert len(seeds) > 1
    app_dir = Path(__file__).resolve().parent.parent / "app"
    drawn_elsewhere = [p.relative_to(app_dir).as_posix() for p in app_dir.rglob("*.py")
                       if "integers(0, 2**31" in p.read_text() or "randbelow(" in p.read_text()]
    assert drawn_elsewhere == ["generation.py"]  # the engine, the review run and the job queue call draw_seed()


def test_the_preset_defaults_are_said_where_they_are_chosen():
    """The API's, the form's and the CLI's prompt and sampler default to the model's preset (issue 17), and say so,
    with the embedded model's values."""
    from app.cli import build_parser
    from app.web.forms import GenerationParams

    props = GenerationParams.model_json_schema()["properties"]
    assert "default: the model's preset (the embedded model: dpm++)" in props["scheduler"]["description"]
    assert "the embedded model: 'normal chest x-ray'" in props["prompt"]["description"]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["counterfactual"]._actions}
    assert "default: the model's preset (the embedded model: dpm++)" in str(helps["scheduler"])
    assert "the embedded model: 'normal chest x-ray'" in str(helps["prompt"])
    embedded = json.loads((modelfolder.DEFAULT_MODEL_DIR / modelfolder.MANIFEST).read_text())["presets"]["healthy"]
    assert (embedded["scheduler"], embedded["prompt"]) == ("dpm++", "normal chest x-ray")  # what the texts say


# ----------------------------------------------------------------------------------------------------------------
# issue 16: a model whose healthy preset averages two samples and whose maps keep the density removed
# ----------------------------------------------------------------------------------------------------------------
SAMPLED_PRESETS = {"healthy": {"prompt": "normal chest x ray", "strength": 0.5, "guidance_scale": 2.0, "steps": 4,
                               "scheduler": "pndm", "samples": 2},
                   "induce": {"prompt": "cardiomegaly", "strength": 0.5, "guidance_scale": 2.0, "steps": 4,
                              "map_polarity": "both"}}


@pytest.fixture(scope="module")
def sampled_engine(tiny_engine, tmp_path_factory):
    folder = _with_presets(tiny_engine.info.path, tmp_path_factory.mktemp("sampled") / "tiny-sampled",
                           SAMPLED_PRESETS)
    manifest = json.loads((folder / modelfolder.MANIFEST).read_text())
    (folder / modelfolder.MANIFEST).write_text(json.dumps({**manifest, "map_polarity": "removed"}))
    return engine.CounterfactualEngine(folder, device="cpu")


def test_from_preset_takes_the_presets_samples_and_map_polarity():
    preset = {"prompt": "p", "samples": 3, "map_polarity": "removed"}
    assert GenerationRequest.from_preset(preset).samples == 3
    assert GenerationRequest.from_preset(preset, samples=None).samples == 3
    assert GenerationRequest.from_preset(preset, samples=1).samples == 1  # given wins
    assert GenerationRequest.from_preset({"prompt": "p"}).samples == 1 == PRESETS["healthy"].samples
    assert not hasattr(GenerationRequest.from_preset(preset), "map_polarity")  # only requests that have it
    req = ReviewRequest.from_preset(preset)
    assert req.map_polarity == "removed" and ReviewRequest.from_preset(preset, map_polarity="both").map_polarity \
        == "both"
    assert ReviewRequest.from_preset({"prompt": "p"}).map_polarity is None  # the manifest's, when resolved
    # a one-sample map method makes one sample unless asked for more (which it then refuses)
    assert ReviewRequest.from_preset(preset, map_method="ddim_inversion").samples == 1
    assert ReviewRequest.from_preset(preset, map_method="ddim_inversion", samples=2).samples == 2


def test_the_api_and_the_form_default_to_the_presets_samples_and_the_models_polarity(sampled_engine):
    from app.runs.review import resolve_request
    from app.web.forms import FormValues, GenerationParams, ReviewFormParams, parameter_presets

    info = sampled_engine.info
    req = GenerationParams().to_request(info)
    assert req.samples == 2 and req.map_polarity is None
    assert resolve_request(req, info).map_polarity == "removed"
    given = GenerationParams.model_validate({"samples": "1", "map_polarity": "both"}).to_request(info)
    assert given.samples == 1 and resolve_request(given, info).map_polarity == "both"
    assert ReviewFormParams.model_validate({}).to_request(info).samples == 2
    form = FormValues.defaults(info)
    assert form.samples == 2 and form.map_polarity == "removed"
    shown = {p["key"]: p for p in parameter_presets(info)}
    assert shown["healthy"]["samples"] == 2 and shown["healthy"]["map_polarity"] is None
    assert shown["induce"]["samples"] == 1 and shown["induce"]["map_polarity"] == "both"
    assert shown["paper"]["samples"] == 1
    # a model without the keys: one sample, both directions, as before
    plain = FormValues.defaults(_plain_info())  # type: ignore[arg-type]
    assert (plain.samples, plain.map_polarity) == (1, "both")


def _plain_info():
    from types import SimpleNamespace

    return SimpleNamespace(presets={k: vars(v) for k, v in PRESETS.items()}, manifest={})


def test_the_cli_runs_the_presets_samples_and_the_models_polarity(sampled_engine, tmp_path, monkeypatch):
    from app import cli

    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: sampled_engine)
    src = tmp_path / "scan.png"
    src.write_bytes(_png())
    assert cli.main(["counterfactual", str(src), "--no-lung-mask", "--out", str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a" / "0000" / "record.json").read_text())
    assert rec["parameters"]["samples"] == 2 and len(rec["seeds"]) == 2
    assert rec["request"]["map_polarity"] == "removed" and rec["map_label"].startswith("max(")
    assert (np.load(tmp_path / "a" / "0000" / "attribution.npy") >= 0).all()
    assert cli.main(["counterfactual", str(src), "--no-lung-mask", "--samples", "1", "--map-polarity", "both",
                     "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "b" / "0000" / "record.json").read_text())
    assert rec["parameters"]["samples"] == 1 and rec["request"]["map_polarity"] == "both"
    with pytest.raises(SystemExit):
        cli.main(["counterfactual", str(src), "--map-polarity", "positive", "--out", str(tmp_path / "c")])


def test_the_papers_built_in_presets_name_both_map_directions():
    """The paper's map is |original − counterfactual|: its presets set the form's polarity to "both" even where the
    model's default keeps only the density removed; the built-in "healthy" leaves it to the model."""
    from app.runs.review import ReviewRequest

    for name in ("paper", "healthy-fast", "training-section"):
        assert ReviewRequest.from_preset(PRESETS[name], preset_name=name).map_polarity == "both"
        assert ReviewRequest.from_preset(PRESETS[name], preset_name=name, map_polarity="removed").map_polarity == \
            "removed"
    assert ReviewRequest.from_preset(PRESETS["healthy"]).map_polarity is None


def test_the_papers_built_in_presets_name_an_unsmoothed_map():
    """The paper's map is unsmoothed: its presets set the form's map smoothing to 0 even where the model's default
    smooths; the built-in "healthy" leaves it to the model."""
    for name in ("paper", "healthy-fast", "training-section"):
        assert PRESETS[name].map_smoothing == 0.0
        assert ReviewRequest.from_preset(PRESETS[name], preset_name=name).map_smoothing == 0.0
        assert ReviewRequest.from_preset(PRESETS[name], preset_name=name, map_smoothing=4.0).map_smoothing == 4.0
    assert ReviewRequest.from_preset(PRESETS["healthy"]).map_smoothing is None


def test_map_smoothing_comes_from_the_request_then_the_preset_then_the_manifest_then_zero():
    from types import SimpleNamespace

    from app.runs.review import resolve_request, with_model_defaults

    preset = {"prompt": "p", "map_smoothing": 2}
    assert ReviewRequest.from_preset(preset).map_smoothing == 2.0
    assert isinstance(ReviewRequest.from_preset(preset).map_smoothing, float)
    assert ReviewRequest.from_preset(preset, map_smoothing=0.0).map_smoothing == 0.0  # given wins, 0 included
    assert not hasattr(GenerationRequest.from_preset(preset), "map_smoothing")  # only requests that have it
    info = SimpleNamespace(manifest={"map_smoothing": 4})
    assert with_model_defaults(ReviewRequest.from_preset(preset), info).map_smoothing == 2.0
    assert with_model_defaults(ReviewRequest.from_preset({"prompt": "p"}), info).map_smoothing == 4.0
    assert with_model_defaults(ReviewRequest(map_smoothing=0.0), info).map_smoothing == 0.0
    plain = with_model_defaults(ReviewRequest(), SimpleNamespace(manifest={}))
    assert plain.map_smoothing == 0.0 and resolve_request(plain, SimpleNamespace(manifest={})) == plain
    with pytest.raises(ValueError, match=r"map_smoothing=20.0 must be within \[0, 16\] pixels of the model's frame"):
        resolve_request(ReviewRequest(), SimpleNamespace(manifest={"map_smoothing": 20}))


def test_the_form_and_the_cli_default_to_the_models_map_smoothing(tiny_engine, tmp_path, monkeypatch):
    from app import cli
    from app.web.forms import FormValues, GenerationParams, parameter_presets

    info = tiny_engine.info
    assert FormValues.defaults(info).map_smoothing == 0.0  # a model without the key: unsmoothed, as before
    monkeypatch.setitem(info.manifest, "map_smoothing", 2.0)
    assert FormValues.defaults(info).map_smoothing == 2.0
    assert GenerationParams().to_request(info).map_smoothing is None  # resolved to the manifest's by the run
    assert GenerationParams.model_validate({"map_smoothing": "0"}).to_request(info).map_smoothing == 0.0
    shown = {p["key"]: p for p in parameter_presets(info)}
    assert shown["paper"]["map_smoothing"] == 0.0 and shown["healthy"]["map_smoothing"] is None
    monkeypatch.setitem(info.presets, "healthy", {**info.presets["healthy"], "map_smoothing": 1.0})
    assert FormValues.defaults(info).map_smoothing == 1.0  # the preset's wins over the manifest's
    monkeypatch.setattr("app.engine.CounterfactualEngine", lambda *a, **k: tiny_engine)
    src = tmp_path / "scan.png"
    src.write_bytes(_png())
    fast = ["--strength", "0.5", "--steps", "4", "--no-lung-mask"]
    assert cli.main(["counterfactual", str(src), *fast, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "0000" / "record.json").read_text())["request"]["map_smoothing"] == 1.0
    assert cli.main(["counterfactual", str(src), *fast, "--map-smoothing", "3", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "0000" / "record.json").read_text())["request"]["map_smoothing"] == 3.0
    assert cli.main(["counterfactual", str(src), *fast, "--map-smoothing", "17", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
