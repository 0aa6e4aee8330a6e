"""What the server does before it answers (issue 15: ready <= 5 s after start), checked without timing anything:

- the libraries that only some requests need -- DICOM reading and writing, the PACS client, de-identification,
  scipy -- are imported where they are used, not with the web app (counted in a fresh interpreter's ``sys.modules``);
- ``vald-md serve`` starts with Python's cyclic garbage collector off and turns it on when the app's lifespan reports
  the start-up complete (the start-up's objects frozen, their one full pass a few seconds after ready), or when the
  server stops before that;
- loading the model writes neither the libraries' loading progress bars nor transformers' advice to install
  torchvision (which VALD-MD does not need) to the server's log.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFERRED = ("pydicom", "highdicom", "dicomweb_client", "dicomanonymizer", "gdcm", "pylibjpeg", "scipy")
"""Imported with the first request that needs them (a DICOM upload or export, a PACS call, a map), not at start-up."""
LOADED_WITH_THE_MODEL = ("diffusers", "transformers")
"""Imported by the model's load in the server's lifespan, not by the import of the web app."""


def _imported_by(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter with this checkout's ``app``; what it left in ``sys.modules`` and on the
    ``pydicom`` logger."""
    probe = (f"{code}\nimport json, logging, sys\n"
             "print(json.dumps({'modules': sorted({m.split('.')[0] for m in sys.modules}), "
             "'pydicom_filters': [type(f).__name__ for f in logging.getLogger('pydicom').filters]}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_server_command_imports_no_dicom_pacs_or_scipy_before_the_model_loads():
    # what `vald-md serve` imports before uvicorn starts the lifespan (app.cli.main, then cmd_serve)
    found = _imported_by("import app.cli; app.cli.build_parser(); import uvicorn, app.web, app.web.accesslog, "
                         "app.modelfolder, app.filemodes")
    modules = set(found["modules"])  # type: ignore[call-overload]
    assert not modules & set(DEFERRED), sorted(modules & set(DEFERRED))
    assert not modules & set(LOADED_WITH_THE_MODEL), sorted(modules & set(LOADED_WITH_THE_MODEL))
    # pydicom's log redaction is on before pydicom can be imported (app.imaging installs it)
    assert found["pydicom_filters"] == ["RedactQuotedValues"]


def test_reading_a_dicom_imports_pydicom_with_its_log_redaction():
    found = _imported_by("import app.imaging\nfrom app.imaging import dicom")
    assert "pydicom" in found["modules"]  # type: ignore[operator]
    assert found["pydicom_filters"] == ["RedactQuotedValues"]


def test_the_redaction_filter_goes_on_once_and_blanks_quoted_text():
    from app.imaging.redact import RedactQuotedValues, redact_pydicom_logs

    redact_pydicom_logs()
    redact_pydicom_logs()
    assert sum(isinstance(f, RedactQuotedValues) for f in logging.getLogger("pydicom").filters) == 1
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "bad value %s for %s",
                               ("'DOE^JANE'", '"PatientName"'), None)
    assert RedactQuotedValues().filter(record)
    assert record.getMessage() == "bad value '<redacted>' for '<redacted>'"


def _serve(tmp_path: Path, monkeypatch: Any, run: Any) -> None:
    """``vald-md serve`` with ``uvicorn.run`` replaced by ``run`` and the review app by a minimal ASGI app whose
    lifespan starts at once; the collector is on again afterwards whatever happened."""
    import uvicorn

    import app.web
    from app import cli

    async def minimal_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan" and (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})

    monkeypatch.setattr(app.web, "create_app", lambda settings: minimal_app)
    monkeypatch.setattr(uvicorn, "run", run)
    mask = os.umask(0o022)
    try:
        assert cli.main(["serve", "--data-dir", str(tmp_path / "data")]) == 0
    finally:
        os.umask(mask)
        gc.unfreeze()
        gc.enable()


def test_serve_keeps_the_garbage_collector_off_until_the_app_reports_ready(tmp_path, monkeypatch):
    seen: list[Any] = []

    def run(asgi: Any, **_: Any) -> None:
        seen.append(("run", gc.isenabled()))

        async def receive() -> dict[str, str]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, str]) -> None:
            seen.append((message["type"], gc.isenabled(), gc.get_freeze_count() > 0))

        asyncio.run(asgi({"type": "lifespan"}, receive, send))

    _serve(tmp_path, monkeypatch, run)
    # on at ready, with the start-up's objects frozen (their pass comes later: the next test)
    assert seen == [("run", False), ("lifespan.startup.complete", True, True)]
    assert gc.get_freeze_count() == 0  # main unfreezes them when the server stops


def test_the_start_up_garbage_is_collected_after_ready_not_before():
    import weakref

    from app import cli

    class Node:
        other: Any = None

    seen: list[Any] = []

    async def minimal_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> dict[str, str]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, str]) -> None:
        seen.append((message["type"], gc.isenabled(), probe() is not None))

    async def serve() -> None:
        await cli._CollectGarbageWhenReady(minimal_app, garbage_delay_s=0.05)({"type": "lifespan"}, receive, send)
        seen.append(("after ready", probe() is not None))
        await asyncio.sleep(0.3)
        seen.append(("later", probe() is not None, gc.get_freeze_count()))

    gc.disable()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # cyclic garbage of the start-up: only the collector frees it
        probe = weakref.ref(a)
        del a, b
        asyncio.run(serve())
    finally:
        gc.unfreeze()
        gc.enable()
    assert seen == [("lifespan.startup.complete", True, True), ("after ready", True), ("later", False, 0)]


def test_a_server_that_stops_before_ready_turns_the_collector_back_on(tmp_path, monkeypatch):
    seen: list[bool] = []
    import uvicorn

    import app.web
    from app import cli

    monkeypatch.setattr(app.web, "create_app", lambda settings: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.append(gc.isenabled()))
    mask = os.umask(0o022)
    try:
        assert cli.main(["serve", "--data-dir", str(tmp_path / "data")]) == 0
        assert seen == [False] and gc.isenabled()  # off while uvicorn ran, on again after (main's own doing)
    finally:
        os.umask(mask)
        gc.enable()


def test_loading_the_model_writes_no_progress_bars_or_torchvision_advice_to_the_log():
    # a fresh interpreter: transformers warns about its image processors once per process, at the pipeline's import
    code = ("import torch\nfrom app.modelfolder import DEFAULT_MODEL_DIR, load_model\n"
            "from diffusers.utils import logging as d\nfrom transformers.utils import logging as t\n"
            "assert d.is_progress_bar_enabled() and t.is_progress_bar_enabled()\n"
            "pipe, info = load_model(DEFAULT_MODEL_DIR, torch.float32)\n"
            "print('bars restored', d.is_progress_bar_enabled(), t.is_progress_bar_enabled())\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # bars on before the load
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bars restored True True" in done.stdout  # process-wide switches put back as they were
    for noise in ("Loading pipeline components", "Loading weights", "requires torchvision", "\r"):
        assert noise not in done.stderr, (noise, done.stderr[-2000:])
