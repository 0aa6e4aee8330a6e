"""Exports of a run folder: annotated PNG, DICOM Secondary Capture, record.json, ZIP bundle.

Run folders are built in code (no model): a 16-bit ``input.png``, a synthetic ``attribution.npy`` and a
``record.json`` shaped like :func:`app.runs.review.run_review` writes it. DICOM sources are a small CR built with
pydicom and, when the shared data is present, ``siim_cr_chest.dcm``.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from app import rendering
from app.rendering import OverlayOptions, fonts
from app.runs import exports
from app.runs.exports import ExportError
from tests.factories import encode_png, make_dicom

H, W = 48, 40
MODEL_HASH = "0123456789abcdef" * 4
SOURCE_NAME = "Müller^Hans"
SOURCE_ID = "PID-0042-SECRET"
SOURCE_ACCESSION = "ACC-777"
BANNER = (255, 196, 0)


# --------------------------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png16(img: np.ndarray) -> bytes:
    return encode_png(np.rint(img * 65535).astype(np.uint16))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def make_run(folder: Path, input_bytes: bytes, *, h: int = H, w: int = W, samples: int = 1) -> Path:
    """A finished run folder as app.runs.review.run_review writes it; ``input_bytes`` is the 'uploaded' file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:h, 0:w]
    original = (0.2 + 0.6 * xs / max(w - 1, 1)).astype(np.float32)
    blob = 0.3 * np.exp(-(((ys - h / 2) / 6) ** 2 + ((xs - w / 3) / 5) ** 2))
    cfs = np.clip(original[None] - blob[None] + 0.01 * rng.standard_normal((samples, h, w)), 0, 1)
    diffs = original[None] - cfs
    files = {"input.png": _png16(original), "overlay.png": _png16(original),
             "reconstruction.png": _png16(original), "attribution.npy": _npy(diffs.mean(0))}
    for i, cf in enumerate(cfs):
        files["counterfactual.png" if i == 0 else f"counterfactual-{i}.png"] = _png16(cf)
    if samples > 1:
        files["attribution_std.npy"] = _npy(diffs.std(0, ddof=1))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    record = {
        "vald_md_record": 1,
        "created_at": "2025-03-04T05:06:07+00:00",
        "input": {"sha256": _sha(input_bytes), "modality": "CR"},
        "parameters": {"prompt": "normal chest x-ray", "negative_prompt": "", "strength": 0.85,
                       "guidance_scale": 7.5, "steps": 75, "seed": None, "scheduler": "pndm", "samples": samples},
        "effective_steps": 63,
        "seeds": [1234 + i for i in range(samples)],
        "model_hash": MODEL_HASH,
        "request": {"window": "auto", "reference": "input", "smoothing_sigma": 0.0, "mask": False},
        "map_summary": {"n_samples": samples},
        "artifacts_sha256": {name: _sha(data) for name, data in files.items()},
        "disclaimer": exports.DISCLAIMER,
    }
    (folder / "record.json").write_bytes(json.dumps(record, indent=2).encode())
    return folder


def synthetic_cr(h: int = H, w: int = W) -> bytes:
    """A small CR image in Part 10 format, with identifying patient data in Latin-1."""
    return make_dicom(np.arange(h * w, dtype=np.uint16).reshape(h, w) % 4096, SpecificCharacterSet="ISO_IR 100",
                      PatientName=SOURCE_NAME, PatientID=SOURCE_ID, PatientBirthDate="19600102", PatientSex="F",
                      AccessionNumber=SOURCE_ACCESSION, StudyDate="20240101", StudyTime="101010", StudyID="S1",
                      ReferringPhysicianName="Doe^Jane", PatientOrientation=["L", "F"], PixelSpacing=[0.5, 0.5],
                      ViewPosition="PA")


@pytest.fixture
def shared_dicom(shared_data: Path) -> Path:
    """``siim_cr_chest.dcm`` from the shared data (conftest's ``shared_data`` skips when the folder is absent)."""
    path = shared_data / "dicom" / "siim_cr_chest.dcm"
    if not path.is_file():
        pytest.skip(f"shared data lacks {path}")
    return path


