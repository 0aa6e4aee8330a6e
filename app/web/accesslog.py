"""The server's access log without query strings.

Query strings can carry what must not be logged: a PACS search's patient ID or accession number, study and
instance UIDs (``/pacs/search``, ``/pacs/series``, ``/pacs/thumbnail``), overlay options. uvicorn's access log
writes the full path with its query (``"GET /pacs/search?patient_id=... HTTP/1.1" 200``); this filter keeps the
path and replaces a query by ``?…``, for every route, so that no future route can leak through it either.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

QUERY_MARK = "?…"


class StripQueryString(logging.Filter):
    """Rewrite uvicorn access records ``(client, method, full_path, http_version, status)``: path kept, query
    replaced by :data:`QUERY_MARK`. Records of any other shape pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + QUERY_MARK, args[3], args[4])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with :class:`StripQueryString` on the access handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["strip_query"] = {"()": f"{__name__}.StripQueryString"}
    config["handlers"]["access"].setdefault("filters", []).append("strip_query")
    return config
