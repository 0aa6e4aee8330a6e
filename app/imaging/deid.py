"""De-identification of a stored upload: DICOM PS3.15 Basic Application Level Confidentiality Profile (Annex E,
Table E.1-1, every attribute) with the Retain UIDs Option; PNG/JPEG metadata removal. Bytes in, bytes out; the
pixels are never touched, so the stored copy decodes to exactly the image the user reviewed.

The table is not kept by hand: :data:`BASIC_PROFILE` is Table E.1-1 of DICOM edition :data:`TABLE_EDITION` as
shipped by the ``dicom-anonymizer`` package (Kitware, BSD; ``dicomanonymizer.dicom_anonymization_databases``, one
Python list of tags per "Basic Prof." action code). Only its table is used: its engine applies the actions to the
top level only, turns removed dates into ``00010101`` and replaces UIDs at random, none of which is wanted here.

DICOM, in this order, at every nesting level:

1. every private element (odd group, private creators included) is removed: nothing in :mod:`app.imaging` reads
   one, so no Retain Safe Private Option allow-list is needed;
2. overlay planes (groups 60xx, incl. (60xx,3000) Overlay Data and (60xx,4000) Overlay Comments) and curves
   (groups 50xx) are removed whole: they can carry burned-in text as graphics;
3. each attribute of Table E.1-1 present gets the action of :data:`APPLIED`, by its table code:
   ``X``, ``X/Z``, ``X/D``, ``X/Z/D``, ``X/Z/U*`` remove it (for the radiograph IODs stored here these attributes
   are Type 3, so removal keeps the IOD valid); ``Z`` and ``Z/D`` keep it with a zero-length value (a sequence:
   no items); ``D`` replaces a text value by ``ANONYMIZED`` and a UID by a new random UID, empties every other
   value (names, dates, numbers, binary) and leaves a sequence without items; ``U`` keeps it (Retain UIDs Option);
4. every remaining Person Name (PN), date (DA), date-time (DT), time (TM) and age (AS) value is emptied: names
   anywhere, and dates removed rather than shifted (beyond the table, which does not list every date);
5. file meta: the sending/receiving/source AE titles and private information are removed; (0002,0003) Media
   Storage SOP Instance UID is kept (``U``, Retain UIDs);
6. (0012,0062) Patient Identity Removed ``YES``, (0012,0063) De-identification Method, (0012,0064)
   De-identification Method Code Sequence = DCM 113100 "Basic Application Confidentiality Profile" and DCM 113110
   "Retain UIDs Option" (CID 7050), and (0028,0303) Longitudinal Temporal Information Modified ``REMOVED``.

UIDs are kept (Retain UIDs Option): the DICOM Secondary Capture export files the overlay into the source's study
(0020,000D) and references the source image by (0008,0016)/(0008,0018); the database keeps them only as HMACs.
Pixel data, the image pixel module, VOI/modality LUTs, windows, (0018,5101) View Position, (0028,0030) pixel
spacing and (0028,0301) Burned In Annotation are not in the table and are kept, because the stored copy must decode
to the reviewed image. Not done: the Clean Pixel Data option (text burned into the pixels stays; ``decode_image``
warns when (0028,0301) Burned In Annotation is ``YES``), the Clean Descriptors, Retain Device Identity, Retain
Patient Characteristics and Retain Dates options.

PNG: the text and time chunks (``tEXt``, ``zTXt``, ``iTXt``, ``eXIf``, ``tIME``) and anything after ``IEND`` are
dropped. JPEG: the APP1 (EXIF, XMP), APP12, APP13 (IPTC) and COM segments before the first scan are dropped.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from enum import Enum

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector  # type: ignore[import-untyped]
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from app.imaging.errors import CorruptImageError

__all__ = ["APPLIED", "BASIC_PROFILE", "BASIC_PROFILE_MASKED", "DEIDENTIFICATION_METHOD", "TABLE_EDITION", "Applied",
           "deidentify", "deidentify_dicom", "strip_jpeg_metadata", "strip_png_metadata"]

TABLE_EDITION = "2026c"
"""The DICOM edition whose PS3.15 Table E.1-1 is applied (``dicom-anonymizer``'s ``dicomfields_2026c``)."""

DEIDENTIFICATION_METHOD = (f"PS3.15 E.1-1 ({TABLE_EDITION}) Basic Application Conf. Profile", "Retain UIDs Option",
                           "VALD-MD; pixel data unchanged")
"""(0012,0063) De-identification Method written into the stored copy (LO, one value per line: 64 characters each)."""


class Applied(Enum):
    """What is done to an attribute of Table E.1-1 (see the module docstring, step 3)."""

    REMOVE = "remove"
    EMPTY = "empty"
    DUMMY = "dummy"
    KEEP = "keep"


APPLIED: dict[str, Applied] = {
    "X": Applied.REMOVE, "X/Z": Applied.REMOVE, "X/D": Applied.REMOVE, "X/Z/D": Applied.REMOVE,
    "X/Z/U*": Applied.REMOVE, "Z": Applied.EMPTY, "Z/D": Applied.EMPTY, "D": Applied.DUMMY,
    "U": Applied.KEEP,  # Retain UIDs Option (DCM 113110)
}
"""Table E.1-1 "Basic Prof." action code -> what this module does with it."""

_CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
               "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


def _load_table() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """Table E.1-1 from ``dicom-anonymizer``: single tags -> action code, and the masked (repeating group) rows."""
    lists = dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}")
    single: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for category, code in _CATEGORIES.items():
        for entry in lists[category]:
            if len(entry) == 2:
                tag = (entry[0] << 16) | entry[1]
                if single.setdefault(tag, code) != code:  # a row in two lists: the table would be ambiguous
                    raise ImportError(f"app.imaging.deid: ({entry[0]:04X},{entry[1]:04X}) has two actions")
            else:  # (group, element, group mask, element mask): (50xx,xxxx), (60xx,3000), (60xx,4000)
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, code))
    if len(single) < 600:  # a truncated or renamed table would silently keep identifiers
        raise ImportError(f"app.imaging.deid: Table E.1-1 ({TABLE_EDITION}) has only {len(single)} attributes")
    return single, tuple(masked)