@pytest.fixture
def cr_source() -> bytes:
    return synthetic_cr()


@pytest.fixture
def dicom_run(tmp_path, cr_source) -> Path:
    return make_run(tmp_path / "run", cr_source)


def _read_dcm(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))  # no force: the export must be a proper Part 10 file


# --------------------------------------------------------------------------------------------------------------
# 1. Annotated PNG
# --------------------------------------------------------------------------------------------------------------


def test_annotated_png_has_parameters_in_text_chunks_and_a_banner(dicom_run):
    data = exports.export_annotated_png(dicom_run)
    img = Image.open(io.BytesIO(data))
    text = img.text  # type: ignore[attr-defined]
    assert img.mode == "RGB"
    assert text["vald_md:prompt"] == "normal chest x-ray"
    assert text["vald_md:seed"] == "1234"
    assert text["vald_md:strength"] == "0.85" and text["vald_md:guidance_scale"] == "7.5"
    assert text["vald_md:steps"] == "75" and text["vald_md:effective_steps"] == "63"
    assert text["vald_md:scheduler"] == "pndm"
    assert text["vald_md:model_hash"] == MODEL_HASH
    assert text["vald_md:record_sha256"] == _sha((dicom_run / "record.json").read_bytes())
    assert json.loads(text["vald_md:overlay"])["mode"] == "magnitude"
    assert text["Disclaimer"] == "AI-generated counterfactual — not for diagnostic use"
    assert not any(s in v for v in text.values() for s in ("Müller", SOURCE_ID, str(dicom_run)))
    # the banner is burned in across the top: banner colour with dark text on it
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[0, 0]) == BANNER and tuple(rgb[0, -1]) == BANNER
    banner_rows = rgb[: np.flatnonzero((rgb[:, 0] != BANNER).any(axis=1))[0]]
    assert len(banner_rows) >= 10 and (banner_rows.max(axis=2) < 80).any()


def test_annotated_png_is_deterministic_and_follows_options(dicom_run):
    a = exports.export_annotated_png(dicom_run)
    assert exports.export_annotated_png(dicom_run) == a
    b = exports.export_annotated_png(dicom_run, OverlayOptions(opacity=0.3, threshold=90, mode="signed"))
    assert b != a
    assert json.loads(Image.open(io.BytesIO(b)).text["vald_md:overlay"]) == {  # type: ignore[attr-defined]
        "mode": "signed", "opacity": 0.3, "threshold": 90, "threshold_mode": "percentile"}


def test_stability_mode_needs_several_samples(tmp_path):
    single = make_run(tmp_path / "one", b"x")
    with pytest.raises(ExportError, match="several samples"):
        exports.export_annotated_png(single, OverlayOptions(mode="stability"))
    several = make_run(tmp_path / "three", b"x", samples=3)
    png = exports.export_annotated_png(several, OverlayOptions(mode="stability"))
    text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
    assert text["vald_md:seed"] == "1234, 1235, 1236"


@pytest.mark.parametrize("options,match", [({"opacity": 1.5}, "opacity"), ({"mode": "heat"}, "mode"),
                                           ({"threshold": 150}, "percentile")])
def test_bad_overlay_options_are_export_errors(dicom_run, options, match):
    with pytest.raises(ExportError, match=match):
        exports.export_annotated_png(dicom_run, OverlayOptions(**options))


# --------------------------------------------------------------------------------------------------------------
# The burned-in banner: one renderer, the em dash kept
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["preferred", "builtin"])
def banner_font(request, monkeypatch) -> str:
    """Render with the preferred font (DejaVu Sans, which has the em dash) or, as on a machine without it, Pillow's
    built-in font (which lacks it)."""
    caches = (fonts.load_font, fonts._has_glyph, fonts._dash_rows)
    if request.param == "builtin":
        monkeypatch.setattr(fonts, "_FONT_CANDIDATES", ())
    for cache in caches:
        cache.cache_clear()
    yield request.param
    for cache in caches:
        cache.cache_clear()


