"""Search a database with query images, and write what a user looks at: the neighbours as files, and a figure."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cbir.images import IMAGE_EXTENSIONS, Sample, UnreadableImage, load_image
from cbir.embedding import embed, embedding_search
from cbir.files import make_folders, open_folder, open_without_links, write_file
from cbir.labels import balanced_rounds
from cbir.naming import NAME_MAX, result_name, safe_name
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


@dataclass
class SavedRetrieval:
    """What ``save_retrieval`` wrote: the figure, and the neighbours it could not show, with why."""

    figure: Path
    missing: list[tuple[Neighbour, str]] = field(default_factory=list)


def read_image_file(path: str, *, follow_link: bool = True):
    """(bytes, RGB image) of an image file; ``UnreadableImage`` (one line) for anything that is not a regular,
    decodable image file with an image extension. What is copied is what was decoded: the same bytes. Without
    ``follow_link`` (a path a database stored, resolved) no link is followed anywhere on the path."""
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        raise UnreadableImage(f"{path}: not an image file name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if follow_link else open_without_links(path)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file (moved or removed since it was indexed)") from None
    except OSError as error:
        raise UnreadableImage(f"{path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UnreadableImage(f"{path}: not a regular file")
        data = handle.read()
    try:
        image = load_image(io.BytesIO(data))
    except UnreadableImage:
        raise UnreadableImage(f"{path}: not a readable image") from None
    return data, image


@contextlib.contextmanager
def results_folder(results_dir: str | Path, subfolder: str | None = None):
    """``(descriptor, path)`` of the results folder (or of its ``subfolder``) to write into with
    ``cbir.files.write_file(..., dir_fd=)``: a folder of the user's (made ``0700`` when missing), opened once, and a
    subfolder opened without following a link, so nothing is written through a link planted in a shared
    results folder."""
    results_dir = Path(results_dir)
    make_folders(results_dir.parent)
    top = open_folder(results_dir, "results folder", own_link=True)
    folder = top
    try:
        if subfolder is not None:
            folder = open_folder(subfolder, "results folder", dir_fd=top)
            results_dir = results_dir / subfolder
        yield folder, results_dir
    finally:
        if folder != top:
            os.close(folder)
        os.close(top)


def save_retrieval(retrieval: Retrieval, results_dir: str | Path, *, per_class: bool = False) -> SavedRetrieval:
    """Copy the query and each neighbour (``<rank>_<class>_<file>``) into ``results_dir`` (into its folder for the
    query's class with ``per_class``) and draw the figure there.

    Every file is new and private (``0600``), written under a fresh name and renamed into place inside a folder of
    the user's (see :func:`results_folder`). Names too long for the file system are shortened, never dropped. A
    neighbour whose file moved, vanished, or is not an image any more is not copied and is marked in the figure;
    ``missing`` says which and why.
    """
    query = retrieval.query
    with results_folder(results_dir, safe_name(query.class_name) if per_class else None) as (folder, where):
        try:
            limit = os.fpathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = NAME_MAX
        data, query_image = read_image_file(query.path)
        write_file(result_name("query", Path(query.path).name, limit=limit), data, dir_fd=folder)
        shown, missing = [], []
        for n in retrieval.neighbours:
            try:
                # Stored paths are resolved: a link there now is not the file that was indexed.
                data, image = read_image_file(n.path, follow_link=False)
            except UnreadableImage as error:
                missing.append((n, str(error)))
                shown.append((None, n.class_name, n.distance))
                continue
            name = result_name(f"{n.rank}_{safe_name(n.class_name)}", Path(n.path).name, limit=limit)
            write_file(name, data, dir_fd=folder)
            shown.append((image, n.class_name, n.distance))
        if query.class_name:
            hits = sum(n.class_name == query.class_name for n in retrieval.neighbours)
            title = f"{Path(query.path).name}: {hits}/{len(retrieval.neighbours)} of the same class"
        else:  # a lone file in the working folder: no class folder, nothing to count as right
            title = f"{Path(query.path).name}: its {len(retrieval.neighbours)} nearest"
        if missing:
            title += f"; {len(missing)} not shown (file moved or removed)"
        figure = io.BytesIO()
        plot_retrieval(query_image, query.class_name, shown, figure, title=title)
        write_file("retrieval.png", figure.getvalue(), dir_fd=folder)
    return SavedRetrieval(where / "retrieval.png", missing)


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
