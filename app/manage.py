"""``vald-md users ...`` and ``vald-md audit ...``: accounts and the audit trail from the server's shell.

=================================================  ===========================================================
``users add NAME [--role admin]``                  create an account; the password is asked twice (getpass) or
                                                   read from the first line of stdin with ``--password-stdin``
``users list``                                     accounts, roles, state
``users disable NAME`` / ``users enable NAME``     disabling ends the user's sessions and stops their tokens
``users reset-password NAME``                      new password (as for ``add``); ends the user's sessions
``users token NAME [--name LABEL]``                a new API token, printed once (``Authorization: Bearer ...``)
``audit verify``                                   recompute the hash chain; prints the first broken event, exit 1
``audit export --csv|--json [--out FILE]``         the events (filters: ``--user --action --since --until``)
=================================================  ===========================================================

Passwords never appear on the command line (shell history, ``ps``). Every change is audited by ``app.audit``
(actor "system"); ``audit verify`` and ``audit export`` are audited as ``cli:<os user>``. The database is the
server's: ``--data-dir`` / ``--database-url`` or the ``VALD_MD_*`` / ``DATABASE_URL`` environment, as for
``vald-md serve``. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TextIO

from sqlalchemy import Engine as Database
from sqlmodel import select

from app import audit

EXIT_USAGE = 2


class CommandError(Exception):
    """A mistake the operator can fix; printed as one line, exit status 2."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``users`` and ``audit`` sub-commands to the ``vald-md`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None, help="the server's data folder (default: VALD_MD_DATA_DIR or data/)")
    common.add_argument("--database-url", default=None,
                        help="database URL (default: DATABASE_URL / VALD_MD_DATABASE_URL, else SQLite in the data folder)")

    u = sub.add_parser("users", help="accounts: add, list, disable, enable, reset-password, token")
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

    a = sub.add_parser("audit", help="the tamper-evident audit trail: verify, export")
    asub = a.add_subparsers(dest="audit_command", required=True)
    asub.add_parser("verify", parents=[common], help="recompute the hash chain; exit 1 and show the first broken event")
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
        db = _open(args)
    except CommandError as e:
        sys.stderr.write(f"vald-md {args.command}: {e}\n")
        return EXIT_USAGE
    try:
        if args.command == "users":
            return _users(db, args, stdin, stdout)
        return _audit(db, args, stdout)
    except (CommandError, ValueError, LookupError) as e:
        sys.stderr.write(f"vald-md {args.command}: {e}\n")
        return EXIT_USAGE
    finally:
        db.dispose()


def _open(args: argparse.Namespace) -> Database:
    from pydantic import ValidationError

    from app.config import Settings

    overrides = {k: v for k, v in {"data_dir": args.data_dir, "database_url": args.database_url}.items()
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise CommandError("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())) from None
    return audit.init_db(settings.resolved_database_url)


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


def _users(db: Database, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
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
        stdout.write(f"disabled {user.username!r}; their sessions are ended and their API tokens stop working\n")
    elif command == "enable":
        user = audit.enable_user(db, _user(db, args.username).id)
        stdout.write(f"enabled {user.username!r}\n")
    elif command == "reset-password":
        user = _user(db, args.username)
        audit.check_password_policy(password := _read_password(args, stdin), username=user.username)
        audit.reset_password(db, user.id, password)
        stdout.write(f"new password set for {user.username!r}; their sessions are ended\n")
    elif command == "token":
        user = _user(db, args.username)
        if user.disabled:
            raise CommandError(f"{user.username!r} is disabled: enable the account first")
        token = audit.create_api_token(db, user, args.name)
        sys.stderr.write("API token (shown once; send it as 'Authorization: Bearer <token>'):\n")
        stdout.write(token + "\n")
    return 0


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


def _audit(db: Database, args: argparse.Namespace, stdout: TextIO) -> int:
    if args.audit_command == "verify":
        result = audit.verify_chain(db)
        audit.append_event(db, audit.AuditAction.AUDIT_VERIFY, username=_cli_user(),
                           outcome=audit.Outcome.SUCCESS if result.ok else audit.Outcome.SERIOUS_FAILURE,
                           detail={"ok": result.ok, "events_checked": result.events_checked,
                                   "first_bad_seq": result.first_bad_seq})
        if result.ok:
            head = f", head #{result.head.seq} {result.head.hash}" if result.head else ""
            stdout.write(f"audit trail OK: {result.events_checked} events verified{head}\n")
            return 0
        stdout.write(f"audit trail BROKEN at event #{result.first_bad_seq}: {result.reason}\n")
        stdout.write(_describe_event(db, result.first_bad_seq))
        return 1
    since, until = _day("since", args.since), _day("until", args.until, end=True)
    chunks = audit.export_events(db, args.format, user=args.user, action=args.action, since=since, until=until)
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
