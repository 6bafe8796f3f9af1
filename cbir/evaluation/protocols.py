"""The thesis's protocols: which queries a measure searches, and how their per-query numbers become the report.

``measure``: ``all`` (every query), ``random`` (class-balanced sample, seeded), ``weighted`` (macro average over
classes), ``remove`` (without the dominant classes), ``stat`` (``random`` repeated: mean and standard deviation)
and ``separated`` (one row per class, each class searched on its own so that it has its own timings).

:func:`evaluate` runs one protocol through the caller's ``search`` function, so this package knows nothing of
models, Redis or FAISS and is tested with known vectors.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from cbir.errors import ParameterError
from cbir.evaluation.report import EvalReport
from cbir.evaluation.scoring import CLUSTER_KEYS, EXTRA_KEYS, HEADLINE_KEYS, Scorer, score_queries
from cbir.evaluation.searching import GroupExclusion, SearchFn, per_query_timings, run_search
from cbir.labels import LevelMaps, balanced_rounds

MEASURES = ("all", "random", "weighted", "remove", "stat", "separated")
CI_KEYS = ("class_top1", "class_top5", "class_maj")
REMOVE_RULE = "default rule: classes above twice the median class size, else those of the largest size"

# ------------------------------------------------------------------------------------------ selection


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ParameterError(f"{{measure}} must be one of {', '.join(MEASURES)}; got {measure!r}", "measure")


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
        raise ParameterError(f"none of the classes of {{remove_classes}} is among the queries: {', '.join(unknown)} "
                             f"(query classes: {', '.join(sorted(present))})", "remove_classes")
    if unknown:
        warnings.warn(f"classes to remove not among the queries, ignored: {', '.join(unknown)}", stacklevel=3)
    return sorted(dict.fromkeys(c for c in wanted if c in present))


def _restrict(classes: list[str], project_name: str | None, class_name: str | None, maps: LevelMaps) -> list[int]:
    indices = list(range(len(classes)))
    if project_name is not None:
        indices = [i for i in indices if maps.project(classes[i]) == project_name]
        if not indices:
            known = sorted({maps.project(c) for c in classes})
            raise ParameterError(f"no query of {{project_name}} {project_name!r} (projects: {', '.join(known)})",
                                 "project_name")
    if class_name is not None:
        indices = [i for i in indices if classes[i] == class_name]
        if not indices:
            known = ", ".join(sorted(set(classes)))
            raise ParameterError(f"no query of {{class_name}} {class_name!r} (classes: {known})", "class_name")
    return indices


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
        raise ParameterError(f"{{max_queries}} must be at least 1, got {max_queries}", "max_queries")
    maps = maps if maps is not None else LevelMaps()
    classes = [str(c) for c in query_classes]
    indices = _restrict(classes, project_name, class_name, maps)
    if measure in ("random", "stat"):
        return sorted(balanced_rounds(classes, indices, seed=seed, limit=max_queries))
    if measure == "remove":
        dropped = set(resolve_removed_classes(classes, remove_classes))
        kept = [i for i in indices if classes[i] not in dropped]
        if not kept:
            raise ParameterError(f"removing {', '.join(sorted(dropped))} leaves no query to evaluate")
        return kept
    return indices


@dataclass
class _Plan:
    """The queries one evaluation searches: ``samples`` (one per ``stat`` repetition, else one) and their union."""

    samples: list[list[int]]
    searched: list[int]
    dropped: list[str]


def _plan(query_classes: list[str], measure: str, *, seed: int, repeats: int, max_queries: int,
          remove_classes: Iterable[str] | None, project_name: str | None, class_name: str | None,
          maps: LevelMaps) -> _Plan:
    dropped = resolve_removed_classes(query_classes, remove_classes) if measure == "remove" else []
    select = dict(max_queries=max_queries, remove_classes=dropped, project_name=project_name,
                  class_name=class_name, maps=maps)
    if measure == "stat":
        samples = [select_queries(query_classes, "random", seed=seed + r, **select) for r in range(repeats)]
        return _Plan(samples, sorted(set().union(*samples)), dropped)
    selected = select_queries(query_classes, measure, seed=seed, **select)
    return _Plan([selected], selected, dropped)


# ---------------------------------------------------------------------------------------------- search

def _search_plan(search: SearchFn, query_paths: list[str], query_classes: list[str], plan: _Plan, *,
                 by_class: bool, batch_size: int, exclusion: GroupExclusion, progress):
    """(outcome per query, timings, timings per class when ``by_class``: each class searched on its own)."""
    if not by_class:
        outcomes, spent = run_search(search, query_paths, plan.searched, batch_size, exclusion, progress)
        return outcomes, per_query_timings(spent, len(plan.searched)), {}
    outcomes, class_timings = {}, {}
    totals: Counter = Counter()
    for cls in sorted({query_classes[i] for i in plan.searched}):
        members = [i for i in plan.searched if query_classes[i] == cls]
        found, spent = run_search(search, query_paths, members, batch_size, exclusion, progress)
        outcomes.update(found)
        class_timings[cls] = per_query_timings(spent, len(members))
        totals.update(spent)
    return outcomes, per_query_timings(totals, len(plan.searched)), class_timings


# ------------------------------------------------------------------------------------------- aggregation

def aggregate(table: pd.DataFrame, keys: Sequence[str], macro: bool) -> dict[str, float]:
    """The mean of each column over the queries, or (``macro``) the mean over classes of each class's mean."""
    if table.empty:
        return {key: math.nan for key in keys}
    if macro:
        values = table.groupby("class", sort=True)[list(keys)].mean().mean()
    else:
        values = table[list(keys)].mean()
    return {key: float(values[key]) for key in keys}


