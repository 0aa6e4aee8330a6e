"""The DICOM objects VALD-MD stores back to a PACS for one finished run: new derived series holding

1. the annotated overlay as a Secondary Capture (``app.runs.dicom_sc.export_secondary_capture``: banner burned in),
2. the counterfactual as a Secondary Capture (banner burned in), and
3. in the original study only, the thresholded attribution map as a DICOM Segmentation (``highdicom``) of the
   source image, which viewers overlay on the radiograph.

Identity is chosen once per store, never mixed (:class:`StoreMode`):

- ``original-study``: a derived series in the source's study; patient and study modules copied from the source
  header fetched from the PACS, (0008,2112) Source Image Sequence naming the source instance.
- ``deidentified``: a new study of its own, Patient Name/ID ``ANONYMOUS``, no reference to the source; the
  Segmentation is left out (it must reference the source image, which would link the study back).

Every object says "AI-generated … not for diagnostic use" in its burned-in banner (Segmentation: no pixels to burn
into), (0008,103E) Series Description and (0020,4000) Image Comments. UIDs are derived from the run id and the mode,
so storing the same run again replaces the objects instead of duplicating them (a retry after a partial failure).
"""

from __future__ import annotations

import copy
import io
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from app import __version__, attribution, rendering
from app.runs import exports
from app.runs.folder import RunFolder
from app.runs.read import open_run, read_artifact, read_map

# pydicom and highdicom (~0.5 s to import together) are imported where used: with the first store, not the server's
# start-up
if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["AI_SERIES_DESCRIPTION", "SEG_SERIES_DESCRIPTION", "StoreMode", "build_derived", "derived_uid"]

AI_SERIES_DESCRIPTION = "VALD-MD AI-generated, not for diagnostic use"
"""(0008,103E) Series Description of the stored series (LO: at most 64 characters)."""
SEG_SERIES_DESCRIPTION = "VALD-MD AI attribution map, not for diagnostic use"
SEG_THRESHOLD_PERCENTILE = 95.0
"""The Segmentation marks the pixels whose |map| is at or above this percentile inside the map's region."""
SEG_CATEGORY = ("91723000", "SCT", "Anatomical Structure")
"""(0062,0003) Segmented Property Category Code of the Segmentation: (code value, coding scheme, meaning)."""
SEG_TYPE = ("ATTRIB", "99VALDMD", "Counterfactual attribution region")
"""(0062,000F) Segmented Property Type Code, as :data:`SEG_CATEGORY`."""


class StoreMode(StrEnum):
    """How the stored series relates to the source study (chosen explicitly by the user; no default)."""

    ORIGINAL_STUDY = "original-study"
    DEIDENTIFIED = "deidentified"


def derived_uid(run_id: str, mode: StoreMode, what: str) -> str:
    """A UID fixed by (run, mode, object): the same store repeated carries the same UIDs."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["vald-md", run_id, str(mode), what]))


def _read(data: bytes) -> Dataset:
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def _counterfactual_rgb(run: RunFolder) -> np.ndarray:
    """The counterfactual shown (``counterfactual.png``), checked against the record's SHA-256, as 8-bit RGB."""
    names = run.counterfactuals()
    if not names:
        raise exports.ExportError("This run has no counterfactual image to store.")
    img = np.asarray(Image.open(io.BytesIO(read_artifact(run, names[0]))))
    img8 = (img / 257).astype(np.uint8) if img.dtype == np.uint16 or img.max() > 255 else img.astype(np.uint8)
    return np.repeat(img8[..., None], 3, axis=2) if img8.ndim == 2 else img8[..., :3]


