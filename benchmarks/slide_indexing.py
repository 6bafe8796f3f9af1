"""Slide indexing's throughput against the bare model forward pass on the same tiles and batch size.

    python benchmarks/make_slides.py --out bench_slides --splits index
    python benchmarks/slide_indexing.py --slides bench_slides/index           # frozen EfficientNet-Lite0, 224 px

Both sides use the same encoder, the one ``cbir-index`` would load (``--backend``, default auto: ONNX Runtime). The
bare forward pass gets the tiles already read and resized in memory (not timed) and times only ``encoder(batch)``. Slide indexing is ``cbir.slides.indexing.index_slides`` -- what ``cbir-index`` runs on slides:
thumbnail, tissue mask, grid and mosaic of every slide, metadata written, then the tiles read from the pyramid by
the DataLoader workers while the model runs, and stored -- into a fresh embedded database, timed from the first
slide opened to the last write. The two alternate (--rounds times) so load on a shared machine hits both alike.
Printed: tiles/s of each and their ratio (goal: >= 0.8). Run by hand; not in CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", required=True, help="a folder of class folders of slides (benchmarks/make_slides.py)")
    p.add_argument("--model", default="effnet")
    p.add_argument("--num_features", type=int, default=0, help="0: the frozen ImageNet backbone's pooled features")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=None, help="decoding workers (default: cbir-index's)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import numpy as np

    from cbir.database import Database
    from cbir.embedding import decoding_workers
    from cbir.inference import available_cores, load_encoder
    from cbir.models import create_extractor
    from cbir.slides.indexing import index_slides
    from cbir.slides.sources import list_slides
    from cbir.slides.tiling import TilingSpec, tile_slide

    sources = list_slides(args.slides)
    spec = TilingSpec()
    tiles = []
    for source in sources:
        tiled = tile_slide(source, spec)
        tiled.slide.close()
        tiles += tiled.tiles
    encoder = load_encoder(extractor=create_extractor(args.model, args.num_features, pretrained=True).eval(),
                           backend=args.backend)
    workers = decoding_workers(len(tiles), args.batch_size) if args.num_workers is None else args.num_workers
    print(f"{platform.node()}: {available_cores()} cores, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}, "
          f"backend {encoder.backend} {encoder.precision}, {workers} decoding workers")
    images = np.stack([tile.load_prepared(encoder.input_size) for tile in tiles])  # not timed
    print(f"{len(sources)} slides, {len(tiles)} tissue tiles of {spec.tile_um:g} µm at {spec.tile_px} px -> "
          f"{args.model} ({encoder.embedding_size} values), batch {args.batch_size}", flush=True)

    def forward() -> float:
        start = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            encoder(images[i : i + args.batch_size])
        return len(images) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        def indexing(round_no: int) -> float:
            with Database.open(f"bench{round_no}", home=Path(tmp), create=True) as db:
                summary = index_slides(encoder, db, sources, spec, batch_size=args.batch_size, num_workers=workers,
                                       progress=False)
                assert summary.added == len(tiles) == len(db), (summary.added, len(tiles))
            return summary.added / summary.seconds

        encoder(images[: args.batch_size])  # warm-up: first-call allocations
        bare, indexed = [], []
        for round_no in range(args.rounds):
            bare.append(forward())
            indexed.append(indexing(round_no))
            print(f"  round {round_no + 1}: forward pass {bare[-1]:.1f} tiles/s, slide indexing {indexed[-1]:.1f} "
                  f"tiles/s, ratio {indexed[-1] / bare[-1]:.3f}", flush=True)
    ratio = statistics.median(i / b for i, b in zip(indexed, bare))
    print(f"\nforward pass {statistics.median(bare):.1f} tiles/s, slide indexing {statistics.median(indexed):.1f} "
          f"tiles/s: ratio {ratio:.3f} (median of rounds)")


if __name__ == "__main__":
    main()
