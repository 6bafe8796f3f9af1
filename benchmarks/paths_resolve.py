"""Resolving the paths a database stores (``cbir.database.paths``): the resolver against ``os.path.realpath``.

    python benchmarks/paths_resolve.py                 # 100,000 files in 100 class folders
    python benchmarks/paths_resolve.py --n 20000 --folders 20

``Database.add`` stores every path absolute with links resolved, so that one file is one image however it was
named. ``os.path.realpath`` looks at every level of every path; the resolver looks at each folder once and at each
file once. Both run in this process on the same relative paths (as ``cbir-index --path data`` gives them), after one
warm-up pass so the kernel's caches are full for both. Printed: paths/s of each and their ratio, and that both give
the same answers. Run by hand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbir.database.paths import PathResolver  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="files")
    parser.add_argument("--folders", type=int, default=100, help="class folders")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each (the best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / "project" / "histology" / "collection" / "index"
        paths = []
        for f in range(args.folders):
            folder = data / f"class_{f:04d}"
            folder.mkdir(parents=True)
            for i in range(args.n // args.folders):
                (folder / f"image_{i:07d}.png").touch()
                paths.append(os.path.join("project", "histology", "collection", "index", f"class_{f:04d}",
                                          f"image_{i:07d}.png"))
        os.chdir(root)

        def bare():
            return [os.path.realpath(p) for p in paths]

        def resolver():
            resolve = PathResolver()
            return [resolve(p) for p in paths]

        assert bare() == resolver()  # also the warm-up
        best = {}
        for name, run in (("os.path.realpath", bare), ("PathResolver", resolver)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
        for name, seconds in best.items():
            print(f"{name:>18}: {len(paths) / seconds:12,.0f} paths/s ({seconds:.3f} s for {len(paths):,})")
        print(f"PathResolver is {best['os.path.realpath'] / best['PathResolver']:.1f}x os.path.realpath "
              f"(same answers for all {len(paths):,} paths)")


if __name__ == "__main__":
    main()
