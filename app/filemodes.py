"""Owner-only permissions for everything the server stores: patient-derived images, the database, secrets.

The data folder is ``0700`` and every file in it ``0600``, whatever the process's umask: ``vald-md serve`` also sets
the umask to ``077`` so that files created by libraries (SQLite's journal, run artifacts) start out private, and
these functions make the modes explicit where the server creates things itself. No web, no torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.fileio import write_atomic

logger = logging.getLogger("vald_md.files")

DIR_MODE = 0o700
FILE_MODE = 0o600
SERVE_UMASK = 0o077
"""The umask ``vald-md serve`` runs under: new files ``0600``, new folders ``0700``."""
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it ``0700``; an existing folder is narrowed too.

    A folder this process does not own cannot be changed: that is logged, not fatal (the operator's choice).
    """
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    _chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Make an existing file ``0600`` (no error when it is gone)."""
    if path.exists():
        _chmod(path, FILE_MODE)


def private_tree(folder: Path) -> None:
    """``0700`` on ``folder`` and every folder below it, ``0600`` on every file (a run folder after a run)."""
    _chmod(folder, DIR_MODE)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            _chmod(Path(root) / name, DIR_MODE)
        for name in files:
            _chmod(Path(root) / name, FILE_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, created ``0600``: :func:`app.fileio.write_atomic` with
    :data:`FILE_MODE` (the one atomic writer)."""
    write_atomic(path, data, mode=FILE_MODE)


def sqlite_file(database_url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL; ``None`` for other databases and in-memory SQLite."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        return None
    path = database_url[len(prefix):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def private_sqlite(database_url: str) -> None:
    """Create the SQLite file of ``database_url`` as ``0600`` before SQLite does (it would use the umask), or
    narrow an existing one and its journal files. Other databases: nothing to do."""
    path = sqlite_file(database_url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    for candidate in (path, *(path.with_name(path.name + s) for s in _SQLITE_SIDE_FILES)):
        private_file(candidate)


def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except FileNotFoundError:
        pass
    except OSError as e:  # not the owner (a mounted volume): say so, do not stop the server
        logger.warning("could not make %s private (mode %o): %s", path, mode, e.strerror)