def _banner_rows(rgb: np.ndarray) -> np.ndarray:
    """The banner strip at the top of an export (rows whose first pixel is the banner colour)."""
    return rgb[: np.flatnonzero((rgb[:, 0] != BANNER).any(axis=1))[0]]


def _dash_to_text_height(banner: np.ndarray) -> float:
    """Longest horizontal run of text ink in the banner over the height of its first line of text: an em dash is
    about an em long (>= 0.75 of the line's ink height), a hyphen or en dash half that (<= 0.55)."""
    dark = banner.max(axis=2) < 80
    rows = np.flatnonzero(dark.any(axis=1))
    line = rows[: np.flatnonzero(np.diff(rows) > 1)[0] + 1] if (np.diff(rows) > 1).any() else rows
    longest = 0
    for row in dark:
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if starts.size:
            longest = max(longest, int((ends - starts).max()))
    return longest / line.size


def test_one_banner_renderer_keeps_the_em_dash(banner_font):
    """The banner is drawn by rendering.render_banner only; its em dash is an em dash (the font's glyph, or a drawn
    rule where the font lacks it), never the hyphen it once became with Pillow's built-in font."""
    text = rendering.BANNER_TEXT
    assert "—" in text and text == exports.DISCLAIMER
    em = rendering.render_banner(900, 20, pad_x=4, pad_y=4)
    assert _dash_to_text_height(em) >= 0.75
    for dash in ("-", "–"):
        assert _dash_to_text_height(rendering.render_banner(900, 20, pad_x=4, pad_y=4,
                                                            text=text.replace("—", dash))) <= 0.55
    assert not hasattr(exports, "_burn_in_banner")


def test_exports_burn_in_the_em_dash(banner_font, tmp_path):
    """Both burned-in banners (annotated PNG, Secondary Capture) carry the em dash; this fails if it is replaced."""
    source = synthetic_cr(400, 400)
    run = make_run(tmp_path / "run", source, h=400, w=400)
    png = np.asarray(Image.open(io.BytesIO(exports.export_annotated_png(run))).convert("RGB"))
    sc = _read_dcm(exports.export_secondary_capture(run, source)).pixel_array
    for image in (png, sc):
        assert _dash_to_text_height(_banner_rows(image)) >= 0.75
    # the Secondary Capture's banner is rendering.burn_in_banner's, stacked on the overlay
    rows = _banner_rows(sc).shape[0]
    assert np.array_equal(rendering.burn_in_banner(np.ascontiguousarray(sc[rows:])), sc)


# --------------------------------------------------------------------------------------------------------------
# 2. DICOM Secondary Capture
# --------------------------------------------------------------------------------------------------------------


def test_secondary_capture_is_deidentified_in_a_new_study_by_default(dicom_run, cr_source):
    src = _read_dcm(cr_source)
    data = exports.export_secondary_capture(dicom_run, cr_source)
    sc = _read_dcm(data)
    # a study of its own: no UID of the source study, series or image anywhere in the object
    assert sc.StudyInstanceUID != src.StudyInstanceUID
    for uid in (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID):
        assert str(uid).encode() not in data
    assert "SourceImageSequence" not in sc and "ReferencedImageSequence" not in sc
    assert sc.PatientIdentityRemoved == "YES" and sc.DeidentificationMethod == exports.DEIDENTIFICATION_METHOD
    assert len(exports.DEIDENTIFICATION_METHOD) <= 64
    again = _read_dcm(exports.export_secondary_capture(dicom_run, cr_source))
    assert again.StudyInstanceUID != sc.StudyInstanceUID  # every export is its own study


