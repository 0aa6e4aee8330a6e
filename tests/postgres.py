"""A throw-away PostgreSQL server for the tests: ``initdb`` in a temporary folder, ``pg_ctl start`` on 127.0.0.1 on
a free port, trust authentication for the one user ``vald``, fsync off; never a system service. A fresh database per
test (:meth:`Postgres.new_database`). Run as root (CI containers), the server runs as ``nobody`` (PostgreSQL refuses
root). ``POSTGRES_BIN_DIR`` names the folder of ``initdb`` and ``pg_ctl`` when they are not found by themselves."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.orthanc import free_port

USER = "vald"
_SEARCH = ("/usr/local/bin", "/usr/local/pgsql/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))


def bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or ``None``."""
    candidates = [os.environ.get("POSTGRES_BIN_DIR", "")]
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    candidates += list(_SEARCH)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def missing_reason() -> str | None:
    """Why a test PostgreSQL cannot be started here (``None`` when it can)."""
    if bin_dir() is None:
        return ("PostgreSQL's initdb/pg_ctl were not found (apt-get install -y postgresql, or set POSTGRES_BIN_DIR; "
                ".ci/run installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]'; the test extra has it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


@dataclass
class Postgres:
    """A running test server."""

    folder: Path
    port: int
    pg_ctl: Path
    as_user: list[str]

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` maintenance database."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete its folder."""
        subprocess.run([*self.as_user, str(self.pg_ctl), "-D", str(self.folder / "data"), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def start() -> Postgres:
    """Start a server (see the module's docstring).

    Raises:
        RuntimeError: ``initdb`` or ``pg_ctl start`` failed; the message holds their output.
    """
    binaries = bin_dir()
    assert binaries is not None, missing_reason()
    folder = Path(tempfile.mkdtemp(prefix="vald-md-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # root: initdb and postgres refuse it; nobody owns the folder and runs the server
        as_user = ["runuser", "-u", "nobody", "--"]
        shutil.chown(folder, user="nobody")
    port = free_port()
    data = folder / "data"
    steps = (
        [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale"],
        [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "-o",
         f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off", "start"],
    )
    for command in steps:
        result = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").is_file() else ""
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"{Path(command[0]).name} failed ({result.returncode}): {result.stdout}"
                               f"{result.stderr}{log}")
    return Postgres(folder=folder, port=port, pg_ctl=binaries / "pg_ctl", as_user=as_user)
