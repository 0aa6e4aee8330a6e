"""``vald-md users ...`` and ``vald-md audit ...``: accounts and the audit trail from the server's shell.

=================================================  ===========================================================
``users add NAME [--role admin]``                  create an account; the password is asked twice (getpass) or
                                                   read from the first line of stdin with ``--password-stdin``
``users list``                                     accounts, roles, state
``users disable NAME`` / ``users enable NAME``     disabling ends the user's sessions and stops their tokens
``users reset-password NAME``                      new password (as for ``add``); ends the user's sessions
``users token NAME [--name LABEL] [--days N]``     a new API token, printed once (``Authorization: Bearer ...``);
                                                   it expires after ``--days`` (default ``VALD_MD_API_TOKEN_DAYS``, 90)
``users tokens NAME``                              the user's API tokens: id, name, created, expires, last used, state
``users revoke-token NAME TOKEN``                  revoke one token (TOKEN: its id, a 6+ digit id prefix, or its name)
``audit verify [--anchor [FILE]]``                 recompute the keyed chain and check the signed chain state and
                                                   the triggers of the database as found (nothing is migrated or
                                                   repaired first), every checkpoint in the default checkpoint
                                                   file when it exists, with ``--anchor`` also in FILE; exit 1
                                                   when broken
``audit anchor [--to FILE|-]``                     append a signed checkpoint of the head (default: the settings'
                                                   ``audit_anchor_file``; ``-``: standard output, e.g. for syslog)
``audit acknowledge SEQ --reason TEXT``            record that an ``audit_tamper_detected`` (``verify`` fails while
                                                   one is not acknowledged) or ``audit_triggers_restored`` event
                                                   (e.g. a VACUUM) was looked into
``audit rotate-key``                               add a new audit key to the key file and record the rotation
``audit export --csv|--json [--out FILE]``         the events (filters: ``--user --action --since --until``)
=================================================  ===========================================================

Passwords never appear on the command line (shell history, ``ps``). Every change is audited by ``app.audit``
(actor "system"); ``audit verify``, ``audit anchor`` and ``audit export`` are audited as ``cli:<os user>``. The
database and the audit key are the server's: ``--data-dir`` / ``--database-url`` or the ``VALD_MD_*`` /
``DATABASE_URL`` environment, as for ``vald-md serve``. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sqlalchemy import Engine as Database
from sqlmodel import select

from app import audit

if TYPE_CHECKING:
    from app.config import Settings

EXIT_USAGE = 2


class CommandError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 2."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``users`` and ``audit`` sub-commands to the ``vald-md`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None,
                        help="the server's data folder (default: VALD_MD_DATA_DIR or data/)")
    common.add_argument("--database-url", default=None,
                        help="database URL (default: DATABASE_URL / VALD_MD_DATABASE_URL, "
                             "else SQLite in the data folder)")

    u = sub.add_parser("users", help="accounts: add, list, disable, enable, reset-password, token(s)")
    usub = u.add_subparsers(dest="users_command", required=True)
    add = usub.add_parser("add", parents=[common], help="create an account (asks for the password)")
    add.add_argument("username", help="2-64 characters a-z 0-9 . _ @ - (stored lower-case)")
    add.add_argument("--role", choices=[r.value for r in audit.Role], default=audit.Role.CLINICIAN.value,
                     help="clinician (default) or admin (also reads the audit trail)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    usub.add_parser("list", parents=[common], help="list accounts")
    for name, what in (("disable", "disable an account and end its sessions"), ("enable", "re-enable an account")):
        p = usub.add_parser(name, parents=[common], help=what)
        p.add_argument("username", help="the account")
    rp = usub.add_parser("reset-password", parents=[common], help="set a new password and end the user's sessions")
    rp.add_argument("username", help="the account")
    rp.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    tok = usub.add_parser("token", parents=[common], help="create an API token for scripts (printed once)")
    tok.add_argument("username", help="whose token")
    tok.add_argument("--name", default="api", help="a label for the token, e.g. 'nightly batch' (default: api)")
    tok.add_argument("--days", type=int, default=None,
                     help="days until it expires, 1..3650 (default: VALD_MD_API_TOKEN_DAYS, 90)")
    toks = usub.add_parser("tokens", parents=[common], help="list a user's API tokens")
    toks.add_argument("username", help="whose tokens")
    rt = usub.add_parser("revoke-token", parents=[common], help="revoke one API token")
    rt.add_argument("username", help="whose token")
    rt.add_argument("token", help="the token's id, a unique id prefix (6+ hex digits), or its name")

    a = sub.add_parser("audit", help="the tamper-evident audit trail: verify, anchor, rotate-key, export")
    asub = a.add_subparsers(dest="audit_command", required=True)
    ver = asub.add_parser("verify", parents=[common],
                          help="recompute the hash chain; exit 1 and show the first broken event")
    ver.add_argument("--anchor", nargs="?", const="", default=None, metavar="FILE",
                     help="also check every checkpoint in FILE (default: the settings' audit_anchor_file)")
    anc = asub.add_parser("anchor", parents=[common], help="append a signed checkpoint of the chain head")
    anc.add_argument("--to", default=None, metavar="FILE",
                     help="checkpoint file (default: VALD_MD_AUDIT_ANCHOR_FILE or <data_dir>/audit-anchors.jsonl); "
                          "'-' writes the line to standard output")
    ack = asub.add_parser("acknowledge", parents=[common],
                          help="acknowledge an audit_tamper_detected (or audit_triggers_restored) event after "
                               "looking into it (audited)")
    ack.add_argument("seq", type=int, help="the event's number (verify lists them as warnings)")
    ack.add_argument("--reason", required=True, help="what was found, kept in the audit trail (no patient data)")
    asub.add_parser("rotate-key", parents=[common],
                    help="add a new audit key to the key file (old keys stay, to verify old events)")
    ex = asub.add_parser("export", parents=[common], help="export events, oldest first")
    fmt = ex.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV with a header row")
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="a JSON array of events")
    ex.add_argument("--out", default=None, help="file to write (mode 0600); default: standard output")
    ex.add_argument("--user", default=None, help="only events of this username")
    ex.add_argument("--action", default=None, choices=[x.value for x in audit.AuditAction], help="only this action")
    ex.add_argument("--since", default=None, help="from this day, YYYY-MM-DD (UTC)")
    ex.add_argument("--until", default=None, help="up to and including this day, YYYY-MM-DD (UTC)")


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run a ``users`` or ``audit`` command; returns the exit status."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    try:
        settings = _settings(args)
        if args.command == "audit" and args.audit_command == "rotate-key":
            return _rotate_key(settings, stdout)
        if args.command == "audit" and args.audit_command == "verify":
            return _verify(settings, args, stdout)
        db = audit.init_db(settings.resolved_database_url, keys=_keys(settings))
    except (CommandError, ValueError, audit.AuditKeyError) as e:
        sys.stderr.write(f"vald-md {args.command}: {e}\n")
        return EXIT_USAGE
    try:
        if args.command == "users":
            return _users(db, settings, args, stdin, stdout)
        return _audit(db, settings, args, stdout)
    except (CommandError, ValueError, LookupError) as e:
        sys.stderr.write(f"vald-md {args.command}: {e}\n")
        return EXIT_USAGE
    finally:
        db.dispose()


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    from app.config import Settings

    overrides = {k: v for k, v in {"data_dir": args.data_dir, "database_url": args.database_url}.items()
                 if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise CommandError("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())) from None


def _keys(settings: Settings) -> audit.AuditKeyRing:
    env = settings.audit_key.get_secret_value() if settings.audit_key is not None else None
    return audit.resolve_audit_keys(settings.audit_key_path, env)


def _rotate_key(settings: Settings, stdout: TextIO) -> int:
    """A new key in the key file, then ``init_db`` records ``audit_key_rotated`` under it."""
    if settings.audit_key is not None:
        raise CommandError("the audit keys come from VALD_MD_AUDIT_KEY: add a new key at its end (comma-separated, "
                           "python -c 'import secrets; print(secrets.token_hex(32))'), keep the old ones, restart")
    old = _keys(settings)  # creates the file on a first run, so there is something to rotate
    audit.init_db(settings.resolved_database_url, keys=old).dispose()
    ring = audit.rotate_audit_key(settings.audit_key_path)
    db = audit.init_db(settings.resolved_database_url, keys=ring)
    db.dispose()
    stdout.write(f"audit key rotated: {old.current_id} -> {ring.current_id} ({len(ring.keys)} keys in "
                 f"{settings.audit_key_path}); back the file up now\n")
    return 0


def _read_password(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.password_stdin:
        line = stdin.readline()
        password = line.removesuffix("\n")
        if not password:
            raise CommandError("no password on standard input (--password-stdin reads its first line)")
        return password
    if not stdin.isatty():
        raise CommandError("standard input is not a terminal: use --password-stdin to pipe the password in")
    first = getpass.getpass("Password (at least 12 characters): ")
    if getpass.getpass("Repeat the password: ") != first:
        raise CommandError("the two passwords differ; nothing was changed")
    return first


def _user(db: Database, username: str) -> audit.User:
    user = audit.get_user(db, username=username)
    if user is None:
        raise CommandError(f"no user called {username.strip().lower()!r} (vald-md users list shows them)")
    return user


def _users(db: Database, settings: Settings, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    command = args.users_command
    if command == "add":
        name = audit.normalize_username(args.username)
        if audit.get_user(db, username=name) is not None:
            raise CommandError(f"username {name!r} is taken: choose another")
        audit.check_password_policy(password := _read_password(args, stdin), username=name)
        user = audit.create_user(db, name, password, role=args.role)
        stdout.write(f"created {user.role} {user.username!r}; sign in at /login\n")
    elif command == "list":
        now = audit.utc_now()
        stdout.write(f"{'username':<24} {'role':<10} {'state':<22} created\n")
        for u in audit.list_users(db):
            state = "disabled" if u.disabled else (
                f"locked until {u.locked_until:%H:%M} UTC" if u.locked_until and u.locked_until > now else "active")
            stdout.write(f"{u.username:<24} {u.role:<10} {state:<22} {u.created_at:%Y-%m-%d}\n")
    elif command == "disable":
        user = audit.disable_user(db, _user(db, args.username).id)
        stdout.write(f"disabled {user.username!r}; their sessions are ended and their API tokens revoked\n")
    elif command == "enable":
        user = audit.enable_user(db, _user(db, args.username).id)
        stdout.write(f"enabled {user.username!r}\n")
    elif command == "reset-password":
        user = _user(db, args.username)
        audit.check_password_policy(password := _read_password(args, stdin), username=user.username)
        audit.reset_password(db, user.id, password)
        stdout.write(f"new password set for {user.username!r}; their sessions are ended and their API tokens "
                     f"revoked\n")
    elif command == "token":
        user = _user(db, args.username)
        if user.disabled:
            raise CommandError(f"{user.username!r} is disabled: enable the account first")
        days = settings.api_token_days if args.days is None else args.days
        if not 1 <= days <= 3650:
            raise CommandError(f"--days {days}: use 1 to 3650")
        token = audit.create_api_token(db, user, args.name, lifetime=timedelta(days=days))
        sys.stderr.write(f"API token (shown once, expires in {days} days; send it as "
                         f"'Authorization: Bearer <token>'):\n")
        stdout.write(token + "\n")
    elif command == "tokens":
        user = _user(db, args.username)
        now = audit.utc_now()
        stdout.write(f"{'id':<32} {'name':<24} {'created':<10} {'expires':<10} {'last used':<16} state\n")
        for t in audit.list_api_tokens(db, user.id):
            stdout.write(f"{t.id.hex:<32} {t.name[:24]:<24} {t.created_at:%Y-%m-%d} "
                         f"{f'{t.expires_at:%Y-%m-%d}' if t.expires_at else 'never':<10} "
                         f"{f'{t.last_used_at:%Y-%m-%d %H:%M}' if t.last_used_at else '-':<16} "
                         f"{_token_state(t, now)}\n")
    elif command == "revoke-token":
        user = _user(db, args.username)
        row = audit.find_api_token(db, user.id, args.token)
        was_revoked = row.revoked
        audit.revoke_api_token(db, row.id, owner_id=user.id)
        stdout.write(f"API token {row.name!r} ({row.id.hex[:8]}) of {user.username!r} "
                     f"{'was already revoked' if was_revoked else 'revoked'}\n")
    return 0


def _token_state(token: audit.ApiToken, now: datetime) -> str:
    state = audit.api_token_state(token, now)
    return f"revoked {token.revoked_at:%Y-%m-%d}" if state == "revoked" and token.revoked_at else state


def _day(name: str, value: str | None, *, end: bool = False) -> datetime | None:
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--{name} {value!r} is not a date: use YYYY-MM-DD") from None
    return datetime.combine(day + timedelta(days=1) if end else day, time.min, tzinfo=UTC)


def _cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"cli:uid{os.getuid()}"


def _audit(db: Database, settings: Settings, args: argparse.Namespace, stdout: TextIO) -> int:
    if args.audit_command == "acknowledge":
        return _acknowledge(db, args, stdout)
    if args.audit_command == "anchor":
        to = args.to or str(settings.resolved_audit_anchor_file)
        point = audit.write_checkpoint(db, stdout if to == "-" else to)
        audit.append_event(db, audit.AuditAction.AUDIT_ANCHOR, username=_cli_user(),
                           detail={"seq": point.seq, "hash": point.hash, "to": "stdout" if to == "-" else to})
        if to != "-":
            stdout.write(f"checkpoint: event #{point.seq} {point.hash} appended to {to}\n")
        return 0
    since, until = _day("since", args.since), _day("until", args.until, end=True)
    where = audit.EventFilter(user=args.user, action=args.action, since=since, until=until)
    chunks = audit.export_events(db, args.format, where)
    if args.out:
        out = Path(args.out)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            for chunk in chunks:
                handle.write(chunk)
    else:
        for chunk in chunks:
            stdout.write(chunk)
    audit.append_event(db, audit.AuditAction.AUDIT_EXPORT, username=_cli_user(),
                       detail={"format": args.format, "to_file": bool(args.out),
                               "filters": [k for k in ("user", "action", "since", "until") if getattr(args, k)]})
    if args.out:
        sys.stderr.write(f"wrote {args.out}\n")
    return 0


def _acknowledge(db: Database, args: argparse.Namespace, stdout: TextIO) -> int:
    """Records ``audit_tamper_acknowledged`` naming an ``audit_tamper_detected`` (or ``audit_triggers_restored``,
    e.g. after a VACUUM) event; signed like every event, so nobody without the audit key can acknowledge one by
    writing to the database."""
    reason = args.reason.strip()
    if not reason:
        raise CommandError("--reason is empty: say what was found")
    with audit.read_session(db) as session:
        row = session.exec(select(audit.AuditEvent).where(audit.AuditEvent.seq == args.seq)).first()
    alerts = (audit.AuditAction.AUDIT_TAMPER_DETECTED.value, audit.AuditAction.AUDIT_TRIGGERS_RESTORED.value)
    if row is None or row.action not in alerts:
        raise CommandError(f"event #{args.seq} is not an audit_tamper_detected or audit_triggers_restored event "
                           "(vald-md audit verify lists them as warnings)")
    event = audit.append_event(db, audit.AuditAction.AUDIT_TAMPER_ACKNOWLEDGED, username=_cli_user(),
                               object_type="audit_event", object_id=str(args.seq),
                               detail={"seq": args.seq, "reason": reason[:500]})
    stdout.write(f"audit_tamper_detected #{args.seq} acknowledged (event #{event.seq})\n")
    return 0


def _open_as_found(settings: Settings, ring: audit.AuditKeyRing) -> Database:
    """An engine on the database exactly as it is: no migration, no trigger repair, no chain start-up step."""
    from sqlalchemy import inspect, make_url

    url = settings.resolved_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") and \
            not Path(str(parsed.database)).expanduser().exists():
        raise CommandError(f"no database at {parsed.database}: nothing to verify")
    db = audit.make_engine(url)
    audit.bind_audit_keys(db, ring)
    if not {"audit_event", "audit_chain_state"} <= set(inspect(db).get_table_names()):
        db.dispose()
        raise CommandError("the database has no keyed audit chain yet (revision 0002): start the server (or run any "
                           "vald-md users command) once to upgrade it, then verify")
    return db


def _verify(settings: Settings, args: argparse.Namespace, stdout: TextIO) -> int:
    """Checks the database as found: nothing is migrated, repaired or re-signed before the check.

    Checkpoints: the server's default file whenever it exists, and ``--anchor FILE``. Only after the verdict is
    printed is the verification itself recorded (``audit_verify``; a chain state that fails its MAC is first
    recorded as ``audit_tamper_detected``, as on every write).
    """
    ring = _keys(settings)
    db = _open_as_found(settings, ring)
    try:
        return _verify_open(db, settings, args, ring, stdout)
    finally:
        db.dispose()


def _verify_open(db: Database, settings: Settings, args: argparse.Namespace, ring: audit.AuditKeyRing,
                 stdout: TextIO) -> int:
    from app.audit.db import missing_triggers

    files: list[str] = []
    default = settings.resolved_audit_anchor_file
    if default.exists():
        files.append(str(default))
    if args.anchor is not None:
        chosen = args.anchor or str(default)
        if chosen not in files:
            files.append(chosen)
    anchors: list[audit.Checkpoint] = []
    for where in files:
        try:
            anchors.extend(audit.read_checkpoints(where, ring))
        except audit.AnchorFileError as e:
            stdout.write(f"audit trail NOT VERIFIED: {e}\n")
            _record_verify(db, ok=False, checked=0, first_bad=None, anchors=0)
            return 1
    with audit.read_session(db) as session:
        missing = missing_triggers(session.connection())
    result = audit.verify_chain(db, anchors=[a.head for a in anchors])
    for warning in result.warnings:
        stdout.write(f"warning: {warning}\n")
    ok = result.ok and not missing and not result.unacknowledged
    if missing:
        stdout.write(f"append-only trigger(s) missing or altered: {', '.join(missing)} (the next start-up "
                     "re-creates them and records audit_triggers_restored)\n")
    if result.ok and missing:
        stdout.write("audit trail BROKEN: its append-only triggers are not intact\n")
    elif result.ok and result.unacknowledged:
        seqs = ", ".join(f"#{seq}" for seq in result.unacknowledged)
        stdout.write(f"audit trail NOT OK: the chain verifies ({result.events_checked} events), but tampering was "
                     f"detected and not yet acknowledged: audit_tamper_detected event(s) {seqs}. Look into each, "
                     "then record it: vald-md audit acknowledge SEQ --reason TEXT\n")
    elif result.ok:
        head = f", head #{result.head.seq} {result.head.hash}" if result.head else ""
        pinned = (f"; {len(anchors)} checkpoint(s) in {', '.join(files)} match, the latest at event "
                  f"#{anchors[-1].seq} ({anchors[-1].time:%Y-%m-%d %H:%M:%S} UTC)") if anchors else ""
        stdout.write(f"audit trail OK: {result.events_checked} events verified{head}{pinned}\n")
    else:
        stdout.write(f"audit trail BROKEN at event #{result.first_bad_seq}: {result.reason}\n")
        stdout.write(_describe_event(db, result.first_bad_seq))
    _record_verify(db, ok=ok, checked=result.events_checked, first_bad=result.first_bad_seq,
                   anchors=len(anchors))
    return 0 if ok else 1


def _record_verify(db: Database, *, ok: bool, checked: int, first_bad: int | None, anchors: int) -> None:
    audit.append_event(db, audit.AuditAction.AUDIT_VERIFY, username=_cli_user(),
                       outcome=audit.Outcome.SUCCESS if ok else audit.Outcome.SERIOUS_FAILURE,
                       detail={"ok": ok, "events_checked": checked, "first_bad_seq": first_bad,
                               "checkpoints": anchors})


def _describe_event(db: Database, seq: int | None) -> str:
    """The stored row of a broken event, as far as it can be read."""
    if seq is None:
        return ""
    try:
        with audit.read_session(db) as session:
            row = session.exec(select(audit.AuditEvent).where(audit.AuditEvent.seq == seq)).first()
    except Exception as e:  # noqa: BLE001 - a forged row may not even decode
        return f"  (the row cannot be read: {type(e).__name__})\n"
    if row is None:
        return "  (the row is missing)\n"
    return (f"  seq={row.seq} ts={row.ts.isoformat()} user={row.username!r} action={row.action} "
            f"object={row.object_type}:{row.object_id} outcome={row.outcome}\n"
            f"  detail={row.detail!r}\n  prev_hash={row.prev_hash}\n  hash={row.hash}\n")
