"""Adding precomputed vectors to a database: vectors/s, and memory per image in Redis, in FAISS and on disk.

    python benchmarks/db_add.py                   # 10^6 vectors of 128 values
    python benchmarks/db_add.py --n 100000

The vectors go through ``Database.add`` in blocks (as cbir-index does, with larger blocks) into a fresh embedded
database, with paths like ``/data/collection/class_0123/image_0001234.jpg``. Printed: vectors/s overall and for
the first and last tenth (it must not slow down as the database grows); Redis memory per image (``used_memory``
growth, and ``MEMORY USAGE`` per key); the FAISS index and the id -> path table per image (in memory and on disk);
the time to close (save) and to open again and answer a first search. Run by hand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=10_000, help="vectors per Database.add call")
    p.add_argument("--home", default=None)
    args = p.parse_args()

    import faiss

    from cbir.database import Database

    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, faiss {faiss.__version__}, "
          f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    rng = np.random.default_rng(0)
    n, dim = args.n, args.dim

    def block(start: int, count: int):
        ids = range(start, start + count)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return ([f"/data/collection/class_{i % 1000:04d}/image_{i:07d}.jpg" for i in ids],
                [f"class_{i % 1000:04d}" for i in ids], vectors)

    with tempfile.TemporaryDirectory(dir=args.home) as home:
        db = Database.open("add", home=home, create=True)
        db.set_extractor({"name": "random", "num_features": dim, "fingerprint": "random"})
        redis_before = int(db._client.info("memory")["used_memory"])
        tenth = max(1, n // 10)
        marks, spent = {}, 0.0
        for start in range(0, n, args.block):
            paths, classes, vectors = block(start, min(args.block, n - start))  # not timed
            t0 = time.perf_counter()
            db.add(paths, classes, vectors)
            spent += time.perf_counter() - t0
            done = start + len(paths)
            if done >= tenth and "first" not in marks:
                marks["first"] = (done, spent)
            if done >= n - tenth and "last_start" not in marks:
                marks["last_start"] = (done, spent)
        first_rate = marks["first"][0] / marks["first"][1]
        last_rate = (n - marks["last_start"][0]) / max(spent - marks["last_start"][1], 1e-9)
        print(f"\nadded {n:,} vectors of {dim} values in blocks of {args.block:,}: {spent:.1f} s, "
              f"{n / spent:,.0f} vectors/s (first tenth {first_rate:,.0f}/s, last tenth {last_rate:,.0f}/s)")

        redis_after = int(db._client.info("memory")["used_memory"])
        per_key = {}
        for suffix in ("vec", "path", "id", "class", "log", "meta"):
            per_key[suffix] = int(db._client.memory_usage(db._store.prefix + suffix, samples=1000) or 0)
        names = db._names
        names_bytes = names._row.nbytes + len(names._offsets) * 8 + len(names._blob)
        info = db.info()
        faiss_file = Path(db.index_path)
        t0 = time.perf_counter()
        db.close()  # saves the FAISS index and the id -> path table, stops the embedded Redis (which saves too)
        first_close = time.perf_counter() - t0
        print(f"Redis: {(redis_after - redis_before) / n:,.0f} bytes per image (used_memory growth); by key: "
              + ", ".join(f"{k} {v / n:,.0f}" for k, v in per_key.items()))
        print(f"  of which the vector itself is {dim * 4} bytes; id -> path table in the searching process: "
              f"{names_bytes / n:,.0f} bytes per image")

        files = {f.name: f.stat().st_size for f in Path(home, "add").iterdir() if f.is_file()}
        print("on disk per image: " + ", ".join(f"{name} {size / n:,.0f}" for name, size in sorted(files.items())
                                               if size > 1024))
        print(f"FAISS file {faiss_file.stat().st_size / n:,.0f} bytes per image ({info['index']})")

        # FAISS in memory: the same kind of index built alone, measured by the process's resident memory.
        before = rss_bytes()
        index = faiss.index_factory(dim, "IDMap2,Flat")
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            index.add_with_ids(rng.standard_normal((count, dim), dtype=np.float32),
                               np.arange(start, start + count, dtype=np.int64))
        print(f"FAISS in memory: {(rss_bytes() - before) / n:,.0f} bytes per image (IDMap2,Flat, resident growth)")
        del index

        t0 = time.perf_counter()
        db_again = Database.open("add", home=home)
        db_again.search(rng.standard_normal((1, dim), dtype=np.float32), 10)
        reopen = time.perf_counter() - t0
        t0 = time.perf_counter()
        db_again.close()
        print(f"close after adding (saves FAISS, table, Redis): {first_close:.1f} s; open again + first search: "
              f"{reopen:.1f} s; close: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
