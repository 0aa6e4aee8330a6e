"""The DICOM Secondary Capture export of a run's overlay (RGB, banner and legend burned in): by default
de-identified in a study of its own; on request a derived series in the source's study, referencing the source
image. DICOM inputs only; :func:`app.runs.exports.build_export` is the entry point for the web and the CLI.

Patient data: by default, a new Study Instance UID, Series Instance UID and SOP Instance UID, Patient Name and
Patient ID ``"ANONYMOUS"``, no birth date, sex, accession number, study date/time, study ID or referring physician,
and no reference to the source image (no Source Image or Referenced Image Sequence, whose SOP Instance UID would
link back), with (0012,0062) Patient Identity Removed ``YES``. So a PACS that receives it files it as a study of
its own, never as a second "patient" inside the source's study. Its pixels are the rendered overlay over the
source's pixels: text burned into the source radiograph is not scrubbed. ``include_patient_data=True`` makes the
other kind, a *derived series in the original study*: the source's Study Instance UID, its patient and study
modules, and the Source/Referenced Image Sequences, for storing back to the PACS the image came from.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app import __version__, rendering
from app.fileio import sha256_bytes
from app.rendering import OverlayOptions
from app.runs.read import DEFAULT_OVERLAY, DISCLAIMER, ExportError, open_run, read_map, render_overlay, run_facts
from app.runs.record import RunRecord

# highdicom and pydicom (~0.5 s to import together) are imported where used: with the first DICOM export, not with
# the server's start-up (the web app imports this module through app.runs.exports)
if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["ANONYMOUS", "DEIDENTIFICATION_METHOD", "SERIES_DESCRIPTION", "SERIES_NUMBER", "export_secondary_capture"]

logger = logging.getLogger("app.runs.exports")

SERIES_DESCRIPTION = "VALD-MD counterfactual overlay (AI, not for diagnostic use)"
"""(0008,103E) Series Description. LO holds at most 64 characters, so the full disclaimer goes into
(0020,4000) Image Comments and (0008,2111) Derivation Description instead."""
ANONYMOUS = "ANONYMOUS"
"""(0010,0010) Patient Name and (0010,0020) Patient ID of a Secondary Capture made without patient data."""
DEIDENTIFICATION_METHOD = "VALD-MD SC export: new UIDs, no identifiers copied"
"""(0012,0063) De-identification Method of a default (de-identified) Secondary Capture; LO, at most 64 characters."""
SERIES_NUMBER = 9001
"""(0020,0011) Series Number of the Secondary Capture: high, so it sorts after the acquired series."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Patient (C.7.1.1) and study-level (C.7.2.1, C.7.2.2) attributes copied only with include_patient_data=True.
_PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "PatientComments", "PatientSpeciesDescription", "PatientBreedDescription",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
_STUDY_KEYWORDS = (
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "ReferringPhysicianName", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight",
)



def _sniff(data: bytes) -> str:
    """A clinician's name for the format of non-DICOM bytes."""
    if data.startswith(_PNG_SIGNATURE):
        return "a PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "a JPEG"
    if not data:
        return "empty"
    return "not a DICOM file"


def _read_source(source: bytes | Dataset, record: RunRecord) -> Dataset:
    """The source's header (no pixels), checked to be this run's DICOM image input."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    if isinstance(source, Dataset):
        ds = source
    else:
        data = bytes(source)
        expected = record.input_sha256
        same_file = expected is None or sha256_bytes(data) == expected
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except InvalidDicomError:
            what = _sniff(data)
            if same_file and what in ("a PNG", "a JPEG"):
                raise ExportError(
                    f"A DICOM Secondary Capture needs a DICOM input; this run's input was {what}. "
                    "Export the annotated PNG or the bundle instead."
                ) from None
            raise ExportError(
                f"A DICOM Secondary Capture needs the run's source DICOM file; the file supplied is {what} "
                "(a DICOM Part 10 file starts with a 128-byte preamble and 'DICM')."
            ) from None
        if not same_file:
            raise ExportError(
                "The DICOM file supplied is not this run's input (its SHA-256 differs from record.json); "
                "supply the file the review was run on."
            )
    missing = [kw for kw in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID", "Rows", "Columns")
               if not ds.get(kw)]
    if missing:
        raise ExportError(
            f"The source DICOM lacks {', '.join(missing)}; a Secondary Capture must reference an image in a "
            "study. Supply the original radiograph."
        )
    return ds


def _copy_element(target: Dataset, source: Dataset, keyword: str) -> None:
    """Copy one attribute; text is copied decoded so it is re-encoded in the target's character set."""
    from pydicom.dataelem import DataElement
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    if keyword not in source:
        return
    elem = source[keyword]
    value = elem.value
    if isinstance(value, PersonName):
        value = str(value)
    elif isinstance(value, list | tuple | MultiValue) and value and isinstance(value[0], PersonName):
        value = [str(v) for v in value]
    else:
        value = copy.deepcopy(value)
    target[elem.tag] = DataElement(elem.tag, elem.VR, value)


