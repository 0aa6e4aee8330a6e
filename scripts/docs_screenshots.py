"""Screenshots of the review screen for the README, taken with Playwright against the real server and model.

Starts the app on 127.0.0.1 with the embedded model (or ``--model``) in a throw-away data folder, signs in as a
temporary user, reviews one DICOM with a fixed seed and saves, as palette PNGs under ``--out`` (each < 400 kB):

* ``review-1440x900.png``: the review screen with the result, at 1440x900;
* ``window-level.png``: the window/level in use (the lung preset, a drag, a length, the pixel probe);
* ``maximised.png``: one panel maximised with the form hidden.

Usage::

    .venv/bin/python scripts/docs_screenshots.py --image ../shared/data/dicom/RG1_JLSN.dcm --out docs/screenshots

Needs Playwright for Python and Chromium at /usr/bin/chromium (``VALD_MD_CHROMIUM`` to change).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("VALD_MD_CHROMIUM", "/usr/bin/chromium"))
MAX_BYTES = 400_000
USERNAME, PASSWORD = "docs-screenshots", "docs screenshots only, thrown away"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, default=REPO.parent / "shared" / "data" / "dicom" / "RG1_JLSN.dcm",
                   help="the DICOM, PNG or JPEG to review (default: the 15-bit chest CR of shared/data)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="folder for the PNGs")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    args = p.parse_args(argv)
    if not args.image.is_file():
        p.error(f"--image {args.image} does not exist")
    if not CHROMIUM.is_file():
        p.error(f"no Chromium at {CHROMIUM}; set VALD_MD_CHROMIUM")
    return args


def save_small_png(png: bytes, path: Path) -> int:
    """Save a screenshot as a palette PNG (the UI is mostly flat colour and gray); returns its size in bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (128, 96, 64):
        buf = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            break
    path.write_bytes(buf.getvalue())
    return buf.tell()


def main(args: argparse.Namespace) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from app import audit
    from app.config import Settings
    from app.web import create_app

    # 1. the server, in a data folder of its own
    with tempfile.TemporaryDirectory(prefix="vald-md-shots-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        extra = {"model_dir": args.model} if args.model else {}
        app = create_app(Settings(data_dir=Path(tmp), port=port, **extra))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        audit.create_user(app.state.db, USERNAME, PASSWORD, role="clinician")
        url = f"http://127.0.0.1:{port}"
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            # 2. sign in, review the image with a fixed seed
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                            args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url + "/login")
                page.fill("#username", USERNAME)
                page.fill("#password", PASSWORD)
                page.click("#login")
                page.wait_for_selector("#review-form")
                page.set_input_files("#file", str(args.image))
                page.wait_for_selector(".facts")
                page.check("input[name=seed_mode][value=fixed]")
                page.fill("#seed", str(args.seed))
                page.click("#generate")
                page.wait_for_selector("[data-viewer].has-pixels canvas[data-rendered]", timeout=600_000)
                page.wait_for_timeout(500)
                page.evaluate("window.scrollTo(0, 0)")
                shots = {"review-1440x900.png": page.screenshot()}
                # 3. window/level in use: the lung preset, then a drag (narrower, brighter), a length, the probe
                vp = page.locator("[data-panel=original] [data-viewport]").bounding_box()
                cx, cy = vp["x"] + vp["width"] / 2, vp["y"] + vp["height"] / 2
                page.keyboard.press("1")
                page.mouse.move(cx, cy)
                page.mouse.down()
                page.mouse.move(cx + 30, cy - 10, steps=5)
                page.mouse.up()
                page.keyboard.press("d")
                page.mouse.move(cx - vp["width"] * 0.3, cy + vp["height"] * 0.1)
                page.mouse.down()
                page.mouse.move(cx + vp["width"] * 0.3, cy + vp["height"] * 0.1, steps=5)
                page.mouse.up()
                page.mouse.move(cx + vp["width"] * 0.15, cy - vp["height"] * 0.1)
                page.wait_for_timeout(300)
                shots["window-level.png"] = page.screenshot()
                # 4. one panel maximised, the form hidden
                page.keyboard.press("m")  # the panel under the mouse: the original
                page.keyboard.press("s")
                page.mouse.move(cx, cy)
                page.wait_for_timeout(300)
                shots["maximised.png"] = page.screenshot()
                browser.close()
        finally:
            server.should_exit = True
            thread.join(30)
    for name, png in shots.items():
        size = save_small_png(png, args.out / name)
        print(f"{args.out / name}: {size / 1000:.0f} kB")


if __name__ == "__main__":
    main(parse_args())
