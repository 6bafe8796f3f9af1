"""Build pyramidal tiled TIFF "slides" from class-folder tiles, for slide-level benchmarks.

    python benchmarks/make_slides.py --data ../shared/data/histo-bench --out bench_slides

Each slide is a synthetic arrangement of REAL tiles: the tiles of one class of one split, resized to
``--cell`` pixels and laid edge to edge in a roughly round blob on a glass-like background, written at
``--mpp`` µm per pixel (default 0.5, so a cell is one 112 µm tile of ``cbir-index``'s default grid, "20×").
Several slides per class (about ``--tiles_per_slide`` tiles each); the train / index / query splits of the data
become ``<out>/<split>/<class>/<class>_<split>_<n>.tif``, so the splits stay disjoint. ``<out>/layout.json``
records which image lies at which level-0 box of which slide.

The slides are synthetic: real tissue and cells, but placed by this script, with no slide-level structure
(neighbouring tiles are unrelated images of the same class). They test that slide indexing, mosaics and slide
ranking work and what they cost, not how a method fares on real slides.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def blob_cells(n: int) -> tuple[int, list[tuple[int, int]]]:
    """A square grid side and the ``n`` cells nearest its centre (a round blob), with one empty cell around."""
    side = math.ceil(math.sqrt(n * 4 / math.pi)) + 2
    while (side - 2) ** 2 < n:
        side += 1
    centre = (side - 1) / 2
    cells = sorted(((r, c) for r in range(1, side - 1) for c in range(1, side - 1)),
                   key=lambda rc: ((rc[0] - centre) ** 2 + (rc[1] - centre) ** 2, rc))
    return side, cells[:n]


def build_slide(images: list[Path], path: Path, cell: int, mpp: float, rng) -> list[dict]:
    from cbir.data import load_image
    from cbir.slides.pyramid import image_render, write_pyramid

    side, cells = blob_cells(len(images))
    # Glass: nearly white, a little noise, so the background is not a constant a detector could key on.
    canvas = rng.normal(243, 3, (side * cell, side * cell, 3)).clip(0, 255).astype(np.uint8)
    layout = []
    for image_path, (row, col) in zip(images, cells):
        tile = load_image(image_path).resize((cell, cell), Image.Resampling.BILINEAR)
        canvas[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = np.asarray(tile)
        layout.append({"image": str(image_path), "box": [col * cell, row * cell, cell, cell]})
    write_pyramid(path, side * cell, side * cell, image_render(Image.fromarray(canvas)), mpp=mpp)
    return layout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/histo-bench", help="folder of split folders of class folders")
    p.add_argument("--out", default="bench_slides")
    p.add_argument("--splits", default="train,index,query")
    p.add_argument("--tiles_per_slide", type=int, default=20)
    p.add_argument("--cell", type=int, default=224, help="pixels per real tile on the slide")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="which tiles go to which slide")
    args = p.parse_args()

    from cbir.data import list_samples

    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    layout: dict[str, list[dict]] = {}
    for split in args.splits.split(","):
        samples = list_samples(Path(args.data) / split)
        by_class: dict[str, list[Path]] = {}
        for sample in samples:
            by_class.setdefault(sample.class_name, []).append(Path(sample.path))
        count = 0
        for class_name, paths in sorted(by_class.items()):
            order = rng.permutation(len(paths))
            slides = max(1, round(len(paths) / args.tiles_per_slide))
            for n, part in enumerate(np.array_split(order, slides)):
                path = out / split / class_name / f"{class_name}_{split}_{n}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                layout[str(path)] = build_slide([paths[i] for i in part], path, args.cell, args.mpp, rng)
                count += 1
        print(f"{split}: {len(samples)} tiles of {len(by_class)} classes -> {count} slides in {out / split}")
    (out / "layout.json").write_text(json.dumps(layout, indent=1))


if __name__ == "__main__":
    main()
