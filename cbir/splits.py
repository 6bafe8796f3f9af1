"""``--generalise``: which classes train, index and query see, the same way in every command.

* ``0``: every class everywhere (the ordinary setting).
* ``1``: half of the classes train the extractor; the other half is indexed and queried, so retrieval is measured
  on classes the extractor never saw. ``2``: the same halves, swapped.
* ``3``: every class (the labels are replaced by k-means clusters elsewhere, see :mod:`cbir.kmeans`).

The halves come from a rule, never from a list of one data set's names. By default the rule is a seeded split
balanced per project (the project of a class as :func:`cbir.evaluation.project_of` gives it): every project with
two classes or more has classes on both sides, so neither half loses a whole source data set; a project of one class
(and the odd class of an odd-sized project) goes to the side holding fewer classes so far, ties broken by the seeded
draw. The halves therefore differ in size by at most one class. The split depends only on the *set* of class names
and the seed, so the train, index and query folders give the same halves when they hold the same classes (the
thesis layout); where they do not, give ``split_file``: a text or CSV file naming the *train* classes of
``--generalise 1``, one per line (first column; blank lines and ``#`` comments ignored); every other class is test.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from cbir.errors import CbirError

GENERALISE_MODES = (0, 1, 2, 3)
SPLITS = ("train", "test")

__all__ = ["GENERALISE_MODES", "SPLITS", "add_generalise_args", "classes_for", "read_split_file", "split_halves",
           "restrict_samples"]


def read_split_file(path: str | Path) -> list[str]:
    """The class names a split file lists (first CSV column), in file order, without repeats."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"split file {path} does not exist (expected the train classes, one per line)")
    names: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                fields = [f.strip() for f in row]
                if not fields or not fields[0] or fields[0].startswith("#"):
                    continue
                names.append(fields[0])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CbirError(f"split file {path} is not a text file of class names ({exc.__class__.__name__})") from None
    if names and names[0].lower() in ("class", "class_name", "classes"):
        names = names[1:]  # a CSV header
    if not names:
        raise CbirError(f"split file {path} names no class (expected the train classes, one per line)")
    return list(dict.fromkeys(names))


def split_halves(all_classes: list[str], *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(first half, second half) of the classes by the seeded, per-project balanced rule (see the module doc)."""
    from cbir.evaluation import project_of

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
    """The classes (sorted) that ``split`` ("train", or "test" for index and query) uses under ``--generalise mode``.

    Modes 0 and 3: every class. Mode 1: train gets the first half, test the second; mode 2 swaps them. The halves
    come from :func:`split_halves` (seeded, balanced per project) or, with ``split_file``, the file's classes are the
    mode-1 train half and every other class of ``all_classes`` the test half.
    """
    if split not in SPLITS:
        raise CbirError(f"split must be 'train' or 'test' (index and query use 'test'), got {split!r}")
    try:
        mode_number = int(mode)
    except (TypeError, ValueError):
        mode_number = None
    if mode_number not in GENERALISE_MODES or str(mode).strip() != str(mode_number):
        raise CbirError(f"--generalise must be 0 (all classes), 1 or 2 (class halves) or 3 (k-means clusters), "
                        f"got {mode!r}")
    classes = sorted(set(str(c) for c in all_classes))
    if not classes:
        raise CbirError("no class to split: the data folder holds no class folder")
    if mode_number in (0, 3):
        return classes
    if split_file is not None:
        listed = set(read_split_file(split_file))
        first = [c for c in classes if c in listed]
        second = [c for c in classes if c not in listed]
    else:
        if len(classes) < 2:
            raise CbirError(f"--generalise {mode_number} splits the classes in two halves; the data has only "
                            f"one class ({classes[0]})")
        first, second = split_halves(classes, seed=seed)
    train, test = (first, second) if mode_number == 1 else (second, first)
    chosen = train if split == "train" else test
    if not chosen:
        where = f"split file {split_file}" if split_file else "the split"
        side = "train" if split == "train" else "index/query"
        raise CbirError(f"--generalise {mode_number} leaves no {side} class among the {len(classes)} classes of "
                        f"the data ({where}); check that the file names classes of this data set")
    return chosen


def restrict_samples(samples: list, split: str, mode: int, *, seed: int = 0, split_file: str | None = None) -> list:
    """The samples (anything with ``.class_name``) whose class ``split`` uses under ``--generalise mode``."""
    wanted = set(classes_for(split, [s.class_name for s in samples], mode, seed=seed, split_file=split_file))
    return [s for s in samples if s.class_name in wanted]


def add_generalise_args(parser) -> None:
    """``--generalise``, ``--split_file``, ``--split_seed``: the same flags on every command that splits classes."""
    group = parser.add_argument_group("generalisation")
    group.add_argument("--generalise", type=int, default=0, choices=list(GENERALISE_MODES),
                       help="0: all classes; 1 / 2: train on one half of the classes, index and query the other "
                            "(2 swaps the halves); 3: all classes, labels replaced by k-means clusters")
    group.add_argument("--split_file", default=None,
                       help="with --generalise 1/2: a file listing the train classes of --generalise 1, one per "
                            "line; every other class is index/query (default: a seeded split balanced per project)")
    group.add_argument("--split_seed", type=int, default=0, help="seed of the class halves (default 0)")
