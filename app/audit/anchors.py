"""Checkpoints: signed copies of the chain head, kept where the database's owner cannot rewrite them.

A checkpoint is one JSON line, appended (``O_APPEND``, mode 0600) to a file outside the database::

    {"hash": "...", "key_id": "ak_...", "last_seq": 68, "mac": "...", "seq": 68, "time": "2026-12-06T...", "v": 1}

``seq``/``hash`` are the last event's, ``last_seq`` the chain state's high-water mark, ``mac`` = HMAC-SHA256 under
the audit key ``key_id`` of the canonical JSON of the other fields. ``verify_chain(anchors=...)`` then checks that
every checkpointed event is still in the database with the same hash: a deleted tail, a chain rebuilt from an
event on, a re-used ``seq`` or a database restored from an older copy all change or remove a checkpointed event.

What protects a checkpoint is where it is kept: a file the database owner can also edit proves little. Put the
file on another host or an append-only mount (``chattr +a``), or send the lines to syslog/journald
(``vald-md audit anchor --to - | logger -t vald-md-audit``). The MAC only shows that a line was written by
someone holding the audit key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine
from sqlmodel import col, select

from app.audit.chain import GENESIS_HASH, ChainHead, canonical_json
from app.audit.db import snapshot_session
from app.audit.errors import AnchorFileError
from app.audit.keys import AuditKeyRing, keys_for
from app.audit.models import AuditChainState, AuditEvent, utc_now

CHECKPOINT_VERSION = 1
ANCHOR_FILE_NAME = "audit-anchors.jsonl"
"""Default checkpoint file name, under the data folder (``Settings.audit_anchor_file``)."""


@dataclass(frozen=True)
class Checkpoint:
    """One signed checkpoint.

    Attributes:
        seq: the last event's ``seq`` when it was written (0: no events yet).
        hash: that event's hash (``GENESIS_HASH`` for an empty chain).
        last_seq: the chain state's high-water mark then.
        time: when it was written (aware UTC).
        key_id: the audit key that signed it.
    """

    seq: int
    hash: str
    last_seq: int
    time: datetime
    key_id: str

    @property
    def head(self) -> ChainHead:
        """``seq``/``hash`` as a ``ChainHead`` for ``verify_chain(anchors=...)``."""
        return ChainHead(self.seq, self.hash)

    def fields(self) -> dict[str, Any]:
        """The signed fields (everything but ``mac``)."""
        return {"v": CHECKPOINT_VERSION, "seq": self.seq, "hash": self.hash, "last_seq": self.last_seq,
                "time": self.time.isoformat(timespec="microseconds"), "key_id": self.key_id}


def checkpoint_mac(fields: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of a checkpoint's fields in canonical JSON."""
    return hmac.new(key, canonical_json(fields).encode("utf-8"), hashlib.sha256).hexdigest()


def make_checkpoint(engine: Engine, *, keys: AuditKeyRing | None = None, now: datetime | None = None) -> Checkpoint:
    """Reads the head and the chain state in one transaction and returns the checkpoint (not written anywhere)."""
    ring = keys or keys_for(engine)
    with snapshot_session(engine) as session:  # head and state from one snapshot (REPEATABLE READ on PostgreSQL)
        newest = select(AuditEvent.seq, AuditEvent.hash).order_by(col(AuditEvent.seq).desc()).limit(1)
        head = session.exec(newest).first()
        state = session.get(AuditChainState, 1)
    seq, digest = (int(head[0] or 0), str(head[1])) if head is not None else (0, GENESIS_HASH)
    last_seq = state.last_seq if state is not None else seq
    return Checkpoint(seq, digest, last_seq, now or utc_now(), ring.current_id)


def format_checkpoint(checkpoint: Checkpoint, ring: AuditKeyRing) -> str:
    """The checkpoint as one signed JSON line (with ``\\n``)."""
    key = ring.get(checkpoint.key_id)
    if key is None:
        raise AnchorFileError(f"key {checkpoint.key_id} is not in the audit key ring")
    fields = checkpoint.fields()
    return canonical_json({**fields, "mac": checkpoint_mac(fields, key)}) + "\n"


def write_checkpoint(
    engine: Engine,
    to: str | os.PathLike[str] | TextIO,
    *,
    keys: AuditKeyRing | None = None,
    now: datetime | None = None,
) -> Checkpoint:
    """Appends a signed checkpoint of the current head to ``to``.

    A path is opened with ``O_WRONLY | O_APPEND | O_CREAT`` (mode 0600; its folder 0700 when created) and
    fsynced; a file that group or others may write is refused. A text stream (``sys.stdout``) gets the line as is.

    Args:
        engine: from ``init_db``.
        to: the checkpoint file, or a stream.
        keys: the key ring; default the one bound to ``engine``.
        now: the checkpoint's time (aware); default now.

    Returns:
        The checkpoint written.

    Raises:
        AnchorFileError: the file is group/other-writable.
    """
    ring = keys or keys_for(engine)
    checkpoint = make_checkpoint(engine, keys=ring, now=now)
    line = format_checkpoint(checkpoint, ring)
    if not isinstance(to, str | os.PathLike):
        to.write(line)
        to.flush()
        return checkpoint
    path = Path(to).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o022:
            raise AnchorFileError(f"checkpoint file {str(path)!r} has mode {mode:04o}: others may rewrite it; "
                                  "run chmod 600 on it")
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return checkpoint


def read_checkpoints(path: str | os.PathLike[str], ring: AuditKeyRing) -> list[Checkpoint]:
    """Reads and authenticates every checkpoint in ``path``, in file order.

    Raises:
        AnchorFileError: no such file, an empty one, or a line that is not a checkpoint signed by a key in
            ``ring`` (the message names the line).
    """
    target = Path(path).expanduser()
    try:
        lines = target.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnchorFileError(f"no checkpoint file at {str(target)!r}: write one with vald-md audit anchor") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnchorFileError(f"checkpoint file {str(target)!r} cannot be read: {exc}") from None
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{target} line {number}"
        try:
            data = json.loads(line)
            mac = data.pop("mac")
            checkpoint = Checkpoint(int(data["seq"]), str(data["hash"]), int(data["last_seq"]),
                                    datetime.fromisoformat(data["time"]), str(data["key_id"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AnchorFileError(f"{where}: not a checkpoint (altered, or not a vald-md checkpoint file)") from None
        key = ring.get(checkpoint.key_id)
        if key is None:
            raise AnchorFileError(f"{where}: signed with key {checkpoint.key_id}, which is not in the key ring")
        if data != checkpoint.fields() or not hmac.compare_digest(str(mac), checkpoint_mac(data, key)):
            raise AnchorFileError(f"{where}: its MAC does not match: the line was altered")
        checkpoints.append(checkpoint)
    if not checkpoints:
        raise AnchorFileError(f"checkpoint file {str(target)!r} holds no checkpoint")
    return checkpoints
