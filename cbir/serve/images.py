"""Images in and out: uploads decoded under limits, stored images served by id, thumbnails."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading

from PIL import Image, UnidentifiedImageError

from cbir.files import open_without_links
from cbir.images import UnreadableImage, load_image

from .config import Limits
from .errors import BadInput, NotFound, TooLarge

# What a browser shows as it is; anything else (TIFF, 16-bit PNG...) is sent re-encoded as PNG.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                   "BMP": "image/bmp"}
THUMBNAIL_PX = 256
THUMBNAILS_KEPT = 4096
_thumbnails: dict[tuple, bytes] = {}  # the oldest made goes first
_thumbnails_lock = threading.Lock()


def decode_upload(data: bytes, filename: str | None, limits: Limits) -> Image.Image:
    """An uploaded file as 8-bit RGB, or one clear 4xx error: empty, not an image, truncated, too large, too small.

    The pixel count is checked on the header, before anything is decoded, so a decompression bomb (a small file that
    expands to gigabytes) is refused without being expanded.
    """
    name = filename or "upload"
    if not data:
        raise BadInput(f"'{name}' is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise TooLarge(f"'{name}' has more pixels than Pillow's decompression-bomb guard allows") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadInput(f"'{name}' is not an image (JPEG, PNG, TIFF, BMP, GIF or WebP expected)") from None
    if width * height > limits.max_pixels:
        raise TooLarge(f"'{name}' is {width}x{height} pixels, over this server's limit of "
                       f"{limits.max_pixels:,} pixels")
    if min(width, height) < limits.min_side:
        raise BadInput(f"'{name}' is {width}x{height} pixels; the smallest image accepted is "
                       f"{limits.min_side}x{limits.min_side}")
    try:
        return load_image(io.BytesIO(data))
    except UnreadableImage:
        raise BadInput(f"'{name}' is damaged or truncated: it cannot be decoded") from None


@contextlib.contextmanager
def _stored_file(path: str):
    """(open file, its fstat) of a stored image: one descriptor, no link anywhere on the way (stored paths are
    resolved: a link there now, or a folder swapped for one, is someone's way to have the server send them a file of
    its user's), a regular file."""
    gone = NotFound("the image file of this entry is no longer on disk")
    try:
        fd = open_without_links(path)
    except OSError:
        raise gone from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise gone
        yield handle, info


def stored_image(path: str) -> tuple[bytes, str]:
    """(bytes, media type) of a stored image, for a browser.

    Only a file Pillow recognises as an image is ever sent: the path comes from the database, and a database entry
    whose file was replaced by something else must not turn into a way to read that file. What is checked is what
    is sent: the bytes read once.
    """
    with _stored_file(path) as (handle, _):
        data = handle.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            usable = kind in BROWSER_FORMATS and image.mode in ("RGB", "RGBA", "L", "LA", "P", "1")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise NotFound("the file of this entry is not a readable image any more") from None
    if usable:
        return data, BROWSER_FORMATS[kind]
    return _encode(_decoded(data), "PNG"), "image/png"


def thumbnail(path: str) -> bytes:
    """A JPEG of at most 256 px a side (cached; a file changed on disk gets a new one)."""
    with _stored_file(path) as (handle, info):
        key = (path, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        with _thumbnails_lock:
            cached = _thumbnails.get(key)
        if cached is None:
            image = _decoded(handle.read())
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            cached = _encode(image, "JPEG")
            with _thumbnails_lock:  # requests are served from several threads
                _thumbnails[key] = cached
                while len(_thumbnails) > THUMBNAILS_KEPT:
                    del _thumbnails[next(iter(_thumbnails))]
    return cached


def _decoded(data: bytes) -> Image.Image:
    try:
        return load_image(io.BytesIO(data))
    except UnreadableImage:
        raise NotFound("the file of this entry is not a readable image any more") from None


def _encode(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **({"quality": 85} if kind == "JPEG" else {}))
    return out.getvalue()
