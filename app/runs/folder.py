"""One owner of a run folder: the names of its files and the one reader of them, with hash checks.

A finished review run (:func:`app.runs.review.run_review`) leaves in its folder:

=========================  ==========================================================================================
``input.png``              :data:`INPUT`: the decoded, windowed image as the model saw it (16-bit PNG, native size)
``counterfactual.png``     :data:`COUNTERFACTUAL`: the counterfactual shown, native size: the first sample, or the
                           edit restricted to the map's region (record ``counterfactual_edit``; the first sample is
                           then ``counterfactual-0.png``). ``counterfactual-<i>.png`` for sample ``i`` > 0:
                           :func:`counterfactual_name`; since 2026-12-07 at the model's resolution, the record's
                           ``sample_files``
``reconstruction.png``     :data:`RECONSTRUCTION`: the autoencoder's (or DDIM's) reconstruction of the input
``overlay.png``            :data:`OVERLAY`: the attribution overlay as the run rendered it (8-bit RGB)
``attribution.npy``        :data:`ATTRIBUTION`: the signed float32 (H, W) map
``attribution_std.npy``    :data:`ATTRIBUTION_STD`: per-pixel standard deviation over samples (samples > 1 only;
                           with map smoothing the model frame's SD resized, an upper bound of the native one)
``mask.png``               :data:`MASK`: the user's region mask (when one was given)
``lung_mask.png``          :data:`LUNG_MASK`: the segmenter's lung mask (when the map was restricted to it)
``record.json``            :data:`RECORD`: the :class:`~app.runs.record.RunRecord`, with every file's SHA-256
=========================  ==========================================================================================

Every read of a run file goes through :class:`RunFolder`, which checks the bytes against the SHA-256 that
``record.json`` lists for the file before anyone sees them: the viewer's images, the re-rendered overlay, the
exports and the PACS store alike. A file edited, replaced or added after the run is refused with
:class:`ArtifactChangedError` (HTTP 409), a missing one with :class:`RunFolderError`; nothing is shown, exported
or stored under the record's name that the run did not write. Records of old runs without ``artifacts_sha256``
are read unchecked (there is nothing to check against). ``record.json`` itself cannot be checked (it holds the
hashes); its own SHA-256 is in the audit trail and in every annotated export.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.fileio import sha256_bytes
from app.imaging.raster import decode_png_unit
from app.runs.record import RunRecord

__all__ = [
    "ATTRIBUTION",
    "ATTRIBUTION_STD",
    "COUNTERFACTUAL",
    "EDITED_FIRST_SAMPLE",
    "FETCHABLE",
    "INPUT",
    "LUNG_MASK",
    "MASK",
    "OVERLAY",
    "RECONSTRUCTION",
    "RECORD",
    "REGION_MASKS",
    "ArtifactChangedError",
    "RunFolder",
    "RunFolderError",
    "counterfactual_index",
    "counterfactual_name",
    "counterfactual_order",
    "decode_png_unit",
]

INPUT = "input.png"
COUNTERFACTUAL = "counterfactual.png"
EDITED_FIRST_SAMPLE = "counterfactual-0.png"
"""The first sample, when ``counterfactual.png`` holds the edit restricted to the map's region."""
RECONSTRUCTION = "reconstruction.png"
OVERLAY = "overlay.png"
ATTRIBUTION = "attribution.npy"
ATTRIBUTION_STD = "attribution_std.npy"
MASK = "mask.png"
LUNG_MASK = "lung_mask.png"
RECORD = "record.json"
REGION_MASKS = (MASK, LUNG_MASK)
"""The run files that restrict a map, in order of precedence (the user's mask, then the lungs)."""
FETCHABLE = re.compile(r"^(input|overlay|reconstruction|mask|lung_mask|counterfactual(-\d{1,2})?)\.png$|"
                       r"^attribution(_std)?\.npy$|^record\.json$")
"""Run files a client may fetch (never ``job.json``, the upload or anything else the server keeps beside them)."""
_COUNTERFACTUAL = re.compile(r"^counterfactual(?:-(\d+))?\.png$")


def counterfactual_name(sample: int) -> str:
    """The file of sample ``sample``'s counterfactual (0-based): ``counterfactual.png``, ``counterfactual-1.png``..."""
    return COUNTERFACTUAL if sample == 0 else f"counterfactual-{sample}.png"


def counterfactual_index(name: str) -> int | None:
    """The sample index of a counterfactual's file name, ``None`` for any other name (``counterfactual.png`` is 0,
    as is ``counterfactual-0.png``, the first sample of a run whose shown counterfactual was edited to the map's
    region: the record's ``counterfactual_edit``)."""
    match = _COUNTERFACTUAL.match(name)
    return None if match is None else int(match.group(1) or 0)


def counterfactual_order(name: str) -> tuple[int, int]:
    """Sort key of counterfactual files: by sample index, the shown ``counterfactual.png`` first."""
    return (counterfactual_index(name) or 0, 0 if name == COUNTERFACTUAL else 1)


class RunFolderError(ValueError):
    """A run folder cannot be read: missing, unfinished or damaged. The message is for the clinician."""


