"""A slide's mosaic, Yottixel-style: a few percent of its tissue tiles that cover its colours and its extent.

Kalra et al., "Yottixel - An Image Search Engine for Large Archives of Histopathology Whole Slide Images" (2020):
cluster the tissue tiles by colour, then sample each colour cluster spatially (k-means on the tile positions,
the tile nearest each centre). Here colour comes from the tile's footprint on the thumbnail, so the mosaic is
known before a single tile is read at full resolution.
"""

from __future__ import annotations

import numpy as np

COLOUR_CLUSTERS = 9
_BINS = 8


def colour_features(thumbnail: np.ndarray, boxes: np.ndarray, downsample: float) -> np.ndarray:
    """Per level-0 box, the normalised 8-bin histogram of each RGB channel of its thumbnail footprint (n × 24)."""
    height, width = thumbnail.shape[:2]
    features = np.zeros((len(boxes), 3 * _BINS), dtype=np.float32)
    for row, (x, y, w, h) in enumerate(boxes.tolist()):
        x0, y0 = min(int(x / downsample), width - 1), min(int(y / downsample), height - 1)
        x1, y1 = max(x0 + 1, int(np.ceil((x + w) / downsample))), max(y0 + 1, int(np.ceil((y + h) / downsample)))
        pixels = thumbnail[y0:y1, x0:x1].reshape(-1, 3)
        for channel in range(3):
            counts = np.bincount(pixels[:, channel] // (256 // _BINS), minlength=_BINS)
            features[row, channel * _BINS:(channel + 1) * _BINS] = counts / max(1, len(pixels))
    return features


def select_mosaic(colours: np.ndarray, positions: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of the mosaic tiles: about ``fraction`` of the tiles (at least one), one or more from each
    colour cluster; a slide whose mosaic holds fewer than 9 tiles gets that many colour clusters."""
    n = len(colours)
    clusters = min(COLOUR_CLUSTERS, max(1, int(round(fraction * n))))
    if clusters >= n:
        return np.arange(n)
    from threadpoolctl import threadpool_limits  # here, not at the top: every command that may see a slide imports
    # this module, and scikit-learn with SciPy and pandas behind it took 1.9 s of cbir-retrieve's start on an image

    with threadpool_limits(1):  # a few hundred points: threads only wait on each other, badly on a busy machine
        return _sample(colours, positions, fraction, clusters, seed)


def _sample(colours, positions, fraction, clusters, seed) -> np.ndarray:
    from sklearn.cluster import KMeans

    if clusters == 1:
        colour_labels = np.zeros(len(colours), dtype=int)
    else:
        colour_labels = KMeans(clusters, n_init=3, random_state=seed).fit_predict(colours)
    chosen: list[int] = []
    for label in range(clusters):
        members = np.flatnonzero(colour_labels == label)
        if not len(members):
            continue
        wanted = max(1, int(round(fraction * len(members))))
        if wanted >= len(members):
            chosen.extend(members.tolist())
            continue
        if wanted == 1:  # one centre: the cluster's mean position, no k-means needed
            centres = positions[members].mean(axis=0, keepdims=True)
        else:
            centres = KMeans(wanted, n_init=1, random_state=seed).fit(positions[members].astype(np.float64)).cluster_centers_
        for centre in centres:
            nearest = members[int(np.argmin(((positions[members] - centre) ** 2).sum(axis=1)))]
            chosen.append(int(nearest))
    return np.unique(np.asarray(chosen, dtype=np.int64))
