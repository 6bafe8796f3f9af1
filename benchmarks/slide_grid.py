"""How tile size, magnification and mosaic fraction trade slide-search accuracy against index size and time.

    python benchmarks/make_slides.py --out bench_slides --splits index,query
    python benchmarks/slide_grid.py --slides bench_slides --grid 112:224 224:224 --fractions 0.05 0.2 1

Each grid entry ``TILE_UM:TILE_PX[:DB_NAME]`` (tile side in µm : in pixels, so ``TILE_UM / TILE_PX`` µm per pixel)
indexes ``<slides>/index`` into its own database (kept in --home; what it holds already is kept) with the frozen ImageNet
EfficientNet-Lite0 unless --weights is given, then scores ``<slides>/query`` at the tile and the slide level
(:func:`cbir.slides.scoring.evaluate_slides`) once per mosaic fraction; the query tiles are embedded once per entry.
Printed: a markdown table of tiles stored, Redis memory, indexing time, query time and the numbers. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", required=True, help="folder holding index/ and query/ slide folders")
    p.add_argument("--grid", nargs="+", default=["112:224", "224:224"], help="TILE_UM:TILE_PX entries")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.2, 1.0])
    p.add_argument("--weights", default=None, help="an extractor checkpoint (default: frozen EfficientNet-Lite0)")
    p.add_argument("--home", default="cbir_data", help="where the grid's databases live")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the confidence intervals in the JSON")
    p.add_argument("--out", default=None, help="folder for each run's numbers as JSON")
    args = p.parse_args()

    from cbir.database import Database
    from cbir.models import create_extractor, load_extractor
    from cbir.slides.indexing import index_slides
    from cbir.slides.scoring import evaluate_slides
    from cbir.slides.sources import list_slides
    from cbir.slides.tiling import TilingSpec

    extractor = load_extractor(args.weights) if args.weights else create_extractor("effnet", 0, pretrained=True).eval()
    info = extractor.describe()
    index_sources = list_slides(Path(args.slides) / "index")
    query_sources = list_slides(Path(args.slides) / "query")
    print(f"{len(index_sources)} index slides, {len(query_sources)} query slides; {info['name']} "
          f"({extractor.embedding_size} values); load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')}")
    rows = []
    for entry in args.grid:
        parts = entry.split(":")
        tile_um, tile_px = float(parts[0]), int(parts[1])
        name = parts[2] if len(parts) > 2 else f"grid_{tile_um:g}um_{tile_px}px".replace(".", "_")
        with Database.open(name, home=args.home, create=True) as db:
            db.set_extractor(info)
            summary = index_slides(extractor, db, index_sources, TilingSpec(tile_um, tile_px),
                                   batch_size=args.batch_size, progress=False)
            print(summary.format(name, len(db)), flush=True)
            stored, redis_bytes = len(db), db.info()["redis_memory_bytes"]
            cache: dict = {}
            for fraction in args.fractions:
                start = time.perf_counter()
                result = evaluate_slides(extractor, db, query_sources, TilingSpec(tile_um, tile_px,
                                                                                    mosaic_fraction=fraction),
                                         batch_size=args.batch_size, cache=cache, bootstrap=args.bootstrap)
                seconds = time.perf_counter() - start
                if args.out:
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    Path(args.out, f"{name}_mosaic{fraction:g}.json").write_text(json.dumps(result.to_dict(), indent=1))
                tile, slide = result.tile.scores, result.slide.scores
                rows.append([f"{tile_um:g} µm, {tile_px} px ({tile_um / tile_px:g} µm/px, "
                             f"{10 * tile_px / tile_um:g}×)", f"{fraction:g}", stored,
                             f"{redis_bytes / 2**20:.1f}", f"{summary.seconds:.0f}" if summary.added else "(kept)",
                             f"{seconds:.0f}", f"{tile['class_top1']:.3f}", f"{tile['mmv5']:.3f}",
                             f"{slide['class_top1']:.3f}", f"{slide['class_maj']:.3f}", f"{slide['mmv5']:.3f}",
                             f"{slide['map_at_k']:.3f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
    header = ["tiles", "mosaic fraction", "index tiles", "Redis MiB", "index s", "query s (tiles embedded once)",
              "tile top-1", "tile mMV@5", "slide top-1", "slide MV@5", "slide mMV@5", "slide mAP@5"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
