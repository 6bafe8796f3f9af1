"""Retrieval evaluation: the thesis's protocols and scores, plus the measures retrieval papers report.

Every query is searched through a caller-given ``search`` function, so this module knows nothing of models,
Redis or FAISS and is tested with known vectors. A query's results are scored at three levels:

* ``class``: the result has the query's class;
* ``project``: a class hit, or the result's class belongs to the query's project;
* ``similar``: a project hit, or the two projects are declared similar.

For each level: ``top1`` (the first result is a hit), ``top5`` (a hit among the first ``k``) and ``maj`` (more
than ``k / 2`` of the first ``k`` are hits: at least 3 of 5). Beyond those nine numbers: ``mmv5`` (the most common
class of the first five is the query's, ties going to the best-ranked), ``precision_at_k``, ``map_at_k`` and, when
the database's class sizes are known and the search returned enough results, ``map_at_r``.

Protocols (``measure``), as the thesis named them: ``all``, ``random`` (class-balanced sample, seeded),
``weighted`` (macro average over classes), ``remove`` (without the dominant classes), ``stat`` (``random``
repeated, mean and standard deviation) and ``separated`` (one row per class).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "MEASURES",
    "LEVELS",
    "HEADLINE_KEYS",
    "project_of",
    "LevelMaps",
    "dominant_classes",
    "resolve_removed_classes",
    "select_queries",
    "results_to_request",
    "evaluate",
    "EvalReport",
    "write_excel_sheet",
    "plot_confusion_matrices",
]

MEASURES = ("all", "random", "weighted", "remove", "stat", "separated")
LEVELS = ("class", "project", "similar")
_KINDS = ("top1", "top5", "maj")
#: The nine headline numbers, in table order (rows: level; columns: top-1, top-k, majority).
HEADLINE_KEYS = tuple(f"{level}_{kind}" for level in LEVELS for kind in _KINDS)
_EXTRA_KEYS = ("mmv5", "precision_at_k", "map_at_k")
_CLUSTER_KEYS = tuple(f"cluster_{kind}" for kind in _KINDS)
_TIMING_KEYS = ("total", "model", "transfer", "search", "per_query")
_CI_KEYS = ("class_top1", "class_top5", "class_maj")

SearchFn = Callable[[list[str]], tuple[Sequence[Sequence[str]], Sequence[Sequence[str]], dict]]


# --------------------------------------------------------------------------------------------- levels

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
        2-tuples.
        """
        projects: dict[str, str] = {}
        if projects_csv is not None:
            for lineno, row in _read_rows(projects_csv, "projects CSV"):
                if lineno == 1 and [f.lower() for f in row] == ["class", "project"]:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{projects_csv}:{lineno}: expected 'class,project', got {','.join(row)!r}")
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
                raise ValueError(f"{where}: expected at least two different projects 'projA,projB', got {row!r}")
            similar.update(frozenset((a, b)) for i, a in enumerate(row) for b in row[i + 1:] if a != b)
        return cls(projects=projects, similar=similar)


