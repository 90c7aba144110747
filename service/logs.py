"""The service's log lines: plain text (the default) or one JSON object per line, each with its request id.

Every request gets an id: the caller's ``X-Request-ID`` when it is a short token, else a new one.
The edge middleware puts it in :data:`request_id` for the request's duration and in the response's
``X-Request-ID`` header, so a client's report, the access log and any error logged meanwhile can be
matched. ``log_format=json`` (``--log-format json``) makes every line of the process, uvicorn's
included, a JSON object that log collectors read without parsing rules.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

request_id: ContextVar[str | None] = ContextVar("mrl_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a caller's id that is safe to log and echo


def new_request_id(given: str | None) -> str:
    """The caller's id if it is a short token of safe characters, else a fresh one."""
    if given and _ACCEPTED_ID.fullmatch(given):
        return given
    return secrets.token_hex(8)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id, and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            line["request_id"] = current
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def use_json_logs() -> None:
    """Format every handler of the root logger as JSON (uvicorn's loggers propagate to it, see ``uvicorn_config``)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
