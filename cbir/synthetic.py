"""A small synthetic class-folder data set (no download): textures and shapes in two 'projects'.

Each class has its own pattern with random colour, scale, phase and noise, so retrieval is learnable but not
trivial. Used by the demo and the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cbir.files import make_folders, save_atomically

CLASSES = ("texture_stripes", "texture_checker", "shapes_disc", "shapes_ring")


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    period = rng.uniform(0.08, 0.16)
    if kind == "texture_stripes":
        angle = rng.uniform(0, np.pi)
        mask = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 6.3)) > 0
    elif kind == "texture_checker":
        mask = (np.floor(x / period + rng.uniform()) + np.floor(y / period + rng.uniform())) % 2 == 0
    else:
        cx, cy, radius = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.18, 0.3)
        distance = np.hypot(x - cx, y - cy)
        mask = distance < radius if kind == "shapes_disc" else np.abs(distance - radius) < radius * 0.25
    return mask


def make_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    mask = _pattern(kind, size, rng)
    foreground, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = np.where(mask[..., None], foreground, background) + rng.normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_dataset(root: str | Path, *, splits: dict[str, int] | None = None, size: int = 64, seed: int = 0,
                 classes: tuple[str, ...] = CLASSES) -> dict[str, Path]:
    """Write ``root/<split>/<class>/<i>.png``; returns the split folders. Deterministic for a seed."""
    splits = splits or {"train": 24, "index": 12, "query": 6}
    rng = np.random.default_rng(seed)
    root = Path(root)
    folders = {}
    for split, per_class in splits.items():
        for kind in classes:
            folder = root / split / kind
            make_folders(folder)
            for i in range(per_class):
                save_atomically(folder / f"{kind}_{i:03d}.png", make_image(kind, size, rng).save)
        folders[split] = root / split
    return folders
