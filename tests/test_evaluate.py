"""``vald-md evaluate`` end to end on the tiny in-code model and a few shared images.

generate (2 per class, 4 steps) -> resume -> tables (stand-in features, and once the real Inception) -> oracle
smoke -> localize on 3 lesions-rsna images with every baseline -> laterality. The metric functions themselves
are checked against references in tests/test_metrics.py; here the plumbing is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import cli, metrics
from app.evaluate import command
from app.evaluate.common import item_seed, prompt_side, read_items, select
from app.evaluate.generate import read_run
from app.evaluate.localize import (
    METRICS,
    LateralitySettings,
    LocalizeSettings,
    image_right_share,
    laterality_run,
    localize_run,
)
from app.evaluate.oracle import Oracle, train_oracle
from app.evaluate.tables import build_tables, frechet_distance_lowrank

ROOT = Path(__file__).resolve().parent.parent


class StandInFeatures:
    """64-d features (8x8 block means of a 64 px thumbnail): FID plumbing without the Inception network."""

    def features(self, images):
        out = []
        for img in images:
            small = np.asarray(Image.fromarray(np.asarray(img)).resize((64, 64), Image.Resampling.BILINEAR), float)
            out.append(small.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel() / 255.0)
        return np.stack(out)

    def describe(self):
        return {"implementation": "test stand-in: 8x8 block means", "weights_file": None, "weights_sha256": None,
                "preprocessing": "64 px bilinear", "feature_dim": 64}


def _generate_argv(model: Path, labels_csv: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "generate", "--model", str(model), "--data", str(labels_csv), "--steps", "4", "--out",
            str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def labels_csv(shared_data) -> Path:
    return shared_data / "cxr256" / "labels.csv"


@pytest.fixture(scope="module")
def model_dir(tiny_engine) -> Path:
    return Path(tiny_engine.info.path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir, labels_csv) -> Path:
    """A run folder with a healthy sub-run (2 covid, 2 viral pneumonia) and a 'COVID 19' induction (2 normals)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert cli.main(_generate_argv(model_dir, labels_csv, out, "--labels", "covid,viral_pneumonia",
                                   "--limit", "2")) == 0
    assert cli.main(_generate_argv(model_dir, labels_csv, out, "--induce", "COVID 19", "--limit", "2")) == 0
    return out


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory, labels_csv) -> Path:
    out = tmp_path_factory.mktemp("oracle")
    train_oracle(labels_csv, out, epochs=1, limit=4, batch_size=8, stream=io.StringIO())
    return out


# ----------------------------------------------------------------------------------------------------------------
# pure pieces (no data)
# ----------------------------------------------------------------------------------------------------------------
def test_lowrank_fid_equals_the_sqrtm_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 12)), rng.normal(0.3, 1.2, size=(50, 12))  # full rank: sqrtm is accurate
    assert frechet_distance_lowrank(a, b) == pytest.approx(metrics.fid_from_features(a, b), rel=1e-9)
    assert frechet_distance_lowrank(a, a) == pytest.approx(0.0, abs=1e-9)


def test_lowrank_fid_is_exact_for_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 40)), rng.normal(0.5, 2.0, size=(9, 40))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    expected = d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance_lowrank(a, b) == pytest.approx(expected, rel=1e-8)


def test_image_right_share_and_prompt_side():
    m = np.zeros((4, 5))
    m[:, 3:] = -1.0  # image right (patient's left); the middle column 2 is ignored
    m[:, 2] = 9.0
    assert image_right_share(m) == 1.0
    assert prompt_side("opacity in the LEFT lung") == "left"
    assert prompt_side("opacity in the right lung") == "right"
    assert prompt_side("left and right") is None and prompt_side("COVID 19") is None


