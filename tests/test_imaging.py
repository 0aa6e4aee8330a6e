"""app.imaging: bytes -> display image + metadata, refusals, windows, letterbox geometry, PNG writers.

Real DICOM cases come from ``shared/data/dicom`` (see its README); everything else is built here in code.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from app import imaging
from app.imaging import (
    CorruptImageError,
    ImageTooLargeError,
    ImagingError,
    InvalidWindowError,
    UnsupportedImageError,
    Window,
    apply_window,
    decode_image,
    letterbox,
    sniff_format,
    to_png_bytes,
    to_uint8,
    unletterbox,
)
from app.imaging import dicom as dicom_reader
from tests.factories import CR, PATIENT, dataset_bytes, encode_png, make_dicom, png_claiming

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# builders


def ramp(rows: int = 32, columns: int = 48, top: int = 4095) -> np.ndarray:
    """A smooth uint16 test image spanning 0..top."""
    y, x = np.mgrid[0:rows, 0:columns]
    return np.rint((x + y) / (rows + columns - 2) * top).astype(np.uint16)


def jpeg_bytes(arr: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def decode_or_refuse(data: bytes) -> imaging.DecodedImage | None:
    """Decode; the only acceptable failure is an ImagingError with a message. Checks the output contract."""
    try:
        decoded = decode_image(data)
    except ImagingError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return None
    px = decoded.pixels
    assert px.dtype == np.float32 and px.ndim == 2 and np.isfinite(px).all()
    assert px.min() >= 0 and px.max() <= 1
    assert px.shape == (decoded.meta.rows, decoded.meta.columns)
    assert decoded.raw is not None and decoded.raw.shape == px.shape
    return decoded


# ---------------------------------------------------------------------------------------------------------------
# shared data (real DICOM cases)

EXPECTED_OUTCOME: dict[str, type[ImagingError] | None] = {
    "CT_small.dcm": UnsupportedImageError,
    "MR_small_bigendian.dcm": UnsupportedImageError,
    "MR_truncated.dcm": ImagingError,
    "badVR.dcm": ImagingError,
    "meta_missing_tsyntax.dcm": ImagingError,
    "rtplan_truncated.dcm": ImagingError,
    "Fake_MONOHR1.dcm": None, "siim_cr_chest.dcm": None, "vlut_04.dcm": None, "mlut_18.dcm": None,
    "RG1_J2KI.dcm": None, "RG1_JLSN.dcm": None, "RG2_J2KR.dcm": None, "RG2_JPLL.dcm": None, "RG2_RLE.dcm": None,
    "RG2_UNC.zst": None, "RG3_J2KI.dcm": None, "RG3_JLSL.dcm": None, "RG3_JPLY.dcm": None, "RG3_UNC.zst": None,
    "SC_rgb_jpeg.dcm": None, "SC_rgb_rle_2frame.dcm": None,
}


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    folder = shared_data / "dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing")
    return folder


@pytest.fixture(scope="module")
def dicom_bytes(dicom_dir: Path) -> Callable[[str], bytes]:
    """File bytes by name; ``.zst`` files are zstd-compressed DICOM and come back decompressed."""
    zstandard = pytest.importorskip("zstandard")
    cache: dict[str, bytes] = {}

    def load(name: str) -> bytes:
        if name not in cache:
            path = dicom_dir / name
            if not path.exists():
                pytest.skip(f"{path} is missing")
            data = path.read_bytes()
            cache[name] = zstandard.ZstdDecompressor().decompress(data) if name.endswith(".zst") else data
        return cache[name]

    return load


@pytest.fixture(scope="module")
def decoded(dicom_bytes: Callable[[str], bytes]) -> Callable[[str], imaging.DecodedImage]:
    cache: dict[str, imaging.DecodedImage] = {}

    def get(name: str) -> imaging.DecodedImage:
        if name not in cache:
            cache[name] = decode_image(dicom_bytes(name))
        return cache[name]

    return get


def stored_pixels(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(EXPECTED_OUTCOME))
def test_known_shared_dicom_files_decode_or_are_refused(name, dicom_bytes, decoded):
    expected = EXPECTED_OUTCOME[name]
    if expected is None:
        result = decode_or_refuse(dicom_bytes(name))
        assert result is not None, f"{name} should decode"
        assert result.meta.source_format == "dicom" and result.meta.window is not None
    else:
        with pytest.raises(expected) as info:
            decoded(name)
        assert PATIENT not in str(info.value)


@pytest.mark.shared_data
def test_every_shared_dicom_file_decodes_or_raises_only_imaging_errors(dicom_dir, dicom_bytes):
    names = sorted(p.name for p in dicom_dir.iterdir() if p.is_file())
    assert names, "no DICOM test files"
    for name in names:
        decode_or_refuse(dicom_bytes(name))


@pytest.mark.shared_data
@pytest.mark.parametrize("name,word", [("CT_small.dcm", "CT image"), ("MR_small_bigendian.dcm", "MR image")])
def test_wrong_modality_is_refused_with_a_clinical_message(name, word, dicom_bytes):
    with pytest.raises(UnsupportedImageError, match="CR/DX") as info:
        decode_image(dicom_bytes(name))
    assert word in str(info.value)


@pytest.mark.shared_data
def test_truncated_pixel_data_is_corrupt_once_past_the_modality_gate(dicom_bytes):
    # MR_truncated is refused as MR first; relabelled as CR (same byte lengths) the truncation itself must show
    data = dicom_bytes("MR_truncated.dcm")
    relabelled = data.replace(b"1.2.840.10008.5.1.4.1.1.4\x00", CR.encode() + b"\x00").replace(
        b"\x08\x00\x60\x00CS\x02\x00MR", b"\x08\x00\x60\x00CS\x02\x00CR")
    assert relabelled != data
    with pytest.raises(CorruptImageError, match="damaged or incomplete"):
        decode_image(relabelled)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["RG2_J2KR.dcm", "RG2_JPLL.dcm", "RG2_RLE.dcm"])
def test_lossless_codecs_give_exactly_the_uncompressed_pixels(name, dicom_bytes, decoded):
    reference_stored = stored_pixels(dicom_bytes("RG2_UNC.zst"))
    assert np.array_equal(stored_pixels(dicom_bytes(name)), reference_stored)
    got, ref = decoded(name), decoded("RG2_UNC.zst")
    assert np.array_equal(got.raw, reference_stored.astype(np.float32))
    assert np.array_equal(got.raw, ref.raw) and np.array_equal(got.pixels, ref.pixels)
    assert got.meta.window == ref.meta.window and got.meta.window.source == "file preset 1"


@pytest.mark.shared_data
def test_jpeg_ls_lossless_matches_its_reference(decoded):
    assert np.array_equal(decoded("RG3_JLSL.dcm").raw, decoded("RG3_UNC.zst").raw)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["RG3_J2KI.dcm", "RG3_JPLY.dcm"])
def test_lossy_codecs_are_close_to_the_reference(name, decoded):
    got, ref = decoded(name), decoded("RG3_UNC.zst")
    assert got.pixels.shape == ref.pixels.shape
    assert float(np.abs(got.pixels - ref.pixels).mean()) < 0.01
    assert "This image has been lossy-compressed." in got.meta.warnings


@pytest.mark.shared_data
def test_twelve_bit_lossy_jpeg_decodes_through_gdcm(decoded):
    got = decoded("RG3_JPLY.dcm")
    assert got.meta.transfer_syntax_uid == "1.2.840.10008.1.2.4.51"
    ref = decoded("RG3_UNC.zst").raw
    assert np.corrcoef(got.raw.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.shared_data
def test_rg1_chest_mono1_keeps_view_and_drops_zero_spacing(decoded):
    a, b = decoded("RG1_J2KI.dcm"), decoded("RG1_JLSN.dcm")
    assert a.meta.photometric_interpretation == "MONOCHROME1" and a.meta.view_position == "PA"
    assert a.meta.pixel_spacing_mm is None  # the file says 0.000 \ 0.000
    assert (a.meta.window.center, a.meta.window.width) == (15000, 30000)
    assert float(np.abs(a.pixels - b.pixels).mean()) < 0.01


@pytest.mark.shared_data
def test_fake_monochrome1_is_the_inverse_display_of_the_same_pixels(decoded, dicom_bytes):
    # Fake_MONOHR1 holds byte-identical pixel data to siim_cr_chest, tagged MONOCHROME1: shown correctly it is
    # the photographic negative, so inverting its display must reproduce siim_cr_chest's display.
    fake, real = decoded("Fake_MONOHR1.dcm"), decoded("siim_cr_chest.dcm")
    fake_stored = stored_pixels(dicom_bytes("Fake_MONOHR1.dcm"))
    assert np.array_equal(fake_stored, stored_pixels(dicom_bytes("siim_cr_chest.dcm")))
    assert fake.meta.window == real.meta.window and fake.meta.window.source == "percentile 0.5-99.5"
    assert float(np.abs((1 - fake.pixels) - real.pixels).max()) < 1e-6


@pytest.mark.shared_data
def test_monochrome1_is_inverted_exactly_once(decoded):
    d = decoded("RG3_UNC.zst")
    assert d.meta.photometric_interpretation == "MONOCHROME1"
    upright = apply_window(d.raw, d.meta.window, "MONOCHROME2")
    assert np.array_equal(d.pixels, 1 - upright)
    assert np.array_equal(apply_window(d.raw, d.meta.window, "MONOCHROME1", presentation_lut_shape="INVERSE"),
                          d.pixels)


@pytest.mark.shared_data
def test_window_choices_on_a_file_with_a_preset(decoded):
    d = decoded("RG2_UNC.zst")
    assert [w.source for w in d.meta.window_presets] == ["file preset 1"]
    assert np.array_equal(apply_window(d.raw, d.meta.window, "MONOCHROME2"), d.pixels)
    assert np.array_equal(d.rewindow(0).pixels, d.pixels)
    user = d.rewindow((511, 1024))
    assert user.meta.window.source == "user" and np.array_equal(user.pixels, d.pixels)
    pct = d.rewindow("percentile")
    assert pct.meta.window.source == "percentile 0.5-99.5" and pct.meta.window.function == "LINEAR_EXACT"
    assert d.rewindow(None).meta.window.source == "min-max"
    with pytest.raises(InvalidWindowError, match="preset 1 does not exist"):
        d.rewindow(1)
    assert "centre 511, width 1024" in d.meta.window.description


@pytest.mark.shared_data
def test_linear_window_matches_pydicom_apply_windowing(dicom_bytes, decoded):
    data = dicom_bytes("RG2_UNC.zst")
    ds = pydicom.dcmread(io.BytesIO(data))
    expected = apply_windowing(ds.pixel_array, ds) / (2**ds.BitsStored - 1)  # pydicom's output is 0..2**bits-1
    assert float(np.abs(decoded("RG2_UNC.zst").pixels - expected).max()) < 1e-5


@pytest.mark.shared_data
def test_voi_lut_sequence_is_applied(dicom_bytes, decoded):
    data = dicom_bytes("vlut_04.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    d = decoded("vlut_04.dcm")
    assert d.meta.window.source == "VOI LUT 1" and d.meta.window.lut is not None
    expected = apply_voi(ds.pixel_array, ds).astype(np.float32) / 65535
    assert float(np.abs(d.pixels - expected).max()) < 1e-6


@pytest.mark.shared_data
def test_modality_lut_sequence_gives_the_raw_values(dicom_bytes, decoded):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("mlut_18.dcm")))
    assert np.array_equal(decoded("mlut_18.dcm").raw, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # SC_rgb_jpeg is implicit VR despite its syntax
@pytest.mark.parametrize("name", ["SC_rgb_jpeg.dcm", "SC_rgb_rle_2frame.dcm"])
def test_colour_secondary_capture_becomes_luminance_of_frame_one(name, dicom_bytes, decoded):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(name)))
    first = ds.pixel_array[0] if int(ds.get("NumberOfFrames") or 1) > 1 else ds.pixel_array
    d = decoded(name)
    assert np.allclose(d.raw, first.astype(np.float32) @ BT601, atol=1e-3)
    assert np.allclose(d.pixels, d.raw / 255, atol=1e-6)
    if name == "SC_rgb_rle_2frame.dcm":
        assert d.meta.number_of_frames == 2 and any("2 frames" in w for w in d.meta.warnings)


@pytest.mark.shared_data
def test_identifiers_are_kept_for_export_but_never_shown(decoded):
    d = decoded("RG2_UNC.zst")
    uids = [d.meta.study_instance_uid, d.meta.series_instance_uid, d.meta.sop_instance_uid]
    assert all(uids)
    shown = repr(d) + repr(d.meta) + json.dumps(d.meta.public_summary())
    assert not any(uid in shown for uid in uids)
    assert d.meta.pixel_spacing_mm == (0.2, 0.2)
    summary = d.meta.public_summary()
    assert summary["modality"] == "CR" and summary["rows"] == 2140 and summary["bits_stored"] == 10
    assert summary["window"].startswith("file preset 1")


# ---------------------------------------------------------------------------------------------------------------
# content sniffing


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\x00" * 128 + b"DICM" + b"\x00" * 8, "dicom"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "png"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 8, "jpeg"),
    ],
)
def test_sniff_format_by_content(data, expected):
    assert sniff_format(data) == expected


@pytest.mark.parametrize(
    "data,fragment",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 20, "GIF"),
        (b"II*\x00" + b"\x00" * 20, "TIFF"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", "preamble"),
        (b"hello, this is not an image", "not a DICOM, PNG or JPEG"),
        (b"\x00" * 128 + b"DIC", "not a DICOM, PNG or JPEG"),
    ],
)
def test_sniff_format_refuses_everything_else(data, fragment):
    with pytest.raises(UnsupportedImageError, match=fragment):
        sniff_format(data)


def test_a_png_named_dcm_still_decodes(tmp_path):
    path = tmp_path / "chest.dcm"
    path.write_bytes(encode_png(np.full((8, 8), 200, np.uint8)))
    d = decode_image(path.read_bytes())
    assert d.meta.source_format == "png" and np.allclose(d.pixels, 200 / 255)


# ---------------------------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_8bit_gray_is_shown_unchanged():
    arr = (np.arange(256, dtype=np.uint8).reshape(16, 16))
    d = decode_image(encode_png(arr))
    assert d.meta.bits_stored == 8 and d.meta.window.source == "full range"
    assert np.allclose(d.pixels, arr / 255, atol=1e-6)


def test_png_can_be_rewindowed_and_back():
    arr = ramp(16, 16, 200).astype(np.uint8)
    d = decode_image(encode_png(arr), window="percentile")
    assert d.meta.window.source == "percentile 0.5-99.5"
    back = d.rewindow("auto")
    assert back.meta.window.source == "full range" and np.allclose(back.pixels, arr / 255, atol=1e-6)
    assert np.allclose(d.rewindow(Window(100, 200, "user", "LINEAR_EXACT")).pixels, np.clip(arr / 200, 0, 1),
                       atol=1e-6)
    with pytest.raises(InvalidWindowError, match="no window presets"):
        d.rewindow(0)


def test_png_16bit_gray_keeps_16_bits():
    arr = np.linspace(0, 65535, 64 * 32).reshape(64, 32).astype(np.uint16)
    d = decode_image(encode_png(arr))
    assert d.meta.bits_stored == 16 and d.meta.photometric_interpretation == "MONOCHROME2"
    assert np.allclose(d.pixels, arr / 65535, atol=1e-6)
    assert np.array_equal(d.raw, arr.astype(np.float32))


def test_png_rgb_becomes_bt601_luminance():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    d = decode_image(encode_png(rgb))
    assert np.allclose(d.raw, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=1e-3)
    assert d.meta.photometric_interpretation == "RGB" and any("luminance" in w for w in d.meta.warnings)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1"])
def test_png_other_modes_decode(mode):
    im = Image.fromarray((ramp(8, 8, 255)).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    assert decode_or_refuse(buffer.getvalue()) is not None


def test_jpeg_gray_and_rgb():
    gray = ramp(32, 32, 255).astype(np.uint8)
    d = decode_image(jpeg_bytes(gray))
    assert d.meta.source_format == "jpeg" and float(np.abs(d.pixels - gray / 255).max()) < 0.05
    rgb = np.stack([gray, gray, gray], axis=-1)
    assert float(np.abs(decode_image(jpeg_bytes(rgb)).pixels - gray / 255).max()) < 0.05


def test_jpeg_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = decode_image(jpeg_bytes(np.zeros((10, 30), np.uint8), exif=exif))
    assert d.pixels.shape == (30, 10)


@pytest.mark.parametrize("width,height,max_pixels", [(30000, 30000, 50_000_000), (8000, 8000, 50_000_000),
                                                     (10000, 10000, 200_000_000)])
def test_decompression_bomb_png_is_refused_fast(width, height, max_pixels):
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        decode_image(png_claiming(width, height), max_pixels=max_pixels)
    assert time.perf_counter() - start < 1.0


def test_pixel_cap_applies_to_png():
    with pytest.raises(ImageTooLargeError, match="limit"):
        decode_image(encode_png(np.zeros((20, 20), np.uint8)), max_pixels=100)


@pytest.mark.parametrize("make", [lambda: encode_png(ramp(64, 64, 255).astype(np.uint8)),
                                  lambda: jpeg_bytes(ramp(64, 64, 255).astype(np.uint8))])
def test_truncated_png_and_jpeg_are_corrupt(make):
    data = make()
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------------------------
# synthetic DICOM


def test_synthetic_cr_decodes_with_rescale_and_spacing():
    arr = ramp()
    d = decode_image(make_dicom(arr, RescaleSlope=2, RescaleIntercept=-100, ImagerPixelSpacing=[0.15, 0.15],
                                ViewPosition="AP", WindowCenter=[3000, 500], WindowWidth=[6000, 400],
                                WindowCenterWidthExplanation=["SOFT", "BONE"]))
    assert np.array_equal(d.raw, arr.astype(np.float32) * 2 - 100)
    assert [w.source for w in d.meta.window_presets] == ["file preset 1 (SOFT)", "file preset 2 (BONE)"]
    assert d.meta.pixel_spacing_mm == (0.15, 0.15) and any("Imager" in w for w in d.meta.warnings)
    assert d.meta.view_position == "AP"
    second = decode_image(make_dicom(arr, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=[3000, 500],
                                     WindowWidth=[6000, 400]), window=1)
    assert second.meta.window.center == 500


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(function):
    arr = ramp(16, 256, 4095)
    data = make_dicom(arr, WindowCenter=1800, WindowWidth=900, VOILUTFunction=function)
    d = decode_image(data)
    ds = pydicom.dcmread(io.BytesIO(data))
    expected = apply_windowing(ds.pixel_array, ds) / 4095
    assert d.meta.window.function == function
    assert float(np.abs(d.pixels - expected).max()) < 1e-5


def test_invalid_window_presets_are_skipped_with_a_warning():
    d = decode_image(make_dicom(ramp(), WindowCenter=[100, 200], WindowWidth=[0, 50]))
    assert [w.center for w in d.meta.window_presets] == [200]
    assert any("preset 1 is invalid" in w for w in d.meta.warnings)


@pytest.mark.parametrize("photometric,shape,inverted", [
    ("MONOCHROME1", None, True), ("MONOCHROME1", "INVERSE", True), ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", "INVERSE", True),
])
def test_polarity_is_inverted_at_most_once(photometric, shape, inverted):
    arr = ramp()
    extra = {"PresentationLUTShape": shape} if shape else {}
    d = decode_image(make_dicom(arr, sop_class=DX_PRESENTATION, modality="DX", photometric=photometric,
                                WindowCenter=2048, WindowWidth=4096, **extra))
    upright = apply_window(d.raw, d.meta.window, "MONOCHROME2")
    assert np.array_equal(d.pixels, 1 - upright if inverted else upright)


def test_fifty_thousand_frames_are_refused_before_decoding(monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(dicom_reader, "pixel_array", must_not_decode)
    data = make_dicom(None, rows=512, columns=512, frames=50000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="50000 frames"):
        decode_image(data)
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        decode_image(data, max_frames=100_000)
    assert time.perf_counter() - start < 1.0


def test_single_frame_over_the_pixel_cap_is_refused():
    with pytest.raises(ImageTooLargeError, match="8000 x 8000"):
        decode_image(make_dicom(None, rows=8000, columns=8000))


def test_multi_frame_shows_frame_one():
    frames = np.stack([ramp(), 4095 - ramp()])
    ds_bytes = make_dicom(None, rows=32, columns=48, frames=2, sop_class="1.2.840.10008.5.1.4.1.1.7.3",
                          modality="OT")
    ds = pydicom.dcmread(io.BytesIO(ds_bytes))
    ds.PixelData = frames.astype(np.uint16).tobytes()
    d = decode_image(dataset_bytes(ds))
    assert np.array_equal(d.raw, frames[0].astype(np.float32)) and d.meta.number_of_frames == 2


@pytest.mark.parametrize("kwargs,fragment", [
    ({"sop_class": CT, "modality": "CT"}, "CT image"),
    ({"sop_class": SECONDARY_CAPTURE, "modality": "CT"}, "CT image"),
    ({"sop_class": CR, "modality": "MG"}, "mammogram"),
    ({"sop_class": DX_PROCESSING, "modality": "DX"}, "for processing"),
    ({"sop_class": DX_PRESENTATION, "modality": "DX", "PresentationIntentType": "FOR PROCESSING"},
     "for processing"),
    ({"transfer_syntax": DeflatedExplicitVRLittleEndian}, "Deflate"),
    ({"transfer_syntax": "1.2.840.10008.1.2.4.100", "encapsulated_frames": [b"\x00" * 16]}, "MPEG2"),
    ({"photometric": "PALETTE COLOR"}, "colour encoding"),
])
def test_non_radiographs_are_refused(kwargs, fragment):
    with pytest.raises(UnsupportedImageError, match=fragment) as info:
        decode_image(make_dicom(ramp(8, 8), **kwargs))
    assert PATIENT not in str(info.value)


@pytest.mark.parametrize("compress", [RLELossless, JPEG2000Lossless])
def test_synthetic_compressed_round_trip(compress):
    arr = ramp(64, 64)
    assert np.array_equal(decode_image(make_dicom(arr, compress=compress)).raw, arr.astype(np.float32))


def test_dicom_without_preamble_is_refused_with_advice():
    with pytest.raises(UnsupportedImageError, match="preamble"):
        decode_image(make_dicom(ramp())[132:])


def test_truncated_dicom_is_corrupt():
    data = make_dicom(ramp(64, 64))
    with pytest.raises(CorruptImageError):
        decode_image(data[:-100])
    with pytest.raises(ImagingError):
        decode_image(data[:200])


def test_missing_pixel_data_is_corrupt():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(ramp())))
    del ds.PixelData
    with pytest.raises(CorruptImageError, match="no image data"):
        decode_image(dataset_bytes(ds))


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # raised while building the test file
def test_patient_data_never_reaches_messages_logs_or_warnings(caplog):
    # BodyPartExamined is CS: "Smith, John" is an invalid value pydicom warns about (and would log verbatim)
    data = make_dicom(ramp(), BodyPartExamined="Smith, John")
    refused = make_dicom(ramp(), sop_class=CT, modality="CT", BodyPartExamined="Smith, John")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("error")  # decode_image must not let pydicom's warnings (which quote values) out
        d = decode_image(data)
        with pytest.raises(UnsupportedImageError) as info:
            decode_image(refused)
    assert "<redacted>" in caplog.text  # pydicom did log the bad value, redacted
    text = caplog.text + " ".join(d.meta.warnings) + str(info.value) + repr(d)
    assert "Smith" not in text and PATIENT not in text and "SECRET-ID" not in text


@pytest.mark.parametrize("bad", ["lung", -1, (1.0,), (100, 0), True, 2.5])
def test_malformed_window_requests_are_refused_before_decoding(bad):
    with pytest.raises(InvalidWindowError):
        decode_image(b"not even an image", window=bad)


@pytest.mark.parametrize("bad", [0, -5, 2.0, True])
def test_caps_must_be_positive_integers(bad):
    with pytest.raises(ValueError):
        decode_image(encode_png(np.zeros((2, 2), np.uint8)), max_pixels=bad)


def test_window_dataclass_validation_and_description():
    w = Window(40, 400, "file preset 1 (LUNG)")
    assert w.description == "file preset 1 (LUNG): centre 40, width 400"
    with pytest.raises(InvalidWindowError):
        Window(0, 0.5, "user")
    assert Window(0, 0.5, "user", "LINEAR_EXACT").width == 0.5


def test_gpl_decoders_are_never_selected():
    from pydicom.uid import JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    for ts in list(JPEGTransferSyntaxes) + list(JPEGLSTransferSyntaxes):
        assert "pylibjpeg" not in dicom_reader.DECODER_PLUGINS.get(ts, ())  # would be GPL pylibjpeg-libjpeg


def test_imaging_imports_no_torch_and_no_web_stack():
    code = ("import sys, app.imaging; bad = [m for m in ('torch', 'fastapi', 'starlette', 'diffusers', 'jinja2') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# fuzzing: any bytes -> a result or an ImagingError, never another exception


def _fuzz_seeds() -> list[bytes]:
    arr = ramp(24, 20)
    gray8 = ramp(24, 20, 255).astype(np.uint8)
    jpeg_frame = jpeg_bytes(gray8)
    jpeg_dicom = make_dicom(None, rows=24, columns=20, sop_class=SECONDARY_CAPTURE, modality="OT", bits_stored=8,
                            bits_allocated=8, transfer_syntax=JPEGBaseline8Bit, encapsulated_frames=[jpeg_frame])
    return [make_dicom(arr), make_dicom(arr, compress=RLELossless), make_dicom(ramp(32, 32), compress=JPEG2000Lossless),
            jpeg_dicom, encode_png(gray8), encode_png(arr), jpeg_frame]


FUZZ_SEEDS = _fuzz_seeds()
FUZZ = settings(max_examples=100, deadline=timedelta(seconds=2), database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def test_fuzz_seeds_are_valid():
    for seed in FUZZ_SEEDS:
        assert decode_or_refuse(seed) is not None


@FUZZ
@given(st.binary(max_size=600) | st.binary(max_size=400).map(lambda b: b"\x00" * 128 + b"DICM" + b))
def test_fuzz_random_bytes_only_raise_imaging_errors(data):
    decode_or_refuse(data)


@FUZZ
@given(st.sampled_from(range(len(FUZZ_SEEDS))), st.integers(0, 4000), st.binary(min_size=1, max_size=6),
       st.booleans())
def test_fuzz_truncated_and_mutated_files_only_raise_imaging_errors(index, where, patch, truncate):
    seed = FUZZ_SEEDS[index]
    at = where % len(seed)  # mostly within the first kilobytes, where the headers are
    data = seed[:at] if truncate else seed[:at] + patch + seed[at + len(patch):]
    decode_or_refuse(data)


# ---------------------------------------------------------------------------------------------------------------
# letterbox geometry


@pytest.mark.parametrize("height,width,size", [(257, 131, 64), (131, 257, 64), (64, 64, 64), (20, 30, 64),
                                               (1, 4000, 512), (4000, 1, 512), (3, 5, 7)])
def test_letterbox_pads_never_crops_and_maps_back_exactly(height, width, size):
    ones = np.ones((height, width), np.float32)
    model, lb = letterbox(ones, size)
    assert model.shape == (size, size) and model.dtype == np.float32
    x0, y0, x1, y1 = lb.content_box
    inside = np.zeros((size, size), bool)
    inside[y0:y1, x0:x1] = True
    assert np.allclose(model[inside], 1, atol=1e-6) and np.all(model[~inside] == 0)
    assert max(lb.content_height, lb.content_width) == size
    assert (lb.native_height, lb.native_width, lb.size) == (height, width, size)
    assert lb.scale == size / max(height, width)
    back = unletterbox(model, lb)
    assert back.shape == (height, width) and back.dtype == np.float32
    assert np.allclose(back, 1, atol=1e-5)
    x, y = lb.to_native(*lb.to_model(width * 0.3, height * 0.7))
    assert abs(x - width * 0.3) < 1e-9 and abs(y - height * 0.7) < 1e-9


def test_letterbox_is_identity_when_the_long_side_already_fits():
    img = np.random.default_rng(0).random((64, 40), dtype=np.float32)
    model, lb = letterbox(img, 64)
    assert np.array_equal(unletterbox(model, lb), img)
    assert (lb.offset_x, lb.offset_y) == (12, 0)


def test_letterbox_round_trip_of_a_smooth_image_is_close():
    y, x = np.mgrid[0:257, 0:131]
    img = (0.5 + 0.25 * np.sin(x / 20) * np.cos(y / 25)).astype(np.float32)
    model, lb = letterbox(img, 128)
    assert float(np.abs(unletterbox(model, lb) - img).max()) < 0.02


def test_unletterbox_handles_channels_and_checks_shape():
    img = np.random.default_rng(1).random((31, 17), dtype=np.float32)
    model, lb = letterbox(img, 32)
    stacked = np.stack([model, model, model], axis=-1)
    assert unletterbox(stacked, lb).shape == (31, 17, 3)
    with pytest.raises(ValueError):
        unletterbox(model[:-1], lb)
    with pytest.raises(ValueError):
        letterbox(np.full((4, 4), np.nan, np.float32), 8)


def test_content_of_and_content_to_native_are_the_two_halves_of_unletterbox():
    """unletterbox = content_to_native(content_of(...)); content_to_native is linear, so the mean of resized
    arrays is the resize of their mean (what a review run's map relies on); wrong content shapes are refused."""
    from app.imaging import content_of, content_to_native

    rng = np.random.default_rng(3)
    img = rng.random((97, 61), dtype=np.float32)
    model, lb = letterbox(img, 32)
    content = content_of(model, lb, smoothing_sigma=1.5)
    assert content.shape == (lb.content_height, lb.content_width) == (32, 20)
    assert np.array_equal(content_to_native(content, lb), unletterbox(model, lb, smoothing_sigma=1.5))
    stack = rng.random((32, 20, 4), dtype=np.float32)
    resized = content_to_native(stack, lb)
    assert resized.shape == (97, 61, 4)
    assert np.allclose(resized.mean(axis=-1), content_to_native(stack.mean(axis=-1), lb), atol=1e-6)
    with pytest.raises(ValueError, match=r"content must be \(32, 20\[, C\]\)"):
        content_to_native(model, lb)


def test_unletterbox_smoothing_of_a_square_without_padding_is_the_gaussian_filter():
    """Map smoothing (issue 16): on a square image of the model's size the content box is the whole frame, so the
    smoothing is scipy's Gaussian filter (reflect) and nothing else; sigma 0 is the unsmoothed result, bit for bit."""
    from scipy import ndimage

    img = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    model, lb = letterbox(img, 32)
    assert lb.content_box == (0, 0, 32, 32)
    for sigma in (0.7, 2.0, 4.0):
        smoothed = unletterbox(model, lb, smoothing_sigma=sigma)
        assert smoothed.dtype == np.float32 and smoothed.shape == (32, 32)
        assert np.allclose(smoothed, ndimage.gaussian_filter(img, sigma, mode="reflect"), atol=1e-6)
    assert unletterbox(model, lb, smoothing_sigma=0.0).tobytes() == unletterbox(model, lb).tobytes()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="smoothing_sigma"):
            unletterbox(model, lb, smoothing_sigma=bad)


