"""Search a database of slide tiles: a region → similar tiles on their slides; a slide → similar slides.

A slide query is its mosaic: each mosaic tile is searched, and each stored slide gets, per query tile, the
distance of its best-matching tile; slides are ranked by the median of those (Yottixel's "median of minimum
distances"), so a slide must resemble much of the query, not one corner of it. A slide none of a query tile's
``depth`` nearest tiles belongs to is given that tile's ``depth``-th distance, a lower bound of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cbir.embedding import embed
from cbir.errors import CbirError

DEFAULT_DEPTH = 1000  # stored tiles looked at per query tile for slide ranking


@dataclass
class TileHit:
    rank: int
    path: str
    class_name: str
    distance: float
    slide: str | None  # None for an image that is not a slide tile
    box: tuple[int, int, int, int] | None
    query_tile: int = 0  # which query tile found it
    slide_mpp: float | None = None
    patient: str | None = None


@dataclass
class SlideHit:
    rank: int
    slide: str
    class_name: str
    score: float  # median over the query tiles of the best distance to this slide
    patient: str | None = None
    slide_mpp: float | None = None
    regions: list[tuple[tuple[int, int, int, int], float]] = field(default_factory=list)  # best matches, best first


Exclude = Callable[[dict], bool]


def search_tiles(database, vectors: np.ndarray, k: int, *, exclude: Exclude | None = None, excluded_most: int = 0,
                 nprobe=None) -> list[list[TileHit]]:
    """The ``k`` nearest stored tiles of each vector, leaving out those ``exclude`` (called on a tile's
    metadata) rejects; ``excluded_most`` bounds how many that can be, so enough are asked for."""
    found = database.search(vectors, k + excluded_most, nprobe=nprobe)
    unique = sorted({p for row in found.paths for p in row})
    extras = dict(zip(unique, database.extra(unique)))
    answers = []
    for query, (paths, classes, distances) in enumerate(zip(found.paths, found.classes, found.distances)):
        hits = []
        for path, cls, distance in zip(paths, classes, distances.tolist()):
            extra = extras.get(path)
            if exclude is not None and extra is not None and exclude(extra):
                continue
            extra = extra or {}
            box = tuple(extra["box"]) if "box" in extra else None
            hits.append(TileHit(len(hits) + 1, path, cls, float(distance), extra.get("slide"), box, query,
                                extra.get("slide_mpp"), extra.get("patient")))
            if len(hits) == k:
                break
        answers.append(hits)
    return answers


def rank_slides(database, vectors: np.ndarray, *, exclude: Exclude | None = None, excluded_most: int = 0,
                depth: int = DEFAULT_DEPTH, nprobe=None) -> list[SlideHit]:
    """Stored slides ranked by the median over ``vectors`` (a query's mosaic) of their best tile distance."""
    depth = max(1, min(depth, len(database)))
    per_tile = search_tiles(database, vectors, depth, exclude=exclude, excluded_most=excluded_most, nprobe=nprobe)
    best: dict[str, np.ndarray] = {}
    where: dict[str, dict[int, TileHit]] = {}
    first: dict[str, TileHit] = {}
    floor = np.array([hits[-1].distance if hits else np.inf for hits in per_tile])
    for query, hits in enumerate(per_tile):
        for hit in hits:
            if hit.slide is None:
                continue
            row = best.setdefault(hit.slide, np.full(len(per_tile), np.nan))
            if np.isnan(row[query]):  # hits come nearest first: the first of a slide is its best
                row[query] = hit.distance
                where.setdefault(hit.slide, {})[query] = hit
                first.setdefault(hit.slide, hit)
    ranked = []
    for slide, row in best.items():
        row = np.where(np.isnan(row), floor, row)
        regions = sorted(((h.box, h.distance) for h in where[slide].values()), key=lambda r: r[1])
        some = first[slide]
        ranked.append(SlideHit(0, slide, some.class_name, float(np.median(row)), some.patient, some.slide_mpp, regions))
    ranked.sort(key=lambda s: (s.score, s.slide))
    for rank, hit in enumerate(ranked, start=1):
        hit.rank = rank
    return ranked


def query_vectors(extractor, tiles, *, batch_size: int = 32, num_workers: int | None = None) -> np.ndarray:
    """The vectors of a query's tiles, read from its slide now (the query need not be stored)."""
    embedded = embed(extractor, tiles, batch_size=batch_size, num_workers=num_workers)
    if embedded.skipped:
        raise CbirError(f"{len(embedded.skipped)} of the query's {len(tiles)} tiles could not be read: "
                        f"{embedded.skipped[0].path}")
    return embedded.vectors


def same_slide(slide: str) -> Exclude:
    return lambda extra: extra.get("slide") == slide
