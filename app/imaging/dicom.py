"""DICOM Part 10 bytes -> :class:`DecodedImage`, refusing what is not a radiograph before any pixel is decoded.

Order of operations in :func:`read_dicom`:

1. file meta information (group 0002): (0002,0010) Transfer Syntax UID must be present and decodable by a
   permitted (non-GPL) plugin; deflated data sets are refused before they are inflated;
2. header without pixels (``stop_before_pixels``): (0008,0016) SOP Class UID and (0008,0060) Modality must
   describe a radiograph (CR, DX for presentation, or a secondary capture of one);
3. Image Pixel module (group 0028) checked, and Rows x Columns x Number of Frames against the caps;
4. frame 1 only is decoded (``pydicom.pixels.pixel_array(..., index=0)``);
5. grayscale: (0028,3000) Modality LUT or (0028,1052)/(0028,1053) rescale -> modality values (``raw``);
   colour: BT.601 luminance;
6. VOI window or LUT, then MONOCHROME1 / Presentation LUT Shape INVERSE inverted once -> [0, 1].

Kept whole past ~500 lines: one concern, the ordered refuse-before-decoding read above (VOI: voi.py, meta: meta.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame

# pydicom has no public "read only the file meta" for in-memory data; this is what dcmread itself calls.
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array

from app.imaging.errors import (
    CorruptImageError,
    ImageTooLargeError,
    ImagingError,
    InvalidWindowError,
    UnsupportedImageError,
)
from app.imaging.meta import DecodedImage, ImageMeta
from app.imaging.voi import (
    VOI_LUT_FUNCTIONS,
    VoiLut,
    Window,
    WindowRequest,
    apply_window,
    full_range_window,
    rgb_to_luminance,
    select_window,
)

__all__ = ["ACCEPTED_SOP_CLASSES", "DECODER_PLUGINS", "read_dicom"]

logger = logging.getLogger("vald_md.imaging")

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
})
ACCEPTED_SOP_CLASSES = frozenset({CR_IMAGE, DX_FOR_PRESENTATION}) | SECONDARY_CAPTURE
"""(0008,0016) SOP Class UIDs that are read; everything else is refused."""

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
"""(0008,0060) values accepted for any SOP class; secondary captures may also say OT (other)."""

NATIVE_TRANSFER_SYNTAXES = frozenset({
    dicom_uid.ImplicitVRLittleEndian, dicom_uid.ExplicitVRLittleEndian, dicom_uid.ExplicitVRBigEndian,
})
LOSSY_TRANSFER_SYNTAXES = frozenset({
    dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLSNearLossless, dicom_uid.JPEG2000,
    dicom_uid.HTJ2K,
})
DECODER_PLUGINS: dict[str, tuple[str, ...]] = {
    # Only these pydicom plugins are ever used, in this order. The "pylibjpeg" plugin is listed only where it
    # is backed by pylibjpeg-openjpeg / pylibjpeg-rle (MIT); for JPEG and JPEG-LS it would be pylibjpeg-libjpeg,
    # which is GPL-3.0 and must not be used.
    dicom_uid.JPEGBaseline8Bit: ("pillow", "gdcm"),
    dicom_uid.JPEGExtended12Bit: ("gdcm", "pillow"),  # 12-bit: see _decode_jpeg_extended_12bit
    dicom_uid.JPEGLossless: ("gdcm",),
    dicom_uid.JPEGLosslessSV1: ("gdcm",),
    dicom_uid.JPEGLSLossless: ("pyjpegls", "gdcm"),
    dicom_uid.JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    dicom_uid.JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    dicom_uid.JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    dicom_uid.HTJ2KLossless: ("pylibjpeg",),
    dicom_uid.HTJ2KLosslessRPCL: ("pylibjpeg",),
    dicom_uid.HTJ2K: ("pylibjpeg",),
    dicom_uid.RLELossless: ("pylibjpeg", "pydicom"),
}

_MODALITY_NAMES = {
    "CT": "a CT image", "MR": "an MR image", "US": "an ultrasound image", "MG": "a mammogram",
    "NM": "a nuclear medicine image", "PT": "a PET image", "XA": "an X-ray angiogram", "RF": "a fluoroscopy image",
    "IO": "an intra-oral dental X-ray", "PX": "a panoramic dental X-ray", "OP": "an ophthalmic photograph",
    "SM": "a microscopy slide", "ES": "an endoscopy image", "XC": "a photograph", "RTIMAGE": "a radiotherapy image",
    "RTDOSE": "a radiotherapy dose", "RTPLAN": "a radiotherapy plan (not an image)",
    "RTSTRUCT": "a radiotherapy structure set (not an image)", "SR": "a structured report (not an image)",
    "PR": "a presentation state (not an image)", "KO": "a key object selection (not an image)",
    "SEG": "a segmentation", "DOC": "an encapsulated document (not an image)",
}
_REFUSAL = "This DICOM is {what}; VALD-MD reads chest radiographs (CR/DX)."
_FOR_PROCESSING = (
    'This DICOM is a DX image "for processing" (raw detector data that is not meant for viewing). '
    'Export the "for presentation" version of the radiograph and try again.'
)
_UNREADABLE = "This file starts like DICOM but its header is damaged or truncated and cannot be read."
_BAD_HEADER = "This DICOM's image description (group 0028: rows, columns, bits) is missing or invalid."
_BAD_PIXELS = "The image data in this DICOM is damaged or incomplete (truncated file?) and cannot be decoded."
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_UID = re.compile(r"[0-9.]{1,64}")


@dataclass(frozen=True)
class _ImagePixel:
    """The Image Pixel module (PS3.3 C.7.6.3) attributes needed before decoding."""

    rows: int  # (0028,0010)
    columns: int  # (0028,0011)
    frames: int  # (0028,0008), 1 when absent
    samples_per_pixel: int  # (0028,0002)
    photometric_interpretation: str  # (0028,0004)
    bits_allocated: int  # (0028,0100)
    bits_stored: int  # (0028,0101)
    pixel_representation: int  # (0028,0103): 0 unsigned, 1 two's complement

    @classmethod
    def from_dataset(cls, ds: Dataset) -> _ImagePixel:
        bits_allocated = int(ds.BitsAllocated)
        image = cls(
            rows=int(ds.Rows), columns=int(ds.Columns), frames=int(ds.get("NumberOfFrames") or 1),
            samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
            photometric_interpretation=str(ds.PhotometricInterpretation).strip().upper(),
            bits_allocated=bits_allocated, bits_stored=int(ds.get("BitsStored") or bits_allocated),
            pixel_representation=int(ds.get("PixelRepresentation") or 0),
        )
        if min(image.rows, image.columns, image.frames) < 1 or not 1 <= image.bits_stored <= bits_allocated:
            raise CorruptImageError(_BAD_HEADER)
        if bits_allocated not in (1, 8, 16, 32):
            raise UnsupportedImageError(f"{bits_allocated}-bit pixel storage is not supported for radiographs.")
        grayscale = image.samples_per_pixel == 1 and image.photometric_interpretation in ("MONOCHROME1",
                                                                                        "MONOCHROME2")
        colour = image.samples_per_pixel == 3 and image.photometric_interpretation in (
            "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
        if not (grayscale or colour):
            raise UnsupportedImageError(
                "This DICOM's colour encoding (Photometric Interpretation) is not supported; "
                "VALD-MD reads grayscale (MONOCHROME1/2) and RGB/YBR images.")
        return image

    @property
    def is_grayscale(self) -> bool:
        return self.samples_per_pixel == 1


def read_dicom(data: bytes, *, window: WindowRequest, max_pixels: int, max_frames: int) -> DecodedImage:
    """Decode a DICOM Part 10 file (preamble + ``DICM``) into a display-ready image.

    Args:
        data: The whole file.
        window: See ``decode_image``.
        max_pixels: Cap on (0028,0010) Rows x (0028,0011) Columns x (0028,0008) Number of Frames.
        max_frames: Cap on (0028,0008) Number of Frames.

    Returns:
        float32 ``(H, W)`` pixels in [0, 1], modality values in ``raw``, and metadata.

    Raises:
        UnsupportedImageError: Not a radiograph SOP class/modality, DX for processing, or no permitted decoder.
        ImageTooLargeError: Over a cap (checked before decoding).
        CorruptImageError: Truncated, malformed, or undecodable.
        InvalidWindowError: ``window`` names a preset the file does not have.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as tolerated:
        # pydicom warns about each irregularity it tolerates; the texts may quote values, so only count them
        warnings.simplefilter("always")
        # 1. file meta: transfer syntax, before the data set is parsed (a deflated one would be inflated whole)
        with _refuse_on_failure(_UNREADABLE):  # pydicom parses element values lazily: guard every access
            file_meta = _read_file_meta(data)
            transfer_syntax = _check_transfer_syntax(file_meta)
        # 2. header only, then: is it a radiograph?
        with _refuse_on_failure(_UNREADABLE):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            sop_class, modality = _check_sop_class(ds, file_meta, notes)
        # 3. image description and size caps, still before decoding
        with _refuse_on_failure(_BAD_HEADER):
            image = _ImagePixel.from_dataset(ds)
        _check_size(image, max_pixels=max_pixels, max_frames=max_frames)
        # 4. decode frame 1 only
        with _refuse_on_failure(_BAD_PIXELS):
            stored = _decode_first_frame(data, transfer_syntax, image)
        # 5. modality values (grayscale) or luminance (colour)
        with _refuse_on_failure(_BAD_PIXELS):
            if image.is_grayscale:
                raw = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
            else:
                raw = rgb_to_luminance(stored)
                notes.append("Colour image converted to grayscale (ITU-R BT.601 luminance).")
        # 6. VOI and polarity
        with _refuse_on_failure(_BAD_HEADER):
            presets = _window_presets(ds, transfer_syntax, notes) if image.is_grayscale else []
            shape = _presentation_lut_shape(ds, image, notes)
            meta = ImageMeta(
                source_format="dicom", modality=modality, sop_class_uid=sop_class,
                photometric_interpretation=image.photometric_interpretation, rows=image.rows,
                columns=image.columns, bits_stored=image.bits_stored, window=None, window_presets=presets,
                pixel_spacing_mm=_pixel_spacing(ds, notes), view_position=_code_string(ds.get("ViewPosition")),
                study_instance_uid=_uid(ds.get("StudyInstanceUID")),
                series_instance_uid=_uid(ds.get("SeriesInstanceUID")),
                sop_instance_uid=_uid(ds.get("SOPInstanceUID")), transfer_syntax_uid=str(transfer_syntax),
                warnings=notes, presentation_lut_shape=shape, number_of_frames=image.frames,
            )
            _add_notes(ds, image, transfer_syntax, notes)
    default = None if image.is_grayscale else full_range_window(2.0**image.bits_stored - 1)
    meta.window = select_window(raw, window, presets, default=default)
    pixels = apply_window(raw, meta.window, image.photometric_interpretation, presentation_lut_shape=shape)
    if tolerated:
        notes.append(f"The file has {len(tolerated)} minor DICOM encoding irregularities (tolerated).")
    logger.debug("decoded DICOM %s %dx%d, %s, window %s", modality, image.columns, image.rows,
                 transfer_syntax.name, meta.window.source)
    return DecodedImage(pixels=pixels, meta=meta, raw=raw)