def test_secondary_capture_in_the_source_study_references_the_source(dicom_run, cr_source):
    src = _read_dcm(cr_source)
    data = exports.export_secondary_capture(dicom_run, cr_source, include_patient_data=True)
    sc = _read_dcm(data)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage == sc.file_meta.MediaStorageSOPClassUID
    assert sc.StudyInstanceUID == src.StudyInstanceUID and "PatientIdentityRemoved" not in sc
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID and sc.SOPInstanceUID != src.SOPInstanceUID
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription == exports.SERIES_DESCRIPTION and len(sc.SeriesDescription) <= 64
    assert "not for diagnostic use" in sc.SeriesDescription and "not for diagnostic use" in sc.ImageComments
    for seq in (sc.SourceImageSequence, sc.ReferencedImageSequence):
        assert len(seq) == 1
        assert seq[0].ReferencedSOPClassUID == src.SOPClassUID
        assert seq[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert MODEL_HASH in sc.DerivationDescription
    # geometry copied from the source: same frame, so the spacing still holds
    assert [float(v) for v in sc.PixelSpacing] == [0.5, 0.5]
    assert list(sc.PatientOrientation) == ["L", "F"]
    # RGB overlay with a banner on top and a legend on the right
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    px = sc.pixel_array
    assert px.shape == (sc.Rows, sc.Columns, 3) and sc.Rows > H and sc.Columns > W
    assert tuple(px[0, 0]) == BANNER
    # a second export is a new instance in a new series
    again = _read_dcm(exports.export_secondary_capture(dicom_run, cr_source, include_patient_data=True))
    assert again.SOPInstanceUID != sc.SOPInstanceUID and again.SeriesInstanceUID != sc.SeriesInstanceUID


def test_secondary_capture_leaves_patient_data_out_by_default(dicom_run, cr_source):
    data = exports.export_secondary_capture(dicom_run, cr_source)
    sc = _read_dcm(data)
    assert str(sc.PatientName) == exports.ANONYMOUS and sc.PatientID == exports.ANONYMOUS
    assert not sc.PatientBirthDate and not sc.PatientSex and not sc.AccessionNumber
    assert not sc.get("StudyDate") and not sc.get("ReferringPhysicianName")
    for secret in (SOURCE_ID, SOURCE_ACCESSION, "Doe^Jane", "19600102"):
        assert secret.encode() not in data
    assert "Müller".encode("latin-1") not in data and "Müller".encode() not in data


def test_secondary_capture_copies_patient_data_when_asked(dicom_run, cr_source):
    sc = _read_dcm(exports.export_secondary_capture(dicom_run, cr_source, include_patient_data=True))
    assert str(sc.PatientName) == SOURCE_NAME  # re-encoded from ISO_IR 100 into the object's UTF-8
    assert sc.PatientID == SOURCE_ID and sc.PatientBirthDate == "19600102" and sc.PatientSex == "F"
    assert sc.AccessionNumber == SOURCE_ACCESSION and sc.StudyDate == "20240101"


def test_secondary_capture_accepts_a_dataset(dicom_run, cr_source):
    src = _read_dcm(cr_source)
    sc = _read_dcm(exports.export_secondary_capture(dicom_run, src, include_patient_data=True))
    assert sc.StudyInstanceUID == src.StudyInstanceUID


def test_secondary_capture_refuses_a_png_input(tmp_path):
    png = _png16(np.zeros((H, W), np.float32))
    run = make_run(tmp_path / "png-run", png)
    with pytest.raises(ExportError, match="needs a DICOM input; this run's input was a PNG"):
        exports.export_secondary_capture(run, png)
    with pytest.raises(ExportError, match="source DICOM file, and none was supplied"):
        exports.build_export(run, "secondary-capture.dcm")


def test_secondary_capture_refuses_another_images_dicom(dicom_run):
    with pytest.raises(ExportError, match="not this run's input"):
        exports.export_secondary_capture(dicom_run, synthetic_cr())


@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # the file's Patient's Age is '62', not '062Y'
def test_secondary_capture_of_a_real_cr(tmp_path, shared_dicom):
    data = shared_dicom.read_bytes()
    src = _read_dcm(data)
    run = make_run(tmp_path / "siim", data)  # input.png smaller than the source: no pixel spacing
    sc_bytes = exports.export_secondary_capture(run, data)
    sc = _read_dcm(sc_bytes)
    assert sc.StudyInstanceUID != src.StudyInstanceUID and str(src.StudyInstanceUID).encode() not in sc_bytes
    assert "SourceImageSequence" not in sc
    sc = _read_dcm(exports.export_secondary_capture(run, data, include_patient_data=True))
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID and sc.SOPInstanceUID != src.SOPInstanceUID
    assert sc.LossyImageCompression == "01"  # the source was JPEG baseline
    assert "PixelSpacing" not in sc
    assert "PatientOrientation" in sc and not sc.PatientOrientation  # Type 2: the source leaves it empty
    sc = _read_dcm(sc_bytes)
    assert str(sc.PatientName) == exports.ANONYMOUS and str(src.PatientName).encode() not in sc_bytes
    opted_in = _read_dcm(exports.export_secondary_capture(run, data, include_patient_data=True))
    assert opted_in.PatientName == src.PatientName and opted_in.PatientAge == src.PatientAge


# --------------------------------------------------------------------------------------------------------------
# 3. record.json and 4. bundle
# --------------------------------------------------------------------------------------------------------------


def test_record_json_is_returned_unchanged(dicom_run):
    content, media_type = exports.build_export(dicom_run, "record.json")
    assert content == (dicom_run / "record.json").read_bytes() and media_type == "application/json"


def test_bundle_holds_every_artifact_in_a_fixed_order(tmp_path, cr_source):
    run = make_run(tmp_path / "run", cr_source, samples=3)
    data = exports.export_bundle(run)
    assert exports.export_bundle(run) == data  # deterministic without a DICOM source
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == ["input.png", "counterfactual.png", "counterfactual-1.png", "counterfactual-2.png",
                                 "reconstruction.png", "overlay.png", "annotated.png", "attribution.npy",
                                 "attribution_std.npy", "record.json"]
        assert zf.read("record.json") == (run / "record.json").read_bytes()
        assert zf.read("annotated.png") == exports.export_annotated_png(run)
        assert zf.getinfo("input.png").date_time == (2025, 3, 4, 5, 6, 6)  # created_at; ZIP keeps even seconds
        assert zf.comment.decode() == exports.DISCLAIMER
    with zipfile.ZipFile(io.BytesIO(exports.export_bundle(run, cr_source))) as zf:
        assert zf.namelist()[-1] == "secondary-capture.dcm"
        sc = _read_dcm(zf.read("secondary-capture.dcm"))
        assert str(sc.PatientName) == exports.ANONYMOUS


def test_changed_or_missing_artifacts_are_refused(dicom_run):
    (dicom_run / "attribution.npy").write_bytes(_npy(np.zeros((H, W), np.float32)))
    with pytest.raises(ExportError, match="changed after the run"):
        exports.export_annotated_png(dicom_run)
    (dicom_run / "attribution.npy").unlink()
    with pytest.raises(ExportError, match=r"has no attribution\.npy"):
        exports.export_annotated_png(dicom_run)
    with pytest.raises(ExportError, match="does not exist"):
        exports.export_bundle(dicom_run / "nope")


# --------------------------------------------------------------------------------------------------------------
# build_export / save_export
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,media_type,magic", [
    ("annotated.png", "image/png", b"\x89PNG"),
    ("secondary-capture.dcm", "application/dicom", b"\x00" * 128 + b"DICM"),
    ("record.json", "application/json", b"{"),
    ("bundle.zip", "application/zip", b"PK\x03\x04"),
])
def test_build_export_every_kind(dicom_run, cr_source, kind, media_type, magic):
    before = sorted(p.name for p in dicom_run.iterdir())
    content, got = exports.build_export(dicom_run, kind, cr_source)
    assert got == media_type == exports.MEDIA_TYPES[kind] and content.startswith(magic)
    assert sorted(p.name for p in dicom_run.iterdir()) == before  # writes nothing
    assert set(exports.EXPORT_KINDS) == set(exports.MEDIA_TYPES)


