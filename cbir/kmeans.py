"""k-means clusters of images (``cbir-kmeans``, and the labels of ``--generalise 3``).

MiniBatchKMeans (k-means++ initialisation, seeded) on the images' embeddings, from a database or from an extractor
over a folder, or on their raw pixels (the thesis clustered 224×224×3 = 150,528 values per image; an embedding is the
better input, and a smaller ``pixel_size`` makes the pixel variant affordable).

What a run writes into its output folder:

* ``kmeans_centroids.npy``: the model, the cluster centres, a plain array (read back with ``allow_pickle=False``,
  so loading a model never executes code; no pickle or joblib file);
* ``kmeans.json``: how the model was made (input kind, pixel size, the extractor's fingerprint, seed, inertia,
  silhouette, the elbow sweep), used to refuse data the centres do not fit;
* ``cluster_labels.json``: ``{image path: cluster}``; :func:`cbir.labels.read_cluster_labels` reads it;
* ``elbow.png`` (inertia against k) and ``silhouette.png`` (mean silhouette against k).

``load``: ``None`` fits anew; ``"partial"`` reuses the saved centres and labels the given images with them (merged
into the saved labels, the given images' entries replaced); ``"complete"`` reuses the saved centres and labels as
they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix

from cbir.data import UnreadableImage, decoding_threads, load_image
from cbir.embedding import embed
from cbir.errors import CbirError, ParameterError
from cbir.files import atomic_path, make_folders, save_atomically, write_text_atomically
from cbir.labels import LABELS_FILE, read_cluster_labels, save_cluster_labels

log = logging.getLogger(__name__)

__all__ = [
    "LOAD_MODES", "ClusterInput", "KMeansModel", "KMeansRun", "CENTROIDS_FILE", "META_FILE",
    "embeddings_from_database", "embeddings_from_folder", "pixels_of", "fit_kmeans", "assign", "silhouette",
    "elbow_sweep", "parse_range", "plot_elbow", "plot_silhouette", "run_kmeans",
]

LOAD_MODES = (None, "partial", "complete")
CENTROIDS_FILE = "kmeans_centroids.npy"
META_FILE = "kmeans.json"
FORMAT = 1
#: Pixel data above this size is refused up front (a smaller --pixel_size is the remedy), rather than swapping.
MAX_PIXEL_BYTES = 8 * 2**30
_CHUNK = 4096


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class ClusterInput:
    """The images to cluster: their paths (the label keys), classes, and one row of ``data`` each."""

    paths: list[str]
    classes: list[str]
    data: np.ndarray  # (n, d) float32: unit-length embeddings, or pixels scaled to [0, 1]
    kind: str  # "embeddings" or "pixels"
    pixel_size: int | None = None
    extractor: dict | None = None  # what the database records about an extractor (fingerprint...)
    skipped: list[str] = field(default_factory=list)
    source: str = ""


def embeddings_from_database(db) -> ClusterInput:
    """The vectors a database stores, keyed by the paths it stores."""
    items = db.items()
    if not items:
        raise CbirError(f"database '{db.name}' is empty: index images first (cbir-index)")
    ids, vectors = db.vectors()
    by_id = {image_id: (path, cls) for image_id, path, cls in items}
    # Both come sorted by id; an id missing from either side (a concurrent removal) is left out.
    keep = [i for i, image_id in enumerate(ids.tolist()) if image_id in by_id]
    return ClusterInput(
        paths=[by_id[int(ids[i])][0] for i in keep], classes=[by_id[int(ids[i])][1] for i in keep],
        data=np.ascontiguousarray(vectors[keep], dtype=np.float32), kind="embeddings",
        extractor=db.extractor, source=f"database '{db.name}'",
    )


def embeddings_from_folder(extractor, samples, *, batch_size: int = 32, num_workers: int | None = None,
                           source: str = "") -> ClusterInput:
    """Embed ``samples`` (from :func:`cbir.data.list_images`); paths become absolute label keys."""
    embedded = embed(extractor, samples, batch_size=batch_size, num_workers=num_workers)
    if not embedded.samples:
        raise CbirError(f"none of the {len(samples)} images could be read")
    return ClusterInput(
        paths=[os.path.abspath(s.path) for s in embedded.samples], classes=[s.class_name for s in embedded.samples],
        data=embedded.vectors, kind="embeddings", extractor=extractor.describe(),
        skipped=[s.path for s in embedded.skipped], source=source,
    )


def pixels_of(samples, pixel_size: int = 224, *, absolute: bool = True, workers: int | None = None,
              source: str = "") -> ClusterInput:
    """Every image resized to ``pixel_size``² RGB, flattened (as the thesis did), scaled to [0, 1]."""
    if int(pixel_size) < 1:
        raise CbirError(f"--pixel_size must be at least 1, got {pixel_size}")
    size = int(pixel_size)
    dim = size * size * 3
    if len(samples) * dim * 4 > MAX_PIXEL_BYTES:
        needed = len(samples) * dim * 4 / 2**30
        raise CbirError(f"{len(samples)} images of {size}x{size}x3 pixels need {needed:.1f} GiB; "
                        f"use a smaller --pixel_size (e.g. 64) or cluster embeddings instead")
    data = np.empty((len(samples), dim), dtype=np.float32)
    readable = np.zeros(len(samples), dtype=bool)

    def load(i):
        try:
            image = load_image(samples[i].path).resize((size, size))
        except UnreadableImage as exc:
            log.warning("skipping %s", exc)
            return
        data[i] = np.asarray(image, dtype=np.float32).reshape(-1) / 255.0
        readable[i] = True

    # Decoding and resizing release the GIL; threads keep the rows in place without copies.
    with ThreadPoolExecutor(max_workers=workers or decoding_threads()) as pool:
        list(pool.map(load, range(len(samples))))
    if not readable.any():
        raise CbirError(f"none of the {len(samples)} images could be read")
    keep = np.flatnonzero(readable)
    return ClusterInput(
        paths=[os.path.abspath(samples[i].path) if absolute else samples[i].path for i in keep],
        classes=[samples[i].class_name for i in keep], data=data[keep] if len(keep) < len(samples) else data,
        kind="pixels", pixel_size=size, skipped=[samples[i].path for i in np.flatnonzero(~readable)], source=source,
    )


# ---------------------------------------------------------------------------------------------- k-means

def assign(data: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """(nearest centre of each row, inertia: the sum of squared distances to it), chunk by chunk."""
    centroids = np.asarray(centroids, dtype=np.float32)
    centre_norms = (centroids.astype(np.float64) ** 2).sum(1)
    labels = np.empty(len(data), dtype=np.int64)
    inertia = 0.0
    for start in range(0, len(data), _CHUNK):
        chunk = np.asarray(data[start:start + _CHUNK], dtype=np.float32)
        distances = (chunk.astype(np.float64) ** 2).sum(1)[:, None] - 2.0 * (chunk @ centroids.T) + centre_norms
        nearest = distances.argmin(1)
        labels[start:start + len(chunk)] = nearest
        inertia += float(np.maximum(distances[np.arange(len(chunk)), nearest], 0.0).sum())
    return labels, inertia


def fit_kmeans(data: np.ndarray, n_clusters: int = 10, *, seed: int = 0, batch_size: int = 1024
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """MiniBatchKMeans (k-means++, seeded): (centres, labels, inertia)."""
    n = len(data)
    if int(n_clusters) < 2:
        raise CbirError(f"--n_clusters must be at least 2, got {n_clusters}")
    if n < n_clusters:
        raise CbirError(f"{n} images cannot make {n_clusters} clusters; lower --n_clusters")
    model = MiniBatchKMeans(n_clusters=int(n_clusters), init="k-means++", n_init=3, random_state=seed,
                            batch_size=min(batch_size, n), max_no_improvement=20)
    model.fit(data)
    centroids = model.cluster_centers_.astype(np.float32)
    labels, inertia = assign(data, centroids)
    return centroids, labels, inertia


def silhouette(data: np.ndarray, labels: np.ndarray, *, seed: int = 0, sample_size: int = 2000) -> float:
    """Mean silhouette (Euclidean) over a seeded sample of at most ``sample_size`` rows; NaN when undefined."""
    labels = np.asarray(labels)
    n = len(labels)
    if n > sample_size:
        rows = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
        data, labels = data[rows], labels[rows]
    distinct = len(np.unique(labels))
    if distinct < 2 or distinct >= len(labels):
        return math.nan
    return float(silhouette_score(data, labels))


def parse_range(text: str | None, n_images: int) -> list[int]:
    """``"2:20"`` (inclusive), ``"2:20:2"``, ``"2,4,8"`` or ``"none"`` -> the k values, capped at n_images - 1."""
    if text is None or str(text).strip().lower() in ("", "none", "0"):
        return []
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            ks = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        else:
            ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CbirError(f"--elbow_range takes START:STOP[:STEP] (inclusive) or k values 'k1,k2,...' or none; "
                        f"got {text!r}") from None
    bad = [k for k in ks if k < 2]
    if bad or not ks:
        raise CbirError(f"--elbow_range values must be at least 2, got {text!r}")
    return sorted({k for k in ks if k < n_images})


def elbow_sweep(data: np.ndarray, ks: list[int], *, seed: int = 0, batch_size: int = 1024,
                keep: int | None = None) -> tuple[list[dict], tuple | None]:
    """Fit each k: rows of (k, inertia, silhouette); also the fit of ``keep`` when it is among ``ks``."""
    rows, kept = [], None
    for k in ks:
        centroids, labels, inertia = fit_kmeans(data, k, seed=seed, batch_size=batch_size)
        rows.append({"k": int(k), "inertia": inertia, "silhouette": silhouette(data, labels, seed=seed)})
        log.info("k=%d: inertia %.4g, silhouette %.3f", k, inertia, rows[-1]["silhouette"])
        if k == keep:
            kept = (centroids, labels, inertia)
    return rows, kept


def _plot(rows: list[dict], key: str, ylabel: str, title: str, path: Path, chosen: int | None) -> Path:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    ks = [r["k"] for r in rows]
    values = [np.nan if r[key] is None else r[key] for r in rows]
    axes.plot(ks, values, marker="o")
    if chosen is not None and chosen in ks:
        value = values[ks.index(chosen)]
        axes.plot([chosen], [value], marker="o", markersize=12, fillstyle="none", color="tab:red",
                  label=f"chosen k = {chosen}")
        axes.legend()
    axes.set_xlabel("number of clusters k")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.set_xticks(ks)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return save_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100))


def plot_elbow(rows: list[dict], path: str | Path, chosen: int | None = None) -> Path:
    """Inertia (within-cluster sum of squares) against k: the elbow plot."""
    return _plot(rows, "inertia", "inertia (sum of squared distances)", "elbow", Path(path), chosen)


def plot_silhouette(rows: list[dict], path: str | Path, chosen: int | None = None) -> Path:
    """Mean silhouette score against k (higher: better separated clusters)."""
    return _plot(rows, "silhouette", "mean silhouette score", "silhouette", Path(path), chosen)


# ---------------------------------------------------------------------------------------------- files

@dataclass
class KMeansModel:
    """Cluster centres plus how they were made; saved as a .npy array and a JSON file."""

    centroids: np.ndarray
    meta: dict[str, Any]

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def predict(self, data: np.ndarray) -> np.ndarray:
        return assign(data, self.centroids)[0]

    def check_input(self, inputs: ClusterInput) -> None:
        """Refuse data the centres were not made for (another input kind, size or extractor)."""
        made = self.meta
        if inputs.kind != made.get("input"):
            flag = "--pixels" if made.get("input") == "pixels" else "no --pixels"
            raise CbirError(f"the saved model clusters {made.get('input')}, not {inputs.kind}; "
                            f"give the same kind of input ({flag})")
        if inputs.kind == "pixels" and inputs.pixel_size != made.get("pixel_size"):
            raise CbirError(f"the saved model clusters {made.get('pixel_size')} px images; "
                            f"use --pixel_size {made.get('pixel_size')}")
        if inputs.data.shape[1] != self.centroids.shape[1]:
            raise CbirError(f"the saved model's centres have {self.centroids.shape[1]} values; the images give "
                            f"{inputs.data.shape[1]}")
        saved_print = (made.get("extractor") or {}).get("fingerprint")
        given_print = (inputs.extractor or {}).get("fingerprint")
        if saved_print and given_print and saved_print != given_print:
            raise CbirError(f"the saved model was fitted on embeddings of another extractor (fingerprint "
                            f"{saved_print}, these are {given_print}); use the same weights or fit anew")

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = make_folders(out_dir)
        centres, meta = out_dir / CENTROIDS_FILE, out_dir / META_FILE
        with atomic_path(centres, suffix=".npy") as temporary:
            np.save(temporary, self.centroids.astype(np.float32), allow_pickle=False)
        write_text_atomically(meta, json.dumps({**self.meta, "format": FORMAT, "n_clusters": self.n_clusters,
                                                "dim": int(self.centroids.shape[1])}, indent=2, default=_json_default))
        return centres, meta

    @classmethod
    def load(cls, out_dir: str | Path) -> "KMeansModel":
        out_dir = Path(out_dir)
        centres, meta_path = out_dir / CENTROIDS_FILE, out_dir / META_FILE
        if not centres.is_file() or not meta_path.is_file():
            raise CbirError(f"no saved k-means model in {out_dir} (expected {CENTROIDS_FILE} and {META_FILE}); "
                            f"fit one first: cbir-kmeans --out {out_dir} without --load")
        try:
            centroids = np.load(centres, allow_pickle=False)
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise CbirError(f"the k-means model in {out_dir} is damaged ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(meta, dict) or centroids.ndim != 2 or centroids.shape[0] != meta.get("n_clusters") \
                or centroids.shape[1] != meta.get("dim"):
            raise CbirError(f"the k-means model in {out_dir} is inconsistent: {CENTROIDS_FILE} holds an array of "
                            f"shape {centroids.shape}, {META_FILE} says {meta.get('n_clusters')} x {meta.get('dim')}")
        return cls(centroids.astype(np.float32), meta)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value)}")


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---------------------------------------------------------------------------------------------- a run

@dataclass
class KMeansRun:
    """What :func:`run_kmeans` did, and where its files are."""

    load: str | None
    model: KMeansModel
    labels: dict[str, int]
    out_dir: Path
    n_labelled: int = 0  # images labelled in this run
    sweep: list[dict] = field(default_factory=list)
    silhouette: float | None = None
    inertia: float | None = None
    agreement: dict[str, float] | None = None  # against the classes: adjusted Rand index, purity
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def format(self) -> str:
        k = self.model.n_clusters
        sizes = np.bincount(np.fromiter(self.labels.values(), dtype=np.int64), minlength=k)
        made = self.model.meta
        what = {None: "fitted", "partial": "reused the saved model to label",
                "complete": "reused the saved model and labels of"}
        count = self.n_labelled if self.load != "complete" else len(self.labels)
        lines = [f"k-means: {what[self.load]} {count} images, {k} clusters on {made.get('input')}"
                 + (f" ({made.get('pixel_size')} px)" if made.get("input") == "pixels" else "")]
        if self.inertia is not None:
            lines.append(f"inertia {self.inertia:.4g}" + (f", silhouette {self.silhouette:.3f}"
                                                          if self.silhouette is not None else ""))
        if self.agreement:
            lines.append(f"against the classes: adjusted Rand index {self.agreement['adjusted_rand']:.3f}, "
                         f"purity {self.agreement['purity']:.3f}")
        lines.append("images per cluster: " + ", ".join(f"{c}: {n}" for c, n in enumerate(sizes.tolist())))
        if self.sweep:
            lines.append("elbow sweep: " + ", ".join(
                f"k={r['k']} inertia {r['inertia']:.4g} silhouette "
                + ("n/a" if r["silhouette"] is None else f"{r['silhouette']:.3f}") for r in self.sweep))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable images")
        lines += [f"wrote {p}" for p in self.files]
        return "\n".join(lines)


def _agreement(classes: list[str], labels: np.ndarray) -> dict[str, float] | None:
    if len(set(classes)) < 2:
        return None
    # Purity: each cluster counts the images of its most common class.
    purity = contingency_matrix(classes, labels).max(axis=0).sum() / len(classes)
    return {"adjusted_rand": float(adjusted_rand_score(classes, labels)), "purity": float(purity)}


def run_kmeans(inputs: ClusterInput | None, out_dir: str | Path, *, n_clusters: int = 10,
               elbow_range: str | None = "2:20", load: str | None = None, seed: int = 0,
               batch_size: int = 1024) -> KMeansRun:
    """Fit (or reuse, see ``load``) the clusters of ``inputs`` and write the model, labels and figures."""
    if load not in LOAD_MODES:
        raise ParameterError(f"{{load}} must be 'complete' or 'partial' (or left out to fit anew), got {load!r}",
                             "load")
    out_dir = Path(out_dir)
    labels_path = out_dir / LABELS_FILE

    if load == "complete":
        model = KMeansModel.load(out_dir)
        labels = read_cluster_labels(labels_path)
        run = KMeansRun(load, model, labels, out_dir, silhouette=_finite(model.meta.get("silhouette")),
                        inertia=model.meta.get("inertia"))
        if inputs is not None:
            unlabelled = sum(p not in labels for p in inputs.paths)
            if unlabelled:
                log.warning("%d of the %d given images have no saved label; label them with --load partial",
                            unlabelled, len(inputs.paths))
        return run

    if inputs is None:
        raise CbirError("k-means needs images: a database (--db_name) or a folder (--path)")
    if load == "partial":
        model = KMeansModel.load(out_dir)
        model.check_input(inputs)
        new_labels = model.predict(inputs.data)
        labels = read_cluster_labels(labels_path) if labels_path.is_file() else {}
        labels.update({p: int(c) for p, c in zip(inputs.paths, new_labels.tolist())})
        run = KMeansRun(load, model, labels, out_dir, n_labelled=len(inputs.paths),
                        agreement=_agreement(inputs.classes, new_labels), skipped=inputs.skipped)
        run.files.append(save_cluster_labels(labels, labels_path))
        return run

    ks = parse_range(elbow_range, len(inputs.data))
    sweep_ks = sorted(set(ks) | {int(n_clusters)}) if ks else []
    sweep, kept = elbow_sweep(inputs.data, sweep_ks, seed=seed, batch_size=batch_size, keep=int(n_clusters))
    if kept is None:
        kept = fit_kmeans(inputs.data, n_clusters, seed=seed, batch_size=batch_size)
    centroids, fitted, inertia = kept
    score = next((r["silhouette"] for r in sweep if r["k"] == n_clusters), None)
    if score is None:
        score = silhouette(inputs.data, fitted, seed=seed)
    meta = {
        "input": inputs.kind, "pixel_size": inputs.pixel_size, "extractor": inputs.extractor, "seed": seed,
        "inertia": inertia, "silhouette": _finite(score), "n_images": len(inputs.paths), "source": inputs.source,
        "elbow": [{**r, "silhouette": _finite(r["silhouette"])} for r in sweep],
    }
    model = KMeansModel(centroids, meta)
    labels = {p: int(c) for p, c in zip(inputs.paths, fitted.tolist())}
    run = KMeansRun(load, model, labels, out_dir, n_labelled=len(labels), sweep=meta["elbow"],
                    silhouette=_finite(score), inertia=inertia, agreement=_agreement(inputs.classes, fitted),
                    skipped=inputs.skipped)
    run.files += list(model.save(out_dir))
    run.files.append(save_cluster_labels(labels, labels_path))
    if sweep:
        run.files.append(plot_elbow(sweep, out_dir / "elbow.png", int(n_clusters)))
        run.files.append(plot_silhouette(sweep, out_dir / "silhouette.png", int(n_clusters)))
    return run
