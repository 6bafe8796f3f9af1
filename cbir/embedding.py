"""Batched feature extraction: DataLoader workers decode and resize while the model runs, in inference mode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cbir.data import ImageDataset, Sample, collate_skipping, default_workers


def pick_device(gpu_id: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id or 0}")
    return torch.device("cpu")


@dataclass
class Embeddings:
    samples: list[Sample]  # the readable ones, in the order of the rows of ``vectors``
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    skipped: list[Sample] = field(default_factory=list)
    seconds_model: float = 0.0
    seconds_total: float = 0.0


def iter_embeddings(extractor, samples: list[Sample], *, batch_size: int = 32, num_workers: int | None = None,
                    device=None, progress: bool = False):
    """Yield (samples, vectors, model seconds) batch by batch, skipping unreadable files (reported by the dataset)."""
    device = device or pick_device()
    extractor = extractor.to(device).eval()
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(
        ImageDataset(samples, extractor.transform(train=False)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    with torch.inference_mode():
        for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            images, _, indices = batch
            start = time.perf_counter()
            vectors = extractor(images.to(device, non_blocking=True)).float().cpu().numpy()
            yield [samples[i] for i in indices.tolist()], vectors, time.perf_counter() - start


def embedding_search(extractor, answer, *, batch_size: int = 32, num_workers: int | None = None):
    """``search(paths) -> (result paths, result classes, timings)``, the shape :func:`cbir.evaluation.evaluate`
    calls: the queries are embedded, then ``answer(vectors) -> (paths per row, classes per row)`` answers them.

    Timings per batch: ``model`` (forward passes), ``transfer`` (decoding, resizing and moving images: the rest of
    embedding), ``search`` (the answer). An unreadable query gets no results and so counts as a miss.
    """

    def search(paths: list[str]):
        embedded = embed(extractor, [Sample(p, "") for p in paths], batch_size=batch_size, num_workers=num_workers)
        start = time.perf_counter()
        found_paths, found_classes = answer(embedded.vectors) if embedded.samples else ([], [])
        seconds_search = time.perf_counter() - start
        row = {s.path: i for i, s in enumerate(embedded.samples)}
        timings = {"model": embedded.seconds_model, "transfer": embedded.seconds_total - embedded.seconds_model,
                   "search": seconds_search}
        return ([found_paths[row[p]] if p in row else [] for p in paths],
                [found_classes[row[p]] if p in row else [] for p in paths], timings)

    return search


def embed(extractor, samples: list[Sample], **kwargs) -> Embeddings:
    """All vectors of ``samples`` at once (queries, evaluation); indexing streams with :func:`iter_embeddings`."""
    start = time.perf_counter()
    kept, chunks, model_seconds = [], [], 0.0
    for batch_samples, vectors, seconds in iter_embeddings(extractor, samples, **kwargs):
        kept.extend(batch_samples)
        chunks.append(vectors)
        model_seconds += seconds
    kept_set = set(kept)
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, extractor.embedding_size), np.float32)
    return Embeddings(kept, vectors.astype(np.float32), [s for s in samples if s not in kept_set], model_seconds,
                      time.perf_counter() - start)
