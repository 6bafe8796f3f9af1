"""What a class name means beyond itself: its project, similar projects, its k-means cluster, its split.

* **Projects.** Class folders are named ``<project>_<suffix>``; :func:`project_of` is the thesis's rule and
  :class:`LevelMaps` adds a user's ``class,project`` map and the pairs of projects declared similar (the
  ``project`` and ``similar`` levels of evaluation).
* **Clusters.** ``--generalise 3`` replaces classes by k-means clusters: the ``{image path: cluster}`` files
  ``cbir-kmeans`` writes are read and written here, and looked up by path however the path was spelt.
* **Splits.** ``--generalise 1/2`` trains on one half of the classes and indexes and queries the other half:
  :func:`classes_for` says which classes a split uses, the same way in every command.

This module sits below everything that uses it (data handling, training, evaluation, figures) and imports
nothing of the package but its errors.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cbir.errors import CbirError, ParameterError
from cbir.files import write_text_atomically

__all__ = [
    "project_of", "LevelMaps", "balanced_rounds",
    "LABELS_FILE", "save_cluster_labels", "read_cluster_labels", "PathLookup", "clusters_for",
    "GENERALISE_MODES", "SPLITS", "read_split_file", "split_halves", "classes_for", "restrict_samples",
    "check_generalise",
]

# ------------------------------------------------------------------------------------------- projects

_TRAILING_NUMBER = re.compile(r"_\d+$")


def project_of(class_name: str) -> str:
    """The project (source data set) of a class, by the thesis's naming rule.

    Drop the last ``_segment``, then a trailing ``_<digits>``: ``camelyon16_0`` -> ``camelyon16``,
    ``umcm_colorectal_01_TUMOR`` -> ``umcm_colorectal``, ``pbc_basophil`` -> ``pbc``. A name without ``_`` is its
    own project.
    """
    name = str(class_name)
    cut = name.rfind("_")
    if cut <= 0:
        return name
    project = name[:cut]
    return _TRAILING_NUMBER.sub("", project) or project


@dataclass
class LevelMaps:
    """How class names map to the project and "similar" levels.

    ``projects`` overrides :func:`project_of` for the classes it names; ``similar`` holds the pairs of projects
    declared similar (any iterable of 2-name pairs is accepted and stored as frozensets).
    """

    projects: dict[str, str] = field(default_factory=dict)
    similar: set[frozenset[str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.projects = {str(c): str(p) for c, p in dict(self.projects).items()}
        pairs = set()
        for pair in self.similar:
            names = frozenset(str(p) for p in pair)
            if len(names) != 2:
                raise ValueError(f"a similar pair names two different projects, got {sorted(names)!r}")
            pairs.add(names)
        self.similar = pairs

    def project(self, cls: str) -> str:
        return self.projects.get(cls) or project_of(cls)

    def is_similar(self, p1: str, p2: str) -> bool:
        """Whether two projects count as similar (a project is similar to itself)."""
        return p1 == p2 or frozenset((p1, p2)) in self.similar

    @classmethod
    def from_files(
        cls,
        projects_csv: str | os.PathLike | None = None,
        similar_file: str | os.PathLike | None = None,
        similar_pairs: Iterable[str | Sequence[str]] | None = None,
    ) -> "LevelMaps":
        """Read the maps from files (and flags).

        ``projects_csv``: rows ``class,project`` (an optional header ``class,project``; blank lines and ``#``
        comments skipped). ``similar_file``: one pair per line, ``projA,projB``; a line naming more than two projects
        declares them all mutually similar. ``similar_pairs``: the same from a flag, as ``"projA,projB"`` strings or
        2-tuples. A missing or malformed file is a :class:`CbirError` naming the file and line.
        """
        projects: dict[str, str] = {}
        if projects_csv is not None:
            for lineno, row in _read_rows(projects_csv, "projects CSV"):
                if lineno == 1 and [f.lower() for f in row] == ["class", "project"]:
                    continue
                if len(row) != 2:
                    raise CbirError(f"{projects_csv}:{lineno}: expected 'class,project', got {','.join(row)!r}")
                projects[row[0]] = row[1]
        similar: set[frozenset[str]] = set()
        sources: list[tuple[str, list[str]]] = []
        if similar_file is not None:
            sources += [(f"{similar_file}:{lineno}", row) for lineno, row in _read_rows(similar_file, "similar file")]
        for item in similar_pairs or ():
            row = [p.strip() for p in item.split(",")] if isinstance(item, str) else [str(p).strip() for p in item]
            sources.append((f"similar pair {item!r}", [p for p in row if p]))
        for where, row in sources:
            if len(set(row)) < 2:
                raise CbirError(f"{where}: expected at least two different projects 'projA,projB', got {row!r}")
            similar.update(frozenset((a, b)) for i, a in enumerate(row) for b in row[i + 1:] if a != b)
        return cls(projects=projects, similar=similar)


def _read_rows(path: str | os.PathLike, what: str) -> list[tuple[int, list[str]]]:
    """(line number, non-empty fields) of each CSV row that is neither blank nor a ``#`` comment."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"{what} not found: {path}")
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for lineno, row in enumerate(csv.reader(handle), start=1):
                fields = [f for f in (f.strip() for f in row) if f]
                if fields and not fields[0].startswith("#"):
                    rows.append((lineno, fields))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CbirError(f"{what} {path} is not a text CSV file ({exc.__class__.__name__})") from None
    return rows


