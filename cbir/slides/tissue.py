"""Tissue detection on a slide thumbnail: stained tissue is coloured or dark, glass is bright and grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cbir.files import save_atomically

# Otsu's threshold on the "stain" score, kept inside these bounds: never below MIN_STAIN, so a blank slide has no
# tissue to split off (glass scores about 0.04); never above MAX_STAIN, for when tissue fills most of the thumbnail
# and Otsu splits dark from pale tissue rather than tissue from glass.
MIN_STAIN = 0.08
MAX_STAIN = 0.15


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins)."""
    counts, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def tissue_mask(thumbnail: Image.Image) -> np.ndarray:
    """Boolean mask (height × width) of the thumbnail's tissue pixels.

    A pixel's stain score is the larger of its saturation (eosin, haematoxylin, DAB) and its darkness (dense or
    grey-blue tissue that saturation misses); the threshold is Otsu's on that score, kept within
    [``MIN_STAIN``, ``MAX_STAIN``]. Gaps between tissue strands are closed, specks opened away, holes filled.
    """
    hsv = np.asarray(thumbnail.convert("HSV"), dtype=np.float32) / 255.0
    score = np.maximum(hsv[..., 1], 1.0 - hsv[..., 2])
    threshold = min(max(_otsu(score.ravel()), MIN_STAIN), MAX_STAIN)
    from scipy import ndimage  # here: SciPy's import would slow every command's start, slides or not

    mask = ndimage.binary_closing(score > threshold, iterations=2)
    mask = ndimage.binary_opening(mask, iterations=1)
    return ndimage.binary_fill_holes(mask)


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """The mask as a black-and-white PNG (white = tissue), the size of the thumbnail it was found on."""
    return save_atomically(path, Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save)


def area_fractions(mask: np.ndarray, boxes: np.ndarray, downsample: float) -> np.ndarray:
    """Share of tissue pixels inside each level-0 box (n × 4: x, y, w, h), measured on the mask."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    height, width = mask.shape
    x0 = np.clip(np.floor(boxes[:, 0] / downsample).astype(int), 0, width - 1)
    y0 = np.clip(np.floor(boxes[:, 1] / downsample).astype(int), 0, height - 1)
    x1 = np.clip(np.ceil((boxes[:, 0] + boxes[:, 2]) / downsample).astype(int), x0 + 1, width)
    y1 = np.clip(np.ceil((boxes[:, 1] + boxes[:, 3]) / downsample).astype(int), y0 + 1, height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))