def test_unletterbox_smoothing_stays_inside_the_content_box():
    """The padding never bleeds into the image: a dark image in a frame padded bright comes back dark, and the
    result is the content box smoothed on its own, then resized; channels are smoothed one by one."""
    from scipy import ndimage

    img = np.zeros((40, 20), np.float32)
    model, lb = letterbox(img, 32, pad_value=1.0)
    x0, y0, x1, y1 = lb.content_box
    assert x0 > 0 and (model[:, :x0] == 1.0).all()
    back = unletterbox(model, lb, smoothing_sigma=4.0)
    assert back.shape == (40, 20) and float(np.abs(back).max()) == 0.0
    noisy = np.random.default_rng(3).random((40, 20), dtype=np.float32)
    model, lb = letterbox(noisy, 32, pad_value=1.0)
    content = ndimage.gaussian_filter(model[y0:y1, x0:x1], 3.0, mode="reflect")
    want = unletterbox(np.pad(content, ((y0, 32 - y1), (x0, 32 - x1))), lb)
    assert np.allclose(unletterbox(model, lb, smoothing_sigma=3.0), want, atol=1e-6)
    stacked = np.stack([model, 1.0 - model], axis=-1)
    both = unletterbox(stacked, lb, smoothing_sigma=3.0)
    assert both.shape == (40, 20, 2)
    assert np.allclose(both[..., 0], want, atol=1e-6) and np.allclose(both[..., 1], 1.0 - want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# writers


def test_to_uint8():
    out = to_uint8(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]], np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(ValueError):
        to_uint8(np.array([[np.nan]], np.float32))
    with pytest.raises(ValueError):
        to_uint8(np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("bits,tolerance", [(8, 0.5 / 255 + 1e-6), (16, 0.5 / 65535 + 1e-6)])
def test_png_writer_round_trips_through_decode(bits, tolerance):
    img = np.random.default_rng(2).random((33, 17), dtype=np.float32)
    data = to_png_bytes(img, bits=bits, text={"Software": "VALD-MD", "Comment": "résumé — ✓"})
    assert Image.open(io.BytesIO(data)).text == {"Software": "VALD-MD", "Comment": "résumé — ✓"}
    d = decode_image(data)
    assert d.meta.bits_stored == bits and float(np.abs(d.pixels - img).max()) <= tolerance


def test_png_writer_rgb_and_errors():
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(to_png_bytes(rgb)))), rgb)
    with pytest.raises(ValueError):
        to_png_bytes(rgb, bits=16)
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((2, 2), np.float32), bits=12)
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((2, 2), np.float32), text={"": "x"})
