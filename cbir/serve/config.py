"""What an operator sets when starting the service (``cbir-serve`` flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AUTH_MODES = ("write", "read", "none")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything over is refused with a 4xx and one line, never served."""

    max_upload_bytes: int = 20 * 2**20  # the whole request body
    max_pixels: int = 40_000_000  # per image, checked on the header before decoding (decompression bombs)
    min_side: int = 16  # px: below this an image carries no tissue to compare
    max_k: int = 100  # neighbours per query
    max_batch: int = 32  # images per batch search or add


@dataclass(frozen=True)
class ServeConfig:
    db_name: str  # the database the page opens on; any other of the same home or Redis can be asked for
    home: Path | None = None
    redis_url: str | None = None
    weights: str | None = None  # one extractor for every database; else each database's recorded one
    auth: str = "write"  # write: writes need the token; read: reads too; none: nothing does
    token: str | None = None
    uploads: Path | None = None  # where added images are kept (default: the database's own folder)
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
