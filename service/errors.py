"""Domain exceptions of the service and the one table that turns them into HTTP answers.

Every error leaves the service in one shape, ``{"error": {"type": ..., "message": ...}}``.
The engine raises these exceptions without knowing about HTTP; :func:`error_status` is
the only place that maps them to status codes. Anything not in the table is a bug: the
client gets a generic 500 and the detail goes to the log only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class ServiceError(Exception):
    """Base of every error the service answers with its own message."""


class InvalidRequest(ServiceError):
    """A request the service cannot answer as asked: k out of range, an empty or over-long query, ..."""


class UnknownDimension(InvalidRequest):
    """A dimension the index does not serve; the message lists the ones it does."""

    def __init__(self, dim: int, allowed: Sequence[int], what: str = "dim") -> None:
        super().__init__(f"{what} {dim} is not served; allowed: {', '.join(str(d) for d in allowed)}")
        self.dim = dim
        self.allowed = list(allowed)


class NotFound(ServiceError):
    """A path that names nothing served here (an unknown model)."""


class NoIndex(NotFound):
    """A search, index or admin endpoint of a server that serves embeddings only (no index)."""


class Overloaded(ServiceError):
    """More requests in flight than the service accepts; the client should retry later."""


class NotReady(ServiceError):
    """The index or encoder is not loaded (yet, or any more)."""


class Unauthorized(ServiceError):
    """A missing or wrong API key."""


class Forbidden(ServiceError):
    """A key that may search but not write, or a write to a server that takes none."""


class WriteFailed(ServiceError):
    """A write that could not be made durable (the log could not be written); nothing of it is applied."""


class ReloadFailed(ServiceError):
    """A new index version could not be loaded; the previous one keeps serving."""


class PayloadTooLarge(ServiceError):
    """A request body over the configured limit; refused before it is read whole."""


class RequestTimeout(ServiceError):
    """The client did not send its request body within the configured time."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str


# The one table: most specific classes first (lookup walks the exception's MRO).
ERROR_TABLE: dict[type[Exception], ErrorKind] = {
    UnknownDimension: ErrorKind(422, "unknown_dimension"),
    InvalidRequest: ErrorKind(422, "invalid_request"),
    Unauthorized: ErrorKind(401, "unauthorized"),
    Forbidden: ErrorKind(403, "forbidden"),
    WriteFailed: ErrorKind(507, "write_failed"),
    NoIndex: ErrorKind(404, "no_index"),
    NotFound: ErrorKind(404, "not_found"),
    ReloadFailed: ErrorKind(409, "reload_failed"),
    PayloadTooLarge: ErrorKind(413, "payload_too_large"),
    RequestTimeout: ErrorKind(408, "request_timeout"),
    Overloaded: ErrorKind(429, "overloaded"),
    NotReady: ErrorKind(503, "not_ready"),
}
INTERNAL = ErrorKind(500, "internal_error")
INTERNAL_MESSAGE = "internal error; the server log has the details"


def error_kind(exc: BaseException) -> ErrorKind:
    """The status and type for an exception: the nearest class in :data:`ERROR_TABLE`, else internal."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return INTERNAL


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The single error body shape."""
    return {"error": {"type": error_type, "message": message}}


def describe_validation_errors(errors: Iterable[dict[str, Any]]) -> str:
    """One readable sentence from pydantic's error list, e.g. ``query parameter 'k': Input should be ...``."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(
                f"the request body is not valid JSON ({reason})" if reason else "the request body is not valid JSON"
            )
            continue
        where = _location([str(part) for part in error.get("loc", ())])
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def _location(location: list[str]) -> str:
    if not location:
        return ""
    source, *path = location
    field = ".".join(path)
    if source == "body":
        return f"body field '{field}'" if field else "body"
    if source in ("query", "header", "path"):
        return f"{source} parameter '{field}'"
    return ".".join(location)
