"""Search a database with query images, and write what a user looks at: the neighbours as files, and a figure."""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cbir.images import Sample, load_image
from cbir.embedding import embed
from cbir.errors import CbirError
from cbir.plots import plot_retrieval


@dataclass
class Neighbour:
    rank: int
    path: str
    class_name: str
    distance: float


@dataclass
class Retrieval:
    query: Sample
    neighbours: list[Neighbour]


def search_samples(extractor, database, samples: list[Sample], k: int, *, nprobe=None, batch_size=None,
                   num_workers=None) -> tuple[list[Retrieval], list[Sample]]:
    """The ``k`` nearest stored images of each readable query; also returns the unreadable queries."""
    database.check_extractor(extractor.describe())
    embedded = embed(extractor, samples, batch_size=batch_size, num_workers=num_workers)
    if not embedded.samples:
        return [], embedded.skipped
    found = database.search(embedded.vectors, k, nprobe=nprobe)
    retrievals = [
        Retrieval(query, [Neighbour(rank + 1, p, c, float(d)) for rank, (p, c, d) in enumerate(zip(paths, classes, dists))])
        for query, paths, classes, dists in zip(embedded.samples, found.paths, found.classes, found.distances)
    ]
    return retrievals, embedded.skipped


def safe_name(text: str) -> str:
    """A file-name-safe version of a user's path component: no separators, so nothing lands outside the folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def save_retrieval(retrieval: Retrieval, out_dir: str | Path) -> Path:
    """Copy the query and each neighbour (``<rank>_<class>_<file>``) into ``out_dir``; draw the figure there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    query = retrieval.query
    shutil.copyfile(query.path, out_dir / f"query_{safe_name(Path(query.path).name)}")
    shown = []
    for n in retrieval.neighbours:
        target = out_dir / f"{n.rank}_{safe_name(n.class_name)}_{safe_name(Path(n.path).name)}"
        try:
            shutil.copyfile(n.path, target)
            shown.append((load_image(n.path), n.class_name, n.distance))
        except (OSError, CbirError):
            # The database may name a file moved since indexing: the result still stands, only its picture is missing.
            continue
    hits = sum(n.class_name == query.class_name for n in retrieval.neighbours)
    return plot_retrieval(
        load_image(query.path), query.class_name, shown, out_dir / "retrieval.png",
        title=f"{Path(query.path).name}: {hits}/{len(retrieval.neighbours)} of the same class",
    )


def one_query_per_class(samples: list[Sample], seed: int = 0) -> list[Sample]:
    """The folder form of retrieval: one random image of each class."""
    rng = random.Random(seed)
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    return [rng.choice(members) for _, members in sorted(by_class.items())]


def search_function(extractor, database, k: int, *, nprobe=None, batch_size=None, num_workers=None):
    """``search(paths) -> (result paths, result classes, timings)``, the shape :func:`cbir.evaluation.evaluate` calls.

    Timings per batch: ``model`` (forward passes), ``transfer`` (decoding, resizing and moving images: the rest of
    embedding), ``search`` (the database). An unreadable query gets no results and so counts as a miss.
    """
    import time

    database.check_extractor(extractor.describe())

    def search(paths: list[str]):
        embedded = embed(extractor, [Sample(p, "") for p in paths], batch_size=batch_size, num_workers=num_workers)
        start = time.perf_counter()
        found = database.search(embedded.vectors, k, nprobe=nprobe) if embedded.samples else None
        seconds_search = time.perf_counter() - start
        by_path = {s.path: i for i, s in enumerate(embedded.samples)}
        result_paths = [found.paths[by_path[p]] if p in by_path else [] for p in paths]
        result_classes = [found.classes[by_path[p]] if p in by_path else [] for p in paths]
        timings = {"model": embedded.seconds_model, "transfer": embedded.seconds_total - embedded.seconds_model,
                   "search": seconds_search}
        return result_paths, result_classes, timings

    return search
