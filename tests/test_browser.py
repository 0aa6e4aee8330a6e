"""A real browser against the real server: sign in through the login page, upload a DICOM, set a slider,
generate, watch progress, review the three images with the map's legend and scale, check at 1440x900 and
1920x1080 that the AI-generated badges sit in the captions and never over an image, toggle the overlay,
compare, export the annotated PNG, restore a run from the history, choose a new file (the result on screen turns
stale at once; an old error banner goes when a valid file is chosen), sign out; and the viewer read like a PACS on
a 15-bit MONOCHROME1 CR (window/level drag in the PACS direction on the canvas, presets, invert, reset, the pixel
probe against the decoded value, flip, rotation, lengths in px and, on a file with Pixel Spacing, in mm, the form
hidden, a panel maximised, another run beside this one). No console errors allowed (the CSP is strict, so an
inline script or an eval would show up here).

Needs Playwright for Python (``pip install playwright``; its own browser download is not used) and Debian's
Chromium at /usr/bin/chromium. Skipped with a reason when either is missing, unless VALD_MD_REQUIRE_BROWSER=1
(CI), where it fails instead. Screenshots go to test-output/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def serving(app: Any, port: int) -> Iterator[str]:
    """``app`` under a real uvicorn on 127.0.0.1:``port`` in a thread of this process; yields its base URL and
    stops it afterwards."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


