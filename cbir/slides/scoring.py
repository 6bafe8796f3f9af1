"""Slide-level evaluation: query slides against a database of slide tiles, scored at the tile and the slide level.

Each query slide is tiled as the database was. Tile level: every tissue tile searches the database. Slide level:
the slide's mosaic ranks the stored slides (:func:`cbir.slides.search.rank_slides`). Results from the query's own
slide are left out (leave-one-slide-out), or from its patient when the slide list names patients
(leave-one-patient-out): so the database may hold the query slides themselves, or a disjoint split.

Both levels are scored by :func:`cbir.evaluation.evaluate` on the first five results: top-1, MV@5 (``class_maj``:
at least 3 of the 5 of the query's class), mMV@5 (``mmv5``: the most common class of the 5, ties to the
best-ranked) and mAP@5 (``map_at_k``), the numbers of the slide-search literature (Yottixel, SISH, RetCCL).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from cbir.evaluation import EvalReport, evaluate
from cbir.slides.reader import SlideError
from cbir.slides.search import DEFAULT_DEPTH, query_vectors, rank_slides, search_tiles
from cbir.slides.tiling import SlideSource, TilingSpec, tile_slide

K = 5


@dataclass
class SlideEvaluation:
    tile: EvalReport
    slide: EvalReport
    leave_out: str  # "slide" or "patient"
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"tile level (leave-one-{self.leave_out}-out): each tissue tile of the query slides",
                 self.tile.format(), "",
                 f"slide level (leave-one-{self.leave_out}-out): each query slide's mosaic ranks the stored slides; "
                 "MV@5 = class maj, mMV@5, mAP@5",
                 self.slide.format()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} query slides:")
            lines += [f"  {why}" for why in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"leave_out": self.leave_out, "tile": self.tile.to_dict(), "slide": self.slide.to_dict(),
                "skipped": list(self.skipped)}


def evaluate_slides(extractor, database, sources: list[SlideSource], spec: TilingSpec, *, mpp: float | None = None,
                    measure: str = "all", maps=None, depth: int = DEFAULT_DEPTH, nprobe=None, batch_size: int = 32,
                    num_workers: int | None = None, bootstrap: int = 0, seed: int = 0,
                    cache: dict | None = None) -> SlideEvaluation:
    """Tile-level and slide-level numbers of ``sources`` searched in ``database`` (see the module's text).

    ``cache`` (tile path -> vector), when given, is used and filled: a benchmark comparing mosaics embeds each
    query tile once."""
    database.check_extractor(extractor.describe())
    stored = database.extras()
    cache = {} if cache is None else cache
    by_patient = any(source.patient for source in sources)
    key = "patient" if by_patient else "slide"
    tiles_of = Counter(extra.get(key) or extra["slide"] for extra in stored.values())

    vectors, tile_paths, tile_classes, mosaics, queries, skipped = {}, [], [], {}, [], []
    for source in sources:
        try:
            tiled = tile_slide(source, spec, mpp=mpp)
        except SlideError as error:
            skipped.append(str(error))
            continue
        tiled.slide.close()
        missing = [tile for tile in tiled.tiles if tile.path not in cache]
        if missing:
            cache.update(zip((tile.path for tile in missing),
                             query_vectors(extractor, missing, batch_size=batch_size, num_workers=num_workers)))
        found = np.stack([cache[tile.path] for tile in tiled.tiles])
        group = (source.patient if by_patient else None) or tiled.slide.path
        for tile, vector in zip(tiled.tiles, found):
            vectors[tile.path] = (vector, group)
            tile_paths.append(tile.path)
            tile_classes.append(source.class_name)
        mosaics[tiled.slide.path] = (found[tiled.mosaic], group)
        queries.append((tiled.slide.path, source.class_name))
    if not queries:
        raise SlideError("no query slide could be used: " + "; ".join(skipped))

    def leave_out(group):
        return lambda extra: (extra.get(key) or extra["slide"]) == group

    def tile_search(paths):
        hits = [search_tiles(database, vectors[p][0][None, :], K, exclude=leave_out(vectors[p][1]),
                             excluded_most=tiles_of[vectors[p][1]], nprobe=nprobe)[0] for p in paths]
        return [[h.path for h in row] for row in hits], [[h.class_name for h in row] for row in hits], {}

    def slide_search(paths):
        ranked = [rank_slides(database, mosaics[p][0], exclude=leave_out(mosaics[p][1]),
                              excluded_most=tiles_of[mosaics[p][1]], depth=depth, nprobe=nprobe)[:K] for p in paths]
        return [[h.slide for h in row] for row in ranked], [[h.class_name for h in row] for row in ranked], {}

    tile_report = evaluate(tile_paths, tile_classes, tile_search, measure=measure, k=K, maps=maps,
                           bootstrap=bootstrap, seed=seed)
    # Slides are few: every one is a query (macro-averaged over classes with --measure weighted).
    slide_report = evaluate([p for p, _ in queries], [c for _, c in queries], slide_search,
                            measure="weighted" if measure == "weighted" else "all", k=K, maps=maps,
                            bootstrap=bootstrap, seed=seed)
    return SlideEvaluation(tile_report, slide_report, key, skipped)
