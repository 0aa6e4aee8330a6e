"""The runs folder: one sub-folder per job holding its upload, its ``job.json`` and its thumbnail.

Everything a job produces lives on disk under ``<runs_dir>/<job_id>/``: the upload (under a name the server
chooses, never the client's), the artifacts ``run_review`` writes, and ``job.json`` (state, parameters, timings)
so that the history survives a restart. Every file is the owner's only (``app.filemodes``). The stored upload is
de-identified (``app.imaging.deid``) unless the site keeps identified uploads.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from app import filemodes
from app.imaging import gray_png
from app.jobs.job import Job, JobState, now
from app.runs import folder
from app.runs.folder import RunFolder, RunFolderError

__all__ = ["JOB_FILE", "MASK_UPLOAD", "THUMBNAIL", "UPLOAD_STEM", "JobStore"]

logger = logging.getLogger("vald_md.jobs")

JOB_FILE = "job.json"
UPLOAD_STEM = "upload"
MASK_UPLOAD = "mask-upload.png"
THUMBNAIL = "thumbnail.png"
_SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}


class JobStore:
    """Reads and writes the jobs' folders under ``runs_dir`` (created owner-only if missing).

    Args:
        runs_dir: folder that receives one sub-folder per job; existing ``job.json`` files are the history.
        thumbnail_size: longest side in pixels of history thumbnails.
        identified_uploads: keep uploads as received instead of de-identifying the stored copy.
    """

    def __init__(self, runs_dir: Path, *, thumbnail_size: int = 96, identified_uploads: bool = False) -> None:
        self.runs_dir = Path(runs_dir)
        self.thumbnail_size = thumbnail_size
        self.identified_uploads = identified_uploads
        filemodes.private_dir(self.runs_dir)

    def run_dir(self, job_id: str) -> Path:
        """The folder of job ``job_id`` (which need not exist yet)."""
        return self.runs_dir / job_id

    @staticmethod
    def upload_name(source_format: str) -> str:
        """The server's name for an upload of ``source_format`` (``upload.dcm`` / ``.png`` / ``.jpg``)."""
        return UPLOAD_STEM + _SUFFIX.get(source_format, ".bin")

    def stored_upload(self, data: bytes, source_format: str) -> bytes:
        """The bytes to keep of an upload: de-identified unless the site keeps identified uploads.

        Raises:
            imaging.CorruptImageError: the file cannot be re-written (see ``app.imaging.deid``).
        """
        if self.identified_uploads:
            return data
        from app.imaging.deid import deidentify  # pydicom and the de-identification tables: with the first upload

        return deidentify(data, source_format)

    def create(self, job: Job) -> None:
        """Make the job's folder, owner-only.

        Raises:
            FileExistsError: the folder exists (it is not touched).
        """
        job.run_dir.mkdir(mode=filemodes.DIR_MODE)
        filemodes.private_tree(job.run_dir)  # mkdir's mode is filtered by the umask

    def write_upload(self, job: Job, stored: bytes, mask_png: bytes | None) -> None:
        """Write the job's upload (``stored``: see :meth:`stored_upload`), its region mask and ``job.json``.

        Raises:
            OSError: the disk refused; the caller then calls :meth:`remove`.
        """
        filemodes.write_private(job.upload_path, stored)
        if mask_png:
            filemodes.write_private(job.run_dir / MASK_UPLOAD, mask_png)
        self.save(job)

    def save(self, job: Job) -> None:
        """Write ``job.json`` (atomically, owner-only)."""
        filemodes.write_private(job.run_dir / JOB_FILE, json.dumps(job.to_json(), indent=2).encode())

    def make_private(self, job: Job) -> None:
        """Make every file of the job's folder owner-only again."""
        # run_review writes through libraries (Pillow, numpy, pydicom) that create files by the umask
        filemodes.private_tree(job.run_dir)

    def remove(self, job: Job) -> None:
        """Delete the job's folder and everything in it (no error if it is gone)."""
        shutil.rmtree(job.run_dir, ignore_errors=True)

    def load(self, job_id: str) -> Job | None:
        """The job of ``<runs_dir>/<job_id>/job.json`` as written last (another front process may have written it:
        ``app.jobs.jobtable``); ``None`` when the id is not a folder name, the file is missing or unreadable."""
        if not job_id.isalnum():
            return None
        path = self.run_dir(job_id) / JOB_FILE
        try:
            job = Job.from_json(path.parent, json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return job if job.id == job_id else None

    def load_history(self, recorded_status: Callable[[Job], JobState | None], *,
                     alive: Callable[[Job], bool] | None = None) -> list[Job]:
        """Load every ``job.json`` under ``runs_dir``; unfinished ones become ``interrupted`` (and are saved so).

        Args:
            recorded_status: the audit's status of a job's run (``None``: no record). An unfinished job whose run
                the database finished (the process stopped between the two writes) takes that status instead:
                the database is the record.
            alive: ``True`` for an unfinished job that the shared job table still has queued or running (another
                front process serves it, or will), or whose row ended (the front that ended it writes its final
                ``job.json``): it keeps its state and is not saved here. ``None``: none is (one process).

        Returns:
            The jobs, in folder-name order; unreadable or misplaced ``job.json`` files are logged and skipped.
        """
        jobs: list[Job] = []
        for path in sorted(self.runs_dir.glob(f"*/{JOB_FILE}")):
            try:
                job = Job.from_json(path.parent, json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring unreadable %s: %s", path, e)
                continue
            if job.id != path.parent.name:
                logger.warning("ignoring %s: id does not match its folder", path)
                continue
            if not job.state.finished and not (alive is not None and alive(job)):
                recorded = recorded_status(job)
                if recorded in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                    job.state = recorded
                else:
                    job.state = JobState.INTERRUPTED
                    job.error = "The server stopped before this run finished. Please run it again."
                job.finished_at = job.finished_at or now()
                self.save(job)
            jobs.append(job)
        return jobs

    def thumbnail_png(self, job: Job) -> bytes | None:
        """A small PNG of the input for the history list, cached in the run folder; ``None`` before it exists."""
        thumb = job.run_dir / THUMBNAIL
        if thumb.is_file():
            return thumb.read_bytes()
        try:  # the record's checked input.png; none before the run has finished writing it
            pixels = RunFolder(job.run_dir).read_png_unit(folder.INPUT)
        except RunFolderError:
            return None
        png = gray_png(pixels, longest_side=self.thumbnail_size)
        filemodes.write_private(thumb, png)
        return png
