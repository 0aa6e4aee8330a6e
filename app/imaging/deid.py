"""De-identification of a stored upload: DICOM PS3.15 basic profile (with the Retain UIDs option), PNG/JPEG
metadata removal. Bytes in, bytes out; the pixels are never touched, so the stored copy decodes to exactly the
image the user reviewed.

DICOM, in this order (PS3.15 Annex E, Table E.1-1; action codes as in the table):

1. every private element (odd group) is removed, at every nesting level;
2. the attributes of :data:`DICOM_ACTIONS` are removed (``X``) or emptied (``Z``: Type 2 attributes that must
   stay present), at every nesting level;
3. every remaining Person Name (PN), date (DA), date-time (DT), time (TM) and age (AS) value is emptied, at
   every nesting level: names anywhere, and dates removed rather than shifted;
4. overlay planes and curves (groups 60xx and 50xx: they can carry burned-in text as graphics) are removed;
5. file meta: the sending/receiving/source AE titles and private information are removed;
6. (0012,0062) Patient Identity Removed = ``YES``, (0012,0063) De-identification Method and (0012,0064)
   De-identification Method Code Sequence = DCM 113100 "Basic Application Confidentiality Profile" and
   DCM 113110 "Retain UIDs Option" are added.

UIDs are kept (Retain UIDs option): the DICOM Secondary Capture export files the overlay into the source's study
(0020,000D) and references the source image by (0008,0016)/(0008,0018). Pixel data, the image pixel module,
VOI/modality LUTs, windows, (0018,5101) View Position and pixel spacing are kept, because the stored copy must
decode to the reviewed image. Not done: the Clean Pixel Data option (text burned into the pixels stays; the
file's (0028,0301) Burned In Annotation says whether there is any) and the clean descriptors options.

PNG: the text and time chunks (``tEXt``, ``zTXt``, ``iTXt``, ``eXIf``, ``tIME``) and anything after ``IEND`` are
dropped. JPEG: the APP1 (EXIF, XMP), APP12, APP13 (IPTC) and COM segments before the first scan are dropped.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset

from app.imaging.errors import CorruptImageError

__all__ = ["DEIDENTIFICATION_METHOD", "DICOM_ACTIONS", "deidentify", "deidentify_dicom", "strip_jpeg_metadata",
           "strip_png_metadata"]

DEIDENTIFICATION_METHOD = ("PS3.15 Basic Application Confidentiality Profile", "Retain UIDs Option",
                           "VALD-MD; pixel data unchanged")
"""(0012,0063) De-identification Method written into the stored copy (LO, one value per line: 64 characters each)."""

_ZERO = "Z"
_REMOVE = "X"
DICOM_ACTIONS: dict[str, str] = {
    # patient (Z: Type 2 in the Patient module, kept present but empty)
    "PatientName": _ZERO, "PatientID": _ZERO, "PatientBirthDate": _ZERO, "PatientSex": _ZERO,
    "PatientBirthTime": _REMOVE, "PatientAge": _REMOVE, "PatientSize": _REMOVE, "PatientWeight": _REMOVE,
    "PatientAddress": _REMOVE, "PatientTelephoneNumbers": _REMOVE, "OtherPatientIDs": _REMOVE,
    "OtherPatientIDsSequence": _REMOVE, "OtherPatientNames": _REMOVE, "PatientBirthName": _REMOVE,
    "PatientMotherBirthName": _REMOVE, "IssuerOfPatientID": _REMOVE, "TypeOfPatientID": _REMOVE,
    "MilitaryRank": _REMOVE, "BranchOfService": _REMOVE, "MedicalRecordLocator": _REMOVE, "EthnicGroup": _REMOVE,
    "Occupation": _REMOVE, "PatientReligiousPreference": _REMOVE, "CountryOfResidence": _REMOVE,
    "RegionOfResidence": _REMOVE, "PatientComments": _REMOVE, "AdditionalPatientHistory": _REMOVE,
    "MedicalAlerts": _REMOVE, "Allergies": _REMOVE, "SmokingStatus": _REMOVE, "PregnancyStatus": _REMOVE,
    "PatientState": _REMOVE, "PatientInsurancePlanCodeSequence": _REMOVE, "PatientSexNeutered": _REMOVE,
    "PatientPrimaryLanguageCodeSequence": _REMOVE, "ReferencedPatientSequence": _REMOVE,
    "ReferencedPatientPhotoSequence": _REMOVE, "ResponsiblePerson": _REMOVE, "ResponsibleOrganization": _REMOVE,
    "CurrentPatientLocation": _REMOVE, "PatientInstitutionResidence": _REMOVE, "AdmissionID": _REMOVE,
    "AdmittingDiagnosesDescription": _REMOVE, "AdmittingDiagnosesCodeSequence": _REMOVE,
    # study and visit (Z: Type 2 in the General Study module)
    "AccessionNumber": _ZERO, "StudyID": _ZERO, "ReferringPhysicianName": _ZERO, "StudyDate": _ZERO,
    "StudyTime": _ZERO, "IssuerOfAccessionNumberSequence": _REMOVE, "StudyDescription": _REMOVE,
    "StudyComments": _REMOVE, "ReferencedStudySequence": _REMOVE, "ProcedureCodeSequence": _REMOVE,
    "RequestAttributesSequence": _REMOVE, "RequestedProcedureDescription": _REMOVE,
    "RequestedProcedureID": _REMOVE, "RequestedProcedureComments": _REMOVE, "RequestingPhysician": _REMOVE,
    "RequestingService": _REMOVE, "ImagingServiceRequestComments": _REMOVE,
    "PlacerOrderNumberImagingServiceRequest": _REMOVE, "FillerOrderNumberImagingServiceRequest": _REMOVE,
    "ScheduledProcedureStepDescription": _REMOVE, "ScheduledProcedureStepID": _REMOVE,
    "ScheduledPerformingPhysicianName": _REMOVE, "PerformedProcedureStepDescription": _REMOVE,
    "PerformedProcedureStepID": _REMOVE, "CommentsOnThePerformedProcedureStep": _REMOVE,
    "ReferencedPerformedProcedureStepSequence": _REMOVE, "IdentifyingComments": _REMOVE,
    # people and places
    "InstitutionName": _REMOVE, "InstitutionAddress": _REMOVE, "InstitutionalDepartmentName": _REMOVE,
    "InstitutionCodeSequence": _REMOVE, "ReferringPhysicianAddress": _REMOVE,
    "ReferringPhysicianTelephoneNumbers": _REMOVE, "ReferringPhysicianIdentificationSequence": _REMOVE,
    "PhysiciansOfRecord": _REMOVE, "PhysiciansOfRecordIdentificationSequence": _REMOVE,
    "PerformingPhysicianName": _REMOVE, "PerformingPhysicianIdentificationSequence": _REMOVE,
    "NameOfPhysiciansReadingStudy": _REMOVE, "PhysiciansReadingStudyIdentificationSequence": _REMOVE,
    "OperatorsName": _REMOVE, "OperatorIdentificationSequence": _REMOVE, "PersonName": _REMOVE,
    # device and acquisition free text
    "StationName": _REMOVE, "DeviceSerialNumber": _REMOVE, "PlateID": _REMOVE, "DetectorID": _REMOVE,
    "ProtocolName": _REMOVE, "AcquisitionProtocolDescription": _REMOVE,
    "AcquisitionDeviceProcessingDescription": _REMOVE,
    # series and image free text, reports, history of changes
    "SeriesDescription": _REMOVE, "ImageComments": _REMOVE, "DerivationDescription": _REMOVE,
    "ContentSequence": _REMOVE, "OriginalAttributesSequence": _REMOVE,
}
"""Keyword -> PS3.15 Table E.1-1 action applied here: ``X`` remove, ``Z`` replace by a zero-length value."""

_EMPTIED_VRS = frozenset({"PN", "DA", "DT", "TM", "AS"})
_FILE_META_REMOVED = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                      "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation")
_TAGS: dict[int, str] = {}
for _keyword, _action in DICOM_ACTIONS.items():
    _tag = tag_for_keyword(_keyword)
    if _tag is None:  # a typo in the table would silently keep an identifier
        raise ImportError(f"app.imaging.deid: {_keyword!r} is not a DICOM keyword known to pydicom")
    _TAGS[int(_tag)] = _action


def _clean(ds: Dataset) -> None:
    """Steps 2-4 on one data set level, then recursively on the items of the sequences that remain."""
    for elem in list(ds):
        tag = int(elem.tag)
        group = tag >> 16
        action = _TAGS.get(tag)
        if action == _REMOVE or (0x5000 <= group <= 0x50FF) or (0x6000 <= group <= 0x60FF and group % 2 == 0):
            del ds[elem.tag]
        elif action == _ZERO or elem.VR in _EMPTIED_VRS:
            ds[elem.tag] = DataElement(elem.tag, elem.VR, None)
        elif elem.VR == "SQ":
            for item in elem.value or []:
                _clean(item)


def _method_code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def deidentify_dicom(data: bytes) -> bytes:
    """De-identify a DICOM Part 10 file (see the module docstring for the profile).

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
            # 1. private elements, all levels
            ds.remove_private_tags()
            # 2-4. the profile's attributes, names, dates, overlays and curves, all levels
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