def _uids(ds: Dataset, study_uid: str, series_uid: str, sop_uid: str, number: int) -> None:
    from pydicom.uid import UID

    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = UID(study_uid), UID(series_uid), UID(sop_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.SeriesDescription = AI_SERIES_DESCRIPTION
    ds.InstanceNumber = number


def _segmentation(run: RunFolder, source: Dataset, series_uid: str, sop_uid: str) -> Dataset:
    """A binary Segmentation of the run's thresholded |attribution| at the source's Rows × Columns."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    _, amap = read_map(run)
    region = amap.mask if amap.mask is not None else None
    value = attribution.threshold_value(amap.magnitude, threshold=SEG_THRESHOLD_PERCENTILE, mask=region)
    changed = attribution.changed_region(amap.magnitude, value, region)
    rows, cols = int(source.Rows), int(source.Columns)
    mask = np.asarray(Image.fromarray(changed.astype(np.uint8) * 255).resize((cols, rows), Image.Resampling.NEAREST))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="VALD-MD counterfactual attribution", version=__version__,
        family=Code("129465004", "SCT", "Medical image analysis (procedure)"))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="AI attribution (not for diagnostic use)",
        segmented_property_category=Code(*SEG_CATEGORY), segmented_property_type=Code(*SEG_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    src = copy.deepcopy(source)
    if "PixelData" not in src:  # WADO-RS metadata has no bulk data; highdicom reads only the header
        src.PixelData = b""
    seg = hd.seg.Segmentation(
        source_images=[src], pixel_array=(mask > 0)[None], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=series_uid, series_number=exports.SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=3, manufacturer="VALD-MD",
        manufacturer_model_name="VALD-MD counterfactual review", software_versions=__version__,
        device_serial_number="0", series_description=SEG_SERIES_DESCRIPTION, omit_empty_frames=False)
    seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the disclaimer's dash; copied names re-encode from text
    seg.ImageComments = (f"{exports.DISCLAIMER}. Pixels whose |attribution| is at or above the "
                         f"{SEG_THRESHOLD_PERCENTILE:g}th percentile of the map's region.")
    seg.ContentDescription = "AI-generated; not for diagnostic use"
    return seg


def build_derived(run_dir: Path, source: Dataset, mode: StoreMode, run_id: str) -> list[Dataset]:
    """The objects to STOW for one run: the two SCs in one new series, the Segmentation in another.

    Args:
        run_dir: the finished run folder.
        source: the source image's header: for ``ORIGINAL_STUDY`` the PACS's own (identified) metadata of the
            opened instance; for ``DEIDENTIFIED`` any header of it (nothing identifying is copied).
        mode: see :class:`StoreMode`.
        run_id: the run's id (fixes the UIDs).

    Returns:
        ``[overlay SC, counterfactual SC]`` plus the Segmentation in ``ORIGINAL_STUDY`` mode.

    Raises:
        exports.ExportError: the run folder is incomplete, or changed after the run (``ExportChangedError``,
            HTTP 409); the source lacks UIDs.
    """
    # 1. the overlay SC from the export path, with this store's identity
    original_study = mode is StoreMode.ORIGINAL_STUDY
    overlay = _read(exports.export_secondary_capture(run_dir, source, include_patient_data=original_study))
    study_uid = str(source.StudyInstanceUID) if original_study else derived_uid(run_id, mode, "study")
    series_uid = derived_uid(run_id, mode, "series")
    _uids(overlay, study_uid, series_uid, derived_uid(run_id, mode, "overlay"), 1)

    # 2. the counterfactual SC: the overlay's header (same identity), its own pixels
    counterfactual = copy.deepcopy(overlay)
    run = open_run(run_dir)
    pixels = np.ascontiguousarray(rendering.burn_in_banner(_counterfactual_rgb(run)))
    counterfactual.Rows, counterfactual.Columns = pixels.shape[:2]
    counterfactual.PixelData = pixels.tobytes()
    edited = " (edited only where the attribution map is above normal)" if run.record().edited else ""
    counterfactual.ImageComments = f"{exports.DISCLAIMER}. Counterfactual image generated by VALD-MD{edited}."
    counterfactual.pop("PixelSpacing", None)
    _uids(counterfactual, study_uid, series_uid, derived_uid(run_id, mode, "counterfactual"), 2)
    objects = [overlay, counterfactual]

    # 3. the attribution map as a Segmentation of the source image (original study only: it references it)
    if original_study:
        # a series holds one modality: the SEG gets a series of its own
        objects.append(_segmentation(run, source, derived_uid(run_id, mode, "seg-series"),
                                     derived_uid(run_id, mode, "segmentation")))
    return objects
