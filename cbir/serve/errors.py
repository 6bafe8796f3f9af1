"""The errors a request can meet, each with its HTTP status; the message is one line for the client."""

from __future__ import annotations

from cbir.database import DatabaseError
from cbir.errors import CbirError


class RequestError(CbirError):
    status = 400


class BadInput(RequestError):
    status = 400


class NotFound(RequestError):
    status = 404


class Conflict(RequestError):
    status = 409


class Unprocessable(RequestError):
    status = 422  # a request whose fields are missing or of the wrong kind, as FastAPI answers them


class TooLarge(RequestError):
    status = 413


class Unavailable(RequestError):
    status = 503


_SERVER_TROUBLE = ("lost the connection", "cannot reach", "did not answer", "stopped at start-up", "could not start")


def status_of(error: CbirError) -> int:
    """400 for bad input, 404 unknown things, 409 a request the database's state refuses (another extractor, a
    different vector size), 503 when Redis cannot be reached."""
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, DatabaseError):
        text = str(error)
        if any(marker in text for marker in _SERVER_TROUBLE):
            return 503
        if "does not exist" in text:
            return 404
        if text.startswith("invalid database name"):
            return 400
        return 409
    return 400
