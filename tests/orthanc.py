"""A throw-away Orthanc with the DICOMweb plugin for the PACS tests (Debian: ``apt-get install orthanc
orthanc-dicomweb``). HTTP on 127.0.0.1 on a free port, HTTP basic auth, no DICOM port, storage in a temporary
folder; never the system service. ``ORTHANC_BINARY`` / ``ORTHANC_DICOMWEB_PLUGIN`` override the paths."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
USERNAME = "vald"
PASSWORD = "orthanc-test-password"


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or ``None``."""
    return os.environ.get("ORTHANC_BINARY") or shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)


def dicomweb_plugin() -> str | None:
    """Path of libOrthancDicomWeb.so, or ``None``."""
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    if env:
        return env
    return next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)


def missing_reason() -> str | None:
    """Why an Orthanc cannot be started here (``None`` when it can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb; .ci/run installs it)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running test Orthanc."""

    proc: subprocess.Popen[bytes]
    port: int
    folder: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.root}/dicom-web"

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.root + path, data=body, method=method)
        token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def upload(self, data: bytes) -> dict[str, str]:
        """Store one DICOM file through Orthanc's REST API (``POST /instances``)."""
        return dict(json.loads(self._request("POST", "/instances", data)))

    def instance_count(self) -> int:
        return len(json.loads(self._request("GET", "/instances")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_orthanc(folder: Path, *, port: int | None = None, timeout_s: float = 30.0) -> Orthanc:
    """Start Orthanc with a config of its own in ``folder`` and wait until it answers.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout_s`` (the log's tail in the message).
    """
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise RuntimeError(missing_reason())
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "VALD-MD-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: PASSWORD},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "StableAge": 1,
        "HttpTimeout": 60,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=folder)
    server = Orthanc(proc=proc, port=port, folder=folder)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            server._request("GET", "/dicom-web/studies?limit=1")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start on port {port}:\n{tail}")
