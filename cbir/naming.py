"""Names the tool makes from user data (class names, file names): safe in a folder, distinct, short enough for the
file system, and printable."""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePath

NAME_MAX = 255  # bytes in one file name on the usual file systems (os.pathconf(folder, "PC_NAME_MAX"))

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:size]


def _shorten(name: str, original: str, limit: int, suffix: str = "") -> str:
    """``name`` (ASCII) cut to ``limit`` bytes when longer, ending in a hash of ``original`` (and ``suffix``)."""
    if len(name) <= limit:
        return name
    tag = f"-{_digest(original, 12)}{suffix}"
    return name[: max(limit - len(tag), 1)] + tag


def safe_name(text: str, *, limit: int = NAME_MAX) -> str:
    """A file-name-safe form of a user's name: no separators, so nothing lands outside the folder. Two names stay
    two: a name that had to change gets a short hash of the original (``a b`` -> ``a_b-1c2d3e4f``, ``a_b`` stays),
    and one longer than ``limit`` bytes is cut and ends in a hash of the whole."""
    text = str(text)
    safe = _UNSAFE.sub("_", text).strip("._") or "image"
    if safe != text:
        safe = f"{safe}-{_digest(text)}"
    return _shorten(safe, text, limit)


def result_name(prefix: str, file_name: str, *, limit: int = NAME_MAX) -> str:
    """``<prefix>_<file name>`` made safe; shortened to ``limit`` bytes when too long, never dropped: the prefix
    (rank and class) comes first and is kept, the file name is cut, and a hash of the whole keeps names distinct
    and the extension stays."""
    suffix = PurePath(file_name).suffix
    if _UNSAFE.sub("", suffix) != suffix or len(suffix) > 10:
        suffix = ""
    name = f"{prefix}_{safe_name(file_name, limit=10**6)}"
    return _shorten(name, f"{prefix}/{file_name}", limit, suffix)


def printable(text) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``...), so that a name never fakes a
    line or a terminal command in what the tool prints."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