USERNAME = "browser-clinician"


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory) -> Iterator[str]:
    """The real app under uvicorn on 127.0.0.1 (a thread of this process), with the tiny model and one account
    (created as ``vald-md users add`` would: argon2 password, audited)."""
    _require_browser()
    from app.config import Settings
    from app.web import create_app
    from tests.accounts import PASSWORD, add_user

    port = _free_port()
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("browser-data"), port=port), engine=tiny_engine)
    with serving(app, port) as base:
        add_user(app.state.db, USERNAME, password=PASSWORD)
        yield base


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
    # a preset that averages 3 samples and names a map polarity and a map smoothing (issue 16): its button sets
    # them all
    monkeypatch.setitem(tiny_engine.info.presets, "opacity", {"prompt": "normal chest x ray", "strength": 0.6,
                                                              "guidance_scale": 4.0, "steps": 30, "samples": 3,
                                                              "map_polarity": "both", "map_smoothing": 2.5})
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

    # 1b. the model's presets are one click each: prompt, strength, guidance, steps, samples follow the preset's
    # values, and the map polarity and map smoothing where the preset names them
    def form_values() -> tuple[str, float, float, int, int]:
        return (page.input_value("#prompt"), float(page.input_value("#strength")),
                float(page.input_value("#guidance_scale")), int(page.input_value("#steps")),
                int(page.input_value("#samples")))

    buttons = page.locator("[data-model-preset]")
    assert buttons.count() >= 2, "the model's presets are offered"
    for i in reversed(range(buttons.count())):
        b = buttons.nth(i)
        want = (b.get_attribute("data-model-preset-prompt"), float(b.get_attribute("data-model-preset-strength")),
                float(b.get_attribute("data-model-preset-guidance_scale")),
                int(b.get_attribute("data-model-preset-steps")), int(b.get_attribute("data-model-preset-samples")))
        page.locator("#steps").fill("7")  # a value no preset has: the click must set it
        page.locator("#samples").fill("5")
        page.select_option("#map_polarity", "removed")
        page.locator("#map_smoothing").fill("9")
        b.click()
        assert form_values() == want, (b.get_attribute("data-model-preset"), form_values(), want)
        assert "is-active" in (b.get_attribute("class") or "")
        polarity = b.get_attribute("data-model-preset-map_polarity")
        assert page.input_value("#map_polarity") == (polarity or "removed")  # no polarity named: left as it was
        smoothing = b.get_attribute("data-model-preset-map_smoothing")
        assert page.input_value("#map_smoothing") == (smoothing or "9")  # none named: left as it was
    assert page.locator("[data-model-preset=opacity]").get_attribute("data-model-preset-map_smoothing") == "2.5"
    assert page.locator("[data-model-preset=paper]").get_attribute("data-model-preset-map_smoothing") == "0"
    assert "3 samples" in (page.locator("[data-model-preset=opacity]").get_attribute("title") or "")
    page.select_option("#map_polarity", "both")
    page.locator("#map_smoothing").fill("0")

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

    # 3d. a length on a file with Pixel Spacing (0.168 mm) is in mm
    page.wait_for_selector("[data-viewer].has-pixels")
    page.keyboard.press("d")
    page.locator("[data-panel=original] [data-viewport]").evaluate("e => e.scrollIntoView({block: 'center'})")
    vp = page.locator("[data-panel=original] [data-viewport]").bounding_box()
    page.mouse.move(vp["x"] + vp["width"] * 0.3, vp["y"] + vp["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(vp["x"] + vp["width"] * 0.7, vp["y"] + vp["height"] * 0.5, steps=4)
    page.mouse.up()
    length = page.inner_text("[data-measure-readout]")
    mm = float(length.split()[1])
    assert length.endswith("mm") and abs(mm - 0.4 * 1024 * 0.168) < 3, length
    page.keyboard.press("Escape")
    page.keyboard.press("w")

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

    # 6a. the exported PNG chosen as a file: "Use these parameters" sets the run's map options again, the lungs-only
    # checkbox included, over values the form had been changed to
    exported = tmp_path / "annotated.png"
    exported.write_bytes(Path(path).read_bytes())
    page.set_input_files("#file", str(exported))
    use = page.locator("[data-model-preset=png-info]")
    use.wait_for()
    page.select_option("#map_polarity", "removed" if use.get_attribute("data-model-preset-map_polarity") == "both"
                       else "both")
    page.locator("#map_smoothing").fill("9")
    want_lungs = use.get_attribute("data-model-preset-lung_mask") == "true"
    page.set_checked("#lung_mask", not want_lungs)
    use.click()
    for name in ("prompt", "strength", "steps", "samples", "map_method", "map_polarity", "counterfactual_edit"):
        assert page.input_value(f"#{name}") == use.get_attribute(f"data-model-preset-{name}"), name
    assert float(page.input_value("#map_smoothing")) == float(use.get_attribute("data-model-preset-map_smoothing"))
    assert page.is_checked("#lung_mask") == want_lungs
    assert page.input_value("#seed") == use.get_attribute("data-model-preset-seed")

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


# ----------------------------------------------------------------------------------------------------------------
# viewing like a PACS: window/level on the 16-bit data, presets, invert, reset, probe, measure, flip, screen use
# ----------------------------------------------------------------------------------------------------------------
CANVAS_STATS = """sel => {
    const c = document.querySelector(sel);  // a <canvas>, or an <img>
    const w = c.naturalWidth || c.width, h = c.naturalHeight || c.height;
    const copy = document.createElement('canvas');
    copy.width = w; copy.height = h;
    const ctx = copy.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(c, 0, 0);
    const d = ctx.getImageData(0, 0, w, h).data;
    let s = 0, s2 = 0, n = 0;
    for (let i = 0; i < d.length; i += 4 * 7) { s += d[i]; s2 += d[i] * d[i]; n++; }
    const mean = s / n;
    return {mean: mean, std: Math.sqrt(s2 / n - mean * mean), width: w, height: h};
}"""
ORIGINAL = "[data-panel=original] canvas[data-wl-source=input]"


def _sign_in(page, server: str) -> None:
    from tests.accounts import PASSWORD

    page.goto(server + "/login")
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_selector("#review-form")


def _generate(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_selector(".facts")
    page.locator("#strength").fill("0.5")
    page.locator("#steps").fill("4")
    page.click("#generate")
    page.wait_for_selector("[data-viewer].has-pixels " + ORIGINAL + "[data-rendered]", timeout=120_000)
    page.wait_for_timeout(100)


def _drag(page, selector: str, dx: float, dy: float, button: str = "left") -> None:
    page.locator(selector).evaluate("e => e.scrollIntoView({block: 'center'})")
    box = page.locator(selector).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button=button)
    page.mouse.move(x + dx / 2, y + dy / 2, steps=3)
    page.mouse.move(x + dx, y + dy, steps=3)
    page.mouse.up(button=button)
    page.wait_for_timeout(150)  # one animation frame renders the new window


def _readout(page) -> tuple[float, float]:
    out = page.locator("[data-wl-readout]")
    return float(out.get_attribute("data-center")), float(out.get_attribute("data-width"))


def test_viewing_like_a_pacs(server, browser, shared_data):
    import numpy as np

    from app import imaging

    dicom = shared_data / "dicom" / "RG1_JLSN.dcm"  # 15-bit MONOCHROME1 CR, no pixel spacing
    raw = imaging.decode_image(dicom.read_bytes()).raw
    OUTPUT.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    _sign_in(page, server)
    # Generate stays in sight at 1440x900 (the form's actions stick to the bottom of the scrolling sidebar)
    assert page.locator("#generate").bounding_box()["y"] + 30 < 900
    _generate(page, dicom)
    page.screenshot(path=str(OUTPUT / "pacs-1440x900.png"))

    # 1. the canvas shows the run's window at first: the file's preset, centre 15000, width 30000
    stats0 = page.evaluate(CANVAS_STATS, ORIGINAL)
    assert (stats0["width"], stats0["height"]) == (1841, 1955)
    c0, w0 = _readout(page)
    assert (c0, w0) == (15000, 30000)
    # the same picture as the run's input.png (the server's windowing), now drawn from the 16-bit values
    assert abs(page.evaluate(CANVAS_STATS, "[data-panel=original] img.wl")["mean"] - stats0["mean"]) < 1.0
    assert [b.inner_text().split()[0] for b in page.locator("[data-wl-presets] button").all()] == \
        ["Lung", "Mediastinum", "Bone", "File"]

    # 2. drag down: the centre moves the way that darkens (MONOCHROME1: lower values are brighter, so it falls)
    _drag(page, "[data-panel=original] [data-viewport]", 0, 120)
    c1, w1 = _readout(page)
    darker = page.evaluate(CANVAS_STATS, ORIGINAL)
    assert w1 == w0 and c1 < c0
    assert darker["mean"] < stats0["mean"] - 10, (darker, stats0)
    # 3. reset restores the run's window exactly
    page.keyboard.press("r")
    page.wait_for_timeout(150)
    assert _readout(page) == (c0, w0)
    assert page.evaluate(CANVAS_STATS, ORIGINAL)["mean"] == stats0["mean"]
    # 4. drag right: a wider window, less contrast; with the right button, whatever the tool
    page.keyboard.press("p")
    _drag(page, "[data-panel=original] [data-viewport]", 150, 0, button="right")
    c2, w2 = _readout(page)
    wider = page.evaluate(CANVAS_STATS, ORIGINAL)
    assert c2 == c0 and w2 > w0 and wider["std"] < stats0["std"] * 0.9, (wider, stats0)
    page.keyboard.press("w")
    page.keyboard.press("r")
    # 5. invert flips the grey scale; the counterfactual follows the same window
    page.keyboard.press("i")
    page.wait_for_timeout(150)
    inverted = page.evaluate(CANVAS_STATS, ORIGINAL)
    assert abs(inverted["mean"] - (255 - stats0["mean"])) < 1.0
    assert page.get_attribute("[data-action=invert]", "aria-pressed") == "true"
    page.keyboard.press("r")
    # 6. presets by key: 1 = lung (relative, from this image), 4 = the file's own window
    page.keyboard.press("1")
    page.wait_for_timeout(150)
    assert "Lung" in page.inner_text("[data-wl-readout]")
    assert page.evaluate(CANVAS_STATS, ORIGINAL)["mean"] != stats0["mean"]
    page.screenshot(path=str(OUTPUT / "pacs-lung-window.png"))
    page.keyboard.press("4")
    page.wait_for_timeout(150)
    assert _readout(page) == (15000, 30000)
    # 7. the probe reads the data's own value under the mouse
    box = page.locator("[data-panel=original] [data-viewport]").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.55)
    probe = page.locator("[data-probe]")
    x, y, value = int(probe.get_attribute("data-x")), int(probe.get_attribute("data-y")), float(
        probe.get_attribute("data-value"))
    assert value == raw[y, x] and "modality value" in probe.inner_text()
    # 8. flip left-right: the same screen point now shows the mirrored column
    page.keyboard.press("h")
    page.mouse.move(box["x"] + box["width"] * 0.4 + 1, box["y"] + box["height"] * 0.55)
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.55)
    assert abs(int(probe.get_attribute("data-x")) - (1841 - 1 - x)) <= 1
    page.keyboard.press("r")
    # rotated a quarter clockwise: right of the centre on screen is above the centre in the image
    page.keyboard.press("]")
    page.mouse.move(box["x"] + box["width"] * 0.5 + 1, box["y"] + box["height"] * 0.5)
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.5)
    rx, ry = int(probe.get_attribute("data-x")), int(probe.get_attribute("data-y"))
    assert abs(rx - 1841 / 2) <= 3 and ry < 1955 / 2 - 300, (rx, ry)
    page.keyboard.press("r")
    # 9. a length without pixel spacing is in pixels, and says so
    page.keyboard.press("d")
    _drag(page, "[data-panel=original] [data-viewport]", 100, 0)
    assert "px (no pixel spacing in the file)" in page.inner_text("[data-measure-readout]")
    page.keyboard.press("1")  # a preset and a length: the screenshot of the W/L in use
    page.wait_for_timeout(150)
    page.screenshot(path=str(OUTPUT / "pacs-window-level.png"))
    page.keyboard.press("Escape")
    page.keyboard.press("w")
    # 10. screen use: the form hidden widens the panels; one panel maximised takes the width
    narrow = page.locator("[data-panel=original] [data-viewport]").bounding_box()["width"]
    page.keyboard.press("s")
    page.wait_for_timeout(100)
    wide = page.locator("[data-panel=original] [data-viewport]").bounding_box()["width"]
    assert wide > narrow * 1.2, (narrow, wide)
    page.keyboard.press("s")
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.keyboard.press("m")
    page.wait_for_timeout(100)
    assert not page.locator("[data-panel=counterfactual]").is_visible()
    assert page.locator("[data-panel=original] [data-viewport]").bounding_box()["width"] > narrow * 2.5
    page.keyboard.press("m")
    assert page.locator("[data-panel=counterfactual]").is_visible()

    # 11. another run of the same image beside this one, in this run's window
    first = page.get_attribute("#run", "data-job")
    page.click("#generate")
    page.wait_for_function("f => document.querySelector('#run').dataset.job !== f && "
                           "document.querySelector('[data-viewer].has-pixels canvas[data-rendered]')", arg=first,
                           timeout=120_000)
    page.wait_for_selector(f"[data-compare-run] option[value='{first}']", state="attached")
    page.select_option("[data-compare-run]", first)
    page.wait_for_selector("[data-panel=other] canvas[data-rendered]")
    assert page.locator("[data-panel=other]").is_visible()
    assert "same image" in page.inner_text("[data-panel=other] figcaption")
    page.keyboard.press("o")  # maps off: the other run's counterfactual
    other = page.locator("[data-panel=other] [data-viewport]").bounding_box()
    page.mouse.move(other["x"] + other["width"] / 2, other["y"] + other["height"] / 2)
    assert f"Run {first[:8]} counterfactual" in page.inner_text("[data-probe]")
    page.keyboard.press("o")
    assert problems == [], problems
    np.testing.assert_equal(raw.shape, (1955, 1841))
    page.close()
