"""Write the demo's real sample (cbir/samples/pbc) from histo-bench's PBC blood-cell images.

    python scripts/make_demo_sample.py [--source ../shared/data/histo-bench]

Each of the 8 PBC classes gets 8 train, 6 index and 3 query images, drawn (seed 0) from the same split of
histo-bench, so no image is in two splits; each is shrunk to at most 128 px a side (JPEG, quality 80): about 450 KB
in all. The PBC dataset (Acevedo et al., Data in Brief 2020) is CC BY 4.0; the credit is in the sample's README.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from PIL import Image

COUNTS = {"train": 8, "index": 6, "query": 3}
SIDE = 128
OUT = Path(__file__).resolve().parents[1] / "cbir" / "samples" / "pbc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/histo-bench"))
    args = parser.parse_args()
    source = Path(args.source)
    rng = random.Random(0)
    shutil.rmtree(OUT, ignore_errors=True)
    for split, count in COUNTS.items():
        for class_dir in sorted(source.joinpath(split).glob("pbc_*")):
            chosen = rng.sample(sorted(class_dir.iterdir()), count)
            target = OUT / split / class_dir.name
            target.mkdir(parents=True)
            for path in chosen:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    image.thumbnail((SIDE, SIDE), Image.LANCZOS)
                    image.save(target / f"{path.stem}.jpg", "JPEG", quality=80, optimize=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*.jpg"))
    print(f"{sum(1 for _ in OUT.rglob('*.jpg'))} images, {total / 1024:.0f} KB in {OUT}")


if __name__ == "__main__":
    main()
