"""The run package's read side (``app.runs``): the typed record, the one hash-checked reader of a run folder, and
``app.fileio``. No model: the run folders are the synthetic ones of ``tests.test_exports`` (run_review's own
records are round-tripped in ``tests/test_artifacts.py``)."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pydicom
import pytest

from app import fileio
from app.pacs.derived import StoreMode, build_derived
from app.runs import exports, folder
from app.runs.folder import ArtifactChangedError, RunFolder, RunFolderError
from app.runs.record import RunParameters, RunRecord
from tests.test_exports import make_run, synthetic_cr

# A record as the first versions wrote it: no map method, label, region, lung mask, compute or calibration; the
# key order of the time. Old run folders must still open, and their record.json must export byte for byte.
OLD_RECORD = {
    "vald_md_record": 1,
    "created_at": "2025-01-02T03:04:05.123456+00:00",
    "input": {"sha256": "ab" * 32, "pixels_sha256": "cd" * 32, "source_format": "png", "rows": 48, "columns": 40},
    "parameters": {"prompt": "normal chest x-ray", "negative_prompt": "", "strength": 0.85, "guidance_scale": 7.5,
                   "steps": 75, "seed": None, "scheduler": "pndm", "samples": 2},
    "effective_steps": 63,
    "start_timestep": 841,
    "unet_evaluations": 64,
    "seeds": [1, 2],
    "timings_s": {"total": 12.5},
    "model_hash": "0f" * 32,
    "letterbox": {"native_height": 48, "native_width": 40, "size": 64, "scale": 1.333, "offset_x": 5, "offset_y": 0},
    "library_versions": {"torch": "2.1.0"},
    "request": {"window": "auto", "reference": None, "smoothing_sigma": 0.0, "mask": True},
    "map_summary": {"mean_abs_in_mask": 0.01},
    "artifacts_sha256": {"input.png": "00" * 32},
    "disclaimer": "AI-generated counterfactual \u2014 not for diagnostic use",
    "a_key_of_a_later_version": {"kept": [1, 2.5, None]},
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run", synthetic_cr(), samples=3)


# ----------------------------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("indent", [2, None])
def test_old_and_unknown_records_round_trip_byte_for_byte(indent):
    data = json.dumps(OLD_RECORD, indent=indent).encode()
    record = RunRecord.from_json(data)
    if indent == 2:  # the format run_review writes
        assert record.to_json() == data
    assert record.to_dict() == OLD_RECORD and list(record.to_dict()) == list(OLD_RECORD)
    assert RunRecord.from_json(record.to_json()) == record
    assert record.unknown == {"a_key_of_a_later_version": {"kept": [1, 2.5, None]}}


def test_map_label_of_record_still_reads_a_records_dict():
    from app import rendering
    from app.rendering import map_label_of_record  # compatibility: the old public name (now RunRecord.label)

    assert "map_label_of_record" in rendering.__all__
    assert map_label_of_record(OLD_RECORD) == RunRecord.from_dict(OLD_RECORD).label == "original − counterfactual"
    newer = {**OLD_RECORD, "map_method": "classifier_guided",
             "request": {**OLD_RECORD["request"], "reference": "reconstruction"}}
    assert map_label_of_record(newer) == RunRecord.from_dict(newer).label
    assert map_label_of_record({}) == RunRecord.from_dict({**OLD_RECORD, "request": {}}).label


def test_old_records_read_with_their_fallbacks():
    record = RunRecord.from_dict(OLD_RECORD)
    assert record.map_method is None and record.method is None and record.reference is None
    assert record.label == "original − counterfactual"  # no reference recorded: the original
    assert record.region == "user_mask"  # from request.mask, before map_region existed
    assert record.n_samples == 2 and record.parameters.samples == 2 and record.parameters.seed is None
    assert record.lung_mask == {} and record.compute is None and record.calibration is None
    assert record.scale_reason == "" and record.model_frame == 64 and record.input_sha256 == "ab" * 32
    assert "compute" not in record.to_dict() and "map_label" not in record.to_dict()  # absent keys stay absent


@pytest.mark.parametrize("polarity", ["removed", "both"])
def test_a_record_with_a_map_polarity_round_trips_byte_for_byte(polarity):
    """Issue 16: records since map polarities carry ``request.map_polarity``; older ones lack it and read "both"."""
    newer = {**OLD_RECORD, "map_method": "sdedit",
             "request": {**OLD_RECORD["request"], "reference": "reconstruction", "map_method": "sdedit",
                         "map_polarity": polarity}}
    data = json.dumps(newer, indent=2).encode()
    record = RunRecord.from_json(data)
    assert record.to_json() == data and RunRecord.from_json(record.to_json()) == record
    assert record.polarity == polarity and RunRecord.from_dict(OLD_RECORD).polarity == "both"
    removed = "max(autoencoder reconstruction − counterfactual, 0): density removed"
    assert record.label == (removed if polarity == "removed" else "autoencoder reconstruction − counterfactual")
    assert "map_polarity" not in RunRecord.from_json(json.dumps(OLD_RECORD, indent=2)).to_dict()["request"]


def test_a_record_with_a_map_smoothing_round_trips_byte_for_byte():
    """Issue 16: records since map smoothing carry ``request.map_smoothing`` (model px); older ones read 0.0."""
    newer = {**OLD_RECORD, "request": {**OLD_RECORD["request"], "map_polarity": "removed", "map_smoothing": 4.0}}
    data = json.dumps(newer, indent=2).encode()
    record = RunRecord.from_json(data)
    assert record.to_json() == data and RunRecord.from_json(record.to_json()) == record
    assert record.map_smoothing == 4.0 and RunRecord.from_dict(OLD_RECORD).map_smoothing == 0.0
    assert "map_smoothing" not in RunRecord.from_json(json.dumps(OLD_RECORD, indent=2)).to_dict()["request"]
    from app.runs.read import run_facts

    assert run_facts(record)["map_smoothing"] == "4" and run_facts(RunRecord.from_dict(OLD_RECORD))[
        "map_smoothing"] == "0"


def test_the_exports_fixture_record_round_trips(run_dir):
    data = (run_dir / folder.RECORD).read_bytes()
    record = RunRecord.from_json(data)
    assert record.to_json() == data and RunRecord.from_json(record.to_json()) == record
    assert record.parameters == RunParameters.from_dict(json.loads(data)["parameters"])
    assert record.region == "whole_image" and record.n_samples == 3


def test_a_record_built_in_code_round_trips():
    record = RunRecord(vald_md_record=1, parameters=RunParameters(prompt="p", strength=0.5), seeds=[3],
                       map_region="lungs", unknown={"later": True})
    assert RunRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["later"] is True


@pytest.mark.parametrize("data", [b"[1, 2]", b"{not json", b'{"parameters": 3}'])
def test_what_is_not_a_record_is_refused(data):
    with pytest.raises(ValueError):
        RunRecord.from_json(data)


# ----------------------------------------------------------------------------------------------------------------
# the folder: names and the one reader
# ----------------------------------------------------------------------------------------------------------------
def test_names_and_listing(run_dir):
    run = RunFolder(run_dir)
    assert folder.counterfactual_name(0) == folder.COUNTERFACTUAL and folder.counterfactual_name(2) == \
        "counterfactual-2.png"
    assert folder.counterfactual_index("counterfactual-12.png") == 12 and folder.counterfactual_index("x.png") is None
    assert run.counterfactuals() == ["counterfactual.png", "counterfactual-1.png", "counterfactual-2.png"]
    assert folder.OVERLAY in run.names() and folder.RECORD not in run.names()
    assert run.has(folder.ATTRIBUTION_STD) and not run.has(folder.LUNG_MASK)
    assert run.read(folder.RECORD) == (run_dir / folder.RECORD).read_bytes()
    assert run.read_png_unit(folder.INPUT).shape == run.read_npy(folder.ATTRIBUTION).shape


@pytest.mark.parametrize("name", [folder.OVERLAY, folder.COUNTERFACTUAL, folder.INPUT, folder.ATTRIBUTION])
def test_a_changed_file_is_refused(run_dir, name):
    path = run_dir / name
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactChangedError, match=f"{name} .* does not match the SHA-256"):
        RunFolder(run_dir).read(name)


def test_a_file_added_after_the_run_is_refused_and_a_missing_one_is_not_a_change(run_dir):
    (run_dir / folder.LUNG_MASK).write_bytes((run_dir / folder.INPUT).read_bytes())
    run = RunFolder(run_dir)
    assert not run.has(folder.LUNG_MASK)  # the record says the run did not write it
    with pytest.raises(ArtifactChangedError, match="not one of the files the run wrote"):
        run.read(folder.LUNG_MASK)
    (run_dir / folder.OVERLAY).unlink()
    with pytest.raises(RunFolderError, match=r"has no overlay.png") as info:
        run.read(folder.OVERLAY)
    assert not isinstance(info.value, ArtifactChangedError)


def test_records_without_hashes_are_read_unchecked(run_dir):
    record = json.loads((run_dir / folder.RECORD).read_text())
    del record["artifacts_sha256"]
    (run_dir / folder.RECORD).write_text(json.dumps(record, indent=2))
    (run_dir / folder.OVERLAY).write_bytes(b"anything")
    run = RunFolder(run_dir)
    assert run.read(folder.OVERLAY) == b"anything" and run.has(folder.OVERLAY)


def test_an_unfinished_or_damaged_folder_is_a_clear_error(tmp_path, run_dir):
    with pytest.raises(RunFolderError, match="does not exist"):
        RunFolder(tmp_path / "nowhere").record()
    (run_dir / folder.RECORD).write_text("[]")
    with pytest.raises(RunFolderError, match="not a run record"):
        RunFolder(run_dir).record()
    (run_dir / folder.RECORD).unlink()
    with pytest.raises(RunFolderError, match="did not finish"):
        RunFolder(run_dir).read(folder.INPUT)


# ----------------------------------------------------------------------------------------------------------------
# every reader refuses a changed run: exports and the PACS store (the viewer's routes: tests/test_web.py)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["annotated.png", "bundle.zip", "secondary-capture.dcm"])
def test_exports_refuse_a_changed_overlay_or_counterfactual(tmp_path, kind):
    source = synthetic_cr()
    run_dir = make_run(tmp_path / "run", source)
    exports.build_export(run_dir, "bundle.zip")  # intact: fine
    target = folder.OVERLAY if kind == "bundle.zip" else folder.ATTRIBUTION
    (run_dir / target).write_bytes((run_dir / target).read_bytes()[:-1] + b"\1")
    with pytest.raises(exports.ExportChangedError, match="changed after the run") as info:
        exports.build_export(run_dir, kind, source if kind == "secondary-capture.dcm" else None)
    assert isinstance(info.value, exports.ExportError) and isinstance(info.value, ArtifactChangedError)


def test_the_pacs_store_refuses_a_changed_counterfactual(tmp_path):
    source = synthetic_cr()
    run_dir = make_run(tmp_path / "run", source)
    header = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    assert len(build_derived(run_dir, header, StoreMode.DEIDENTIFIED, "run-ok")) == 2
    (run_dir / folder.COUNTERFACTUAL).write_bytes((run_dir / folder.INPUT).read_bytes())
    with pytest.raises(ArtifactChangedError, match=r"counterfactual.png .* changed after the run"):
        build_derived(run_dir, header, StoreMode.DEIDENTIFIED, "run-changed")


# ----------------------------------------------------------------------------------------------------------------
# app.fileio
# ----------------------------------------------------------------------------------------------------------------
def test_write_atomic_is_private_by_default_and_leaves_no_temporary(tmp_path):
    path = fileio.write_atomic(tmp_path / "a.bin", b"one")
    assert path.read_bytes() == b"one" and stat.S_IMODE(path.stat().st_mode) == 0o600
    fileio.write_atomic(path, b"two", fsync=True)
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.bin"]
    old = os.umask(0o022)
    try:
        shared = fileio.write_atomic(tmp_path / "b.bin", b"x", mode=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    with pytest.raises(OSError):
        fileio.write_atomic(tmp_path / "missing" / "c.bin", b"x")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


def test_sha256_of_bytes_and_of_a_file_agree(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "f") == fileio.sha256_bytes(data)
    assert fileio.sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