@contextlib.contextmanager
def _refuse_on_failure(message: str) -> Iterator[None]:
    """Turn any non-ImagingError from pydicom or a decoder into CorruptImageError(message).

    The original exception is dropped (``from None``): its text may quote element values (patient data).
    """
    try:
        yield
    except ImagingError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom and the codecs raise many types for bad input
        logger.debug("DICOM refused: %s", type(exc).__name__)
        raise CorruptImageError(message) from None


def _read_file_meta(data: bytes) -> FileMetaDataset:
    """Group 0002 only (PS3.10 7.1), read after the 128-byte preamble and ``DICM`` prefix."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    return _read_file_meta_info(fp)


def _check_transfer_syntax(file_meta: FileMetaDataset) -> dicom_uid.UID:
    """(0002,0010) Transfer Syntax UID: present, and native or with a permitted decoder."""
    value = file_meta.get("TransferSyntaxUID")
    if not value:
        raise CorruptImageError(
            "This DICOM file has no Transfer Syntax UID (0002,0010) in its file meta information, so its "
            "pixels cannot be read safely. Re-export it from the PACS or the modality.")
    ts = dicom_uid.UID(str(value).strip().rstrip("\x00"))
    if ts == dicom_uid.DeflatedExplicitVRLittleEndian:
        raise UnsupportedImageError(
            "Deflate-compressed DICOM is not accepted; re-export it uncompressed or with JPEG, JPEG 2000 or RLE.")
    if ts not in NATIVE_TRANSFER_SYNTAXES and ts not in DECODER_PLUGINS:
        name = ts.name if ts.is_transfer_syntax and ts.name != ts else "an unrecognised encoding"
        raise UnsupportedImageError(
            f"This DICOM's pixel encoding ({name}) is not supported; re-export it uncompressed or with JPEG, "
            "JPEG 2000, JPEG-LS or RLE.")
    return ts


def _check_sop_class(ds: Dataset, file_meta: FileMetaDataset, notes: list[str]) -> tuple[str, str | None]:
    """(0008,0016) SOP Class UID and (0008,0060) Modality must describe a radiograph for presentation."""
    sop_class = str(ds.get("SOPClassUID") or file_meta.get("MediaStorageSOPClassUID") or "").strip()
    modality = _code_string(ds.get("Modality"))
    if sop_class == DX_FOR_PROCESSING or _code_string(ds.get("PresentationIntentType")) == "FOR PROCESSING":
        raise UnsupportedImageError(_FOR_PROCESSING)
    allowed = RADIOGRAPH_MODALITIES | ({"OT"} if sop_class in SECONDARY_CAPTURE else set())
    if sop_class not in ACCEPTED_SOP_CLASSES or (modality is not None and modality not in allowed):
        raise UnsupportedImageError(_REFUSAL.format(what=_describe(sop_class, modality)))
    if modality is None:
        notes.append("The file does not state its modality (0008,0060); make sure it is a chest radiograph.")
    elif modality == "OT":
        notes.append("This secondary capture is not marked as a radiograph (modality OT); make sure it is a "
                     "chest X-ray.")
    if sop_class in SECONDARY_CAPTURE:
        notes.append("This is a secondary capture (a converted image), not the original radiograph.")
    return sop_class, modality


def _describe(sop_class: str, modality: str | None) -> str:
    """Plain-language name of what was uploaded, from enumerated values only (never free text)."""
    if modality in _MODALITY_NAMES:
        return _MODALITY_NAMES[modality]
    name = dicom_uid.UID(sop_class).name if _UID.fullmatch(sop_class) else ""
    if name and name != sop_class:
        return f"a '{name}' object"
    if modality:
        return f"of modality {modality}"
    return "not an image VALD-MD can identify"


def _check_size(image: _ImagePixel, *, max_pixels: int, max_frames: int) -> None:
    """Rows x Columns x Number of Frames against the caps, before any pixel is decoded."""
    if image.frames > max_frames:
        raise ImageTooLargeError(f"This DICOM has {image.frames} frames; the limit is {max_frames}.")
    total = image.rows * image.columns * image.frames
    if total > max_pixels:
        frames = f" x {image.frames} frames" if image.frames > 1 else ""
        raise ImageTooLargeError(
            f"This image is {image.columns} x {image.rows} pixels{frames} ({total / 1e6:.1f} megapixels); the "
            f"limit is {max_pixels / 1e6:g} megapixels.")


def _decoding_plugin(ts: dicom_uid.UID) -> str:
    """The first permitted pydicom plugin that is installed for ``ts`` ("" = pydicom's native decoder)."""
    if ts in NATIVE_TRANSFER_SYNTAXES:
        return ""
    available = set(get_decoder(ts).available_plugins)
    for plugin in DECODER_PLUGINS[ts]:
        if plugin in available:
            return plugin
    raise UnsupportedImageError(f"No permitted decoder for {ts.name} is installed on this server.")


def _decode_first_frame(data: bytes, ts: dicom_uid.UID, image: _ImagePixel) -> np.ndarray:
    """Stored values of frame 1: ``(rows, columns)`` or ``(rows, columns, 3)`` RGB (YBR converted)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CorruptImageError("This DICOM has no image data (Pixel Data (7FE0,0010) is missing).")
    if ts == dicom_uid.JPEGExtended12Bit and image.bits_stored != 8:
        arr = _decode_jpeg_extended_12bit(ds, image)
    else:
        arr = pixel_array(ds, index=0, decoding_plugin=_decoding_plugin(ts))
    expected = (image.rows, image.columns) + ((3,) if image.samples_per_pixel == 3 else ())
    if arr.shape != expected:
        raise CorruptImageError(_BAD_PIXELS)
    return arr


def _decode_jpeg_extended_12bit(ds: Dataset, image: _ImagePixel) -> np.ndarray:
    """Frame 1 of 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) through GDCM directly.

    pydicom 3's GDCM plugin refuses 12-bit JPEG Extended, but python-gdcm >= 3.0.24 decodes it (GDCM retries
    with its 12-bit IJG codec and prints "Unsupported JPEG data precision 12" to stderr on the way).
    """
    try:
        import gdcm  # type: ignore[import-untyped]
    except ImportError:
        raise UnsupportedImageError("No decoder for 12-bit JPEG is installed on this server.") from None
    if image.samples_per_pixel != 1:
        raise UnsupportedImageError("12-bit colour JPEG is not supported.")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(get_frame(ds.PixelData, 0, number_of_frames=image.frames))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    codec_image = gdcm.Image()
    codec_image.SetNumberOfDimensions(2)
    codec_image.SetDimensions((image.columns, image.rows, 1))
    codec_image.SetDataElement(element)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(image.photometric_interpretation)
    codec_image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    codec_image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(dicom_uid.JPEGExtended12Bit)))
    codec_image.SetPixelFormat(gdcm.PixelFormat(1, 16, 12, 11, image.pixel_representation))
    buffer = codec_image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands back char* as str
    dtype = np.int16 if image.pixel_representation else np.uint16
    if len(buffer) != image.rows * image.columns * 2:
        raise CorruptImageError(_BAD_PIXELS)
    return np.frombuffer(buffer, dtype=dtype).reshape(image.rows, image.columns).copy()


def _window_presets(ds: Dataset, ts: dicom_uid.UID, notes: list[str]) -> list[Window]:
    """(0028,1050)/(0028,1051) pairs with (0028,1055) explanations, then (0028,3010) VOI LUT items."""
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in VOI_LUT_FUNCTIONS:
        notes.append("The file's VOI LUT Function (0028,1056) is not recognised; LINEAR was used.")
        function = "LINEAR"
    centers, widths = _values(ds, "WindowCenter"), _values(ds, "WindowWidth")
    explanations = _values(ds, "WindowCenterWidthExplanation")
    if len(centers) != len(widths):
        notes.append("The file's window centres and widths do not pair up; unpaired values were ignored.")
    presets: list[Window] = []
    for i, (center, width) in enumerate(zip(centers, widths, strict=False)):
        label = f"file preset {i + 1}{_explanation(explanations[i] if i < len(explanations) else None)}"
        try:
            presets.append(Window(float(center), float(width), label, function))
        except (InvalidWindowError, ValueError, TypeError):
            notes.append(f"File window preset {i + 1} is invalid and was skipped.")
    for j, item in enumerate(ds.get("VOILUTSequence") or []):
        try:
            lut = _voi_lut(item, ts)
        except Exception:  # noqa: BLE001 - any malformed item is skipped, not fatal
            notes.append(f"VOI LUT {j + 1} in the file is invalid and was skipped.")
            continue
        label = f"VOI LUT {j + 1}{_explanation(item.get('LUTExplanation'))}"
        presets.append(Window(lut.first_mapped + len(lut.data) / 2, len(lut.data), label, "LINEAR", lut))
    return presets


def _voi_lut(item: Dataset, ts: dicom_uid.UID) -> VoiLut:
    """One (0028,3010) item: (0028,3002) LUT Descriptor [entries (0 = 65536), first mapped, bits], (0028,3006)."""
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    value = item.LUTData
    if isinstance(value, bytes):  # OW: 16-bit words in the data set's byte order
        data = np.frombuffer(value[: 2 * entries], dtype="<u2" if ts.is_little_endian else ">u2")
    else:
        data = np.atleast_1d(np.asarray(value, dtype=np.int64))[:entries]
    return VoiLut(first_mapped, bits, tuple(int(v) for v in data))


def _presentation_lut_shape(ds: Dataset, image: _ImagePixel, notes: list[str]) -> str | None:
    """(2050,0020) Presentation LUT Shape, reconciled with MONOCHROME1 so the image is inverted exactly once."""
    shape = _code_string(ds.get("PresentationLUTShape"))
    if not image.is_grayscale or shape not in ("IDENTITY", "INVERSE"):
        return None
    if shape == "INVERSE" and image.photometric_interpretation == "MONOCHROME2":
        notes.append("The file asks for an inverted display (Presentation LUT Shape INVERSE); it is shown "
                     "inverted.")
    if shape == "IDENTITY" and image.photometric_interpretation == "MONOCHROME1":
        notes.append("MONOCHROME1 with Presentation LUT Shape IDENTITY is contradictory; shown as MONOCHROME1 "
                     "(inverted).")
    return shape


def _pixel_spacing(ds: Dataset, notes: list[str]) -> tuple[float, float] | None:
    """(0028,0030) Pixel Spacing, else (0018,1164) Imager Pixel Spacing: (row, column) spacing in mm."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in (ds.get(keyword) or [])]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            if keyword == "ImagerPixelSpacing":
                notes.append("Pixel spacing is the detector's (Imager Pixel Spacing), not calibrated at the "
                             "patient.")
            return values[0], values[1]
    return None


