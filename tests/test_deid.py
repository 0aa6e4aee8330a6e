"""De-identification of stored uploads (app/imaging/deid.py): identifiers gone, pixels untouched, UIDs kept.

The planted file carries every attribute of PS3.15 Table E.1-1 (as applied, :data:`BASIC_PROFILE`) with a unique
value, plus private elements, overlays and curves, and nests some of them in a kept sequence; no planted value but
the retained UIDs may be found in the stored file, the run's record, the exports or the logs.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from app import imaging
from app.imaging.deid import (
    APPLIED,
    BASIC_PROFILE,
    BASIC_PROFILE_MASKED,
    DEIDENTIFICATION_METHOD,
    Applied,
    deidentify,
    deidentify_dicom,
    strip_jpeg_metadata,
    strip_png_metadata,
)
from tests.factories import dataset_bytes, encode_png

SHARED_DICOM = sorted((Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom").glob("*.dcm"))


@pytest.mark.shared_data
@pytest.mark.parametrize("name", [p.name for p in SHARED_DICOM] or ["siim_cr_chest.dcm"])
def test_every_readable_dicom_keeps_its_pixels_and_loses_its_identifiers(shared_data, name):
    data = (shared_data / "dicom" / name).read_bytes()
    try:
        before = imaging.decode_image(data)
    except imaging.ImagingError:
        pytest.skip(f"{name} is refused at upload, so it is never stored")
    stored = deidentify_dicom(data)
    after = imaging.decode_image(stored)
    assert np.array_equal(before.pixels, after.pixels)
    assert before.meta.window_presets == after.meta.window_presets
    assert (before.meta.rows, before.meta.columns, before.meta.modality) == (after.meta.rows, after.meta.columns,
                                                                             after.meta.modality)
    ds = pydicom.dcmread(io.BytesIO(stored))
    original = pydicom.dcmread(io.BytesIO(data))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.SOPInstanceUID == original.SOPInstanceUID and ds.StudyInstanceUID == original.StudyInstanceUID
    for elem in ds.iterall():
        assert elem.tag.group % 2 == 0 or elem.tag.group == 0x0002, f"private {elem.tag} kept"
        if elem.VR in ("PN", "DA", "DT", "TM", "AS"):
            assert not elem.value, f"{elem.keyword or elem.tag} kept a value"
        action = BASIC_PROFILE.get(int(elem.tag))
        assert action is None or APPLIED[action] is Applied.KEEP or (
            APPLIED[action] in (Applied.EMPTY, Applied.DUMMY) and elem.value in (None, "", b"", [], "ANONYMIZED")
        ) or elem.tag in (0x00120063, 0x00120064), f"{elem.keyword or elem.tag} ({action}) kept a value"
    groups = {elem.tag.group for elem in ds}
    assert not any(0x6000 <= g <= 0x60FF or 0x5000 <= g <= 0x50FF for g in groups)  # overlays, curves
    assert list(ds.DeidentificationMethod) == list(DEIDENTIFICATION_METHOD)


def test_png_text_chunks_are_dropped_and_pixels_kept():
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Doe^Jane")
    info.add_text("Comment", "MRN 4711", zip=True)
    info.add_itxt("Description", "patient Doe^Jane, born 1961")
    pixels = (np.arange(40 * 36) % 251).astype(np.uint8).reshape(40, 36)
    data = encode_png(pixels, pnginfo=info) + b"trailing Doe^Jane"
    assert data.count(b"Doe^Jane") == 3
    clean = deidentify(data, "png")
    assert b"Doe^Jane" not in clean and b"4711" not in clean and clean.endswith(b"IEND\xaeB`\x82")
    assert np.array_equal(imaging.decode_image(clean).pixels, imaging.decode_image(data).pixels)
    with pytest.raises(imaging.CorruptImageError):
        strip_png_metadata(clean[:40])


def test_jpeg_exif_and_comments_are_dropped_and_pixels_kept():
    exif = Image.Exif()
    exif[0x010E] = "Doe^Jane chest PA"  # ImageDescription
    exif[0x013B] = "Dr Who"  # Artist
    buf = io.BytesIO()
    img = Image.fromarray((np.arange(64 * 48) % 241).astype(np.uint8).reshape(64, 48))
    img.save(buf, format="JPEG", exif=exif.tobytes(), comment=b"MRN 4711 Doe^Jane", quality=90)
    data = buf.getvalue()
    assert b"Doe^Jane" in data and b"Dr Who" in data
    clean = strip_jpeg_metadata(data)
    assert b"Doe^Jane" not in clean and b"Dr Who" not in clean and b"4711" not in clean
    assert np.array_equal(imaging.decode_image(clean).pixels, imaging.decode_image(data).pixels)
    with pytest.raises(imaging.CorruptImageError):
        strip_jpeg_metadata(data[:5])


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="source_format"):
        deidentify(b"x", "gif")


# ----------------------------------------------------------------------------------------------------------------
# every attribute of Table E.1-1, planted
# ----------------------------------------------------------------------------------------------------------------
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
NAMED = {  # issue 18: kept by the previous, hand-kept list
    "PatientTelecomInformation": 0x00102155, "ClinicalTrialSubjectID": 0x00120040,
    "AcquisitionComments": 0x00184000, "Impressions": 0x40080300, "CommentsOnRadiationDose": 0x00400310,
}
NOT_IN_A_DATA_SET = frozenset({0x00001000, 0x00001001})  # command group (0000,xxxx): never in a Part 10 data set
NESTED = {0x00081070: "PLANTNESTOPERATOR^X", 0x00184000: "PLANTNESTCOMMENT", 0x00102155: "PLANTNESTTELECOM"}
EXTRA = {  # (tag, VR, value): private elements, an overlay plane and a curve, outside the table's single rows
    "private creator": (0x00090010, "LO", "PLANTCREATOR"), "private": (0x00091001, "LO", "PLANTPRIVATE"),
    "overlay data": (0x60003000, "OW", b"PLANTOVERLAY"), "overlay comments": (0x60004000, "LT", "PLANTOVLCOMMENT"),
    "overlay description": (0x60000022, "LO", "PLANTOVLDESC"), "curve data": (0x50003000, "OB", b"PLANTCURVE"),
    "curve description": (0x50000022, "LO", "PLANTCURVEDESC"),
}


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:  # newer than pydicom's dictionary (e.g. (0010,0012) Name to Use): any VR serves, the tag counts
        return "LO"


def _planted_value(i: int, vr: str) -> tuple[Any, bytes | None]:
    """A valid value for ``vr``, unique to attribute ``i``, and the bytes that find it in a file (None: numbers)."""
    token = f"PLANT{i:04d}"
    day = (datetime.date(1850, 1, 1) + datetime.timedelta(days=i)).strftime("%Y%m%d")
    text: dict[str, str] = {
        "AE": token, "CS": token, "SH": token, "LO": token, "LT": token, "ST": token, "UC": token, "UT": token,
        "PN": f"{token}^DOE", "UR": f"http://{token.lower()}.invalid", "DA": day, "DT": f"{day}1010{i % 60:02d}",
        "TM": f"10{i // 60 % 60:02d}{i % 60:02d}.{700000 + i}", "AS": "087Y", "DS": f"{1000 + i}.25",
        "IS": str(900000 + i), "UI": f"1.2.826.0.1.3680043.10.543.{10000 + i}",
    }
    if vr in text:
        return text[vr], text[vr].encode()
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return f"{token}X{i % 10}".encode()[:10].ljust(16, b"."), token.encode()
    numbers: dict[str, Any] = {"US": 0x7000 + i, "SS": 7000 + i, "UL": 0x4A000000 + i, "SL": 0x3A000000 + i,
                               "FL": 4242.5 + i, "FD": 84242.5 + i, "SV": 2**40 + i, "UV": 2**41 + i,
                               "AT": 0x00990000 + i}
    if vr == "FD":
        return numbers[vr], struct.pack("<d", numbers[vr])
    return numbers[vr], None


def _coded_item(token: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = token[:16], "99PLANT", f"{token} item"
    return item


def planted_dicom(rows: int = 64, columns: int = 64) -> tuple[bytes, dict[int, tuple[Any, bytes | None]]]:
    """A CR image carrying every single-tag row of Table E.1-1 with a unique value (sequences: one coded item).

    Returns:
        The Part 10 bytes and, per planted tag, (the value, the bytes that find it in a file; None for binary
        numbers and tags, which are checked on the parsed data set instead).
    """
    ds = Dataset()
    planted: dict[int, tuple[Any, bytes | None]] = {}
    for i, tag in enumerate(sorted(BASIC_PROFILE)):
        if tag in NOT_IN_A_DATA_SET or tag >> 16 == 0x0002:
            continue
        vr = _vr(tag)
        if vr == "SQ":
            token = f"PLANT{i:04d}"
            ds.add(DataElement(tag, "SQ", [_coded_item(token)]))
            planted[tag] = (token, token.encode())
            continue
        value, needle = _planted_value(i, vr)
        ds.add(DataElement(tag, vr, value))
        planted[tag] = (value, needle)
    # the image: a CR the upload path accepts (the table's UIDs above are valid UIDs, so they serve)
    ds.SOPClassUID, ds.Modality, ds.BurnedInAnnotation = CR_SOP_CLASS, "CR", "YES"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth, ds.PixelSpacing, ds.ViewPosition = 2048, 4096, [0.2, 0.2], "PA"
    y, x = np.mgrid[0:rows, 0:columns]
    ds.PixelData = ((x + y) * 4095 // (rows + columns - 2)).astype(np.uint16).tobytes()
    # nested: table attributes inside an item of a sequence that the profile keeps
    region = _coded_item("T-D3000")
    for tag, value in NESTED.items():
        region.add(DataElement(tag, _vr(tag), value))
    region.add(DataElement(0x00091001, "LO", "PLANTNESTPRIVATE"))
    ds.AnatomicRegionSequence = [region]
    for tag, vr, value in EXTRA.values():
        ds.add(DataElement(tag, vr, value))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "PLANTSOURCEAE"
    return dataset_bytes(ds), planted


def _kept_uid(tag: int) -> bool:
    return APPLIED[BASIC_PROFILE[tag]] is Applied.KEEP


def _needles(planted: dict[int, tuple[Any, bytes | None]], *, with_uids: bool) -> dict[str, bytes]:
    """The byte strings that find planted values: every text value, and the UIDs kept only when ``with_uids``."""
    found = {f"({tag >> 16:04X},{tag & 0xFFFF:04X})": needle for tag, (_, needle) in planted.items()
             if needle is not None and (with_uids or not _kept_uid(tag))}
    found.update({f"nested {tag:08X}": value.encode() for tag, value in NESTED.items()})
    found.update({name: value if isinstance(value, bytes) else value.encode() for name, (_, _, value) in EXTRA.items()})
    found.update({"nested private": b"PLANTNESTPRIVATE", "file meta AE": b"PLANTSOURCEAE"})
    return found


def _survivors(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return sorted(name for name, needle in needles.items() if needle in blob)


@pytest.fixture(scope="module")
def planted() -> tuple[bytes, dict[int, tuple[Any, bytes | None]]]:
    return planted_dicom()


def test_the_table_is_the_whole_of_table_e1_1():
    # 2026c: 652 single rows + 3 masked ((50xx,xxxx), (60xx,3000), (60xx,4000)); every row has a known action
    assert len(BASIC_PROFILE) >= 650 and len(BASIC_PROFILE_MASKED) == 3
    assert set(BASIC_PROFILE.values()) <= set(APPLIED)
    assert set(NAMED.values()) <= set(BASIC_PROFILE)
    assert {BASIC_PROFILE[t] for t in (0x00100010, 0x00100020, 0x00080018, 0x00200052)} == {"Z", "Z/D", "U"}


def test_the_planted_file_carries_every_row_and_decodes(planted):
    data, values = planted
    assert len(values) == len(BASIC_PROFILE) - len(NOT_IN_A_DATA_SET) - 1  # less (0000,xxxx) and (0002,0003)
    assert _survivors(data, _needles(values, with_uids=True)) == sorted(_needles(values, with_uids=True))
    decoded = imaging.decode_image(data)
    assert (decoded.meta.rows, decoded.meta.modality) == (64, "CR")
    assert any("Burned In Annotation YES" in w for w in decoded.meta.warnings)


def test_no_planted_value_survives_in_the_stored_file(planted):
    data, values = planted
    stored = deidentify_dicom(data)
    assert _survivors(stored, _needles(values, with_uids=False)) == []
    ds = pydicom.dcmread(io.BytesIO(stored))
    seen: dict[int, Any] = {}
    for elem in ds.iterall():
        assert elem.tag.group % 2 == 0, f"private {elem.tag} kept"
        assert not (0x5000 <= elem.tag.group <= 0x50FF or 0x6000 <= elem.tag.group <= 0x60FF), elem.tag
        if int(elem.tag) in values:
            seen[int(elem.tag)] = elem.value
    for tag, value in seen.items():  # numbers, tags and sequences too: gone, emptied or replaced
        if _kept_uid(tag):
            assert value == values[tag][0], f"{tag:08X}: a UID is kept unchanged (Retain UIDs Option)"
        elif tag not in (0x00120063, 0x00120064):  # written by deidentify_dicom itself
            assert value in (None, "", b"", "ANONYMIZED") or (isinstance(value, pydicom.Sequence) and not value) or (
                BASIC_PROFILE[tag] == "D" and isinstance(value, str) and value.startswith("2.25.")), f"{tag:08X}"
    kept_uids = [tag for tag in values if _kept_uid(tag)]
    assert len(kept_uids) >= 50 and all(tag in seen for tag in kept_uids)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    # said what was done: PS3.15 E.1-1, CID 7050
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert list(ds.DeidentificationMethod) == list(DEIDENTIFICATION_METHOD)
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence] == [
        ("113100", "DCM"), ("113110", "DCM")]
    assert ds.BurnedInAnnotation == "YES"  # kept, and flagged by decode_image
    # the image itself is untouched
    before, after = imaging.decode_image(data), imaging.decode_image(stored)
    assert np.array_equal(before.pixels, after.pixels) and before.meta.window_presets == after.meta.window_presets
    assert before.meta.pixel_spacing_mm == after.meta.pixel_spacing_mm == (0.2, 0.2)


@pytest.mark.parametrize("keyword", sorted(NAMED))
def test_the_attributes_named_in_issue_18_are_removed(planted, keyword):
    data, values = planted
    tag = NAMED[keyword]
    assert values[tag][1] in data
    stored = deidentify_dicom(data)
    assert values[tag][1] not in stored
    ds = pydicom.dcmread(io.BytesIO(stored))
    # (0012,0040) is D in the table (Type 1 in the Clinical Trial Subject module): a dummy value; the others: gone
    assert ds.get(keyword) == "ANONYMIZED" if BASIC_PROFILE[tag] == "D" else keyword not in ds


def test_web_upload_stores_records_exports_and_logs_no_planted_value(planted, tiny_engine, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.web import create_app
    from tests.accounts import add_user, sign_in

    data, values = planted
    without_uids, with_uids = _needles(values, with_uids=False), _needles(values, with_uids=True)
    settings = Settings(data_dir=tmp_path / "d", lung_segmenter=tmp_path / "none", lesion_classifier=tmp_path / "none")
    app = create_app(settings, engine=tiny_engine)
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        sign_in(client, app, add_user(app.state.db, "clinician-deid"))
        r = client.post("/api/v1/counterfactuals", files={"file": ("scan.dcm", data)},
                        data={"strength": "0.5", "steps": "4", "guidance_scale": "5", "seed": "3"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        end = time.monotonic() + 120
        while (st := client.get(f"/api/v1/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < end, "job stuck"
            time.sleep(0.05)
        assert st["state"] == "done", st["error"]
        base = f"/api/v1/jobs/{job_id}/artifacts"
        record = client.get(f"{base}/record.json").content
        sc = client.get(f"{base}/secondary-capture.dcm")
        bundle = client.get(f"{base}/bundle.zip").content
        status_json = json.dumps(st).encode()
    assert sc.status_code == 200
    stored = (app.state.settings.runs_dir / job_id / "upload.dcm").read_bytes()
    assert _survivors(stored, without_uids) == []
    assert _survivors(record, with_uids) == [] and _survivors(status_json, with_uids) == []
    assert any("Burned In Annotation YES" in w for w in json.loads(record)["input"].get("warnings", []) or
               st["input"].get("warnings", []))
    assert _survivors(sc.content, without_uids) == []
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        for name in archive.namelist():
            assert _survivors(archive.read(name), without_uids) == [], name
    assert _survivors(caplog.text.encode(), with_uids) == []
    run_files = list((app.state.settings.runs_dir / job_id).iterdir())
    for path in run_files:
        assert _survivors(path.read_bytes(), without_uids) == [], path.name