def test_cli_rejects_incompatible_flags():
    with pytest.raises(SystemExit) as e:
        command.parse_args(["generate", "--data", "x.csv", "--out", "o", "--prompt", "a", "--induce", "b"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        command.parse_args(["generate", "--data", "x.csv", "--out", "o", "--induce-label", "covid"])
    with pytest.raises(SystemExit):
        command.parse_args(["generate", "--data", "x.csv", "--out", "o", "--limit", "0"])


def test_docs_cover_every_evaluate_command():
    doc = (ROOT / "docs" / "EVALUATION.md").read_text()
    sub = next(a for a in command.build_parser()._actions if a.dest == "evaluate_command")
    for name in sub.choices:
        assert f"vald-md evaluate {name}" in doc, name


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------
def test_selection_is_stable_when_the_limit_grows(labels_csv):
    _, items = read_items(labels_csv, "test")
    two, three = select(items, ["covid"], 2), select(items, ["covid"], 3)
    assert three[:2] == two and all(it.label == "covid" for it in three)


def test_generate_writes_outputs_and_records(run_dir, tiny_engine):
    meta, recs = read_run(run_dir / "healthy")
    assert sorted(r["label"] for r in recs) == ["covid", "covid", "viral_pneumonia", "viral_pneumonia"]
    assert meta["strength"] == 0.85 and meta["guidance_scale"] == 7.5 and meta["steps"] == 4  # preset + flag
    assert meta["model_hash"] == tiny_engine.info.model_hash and "torch" in meta["library_versions"]
    for r in recs:
        assert not Path(r["input"]).is_absolute() and r["input"].startswith("test/")
        assert r["seed"] == item_seed(0, r["input"]) and r["seeds"] == [r["seed"]]
        assert r["effective_steps"] == 3 and r["timings_s"]["total"] > 0
        assert r["model_hash"] == tiny_engine.info.model_hash
        with Image.open(run_dir / "healthy" / r["outputs"]["counterfactuals"][0]) as im:
            assert im.mode == "L" and im.size == (256, 256)  # 8-bit, native frame
        m = np.load(run_dir / "healthy" / r["outputs"]["map"])
        assert m.dtype == np.float16 and m.shape == (256, 256)
        assert (run_dir / "healthy" / r["outputs"]["reconstruction"]).is_file()
    meta_i, recs_i = read_run(run_dir / "induce-covid-19")
    assert meta_i["mode"] == "induce" and meta_i["target_label"] == "covid" and meta_i["prompt"] == "COVID 19"
    assert [r["label"] for r in recs_i] == ["normal", "normal"]


def test_generate_run_json_keeps_its_key_order(run_dir):
    # the order run.json had before GenerateSettings became a GenerationRequest (e818d1f): the same bytes
    meta = json.loads((run_dir / "healthy" / "run.json").read_text())
    assert list(meta) == [
        "vald_md_eval_run", "mode", "prompt", "strength", "guidance_scale", "steps", "split", "labels", "limit",
        "samples", "seed", "scheduler", "negative_prompt", "target_label", "effective_steps", "seed_rule",
        "data_root", "data", "model", "model_hash", "library_versions", "created_at", "map"]
    assert isinstance(meta["scheduler"], str) and isinstance(meta["labels"], list) and meta["seed"] == 0


def test_generate_resumes_and_refuses_other_settings(run_dir, model_dir, labels_csv, capsys):
    healthy = run_dir / "healthy"
    before = {p: p.stat().st_mtime_ns for p in healthy.rglob("*.png")}
    capsys.readouterr()
    argv = _generate_argv(model_dir, labels_csv, run_dir, "--labels", "covid,viral_pneumonia", "--limit", "2")
    assert cli.main(argv) == 0
    assert "0 generated, 4 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in healthy.rglob("*.png")} == before
    assert len((healthy / "records.jsonl").read_text().splitlines()) == 4

    # an image whose outputs are incomplete is made again, bit-identically (its seed depends on its path only)
    _, recs = read_run(healthy)
    cf = healthy / recs[0]["outputs"]["counterfactuals"][0]
    old = cf.read_bytes()
    cf.unlink()
    assert cli.main(argv) == 0
    assert "1 generated, 3 already done" in capsys.readouterr().out
    assert cf.read_bytes() == old
    assert len(read_run(healthy)[1]) == 4

    assert cli.main([*argv, "--strength", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_generate_prints_progress_with_eta(tmp_path, model_dir, labels_csv, capsys):
    assert cli.main(_generate_argv(model_dir, labels_csv, tmp_path, "--labels", "covid", "--limit", "1")) == 0
    err = capsys.readouterr().err
    assert "generate[healthy] 1/1" in err and "ETA" in err and "s/item" in err


# ----------------------------------------------------------------------------------------------------------------
# oracle and tables
# ----------------------------------------------------------------------------------------------------------------
def test_oracle_trains_and_scores(oracle_dir):
    rec = json.loads((oracle_dir / "oracle.json").read_text())
    assert rec["epochs"] == 1 and rec["best_epoch"] == 1
    assert 0 <= rec["test"]["accuracy"] <= 1 and 0 <= rec["test"]["auroc"] <= 1 and rec["test"]["n"] == 12
    oracle = Oracle(oracle_dir)
    p = oracle.p_abnormal([np.zeros((40, 30), np.uint8), np.full((64, 64), 0.5, np.float32)])
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))


def test_tables_with_a_stand_in_feature_extractor(run_dir, oracle_dir, tmp_path, labels_csv):
    out = tmp_path / "tables"
    report = build_tables(run_dir, out=out, extractor=StandInFeatures(), oracle_dir=oracle_dir, real_limit=3,
                          figure_rows=2, stream=io.StringIO())
    # Table 1: known answer for FID(real covid, real healthy) from the same features
    _, items = read_items(labels_csv, "test")
    fx = StandInFeatures()

    def feats(label):
        from app.evaluate.common import load_u8

        return fx.features(load_u8(it.path) for it in select(items, [label], 3))

    t1 = {r["class"]: r for r in report["table1"]}
    assert set(t1) == {"covid", "viral_pneumonia"}
    assert t1["covid"]["fid_class_vs_real_healthy"] == pytest.approx(
        frechet_distance_lowrank(feats("covid"), feats("normal")), rel=1e-9)
    r = t1["covid"]
    assert r["relative_absolute_difference"] == pytest.approx(
        abs(r["fid_class_vs_generated_healthy"] - r["fid_class_vs_real_healthy"]) / r["fid_class_vs_real_healthy"])
    assert (r["n_real_class"], r["n_generated_healthy"], r["n_real_healthy"]) == (3, 2, 3)
    assert [row["generated_from"] for row in report["table2"]] == ["covid", "viral_pneumonia", "all disease classes"]
    for row in report["table3"]:
        assert 0 <= row["ms_ssim_mean"] <= 1 and -1 <= row["ssim_mean"] <= 1 and row["n"] == 2
        # mean |M| with both references; the reconstruction-referenced map is the input-referenced one minus the
        # autoencoder's own change, so the two differ
        assert 0 < row["mean_abs_map_input_mean"] < 1 and 0 < row["mean_abs_map_reconstruction_mean"] < 1
        assert row["mean_abs_map_input_mean"] != pytest.approx(row["mean_abs_map_reconstruction_mean"], rel=1e-6)
    (t4,) = report["table4"]
    assert t4["induced_class"] == "covid" and t4["n_generated"] == 2 and t4["fid_real_class_vs_generated"] >= 0
    v = report["validity"]
    assert {row["class"] for row in v["healthy"]} == {"covid", "viral_pneumonia"}
    assert 0 <= v["healthy"][0]["called_normal_counterfactual"] <= 1 and v["induction"][0]["n"] == 2
    for f in report["figures"]:
        with Image.open(out / f) as im:
            assert im.mode == "RGB"
    assert len(report["figures"]) == 3
    md = (out / "tables.md").read_text()
    for needle in ("## Table 1", "## Table 2", "## Table 3", "## Table 4", "Counterfactual validity",
                   "test stand-in", "lung_opacity", "cardiomegaly", report["provenance"]["model_hashes"][0],
                   "base seed 0", "torch", "N class / generated / real healthy", "reference reconstruction"):
        assert needle in md, needle
    assert json.loads((out / "tables.json").read_text())["table1"][0]["class"] == "covid"


def test_tables_with_the_real_inception(run_dir, tmp_path, capsys):
    try:
        metrics.default_fid_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "real"
    assert cli.main(["evaluate", "tables", "--run", str(run_dir), "--real-limit", "2", "--figure-rows", "1",
                     "--out", str(out)]) == 0
    report = json.loads((out / "tables.json").read_text())
    assert report["provenance"]["fid_features"]["weights_sha256"] == metrics.FID_HELPER_SHA256
    values = [r["fid_class_vs_generated_healthy"] for r in report["table1"]]
    values += [r["fid_real_healthy_vs_generated"] for r in report["table4"]]
    assert all(math.isfinite(x) and x >= -1e-6 for x in values)
    assert "default_1.pt" in (out / "tables.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# localization and laterality
# ----------------------------------------------------------------------------------------------------------------
def test_localize_scores_every_method_on_lesion_boxes(tiny_engine, shared_data, tmp_path):
    out = tmp_path / "loc"
    settings = LocalizeSettings(limit=3, steps=4, samples=2, n_boot=200, figure_rows=2)
    summary = localize_run(tiny_engine, shared_data / "lesions-rsna", out, settings, stream=io.StringIO())
    methods = ["cf_input", "cf_recon", "cf_input_mean2", "cf_recon_mean2", "empty_input", "empty_recon",
               "intensity", "random"]
    assert summary["n_images"] == 3 and list(summary["aggregate"]) == methods
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(methods) and set(METRICS) <= set(rows[0])
    assert abs(summary["aggregate"]["random"]["pixel_auroc"]["mean"] - 0.5) < 0.05
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert ("cf_recon", "cf_input") in pairs and ("cf_recon_mean2", "cf_input_mean2") in pairs
    assert summary["reference"]["better"] in ("input", "reconstruction")
    md = (out / "summary.md").read_text()
    assert "Which map reference localizes better" in md and summary["reference"]["statement"] in md
    assert (out / "figures" / "localize_examples.png").is_file()
    # a second call resumes: nothing new is scored
    again = localize_run(tiny_engine, shared_data / "lesions-rsna", out, replace(settings, figure_rows=0),
                         stream=io.StringIO())
    assert again["aggregate"]["cf_input"]["pixel_auroc"] == summary["aggregate"]["cf_input"]["pixel_auroc"]


def test_localize_mask_folder_with_a_region_mask(tiny_engine, shared_data, tmp_path):
    """Image + mask pairs from any folder, and a region mask applied to every method alike."""
    src = shared_data / "lesions-rsna"
    boxes = {}
    with open(src / "boxes.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["label"] == "opacity":
                boxes.setdefault(r["image"], []).append(tuple(float(r[k]) for k in ("x", "y", "width", "height")))
    names = sorted(boxes)[:2]
    images, masks, regions = (tmp_path / n for n in ("images", "masks", "regions"))
    for d in (images, masks, regions):
        d.mkdir()
    for n in names:
        (images / n).write_bytes((src / "images" / n).read_bytes())
        Image.fromarray(metrics.boxes_to_mask(boxes[n], (512, 512)).astype(np.uint8) * 255).save(masks / n)
        region = np.zeros((512, 512), np.uint8)
        region[32:480, 32:480] = 255
        Image.fromarray(region).save(regions / n)
    settings = LocalizeSettings(masks=masks, regions=regions, steps=4, samples=1, n_boot=100, figure_rows=0)
    summary = localize_run(tiny_engine, images, tmp_path / "out", settings, stream=io.StringIO())
    assert summary["n_images"] == 2 and "cf_input_mean1" not in summary["aggregate"]
    assert summary["settings"]["regions"] == str(regions)
    recs = [json.loads(line) for line in (tmp_path / "out" / "per_image.jsonl").read_text().splitlines()]
    lesion = metrics.boxes_to_mask(boxes[recs[0]["image"]], (512, 512))
    region = np.zeros((512, 512), bool)
    region[32:480, 32:480] = True
    assert recs[0]["lesion_fraction"] == pytest.approx((lesion & region).sum() / region.sum())


def test_laterality_of_localized_prompts(tiny_engine, labels_csv, tmp_path):
    summary = laterality_run(tiny_engine, labels_csv, tmp_path, LateralitySettings(limit=2, steps=4),
                             stream=io.StringIO())
    assert [(p["side"], p["n"]) for p in summary["prompts"]] == [("left", 2), ("right", 2)]
    for p in summary["prompts"]:
        assert 0 <= p["named_side_share"]["mean"] <= 1
    assert summary["paired"]["n"] == 2
    assert (tmp_path / "laterality.md").read_text().count("opacity in the") >= 2
    assert (tmp_path / "induce-opacity-in-the-left-lung" / "records.jsonl").is_file()


def test_find_subruns_passes_over_folders_that_generate_did_not_write(tmp_path):
    from app.evaluate.generate import find_subruns

    for name, run in (("healthy", {"mode": "healthy"}), ("induce-covid-19", {"mode": "induce"}),
                      ("localize", {"vald_md_localize": 1}), ("oracle", None)):
        (tmp_path / name).mkdir()
        if run is not None:
            (tmp_path / name / "run.json").write_text(json.dumps(run))
    assert [p.name for p in find_subruns(tmp_path)] == ["healthy", "induce-covid-19"]
    assert find_subruns(tmp_path / "healthy") == [tmp_path / "healthy"]
    with pytest.raises(FileNotFoundError, match="no generate sub-run"):
        find_subruns(tmp_path / "localize")


def test_localize_and_laterality_settings_refuse_bad_values_before_any_work(tiny_engine, tmp_path):
    with pytest.raises(ValueError, match=r"samples=17 must be in \[1, 16\]"):
        localize_run(tiny_engine, tmp_path, tmp_path / "out", LocalizeSettings(samples=17))
    with pytest.raises(ValueError, match="must name exactly one side"):
        laterality_run(tiny_engine, tmp_path, tmp_path / "out", LateralitySettings(prompts=("opacity in the lungs",)))
    assert (LocalizeSettings().samples, LateralitySettings().samples) == (4, 1)  # the CLI's defaults
    assert not (tmp_path / "out").exists()