def _add_notes(ds: Dataset, image: _ImagePixel, ts: dicom_uid.UID, notes: list[str]) -> None:
    """Warnings a reader should see: extra frames, lossy compression, burned-in text, not a chest."""
    if image.frames > 1:
        notes.append(f"This file has {image.frames} frames; only the first is shown.")
    if ts in LOSSY_TRANSFER_SYNTAXES or str(ds.get("LossyImageCompression") or "").strip() == "01":
        notes.append("This image has been lossy-compressed.")
    if _code_string(ds.get("BurnedInAnnotation")) == "YES":  # the stored copy keeps it: no Clean Pixel Data option
        notes.append("The file says text is burned into the pixels (Burned In Annotation YES); it may identify the "
                     "patient and is kept in the stored copy.")
    body_part = _code_string(ds.get("BodyPartExamined"))
    if body_part not in (None, "CHEST"):
        notes.append(f"Body Part Examined is {body_part}, not CHEST; the model was trained on chest radiographs.")


def _values(ds: Dataset, keyword: str) -> list[Any]:
    """A multi-valued element as a list ([] when absent or unreadable)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - an unparsable value counts as absent
        return []
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _explanation(value: object) -> str:
    """`` (LUNG)`` from (0028,1055) / (0028,3003), printable and short, or ''."""
    text = "".join(ch for ch in str(value or "") if ch.isprintable()).strip()[:40]
    return f" ({text})" if text else ""


def _code_string(value: object) -> str | None:
    """A CS value, upper-cased, or None when absent or not a plausible code (never echo free text)."""
    text = str(value or "").strip().upper()
    return text if _CODE_STRING.fullmatch(text) else None


def _uid(value: object) -> str | None:
    text = str(value or "").strip().rstrip("\x00")
    return text if _UID.fullmatch(text) else None
