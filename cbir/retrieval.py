"""Search a database with query images, and write what a user looks at: the neighbours as files, and a figure."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cbir.images import Sample, load_image
from cbir.embedding import embed, embedding_search
from cbir.errors import CbirError
from cbir.labels import balanced_rounds
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
    """The folder form of retrieval: one random image of each class, in class order."""
    return [samples[i] for i in balanced_rounds([s.class_name for s in samples], seed=seed, rounds=1)]


def search_function(extractor, database, k: int, *, nprobe=None, batch_size=None, num_workers=None):
    """``search(paths)`` for :func:`cbir.evaluation.evaluate`: the ``k`` nearest stored images of each query (see
    :func:`cbir.embedding.embedding_search`)."""
    database.check_extractor(extractor.describe())

    def nearest(vectors):
        found = database.search(vectors, k, nprobe=nprobe)
        return found.paths, found.classes

    return embedding_search(extractor, nearest, batch_size=batch_size, num_workers=num_workers)
