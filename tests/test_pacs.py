"""app.pacs against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started by ``tests/orthanc.py``):
QIDO-RS search, WADO-RS retrieve and thumbnails, STOW-RS store-back of a run's derived objects and their round
trip, and the failure modes (wrong credentials, server down, a server that never answers, a partial STOW, an
unsuitable instance). Skipped with the reason when Orthanc is absent, unless ``VALD_MD_REQUIRE_ORTHANC=1`` (CI)."""

from __future__ import annotations

import io
import os
import socket
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from app import imaging
from app.config import PacsServer
from app.pacs.client import (
    PacsClient,
    PacsRefusedError,
    PacsStoreError,
    PacsTimeoutError,
    PacsUnavailableError,
    PacsUnsuitableError,
)
from app.pacs.derived import AI_SERIES_DESCRIPTION, StoreMode, build_derived
from app.runs import exports
from tests import orthanc as orthanc_mod
from tests.test_exports import make_run

pytestmark = pytest.mark.shared_data
SECRET_ENV = "VALD_MD_TEST_ORTHANC_PASSWORD"
CASES = ("siim_cr_chest.dcm", "RG1_JLSN.dcm")


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    folder = shared_data / "dicom"
    missing = [c for c in CASES if not (folder / c).is_file()]
    if missing:
        pytest.skip(f"shared data lacks {missing}")
    return folder


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, dicom_dir: Path) -> Iterator[orthanc_mod.Orthanc]:
    """A fresh Orthanc on a free loopback port, loaded with the shared chest DICOMs."""
    reason = orthanc_mod.missing_reason()
    if reason:
        if os.environ.get("VALD_MD_REQUIRE_ORTHANC") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    server = orthanc_mod.start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        for case in CASES:
            server.upload((dicom_dir / case).read_bytes())
        yield server
    finally:
        server.stop()