class ArtifactChangedError(RunFolderError):
    """A run file's bytes differ from the SHA-256 its ``record.json`` lists, or the run did not write it."""


class RunFolder:
    """One run folder, read through hash checks (see the module docstring). Reads the record once per instance;
    make one per request (a run folder changes only by deletion).

    Args:
        path: the run folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._record: tuple[RunRecord, bytes] | None = None

    # -- the record ------------------------------------------------------------------------------------------------
    def record_bytes(self) -> bytes:
        """``record.json``'s bytes, as written (after checking they parse as a run record).

        Raises:
            RunFolderError: the folder or its record is missing, or the record is not a run record.
        """
        return self._load()[1]

    def record(self) -> RunRecord:
        """The run's :class:`~app.runs.record.RunRecord`.

        Raises:
            RunFolderError: as for :meth:`record_bytes`.
        """
        return self._load()[0]

    def _load(self) -> tuple[RunRecord, bytes]:
        if self._record is None:
            if not self.path.is_dir():
                raise RunFolderError(f"run folder {self.path.name} does not exist; pass the folder a review run wrote.")
            try:
                data = (self.path / RECORD).read_bytes()
            except FileNotFoundError:
                raise RunFolderError(f"run folder {self.path.name} has no {RECORD}; the run did not finish. "
                                     "Run it again.") from None
            try:
                record = RunRecord.from_json(data)
            except ValueError as exc:
                raise RunFolderError(f"{exc} in run folder {self.path.name}; the run folder is damaged.") from exc
            self._record = (record, data)
        return self._record

    # -- the files -------------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """Whether the run wrote ``name``: listed in the record's hashes (old records without hashes: on disk).
        A listed file that is gone still counts (reading it then says so).

        Raises:
            RunFolderError: the record cannot be read.
        """
        hashes = self.record().artifacts_sha256
        if isinstance(hashes, dict) and hashes:
            return name in hashes
        return (self.path / name).is_file()

    def names(self) -> list[str]:
        """The files the run wrote (:meth:`has`), sorted; ``record.json`` not included.

        Raises:
            RunFolderError: the record cannot be read.
        """
        hashes = self.record().artifacts_sha256
        if isinstance(hashes, dict) and hashes:
            return sorted(str(n) for n in hashes)
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and FETCHABLE.match(p.name)
                      and p.name != RECORD)

    def counterfactuals(self) -> list[str]:
        """The run's counterfactual files, by sample index."""
        found = [n for n in self.names() if counterfactual_index(n) is not None]
        return sorted(found, key=counterfactual_order)

    def read(self, name: str) -> bytes:
        """The bytes of one run file, checked against the SHA-256 the record lists for it.

        Raises:
            ArtifactChangedError: the bytes differ from the record's SHA-256, or the record lists hashes but not
                this file (it was added after the run).
            RunFolderError: the record cannot be read, or the file is missing.
        """
        if name == RECORD:
            return self.record_bytes()
        hashes = self.record().artifacts_sha256
        checked = isinstance(hashes, dict) and bool(hashes)
        if checked and name not in hashes:
            raise ArtifactChangedError(
                f"{name} in run folder {self.path.name} is not one of the files the run wrote (record.json lists "
                "no SHA-256 for it); it was added after the run, so it is not used. Run the review again.")
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:
            raise RunFolderError(f"run folder {self.path.name} has no {name}; the run did not finish or the file was "
                                 "removed. Run it again.") from None
        if checked and sha256_bytes(data) != hashes[name]:
            raise ArtifactChangedError(
                f"{name} in run folder {self.path.name} does not match the SHA-256 in record.json; the folder was "
                "changed after the run, so it is not shown, exported or stored. Run the review again.")
        return data

    def read_png_unit(self, name: str) -> NDArray[np.float32]:
        """A checked PNG (:meth:`read`) as float32 (H, W) in [0, 1] (:func:`decode_png_unit`).

        Raises:
            ArtifactChangedError, RunFolderError: as for :meth:`read`; RunFolderError also for an unreadable PNG.
        """
        try:
            return decode_png_unit(self.read(name))
        except RunFolderError:
            raise
        except ValueError as exc:
            raise RunFolderError(f"{name} in run folder {self.path.name} is {exc}; the folder is damaged.") from exc

    def read_npy(self, name: str) -> NDArray[np.float32]:
        """A checked ``.npy`` map (:meth:`read`) as float32, without pickles.

        Raises:
            ArtifactChangedError, RunFolderError: as for :meth:`read`; RunFolderError also for an unreadable array.
        """
        try:
            arr = np.load(io.BytesIO(self.read(name)), allow_pickle=False)
        except (OSError, EOFError) as exc:
            raise RunFolderError(f"{name} in run folder {self.path.name} is not a readable .npy array ({exc}); "
                                 "the folder is damaged.") from exc
        except RunFolderError:
            raise
        except ValueError as exc:
            raise RunFolderError(f"{name} in run folder {self.path.name} is not a readable .npy array ({exc}); "
                                 "the folder is damaged.") from exc
        out: NDArray[np.float32] = np.asarray(arr).astype(np.float32, copy=False)
        return out
