"""The PACS pages against a real Orthanc (``tests/orthanc.py``): search → series → open into a run (the upload path)
→ store back, the audit events, the failure answers and the admin connection test. Skipped without Orthanc."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient

from app import audit
from app.config import PacsServer, Settings
from app.pacs.client import PacsClient
from app.web import create_app
from tests import orthanc as orthanc_mod
from tests.accounts import add_user, sign_in
from tests.test_pacs import SECRET_ENV, dicom_dir, orthanc  # noqa: F401  (module-scoped fixtures)

pytestmark = pytest.mark.shared_data
SERVER = "test-orthanc"


@pytest.fixture(scope="module")
def web(orthanc, tiny_engine, tmp_path_factory):  # noqa: F811
    os.environ[SECRET_ENV] = orthanc_mod.PASSWORD
    servers = [PacsServer(name=SERVER, url=orthanc.dicomweb_url, auth="basic", username=orthanc_mod.USERNAME,
                          secret_env=SECRET_ENV, timeout_s=10),
               PacsServer(name="down", url=f"http://127.0.0.1:{orthanc_mod.free_port()}/dicom-web", timeout_s=2)]
    data = tmp_path_factory.mktemp("pacs-web")
    settings = Settings(data_dir=data, queue_size=4, lung_segmenter=data / "none", lesion_classifier=data / "none",
                        pacs_servers=servers)
    app = create_app(settings, engine=tiny_engine)
    with TestClient(app) as client:
        sign_in(client, app, add_user(app.state.db, "clinician-p"))
        yield app, client


def _events(app, action: str) -> list[Any]:
    """Oldest first."""
    return list(reversed(audit.query_events(app.state.db, action=action)))


def _wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        st = client.get(f"/api/v1/jobs/{job_id}").json()
        if st["state"] in ("done", "failed", "cancelled") or time.monotonic() > end:
            return st
        time.sleep(0.1)


def test_pacs_page_lists_the_servers(web):
    _app, client = web
    r = client.get("/pacs")
    assert r.status_code == 200 and SERVER in r.text and "pacs-search" in r.text
    assert 'id="pacs-link"' in client.get("/").text
    assert orthanc_mod.PASSWORD not in r.text


def test_find_open_store_round_trip(web, orthanc, dicom_dir):  # noqa: F811
    app, client = web
    src = pydicom.dcmread(dicom_dir / "siim_cr_chest.dcm", stop_before_pixels=True)
    study, series, sop = str(src.StudyInstanceUID), str(src.SeriesInstanceUID), str(src.SOPInstanceUID)
    # 1. search (HTMX fragment) and list series with thumbnails
    r = client.get("/pacs/search", params={"server": SERVER, "date_from": "1900-01-01", "date_to": "1901-12-31"},
                   headers={"HX-Request": "true"})
    assert r.status_code == 200 and study in r.text, r.text
    r = client.get("/pacs/series", params={"server": SERVER, "study": study})
    assert r.status_code == 200 and sop in r.text and "Open for review" in r.text
    thumb = client.get("/pacs/thumbnail", params={"server": SERVER, "study": study, "series": series, "sop": sop})
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
    # 2. open: the upload path queues a run on the retrieved instance, the study context kept with it
    r = client.post("/pacs/open", data={"server": SERVER, "study": study, "series": series, "sop": sop},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    status = _wait(client, job_id)
    assert status["state"] == "done", status
    assert status["input"]["source_format"] == "dicom"
    run_dir = app.state.jobs.get(job_id, None, any_owner=True).run_dir
    assert json.loads((run_dir / "pacs-source.json").read_text())["sop_uid"] == sop
    assert "16d7f894" not in (run_dir / "upload.dcm").read_bytes().decode("latin-1")  # de-identified as uploads are
    assert 'id="pacs-store-link"' in client.get(f"/runs/{job_id}").text  # the result page points to the store
    # 3. store back: the mode must be chosen
    assert client.post(f"/pacs/runs/{job_id}/store", data={}).status_code == 422
    before = orthanc.instance_count()
    # the identified kind is the allowed roles' only (admins by default): a clinician is offered and may store
    # only the de-identified kind until an administrator opens it to clinicians
    page = client.get("/pacs").text
    assert 'value="deidentified"' in page and 'value="original-study"' not in page
    r = client.post(f"/pacs/runs/{job_id}/store", data={"mode": "original-study"})
    assert r.status_code == 403 and "VALD_MD_PACS_ORIGINAL_STUDY_ROLES" in r.text
    assert orthanc.instance_count() == before
    app.state.settings.pacs_original_study_roles = "admin,clinician"
    assert 'value="original-study"' in client.get("/pacs").text
    r = client.post(f"/pacs/runs/{job_id}/store", data={"mode": "original-study"})
    assert r.status_code == 200 and 'data-stored="3"' in r.text, r.text
    assert orthanc.instance_count() == before + 3
    r = client.post(f"/pacs/runs/{job_id}/store", data={"mode": "original-study"})  # again: replaced
    assert orthanc.instance_count() == before + 3
    r = client.post(f"/pacs/runs/{job_id}/store", data={"mode": "deidentified"})
    assert 'data-stored="2"' in r.text and orthanc.instance_count() == before + 5
    # 4. audit: query, retrieve, store; the study UID only as an HMAC
    for action in ("pacs_query", "pacs_retrieve", "pacs_store"):
        events = _events(app, action)
        assert events, action
        for e in events:
            text = json.dumps(e.detail)
            assert study not in text and e.detail["server"] == SERVER
    store = _events(app, "pacs_store")[-1]
    assert store.detail["study"] == audit.hmac_uid(app.state.uid_secret, study) and store.outcome == "success"
    assert re.search(r"/pacs/runs/" + job_id, client.get("/pacs").text)


def test_thumbnail_is_decoded_locally_when_the_server_cannot_render(web, dicom_dir, monkeypatch):  # noqa: F811
    app, client = web
    src = pydicom.dcmread(dicom_dir / "RG1_JLSN.dcm", stop_before_pixels=True)
    monkeypatch.setattr(PacsClient, "thumbnail", lambda *a, **k: None)
    r = client.get("/pacs/thumbnail", params={"server": SERVER, "study": str(src.StudyInstanceUID),
                                              "series": str(src.SeriesInstanceUID), "sop": str(src.SOPInstanceUID)})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    import io

    from PIL import Image
    assert max(Image.open(io.BytesIO(r.content)).size) == 128
    # the whole instance came over the wire to make it: that is a retrieval, audited as one
    retrieved = [e for e in _events(app, "pacs_retrieve") if e.detail.get("purpose") == "thumbnail"]
    assert len(retrieved) == 1 and retrieved[0].outcome == "success"
    assert retrieved[0].detail["study"] == audit.hmac_uid(app.state.uid_secret, str(src.StudyInstanceUID))


def test_a_changed_run_folder_is_refused_before_anything_is_stored(web, orthanc, dicom_dir):  # noqa: F811
    """The PACS store reads the run's files through the hash-checked reader: a counterfactual.png replaced after
    the run is a 409 (error fragment), audited as a failed store, and nothing reaches the PACS."""
    app, client = web
    src = pydicom.dcmread(dicom_dir / "siim_cr_chest.dcm", stop_before_pixels=True)
    r = client.post("/pacs/open", data={"server": SERVER, "study": str(src.StudyInstanceUID),
                                        "series": str(src.SeriesInstanceUID), "sop": str(src.SOPInstanceUID)},
                    follow_redirects=False)
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert _wait(client, job_id)["state"] == "done"
    run_dir = app.state.jobs.get(job_id, None, any_owner=True).run_dir
    (run_dir / "counterfactual.png").write_bytes((run_dir / "input.png").read_bytes())
    before = orthanc.instance_count()
    r = client.post(f"/pacs/runs/{job_id}/store", data={"mode": "deidentified"}, headers={"HX-Request": "true"})
    assert r.status_code == 409 and "changed after the run" in r.text, r.text
    assert orthanc.instance_count() == before
    assert _events(app, "pacs_store")[-1].outcome != "success"


def test_unsuitable_instance_is_refused_and_nothing_is_stored(web, orthanc, dicom_dir):  # noqa: F811
    app, client = web
    orthanc.upload((dicom_dir / "CT_small.dcm").read_bytes())
    ct = pydicom.dcmread(dicom_dir / "CT_small.dcm", stop_before_pixels=True)
    n_jobs = len(app.state.jobs.list_jobs(None))
    r = client.post("/pacs/open", data={"server": SERVER, "study": str(ct.StudyInstanceUID),
                                        "series": str(ct.SeriesInstanceUID), "sop": str(ct.SOPInstanceUID)},
                    headers={"HX-Request": "true"})
    assert r.status_code == 422 and "CR or DX" in r.text
    assert len(app.state.jobs.list_jobs(None)) == n_jobs
    assert _events(app, "pacs_retrieve")[-1].outcome != "success"


def test_pacs_down_is_a_clear_message(web):
    _app, client = web
    r = client.get("/pacs/search", params={"server": "down", "accession": "A1"}, headers={"HX-Request": "true"})
    assert r.status_code == 502 and "cannot be reached" in r.text and "Traceback" not in r.text
    r = client.get("/pacs/search", params={"server": "nope", "accession": "A1"})
    assert r.status_code == 422


def test_a_hanging_pacs_does_not_block_other_requests(orthanc, tiny_engine, tmp_path):  # noqa: F811
    """The PACS call waits in the thread pool: while it hangs, the server answers others at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    silent = PacsServer(name="silent", url=f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web", timeout_s=3)
    app = create_app(Settings(data_dir=tmp_path / "d", lung_segmenter=tmp_path / "none",
                              lesion_classifier=tmp_path / "none", pacs_servers=[silent]), engine=tiny_engine)
    try:
        with TestClient(app) as client:
            sign_in(client, app, add_user(app.state.db, "clinician-h"))
            answers: list[Any] = []
            t = threading.Thread(target=lambda: answers.append(client.get(
                "/pacs/search", params={"server": "silent", "accession": "A1"}, headers={"HX-Request": "true"})))
            t0 = time.monotonic()
            t.start()
            time.sleep(0.3)
            assert client.get("/healthz").status_code == 200
            assert client.get("/pacs").status_code == 200
            assert time.monotonic() - t0 < 2.0, "other requests waited for the PACS"
            t.join(10)
            assert answers[0].status_code == 504 and "did not answer within 3 s" in answers[0].text
    finally:
        for s in held:
            s.close()
        listener.close()


def test_admin_connection_test(web):
    app, client = web
    assert client.get("/admin/pacs").status_code == 403
    admin_client = TestClient(app)
    sign_in(admin_client, app, add_user(app.state.db, "admin-p", role="admin"))
    page = admin_client.get("/admin/pacs")
    assert page.status_code == 200 and SERVER in page.text and orthanc_mod.PASSWORD not in page.text
    ok = admin_client.post(f"/admin/pacs/{SERVER}/test")
    assert ok.status_code == 200 and 'data-ok="true"' in ok.text
    down = admin_client.post("/admin/pacs/down/test")
    assert 'data-ok="false"' in down.text and "cannot be reached" in down.text
    assert [e.outcome for e in _events(app, "pacs_test")][-2:] == ["success", "minor_failure"]
