"""The audit chain's HMAC keys: a key ring kept outside the database.

Where the keys live (never in the database, never in its backups)
    ``<data_dir>/secrets/audit-hmac.key``: mode 0600 in a 0700 folder, one key per line as 64 hex digits (32
    bytes). The **last** line is the current key, which signs new events; earlier lines are retired keys, kept
    because the events they signed are verified with them. Created on first start. Or ``VALD_MD_AUDIT_KEY``: the
    same keys as hex, comma-separated, the last one current; then no file is read or written.

Key ids
    ``ak_`` + the first 16 hex digits of SHA-256(``b"vald-md audit key id\\x00"`` + key). Derived from the key, so
    a key id stored in an event cannot point at a key other than the one that signed it.

Rotation (``vald-md audit rotate-key``, or a new last key in ``VALD_MD_AUDIT_KEY``)
    A new key is appended to the ring; at the next ``init_db`` the chain records an ``audit_key_rotated`` event,
    signed with the new key and naming the previous key id. Old keys stay in the ring: dropping one makes the
    events it signed unverifiable (``verify`` then says which key id is missing).

Which ring belongs to which database
    ``init_db(url, keys=ring)`` binds a ring to the database URL (``bind_audit_keys``). Without one, a SQLite file
    database uses ``<folder of the database file>/secrets/audit-hmac.key``, which for the default settings is
    exactly ``<data_dir>/secrets/audit-hmac.key``; other databases (PostgreSQL, in-memory SQLite) must be given
    a ring.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, make_url

from app.audit.errors import AuditKeyError, InsecureSecretFileError

KEY_BYTES = 32
"""Length of one audit key (HMAC-SHA256), bytes."""
KEY_FILE_NAME = "audit-hmac.key"
_KEY_ID_LABEL = b"vald-md audit key id\x00"


def key_id(key: bytes) -> str:
    """The public id of ``key``: ``ak_`` + 16 hex digits (see the module docstring)."""
    return "ak_" + hashlib.sha256(_KEY_ID_LABEL + key).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKeyRing:
    """The audit keys, oldest first; the last one is current and signs new events and checkpoints.

    Attributes:
        keys: key id -> 32-byte key, in the order they were added.
        path: the key file the ring came from; ``None`` for ``VALD_MD_AUDIT_KEY`` or a ring built in code.
    """

    keys: Mapping[str, bytes]
    path: Path | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.keys:
            raise AuditKeyError("an audit key ring needs at least one key")

    @classmethod
    def from_keys(cls, keys: Sequence[bytes], path: Path | None = None) -> AuditKeyRing:
        """Builds a ring from raw keys, oldest first (each exactly ``KEY_BYTES`` long).

        Raises:
            AuditKeyError: no key, or a key of the wrong length.
        """
        for key in keys:
            if len(key) != KEY_BYTES:
                raise AuditKeyError(f"an audit key has {len(key)} bytes, expected {KEY_BYTES} (64 hex digits)")
        return cls({key_id(k): k for k in keys}, path)

    @property
    def current_id(self) -> str:
        """Id of the key that signs new events."""
        return next(reversed(list(self.keys)))

    @property
    def current(self) -> bytes:
        """The key that signs new events."""
        return self.keys[self.current_id]

    def get(self, kid: str | None) -> bytes | None:
        """The key with id ``kid``, or ``None`` if it is not in the ring."""
        return None if kid is None else self.keys.get(kid)


def parse_keys(text: str, source: str) -> list[bytes]:
    """Reads hex keys separated by newlines or commas; blank lines and ``#`` comments are skipped.

    Raises:
        AuditKeyError: a value is not 64 hex digits (the message names ``source`` and the entry number, never the
            value).
    """
    keys: list[bytes] = []
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
    for number, entry in enumerate((e for e in entries if e), start=1):
        try:
            key = bytes.fromhex(entry)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise AuditKeyError(
                f"{source}: entry {number} is not {KEY_BYTES * 2} hex digits; generate one with "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        keys.append(key)
    if not keys:
        raise AuditKeyError(f"{source} holds no key")
    return keys


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureSecretFileError(f"audit key file {str(path)!r} has mode {mode:04o}: run chmod 600 on it")


def _write_atomically(path: Path, content: bytes, *, exclusive: bool) -> None:
    """Writes ``content`` beside ``path`` (0600, fsynced), then links (``exclusive``) or renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)  # another process won the race: use its key
        else:
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_audit_keys(path: str | os.PathLike[str], *, create: bool = True) -> AuditKeyRing:
    """Reads the key file, creating it with one random key (mode 0600) on first use.

    Args:
        path: the key file, e.g. ``Settings.audit_key_path``.
        create: create the file when it is missing (``False``: raise instead).

    Returns:
        The ring, with ``path`` set.

    Raises:
        InsecureSecretFileError: the file is readable or writable by group/others.
        AuditKeyError: missing (with ``create=False``) or malformed.
    """
    target = Path(path).expanduser()
    if not target.exists():
        if not create:
            raise AuditKeyError(
                f"no audit key file at {str(target)!r}: open the database once with init_db (the server or any "
                "vald-md users/audit command creates it), or restore the file from its backup"
            )
        _write_atomically(target, os.urandom(KEY_BYTES).hex().encode() + b"\n", exclusive=True)
    _check_mode(target)
    return AuditKeyRing.from_keys(parse_keys(target.read_text(encoding="ascii", errors="replace"), str(target)),
                                  target)