# ------------------------------------------------------------------------------------- per-class draws

def balanced_rounds(classes: Sequence[str], indices: Sequence[int] | None = None, *, seed: int = 0,
                    limit: int | None = None, rounds: int | None = None) -> list[int]:
    """Indices drawn round-robin over the classes: one unused random member of each class per round, whole rounds,
    until more than ``limit`` are drawn, ``rounds`` rounds are done, or the classes run out; in draw order.

    ``classes[i]`` is the class of item ``i``; ``indices`` (default: all) are the items to draw from. Small classes
    keep their share: a plain random sample would drown them in the big ones.

    Shuffling each class once and taking one element per round is the same draw as picking an unused member at
    random every round; sorting the classes makes the draw independent of the order the members came in.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i in range(len(classes)) if indices is None else indices:
        by_class.setdefault(classes[i], []).append(i)
    order = {c: rng.permutation(by_class[c]) for c in sorted(by_class)}
    chosen: list[int] = []
    rank = 0
    while (limit is None or len(chosen) <= limit) and (rounds is None or rank < rounds):
        picked = [int(order[c][rank]) for c in order if len(order[c]) > rank]
        if not picked:
            break
        chosen.extend(picked)
        rank += 1
    return chosen


# ------------------------------------------------------------------------------------------- clusters

#: The file name ``cbir-kmeans`` gives its labels inside its output folder.
LABELS_FILE = "cluster_labels.json"


def save_cluster_labels(labels: dict[str, int], path: str | Path) -> Path:
    """Write ``{path: cluster}`` as JSON, atomically."""
    return write_text_atomically(path, json.dumps({str(p): int(c) for p, c in labels.items()}, indent=1,
                                                  sort_keys=True))


def read_cluster_labels(path: str | Path) -> dict[str, int]:
    """``{image path: cluster}`` from a labels file written by ``cbir-kmeans`` (or any JSON object of that shape);
    a folder stands for the labels file inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise CbirError(f"cluster labels file {path} does not exist; write it with cbir-kmeans --out FOLDER")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CbirError(f"{path} is not a cluster labels file (not JSON: {exc.__class__.__name__})") from None
    if not isinstance(labels, dict):
        raise CbirError(f"{path} is not a cluster labels file (expected a JSON object {{path: cluster}})")
    out = {}
    for key, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise CbirError(f"{path}: the cluster of {key!r} is {value!r}, not an integer")
        out[str(key)] = value
    if not out:
        raise CbirError(f"{path} holds no cluster label")
    return out


def _normal_path(path: str) -> str:
    return os.path.normcase(os.path.abspath(os.fspath(path)))


class PathLookup:
    """path -> value, found by the exact string, else by the normalised absolute path, else by the resolved path.

    Label files key images by a database's paths or by absolute paths; callers holding relative paths, or paths
    through a symbolic link, still find them. The normalised tables are built on the first miss only.
    """

    def __init__(self, mapping: dict[str, Any]):
        self.exact = {str(p): v for p, v in mapping.items()}
        self._normalised: dict[str, Any] | None = None
        self._resolved: dict[str, Any] | None = None

    def get(self, path: str, default: Any = None) -> Any:
        path = str(path)
        if path in self.exact:
            return self.exact[path]
        if self._normalised is None:
            self._normalised = {_normal_path(p): v for p, v in self.exact.items()}
        normal = _normal_path(path)
        if normal in self._normalised:
            return self._normalised[normal]
        if self._resolved is None:
            self._resolved = {str(Path(p).resolve()): v for p, v in self.exact.items()}
        return self._resolved.get(str(Path(path).resolve()), default)


def clusters_for(paths: Iterable[str], labels: dict[str, int]) -> list[int | None]:
    """The cluster of each path (see :class:`PathLookup`); None where ``labels`` has none."""
    lookup = PathLookup(labels)
    return [lookup.get(path) for path in paths]


# --------------------------------------------------------------------------------------------- splits

GENERALISE_MODES = (0, 1, 2, 3)
SPLITS = ("train", "test")


