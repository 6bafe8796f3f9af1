"""Opening whole-slide images: OpenSlide for slide formats, PIL for a plain image handed in as a slide.

A slide is addressed in level-0 pixels and read by physical size (µm per pixel), never by a pyramid level
number: :meth:`Slide.level_for` picks the level closest above the wanted resolution, and a caller resizes what it
reads from there. Nothing here holds a whole level in memory: :meth:`Slide.thumbnail` reads its level block by
block.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import openslide
from PIL import Image

from cbir.images import _to_8bit_rgb
from cbir.errors import CbirError

# The formats OpenSlide reads whose extension says "slide"; a .tif/.tiff is a slide when it is tiled (pyramidal).
SLIDE_EXTENSIONS = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
# A plain (untiled) image is read whole by PIL: above this many pixels it must be converted to a pyramid first.
PLAIN_IMAGE_MAX_PIXELS = 20_000 * 20_000
# Resolution a level may lack against the one wanted before we refuse to upsample (levels are rarely exact).
RESOLUTION_TOLERANCE = 1.1
_THUMBNAIL_BLOCK = 4096  # level pixels read at once while building a thumbnail


class SlideError(CbirError):
    """A slide that cannot be used: unreadable, unknown format, no resolution, too small, no tissue."""


def is_slide_file(path: str | Path) -> bool:
    """Whether a file is a whole-slide image: a slide format's extension, or a tiled TIFF OpenSlide recognises."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_EXTENSIONS:
        return True
    if suffix in TIFF_EXTENSIONS and path.is_file():
        try:
            return openslide.OpenSlide.detect_format(str(path)) is not None
        except (OSError, openslide.OpenSlideError):
            return False
    return False


def _rgb(region: Image.Image) -> Image.Image:
    # OpenSlide marks what lies outside the scanned area transparent: it becomes white, like glass.
    return _to_8bit_rgb(region)


@dataclass
class Slide:
    """An open slide with its level-0 resolution (µm per pixel)."""

    path: str
    handle: openslide.AbstractSlide
    mpp: float
    kind: str  # OpenSlide's vendor ("aperio", "generic-tiff", ...) or "plain image"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    def level_for(self, target_mpp: float) -> int:
        """The coarsest level still at least as fine as ``target_mpp`` (read there, then resize down)."""
        if target_mpp * RESOLUTION_TOLERANCE < self.mpp:
            raise SlideError(
                f"{self.path}: scanned at {self.mpp:.4g} µm/px, too coarse for tiles at {target_mpp:.4g} µm/px; "
                "use a larger --tile_um or a lower --magnification"
            )
        best = 0
        for level, downsample in enumerate(self.handle.level_downsamples):
            if self.mpp * downsample <= target_mpp * 1.02:
                best = level
        return best

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> Image.Image:
        """RGB region whose top-left corner is (x, y) at level 0, ``size`` pixels of ``level``."""
        try:
            return _rgb(self.handle.read_region((int(x), int(y)), level, (int(size[0]), int(size[1]))))
        except (openslide.OpenSlideError, OSError, ValueError) as error:
            raise SlideError(f"{self.path}: reading failed, the file may be damaged ({_why(error)})") from None

    def thumbnail(self, downsample: float) -> Image.Image:
        """The whole slide shrunk ``downsample`` times, built block by block from the best level."""
        width, height = self.dimensions
        downsample = max(1.0, float(downsample))
        size = (max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample)))
        level = self.handle.get_best_level_for_downsample(downsample)
        level_width, level_height = self.handle.level_dimensions[level]
        scale = self.handle.level_downsamples[level] / downsample  # thumbnail pixels per level pixel
        canvas = Image.new("RGB", size, "white")
        for top in range(0, level_height, _THUMBNAIL_BLOCK):
            for left in range(0, level_width, _THUMBNAIL_BLOCK):
                w, h = min(_THUMBNAIL_BLOCK, level_width - left), min(_THUMBNAIL_BLOCK, level_height - top)
                x0, y0 = round(left * scale), round(top * scale)
                x1, y1 = max(x0 + 1, round((left + w) * scale)), max(y0 + 1, round((top + h) * scale))
                block = self.read(left * self.handle.level_downsamples[level], top * self.handle.level_downsamples[level],
                                  level, (w, h))
                canvas.paste(block.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
        return canvas

    def close(self) -> None:
        self.handle.close()


def _why(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _slide_mpp(handle: openslide.AbstractSlide) -> float | None:
    properties = handle.properties
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(properties.get(key, "nan"))
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            values.append(value)
    return sum(values) / len(values) if values else None


def _open_plain_image(path: str) -> openslide.ImageSlide:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's warnings about a broken file: the error below says it
            with Image.open(path) as image:
                width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SlideError(f"{path}: neither a slide OpenSlide reads nor an image (unknown format, or a damaged "
                         "file)") from None
    if width * height > PLAIN_IMAGE_MAX_PIXELS:
        raise SlideError(
            f"{path}: a plain {width}×{height} image, not a tiled slide, too large to read whole; convert it to a "
            "tiled pyramidal TIFF first (e.g. vips tiffsave IN OUT.tif --tile --pyramid)"
        )
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size was checked above
    try:
        return openslide.ImageSlide(path)
    except (OSError, ValueError) as error:
        raise SlideError(f"{path}: not a readable image ({_why(error)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide (OpenSlide), or a plain image as a one-level slide (PIL); one-line :class:`SlideError`s.

    ``mpp`` (µm per level-0 pixel) is used where the file's metadata has none; without either, the slide is
    refused, since tiles of a physical size cannot be cut without it.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise SlideError(f"{path}: no such file")
    try:
        handle = openslide.OpenSlide(path)
        kind = handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "slide")
    except openslide.OpenSlideUnsupportedFormatError:
        handle, kind = _open_plain_image(path), "plain image"
    except (openslide.OpenSlideError, OSError) as error:
        raise SlideError(f"{path}: unreadable slide, the file may be damaged ({_why(error)})") from None
    width, height = handle.dimensions
    if width < 1 or height < 1:
        handle.close()
        raise SlideError(f"{path}: the slide is empty (0 pixels)")
    found = _slide_mpp(handle)
    if found is None and mpp is None:
        power = handle.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        hint = f" (its metadata gives objective {power}×, often about {10 / float(power):.3g} µm/px)" if _number(power) else ""
        handle.close()
        raise SlideError(f"{path}: the slide does not say its resolution; give --mpp (µm per pixel at full "
                         f"resolution){hint}")
    if mpp is not None and mpp <= 0:
        handle.close()
        raise SlideError(f"--mpp must be positive, got {mpp}")
    return Slide(path, handle, float(found if found is not None else mpp), kind)


def _number(text) -> bool:
    try:
        return float(text) > 0
    except (TypeError, ValueError):
        return False


@lru_cache(maxsize=8)
def _cached(path: str, mpp: float | None, pid: int) -> Slide:
    return open_slide(path, mpp=mpp)


def cached_slide(path: str, mpp: float | None = None) -> Slide:
    """An open slide shared by the tiles read in this process (a DataLoader worker opens its own)."""
    return _cached(path, mpp, os.getpid())
