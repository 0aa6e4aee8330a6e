"""pydicom's log messages with quoted text blanked out: pydicom logs invalid element values verbatim (a malformed
Patient's Name, say), and logs never carry patient data.

The filter goes on the ``pydicom`` logger when :mod:`app.imaging` is imported (before any module of the package
can read DICOM), without importing pydicom itself: the package's DICOM readers import it only when first used.
"""

from __future__ import annotations

import logging
import re

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class RedactQuotedValues(logging.Filter):
    """Replaces every quoted part of a record's message with ``'<redacted>'`` (the arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = _QUOTED.sub("'<redacted>'", record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed record must not break reading
            message = "pydicom message withheld (could not be redacted)"
        record.msg, record.args = message, None
        return True


def redact_pydicom_logs() -> None:
    """Put :class:`RedactQuotedValues` on the ``pydicom`` logger, once (a second call changes nothing)."""
    pydicom_logger = logging.getLogger("pydicom")
    if not any(isinstance(f, RedactQuotedValues) for f in pydicom_logger.filters):
        pydicom_logger.addFilter(RedactQuotedValues())
