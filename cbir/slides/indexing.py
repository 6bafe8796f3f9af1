"""Index slides: tile each one, record every tile's slide, box and mosaic membership, embed and store the tiles.

Tiles go through :func:`cbir.indexing.index_images` like any images, a group of slides at a time, so memory
holds one group's tile list (never a level of a slide) and a re-run after a kill adds only the missing tiles.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cbir.indexing import index_images
from cbir.naming import safe_name
from cbir.slides.reader import SlideError
from cbir.slides.tiling import SlideSource, TilingSpec, tile_slide
from cbir.slides.tissue import save_mask

GROUP_TILES = 20_000  # tiles embedded per call: bounds memory, amortises the start of the decoding workers


@dataclass
class SlideIndexSummary:
    slides: int = 0
    tiles: int = 0
    mosaic_tiles: int = 0
    added: int = 0
    already_stored: int = 0
    skipped_slides: list[tuple[str, str]] = field(default_factory=list)  # (slide, why)
    unreadable_tiles: Counter = field(default_factory=Counter)  # slide -> tiles that could not be read
    masks: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    seconds_model: float = 0.0
    seconds_tiling: float = 0.0

    def format(self, db_name: str, total_in_db: int) -> str:
        lines = [f"indexed {self.added} tiles of {self.slides} slides into '{db_name}' in {self.seconds:.1f} s "
                 f"({self.added / max(self.seconds, 1e-9):.1f} tiles/s; model {self.seconds_model:.1f} s, "
                 f"tissue and tiling {self.seconds_tiling:.1f} s); {self.tiles} tissue tiles, {self.mosaic_tiles} "
                 f"in mosaics; {total_in_db} images in the database"]
        if self.already_stored:
            lines.append(f"{self.already_stored} tiles were already stored and kept as they are")
        if self.masks:
            lines.append(f"tissue masks: {len(self.masks)} in {self.masks[0].parent}")
        if self.skipped_slides:
            lines.append(f"skipped {len(self.skipped_slides)} slides:")
            lines += [f"  {why}" for _, why in self.skipped_slides]
        for slide, count in sorted(self.unreadable_tiles.items()):
            lines.append(f"  {slide}: {count} tiles could not be read (damaged file?); re-run to retry them")
        return "\n".join(lines)


def index_slides(extractor, database, sources: list[SlideSource], spec: TilingSpec, *, mpp: float | None = None,
                 mask_dir: str | Path | None = None, batch_size: int = 32, num_workers: int | None = None,
                 chunk: int = 512, device=None, progress: bool = True, rewrite: bool = False,
                 extractor_info: dict | None = None) -> SlideIndexSummary:
    """Tile, embed and store ``sources``; a slide that cannot be used is skipped and reported in the summary.

    ``rewrite``: replace the database's contents; it is emptied once the first slide is tiled (so a list of
    unusable slides leaves it as it was), before any tile's metadata is written.
    """
    start = time.perf_counter()
    summary = SlideIndexSummary()
    info = extractor_info or extractor.describe()
    if not rewrite:
        database.set_extractor(info)  # vectors of another extractor are refused before any work
    group = []

    def embed_group():
        if not group:
            return
        done = index_images(extractor, database, group, batch_size=batch_size, num_workers=num_workers,
                            device=device, progress=progress, chunk=chunk, extractor_info=info)
        summary.added += done.added
        summary.already_stored += done.already_stored
        summary.seconds_model += done.seconds_model
        summary.unreadable_tiles.update(tile.slide for tile in done.skipped)
        group.clear()

    for source in tqdm(sources, desc="slides", unit="slide", disable=not progress or len(sources) < 2):
        tiling_start = time.perf_counter()
        try:
            tiled = tile_slide(source, spec, mpp=mpp)
        except SlideError as error:
            summary.skipped_slides.append((source.path, str(error)))
            continue
        finally:
            summary.seconds_tiling += time.perf_counter() - tiling_start
        tiled.slide.close()  # tiles reopen it where they are read (each decoding worker its own handle)
        if rewrite and not summary.slides:
            database.clear()
            database.set_extractor(info)
        if mask_dir is not None:
            summary.masks.append(save_mask(tiled.mask, Path(mask_dir) / f"{safe_name(Path(source.path).name)}.mask.png"))
        # The metadata goes first, so a tile is never stored without it (a re-run writes the same again).
        database.set_extra([tile.path for tile in tiled.tiles], tiled.extras)
        summary.slides += 1
        summary.tiles += len(tiled.tiles)
        summary.mosaic_tiles += len(tiled.mosaic)
        group.extend(tiled.tiles)
        if len(group) >= GROUP_TILES:
            embed_group()
    embed_group()
    summary.seconds = time.perf_counter() - start
    return summary
