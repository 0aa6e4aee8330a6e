"""A DICOMweb client for one configured PACS (:class:`app.config.PacsServer`): QIDO-RS search, WADO-RS retrieve,
STOW-RS store, over ``dicomweb-client`` with a ``requests`` session that carries the server's auth, TLS checks and
timeouts.

Every call is blocking I/O: web routes call it through ``run_in_threadpool`` so the event loop never waits on the
PACS. Failures become :class:`PacsError` subclasses whose message is for people (server name, what failed, what to
do); nothing here logs a credential, a patient attribute or a UID (only the server name, status and timings).
dicomweb-client's own retries are off: a failure is reported at once and the user retries.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import requests

from app.config import PacsServer

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "CHEST_MODALITIES",
    "InstanceMatch",
    "PacsClient",
    "PacsError",
    "PacsNotFoundError",
    "PacsRefusedError",
    "PacsStoreError",
    "PacsTimeoutError",
    "PacsUnavailableError",
    "PacsUnsuitableError",
    "SeriesMatch",
    "StoreResult",
    "StudyMatch",
]

logger = logging.getLogger(__name__)

CHEST_MODALITIES = ("CR", "DX")
"""(0008,0061) Modalities in Study searched for, and the (0008,0060) Modality an opened instance must have."""
SEARCH_LIMIT = 50
T = TypeVar("T")


class PacsError(Exception):
    """A PACS operation failed; ``str(e)`` is a message for the page. ``retry`` says whether trying again may help."""

    retry = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PacsUnavailableError(PacsError):
    """The server could not be reached (refused, DNS, TLS) or dropped the connection mid-transfer."""


class PacsTimeoutError(PacsError):
    """The server did not answer within the configured timeout."""


class PacsRefusedError(PacsError):
    """The server answered 4xx/5xx."""


class PacsNotFoundError(PacsRefusedError):
    """The study, series or instance is not (or no longer) on the server."""

    retry = False


class PacsUnsuitableError(PacsError):
    """The instance is not something VALD-MD opens (not CR/DX, multi-frame, too large); checked before download."""

    retry = False


class PacsStoreError(PacsError):
    """STOW-RS stored none or only some of the objects (``result`` lists which)."""

    def __init__(self, message: str, result: StoreResult, *, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.result = result


@dataclass(frozen=True)
class StudyMatch:
    """One QIDO-RS study match. Patient attributes are shown to the searching user only, never logged or audited."""

    study_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: tuple[str, ...]
    n_series: int | None
    n_instances: int | None


@dataclass(frozen=True)
class SeriesMatch:
    """One series of a study."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: str
    series_description: str
    n_instances: int | None


@dataclass(frozen=True)
class InstanceMatch:
    """One instance of a series (``rows``/``columns``/``frames`` when the server returns them)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    instance_number: str
    rows: int | None
    columns: int | None
    frames: int | None


@dataclass(frozen=True)
class StoreResult:
    """What a STOW-RS request did: SOP Instance UIDs stored and failed (with the server's (0008,1197) reason)."""

    stored: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]

    @property
    def complete(self) -> bool:
        return not self.failed


