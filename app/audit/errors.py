"""Domain errors of the audit/accounts data layer.

They are plain exceptions (subclasses of ``ValueError`` or ``LookupError``) so the web layer can map them to an
HTTP status in one handler; messages quote the bad value and say how to fix it, and never contain a password,
a token or patient data.
"""

from __future__ import annotations


class UnsupportedDatabaseError(ValueError):
    """The database URL names a backend other than SQLite or PostgreSQL."""


class UserExistsError(ValueError):
    """A user with that username already exists."""


class UserNotFoundError(LookupError):
    """No user with that id or username."""


class InvalidUsernameError(ValueError):
    """The username does not match the allowed pattern."""


class WeakPasswordError(ValueError):
    """The password does not meet the password policy."""


class LastAdminError(ValueError):
    """The operation would leave the installation without an enabled administrator."""


class AuditDetailError(ValueError):
    """An audit event's ``detail`` is not canonical JSON or looks like it carries patient data or a credential."""


class RunNotFoundError(LookupError):
    """No run with that id."""


class InvalidRunTransitionError(ValueError):
    """A run status change that the run life cycle does not allow (e.g. ``done`` -> ``running``)."""


class InsecureSecretFileError(ValueError):
    """The HMAC secret file is readable or writable by group/others, or has the wrong length."""


class AuditKeyError(ValueError):
    """The audit chain's HMAC key ring is missing, malformed, or lacks a key the chain needs."""


class AnchorFileError(ValueError):
    """A checkpoint file (``vald-md audit anchor``) cannot be read, or a line is not signed by the audit key."""


class TokenNotFoundError(LookupError):
    """No API token matches the id, id prefix or name given (for that user)."""