def _server(url: str, **kw: object) -> PacsServer:
    os.environ[SECRET_ENV] = orthanc_mod.PASSWORD
    fields: dict[str, object] = {"name": "test-orthanc", "url": url, "auth": "basic",
                                 "username": orthanc_mod.USERNAME, "secret_env": SECRET_ENV}
    return PacsServer(**{**fields, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(orthanc: orthanc_mod.Orthanc) -> PacsClient:
    return PacsClient(_server(orthanc.dicomweb_url))


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


# -- settings --------------------------------------------------------------------------------------------------


def test_credentials_come_from_the_environment_and_never_print(monkeypatch):
    monkeypatch.setenv("PACS_PW", "hunter2-secret")
    server = PacsServer(name="a", url="https://pacs.example.org/dicom-web", auth="basic", username="u",
                        secret_env="PACS_PW")
    assert server.secret is not None and server.secret.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(server) and "hunter2" not in str(server.model_dump())
    assert server.verify_tls


@pytest.mark.parametrize("fields, match", [
    ({"url": "http://pacs.example.org/dicom-web"}, "plain HTTP"),
    ({"url": "ftp://x/y"}, "not an http"),
    ({"url": "https://p/dw", "auth": "bearer"}, "secret_env"),
    ({"url": "https://p/dw", "auth": "bearer", "secret_env": "UNSET_PACS_TOKEN_XYZ"}, "unset"),
    ({"url": "https://p/dw", "name": "Bad Name"}, "name"),
    ({"url": "https://vald:s3cret@p/dw"}, "carries credentials"),
])
def test_unsafe_or_incomplete_server_settings_are_refused(fields, match):
    with pytest.raises(ValidationError, match=match):
        PacsServer(**{"name": "a", **fields})


# -- QIDO / WADO -----------------------------------------------------------------------------------------------


def test_search_by_accession_patient_and_date_range(client, dicom_dir):
    rg1 = _header(dicom_dir / "RG1_JLSN.dcm")
    by_accession = client.search_studies(accession_number=str(rg1.AccessionNumber))  # "exam Number": a space
    assert client.search_studies(accession_number="exam*") == by_accession
    assert [s.study_uid for s in by_accession] == [rg1.StudyInstanceUID]
    assert by_accession[0].modalities == ("CR",)
    assert [s.study_uid for s in client.search_studies(patient_id=str(rg1.PatientID))] == [rg1.StudyInstanceUID]
    both = client.search_studies(date_from=date(1900, 1, 1), date_to=date(2030, 1, 1))
    assert len(both) == 2
    assert client.search_studies(date_from=date(2030, 1, 1)) == []
    with pytest.raises(ValueError, match="accession number"):
        client.search_studies()
    with pytest.raises(ValueError, match="reversed"):
        client.search_studies(date_from=date(2020, 1, 2), date_to=date(2020, 1, 1))


def test_series_instances_and_thumbnail(client, dicom_dir):
    rg1 = _header(dicom_dir / "RG1_JLSN.dcm")
    series = client.list_series(str(rg1.StudyInstanceUID))
    assert [s.series_uid for s in series] == [rg1.SeriesInstanceUID] and series[0].modality == "CR"
    instances = client.list_instances(str(rg1.StudyInstanceUID), str(rg1.SeriesInstanceUID))
    assert [(i.sop_uid, i.rows, i.columns) for i in instances] == [(rg1.SOPInstanceUID, 1955, 1841)]
    png = client.thumbnail(str(rg1.StudyInstanceUID), str(rg1.SeriesInstanceUID), str(rg1.SOPInstanceUID), 96)
    assert png is not None and png.startswith(b"\x89PNG")


def test_retrieve_gives_the_instance_that_decodes_like_an_upload(client, dicom_dir):
    path = dicom_dir / "RG1_JLSN.dcm"
    rg1 = _header(path)
    data = client.retrieve(str(rg1.StudyInstanceUID), str(rg1.SeriesInstanceUID), str(rg1.SOPInstanceUID))
    got = pydicom.dcmread(io.BytesIO(data))
    assert got.SOPInstanceUID == rg1.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == rg1.file_meta.TransferSyntaxUID  # stored syntax kept (JPEG-LS)
    assert np.array_equal(imaging.decode_image(data).pixels, imaging.decode_image(path.read_bytes()).pixels)


@pytest.mark.parametrize("changes, match", [
    ({"Modality": "CT"}, "CR or DX"),
    ({"NumberOfFrames": 2}, "2 frames"),
    ({"Rows": 30000, "Columns": 30000}, "above this server's limit"),
])
def test_unsuitable_instances_are_refused_before_download(changes, match):
    meta = Dataset()
    meta.Modality, meta.Rows, meta.Columns, meta.BitsAllocated = "CR", 2000, 2000, 16
    for k, v in changes.items():
        setattr(meta, k, v)
    c = PacsClient(PacsServer(name="x", url="http://127.0.0.1:9/dicom-web"))
    with pytest.raises(PacsUnsuitableError, match=match):
        c.check_openable(meta)


# -- failures --------------------------------------------------------------------------------------------------


def test_wrong_password_is_a_readable_refusal(orthanc, monkeypatch):
    monkeypatch.setenv("WRONG_PW", "not-the-password")
    bad = PacsClient(PacsServer(name="t", url=orthanc.dicomweb_url, auth="basic", username="vald",
                                secret_env="WRONG_PW"))
    with pytest.raises(PacsRefusedError, match="refused VALD-MD's credentials") as e:
        bad.check()
    assert e.value.status == 401 and "not-the-password" not in str(e.value)


def test_a_server_that_is_down_is_unavailable():
    port = orthanc_mod.free_port()
    c = PacsClient(PacsServer(name="down", url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=2))
    with pytest.raises(PacsUnavailableError, match="cannot be reached"):
        c.search_studies(accession_number="A1")


def test_messages_name_the_host_and_port_only():
    port = orthanc_mod.free_port()
    c = PacsClient(PacsServer(name="down", url=f"http://127.0.0.1:{port}/dicom-web/x", timeout_s=2))
    assert c._host() == f"127.0.0.1:{port}"


def test_the_access_log_keeps_paths_not_query_strings():
    """uvicorn's access record for a PACS search would carry the patient ID; the server's filter cuts queries."""
    import logging
    import logging.config

    from app.web.accesslog import StripQueryString, uvicorn_log_config

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/pacs/search?server=o&patient_id=PID-123", "1.1", 200), None)
    assert StripQueryString().filter(record)
    line = record.getMessage()
    assert "PID-123" not in line and "/pacs/search?…" in line
    config = uvicorn_log_config()
    assert "strip_query" in config["handlers"]["access"]["filters"]
    logging.config.dictConfig(config)  # a valid configuration uvicorn can take
    assert any(isinstance(f, StripQueryString) for h in logging.getLogger("uvicorn.access").handlers
               for f in h.filters)


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    try:
        c = PacsClient(PacsServer(name="slow", url=f"http://127.0.0.1:{listener.getsockname()[1]}/dw", timeout_s=1))
        with pytest.raises(PacsTimeoutError, match="did not answer within 1 s"):
            c.check()
    finally:
        for s in accepted:
            s.close()
        listener.close()


# -- STOW round trip -------------------------------------------------------------------------------------------


def _stored_objects(client: PacsClient, study_uid: str, exclude_series: str) -> list[Dataset]:
    out = []
    for series in client.list_series(study_uid):
        if series.series_uid == exclude_series:
            continue
        for inst in client.list_instances(study_uid, series.series_uid):
            data = client._call("test", lambda i=inst: client._client.retrieve_instance(
                study_uid, i.series_uid, i.sop_uid))
            out.append(data)
    return out


def test_round_trip_store_in_the_original_study(client, orthanc, dicom_dir, tmp_path):
    path = dicom_dir / "RG1_JLSN.dcm"
    rg1 = _header(path)
    run = make_run(tmp_path / "run", path.read_bytes())
    # the source header comes from the PACS (identified), as the web route fetches it
    meta = client.metadata(str(rg1.StudyInstanceUID), str(rg1.SeriesInstanceUID), str(rg1.SOPInstanceUID))
    objects = build_derived(run, meta, StoreMode.ORIGINAL_STUDY, "run-1")
    before = orthanc.instance_count()
    result = client.store(objects, str(rg1.StudyInstanceUID))
    assert result.complete and len(result.stored) == 3
    assert orthanc.instance_count() == before + 3
    client.store(objects, str(rg1.StudyInstanceUID))  # a retry replaces, never duplicates
    assert orthanc.instance_count() == before + 3

    stored = _stored_objects(client, str(rg1.StudyInstanceUID), str(rg1.SeriesInstanceUID))
    assert sorted(str(d.Modality) for d in stored) == ["OT", "OT", "SEG"]
    for ds in stored:
        assert ds.StudyInstanceUID == rg1.StudyInstanceUID and ds.PatientID == rg1.PatientID
        assert ds.PatientName == rg1.PatientName
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
        assert "not for diagnostic use" in ds.SeriesDescription
        assert exports.DISCLAIMER in ds.ImageComments
    seg = next(d for d in stored if d.Modality == "SEG")
    assert (seg.Rows, seg.Columns) == (rg1.Rows, rg1.Columns)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    scs = [d for d in stored if d.Modality == "OT"]
    assert {d.SeriesDescription for d in scs} == {AI_SERIES_DESCRIPTION}
    for sc in scs:  # the banner is burned in: its first row is the banner colour
        assert tuple(sc.pixel_array[0, 0]) == (255, 196, 0)
    # what comes back displays as the app made it: the same pixels, instance by instance, as the objects sent
    sent = {str(o.SOPInstanceUID): o for o in objects}
    for ds in stored:
        np.testing.assert_array_equal(ds.pixel_array, sent[str(ds.SOPInstanceUID)].pixel_array)


def test_round_trip_store_deidentified_makes_a_study_of_its_own(client, orthanc, dicom_dir, tmp_path):
    path = dicom_dir / "siim_cr_chest.dcm"
    src = _header(path)
    run = make_run(tmp_path / "run", path.read_bytes())
    objects = build_derived(run, src, StoreMode.DEIDENTIFIED, "run-2")
    study_uid = str(objects[0].StudyInstanceUID)
    assert study_uid != src.StudyInstanceUID and len(objects) == 2
    assert client.store(objects, study_uid).complete
    stored = _stored_objects(client, study_uid, "")
    assert len(stored) == 2
    for ds in stored:
        assert str(ds.PatientName) == exports.ANONYMOUS and "SourceImageSequence" not in ds
        assert ds.PatientIdentityRemoved == "YES" and exports.DISCLAIMER in ds.ImageComments


def test_partial_store_failure_says_which_objects_failed(client, dicom_dir, tmp_path):
    path = dicom_dir / "siim_cr_chest.dcm"
    src = _header(path)
    run = make_run(tmp_path / "run", path.read_bytes())
    objects = build_derived(run, src, StoreMode.DEIDENTIFIED, "run-3")
    objects[1].StudyInstanceUID = "1.2.3.4.5.6.7"  # not the study the STOW names: the server refuses this one
    with pytest.raises(PacsStoreError, match="stored 1 of 2") as e:
        client.store(objects, str(objects[0].StudyInstanceUID))
    assert e.value.result.stored == (str(objects[0].SOPInstanceUID),)
    assert [uid for uid, _ in e.value.result.failed] == [str(objects[1].SOPInstanceUID)]
