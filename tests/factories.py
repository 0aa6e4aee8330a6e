"""Test inputs built in code: the PNG and DICOM bytes that several test files upload, decode or export.

One builder per kind of input, so that a change to what an "upload" is happens in one place:

- :func:`png_bytes` the random 8-bit grayscale upload (40 x 36 px) the web, job, security and artifact tests send;
- :func:`encode_png` an array as PNG bytes (masks, 16-bit images, other Pillow modes);
- :func:`png_claiming` a header-only PNG that claims a size (decompression bombs, oversized masks);
- :func:`make_dicom` a small synthetic DICOM Part 10 file with patient data planted in it;
- :func:`dataset_bytes` a pydicom data set as Part 10 bytes;
- :func:`edited_dicom` a real DICOM file (the shared data) with identifying attributes written into it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: the CR image storage SOP class (the radiograph class every upload path accepts)
CR = "1.2.840.10008.5.1.4.1.1.1"
#: the patient name :func:`make_dicom` plants; tests check it never leaks into messages or logs
PATIENT = "SECRETNAME^PATIENT"


def encode_png(array: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    """``array`` as PNG bytes through Pillow.

    Args:
        array: (H, W) uint8 / uint16 / bool or (H, W, 3|4) uint8 pixels, as ``Image.fromarray`` takes them.
        mode: optional Pillow mode passed to ``Image.fromarray``.
        **save: extra ``Image.save`` options (e.g. ``pnginfo``).
    """
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def png_bytes(h: int = 40, w: int = 36, seed: int = 0) -> bytes:
    """The test "upload": uniform random 8-bit grayscale pixels, ``h`` x ``w`` px, reproducible from ``seed``."""
    return encode_png((np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8))


def png_claiming(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A tiny valid-looking grayscale PNG whose IHDR declares ``width`` x ``height`` px (a decompression bomb).

    Decoders check the declared size before they read the (short) image data.
    """

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + chunk(b"IEND", b""))


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` written as a DICOM Part 10 file (preamble and file meta enforced)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def make_dicom(
    pixels: np.ndarray | None = None,
    *,
    sop_class: str = CR,
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    frames: int | None = None,
    rows: int | None = None,
    columns: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    compress: str | None = None,
    bits_allocated: int = 16,
    encapsulated_frames: list[bytes] | None = None,
    **attributes: object,
) -> bytes:
    """A small DICOM Part 10 file carrying :data:`PATIENT` as its patient name.

    Args:
        pixels: uint16 (rows, cols) pixel data, or None for a header-only claim of ``rows`` x ``columns``
            (default 16 x 16) with two bytes of pixel data.
        sop_class, modality, photometric, bits_stored, bits_allocated, frames, transfer_syntax: the header.
        compress: a pydicom compression transfer syntax applied to ``pixels``.
        encapsulated_frames: raw encapsulated pixel data fragments (replace ``pixels``).
        **attributes: further data elements by keyword; they override the defaults above (``PatientName`` too).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT, "SECRET-ID-42"
    if modality is not None:
        ds.Modality = modality
    shape = pixels.shape if pixels is not None else (rows or 16, columns or 16)
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = (pixels.astype(np.uint16).tobytes() if pixels is not None else b"\x00\x00")
    if encapsulated_frames is not None:
        ds.PixelData = encapsulate(encapsulated_frames)
        ds["PixelData"].VR = "OB"
    if compress is not None and pixels is not None:
        ds.compress(compress, pixels.astype(np.uint16))
    return dataset_bytes(ds)


def edited_dicom(source: Path, *, private_value: str | None = None, **attributes: object) -> bytes:
    """The DICOM file at ``source`` with ``attributes`` (by keyword) written into it, as Part 10 bytes.

    Args:
        source: a DICOM file (e.g. ``shared_data / "dicom" / "siim_cr_chest.dcm"``).
        private_value: when given, stored as a LO element in private block ``(0009, "ACME 1.0")``.
        **attributes: data elements to set, e.g. ``PatientName="Doe^Jane"``.
    """
    ds = pydicom.dcmread(source)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if private_value is not None:
        ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", private_value)
    return dataset_bytes(ds)