def test_build_export_rejects_unknown_kinds_and_options(dicom_run):
    with pytest.raises(ExportError, match=r"unknown export kind 'report\.pdf'"):
        exports.build_export(dicom_run, "report.pdf")
    with pytest.raises(ExportError, match=r"overlay do not apply to record\.json"):
        exports.build_export(dicom_run, "record.json", overlay=OverlayOptions(opacity=0.5))
    with pytest.raises(ExportError, match=r"lung_outline do not apply to secondary-capture\.dcm"):
        exports.build_export(dicom_run, "secondary-capture.dcm", b"", overlay=OverlayOptions(lung_outline=True))
    with pytest.raises(ExportError, match=r"include_patient_data do not apply to annotated\.png"):
        exports.build_export(dicom_run, "annotated.png", include_patient_data=True)


def test_save_export_writes_atomically(dicom_run):
    path = exports.save_export(dicom_run, "bundle.zip")
    assert path == dicom_run / "exports" / "bundle.zip"
    assert zipfile.is_zipfile(path)
    assert [p.name for p in path.parent.iterdir()] == ["bundle.zip"]  # no temporary file left behind
    # the saved export is not picked up by the next bundle
    with zipfile.ZipFile(io.BytesIO(exports.export_bundle(dicom_run))) as zf:
        assert not any(n.startswith("exports") for n in zf.namelist())