def audit_keys_from_env(value: str) -> AuditKeyRing:
    """The ring from ``VALD_MD_AUDIT_KEY`` (hex keys, comma-separated, the last current).

    Raises:
        AuditKeyError: malformed.
    """
    return AuditKeyRing.from_keys(parse_keys(value, "VALD_MD_AUDIT_KEY"))


def resolve_audit_keys(path: str | os.PathLike[str], env_value: str | None = None) -> AuditKeyRing:
    """The ring the settings name: ``env_value`` (``VALD_MD_AUDIT_KEY``) when set, else the file at ``path``
    (created on first use).

    Raises:
        AuditKeyError, InsecureSecretFileError: as for ``audit_keys_from_env`` / ``load_audit_keys``.
    """
    if env_value is not None and env_value.strip():
        return audit_keys_from_env(env_value)
    return load_audit_keys(path)


def rotate_audit_key(path: str | os.PathLike[str]) -> AuditKeyRing:
    """Appends a new random key to the key file (replaced atomically, mode 0600); the old keys stay.

    The chain records the rotation (``audit_key_rotated``) the next time the database is opened with the new ring
    (``init_db``; ``vald-md audit rotate-key`` does both).

    Returns:
        The new ring; its ``current_id`` is the new key's id.

    Raises:
        AuditKeyError, InsecureSecretFileError: as for ``load_audit_keys`` (the file must exist).
    """
    ring = load_audit_keys(path, create=False)
    keys = [*ring.keys.values(), os.urandom(KEY_BYTES)]
    target = Path(path).expanduser()
    _write_atomically(target, b"".join(k.hex().encode() + b"\n" for k in keys), exclusive=False)
    return AuditKeyRing.from_keys(keys, target)


def default_key_path(database_url: str) -> Path | None:
    """``<folder of the SQLite file>/secrets/audit-hmac.key``; ``None`` for other databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(str(url.database)).expanduser().resolve().parent / "secrets" / KEY_FILE_NAME


_RINGS: dict[str, AuditKeyRing] = {}


def _url_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def bind_audit_keys(engine: Engine, ring: AuditKeyRing) -> None:
    """Makes ``ring`` the key ring of ``engine``'s database (for every engine on the same URL)."""
    _RINGS[_url_key(engine)] = ring


def keys_for(engine: Engine) -> AuditKeyRing:
    """The key ring of ``engine``'s database: the bound one, else the SQLite default file (not created here).

    Raises:
        AuditKeyError: none bound and no default file.
    """
    bound = _RINGS.get(_url_key(engine))
    if bound is not None:
        return bound
    path = default_key_path(_url_key(engine))
    if path is None:
        raise AuditKeyError(
            f"no audit key for the {engine.dialect.name} database: open it with init_db(url, keys=...) "
            "(the server and the CLI pass Settings.audit_key_path or VALD_MD_AUDIT_KEY)"
        )
    ring = load_audit_keys(path, create=False)
    _RINGS[_url_key(engine)] = ring
    return ring
