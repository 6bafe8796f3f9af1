"""Slides → tiles of one physical size on the tissue, each a :class:`~cbir.images.Sample` like any image.

A tile is a square of ``tile_um`` micrometres, stored as ``tile_px`` pixels (so at ``tile_um / tile_px`` µm per
pixel), read from the pyramid level closest above that resolution and resized. Its identity -- the path the
database keys it by -- is ``<slide path>#<x>,<y>,<w>,<h>``, its box in level-0 pixels: stable across runs, so
re-running an interrupted indexing adds only the missing tiles, as it does for image folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.images import Sample, UnreadableImage
from cbir.errors import CbirError
from cbir.slides.mosaic import colour_features, select_mosaic
from cbir.slides.reader import Slide, SlideError, cached_slide, open_slide
from cbir.slides.tissue import area_fractions, tissue_mask

DEFAULT_TILE_PX = 224
DEFAULT_TILE_UM = 112.0  # 224 px at 0.5 µm/px: "20×"
# Thumbnail: 16 px per tile side, coarser when that would exceed 2048 px on the long side (a tissue share per tile
# needs no more; a large slide's thumbnail stays a few megapixels).
_THUMBNAIL_PX_PER_TILE = 16
_THUMBNAIL_MAX_SIDE = 2048


def magnification_mpp(magnification: float) -> float:
    """The usual reading of an objective's magnification: 10× ≈ 1 µm/px, 20× ≈ 0.5, 40× ≈ 0.25."""
    return 10.0 / magnification


@dataclass(frozen=True)
class TilingSpec:
    """What a tile is: ``tile_um`` micrometres a side, ``tile_px`` pixels a side; which tiles are tissue; the mosaic."""

    tile_um: float = DEFAULT_TILE_UM
    tile_px: int = DEFAULT_TILE_PX
    tissue_min: float = 0.5
    mosaic_fraction: float = 0.05
    seed: int = 0

    @property
    def mpp(self) -> float:
        return self.tile_um / self.tile_px

    @classmethod
    def from_flags(cls, tile_um: float | None = None, magnification: float | None = None,
                   tile_px: int | None = None, *, defaults: dict | None = None, **others) -> "TilingSpec":
        """From ``--tile_um`` / ``--magnification`` / ``--tile_px``; what is not given comes from ``defaults``
        (the tiling a database was built with), else the defaults above."""
        defaults = defaults or {}
        px = int(tile_px or defaults.get("tile_px") or DEFAULT_TILE_PX)
        if px < 8:
            raise CbirError(f"--tile_px must be at least 8, got {px}")
        if magnification is not None and magnification <= 0:
            raise CbirError(f"--magnification must be positive, got {magnification}")
        if tile_um is not None and tile_um <= 0:
            raise CbirError(f"--tile_um must be positive, got {tile_um}")
        if tile_um is None:
            if magnification is not None:
                tile_um = px * magnification_mpp(magnification)
            else:
                tile_um = float(defaults.get("tile_um") or DEFAULT_TILE_UM)
        elif magnification is not None and tile_px is None:
            px = max(8, round(tile_um / magnification_mpp(magnification)))
        spec = cls(float(tile_um), px, **others)
        if not 0 <= spec.tissue_min <= 1:
            raise CbirError(f"--tissue_min must lie between 0 and 1, got {spec.tissue_min}")
        if not 0 < spec.mosaic_fraction <= 1:
            raise CbirError(f"--mosaic_fraction must lie in (0, 1], got {spec.mosaic_fraction}")
        return spec


@dataclass(frozen=True)
class SlideSource:
    """A slide to index or query: its file, its class, and its patient when known."""

    path: str
    class_name: str
    patient: str | None = None


@dataclass(frozen=True)
class TileSample(Sample):
    """A square of a slide: ``box`` (x, y, w, h) in level-0 pixels, read at ``level`` and resized to ``out``."""

    slide: str
    box: tuple[int, int, int, int]
    level: int
    read_size: tuple[int, int]
    out_size: tuple[int, int]
    slide_mpp: float

    def load(self, *, draft_size: int | None = None) -> Image.Image:  # noqa: ARG002 — a region is read at its level
        try:
            region = cached_slide(self.slide, self.slide_mpp).read(self.box[0], self.box[1], self.level, self.read_size)
        except SlideError as error:
            raise UnreadableImage(str(error)) from None
        return region if region.size == self.out_size else region.resize(self.out_size, Image.Resampling.BILINEAR)


def tile_path(slide: str, box) -> str:
    return f"{slide}#{box[0]},{box[1]},{box[2]},{box[3]}"


def make_tile(slide: Slide, box, class_name: str, spec: TilingSpec, level: int) -> TileSample:
    """The tile of ``slide`` covering level-0 ``box``, read at ``level`` and stored at ``spec.mpp``."""
    x, y, w, h = (int(v) for v in box)
    downsample = slide.handle.level_downsamples[level]
    read_size = (max(1, round(w / downsample)), max(1, round(h / downsample)))
    out_size = (max(1, round(w * slide.mpp / spec.mpp)), max(1, round(h * slide.mpp / spec.mpp)))
    return TileSample(tile_path(slide.path, (x, y, w, h)), class_name, slide.path, (x, y, w, h), level, read_size,
                      out_size, slide.mpp)


