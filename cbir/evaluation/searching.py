"""Ask the caller's search function for each query's results, in batches, and keep the results that count.

A result that is the query itself is dropped (the query may be stored in the database), and with an exclusion
pattern so is every result from the query's group (same slide or patient): what remains, best first, is a
query's :class:`Outcome`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cbir.errors import ParameterError

#: ``search(paths) -> (result_paths, result_classes, timings)``: per query the results best first, and the seconds
#: the batch spent in "model", "transfer" and "search".
SearchFn = Callable[[list[str]], tuple[Sequence[Sequence[str]], Sequence[Sequence[str]], dict]]
TIMED_PARTS = ("model", "transfer", "search")


@dataclass
class Outcome:
    results: list[tuple[str, str]]      # (path, class) after the exclusions, in rank order
    self_found: bool                    # the query itself was among the results (it is in the database)
    excluded: int                       # results dropped as the query's group


class GroupExclusion:
    """``exclude_same``: a regex with one group, searched in file names; results of the query's group are dropped."""

    def __init__(self, pattern: str | None):
        self.text = pattern
        self.pattern = None
        if pattern is None:
            return
        try:
            self.pattern = re.compile(pattern)
        except re.error as error:
            raise ParameterError(f"{{exclude_same}} is not a valid regular expression ({error}): {pattern!r}",
                                 "exclude_same") from None
        if self.pattern.groups < 1:
            raise ParameterError(f"{{exclude_same}} needs a group to compare, as in r'^(slide\\d+)_': got {pattern!r}",
                                 "exclude_same")

    def __bool__(self) -> bool:
        return self.pattern is not None

    def group(self, path: str) -> str | None:
        if self.pattern is None:
            return None
        match = self.pattern.search(os.path.basename(str(path)))
        return match.group(1) if match else None


def _norm_path(path: str) -> str:
    # Links resolved, as the database stores paths: a query reached through a linked folder is still itself.
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def filter_results(query_path: str, paths: Sequence[str], classes: Sequence[str],
                   exclusion: GroupExclusion) -> Outcome:
    """The results that count for ``query_path``: not the query itself, not of its group."""
    query_base = os.path.basename(query_path)
    query_norm: str | None = None
    query_group = exclusion.group(query_path)
    kept: list[tuple[str, str]] = []
    self_found = False
    excluded = 0
    for path, cls in zip(paths, classes):
        path = str(path)
        if path == query_path:
            self_found = True
            continue
        # The same file under another spelling; normalising only paths that end alike keeps this cheap.
        if path.endswith(query_base):
            query_norm = query_norm or _norm_path(query_path)
            if _norm_path(path) == query_norm:
                self_found = True
                continue
        if query_group is not None and exclusion.group(path) == query_group:
            excluded += 1
            continue
        kept.append((path, str(cls)))
    return Outcome(kept, self_found, excluded)


def _unpack(answer, n_queries: int, query_paths: list[str]):
    try:
        result_paths, result_classes, timings = answer
    except (TypeError, ValueError):
        raise TypeError("search(paths) must return (result_paths, result_classes, timings)") from None
    if len(result_paths) != n_queries or len(result_classes) != n_queries:
        raise ValueError(f"search returned {len(result_paths)} path lists and {len(result_classes)} class lists "
                         f"for {n_queries} queries")
    for path, rpaths, rclasses in zip(query_paths, result_paths, result_classes):
        if len(rpaths) != len(rclasses):
            raise ValueError(f"search returned {len(rpaths)} paths but {len(rclasses)} classes for {path}")
    return result_paths, result_classes, timings or {}


def run_search(search: SearchFn, query_paths: list[str], indices: list[int], batch_size: int,
               exclusion: GroupExclusion, progress: Callable[[int], None] | None = None
               ) -> tuple[dict[int, Outcome], dict[str, float]]:
    """The outcome of each query ``query_paths[i]`` for ``i`` in ``indices``, and the seconds spent (total and per
    part). ``progress`` is called with the number of queries each batch held."""
    outcomes: dict[int, Outcome] = {}
    timings = {"total": 0.0, **{part: 0.0 for part in TIMED_PARTS}}
    start = time.perf_counter()
    for first in range(0, len(indices), batch_size):
        batch = indices[first:first + batch_size]
        paths = [query_paths[i] for i in batch]
        result_paths, result_classes, batch_timings = _unpack(search(paths), len(batch), paths)
        for part in TIMED_PARTS:
            timings[part] += float(batch_timings.get(part, 0.0))
        for i, rpaths, rclasses in zip(batch, result_paths, result_classes):
            outcomes[i] = filter_results(query_paths[i], rpaths, rclasses, exclusion)
        if progress is not None:
            progress(len(batch))
    timings["total"] = time.perf_counter() - start
    return outcomes, timings


def per_query_timings(timings: dict[str, float], n_searched: int) -> dict[str, float]:
    """The timings with ``per_query`` added: the total over the queries actually searched."""
    out = {key: float(timings.get(key, 0.0)) for key in ("total", *TIMED_PARTS)}
    # The thesis divided by the size of the whole query folder; only the queries actually searched count.
    out["per_query"] = out["total"] / n_searched if n_searched else 0.0
    return out


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