def _first(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue):
        return str(value[0]) if len(value) else ""
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _date(value: date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


class PacsClient:
    """DICOMweb operations on one server.

    Args:
        server: the server's settings (URL, auth, TLS, timeout, size limit).
        session: a ``requests.Session`` to use instead of a new one (tests).
    """

    def __init__(self, server: PacsServer, session: requests.Session | None = None) -> None:
        self.server = server
        session = session or requests.Session()
        session.verify = str(server.ca_bundle) if server.ca_bundle else server.verify_tls
        secret = server.secret.get_secret_value() if server.secret is not None else None
        if server.auth == "basic" and secret is not None:
            session.auth = (server.username or "", secret)
        elif server.auth == "bearer" and secret is not None:
            session.headers["Authorization"] = f"Bearer {secret}"
        self._session = session
        self._timeout = (min(server.timeout_s, 10.0), server.timeout_s)
        # pydicom and dicomweb-client (~0.3 s to import) load with the first client, not with the server
        from dicomweb_client.api import DICOMwebClient

        self._client = DICOMwebClient(url=server.url.rstrip("/"), session=session, timeout=self._timeout)
        self._client.set_http_retry_params(retry=False)

    @property
    def name(self) -> str:
        return self.server.name

    # -- error mapping ---------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request; map requests/HTTP failures to :class:`PacsError` with a readable message."""
        t0 = time.monotonic()
        name = self.server.name
        try:
            result = fn()
        except requests.exceptions.SSLError:
            raise PacsUnavailableError(f"PACS '{name}': the TLS certificate check failed while {what}; ask an "
                                       "administrator to check the server's certificate (or its ca_bundle).") from None
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout):
            raise PacsTimeoutError(f"PACS '{name}' did not answer within {self.server.timeout_s:g} s while {what}. "
                                   "It may be busy or down; try again in a moment.") from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            raise PacsUnavailableError(f"PACS '{name}' dropped the connection while {what}; nothing was opened or "
                                       "stored. Try again.") from None
        except requests.exceptions.ConnectionError:
            raise PacsUnavailableError(f"PACS '{name}' cannot be reached ({self._host()}) while {what}. Check that "
                                       "it is running; try again later.") from None
        except requests.exceptions.HTTPError as e:
            raise self._http_error(what, e.response) from None
        logger.info("pacs %s: %s in %.2f s", name, what, time.monotonic() - t0)
        return result

    def _host(self) -> str:
        parts = urlsplit(self.server.url)  # host and port only: never a user-info part
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    def _http_error(self, what: str, response: requests.Response | None) -> PacsError:
        status = response.status_code if response is not None else None
        name = self.server.name
        logger.warning("pacs %s: %s failed with HTTP %s", name, what, status)
        if status in (401, 403):
            return PacsRefusedError(f"PACS '{name}' refused VALD-MD's credentials (HTTP {status}) while {what}; an "
                                    "administrator must check the server's auth settings.", status=status)
        if status == 404:
            return PacsNotFoundError(f"PACS '{name}' has no such object (HTTP 404) while {what}; it may have been "
                                     "moved or deleted. Search again.", status=status)
        if status == 413:
            return PacsRefusedError(f"PACS '{name}' refused the request as too large (HTTP 413) while {what}.",
                                    status=status)
        if status is not None and status >= 500:
            return PacsRefusedError(f"PACS '{name}' failed with a server error (HTTP {status}) while {what}; try "
                                    "again later.", status=status)
        return PacsRefusedError(f"PACS '{name}' refused the request (HTTP {status}) while {what}.", status=status)

    # -- QIDO-RS ---------------------------------------------------------------------------------------------

    def check(self) -> float:
        """Connection test: one QIDO-RS ``/studies?limit=1``. Returns the round-trip time, seconds.

        Raises:
            PacsError: unreachable, timed out, refused.
        """
        t0 = time.monotonic()
        self._call("testing the connection", lambda: self._client.search_for_studies(limit=1))
        return time.monotonic() - t0

    def search_studies(self, *, accession_number: str = "", patient_id: str = "", date_from: date | None = None,
                       date_to: date | None = None, modalities: Sequence[str] = CHEST_MODALITIES,
                       limit: int = SEARCH_LIMIT) -> list[StudyMatch]:
        """QIDO-RS ``/studies`` by (0008,0050) Accession Number, (0010,0020) Patient ID and a (0008,0020) Study
        Date range, restricted to studies whose (0008,0061) Modalities in Study include one of ``modalities``.

        Raises:
            ValueError: no criterion given, or ``date_from`` after ``date_to``.
            PacsError: the request failed.
        """
        if not (accession_number or patient_id or date_from or date_to):
            raise ValueError("Give an accession number, a patient ID or a date range to search the PACS.")
        if date_from and date_to and date_from > date_to:
            raise ValueError(f"The date range is reversed: {date_from} is after {date_to}.")
        filters: dict[str, Any] = {}
        if accession_number:
            filters["AccessionNumber"] = accession_number
        if patient_id:
            filters["PatientID"] = patient_id
        if date_from or date_to:
            filters["StudyDate"] = f"{_date(date_from)}-{_date(date_to)}"
        fields = ["PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyDescription",
                  "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
        from pydicom.dataset import Dataset

        found: dict[str, StudyMatch] = {}
        for modality in modalities:  # one query per modality: servers differ on multi-valued matching
            params = {**filters, "ModalitiesInStudy": modality, "limit": str(limit)}
            rows = self._call("searching studies", functools.partial(self._qido, "studies", params, fields))
            for row in rows:
                ds = Dataset.from_json(row)
                uid = _first(ds, "StudyInstanceUID")
                mods = ds.get("ModalitiesInStudy") or []
                found[uid] = StudyMatch(
                    study_uid=uid, patient_id=_first(ds, "PatientID"), patient_name=_first(ds, "PatientName"),
                    accession_number=_first(ds, "AccessionNumber"), study_date=_first(ds, "StudyDate"),
                    study_description=_first(ds, "StudyDescription"),
                    modalities=tuple(str(m) for m in (mods if isinstance(mods, Iterable) and not isinstance(
                        mods, str) else [mods])),
                    n_series=_int(ds, "NumberOfStudyRelatedSeries"),
                    n_instances=_int(ds, "NumberOfStudyRelatedInstances"))
        return sorted(found.values(), key=lambda s: (s.study_date, s.study_uid), reverse=True)[:limit]

    def _qido(self, path: str, params: dict[str, str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """A QIDO-RS GET with the query written by hand: dicomweb-client percent-encodes ``*`` and writes spaces as
        ``+``, which some servers (Orthanc 1.10) match literally. Spaces become the ``?`` wildcard (one character)."""
        parts = [f"{k}={quote(str(v).replace(' ', '?'), safe='*?-.^,')}" for k, v in params.items()]
        parts += [f"includefield={f}" for f in fields]
        url = f"{self.server.url.rstrip('/')}/{path}?{'&'.join(parts)}"
        r = self._session.get(url, headers={"Accept": "application/dicom+json"}, timeout=self._timeout)
        r.raise_for_status()
        return [] if r.status_code == 204 or not r.content else list(r.json())

    def list_series(self, study_uid: str) -> list[SeriesMatch]:
        """QIDO-RS ``/studies/{study}/series``, sorted by (0020,0011) Series Number."""
        rows = self._call("listing series", lambda: self._client.search_for_series(
            study_instance_uid=study_uid,
            fields=["Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances"]))
        from pydicom.dataset import Dataset

        out = []
        for row in rows:
            ds = Dataset.from_json(row)
            out.append(SeriesMatch(study_uid=study_uid, series_uid=_first(ds, "SeriesInstanceUID"),
                                   modality=_first(ds, "Modality"), series_number=_first(ds, "SeriesNumber"),
                                   series_description=_first(ds, "SeriesDescription"),
                                   n_instances=_int(ds, "NumberOfSeriesRelatedInstances")))
        return sorted(out, key=lambda s: (_int_or(s.series_number), s.series_uid))

    def list_instances(self, study_uid: str, series_uid: str) -> list[InstanceMatch]:
        """QIDO-RS ``/studies/{study}/series/{series}/instances``, sorted by (0020,0013) Instance Number."""
        rows = self._call("listing instances", lambda: self._client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            fields=["InstanceNumber", "Rows", "Columns", "NumberOfFrames", "SOPClassUID"]))
        from pydicom.dataset import Dataset

        out = []
        for row in rows:
            ds = Dataset.from_json(row)
            out.append(InstanceMatch(study_uid=study_uid, series_uid=series_uid, sop_uid=_first(ds, "SOPInstanceUID"),
                                     sop_class_uid=_first(ds, "SOPClassUID"),
                                     instance_number=_first(ds, "InstanceNumber"), rows=_int(ds, "Rows"),
                                     columns=_int(ds, "Columns"), frames=_int(ds, "NumberOfFrames")))
        return sorted(out, key=lambda i: (_int_or(i.instance_number), i.sop_uid))

    # -- WADO-RS ---------------------------------------------------------------------------------------------

    def thumbnail(self, study_uid: str, series_uid: str, sop_uid: str, size: int = 128) -> bytes | None:
        """A server-rendered PNG of the instance (WADO-RS ``/rendered``, ``viewport``), or ``None`` when the server
        cannot render it (the page then shows no preview). Raises only for an unreachable or slow server."""
        url = (f"{self.server.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
               f"/rendered?viewport={size},{size}")  # a literal comma: Orthanc refuses %2C

        def get() -> bytes:
            # dicomweb-client's retrieve_instance_rendered sends an Accept that some servers answer with 400
            r = self._session.get(url, headers={"Accept": "image/png"},
                                  timeout=self._timeout)
            r.raise_for_status()
            return bytes(r.content)

        try:
            data = self._call("rendering a thumbnail", get)
        except PacsRefusedError:
            return None
        return data if data.startswith(b"\x89PNG") else None

    def metadata(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """WADO-RS instance metadata (no bulk data: Pixel Data is absent)."""
        rows = self._call("reading instance metadata", lambda: self._client.retrieve_instance_metadata(
            study_uid, series_uid, sop_uid))
        from pydicom.dataset import Dataset

        return Dataset.from_json(rows, bulk_data_uri_handler=lambda *_: b"")

    def check_openable(self, meta: Dataset) -> None:
        """Refuse, before any download, an instance that VALD-MD would not open: (0008,0060) Modality not CR/DX,
        (0028,0008) Number of Frames above 1, or an estimated size (Rows × Columns × Bits Allocated / 8 × Samples
        per Pixel × frames) above the server's ``max_instance_mb``.

        Raises:
            PacsUnsuitableError: with the reason.
        """
        modality = _first(meta, "Modality")
        if modality not in CHEST_MODALITIES:
            raise PacsUnsuitableError(f"This instance's modality is {modality or 'not given'}; VALD-MD opens chest "
                                      "radiographs (CR or DX) only.")
        frames = _int(meta, "NumberOfFrames") or 1
        if frames > 1:
            raise PacsUnsuitableError(f"This instance has {frames} frames; VALD-MD opens single-frame radiographs.")
        rows, cols = _int(meta, "Rows") or 0, _int(meta, "Columns") or 0
        size = rows * cols * max(1, (_int(meta, "BitsAllocated") or 16) // 8) * (_int(meta, "SamplesPerPixel") or 1)
        limit = self.server.max_instance_mb * 1024 * 1024
        if size > limit:
            raise PacsUnsuitableError(f"This instance is {rows} x {cols} pixels (~{size / 2**20:.0f} MiB decoded), "
                                      f"above this server's limit of {self.server.max_instance_mb} MiB.")

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """Check the instance (:meth:`check_openable`, from its metadata), then WADO-RS retrieve it in its stored
        transfer syntax and return DICOM Part 10 bytes.

        Raises:
            PacsUnsuitableError: not CR/DX, multi-frame, too large. PacsError: the requests failed.
        """
        self.check_openable(self.metadata(study_uid, series_uid, sop_uid))
        ds = self._call("retrieving the instance", lambda: self._client.retrieve_instance(
            study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)))
        import pydicom

        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        return buf.getvalue()

    # -- STOW-RS ---------------------------------------------------------------------------------------------

    def store(self, datasets: Sequence[Dataset], study_uid: str) -> StoreResult:
        """STOW-RS the datasets to ``/studies/{study_uid}`` in one request.

        Returns:
            The stored SOP Instance UIDs, when every object was stored.

        Raises:
            PacsStoreError: some or all objects failed ((0008,1198) Failed SOP Sequence, or HTTP 409/4xx/5xx);
                storing the same objects again (same UIDs) replaces what was stored, so a retry never duplicates.
            PacsError: unreachable, timed out.
        """
        from pydicom.dataset import Dataset

        wanted = [str(ds.SOPInstanceUID) for ds in datasets]

        def stow() -> Dataset:
            try:
                return self._client.store_instances(list(datasets), study_instance_uid=study_uid)
            except requests.exceptions.HTTPError as e:
                # 409 Conflict: some or all failed; the body still lists what was stored and what failed
                body = e.response.content if e.response is not None and e.response.status_code == 409 else b""
                try:
                    return Dataset.from_json(body.decode()) if body else _raise(e)
                except (ValueError, TypeError, UnicodeDecodeError):
                    raise e from None

        try:
            response = self._call("storing results", stow)
        except PacsRefusedError as e:
            result = StoreResult(stored=(), failed=tuple((uid, f"HTTP {e.status}") for uid in wanted))
            raise PacsStoreError(f"{e} None of the {len(wanted)} objects is known to be stored; store again.",
                                 result, status=e.status) from None
        stored = tuple(str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", []))
        failed = tuple((str(item.get("ReferencedSOPInstanceUID", "")), str(item.get("FailureReason", "")))
                       for item in response.get("FailedSOPSequence", []))
        missing = [uid for uid in wanted if uid not in stored and uid not in {f[0] for f in failed}]
        result = StoreResult(stored=stored, failed=failed + tuple((uid, "not acknowledged") for uid in missing))
        if result.failed:
            raise PacsStoreError(f"PACS '{self.server.name}' stored {len(stored)} of {len(wanted)} objects; "
                                 "store again to complete (the same objects are replaced, never duplicated).", result)
        return result


def _raise(e: Exception) -> Dataset:
    raise e


def _int_or(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 1 << 30
