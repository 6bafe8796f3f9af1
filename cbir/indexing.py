"""Embed images and add them to a database, batch by batch, so an interrupted run keeps what it stored."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cbir.images import Sample
from cbir.embedding import iter_embeddings
from cbir.errors import CbirError
from cbir.naming import printable


@dataclass
class IndexSummary:
    added: int = 0
    already_stored: int = 0
    skipped: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    seconds_model: float = 0.0

    def format(self, db_name: str, total_in_db: int) -> str:
        lines = [f"indexed {self.added} images into '{db_name}' in {self.seconds:.1f} s "
                 f"({self.added / max(self.seconds, 1e-9):.1f} images/s; model {self.seconds_model:.1f} s); "
                 f"{total_in_db} images in the database"]
        if self.already_stored:
            lines.append(f"{self.already_stored} images were already stored and kept as they are")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable files:")
            lines += [f"  {printable(s.path)}" for s in self.skipped]
        return "\n".join(lines)


def index_images(encoder, database, samples: list[Sample], *, batch_size: int | None = None,
                 num_workers: int | None = None, device=None, progress: bool = True, chunk: int = 512,
                 rewrite: bool = False, extractor_info: dict | None = None) -> IndexSummary:
    """Add ``samples`` not yet in ``database``; re-running after an interruption adds only what is missing.

    ``encoder``: from :func:`cbir.inference.load_encoder` (or a bare extractor, run in PyTorch).

    ``rewrite``: replace the database's contents by ``samples``. Nothing is changed before vectors are ready:
    the database is emptied just before the first chunk is written, so when none of the images can be read it is
    left as it was (and a :class:`CbirError` says so). ``extractor_info`` is what the database records about the
    extractor (default: ``encoder.describe()``); vectors of another extractor are refused before any work.
    """
    start = time.perf_counter()
    info = extractor_info or encoder.describe()
    if rewrite:
        todo = list(samples)
    else:
        database.set_extractor(info)
        todo = [s for s, stored in zip(samples, database.has_paths([s.path for s in samples])) if not stored]
    summary = IndexSummary(already_stored=len(samples) - len(todo))
    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)
    stored: set[Sample] = set()
    pending_samples, pending_vectors = [], []

    def flush():
        if not pending_samples:
            return
        if rewrite and not summary.added:
            database.clear()
            database.set_extractor(info)
        database.add([s.path for s in pending_samples], [s.class_name for s in pending_samples],
                     np.concatenate(pending_vectors))
        summary.added += len(pending_samples)
        stored.update(pending_samples)
        pending_samples.clear()
        pending_vectors.clear()

    for batch_samples, vectors, seconds in iter_embeddings(encoder, todo, batch_size=batch_size,
                                                           num_workers=num_workers, device=device):
        pending_samples.extend(batch_samples)
        pending_vectors.append(vectors)
        summary.seconds_model += seconds
        bar.update(len(batch_samples))
        # Writes go to the database a chunk at a time: few round trips, little lost on a crash.
        if len(pending_samples) >= chunk:
            flush()
    flush()
    bar.close()
    summary.skipped = [s for s in todo if s not in stored]
    summary.seconds = time.perf_counter() - start
    if todo and not summary.added:
        raise CbirError(f"none of the {len(todo)} images could be read; database '{database.name}' is left as it "
                        f"was (first unreadable: {todo[0].path})")
    return summary