def _check_mode(mode: int) -> None:
    if isinstance(mode, bool) or mode not in GENERALISE_MODES:
        raise ParameterError(f"{{generalise}} must be 0 (all classes), 1 or 2 (class halves) or 3 (k-means clusters), "
                             f"got {mode!r}", "generalise")


def check_generalise(mode: int, *, cluster_labels: Any = None, split_file: Any = None) -> None:
    """The ``generalise`` mode and the inputs it takes: labels with mode 3 only, a split file with 1 or 2 only."""
    _check_mode(mode)
    if mode == 3 and not cluster_labels:
        raise ParameterError("{generalise} 3 replaces classes by k-means clusters: give {cluster_labels} (from "
                             "cbir-kmeans)", "generalise", "cluster_labels")
    if cluster_labels and mode != 3:
        raise ParameterError("{cluster_labels} is used with {generalise} 3 only", "cluster_labels", "generalise")
    if split_file and mode not in (1, 2):
        raise ParameterError("{split_file} is used with {generalise} 1 or 2 only", "split_file", "generalise")


def read_split_file(path: str | Path) -> list[str]:
    """The class names a split file lists (first CSV column), in file order, without repeats."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"split file {path} does not exist (expected the train classes, one per line)")
    names = [row[0] for _, row in _read_rows(path, "split file")]
    if names and names[0].lower() in ("class", "class_name", "classes"):
        names = names[1:]  # a CSV header
    if not names:
        raise CbirError(f"split file {path} names no class (expected the train classes, one per line)")
    return list(dict.fromkeys(names))


def split_halves(all_classes: list[str], *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(first half, second half) of the classes: a seeded split balanced per project.

    Every project with two classes or more has classes on both sides, so neither half loses a whole source data
    set; a project of one class (and the odd class of an odd-sized project) goes to the side holding fewer classes
    so far, ties broken by the seeded draw. The halves differ in size by at most one class, and depend only on the
    *set* of names and the seed, so train, index and query folders holding the same classes get the same halves.
    """
    classes = sorted(set(str(c) for c in all_classes))
    by_project: dict[str, list[str]] = {}
    for name in classes:
        by_project.setdefault(project_of(name), []).append(name)
    # One generator over the projects in sorted order: the draw depends on the names and the seed, nothing else.
    rng = random.Random(seed)
    first: list[str] = []
    second: list[str] = []
    leftovers: list[str] = []
    for project in sorted(by_project):
        members = by_project[project][:]
        rng.shuffle(members)
        half = len(members) // 2
        first.extend(members[:half])
        second.extend(members[half:2 * half])
        leftovers.extend(members[2 * half:])
    # The odd classes, one per odd-sized project, even the totals out; shuffled so no project is always favoured.
    rng.shuffle(leftovers)
    for name in leftovers:
        if len(first) < len(second) or (len(first) == len(second) and rng.random() < 0.5):
            first.append(name)
        else:
            second.append(name)
    return sorted(first), sorted(second)


def classes_for(split: str, all_classes: list[str], mode: int, *, seed: int = 0,
                split_file: str | None = None) -> list[str]:
    """The classes (sorted) that ``split`` ("train", or "test" for index and query) uses under ``generalise=mode``.

    Modes 0 and 3: every class. Mode 1: train gets the first half, test the second; mode 2 swaps them. The halves
    come from :func:`split_halves` or, with ``split_file`` (a text or CSV file naming the mode-1 *train* classes,
    one per line), the file's classes are the mode-1 train half and every other class the test half.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test' (index and query use 'test'), got {split!r}")
    _check_mode(mode)
    classes = sorted(set(str(c) for c in all_classes))
    if not classes:
        raise CbirError("no class to split: the data folder holds no class folder")
    if mode in (0, 3):
        return classes
    if split_file is not None:
        listed = set(read_split_file(split_file))
        first = [c for c in classes if c in listed]
        second = [c for c in classes if c not in listed]
    else:
        if len(classes) < 2:
            raise ParameterError(f"{{generalise}} {mode} splits the classes in two halves; the data has only one class "
                                 f"({classes[0]})", "generalise")
        first, second = split_halves(classes, seed=seed)
    train, test = (first, second) if mode == 1 else (second, first)
    chosen = train if split == "train" else test
    if not chosen:
        where = f"split file {split_file}" if split_file else "the split"
        side = "train" if split == "train" else "index/query"
        raise ParameterError(f"{{generalise}} {mode} leaves no {side} class among the {len(classes)} classes of the "
                             f"data ({where}); check that the file names classes of this data set", "generalise")
    return chosen


def restrict_samples(samples: list, split: str, mode: int, *, seed: int = 0, split_file: str | None = None) -> list:
    """The samples (anything with ``.class_name``) whose class ``split`` uses under ``generalise=mode``."""
    wanted = set(classes_for(split, [s.class_name for s in samples], mode, seed=seed, split_file=split_file))
    return [s for s in samples if s.class_name in wanted]
