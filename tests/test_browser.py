"""A real browser against the real server: sign in through the login page, upload a DICOM, set a slider,
generate, watch progress, review the three images with the map's legend and scale, check at 1440x900 and
1920x1080 that the AI-generated badges sit in the captions and never over an image, toggle the overlay,
compare, export the annotated PNG, restore a run from the history, choose a new file (the result on screen turns
stale at once; an old error banner goes when a valid file is chosen), sign out. No console errors allowed (the CSP is strict, so an inline script or an eval would show up here).

Needs Playwright for Python (``pip install playwright``; its own browser download is not used) and Debian's
Chromium at /usr/bin/chromium. Skipped with a reason when either is missing, unless VALD_MD_REQUIRE_BROWSER=1
(CI), where it fails instead. Screenshots go to test-output/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("VALD_MD_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def _require_browser() -> None:
    reasons = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("Playwright for Python is not installed (pip install playwright)")
    if not (CHROMIUM.is_file() or shutil.which(str(CHROMIUM))):
        reasons.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if reasons:
        reason = "; ".join(reasons)
        if os.environ.get("VALD_MD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VALD_MD_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


USERNAME = "browser-clinician"


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory) -> Iterator[str]:
    """The real app under uvicorn on 127.0.0.1 (a thread of this process), with the tiny model and one account
    (created as ``vald-md users add`` would: argon2 password, audited)."""
    _require_browser()
    import uvicorn

    from app.config import Settings
    from app.web import create_app

    port = _free_port()
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("browser-data"), port=port), engine=tiny_engine)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    from tests.accounts import PASSWORD, add_user

    add_user(app.state.db, USERNAME, password=PASSWORD)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _overlaps(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


def test_review_flow_in_a_real_browser(server, browser, shared_data, tiny_engine, monkeypatch, tmp_path):
    dicom = shared_data / "dicom" / "siim_cr_chest.dcm"
    # a calibrated model (the server shares this process's engine): the map is read in x-fold of the normal range
    monkeypatch.setitem(tiny_engine.info.manifest, "map_scale", {
        "level": 0.05, "percentile": 99.0, "rms": 0.02, "n_images": 3, "map_method": "sdedit", "reference": "input",
        "preset": {"strength": 0.9, "steps": 40}, "created": "2026-12-06"})
    OUTPUT.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text} at {m.location}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    # 0. signed out, the review page sends the browser to the login page; sign in there
    from tests.accounts import PASSWORD

    page.goto(server + "/")
    page.wait_for_selector("form.login-form")
    assert "/login" in page.url
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_selector("#review-form")
    assert page.inner_text("#signed-in-user") == USERNAME

    # 1. the page, and the file's non-identifying facts
    page.set_input_files("#file", str(dicom))
    page.wait_for_selector(".facts")
    facts = page.inner_text("#file-facts")
    assert "DICOM · CR" in facts and "1024 × 1024 px" in facts

    # 2. move sliders: the effective step count follows int(steps * strength)
    page.locator("#strength").fill("1")
    page.locator("#steps").fill("40")
    assert page.inner_text("#effective-steps") == "40"
    page.locator("#strength").fill("0.9")
    assert page.inner_text("#effective-steps") == "36"

    # 3. generate: progress, then the three images
    page.click("#generate")
    # read the card in the page the moment it appears: on the tiny model the run may finish (and the card give way
    # to the results) before a second round trip from the test could read it
    card = page.wait_for_function("() => document.querySelector('.progress-card')?.innerText", timeout=15_000)
    assert "seed" in card.json_value()
    page.wait_for_selector("[data-viewer]", timeout=90_000)
    page.wait_for_function("""() => [...document.querySelectorAll('[data-viewer] img')]
        .filter(i => i.offsetParent !== null).every(i => i.complete && i.naturalWidth > 0)""", timeout=15_000)
    for panel in ("original", "counterfactual", "overlay"):
        assert page.locator(f"[data-panel={panel}]").is_visible()
    assert page.locator("#cancel-button").is_disabled()
    assert "AI-generated — not for diagnostic use" in page.inner_text("#run")
    assert page.url.endswith("/runs/" + page.get_attribute("#run", "data-job"))
    page.screenshot(path=str(OUTPUT / "review-1366x768.png"))

    # 3b. the legend and the map's scale are in the viewer; the threshold is in x-fold of the normal range
    assert page.locator("#overlay-legend").is_visible() and page.locator("#overlay-legend .legend-bar").is_visible()
    assert page.locator(".legend-bar").evaluate("i => i.complete && i.naturalWidth > 0")
    assert "x-fold of the normal range" in page.inner_text("#overlay-legend")
    assert "Above the normal range" in page.inner_text("#map-summary")
    before = page.get_attribute("[data-changed-area]", "data-changed-area")
    page.locator("#ov-threshold").fill("3")
    page.wait_for_function("b => document.querySelector('[data-changed-area]').dataset.changedArea !== b",
                           arg=before)
    assert "3× normal" in page.inner_text("#map-summary")
    page.locator("#ov-threshold").fill("0")

    # 3c. at common reading-room sizes the AI badge sits in each caption and overlaps no image
    for width, height in ((1440, 900), (1920, 1080)):
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(150)
        tags = page.locator("[data-viewer] [data-ai-tag]")
        assert tags.count() >= 2
        viewports = [vp.bounding_box() for vp in page.locator("[data-viewer] [data-viewport]").all() if vp.is_visible()]
        for tag in tags.all():
            if not tag.is_visible():
                continue
            box = tag.bounding_box()
            assert box and box["width"] > 0
            assert not any(_overlaps(box, vp) for vp in viewports if vp), f"AI badge over an image at {width}x{height}"
        page.screenshot(path=str(OUTPUT / f"review-{width}x{height}.png"))
    page.set_viewport_size({"width": 1366, "height": 768})

    # 4. overlay toggle (o), display mode re-rendered by the server, compare (c), zoom
    page.keyboard.press("o")
    assert page.locator("#overlay-img").evaluate("e => getComputedStyle(e).visibility") == "hidden"
    page.keyboard.press("o")
    assert page.locator("#overlay-img").evaluate("e => getComputedStyle(e).visibility") == "visible"
    page.check("input[name=mode][value=signed]")
    page.wait_for_function("() => document.querySelector('#overlay-img').src.includes('mode=signed')")
    page.wait_for_function("() => document.querySelector('#overlay-img').complete")
    assert "mode=signed" in page.get_attribute("a[data-export='annotated.png']", "href")
    page.keyboard.press("c")
    assert page.locator("[data-panel=compare]").is_visible()
    assert not page.locator("[data-panel=original]").is_visible()
    page.keyboard.press("+")
    assert "%" in page.inner_text("[data-zoom-level]")
    page.keyboard.press("f")
    page.keyboard.press("c")

    # 5. export the annotated PNG (a download)
    with page.expect_download() as download:
        page.click("a[data-export='annotated.png']")
    path = download.value.path()
    assert path is not None and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 6. history: one click restores the run's seed into the form
    seed = page.get_attribute("[data-reuse-seed]", "data-reuse-seed")
    page.click(".history-item a")
    page.wait_for_function("s => document.querySelector('#seed').value === s", arg=seed)
    assert page.is_checked("input[name=seed_mode][value=fixed]")

    assert not page.locator("[data-stale-banner]").count()

    # 6b. a new file: the result on screen turns stale at once (before any server answer), greyed out and labelled
    page.set_input_files("#file", str(sorted((shared_data / "cxr256" / "val" / "normal").glob("*.png"))[0]))
    assert page.get_attribute("#run", "data-stale") == "true"
    assert page.locator("[data-stale-banner]").is_visible()
    assert "Stale" in page.inner_text("[data-stale-banner]")
    assert float(page.locator("#viewer").evaluate("e => getComputedStyle(e).opacity")) < 0.5
    page.screenshot(path=str(OUTPUT / "review-stale.png"))
    # an unsupported file leaves an error banner; choosing a valid file removes it
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#file-facts .alert")
    assert "415" in page.inner_text("#file-facts .alert")
    page.set_input_files("#file", str(dicom))
    assert page.locator("#file-facts .alert").count() == 0
    page.wait_for_selector(".facts")

    # 7. sign out: the session ends, the review page is closed to this browser
    page.click("#logout")
    page.wait_for_selector("form.login-form")
    page.goto(server + "/")
    page.wait_for_selector("form.login-form")

    # the refused file's 415 is the one error expected (the browser and htmx both report it)
    problems = [p for p in problems if "status of 415" not in p and "Error Code 415 from /inspect" not in p]
    assert problems == [], problems
    page.close()