def _source_reference(source: Dataset) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def export_secondary_capture(run_dir: Path, source_dicom: bytes | Dataset, *,
                             overlay: OverlayOptions = DEFAULT_OVERLAY, include_patient_data: bool = False) -> bytes:
    """A DICOM Secondary Capture Image of the run's overlay: de-identified in a new study, or (opt-in) a derived
    series in the source's study.

    Order of operations: (1) read the source header (``dcmread`` without ``force``, pixels skipped) and check
    that it is this run's input (SHA-256 against ``record["input"]["sha256"]`` when bytes are given); (2)
    render the overlay with legend and burn :data:`DISCLAIMER` in as a banner above it
    (:func:`app.rendering.burn_in_banner`); (3) build an
    ``highdicom.sc.SCImage`` (RGB, 8 bit, Explicit VR Little Endian) with new (0020,000E) Series and (0008,0018)
    SOP Instance UIDs and a new (0020,000D) Study Instance UID — the source's with ``include_patient_data``;
    (4) set (0008,0008) Image Type
    ``DERIVED\\SECONDARY\\OTHER``, (0028,0301) Burned In Annotation ``YES``, (0008,103E) Series Description
    :data:`SERIES_DESCRIPTION`, (0020,4000) Image Comments and (0008,2111) Derivation Description (the
    disclaimer and the run's parameters), and, with ``include_patient_data`` only, (0008,2112) Source Image
    Sequence and (0008,1140) Referenced Image Sequence naming the source's SOP Class/Instance UIDs; copy
    (0020,0020) Patient Orientation, the lossy
    compression flags (0028,2110)/(0028,2114) and, when ``input.png`` has the source's Rows × Columns,
    (0028,0030) Pixel Spacing; (5) patient and study identifiers — see below.

    Args:
        run_dir: A finished run folder whose input was ``source_dicom``.
        source_dicom: The original DICOM Part 10 bytes the run was made from, or its pydicom ``Dataset``
            (then the SHA-256 check is skipped).
        include_patient_data: ``False`` (default): de-identified in a new study — new Study Instance UID,
            Patient Name and Patient ID :data:`ANONYMOUS`; birth date, sex, accession number, study date/time,
            study ID and referring physician empty; no reference to the source image; (0012,0062) Patient
            Identity Removed ``YES`` and (0012,0063) De-identification Method. ``True``: a derived series in the
            original study — the source's Study Instance UID, the Source/Referenced Image Sequences, and the
            Patient module and the study-level identifiers (accession, dates, study ID/description, referring
            physician, age, size, weight) copied from the source, as a PACS expects for an object filed into
            the study.
        overlay: The display options, as for :func:`export_annotated_png`; ``lung_outline`` is refused (the
            outline is drawn on the annotated PNG only).

    Returns:
        The DICOM Part 10 bytes (SOP Class 1.2.840.10008.5.1.4.1.1.7, new UIDs on every call).

    Raises:
        ExportError: The source is not DICOM, not an image, or not this run's input; the run folder is
            incomplete or changed; an overlay option is out of range, or ``lung_outline`` is asked for.
    """
    # 1. read the run and the source header
    if overlay.lung_outline:
        raise ExportError("The lung outline is drawn on the annotated PNG only; export the Secondary Capture "
                          "without it.")
    run = open_run(run_dir)
    record = run.record()
    source = _read_source(source_dicom, record)
    original, amap = read_map(run)

    # 2. pixels: banner over overlay | legend
    pixels = np.ascontiguousarray(rendering.burn_in_banner(render_overlay(original, amap, record, overlay)))

    # 3. the Secondary Capture itself
    import highdicom as hd
    import pydicom

    same_frame = original.shape == (int(source.Rows), int(source.Columns))
    spacing = source.get("PixelSpacing") if same_frame else None
    facts = run_facts(record)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID) if include_patient_data else hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="VALD-MD",
        manufacturer_model_name="VALD-MD counterfactual review",
        software_versions=__version__,
        series_description=SERIES_DESCRIPTION,
        patient_id=ANONYMOUS,
        patient_name=None,  # set below: highdicom warns about one-component names, which DICOM allows
        patient_birth_date=None,
        patient_sex=None,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None,
        # highdicom insists on an orientation for patient coordinates; the source's (or none) replaces it below
        patient_orientation=("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        specific_character_set="ISO_IR 192",  # UTF-8: prompts and copied names may be any script
    )

    # 4. derivation, references and flags
    sc.PatientName = ANONYMOUS
    sc.ConversionType = "WSD"  # rendered by a workstation, not digitised
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"{DISCLAIMER}. Overlay ({overlay.mode}) of {facts['map_label']}; red: density the "
                        "counterfactual removed.")
    derivation = (
        f"Attribution overlay ({facts['map_label']}) rendered by VALD-MD {__version__}. {DISCLAIMER}. "
        + "; ".join(f"{k}={v}" for k, v in facts.items())
    )
    sc.DerivationDescription = derivation[:1024]  # ST: at most 1024 characters
    if include_patient_data:  # a derived series in the source's study points at its source image
        sc.SourceImageSequence = [_source_reference(source)]
        sc.ReferencedImageSequence = [_source_reference(source)]
    else:
        sc.PatientIdentityRemoved = "YES"
        sc.DeidentificationMethod = DEIDENTIFICATION_METHOD
    del sc.PatientOrientation
    if source.get("PatientOrientation"):
        _copy_element(sc, source, "PatientOrientation")
    else:
        sc.add_new("PatientOrientation", "CS", "")  # Type 2: present, empty when the source does not say
    if source.get("LossyImageCompression") == "01":  # once lossy, every derived image says so (C.7.6.1.1.5)
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio"):
            _copy_element(sc, source, keyword)

    # 5. patient and study identifiers
    if include_patient_data:
        for keyword in _PATIENT_KEYWORDS + _STUDY_KEYWORDS:
            _copy_element(sc, source, keyword)
        logger.info("secondary capture includes the source's patient module (include_patient_data=True)")

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sc, enforce_file_format=True)
    return buf.getvalue()
