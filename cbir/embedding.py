"""Batched feature extraction: worker processes decode and resize while the encoder runs.

Workers turn samples into uint8 batches (:meth:`cbir.images.Sample.load_prepared`: JPEGs decoded at reduced scale where the
model's input allows); a bounded number of batches is in flight, so memory stays flat on any collection while the
model never waits on a decoder that keeps up. The encoder (:mod:`cbir.inference`) normalises and embeds. No torch
here: a search through ONNX Runtime never imports it.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cbir.images import Sample, UnreadableImage
from cbir.inference import as_encoder, available_cores, default_batch_size, pick_device  # noqa: F401 — pick_device re-exported

log = logging.getLogger(__name__)


def decoding_workers(n_images: int | None = None, batch_size: int = 32) -> int:
    """Decoding processes: none for what fits in one batch (a worker's start costs more than it saves), else
    one per core but the one the model runs on, at most 4."""
    if n_images is not None and n_images <= batch_size:
        return 0
    return max(1, min(4, available_cores() - 1))


@dataclass
class Embeddings:
    samples: list[Sample]  # the readable ones, in the order of the rows of ``vectors``
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    skipped: list[Sample] = field(default_factory=list)
    seconds_model: float = 0.0
    seconds_total: float = 0.0


def _decode(job: tuple[list[Sample], int]) -> tuple[list[int], np.ndarray | None, list[str]]:
    """In a worker: the readable images of a batch as one uint8 array, their positions, and why the others failed."""
    samples, size = job
    kept, arrays, problems = [], [], []
    for position, sample in enumerate(samples):
        try:
            arrays.append(sample.load_prepared(size))  # a file, or a slide tile reading its region
            kept.append(position)
        except UnreadableImage as exc:
            problems.append(str(exc))
    return kept, (np.stack(arrays) if arrays else None), problems


def iter_prepared(samples: list[Sample], input_size: int, *, batch_size: int = 32, num_workers: int | None = None):
    """Yield (indices into ``samples``, uint8 batch) in order, decoded by ``num_workers`` processes (0: here).

    Unreadable files are warned about and left out of the indices.
    """
    workers = decoding_workers(len(samples), batch_size) if num_workers is None else num_workers
    starts = range(0, len(samples), batch_size)
    jobs = ((samples[i : i + batch_size], input_size) for i in starts)

    def finished(start: int, result) -> tuple[list[int], np.ndarray] | None:
        kept, batch, problems = result
        for problem in problems:
            log.warning("skipping %s", problem)
        return None if batch is None else ([start + k for k in kept], batch)

    if workers == 0:
        for start, job in zip(starts, jobs):
            out = finished(start, _decode(job))
            if out is not None:
                yield out
        return
    # fork: the workers inherit the imported modules and start in milliseconds; they never touch the model.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        start_iter = iter(starts)
        for start, job in zip(start_iter, jobs):
            pending.append((start, pool.apply_async(_decode, (job,))))
            if len(pending) >= 2 * workers:  # enough ahead to hide decoding, bounded to keep memory flat
                break
        while pending:
            start, result = pending.popleft()
            job = next(jobs, None)
            if job is not None:
                pending.append((next(start_iter), pool.apply_async(_decode, (job,))))
            out = finished(start, result.get())
            if out is not None:
                yield out


def iter_embeddings(encoder, samples: list[Sample], *, batch_size: int | None = None, num_workers: int | None = None,
                    device=None, progress: bool = False):
    """Yield (samples, vectors, model seconds) batch by batch, skipping unreadable files (warned about).

    ``encoder``: from :func:`cbir.inference.load_encoder`, or a bare extractor (run in PyTorch).
    """
    from tqdm import tqdm

    encoder = as_encoder(encoder, device)
    batch_size = batch_size or default_batch_size(encoder)
    batches = iter_prepared(samples, encoder.input_size, batch_size=batch_size, num_workers=num_workers)
    bar = tqdm(total=len(samples), desc="embedding", unit="img", disable=not progress, leave=False)
    for indices, images in batches:
        start = time.perf_counter()
        vectors = np.asarray(encoder(images), dtype=np.float32)
        seconds = time.perf_counter() - start
        bar.update(len(indices))
        yield [samples[i] for i in indices], vectors, seconds
    bar.close()


def embedding_search(encoder, answer, *, batch_size: int | None = None, num_workers: int | None = None):
    """``search(paths) -> (result paths, result classes, timings)``, the shape :func:`cbir.evaluation.evaluate`
    calls: the queries are embedded, then ``answer(vectors) -> (paths per row, classes per row)`` answers them.

    Timings per batch: ``model`` (forward passes), ``transfer`` (decoding, resizing and moving images: the rest of
    embedding), ``search`` (the answer). An unreadable query gets no results and so counts as a miss.
    """

    def search(paths: list[str]):
        embedded = embed(encoder, [Sample(p, "") for p in paths], batch_size=batch_size, num_workers=num_workers)
        start = time.perf_counter()
        found_paths, found_classes = answer(embedded.vectors) if embedded.samples else ([], [])
        seconds_search = time.perf_counter() - start
        row = {s.path: i for i, s in enumerate(embedded.samples)}
        timings = {"model": embedded.seconds_model, "transfer": embedded.seconds_total - embedded.seconds_model,
                   "search": seconds_search}
        return ([found_paths[row[p]] if p in row else [] for p in paths],
                [found_classes[row[p]] if p in row else [] for p in paths], timings)

    return search


def embed(encoder, samples: list[Sample], **kwargs) -> Embeddings:
    """All vectors of ``samples`` at once (queries, evaluation); indexing streams with :func:`iter_embeddings`."""
    start = time.perf_counter()
    kept, chunks, model_seconds = [], [], 0.0
    encoder = as_encoder(encoder, kwargs.pop("device", None))
    for batch_samples, vectors, seconds in iter_embeddings(encoder, samples, **kwargs):
        kept.extend(batch_samples)
        chunks.append(vectors)
        model_seconds += seconds
    kept_set = set(kept)
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embedding_size), np.float32)
    return Embeddings(kept, vectors, [s for s in samples if s not in kept_set], model_seconds,
                      time.perf_counter() - start)