BASIC_PROFILE, BASIC_PROFILE_MASKED = _load_table()
"""(gggg,eeee) tag as int -> Table E.1-1 "Basic Prof." action code (``"X"``, ``"Z"``, ``"D"``, ``"U"``,
``"Z/D"``, ``"X/Z"``, ``"X/D"``, ``"X/Z/D"``, ``"X/Z/U*"``); and the masked rows as (tag, mask, code)."""

_EMPTIED_VRS = frozenset({"PN", "DA", "DT", "TM", "AS"})
_DUMMY_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"})
_DUMMY_TEXT = "ANONYMIZED"
_FILE_META_REMOVED = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                      "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation")


def _profile_action(tag: int) -> Applied | None:
    """What step 3 does with ``tag`` (None: not in Table E.1-1)."""
    code = BASIC_PROFILE.get(tag)
    if code is None:
        for value, mask, masked_code in BASIC_PROFILE_MASKED:
            if tag & mask == value & mask:
                code = masked_code
                break
    return None if code is None else APPLIED[code]


def _empty(ds: Dataset, tag: int, vr: str) -> None:
    ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)


def _clean(ds: Dataset) -> None:
    """Steps 1-4 on one data set level, then recursively on the items of the sequences that remain."""
    tags = [int(t) for t in ds.keys()]  # noqa: SIM118 - iterating the Dataset itself would parse every value
    for tag in tags:
        group = tag >> 16
        # 1-2. private elements, overlays, curves: decided by the tag alone, the value is never parsed
        if group % 2 == 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            del ds[tag]
            continue
        # 3. Table E.1-1
        action = _profile_action(tag)
        if action is Applied.REMOVE:
            del ds[tag]
            continue
        elem = ds[tag]
        vr = str(elem.VR)
        if action is Applied.EMPTY or (action is Applied.DUMMY and vr not in _DUMMY_TEXT_VRS | {"UI"}):
            _empty(ds, tag, vr)
        elif action is Applied.DUMMY:
            ds[tag] = DataElement(tag, vr, str(generate_uid(prefix=None)) if vr == "UI" else _DUMMY_TEXT)
        # 4. names, dates, times and ages wherever they are
        elif vr in _EMPTIED_VRS:
            _empty(ds, tag, vr)
        elif vr == "SQ":
            for item in elem.value or []:
                _clean(item)


