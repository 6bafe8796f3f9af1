"""Names the tool makes from user data (class names, file names): safe in a folder, distinct, short enough for the
file system, and printable."""

from __future__ import annotations

import hashlib
import re

NAME_MAX = 255  # bytes in one file name on the usual file systems (os.pathconf(folder, "PC_NAME_MAX"))

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:size]


_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def _shorten(name: str, original: str, limit: int) -> str:
    """``name`` (ASCII) cut to ``limit`` bytes when longer, ending in a hash of ``original`` and its extension."""
    if len(name) <= limit:
        return name
    extension = _EXTENSION.search(name)
    extension = extension.group() if extension else ""
    tag = f"-{_digest(original, 12)}{extension}"
    return name[: max(limit - len(tag), 1)] + tag


def safe_name(text: str, *, limit: int = NAME_MAX) -> str:
    """A file-name-safe form of a user's name: no separators, so nothing lands outside the folder. Two names stay
    two: a name that had to change gets a short hash of the original before its extension (``a b.png`` ->
    ``a_b-1c2d3e4f.png``, ``a_b.png`` stays), and one longer than ``limit`` bytes is cut and ends in a hash of the
    whole and its extension."""
    text = str(text)
    safe = _UNSAFE.sub("_", text).strip("._") or "image"
    if safe != text:
        extension = _EXTENSION.search(safe)
        stem, extension = (safe[: extension.start()], extension.group()) if extension else (safe, "")
        safe = f"{stem}-{_digest(text)}{extension}"
    return _shorten(safe, text, limit)


def result_name(prefix: str, file_name: str, *, limit: int = NAME_MAX) -> str:
    """``<prefix>_<file name>`` made safe; shortened to ``limit`` bytes when too long, never dropped: the prefix
    (rank and class) comes first and is kept, the file name is cut, and a hash of the whole keeps names distinct
    and the extension stays."""
    return _shorten(f"{prefix}_{safe_name(file_name, limit=10**6)}", f"{prefix}/{file_name}", limit)


def printable(text) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``...), so that a name never fakes a
    line or a terminal command in what the tool prints."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
