"""The whole-slide flags shared by cbir-index, cbir-retrieve and cbir-eval, and what they select."""

from __future__ import annotations

import argparse


def slide_args(parser: argparse.ArgumentParser, *, indexing: bool = False) -> None:
    group = parser.add_argument_group("whole-slide images (a slide file, a folder of them, or a CSV "
                                      "'slide,class[,patient]')")
    group.add_argument("--slides", action="store_true",
                       help="treat --path as slides even where it does not look like them (a plain large image)")
    group.add_argument("--tile_um", type=float, default=None,
                       help="tile side in micrometres (default 112, or the database's)")
    group.add_argument("--magnification", type=float, default=None,
                       help="read tiles at this objective magnification (20 = 0.5 µm/px) instead of --tile_um")
    group.add_argument("--tile_px", type=int, default=None, help="tile side in pixels (default 224, or the database's)")
    group.add_argument("--mpp", type=float, default=None,
                       help="µm per pixel at full resolution, for slides whose metadata lacks it")
    group.add_argument("--tissue_min", type=float, default=0.5, help="least tissue share of a kept tile (default 0.5)")
    group.add_argument("--mosaic_fraction", type=float, default=0.05,
                       help="share of a slide's tissue tiles in its mosaic (default 0.05)")
    if indexing:
        group.add_argument("--mask_dir", default=None, help="write each slide's tissue mask here as a PNG")


def wants_slides(args) -> bool:
    from cbir.slides.sources import holds_slides

    return bool(args.slides or args.tile_um or args.magnification or args.mpp or getattr(args, "region", None)
                or holds_slides(args.path))


def tiling_spec(args, database=None):
    """The tiling the flags ask for; what they leave out comes from the database's tiles when it has some."""
    from cbir.slides.tiling import TilingSpec

    defaults = database.extras(one=True).get("") if database is not None else None
    return TilingSpec.from_flags(args.tile_um, args.magnification, args.tile_px, defaults=defaults,
                                 tissue_min=args.tissue_min, mosaic_fraction=args.mosaic_fraction)
