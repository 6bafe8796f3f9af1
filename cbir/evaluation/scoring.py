"""Per-query numbers: how well each query's first ``k`` results match it, at every level.

A query's results are scored at three levels:

* ``class``: the result has the query's class;
* ``project``: a class hit, or the result's class belongs to the query's project;
* ``similar``: a project hit, or the two projects are declared similar.

For each level: ``top1`` (the first result is a hit), ``top5`` (a hit among the first ``k``) and ``maj`` (more
than ``k / 2`` of the first ``k`` are hits: at least 3 of 5). Beyond those nine numbers: ``mmv5`` (the most common
class of the first five is the query's, ties going to the best-ranked), ``precision_at_k``, ``map_at_k`` and, when
the database's class sizes are known, ``map_at_r``; with cluster labels, ``cluster_top1/top5/maj``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import pandas as pd

from cbir.evaluation.searching import Outcome
from cbir.labels import LevelMaps, PathLookup

LEVELS = ("class", "project", "similar")
KINDS = ("top1", "top5", "maj")
#: The nine headline numbers, in table order (rows: level; columns: top-1, top-k, majority).
HEADLINE_KEYS = tuple(f"{level}_{kind}" for level in LEVELS for kind in KINDS)
EXTRA_KEYS = ("mmv5", "precision_at_k", "map_at_k")
CLUSTER_KEYS = tuple(f"cluster_{kind}" for kind in KINDS)
_MISSING = object()


def majority_class(classes: Sequence[str]) -> str | None:
    """The most common class; ties go to the tied class whose best rank comes first."""
    if not classes:
        return None
    counts = Counter(classes)
    best = max(counts.values())
    return next(c for c in classes if counts[c] == best)


def level_scores(hits: list[bool], k: int) -> tuple[float, float, float]:
    """(top-1, top-k, majority) of one query's hits at one level."""
    if not hits:
        return 0.0, 0.0, 0.0
    return float(hits[0]), float(any(hits)), float(sum(hits) > k / 2)


def average_precision(hits: list[bool], denominator: float) -> float:
    """Sum of the precision at each hit's rank, over ``denominator``."""
    if denominator <= 0:
        return 0.0
    total, found = 0.0, 0
    for rank, hit in enumerate(hits, start=1):
        if hit:
            found += 1
            total += found / rank
    return total / denominator


class Scorer:
    """One row of numbers per query; counts what could not be scored, for the report's notes."""

    def __init__(self, k: int, maps: LevelMaps, *, cluster_labels: dict[str, Any] | None = None,
                 db_class_counts: dict[str, int] | None = None):
        self.k = k
        self.maps = maps
        self.project_cache: dict[str, str] = {}
        self.similar_cache: dict[tuple[str, str], bool] = {}
        self.clusters = PathLookup(cluster_labels) if cluster_labels is not None else None
        self.db_class_counts = None if db_class_counts is None else {
            str(c): int(n) for c, n in db_class_counts.items()}
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

    def score(self, query_path: str, query_class: str, outcome: Outcome) -> dict[str, Any]:
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
            row[f"{level}_top1"], row[f"{level}_top5"], row[f"{level}_maj"] = level_scores(hits, k)
        majority = majority_class(classes[:5])
        row["mmv5"] = float(majority == query_class)
        row["precision_at_k"] = sum(class_hits) / k
        row["map_at_k"] = average_precision(class_hits, float(sum(class_hits)))
        if self.db_class_counts is not None:
            row["map_at_r"] = self._map_at_r(query_class, outcome)
        if self.clusters is not None:
            row["cluster_top1"], row["cluster_top5"], row["cluster_maj"] = self._cluster_scores(query_path, top)
        row["top1_class"] = classes[0] if classes else None
        row["majority_class"] = majority
        row["short"] = len(top) < k
        return row

    def _map_at_r(self, query_class: str, outcome: Outcome) -> float:
        # R = the database items of the query's class, less the query itself when it is one of them.
        r = self.db_class_counts.get(query_class, 0) - int(outcome.self_found)
        if r <= 0:
            return math.nan
        self.max_r_needed = max(self.max_r_needed, r)
        if len(outcome.results) < r:
            self.short_for_r += 1
            return math.nan
        return average_precision([c == query_class for _, c in outcome.results[:r]], float(r))

    def _cluster_scores(self, query_path: str, top: list[tuple[str, str]]) -> tuple[float, float, float]:
        query_cluster = self.clusters.get(query_path, _MISSING)
        result_clusters = [self.clusters.get(p, _MISSING) for p, _ in top]
        self.missing_clusters += (query_cluster is _MISSING) + sum(c is _MISSING for c in result_clusters)
        hits = [query_cluster is not _MISSING and c == query_cluster for c in result_clusters]
        return level_scores(hits, self.k)


def score_queries(scorer: Scorer, query_paths: list[str], query_classes: list[str], indices: list[int],
                  outcomes: dict[int, Outcome]) -> tuple[pd.DataFrame, list[tuple[str, str, str | None, str | None]]]:
    """(one row per query, indexed by query number; per query (path, class, top-1 class, majority class))."""
    rows = []
    per_query = []
    for i in indices:
        row = scorer.score(query_paths[i], query_classes[i], outcomes[i])
        # Kept out of the table: a string column would turn a missing class (None) into NaN.
        per_query.append((query_paths[i], query_classes[i], row.pop("top1_class"), row.pop("majority_class")))
        row["index"] = i
        row["class"] = query_classes[i]
        rows.append(row)
    return pd.DataFrame(rows).set_index("index"), per_query
