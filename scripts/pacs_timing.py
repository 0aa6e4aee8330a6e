"""Measure opening a large chest DICOM from a PACS (Orthanc over DICOMweb) against a local upload, and what happens
when the PACS stops mid-transfer (docs/DEPLOYMENT.md, "PACS").

    .venv/bin/python scripts/pacs_timing.py [--repeats 5] [--dicom-dir ../shared/data/dicom]

Needs Debian's ``orthanc`` + ``orthanc-dicomweb`` (the test fixture's ``tests/orthanc.py`` starts a throw-away one).
"open from PACS" = WADO-RS metadata check + retrieve (``PacsClient.retrieve``) + the upload path's decode and
de-identification; "local upload" = the same decode and de-identification of the file's bytes (the browser's
transfer to the server is not counted). Mid-transfer: the retrieve goes through a throttling TCP proxy (4 MiB/s);
after 0.3 s Orthanc is killed and the proxy drops the connection.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import imaging
from app.config import PacsServer
from app.imaging.deid import deidentify
from app.pacs.client import PacsClient, PacsError
from tests import orthanc as orthanc_mod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
    p.add_argument("--dicom-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/dicom",
                   help="folder with RG1_JLSN.dcm and RG1_J2KI.dcm")
    return p.parse_args(argv)


def ingest(data: bytes) -> None:
    decoded = imaging.decode_image(data)
    deidentify(data, str(decoded.meta.public_summary().get("source_format")))


class ThrottledProxy:
    """127.0.0.1 TCP proxy to ``port`` sending at most ``rate`` bytes/s back; ``drop()`` closes every connection."""

    def __init__(self, port: int, rate: int) -> None:
        self.target, self.rate, self.stopped = port, rate, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int | None) -> None:
        chunk = 16384
        try:
            while not self.stopped.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        self.stopped.set()
        for s in [*self.conns, self.sock]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def main(args: argparse.Namespace) -> None:
    reason = orthanc_mod.missing_reason()
    if reason:
        raise SystemExit(reason)
    os.environ["PACS_TIMING_PW"] = orthanc_mod.PASSWORD
    folder = Path(tempfile.mkdtemp(prefix="pacs-timing-"))
    server = orthanc_mod.start_orthanc(folder / "orthanc")
    try:
        cfg = dict(name="timing", auth="basic", username=orthanc_mod.USERNAME, secret_env="PACS_TIMING_PW")
        client = PacsClient(PacsServer(url=server.dicomweb_url, **cfg))  # type: ignore[arg-type]
        for case in ("RG1_JLSN.dcm", "RG1_J2KI.dcm"):
            data = (args.dicom_dir / case).read_bytes()
            server.upload(data)
            import pydicom
            ds = pydicom.dcmread(args.dicom_dir / case, stop_before_pixels=True)
            uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            local, pacs, transfer = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ingest(data)
                local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = client.retrieve(*uids)
                t1 = time.perf_counter()
                ingest(got)
                pacs.append(time.perf_counter() - t0)
                transfer.append(t1 - t0)
            print(f"{case} {ds.Columns}x{ds.Rows} {len(data) / 2**20:.2f} MiB ({ds.file_meta.TransferSyntaxUID.name}): "
                  f"local upload ingest median {statistics.median(local):.3f} s; open from PACS median "
                  f"{statistics.median(pacs):.3f} s (of which metadata check + WADO-RS retrieve "
                  f"{statistics.median(transfer):.3f} s); n={args.repeats}")

        # the PACS stops mid-transfer
        proxy = ThrottledProxy(server.port, rate=4 * 2**20)
        slow = PacsClient(PacsServer(url=f"http://127.0.0.1:{proxy.port}/dicom-web", timeout_s=10, **cfg))  # type: ignore[arg-type]
        ds = pydicom.dcmread(args.dicom_dir / "RG1_JLSN.dcm", stop_before_pixels=True)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        outcome: list[str] = []

        def fetch() -> None:
            t0 = time.perf_counter()
            try:
                slow.retrieve(*uids)
                outcome.append(f"completed in {time.perf_counter() - t0:.2f} s (stopped too late)")
            except PacsError as e:
                outcome.append(f"{type(e).__name__} after {time.perf_counter() - t0:.2f} s: {e}")

        worker = threading.Thread(target=fetch)
        worker.start()
        time.sleep(0.3)
        os.kill(server.proc.pid, signal.SIGKILL)
        proxy.drop()
        worker.join(30)
        result = outcome[0] if outcome else "still running"
        print(f"PACS killed 0.3 s into a 4 MiB/s retrieve of RG1_JLSN.dcm: {result}")
    finally:
        server.stop()


if __name__ == "__main__":
    main(parse_args())