# --------------------------------------------------------------------------------------------------------------
# the map's name and scale follow the record
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reference", "method", "label"), [
    ("input", "sdedit", "original − counterfactual"),
    ("reconstruction", "sdedit", "autoencoder reconstruction − counterfactual"),
    ("reconstruction", "ddim_inversion", "DDIM reconstruction − counterfactual"),
])
def test_exports_name_the_map_by_its_reference(tmp_path, cr_source, reference, method, label):
    run = make_run(tmp_path / "run", cr_source)
    record = json.loads((run / "record.json").read_text())
    record["request"]["reference"], record["map_method"] = reference, method
    (run / "record.json").write_text(json.dumps(record))
    text = Image.open(io.BytesIO(exports.export_annotated_png(run))).text  # type: ignore[attr-defined]
    assert text["vald_md:map_label"] == label and text["vald_md:map_scale"] == "relative (per-image) scale"
    sc = _read_dcm(exports.export_secondary_capture(run, cr_source))
    assert label in sc.ImageComments and label in sc.DerivationDescription
    others = {"original − counterfactual", "autoencoder reconstruction − counterfactual",
              "DDIM reconstruction − counterfactual"} - {label}
    assert not any(o in sc.ImageComments or o in sc.DerivationDescription for o in others)


def test_calibrated_run_exports_in_x_fold_of_the_normal_range(tmp_path, cr_source):
    run = make_run(tmp_path / "run", cr_source)
    record = json.loads((run / "record.json").read_text())
    record["map_summary"]["scale"] = {"kind": "calibrated", "level": 0.1, "percentile": 99.0, "n_images": 24}
    (run / "record.json").write_text(json.dumps(record))
    fold = OverlayOptions(threshold=1.5, threshold_mode=exports.THRESHOLD_NORMAL)
    data = exports.export_annotated_png(run, fold)
    text = Image.open(io.BytesIO(data)).text  # type: ignore[attr-defined]
    assert text["vald_md:map_scale"].startswith("x-fold of the normal range: 1× = 99th percentile")
    # the same fold on an uncalibrated run is refused rather than read as a percentile
    with pytest.raises(ExportError, match="calibrated"):
        exports.export_annotated_png(make_run(tmp_path / "plain", cr_source), fold)


