"""De-identification of stored uploads (app/imaging/deid.py): identifiers gone, pixels untouched, UIDs kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin

from app import imaging
from app.imaging.deid import (
    DEIDENTIFICATION_METHOD,
    DICOM_ACTIONS,
    deidentify,
    deidentify_dicom,
    strip_jpeg_metadata,
    strip_png_metadata,
)

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
        assert elem.keyword not in DICOM_ACTIONS or DICOM_ACTIONS[elem.keyword] == "Z" and not elem.value
    groups = {elem.tag.group for elem in ds}
    assert not any(0x6000 <= g <= 0x60FF or 0x5000 <= g <= 0x50FF for g in groups)  # overlays, curves
    assert list(ds.DeidentificationMethod) == list(DEIDENTIFICATION_METHOD)


def test_png_text_chunks_are_dropped_and_pixels_kept():
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Doe^Jane")
    info.add_text("Comment", "MRN 4711", zip=True)
    info.add_itxt("Description", "patient Doe^Jane, born 1961")
    buf = io.BytesIO()
    Image.fromarray((np.arange(40 * 36) % 251).astype(np.uint8).reshape(40, 36)).save(buf, format="PNG",
                                                                                       pnginfo=info)
    data = buf.getvalue() + b"trailing Doe^Jane"
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