def bootstrap_intervals(table: pd.DataFrame, macro: bool, resamples: int, seed: int, level: float
                        ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for the class-level numbers; stratified by class for the macro average.

    Each number is a share of 0/1 hits, and drawing n queries with replacement from a group holding h hits gives
    Binomial(n, h / n) hits: drawing that count is the same resampling, at a cost independent of n.
    """
    rng = np.random.default_rng(seed)
    groups = table.groupby("class", sort=True) if macro else [(None, table)]
    tail = (1.0 - level) / 2 * 100
    intervals = {}
    for key in CI_KEYS:
        sizes = np.array([len(g) for _, g in groups])
        shares = np.array([float(g[key].mean()) for _, g in groups])
        draws = rng.binomial(sizes, shares, size=(resamples, len(sizes))) / sizes
        values = draws.mean(axis=1)
        intervals[key] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
    return intervals


def _per_class(table: pd.DataFrame, keys: list[str], class_timings: dict[str, dict[str, float]]) -> pd.DataFrame:
    records = {}
    for cls, group in table.groupby("class", sort=True):
        record = aggregate(group, keys, macro=False)
        record["n_queries"] = len(group)
        record.update({f"time_{key}": value for key, value in class_timings[cls].items()})
        records[cls] = record
    per_class = pd.DataFrame.from_dict(records, orient="index")
    per_class.index.name = "class"
    return per_class


def _scored_keys(table: pd.DataFrame, scorer: Scorer, notes: list[str]) -> list[str]:
    """The columns the report aggregates; a note for each one left out and why."""
    keys = list(HEADLINE_KEYS) + list(EXTRA_KEYS)
    if scorer.db_class_counts is not None:
        if scorer.short_for_r:
            notes.append(f"MAP@R skipped: {scorer.short_for_r} queries got fewer results than R "
                         f"(up to {scorer.max_r_needed}); ask the search for at least {scorer.max_r_needed + 1}")
        elif table["map_at_r"].isna().all():
            notes.append("MAP@R skipped: no query's class has other items in the database counts given")
        else:
            keys.append("map_at_r")
    if scorer.clusters is not None:
        keys += list(CLUSTER_KEYS)
        if scorer.missing_clusters:
            notes.append(f"{scorer.missing_clusters} query or result paths had no cluster label "
                         f"(counted as cluster misses)")
    return keys


def _exclusion_notes(exclusion: GroupExclusion, query_paths: list[str], plan: _Plan, outcomes) -> list[str]:
    if not exclusion:
        return []
    notes = []
    unmatched = sum(exclusion.group(query_paths[i]) is None for i in plan.searched)
    if unmatched:
        notes.append(f"exclude_same: {unmatched} query file names do not match {exclusion.text!r}; "
                     f"nothing was excluded for them")
    n_excluded = sum(outcomes[i].excluded for i in plan.searched)
    notes.append(f"exclude_same dropped {n_excluded} results sharing the query's group")
    return notes


def _summarise(table: pd.DataFrame, keys: list[str], plan: _Plan, measure: str, *, bootstrap: int, seed: int,
               ci_level: float, notes: list[str]):
    """(scores, std over the stat samples or None, bootstrap intervals or None, queries per sample)."""
    if measure != "stat":
        scores = aggregate(table, keys, macro=(measure == "weighted"))
        ci = bootstrap_intervals(table, measure == "weighted", bootstrap, seed, ci_level) if bootstrap else None
        return scores, None, ci, len(plan.samples[0])
    per_sample = [aggregate(table.loc[sample], keys, macro=False) for sample in plan.samples]
    scores = {key: float(np.mean([s[key] for s in per_sample])) for key in keys}
    repeated = len(per_sample) > 1
    std = {key: float(np.std([s[key] for s in per_sample], ddof=1)) if repeated else 0.0 for key in keys}
    if bootstrap:
        notes.append("no bootstrap interval for stat: its spread is the std over the samples")
    return scores, std, None, len(plan.samples[0])


# ---------------------------------------------------------------------------------------------- evaluate

def _check_inputs(query_paths, query_classes, numbers: dict[str, tuple[Any, int]], ci_level: float):
    query_paths = [str(p) for p in query_paths]
    query_classes = [str(c) for c in query_classes]
    if len(query_paths) != len(query_classes):
        raise ValueError(f"{len(query_paths)} query paths but {len(query_classes)} query classes")
    if not query_paths:
        raise ParameterError("no query to evaluate")
    for name, (value, least) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < least:
            raise ParameterError("{" + name + "}" + f" must be an integer of at least {least}, got {value!r}", name)
    if not 0 < ci_level < 1:
        raise ParameterError(f"{{ci_level}} must lie between 0 and 1, got {ci_level}", "ci_level")
    return query_paths, query_classes


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
    query_paths, query_classes = _check_inputs(
        query_paths, query_classes, {"k": (k, 1), "batch_size": (batch_size, 1), "repeats": (repeats, 1),
                                     "bootstrap": (bootstrap, 0)}, ci_level)
    exclusion = GroupExclusion(exclude_same)
    maps = maps if maps is not None else LevelMaps()
    notes: list[str] = []
    plan = _plan(query_classes, measure, seed=seed, repeats=repeats, max_queries=max_queries,
                 remove_classes=remove_classes, project_name=project_name, class_name=class_name, maps=maps)
    outcomes, timings, class_timings = _search_plan(search, query_paths, query_classes, plan, batch_size=batch_size,
                                                    by_class=measure == "separated", exclusion=exclusion,
                                                    progress=progress)
    if db_class_counts is not None and exclusion:
        notes.append("MAP@R skipped: with exclude_same the number R of eligible database items is unknown")
    scorer = Scorer(k, maps, cluster_labels=cluster_labels, db_class_counts=None if exclusion else db_class_counts)
    table, per_query = score_queries(scorer, query_paths, query_classes, plan.searched, outcomes)
    keys = _scored_keys(table, scorer, notes)
    n_short = int(table["short"].sum())
    if n_short:
        notes.append(f"{n_short} queries had fewer than {k} results after the exclusions (missing ranks count as "
                     f"misses); ask the search for more results")
    notes += _exclusion_notes(exclusion, query_paths, plan, outcomes)
    scores, std, ci, n_queries = _summarise(table, keys, plan, measure, bootstrap=int(bootstrap), seed=seed,
                                            ci_level=ci_level, notes=notes)
    per_class = _per_class(table, keys, class_timings) if measure == "separated" else None
    cluster_divergence = None
    if cluster_labels is not None:
        disagree = (table["class_top1"] != table["cluster_top1"]).astype(float)
        cluster_divergence = {str(c): float(v) for c, v in disagree.groupby(table["class"], sort=True).mean().items()}
        if per_class is not None:
            per_class["cluster_divergence"] = pd.Series(cluster_divergence)
    settings = _settings(measure, k=k, seed=seed, exclude_same=exclude_same, bootstrap=int(bootstrap),
                         ci_level=ci_level, project_name=project_name, class_name=class_name,
                         max_queries=max_queries, repeats=repeats, removed_given=remove_classes is not None)
    return EvalReport(
        measure=measure, n_queries=n_queries, scores=scores, std=std, ci=ci, timings=timings,
        per_class=per_class, dropped_classes=plan.dropped, per_query=per_query, k=k, n_searched=len(plan.searched),
        cluster_divergence=cluster_divergence, notes=notes, settings=settings,
    )


def _settings(measure: str, *, max_queries: int, repeats: int, removed_given: bool, **common) -> dict[str, Any]:
    settings = dict(common)
    if measure in ("random", "stat"):
        settings["max_queries"] = max_queries
    if measure == "remove":
        settings["removed_by"] = "given" if removed_given else REMOVE_RULE
    if measure == "stat":
        settings["repeats"] = repeats
    return settings
