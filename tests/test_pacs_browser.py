"""A real browser on the PACS page against a real Orthanc: sign in, search by date range, list the series with its
thumbnail, open the instance into a run (the review screen), wait for the result, store it back choosing the
identity, and see what was stored. No console errors allowed (the CSP is strict). Skipped without Chromium/Playwright
(``tests/test_browser.py``'s rules) or Orthanc (``tests/test_pacs.py``'s)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests import orthanc as orthanc_mod
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, _free_port, _require_browser, serving
from tests.test_pacs import SECRET_ENV, dicom_dir, orthanc  # noqa: F401  (module-scoped fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.shared_data]
USERNAME = "pacs-browser-clinician"


@pytest.fixture(scope="module")
def server(orthanc, tiny_engine, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    _require_browser()
    from app.config import PacsServer, Settings
    from app.web import create_app
    from tests.accounts import PASSWORD, add_user

    os.environ[SECRET_ENV] = orthanc_mod.PASSWORD
    pacs = PacsServer(name="orthanc", url=orthanc.dicomweb_url, auth="basic", username=orthanc_mod.USERNAME,
                      secret_env=SECRET_ENV)
    port = _free_port()
    data = tmp_path_factory.mktemp("pacs-browser")
    app = create_app(Settings(data_dir=data, port=port, lung_segmenter=data / "none", lesion_classifier=data / "none",
                              pacs_servers=[pacs], pacs_original_study_roles="admin,clinician"),  # opened to
                     engine=tiny_engine)  # clinicians, so the clinician below may store into the original study
    with serving(app, port) as base:
        add_user(app.state.db, USERNAME, password=PASSWORD)
        yield base


def test_find_open_and_store_in_a_real_browser(server, orthanc):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from tests.accounts import PASSWORD

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/login")
        page.fill("#username", USERNAME)
        page.fill("#password", PASSWORD)
        page.click("#login")
        page.wait_for_selector("#review-form")
        # 1. find: the top bar's link, a date-range search, the study's series with a thumbnail
        page.click("#pacs-link")
        page.fill("input[name=date_from]", "1900-01-01")
        page.fill("input[name=date_to]", "1901-12-31")
        page.click("#pacs-search-button")
        page.wait_for_selector("#pacs-study-table tbody tr .pacs-series-button")
        assert page.locator("#pacs-study-table tbody tr .pacs-series-button").count() == 1
        page.click(".pacs-series-button")
        page.wait_for_selector(".pacs-instances img")
        page.wait_for_function("() => document.querySelector('.pacs-instances img').naturalWidth > 0")
        # 2. open: the review screen of the new run, until it is done
        page.click(".pacs-open-button")
        page.wait_for_url("**/runs/*")
        run_id = page.url.rstrip("/").rsplit("/", 1)[1]
        deadline = time.monotonic() + 120
        while page.request.get(f"{server}/api/v1/jobs/{run_id}").json()["state"] != "done":
            assert time.monotonic() < deadline, "the run did not finish"
            page.wait_for_timeout(200)
        # 3. store back: the identity must be chosen; the answer says what was stored
        before = orthanc.instance_count()
        page.goto(server + "/pacs")
        form = page.locator(f"form[action='/pacs/runs/{run_id}/store']")
        form.locator("input[value='original-study']").check()
        form.locator("button").click()
        page.wait_for_selector(f"#store-{run_id} [data-stored='3']")
        assert orthanc.instance_count() == before + 3
        os.makedirs("test-output", exist_ok=True)
        page.screenshot(path="test-output/pacs-store.png", full_page=True)
        assert errors == [], errors
        browser.close()