@dataclass
class TiledSlide:
    """A slide cut into tissue tiles, with what tiling saw: thumbnail, mask, mosaic."""

    source: SlideSource
    slide: Slide
    tiles: list[TileSample]
    mosaic: np.ndarray  # indices into tiles
    thumbnail: Image.Image
    mask: np.ndarray
    downsample: float  # level-0 pixels per thumbnail pixel
    spec: TilingSpec
    grid_tiles: int = 0  # tiles of the whole grid, tissue or not
    extras: list[dict] = field(default_factory=list)

    def mosaic_tiles(self) -> list[TileSample]:
        return [self.tiles[i] for i in self.mosaic.tolist()]


def thumbnail_downsample(slide: Slide, tile_side0: float) -> float:
    return max(1.0, tile_side0 / _THUMBNAIL_PX_PER_TILE, max(slide.dimensions) / _THUMBNAIL_MAX_SIDE)


def tile_slide(source: SlideSource, spec: TilingSpec, *, mpp: float | None = None) -> TiledSlide:
    """Open ``source``, find its tissue on a thumbnail and cut the grid of tissue tiles; :class:`SlideError` (one
    line) for a slide that cannot give any."""
    slide = open_slide(str(Path(source.path).resolve()), mpp=mpp)
    try:
        return _tile(slide, source, spec)
    except SlideError:
        slide.close()
        raise


def _tile(slide: Slide, source: SlideSource, spec: TilingSpec) -> TiledSlide:
    level = slide.level_for(spec.mpp)
    side0 = max(1, round(spec.tile_um / slide.mpp))
    width, height = slide.dimensions
    columns, rows = width // side0, height // side0
    if columns == 0 or rows == 0:
        raise SlideError(f"{slide.path}: {width}×{height} px at {slide.mpp:.4g} µm/px is smaller than one tile of "
                         f"{spec.tile_um:g} µm ({side0} px); use a smaller --tile_um")
    downsample = thumbnail_downsample(slide, side0)
    thumbnail = slide.thumbnail(downsample)
    mask = tissue_mask(thumbnail)
    grid_y, grid_x = np.mgrid[0:rows, 0:columns]
    boxes = np.stack([grid_x.ravel() * side0, grid_y.ravel() * side0,
                      np.full(grid_x.size, side0), np.full(grid_x.size, side0)], axis=1)
    tissue = area_fractions(mask, boxes, downsample) >= max(spec.tissue_min, 1e-9)
    boxes = boxes[tissue]
    if not len(boxes):
        raise SlideError(f"{slide.path}: no tissue found ({mask.mean():.1%} of the thumbnail looks like tissue, no "
                         f"tile has {spec.tissue_min:.0%} of it); lower --tissue_min if this is wrong")
    colours = colour_features(np.asarray(thumbnail), boxes, downsample)
    mosaic = select_mosaic(colours, boxes[:, :2] / side0, spec.mosaic_fraction, seed=spec.seed)
    tiles = [make_tile(slide, box, source.class_name, spec, level) for box in boxes.tolist()]
    in_mosaic = np.zeros(len(tiles), dtype=bool)
    in_mosaic[mosaic] = True
    extras = [{"slide": slide.path, "box": list(t.box), "slide_mpp": slide.mpp, "mpp": spec.mpp, "tile_um": spec.tile_um,
               "tile_px": spec.tile_px, "mosaic": bool(m), "patient": source.patient}
              for t, m in zip(tiles, in_mosaic.tolist())]
    return TiledSlide(source, slide, tiles, mosaic, thumbnail, mask, downsample, spec, columns * rows, extras)


def region_tiles(slide: Slide, region, spec: TilingSpec, class_name: str = "") -> list[TileSample]:
    """The tiles covering a level-0 ``region`` (x, y, w, h): its grid of whole tiles, or the one tile centred on it
    when it is smaller than a tile."""
    x, y, w, h = (int(v) for v in region)
    width, height = slide.dimensions
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise CbirError(f"--region {x},{y},{w},{h} does not lie inside the slide ({width}×{height} px at level 0)")
    level = slide.level_for(spec.mpp)
    side0 = max(1, round(spec.tile_um / slide.mpp))
    if side0 > width or side0 > height:
        raise SlideError(f"{slide.path}: smaller than one tile of {spec.tile_um:g} µm ({side0} px)")
    columns, rows = max(1, w // side0), max(1, h // side0)
    # Centre the grid on the region; a region smaller than a tile gets the tile centred on it, kept on the slide.
    left = min(max(0, x + (w - columns * side0) // 2), width - columns * side0)
    top = min(max(0, y + (h - rows * side0) // 2), height - rows * side0)
    return [make_tile(slide, (left + c * side0, top + r * side0, side0, side0), class_name, spec, level)
            for r in range(rows) for c in range(columns)]


def check_region_size(tiles: list, limit: int = 256) -> None:
    if len(tiles) > limit:
        raise CbirError(f"the region holds {len(tiles)} tiles; give one of at most {limit} tiles "
                        f"(search a whole slide without --region)")

