"""Writing pyramidal tiled TIFF slides (the generic format OpenSlide reads), tile by tile, for tests and benchmarks.

Nothing is held but one tile: ``render`` draws each tile of each level on demand and blank ones are written as
the same pre-compressed white tile, so a mostly empty 60,000 × 60,000 slide takes seconds and a few megabytes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

Render = Callable[[int, int, int, float], "np.ndarray | None"]  # (x, y, tile, downsample) -> tile×tile×3 or blank


def write_pyramid(path: str | Path, width: int, height: int, render: Render, *, mpp: float, tile: int = 256,
                  factor: int = 4) -> Path:
    """Write a ``width`` × ``height`` slide at ``mpp`` µm per pixel, levels shrinking ``factor`` times down to one
    tile; ``render(x, y, tile, downsample)`` gives the tile whose corner is (x, y) in that level's pixels."""
    import tifffile

    path = Path(path)
    white = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes(), 6)

    def tiles(level_width, level_height, downsample):
        for y in range(0, level_height, tile):
            for x in range(0, level_width, tile):
                pixels = render(x, y, tile, downsample)
                yield white if pixels is None else zlib.compress(np.ascontiguousarray(pixels, np.uint8).tobytes(), 6)

    downsample = 1
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as writer:
        while True:
            level_width, level_height = -(-width // downsample), -(-height // downsample)
            level_mpp = mpp * downsample
            writer.write(tiles(level_width, level_height, float(downsample)), shape=(level_height, level_width, 3),
                         dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="zlib",
                         subfiletype=0 if downsample == 1 else 1, metadata=None,
                         resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
            if max(level_width, level_height) <= tile:
                break
            downsample *= factor
    return path


def image_render(image: Image.Image) -> Render:
    """A renderer of an in-memory RGB image (small slides: benchmarks), each level shrunk once and cached."""
    levels: dict[float, np.ndarray] = {}

    def render(x, y, tile, downsample):
        if downsample not in levels:
            size = (max(1, round(image.width / downsample)), max(1, round(image.height / downsample)))
            levels[downsample] = np.asarray(image.resize(size, Image.Resampling.BOX) if downsample > 1 else image)
        level = levels[downsample]
        block = np.full((tile, tile, 3), 255, np.uint8)
        part = level[y:y + tile, x:x + tile]
        block[:part.shape[0], :part.shape[1]] = part
        return block

    return render
