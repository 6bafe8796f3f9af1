"""A slide as a query: a region of it → similar tiles on their slides, or the whole slide → similar slides; the
printed answer and the figure."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from cbir.errors import CbirError
from cbir.files import write_file
from cbir.retrieval import results_folder
from cbir.slides.figures import plot_slide_search
from cbir.slides.reader import SlideError, open_slide
from cbir.slides.search import SlideHit, TileHit, query_vectors, rank_slides, same_slide, search_tiles
from cbir.slides.tiling import SlideSource, TilingSpec, check_region_size, make_tile, region_tiles, tile_slide

_THUMBNAIL_SIDE = 480


@dataclass
class SlideQueryResult:
    query: SlideSource
    query_tiles: list  # TileSample
    tiles: list[TileHit] | None = None  # a region query
    slides: list[SlideHit] | None = None  # a slide query
    figure: Path | None = None

    def format(self) -> str:
        lines = []
        if self.tiles is not None:
            lines.append(f"region of {self.query.path} ({len(self.query_tiles)} tiles): nearest tiles")
            for hit in self.tiles:
                where = f"{hit.slide} box {','.join(map(str, hit.box))}" if hit.box else hit.path
                lines.append(f"  {hit.rank:>3}  {hit.distance:.4f}  {hit.class_name:<24} {where}")
        else:
            lines.append(f"slide {self.query.path} ({len(self.query_tiles)} mosaic tiles): nearest slides "
                         "(median of each mosaic tile's best distance)")
            for hit in self.slides:
                lines.append(f"  {hit.rank:>3}  {hit.score:.4f}  {hit.class_name:<24} {hit.slide}")
        if self.figure:
            lines.append(f"  figure: {self.figure}")
        return "\n".join(lines)


def _thumbnail(path: str, mpp: float | None):
    """(thumbnail, level-0 px per thumbnail pixel) of a slide, or None when it cannot be opened any more."""
    try:
        slide = open_slide(path, mpp=mpp)
    except SlideError:
        return None
    try:
        downsample = max(1.0, max(slide.dimensions) / _THUMBNAIL_SIDE)
        return slide.thumbnail(downsample), downsample
    except SlideError:
        return None
    finally:
        slide.close()


def search_slide(extractor, database, source: SlideSource, spec: TilingSpec, k: int, *, region=None,
                 mpp: float | None = None, nprobe=None, batch_size: int = 32, num_workers: int | None = None,
                 results_dir: str | Path | None = None) -> SlideQueryResult:
    """Search ``database`` with a region of a slide (level-0 x, y, w, h) or, without ``region``, the slide's mosaic;
    draw the figure into ``results_dir``."""
    database.check_extractor(extractor.describe())
    if region is not None:
        slide = open_slide(str(Path(source.path).resolve()), mpp=mpp)
        try:
            tiles = region_tiles(slide, region, spec, source.class_name)
        finally:
            slide.close()
        check_region_size(tiles)
        vectors = query_vectors(extractor, tiles, batch_size=batch_size, num_workers=num_workers)
        merged: dict[str, TileHit] = {}
        for hits in search_tiles(database, vectors, k, nprobe=nprobe):
            for hit in hits:
                if hit.path not in merged or hit.distance < merged[hit.path].distance:
                    merged[hit.path] = hit
        best = sorted(merged.values(), key=lambda h: (h.distance, h.path))[:k]
        for rank, hit in enumerate(best, start=1):
            hit.rank = rank
        result = SlideQueryResult(source, tiles, tiles=best)
    else:
        tiled = tile_slide(source, spec, mpp=mpp)
        tiled.slide.close()
        tiles = tiled.mosaic_tiles()
        vectors = query_vectors(extractor, tiles, batch_size=batch_size, num_workers=num_workers)
        # The query slide itself, when stored, would come first: it is left out.
        ranked = rank_slides(database, vectors, exclude=same_slide(tiled.slide.path), nprobe=nprobe,
                             excluded_most=len(tiled.tiles))
        result = SlideQueryResult(source, tiles, slides=ranked[:k])
    if results_dir is not None:
        result.figure = draw(result, database, Path(results_dir), mpp)
    return result


def draw(result: SlideQueryResult, database, results_dir: Path, mpp: float | None) -> Path:
    query = result.query
    query_thumbnail = _thumbnail(str(Path(query.path).resolve()), mpp)
    query_images = [tile.load() for tile in result.query_tiles[:16]]
    boxes = [tile.box for tile in result.query_tiles]
    panels = []
    if result.tiles is not None:
        extras = dict(zip([h.path for h in result.tiles], database.extra([h.path for h in result.tiles])))
        for hit in result.tiles:
            extra = extras.get(hit.path) or {}
            image = _tile_image(hit, extra)
            panels.append({
                "thumbnail": _thumbnail(hit.slide, hit.slide_mpp) if hit.slide else None,
                "boxes": [hit.box] if hit.box else [], "tile": image, "hit": hit.class_name == query.class_name,
                "title": f"{hit.rank}. {hit.class_name}\ndistance {hit.distance:.3f}",
                "slide_title": Path(hit.slide or hit.path).name,
            })
        title = f"region of {Path(query.path).name}: {len(result.tiles)} nearest tiles"
    else:
        for hit in result.slides:
            panels.append({
                "thumbnail": _thumbnail(hit.slide, hit.slide_mpp), "boxes": [b for b, _ in hit.regions],
                "hit": hit.class_name == query.class_name,
                "title": f"{hit.rank}. {hit.class_name}\n{Path(hit.slide).name}\nscore {hit.score:.3f}",
            })
        title = f"slide {Path(query.path).name} ({query.class_name}): {len(result.slides)} nearest slides"
    figure = io.BytesIO()
    plot_slide_search(query_images, query_thumbnail, boxes, f"{Path(query.path).name}\n{query.class_name}",
                      panels, figure, title=title)
    with results_folder(results_dir) as (folder, where):  # never written through a planted link (SECURITY.md)
        write_file("slide_search.png", figure.getvalue(), dir_fd=folder)
    return where / "slide_search.png"


def _tile_image(hit: TileHit, extra: dict):
    """The stored tile's picture, read again from its slide (None when the slide is gone)."""
    if "box" not in extra:
        return None
    try:
        slide = open_slide(extra["slide"], mpp=extra.get("slide_mpp"))
    except SlideError:
        return None
    try:
        spec = TilingSpec(extra["tile_um"], int(extra["tile_px"]))
        return make_tile(slide, extra["box"], hit.class_name, spec, slide.level_for(spec.mpp)).load()
    except CbirError:
        return None
    finally:
        slide.close()
