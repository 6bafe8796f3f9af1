"""Which slides a command works on: one file, a folder (one sub-folder per class, as for images), or a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from cbir.errors import CbirError
from cbir.slides.reader import is_slide_file
from cbir.slides.tiling import SlideSource

_NOT_SLIDES = {".csv", ".md", ".txt", ".json", ".xml", ".png", ".jpg", ".jpeg"}  # notes, masks, thumbnails beside slides


def _candidates(folder: Path) -> list[Path]:
    """Every file of a folder tree that may be a slide; a MIRAX slide's data folder is part of its slide."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        # absolute: the working folder given as "." or "" has no name to put a suffix on
        if path.suffix.lower() in _NOT_SLIDES or path.parent.absolute().with_suffix(".mrxs").is_file():
            continue
        files.append(path)
    return files


def read_slide_csv(path: Path) -> list[SlideSource]:
    """Rows ``slide,class[,patient]`` (optional header; blank lines and ``#`` comments skipped); relative slide
    paths are relative to the CSV's folder."""
    sources = []
    with path.open(newline="", encoding="utf-8") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            fields = [f.strip() for f in row]
            if not any(fields) or fields[0].startswith("#"):
                continue
            if lineno == 1 and fields[0].lower() == "slide":
                continue
            if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
                raise CbirError(f"{path}:{lineno}: expected 'slide,class[,patient]', got {','.join(row)!r}")
            slide = Path(fields[0]) if Path(fields[0]).is_absolute() else path.parent / fields[0]
            patient = fields[2] if len(fields) == 3 and fields[2] else None
            sources.append(SlideSource(str(slide), fields[1], patient))
    if not sources:
        raise CbirError(f"{path}: no slide listed (expected rows 'slide,class[,patient]')")
    return sources


def list_slides(path: str | Path) -> list[SlideSource]:
    """Slides from one file (class: its folder's name), a CSV, a folder of class folders, or a flat folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return read_slide_csv(path)
        return [SlideSource(str(path), path.parent.name)]
    if not path.is_dir():
        raise CbirError(f"{path} does not exist")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and not d.with_suffix(".mrxs").is_file())
    sources = [SlideSource(str(f), d.name) for d in class_dirs for f in _candidates(d)]
    sources += [SlideSource(str(f), path.name) for f in _candidates(path) if f.parent == path]
    if not sources:
        raise CbirError(f"no slides found under {path}: expected slide files, one sub-folder per class, or a CSV "
                        "'slide,class[,patient]'")
    return sources


def holds_slides(path: str | Path) -> bool:
    """Whether ``path`` names slides rather than images: a CSV, a slide file, or a folder holding one."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".csv" or is_slide_file(path)
    if path.is_dir():
        return any(is_slide_file(f) for f in _candidates(path))
    return False