def _read_rows(path: str | os.PathLike, what: str) -> list[tuple[int, list[str]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            fields = [f.strip() for f in row]
            fields = [f for f in fields if f]
            if not fields or fields[0].startswith("#"):
                continue
            rows.append((lineno, fields))
    return rows


# ------------------------------------------------------------------------------------------ selection

def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")


def dominant_classes(query_classes: Sequence[str]) -> list[str]:
    """The default classes ``remove`` drops: those holding more than twice the median class size.

    When no class is that large, the classes of the largest size (three equally large classes are equally dominant:
    dropping one of them by name would be arbitrary); when every class has that size, the first name, so that
    ``remove`` always differs from ``all``.
    """
    counts = Counter(str(c) for c in query_classes)
    if not counts:
        return []
    median = float(np.median(list(counts.values())))
    dominant = sorted(c for c, n in counts.items() if n > 2 * median)
    if not dominant:
        largest = max(counts.values())
        dominant = sorted(c for c, n in counts.items() if n == largest)
        if len(dominant) == len(counts):
            dominant = dominant[:1]
    return dominant


def resolve_removed_classes(query_classes: Sequence[str], remove_classes: Iterable[str] | None) -> list[str]:
    """The classes ``remove`` drops: ``remove_classes`` (those present among the queries), else the dominant ones."""
    if remove_classes is None:
        return dominant_classes(query_classes)
    wanted = [str(c) for c in remove_classes]
    present = set(str(c) for c in query_classes)
    unknown = [c for c in wanted if c not in present]
    if wanted and len(unknown) == len(wanted):
        raise ValueError(
            f"none of the classes to remove is among the queries: {', '.join(unknown)} "
            f"(query classes: {', '.join(sorted(present))})"
        )
    if unknown:
        warnings.warn(f"classes to remove not among the queries, ignored: {', '.join(unknown)}", stacklevel=3)
    return sorted(dict.fromkeys(c for c in wanted if c in present))


def _restrict(classes: list[str], project_name: str | None, class_name: str | None, maps: LevelMaps) -> list[int]:
    indices = list(range(len(classes)))
    if project_name is not None:
        indices = [i for i in indices if maps.project(classes[i]) == project_name]
        if not indices:
            known = sorted({maps.project(c) for c in classes})
            raise ValueError(f"no query of project {project_name!r} (projects: {', '.join(known)})")
    if class_name is not None:
        indices = [i for i in indices if classes[i] == class_name]
        if not indices:
            raise ValueError(f"no query of class {class_name!r} (classes: {', '.join(sorted(set(classes)))})")
    return indices


def _balanced_sample(classes: list[str], indices: list[int], seed: int, max_queries: int) -> list[int]:
    """One unused random query per class per round, whole rounds, until more than ``max_queries`` are drawn."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i in indices:
        by_class.setdefault(classes[i], []).append(i)
    # Shuffling each class once and taking one element per round is the same draw as picking an unused image at
    # random every round; sorting the classes makes the draw independent of the order the queries came in.
    order = {c: rng.permutation(by_class[c]) for c in sorted(by_class)}
    chosen: list[int] = []
    rank = 0
    while len(chosen) <= max_queries:
        picked = [int(order[c][rank]) for c in order if len(order[c]) > rank]
        if not picked:
            break
        chosen.extend(picked)
        rank += 1
    return sorted(chosen)


def select_queries(
    query_classes: Sequence[str],
    measure: str,
    *,
    seed: int = 0,
    max_queries: int = 1000,
    remove_classes: Iterable[str] | None = None,
    project_name: str | None = None,
    class_name: str | None = None,
    maps: LevelMaps | None = None,
) -> list[int]:
    """Indices (ascending) of the queries a protocol uses.

    ``project_name`` / ``class_name`` restrict first. ``all``, ``weighted``, ``separated``: every query.
    ``random`` (and one repetition of ``stat``): class-balanced rounds, one unused random query per class per
    round, until just over ``max_queries`` (or the classes run out), seeded. ``remove``: every query except
    those of ``remove_classes`` (default: :func:`dominant_classes` of all the queries).
    """
    _check_measure(measure)
    if max_queries < 1:
        raise ValueError(f"max_queries must be at least 1, got {max_queries}")
    maps = maps if maps is not None else LevelMaps()
    classes = [str(c) for c in query_classes]
    indices = _restrict(classes, project_name, class_name, maps)
    if measure in ("random", "stat"):
        return _balanced_sample(classes, indices, seed, max_queries)
    if measure == "remove":
        dropped = set(resolve_removed_classes(classes, remove_classes))
        kept = [i for i in indices if classes[i] not in dropped]
        if not kept:
            raise ValueError(f"removing {', '.join(sorted(dropped))} leaves no query to evaluate")
        return kept
    return indices


def results_to_request(k: int = 5, *, exclude_same: str | None = None,
                       db_class_counts: dict[str, int] | None = None, margin: int | None = None) -> int:
    """How many results to ask the search for, so that ``k`` remain after the exclusions.

    One more for the query itself; with ``exclude_same`` a wider margin (a slide can give many tiles — the report
    notes any query left with fewer than ``k``); with ``db_class_counts`` enough for MAP@R.
    """
    if margin is None:
        margin = max(4 * k, 50) if exclude_same else 1
    wanted = k + margin
    if db_class_counts:
        wanted = max(wanted, max(int(n) for n in db_class_counts.values()) + 1)
    return wanted


# ---------------------------------------------------------------------------------------------- search

def _norm_path(path: str) -> str:
    return os.path.normcase(os.path.abspath(os.fspath(path)))


class _PathMap:
    """path -> value, found by the exact string or by the normalised absolute path."""

    def __init__(self, mapping: dict[str, Any]):
        self.exact = {str(p): v for p, v in mapping.items()}
        self.normalised: dict[str, Any] | None = None

    def get(self, path: str, default: Any = None) -> Any:
        if path in self.exact:
            return self.exact[path]
        if self.normalised is None:
            self.normalised = {_norm_path(p): v for p, v in self.exact.items()}
        return self.normalised.get(_norm_path(path), default)


@dataclass
class _Outcome:
    results: list[tuple[str, str]]      # (path, class) after the exclusions, in rank order
    self_found: bool                    # the query itself was among the results (it is in the database)
    excluded: int                       # results dropped by exclude_same


def _group_key(path: str, pattern: re.Pattern | None) -> str | None:
    if pattern is None:
        return None
    match = pattern.search(os.path.basename(str(path)))
    return match.group(1) if match else None


def _filter_results(query_path: str, paths: Sequence[str], classes: Sequence[str],
                    pattern: re.Pattern | None) -> _Outcome:
    query_base = os.path.basename(query_path)
    query_norm: str | None = None
    query_group = _group_key(query_path, pattern)
    kept: list[tuple[str, str]] = []
    self_found = False
    excluded = 0
    for path, cls in zip(paths, classes):
        path = str(path)
        if path == query_path:
            self_found = True
            continue
        if path.endswith(query_base):
            query_norm = query_norm or _norm_path(query_path)
            if _norm_path(path) == query_norm:
                self_found = True
                continue
        if query_group is not None and _group_key(path, pattern) == query_group:
            excluded += 1
            continue
        kept.append((path, str(cls)))
    return _Outcome(kept, self_found, excluded)


def _run_search(search: SearchFn, query_paths: list[str], indices: list[int], batch_size: int,
                pattern: re.Pattern | None, progress: Callable[[int], None] | None
                ) -> tuple[dict[int, _Outcome], dict[str, float]]:
    outcomes: dict[int, _Outcome] = {}
    timings = {"total": 0.0, "model": 0.0, "transfer": 0.0, "search": 0.0}
    start = time.perf_counter()
    for first in range(0, len(indices), batch_size):
        batch = indices[first:first + batch_size]
        paths = [query_paths[i] for i in batch]
        answer = search(paths)
        try:
            result_paths, result_classes, batch_timings = answer
        except (TypeError, ValueError):
            raise TypeError("search(paths) must return (result_paths, result_classes, timings)") from None
        if len(result_paths) != len(batch) or len(result_classes) != len(batch):
            raise ValueError(
                f"search returned {len(result_paths)} path lists and {len(result_classes)} class lists "
                f"for {len(batch)} queries"
            )
        for key in ("model", "transfer", "search"):
            timings[key] += float((batch_timings or {}).get(key, 0.0))
        for i, rpaths, rclasses in zip(batch, result_paths, result_classes):
            if len(rpaths) != len(rclasses):
                raise ValueError(
                    f"search returned {len(rpaths)} paths but {len(rclasses)} classes for {query_paths[i]}")
            outcomes[i] = _filter_results(query_paths[i], rpaths, rclasses, pattern)
        if progress is not None:
            progress(len(batch))
    timings["total"] = time.perf_counter() - start
    return outcomes, timings


def _with_per_query(timings: dict[str, float], n_searched: int) -> dict[str, float]:
    out = {key: float(timings.get(key, 0.0)) for key in ("total", "model", "transfer", "search")}
    # The thesis divided by the size of the whole query folder; only the queries actually searched count.
    out["per_query"] = out["total"] / n_searched if n_searched else 0.0
    return out


# --------------------------------------------------------------------------------------------- scoring

def _majority_class(classes: Sequence[str]) -> str | None:
    """The most common class; ties go to the tied class whose best rank comes first."""
    if not classes:
        return None
    counts = Counter(classes)
    best = max(counts.values())
    return next(c for c in classes if counts[c] == best)


def _level_scores(hits: list[bool], k: int) -> tuple[float, float, float]:
    if not hits:
        return 0.0, 0.0, 0.0
    return float(hits[0]), float(any(hits)), float(sum(hits) > k / 2)


def _average_precision(hits: list[bool], denominator: float) -> float:
    """Sum of the precision at each hit's rank, over ``denominator``."""
    if denominator <= 0:
        return 0.0
    total, found = 0.0, 0
    for rank, hit in enumerate(hits, start=1):
        if hit:
            found += 1
            total += found / rank
    return total / denominator


class _Scorer:
    """Per-query numbers, one dict per query."""

    def __init__(self, k: int, maps: LevelMaps, cluster_labels: dict[str, Any] | None,
                 db_class_counts: dict[str, int] | None, use_map_at_r: bool):
        self.k = k
        self.maps = maps
        self.project_cache: dict[str, str] = {}
        self.similar_cache: dict[tuple[str, str], bool] = {}
        self.clusters = _PathMap(cluster_labels) if cluster_labels is not None else None
        self.db_class_counts = {str(c): int(n) for c, n in (db_class_counts or {}).items()}
        self.use_map_at_r = use_map_at_r
        self.missing_clusters = 0
        self.short_for_r = 0
        self.max_r_needed = 0

    def project(self, cls: str) -> str:
        if cls not in self.project_cache:
            self.project_cache[cls] = self.maps.project(cls)
        return self.project_cache[cls]

    def similar(self, p1: str, p2: str) -> bool:
        key = (p1, p2)
        if key not in self.similar_cache:
            self.similar_cache[key] = self.maps.is_similar(p1, p2)
        return self.similar_cache[key]

    def score(self, query_path: str, query_class: str, outcome: _Outcome) -> dict[str, Any]:
        # Plain lists: per query there are only k results, where numpy's call overhead would dominate.
        k = self.k
        top = outcome.results[:k]
        classes = [c for _, c in top]
        query_project = self.project(query_class)
        result_projects = [self.project(c) for c in classes]
        class_hits = [c == query_class for c in classes]
        project_hits = [h or p == query_project for h, p in zip(class_hits, result_projects)]
        similar_hits = [h or self.similar(query_project, p) for h, p in zip(project_hits, result_projects)]
        row: dict[str, Any] = {}
        for level, hits in zip(LEVELS, (class_hits, project_hits, similar_hits)):
            row[f"{level}_top1"], row[f"{level}_top5"], row[f"{level}_maj"] = _level_scores(hits, k)
        majority = _majority_class(classes[:5])
        row["mmv5"] = float(majority == query_class)
        row["precision_at_k"] = sum(class_hits) / k
        row["map_at_k"] = _average_precision(class_hits, float(sum(class_hits)))
        if self.use_map_at_r:
            row["map_at_r"] = self._map_at_r(query_class, outcome)
        if self.clusters is not None:
            query_cluster = self.clusters.get(query_path, _MISSING)
            result_clusters = [self.clusters.get(p, _MISSING) for p, _ in top]
            self.missing_clusters += (query_cluster is _MISSING) + sum(c is _MISSING for c in result_clusters)
            cluster_hits = [query_cluster is not _MISSING and c == query_cluster for c in result_clusters]
            row["cluster_top1"], row["cluster_top5"], row["cluster_maj"] = _level_scores(cluster_hits, k)
        row["top1_class"] = classes[0] if classes else None
        row["majority_class"] = majority
        row["short"] = len(top) < k
        return row

    def _map_at_r(self, query_class: str, outcome: _Outcome) -> float:
        # R = the database items of the query's class, less the query itself when it is one of them.
        r = self.db_class_counts.get(query_class, 0) - int(outcome.self_found)
        if r <= 0:
            return math.nan
        self.max_r_needed = max(self.max_r_needed, r)
        if len(outcome.results) < r:
            self.short_for_r += 1
            return math.nan
        return _average_precision([c == query_class for _, c in outcome.results[:r]], float(r))


_MISSING = object()


def _aggregate(table: pd.DataFrame, keys: Sequence[str], macro: bool) -> dict[str, float]:
    if table.empty:
        return {key: math.nan for key in keys}
    if macro:
        values = table.groupby("class", sort=True)[list(keys)].mean().mean()
    else:
        values = table[list(keys)].mean()
    return {key: float(values[key]) for key in keys}


def _bootstrap(table: pd.DataFrame, macro: bool, resamples: int, seed: int, level: float
               ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for the class-level numbers; stratified by class for the macro average.

    Each number is a share of 0/1 hits, and drawing n queries with replacement from a group holding h hits gives
    Binomial(n, h / n) hits: drawing that count is the same resampling, at a cost independent of n.
    """
    rng = np.random.default_rng(seed)
    groups = table.groupby("class", sort=True) if macro else [(None, table)]
    tail = (1.0 - level) / 2 * 100
    intervals = {}
    for key in _CI_KEYS:
        sizes = np.array([len(g) for _, g in groups])
        shares = np.array([float(g[key].mean()) for _, g in groups])
        draws = rng.binomial(sizes, shares, size=(resamples, len(sizes))) / sizes
        values = draws.mean(axis=1)
        intervals[key] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return intervals


# ---------------------------------------------------------------------------------------------- report

@dataclass
class EvalReport:
    """Everything one evaluation measured; ``to_dict`` for JSON, ``format`` for people."""

    measure: str
    n_queries: int
    scores: dict[str, float]
    std: dict[str, float] | None = None
    ci: dict[str, tuple[float, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    per_class: pd.DataFrame | None = None
    dropped_classes: list[str] = field(default_factory=list)
    per_query: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    k: int = 5
    n_searched: int = 0
    cluster_divergence: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        per_class = None
        if self.per_class is not None:
            per_class = {str(cls): {str(col): _plain(v) for col, v in row.items()}
                         for cls, row in self.per_class.to_dict(orient="index").items()}
        return {
            "measure": self.measure,
            "n_queries": int(self.n_queries),
            "n_searched": int(self.n_searched),
            "k": int(self.k),
            "scores": {key: _plain(v) for key, v in self.scores.items()},
            "std": None if self.std is None else {key: _plain(v) for key, v in self.std.items()},
            "ci": None if self.ci is None else {key: [_plain(lo), _plain(hi)] for key, (lo, hi) in self.ci.items()},
            "timings": {key: _plain(v) for key, v in self.timings.items()},
            "per_class": per_class,
            "dropped_classes": list(self.dropped_classes),
            "cluster_divergence": None if self.cluster_divergence is None
            else {str(c): _plain(v) for c, v in self.cluster_divergence.items()},
            "notes": list(self.notes),
            "settings": {key: _plain(v) for key, v in self.settings.items()},
            "per_query": [
                {"query_path": p, "query_class": c, "top1_class": t, "majority_class": m}
                for p, c, t, m in self.per_query
            ],
        }

    def _number(self, key: str) -> str:
        value = self.scores.get(key, math.nan)
        text = "  n/a" if value is None or math.isnan(value) else f"{value:.3f}"
        if self.std is not None and key in self.std:
            text += f" ± {self.std[key]:.3f}"
        return text

    def format(self) -> str:
        k = self.k
        lines = [f"measure {self.measure}: {self.n_queries} queries, first {k} results"
                 + (f" (mean ± std over {self.settings.get('repeats')} samples)" if self.std is not None else "")]
        columns = ("top-1", f"top-{k}", "maj")
        cells = [[self._number(f"{level}_{kind}") for kind in _KINDS] for level in LEVELS]
        width = max(len(c) for row in cells for c in row + list(columns))
        lines.append(" " * 9 + "".join(f"{c:>{width + 2}}" for c in columns))
        for level, row in zip(LEVELS, cells):
            lines.append(f"{level:<9}" + "".join(f"{c:>{width + 2}}" for c in row))
        extras = [("mMV@5", "mmv5"), (f"precision@{k}", "precision_at_k"), (f"mAP@{k}", "map_at_k"),
                  ("MAP@R", "map_at_r")]
        lines.append("  ".join(f"{label} {self._number(key).strip()}" for label, key in extras if key in self.scores))
        if "cluster_top1" in self.scores:
            lines.append("cluster  " + "  ".join(f"{col} {self._number(f'cluster_{kind}').strip()}"
                                                 for col, kind in zip(columns, _KINDS)))
        if self.ci:
            level = self.settings.get("ci_level", 0.95)
            lines.append(f"{level:.0%} bootstrap CI ({self.settings.get('bootstrap')} resamples): " + "  ".join(
                f"{key} [{lo:.3f}, {hi:.3f}]" for key, (lo, hi) in self.ci.items()))
        t = self.timings
        if t:
            lines.append(
                f"time: total {t.get('total', 0):.2f} s, model {t.get('model', 0):.2f} s, "
                f"transfer {t.get('transfer', 0):.2f} s, search {t.get('search', 0):.2f} s, "
                f"per query {1000 * t.get('per_query', 0):.2f} ms ({self.n_searched} searched)")
        if self.dropped_classes:
            rule = self.settings.get("removed_by")
            lines.append("removed classes" + (f" ({rule})" if rule else "") + ": " + ", ".join(self.dropped_classes))
        if self.per_class is not None:
            lines.append("per class:")
            lines.append(self.per_class.to_string(float_format=lambda v: f"{v:.3f}"))
        if self.cluster_divergence:
            lines.append("share of queries where class and cluster top-1 disagree: " + ", ".join(
                f"{c} {v:.3f}" for c, v in self.cluster_divergence.items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    __str__ = format


def _plain(value: Any) -> Any:
    """A JSON-able scalar: numpy numbers to Python, NaN to None."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# -------------------------------------------------------------------------------------------- evaluate

def evaluate(
    query_paths: Sequence[str],
    query_classes: Sequence[str],
    search: SearchFn,
    *,
    measure: str = "all",
    k: int = 5,
    seed: int = 0,
    repeats: int = 10,
    maps: LevelMaps | None = None,
    remove_classes: Iterable[str] | None = None,
    project_name: str | None = None,
    class_name: str | None = None,
    exclude_same: str | None = None,
    batch_size: int = 64,
    bootstrap: int = 0,
    cluster_labels: dict[str, Any] | None = None,
    db_class_counts: dict[str, int] | None = None,
    max_queries: int = 1000,
    ci_level: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Search the queries a protocol selects and score their results.

    ``search(paths) -> (result_paths, result_classes, timings)`` answers a batch: per query, the result paths and
    classes best first, and the seconds the batch spent in ``"model"``, ``"transfer"`` and ``"search"``. Ask it
    for more than ``k`` results (see :func:`results_to_request`): a result that is the query itself is dropped,
    and with ``exclude_same`` (a regex with one group, searched in the file name) so is every result whose group
    equals the query's (same slide or patient); the first ``k`` left are scored.

    ``db_class_counts`` (class -> items in the database) enables MAP@R; it needs every query to get at least R
    results after the exclusions and is skipped with ``exclude_same`` (R is then unknown). ``cluster_labels``
    (path -> cluster) adds cluster-level numbers and the per-class share of queries whose class and cluster top-1
    hits disagree. ``progress`` is called with the number of queries each searched batch held.
    """
    _check_measure(measure)
    query_paths = [str(p) for p in query_paths]
    query_classes = [str(c) for c in query_classes]
    if len(query_paths) != len(query_classes):
        raise ValueError(f"{len(query_paths)} query paths but {len(query_classes)} query classes")
    if not query_paths:
        raise ValueError("no query to evaluate")
    for name, value, least in (("k", k, 1), ("batch_size", batch_size, 1), ("repeats", repeats, 1),
                               ("bootstrap", bootstrap, 0)):
        if int(value) != value or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must lie between 0 and 1, got {ci_level}")
    pattern = None
    if exclude_same is not None:
        try:
            pattern = re.compile(exclude_same)
        except re.error as error:
            raise ValueError(f"exclude_same is not a valid regular expression ({error}): {exclude_same!r}") from None
        if pattern.groups < 1:
            raise ValueError(f"exclude_same needs a group to compare, as in r'^(slide\\d+)_': got {exclude_same!r}")
    maps = maps if maps is not None else LevelMaps()
    notes: list[str] = []

    dropped: list[str] = []
    if measure == "remove":
        dropped = resolve_removed_classes(query_classes, remove_classes)
    select = dict(max_queries=max_queries, remove_classes=dropped, project_name=project_name,
                  class_name=class_name, maps=maps)
    if measure == "stat":
        samples = [select_queries(query_classes, "random", seed=seed + r, **select) for r in range(repeats)]
        to_search = sorted(set().union(*samples))
    else:
        selected = select_queries(query_classes, measure, seed=seed, **select)
        to_search = selected

    # Search. `separated` searches class by class, so that each row has its own timings.
    group_timings: dict[str, dict[str, float]] = {}
    if measure == "separated":
        outcomes: dict[int, _Outcome] = {}
        totals = {"total": 0.0, "model": 0.0, "transfer": 0.0, "search": 0.0}
        for cls in sorted({query_classes[i] for i in to_search}):
            members = [i for i in to_search if query_classes[i] == cls]
            found, spent = _run_search(search, query_paths, members, batch_size, pattern, progress)
            outcomes.update(found)
            group_timings[cls] = _with_per_query(spent, len(members))
            for key in totals:
                totals[key] += spent[key]
        timings = _with_per_query(totals, len(to_search))
    else:
        outcomes, spent = _run_search(search, query_paths, to_search, batch_size, pattern, progress)
        timings = _with_per_query(spent, len(to_search))

    # Score every searched query once.
    use_map_at_r = db_class_counts is not None and pattern is None
    if db_class_counts is not None and pattern is not None:
        notes.append("MAP@R skipped: with exclude_same the number R of eligible database items is unknown")
    scorer = _Scorer(k, maps, cluster_labels, db_class_counts, use_map_at_r)
    rows = []
    per_query = []
    for i in to_search:
        row = scorer.score(query_paths[i], query_classes[i], outcomes[i])
        # Kept out of the table: a string column would turn a missing class (None) into NaN.
        per_query.append((query_paths[i], query_classes[i], row.pop("top1_class"), row.pop("majority_class")))
        row["index"] = i
        row["class"] = query_classes[i]
        rows.append(row)
    table = pd.DataFrame(rows).set_index("index")

    keys = list(HEADLINE_KEYS) + list(_EXTRA_KEYS)
    if use_map_at_r:
        if scorer.short_for_r:
            notes.append(f"MAP@R skipped: {scorer.short_for_r} queries got fewer results than R "
                         f"(up to {scorer.max_r_needed}); ask the search for at least {scorer.max_r_needed + 1}")
        elif table["map_at_r"].isna().all():
            notes.append("MAP@R skipped: no query's class has other items in the database counts given")
        else:
            keys.append("map_at_r")
    if cluster_labels is not None:
        keys += list(_CLUSTER_KEYS)
        if scorer.missing_clusters:
            notes.append(f"{scorer.missing_clusters} query or result paths had no cluster label "
                         f"(counted as cluster misses)")
    n_short = int(table["short"].sum())
    if n_short:
        notes.append(f"{n_short} queries had fewer than {k} results after the exclusions (missing ranks count as "
                     f"misses); ask the search for more results")
    if pattern is not None:
        unmatched = sum(_group_key(query_paths[i], pattern) is None for i in to_search)
        if unmatched:
            notes.append(f"exclude_same: {unmatched} query file names do not match {exclude_same!r}; "
                         f"nothing was excluded for them")
        n_excluded = sum(outcomes[i].excluded for i in to_search)
        notes.append(f"exclude_same dropped {n_excluded} results sharing the query's group")

    std = None
    ci = None
    per_class = None
    if measure == "stat":
        per_sample = [_aggregate(table.loc[sample], keys, macro=False) for sample in samples]
        scores = {key: float(np.mean([s[key] for s in per_sample])) for key in keys}
        std = {key: float(np.std([s[key] for s in per_sample], ddof=1)) if repeats > 1 else 0.0 for key in keys}
        n_queries = len(samples[0])
        if bootstrap:
            notes.append("no bootstrap interval for stat: its spread is the std over the samples")
    else:
        scores = _aggregate(table, keys, macro=(measure == "weighted"))
        n_queries = len(selected)
        if bootstrap:
            ci = _bootstrap(table, measure == "weighted", int(bootstrap), seed, ci_level)

    if measure == "separated":
        records = {}
        for cls, group in table.groupby("class", sort=True):
            record = _aggregate(group, keys, macro=False)
            record["n_queries"] = len(group)
            record.update({f"time_{key}": value for key, value in group_timings[cls].items()})
            records[cls] = record
        per_class = pd.DataFrame.from_dict(records, orient="index")
        per_class.index.name = "class"

    cluster_divergence = None
    if cluster_labels is not None:
        disagree = (table["class_top1"] != table["cluster_top1"]).astype(float)
        cluster_divergence = {str(c): float(v) for c, v in disagree.groupby(table["class"], sort=True).mean().items()}
        if per_class is not None:
            per_class["cluster_divergence"] = pd.Series(cluster_divergence)

    settings = {"k": k, "seed": seed, "exclude_same": exclude_same, "bootstrap": int(bootstrap),
                "ci_level": ci_level, "project_name": project_name, "class_name": class_name}
    if measure in ("random", "stat"):
        settings["max_queries"] = max_queries
    if measure == "remove":
        settings["removed_by"] = ("given" if remove_classes is not None else
                                  "default rule: classes above twice the median class size, else those of the largest size")
    if measure == "stat":
        settings["repeats"] = repeats
    return EvalReport(
        measure=measure, n_queries=n_queries, scores=scores, std=std, ci=ci, timings=timings,
        per_class=per_class, dropped_classes=dropped, per_query=per_query, k=k, n_searched=len(to_search),
        cluster_divergence=cluster_divergence, notes=notes, settings=settings,
    )


# ----------------------------------------------------------------------------------------------- files

_BAD_SHEET_CHARS = set("[]:*?/\\")


def write_excel_sheet(df: pd.DataFrame, excel_path: str | os.PathLike, sheet_name: str) -> None:
    """Write ``df`` as sheet ``sheet_name`` of ``excel_path``.

    Creates the workbook when missing; otherwise adds the sheet, replacing one of the same name in place, and
    keeps every other sheet. The workbook is rewritten through a temporary file, so a failure leaves it as it was.
    """
    if not isinstance(sheet_name, str) or not sheet_name or len(sheet_name) > 31 \
            or _BAD_SHEET_CHARS & set(sheet_name) or sheet_name[0] == "'" or sheet_name[-1] == "'":
        raise ValueError(f"an Excel sheet name has 1 to 31 characters, none of []:*?/\\ and no quote at either "
                         f"end; got {sheet_name!r}")
    path = Path(excel_path)
    if path.suffix.lower() != ".xlsx":
        raise ValueError(f"the Excel file must end in .xlsx, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xlsx")
    try:
        if path.exists():
            shutil.copyfile(path, temporary)
            with pd.ExcelWriter(temporary, engine="openpyxl", mode="a", if_sheet_exists="replace") as writer:
                df.to_excel(writer, sheet_name=sheet_name)
        else:
            with pd.ExcelWriter(temporary, engine="openpyxl", mode="w") as writer:
                df.to_excel(writer, sheet_name=sheet_name)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def plot_confusion_matrices(per_query: Iterable[Sequence[Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Draw ``top1.png`` (query class vs first result's class) and ``majority.png`` (vs the most common class of
    the first five) into ``out_dir``; cells are counts, coloured by their share of the row."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    entries = [tuple(entry) for entry in per_query]
    if not entries:
        raise ValueError("no query outcome to draw a confusion matrix from")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for column, name, xlabel in ((2, "top1", "class of the first result"),
                                 (3, "majority", "most common class of the first five")):
        truth = [str(e[1]) for e in entries]
        predicted = ["(none)" if e[column] is None else str(e[column]) for e in entries]
        labels = sorted(set(truth) | set(predicted) - {"(none)"})
        if "(none)" in predicted:
            labels.append("(none)")
        position = {label: i for i, label in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=int)
        for t, p in zip(truth, predicted):
            counts[position[t], position[p]] += 1
        row_sums = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

        n = len(labels)
        side = min(max(6.0, 0.32 * n + 3.0), 40.0)
        font = max(4.0, min(10.0, 220.0 / max(n, 1)))
        figure = Figure(figsize=(side + 1.5, side))
        axes = figure.add_subplot()
        image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the query class")
        axes.set_xticks(range(n), labels, rotation=90, fontsize=font)
        axes.set_yticks(range(n), labels, fontsize=font)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("query class")
        accuracy = sum(counts[position[c], position[c]] for c in set(truth)) / len(entries)
        axes.set_title(f"{name}: {len(entries)} queries, accuracy {accuracy:.3f}")
        if n <= 40:
            for r in range(n):
                for c in range(n):
                    if counts[r, c]:
                        axes.text(c, r, str(counts[r, c]), ha="center", va="center", fontsize=font,
                                  color="white" if shares[r, c] > 0.5 else "black")
        target = out_dir / f"{name}.png"
        figure.savefig(target, dpi=100, bbox_inches="tight")
        written.append(target)
    return written
