"""Files the tool writes: atomically (readers see the old version or the new one, never half of one), and to
places checked before any work starts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from cbir.errors import ParameterError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; on success it replaces ``path`` in one step.

    The temporary name is unique (two writers of the same file never share one, the last replace wins), created
    private (mode 0600, exclusively: never an existing file or a link someone planted), and removed on every way
    out that is not success, an interrupt included. ``suffix`` keeps the extension writers check
    (``.xlsx`` for openpyxl, ``.npy`` for numpy).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


# ---------------------------------------------------------------------------------------------- checks

def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_creatable(folder: Path, name: str, what: Path) -> None:
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise ParameterError(f"{{{name}}} {what}: {existing} is a file, so no folder can be made under it", name)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(f"{{{name}}} {what}: {existing} is not writable", name)


def check_output_file(path: str | os.PathLike, name: str, *, suffix: str | None = None) -> Path:
    """Refuse, before any work, an output file that could not be written: a folder, a special file, an
    unwritable or impossible parent folder, or (with ``suffix``) another extension."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ParameterError(f"{{{name}}} must name a {suffix} file, got {path}", name)
    if path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a folder; give a file name (in it, or elsewhere)", name)
    if path.exists() and not path.is_file():
        raise ParameterError(f"{{{name}}} {path} is not a regular file", name)
    _check_creatable(path.parent, name, path)
    return path


def check_output_folder(path: str | os.PathLike, name: str) -> Path:
    """Refuse, before any work, an output folder that could not be made or written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a file, not a folder", name)
    _check_creatable(path, name, path)
    return path


def check_input_file(path: str | os.PathLike, name: str) -> Path:
    """Refuse an input file that is missing or is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a folder, not a file", name)
    if not path.is_file():
        raise ParameterError(f"{{{name}}} {path} does not exist", name)
    return path
