"""t-SNE maps of a database's stored vectors: one panel coloured by class, one by k-means cluster when given."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state
from sklearn.manifold import TSNE

from cbir.errors import CbirError
from cbir.files import save_atomically
from cbir.labels import balanced_rounds, clusters_for

log = logging.getLogger("cbir")

#: Below this many points t-SNE has nothing to show (and sklearn needs perplexity < n).
MIN_POINTS = 5
EXACT_UP_TO = 1000


@dataclass
class TsneMap:
    """The 2-d points of a t-SNE run and what was drawn."""

    points: np.ndarray
    classes: list[str]
    clusters: list[int | None] | None
    perplexity: float
    total: int
    notes: list[str] = field(default_factory=list)
    figure: Path | None = None

    def format(self) -> str:
        shown = len(self.classes)
        sampled = f" (a class-balanced sample of {self.total})" if shown < self.total else ""
        lines = [f"t-SNE of {shown} vectors{sampled}, {len(set(self.classes))} classes, "
                 f"perplexity {self.perplexity:.3g}"]
        lines += self.notes
        if self.figure is not None:
            lines.append(f"figure: {self.figure}")
        return "\n".join(lines)


def balanced_sample(classes: list[str], max_points: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` items, round-robin over the classes (see :func:`cbir.labels.balanced_rounds`)
    so that small classes stay visible on the map. Sorted; all when under the cap."""
    if not max_points or len(classes) <= max_points:
        return np.arange(len(classes))
    return np.sort(np.array(balanced_rounds(classes, seed=seed, limit=max_points)[:max_points], dtype=np.int64))


def embed_2d(vectors: np.ndarray, *, perplexity: float = 30.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """2-d t-SNE of ``vectors``; returns the points and the perplexity used (lowered for small sets, where
    sklearn refuses a perplexity not below the number of points)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < MIN_POINTS:
        raise CbirError(f"t-SNE needs at least {MIN_POINTS} vectors, the database holds {n}")
    if perplexity <= 0:
        raise CbirError(f"--perplexity must be positive, got {perplexity}")
    used = float(min(perplexity, max(1.0, (n - 1) / 3)))
    # Exact gradients up to a thousand points: more faithful, and faster there than Barnes-Hut, whose OpenMP
    # threads cost more than they save on small sets (and stall on a busy machine).
    method = "exact" if n <= EXACT_UP_TO else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed, method=method)
    return tsne.fit_transform(vectors), used


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _palette(n: int):
    """Distinct colours (and markers, once colours run out) for n groups."""
    if n <= 10:
        colours = list(matplotlib.colormaps["tab10"].colors)
    elif n <= 20:
        colours = list(matplotlib.colormaps["tab20"].colors)
    else:
        cmap = matplotlib.colormaps["turbo"]
        colours = [cmap(i / max(1, n - 1)) for i in range(n)]
    markers = "osD^v<>Pp*X"
    # With many groups, neighbouring hues look alike: the marker tells them apart.
    return [(colours[i % len(colours)], markers[(i // 20) % len(markers)] if n > 20 else "o") for i in range(n)]


def _scatter(ax, points: np.ndarray, labels: list, title: str, legend_title: str) -> None:
    groups = sorted({label for label in labels if label is not None}, key=lambda v: (str(type(v)), v))
    style = _palette(len(groups))
    labels_arr = np.array([("" if v is None else str(v)) for v in labels], dtype=object)
    size = 24 if len(points) < 500 else 10 if len(points) < 2000 else 5
    for (colour, marker), group in zip(style, groups):
        mask = labels_arr == str(group)
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colour, marker=marker, alpha=0.8, linewidths=0,
                   label=f"{_short(str(group))} ({int(mask.sum())})")
    missing = labels_arr == ""
    if missing.any():
        ax.scatter(points[missing, 0], points[missing, 1], s=size, color="lightgrey", marker="x", alpha=0.8,
                   label=f"no label ({int(missing.sum())})")
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    n_entries = len(groups) + int(missing.any())
    columns = 1 if n_entries <= 25 else 2 if n_entries <= 50 else 3
    ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7 if n_entries > 15 else 8,
              title_fontsize=8, ncol=columns, markerscale=1.6 if size < 10 else 1.0, frameon=False)


def plot_tsne(points: np.ndarray, classes: list[str], path: str | Path, *, clusters: list | None = None,
              title: str = "") -> Path:
    """One panel coloured by class; a second coloured by cluster when ``clusters`` is given. Legend outside."""
    path = Path(path)
    panels = 2 if clusters is not None else 1
    n_classes = len(set(classes))
    legend_width = 2.6 if n_classes <= 25 else 4.8 if n_classes <= 50 else 7.0
    fig = Figure(figsize=(panels * (6.0 + legend_width), 6.0 + max(0, n_classes - 30) * 0.05))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _scatter(axes[0], points, list(classes), "coloured by class", "class (images)")
    if clusters is not None:
        _scatter(axes[1], points, list(clusters), "coloured by k-means cluster", "cluster (images)")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=100))


def tsne_of_database(db, out: str | Path, *, perplexity: float = 30.0, max_points: int | None = 5000, seed: int = 0,
                     cluster_labels: dict[str, int] | None = None) -> TsneMap:
    """t-SNE of the vectors stored in ``db`` (a cbir Database), drawn into ``out``."""
    items = db.items()
    if len(items) < MIN_POINTS:
        raise CbirError(f"database '{db.name}' holds {len(items)} images: t-SNE needs at least {MIN_POINTS}")
    ids = np.array([item[0] for item in items], dtype=np.int64)
    paths = [item[1] for item in items]
    classes = [item[2] for item in items]
    keep = balanced_sample(classes, max_points, seed)
    found, vectors = db.vectors(ids[keep])
    # vectors() answers in the order of the ids it was given; check, so that no point gets another's class.
    if not np.array_equal(found, ids[keep]):
        order = {int(i): k for k, i in enumerate(found)}
        vectors = vectors[[order[int(i)] for i in ids[keep]]]
    classes = [classes[i] for i in keep]
    notes = []
    clusters = None
    if cluster_labels is not None:
        clusters = clusters_for([paths[i] for i in keep], cluster_labels)
        missing = sum(c is None for c in clusters)
        if missing == len(clusters):
            raise CbirError("none of the database's images is in the cluster labels file: give the labels "
                            "cbir-kmeans wrote for this database")
        if missing:
            notes.append(f"{missing} images have no cluster label (drawn grey)")
    log.info("t-SNE of %d vectors of %d values...", len(keep), vectors.shape[1])
    points, used = embed_2d(vectors, perplexity=perplexity, seed=seed)
    if used != perplexity:
        notes.append(f"perplexity lowered from {perplexity:.3g} to {used:.3g}: it must stay below the number of points")
    result = TsneMap(points=points, classes=classes, clusters=clusters, perplexity=used, total=len(items), notes=notes)
    sample = f"{len(keep)} of {len(items)}" if len(keep) < len(items) else f"{len(items)}"
    result.figure = plot_tsne(points, classes, out, clusters=clusters,
                              title=f"t-SNE of database '{db.name}' ({sample} images, perplexity {used:.3g})")
    return result
