"""Confusion matrices of an evaluation: the query's class against the class retrieval answered.

scikit-learn and matplotlib are imported only when a matrix is counted or drawn: ``cbir-eval`` without ``--cms``
never loads them (together they would double its start-up time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cbir.files import make_folders, save_atomically

NONE_LABEL = "(none)"


def confusion_counts(per_query: Iterable[Sequence[Any]], column: int) -> tuple[list[str], np.ndarray]:
    """(labels, counts): row = query class, column = the class in ``per_query`` entries' ``column`` (2: first
    result, 3: majority of the first five); a query with no answer counts under ``(none)``, the last label."""
    from sklearn.metrics import confusion_matrix  # see the module doc

    truth = [str(e[1]) for e in per_query]
    predicted = [NONE_LABEL if e[column] is None else str(e[column]) for e in per_query]
    labels = sorted(set(truth) | set(predicted) - {NONE_LABEL})
    if NONE_LABEL in predicted:
        labels.append(NONE_LABEL)
    return labels, confusion_matrix(truth, predicted, labels=labels)


def _draw(labels: list[str], counts: np.ndarray, name: str, xlabel: str, target: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state (see the module doc)

    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    n = len(labels)
    side = min(max(6.0, 0.32 * n + 3.0), 40.0)
    font = max(4.0, min(10.0, 220.0 / max(n, 1)))
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the query class")
    axes.set_xticks(range(n), labels, rotation=90, fontsize=font)
    axes.set_yticks(range(n), labels, fontsize=font)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("query class")
    total = int(counts.sum())
    axes.set_title(f"{name}: {total} queries, accuracy {np.trace(counts) / total:.3f}")
    if n <= 40:  # past that, numbers in every cell are unreadable
        for r, c in zip(*np.nonzero(counts)):
            axes.text(c, r, str(counts[r, c]), ha="center", va="center", fontsize=font,
                      color="white" if shares[r, c] > 0.5 else "black")
    return save_atomically(target, lambda temporary: figure.savefig(temporary, dpi=100, bbox_inches="tight"))


def plot_confusion_matrices(per_query: Iterable[Sequence[Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Draw ``top1.png`` (query class vs first result's class) and ``majority.png`` (vs the most common class of
    the first five) into ``out_dir``; cells are counts, coloured by their share of the row."""
    entries = [tuple(entry) for entry in per_query]
    if not entries:
        raise ValueError("no query outcome to draw a confusion matrix from")
    out_dir = make_folders(out_dir)
    written = []
    for column, name, xlabel in ((2, "top1", "class of the first result"),
                                 (3, "majority", "most common class of the first five")):
        labels, counts = confusion_counts(entries, column)
        written.append(_draw(labels, counts, name, xlabel, out_dir / f"{name}.png"))
    return written
