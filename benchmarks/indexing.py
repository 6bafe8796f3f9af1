"""cbir-index's throughput against the bare model forward pass on the same images and batch size.

    python benchmarks/indexing.py                          # 256 images of 256 px, effnet at 224, batch 32
    python benchmarks/indexing.py --images 128 --input_size 128

The bare forward pass gets the images already decoded, resized and normalised in memory (loading not timed) and
times only ``extractor(batch)``. Indexing is ``cbir.indexing.index_images`` -- what cbir-index runs: worker
processes decode and resize while the model runs, and pipelined Redis writes -- into a fresh embedded
database, timed from the first image to the last write. The two alternate (--rounds times) so load on a shared
machine hits both alike. Printed: images/s of each and their ratio (goal: >= 0.85). Run by hand; not in CI.
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
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=256, help="side of the generated PNG images")
    p.add_argument("--model", default="effnet")
    p.add_argument("--num_features", type=int, default=128)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=None, help="decoding workers (default: cbir-index's)")
    p.add_argument("--chunk", type=int, default=512, help="images per database write (cbir-index --chunk)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()

    import torch

    from cbir.data import list_images, load_image
    from cbir.database import Database
    from cbir.data import default_workers
    from cbir.indexing import index_images
    from cbir.models import create_extractor
    from cbir.synthetic import CLASSES, make_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    workers = default_workers() if args.num_workers is None else args.num_workers
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {workers} DataLoader workers, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d')}")

    with tempfile.TemporaryDirectory() as tmp:
        per_class = -(-args.images // len(CLASSES))
        folder = make_dataset(tmp, splits={"bench": per_class}, size=args.size, seed=0)["bench"]
        samples = list_images(folder)[: args.images]
        extractor = create_extractor(args.model, args.num_features, pretrained=False, input_size=args.input_size)
        extractor.eval()
        transform = extractor.transform(train=False)
        tensors = torch.stack([transform(load_image(s.path)) for s in samples])  # not timed
        print(f"{len(samples)} images of {args.size} px -> {args.model} at {args.input_size} px, "
              f"batch {args.batch_size}", flush=True)

        def forward() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(tensors), args.batch_size):
                    extractor(tensors[i : i + args.batch_size])
            return len(tensors) / (time.perf_counter() - start)

        def indexing(round_no: int) -> float:
            with Database.open(f"bench{round_no}", home=Path(tmp, "home"), create=True) as db:
                summary = index_images(extractor, db, samples, batch_size=args.batch_size, num_workers=workers,
                                       progress=False, chunk=args.chunk)
                assert summary.added == len(samples) and len(db) == len(samples)
            return summary.added / summary.seconds

        forward()  # warm-up: first-call allocations
        bare, indexed = [], []
        for round_no in range(args.rounds):
            bare.append(forward())
            indexed.append(indexing(round_no))
            print(f"  round {round_no + 1}: forward pass {bare[-1]:.1f} images/s, cbir-index {indexed[-1]:.1f} "
                  f"images/s, ratio {indexed[-1] / bare[-1]:.3f}", flush=True)
    ratio = statistics.median(i / b for i, b in zip(indexed, bare))
    print(f"\nforward pass {statistics.median(bare):.1f} images/s, cbir-index {statistics.median(indexed):.1f} "
          f"images/s: ratio {ratio:.3f} (median of rounds)")


if __name__ == "__main__":
    main()