def test_bundle_annotated_png_follows_the_overlay_options(dicom_run, cr_source):
    """The ZIP's annotated.png (and Secondary Capture) is drawn with the options on screen (issue 12): the same
    bytes as the annotated export with those options, not the defaults."""
    options = OverlayOptions(opacity=0.9, threshold=90.0, threshold_mode="percentile", mode="signed")
    alone = exports.export_annotated_png(dicom_run, options)
    with zipfile.ZipFile(io.BytesIO(exports.build_export(dicom_run, "bundle.zip", overlay=options)[0])) as zf:
        assert zf.read("annotated.png") == alone
    with zipfile.ZipFile(io.BytesIO(exports.export_bundle(dicom_run))) as zf:
        assert zf.read("annotated.png") == exports.export_annotated_png(dicom_run) != alone
    with zipfile.ZipFile(io.BytesIO(exports.export_bundle(dicom_run, cr_source, overlay=options))) as zf:
        sc = pydicom.dcmread(io.BytesIO(zf.read("secondary-capture.dcm")))
    plain = pydicom.dcmread(io.BytesIO(exports.export_secondary_capture(dicom_run, cr_source)))
    assert not np.array_equal(sc.pixel_array, plain.pixel_array)


def test_annotated_png_carries_the_map_options_of_the_request(tmp_path, cr_source):
    """The map options a run was asked for travel in the annotated PNG and come back typed, so that "Use these
    parameters" sets the same map again; a crafted value outside the form's choices reads as not stated."""
    run = make_run(tmp_path / "run", cr_source, samples=2)
    record = json.loads((run / "record.json").read_text())
    record["request"].update(lung_mask=False, map_method="classifier_guided", map_polarity="removed",
                             map_smoothing=4.0, counterfactual_edit="redraw")
    record.update(map_method="classifier_guided", classifier_scale=0.75, map_region="whole_image")
    (run / "record.json").write_text(json.dumps(record, indent=2))
    data = exports.export_annotated_png(run)
    params = exports.read_png_parameters(data)
    assert params is not None
    assert (params["map_method"], params["map_polarity"], params["map_smoothing"]) == ("classifier_guided",
                                                                                       "removed", 4.0)
    assert params["counterfactual_edit"] == "redraw" and params["lung_mask"] is False
    assert params["classifier_scale"] == 0.75 and params["map_region"] == "whole_image"
    # the same file with a value no form offers
    with Image.open(io.BytesIO(data)) as im:
        info = PngImagePlugin.PngInfo()
        for key, value in im.text.items():  # type: ignore[attr-defined]
            info.add_text(key, {"vald_md:map_method": "rm -rf", "vald_md:counterfactual_edit": "<b>",
                                "vald_md:lung_mask": "maybe"}.get(key, value))
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=info)
    crafted = exports.read_png_parameters(buf.getvalue())
    assert crafted is not None and crafted["prompt"] == params["prompt"]
    assert (crafted["map_method"], crafted["counterfactual_edit"], crafted["lung_mask"]) == (None, None, None)


def test_annotated_png_parameters_read_back(dicom_run):
    """The parameters in an annotated PNG's text chunks come back typed (issue 12: re-opening a PNG's parameters);
    any other file gives None."""
    record = json.loads((dicom_run / "record.json").read_text())
    params = exports.read_png_parameters(exports.export_annotated_png(dicom_run,
                                                                      OverlayOptions(threshold=1.5, mode="outline")))
    assert params is not None
    expected = record["parameters"]
    for key in ("prompt", "strength", "guidance_scale", "steps", "scheduler", "samples"):
        assert params[key] == expected[key], key
    assert params["seed"] == record["seeds"][0] and params["model_hash"] == record["model_hash"]
    assert params["negative_prompt"] == (expected.get("negative_prompt") or "")
    assert params["overlay"]["mode"] == "outline" and params["overlay"]["threshold"] == 1.5
    # a record from before the map options were recorded: nothing is guessed, except the polarity its map has
    assert (params["map_method"], params["counterfactual_edit"], params["lung_mask"]) == (None, None, None)
    assert params["map_polarity"] == "both" and params["map_smoothing"] == 0.0
    assert params["map_region"] == "whole_image" and params["classifier_scale"] is None
    assert exports.read_png_parameters(encode_png(np.zeros((8, 8), np.uint8))) is None
    assert exports.read_png_parameters(b"\x89PNG\r\n\x1a\nbroken") is None
    assert exports.read_png_parameters(b"DICM") is None
