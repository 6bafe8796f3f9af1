"""Who may do what: a bearer token, compared in constant time.

``write`` (default): reads are open, writes (add, remove, create or delete a database) need the token.
``read``: every API route needs it (the page's files and ``/health`` stay open; they hold no data).
``none``: nothing needs it — for a platform inside a private network that sends no token (Cytomine does not).

A browser cannot put a header on an ``<img>`` request, so reads also accept the token as the ``cbir_token``
cookie the page sets. Writes accept only the header: a cookie is sent by the browser on its own, so a foreign page
could make a logged-in browser write (cross-site request forgery); a header it cannot add.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBearer

from cbir.errors import CbirError
from cbir.files import read_private_text

from .config import AUTH_MODES

TOKEN_ENV = "CBIR_API_TOKEN"
COOKIE = "cbir_token"
MIN_TOKEN_LENGTH = 16

bearer = HTTPBearer(auto_error=False, description=f"the token of {TOKEN_ENV} or --token_file")


def read_token(token_file: str | None) -> str | None:
    """The token of ``token_file`` (its first line), else of ``$CBIR_API_TOKEN``; None when neither is set."""
    if token_file:
        # Another user's file, or a link to one, would be a token that user knows: refused like a Redis URL file.
        text = read_private_text(token_file, "token file")
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        source = token_file
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise CbirError(f"the token of {source} has {len(token)} characters; use at least {MIN_TOKEN_LENGTH}, e.g. "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


class Guard:
    """Decides, per request, whether its token lets it read or write."""

    def __init__(self, mode: str, token: str | None):
        if mode not in AUTH_MODES:
            raise CbirError(f"--auth must be one of {', '.join(AUTH_MODES)}, got {mode!r}")
        if mode == "read" and not token:
            raise CbirError(f"--auth read needs a token: set {TOKEN_ENV} or give --token_file")
        self.mode = mode
        self._token = token.encode() if token else None

    @property
    def writes_enabled(self) -> bool:
        return self.mode == "none" or self._token is not None

    def _matches(self, given: str | None) -> bool:
        # compare_digest takes as long for a wrong token as for a right one of the same length.
        return given is not None and self._token is not None and hmac.compare_digest(given.encode(), self._token)

    def check(self, request: Request, *, write: bool) -> None:
        if self.mode == "none" or (not write and self.mode == "write"):
            return
        if write and self._token is None:
            raise HTTPException(403, f"writes are disabled: this server was started without a token (set {TOKEN_ENV} "
                                     "or give --token_file to cbir-serve)")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else None
        if given is None and not write:
            given = request.cookies.get(COOKIE)
        if given is None:
            raise HTTPException(401, "this needs the server's token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not self._matches(given):
            raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})


async def can_read(request: Request, _credentials=Depends(bearer)) -> None:
    """Dependency of every reading route (async: it only compares strings, and FastAPI would run a plain function
    in a worker thread, a hand-off per request)."""
    request.app.state.guard.check(request, write=False)


async def can_write(request: Request, _credentials=Depends(bearer)) -> None:
    """Dependency of every writing route."""
    request.app.state.guard.check(request, write=True)
