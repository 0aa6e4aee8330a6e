"""The one way VALD-MD writes a file whole and names a file's content: :func:`write_atomic`, :func:`sha256_bytes`,
:func:`sha256_file`. A leaf: the standard library only, so every layer may import it.

Guarantees of :func:`write_atomic`:

- *Atomic*: the bytes go to a temporary file beside ``path`` (same folder, so same file system), which is then
  renamed over ``path`` (``os.replace``). A reader sees the old file or the new one, never a half-written one;
  after a crash at most a stray ``.<name>.<random>.tmp`` is left, never a truncated ``path``.
- *Private by default*: the temporary file is created with ``mode`` (``0o600``: owner read/write only) before a
  byte is written, and the rename keeps it, so there is no moment when others may read it. ``mode=None`` lets the
  process umask decide, as ``open()`` does.
- *Durable on request*: ``fsync=True`` flushes the data to the disk before the rename (slower; for files that must
  survive a power cut, e.g. exports handed to someone). Without it the rename is atomic but may be lost with the
  page cache.
- *Concurrent writers*: every call has a temporary name of its own (``O_EXCL``), so two writers of the same path
  do not interleave their bytes; the last rename wins.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

__all__ = ["PRIVATE_FILE_MODE", "sha256_bytes", "sha256_file", "write_atomic"]

PRIVATE_FILE_MODE = 0o600
"""Owner read/write only: the default of :func:`write_atomic`."""
_CHUNK = 1 << 20  # bytes per read when hashing a file


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's content as 64 lowercase hex digits, read in 1 MiB chunks (any size).

    Raises:
        OSError: the file cannot be read (e.g. ``FileNotFoundError``).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = PRIVATE_FILE_MODE,
                 fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring for the guarantees).

    Args:
        path: the file to create or replace; its folder must exist.
        data: the whole content.
        mode: permission bits of the new file (``0o600`` default), or ``None`` for the umask's choice.
        fsync: flush the data to the disk before the rename.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; ``path`` is then unchanged and the
            temporary file removed.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # O_CREAT's mode passes through the umask; the caller asked for exactly this
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