def _method_code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def deidentify_dicom(data: bytes) -> bytes:
    """De-identify a DICOM Part 10 file (see the module docstring for the profile and its options).

    Args:
        data: A DICOM file that ``decode_image`` accepted (preamble + ``DICM``).

    Returns:
        The de-identified file, same transfer syntax, byte-identical (0028,xxxx) and (7FE0,0010) Pixel Data.

    Raises:
        CorruptImageError: pydicom cannot read or re-write the file (no copy is made; the message names no value).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings may quote element values
            ds = pydicom.dcmread(io.BytesIO(data))
            # 1-4. private elements, overlays, curves, Table E.1-1, names and dates, all levels
            _clean(ds)
            # 5. file meta
            meta: FileMetaDataset = ds.file_meta
            for keyword in _FILE_META_REMOVED:
                if keyword in meta:
                    delattr(meta, keyword)
            # 6. say what was done
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = list(DEIDENTIFICATION_METHOD)
            ds.DeidentificationMethodCodeSequence = [
                _method_code("113100", "Basic Application Confidentiality Profile"),
                _method_code("113110", "Retain UIDs Option"),
            ]
            ds.LongitudinalTemporalInformationModified = "REMOVED"
            out = io.BytesIO()
            pydicom.dcmwrite(out, ds, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - pydicom raises many types; their texts may quote element values
        raise CorruptImageError("This DICOM file could not be de-identified for storage, so it was not accepted. "
                                "Export it again from the PACS and retry.") from None
    return out.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DROPPED = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})


def strip_png_metadata(data: bytes) -> bytes:
    """Drop the PNG text, EXIF and time chunks and anything after ``IEND``; the image chunks are copied as-is.

    Raises:
        CorruptImageError: the chunk structure is broken.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise CorruptImageError("This PNG file is damaged (no PNG signature).")
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise CorruptImageError("This PNG file is damaged or truncated (no IEND chunk).")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise CorruptImageError("This PNG file is damaged or truncated.")
        if kind not in _PNG_DROPPED:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)


_JPEG_DROPPED = frozenset({0xE1, 0xEC, 0xED, 0xFE})  # APP1 (EXIF/XMP), APP12, APP13 (IPTC), COM
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7


def strip_jpeg_metadata(data: bytes) -> bytes:
    """Drop the JPEG APP1, APP12, APP13 and COM segments that precede the first scan; the rest is copied as-is.

    APP0 (JFIF), APP2 (ICC profile) and APP14 (Adobe colour transform) stay: they can change how pixels decode.

    Raises:
        CorruptImageError: the marker structure before the first scan is broken.
    """
    if not data.startswith(b"\xff\xd8"):
        raise CorruptImageError("This JPEG file is damaged (no start-of-image marker).")
    out = [b"\xff\xd8"]
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise CorruptImageError("This JPEG file is damaged or truncated.")
        marker = data[pos + 1]
        if marker in _JPEG_NO_LENGTH:
            out.append(data[pos:pos + 2])
            pos += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            out.append(data[pos:pos + 2])
            return b"".join(out)
        if pos + 4 > len(data):
            raise CorruptImageError("This JPEG file is damaged or truncated.")
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise CorruptImageError("This JPEG file is damaged or truncated.")
        if marker == 0xDA:  # start of scan: entropy-coded data and the rest of the file follow unchanged
            out.append(data[pos:])
            return b"".join(out)
        if marker not in _JPEG_DROPPED:
            out.append(data[pos:end])
        pos = end


_BY_FORMAT: dict[str, Callable[[bytes], bytes]] = {
    "dicom": deidentify_dicom, "png": strip_png_metadata, "jpeg": strip_jpeg_metadata,
}


def deidentify(data: bytes, source_format: str) -> bytes:
    """The de-identified copy of an upload, by its format (``"dicom"``, ``"png"``, ``"jpeg"``).

    Raises:
        CorruptImageError: see the per-format functions. ValueError: an unknown format (a programming error).
    """
    try:
        fn = _BY_FORMAT[source_format]
    except KeyError:
        raise ValueError(f"source_format={source_format!r}: use 'dicom', 'png' or 'jpeg'") from None
    return fn(data)

