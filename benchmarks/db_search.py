"""Search through the database (ids mapped to paths and classes) against raw FAISS on the same index.

    python benchmarks/db_search.py                       # 10^5 and 10^6 vectors of 128 values
    python benchmarks/db_search.py --sizes 100000 --threads 1

For each size: random unit vectors are stored in a fresh embedded database, then batches of 1000 random queries go
to raw FAISS (``index.search`` on the database's own in-memory index) and to ``Database.search`` alternately, each
batch different, so load on a shared machine hits both alike. Printed: queries/s of each and their ratio (goal:
>= 0.9), the same for the first batch of a freshly opened database (its FAISS and id -> path files just read),
and single-query latency p50/p99 of both. Run by hand; not part of the test suite.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def fill(db, n: int, dim: int, rng) -> float:
    """Store n random unit vectors with realistic paths; returns vectors/s."""
    start = time.perf_counter()
    for block_start in range(0, n, 10_000):
        count = min(10_000, n - block_start)
        ids = range(block_start, block_start + count)
        paths = [f"/data/collection/class_{i % 1000:04d}/image_{i:07d}.jpg" for i in ids]
        classes = [f"class_{i % 1000:04d}" for i in ids]
        db.add(paths, classes, unit_vectors(count, dim, rng))
    return n / (time.perf_counter() - start)


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def bench(n: int, args, home: Path) -> dict:
    from cbir.database import Database

    rng = np.random.default_rng(n)
    name = f"search{n}"
    with Database.open(name, home=home, create=True) as db:
        db.set_extractor({"name": "random", "num_features": args.dim, "fingerprint": "random"})
        add_rate = fill(db, n, args.dim, rng)
    print(f"\n{n:,} vectors of {args.dim} values stored ({add_rate:,.0f} vectors/s)", flush=True)

    with Database.open(name, home=home) as db:
        # The first batch of a freshly opened database: its FAISS and id -> path table files were just read.
        db._sync()
        raw = db._index.index  # the very index Database.search uses
        cold_q = unit_vectors(args.batch, args.dim, rng)
        t0 = time.perf_counter()
        raw.search(cold_q, args.k)
        raw_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        db.search(cold_q, args.k)
        db_cold = time.perf_counter() - t0

        raw_times, db_times = [], []
        for repeat in range(args.repeats):
            queries = unit_vectors(args.batch, args.dim, rng)  # a new batch each time: new ids to map too
            pair = [("raw", lambda: raw.search(queries, args.k)), ("db", lambda: db.search(queries, args.k))]
            if repeat % 2:
                pair.reverse()
            for label, call in pair:
                t0 = time.perf_counter()
                call()
                elapsed = time.perf_counter() - t0
                (raw_times if label == "raw" else db_times).append(elapsed)

        singles = unit_vectors(args.singles, args.dim, rng)
        raw_single, db_single = [], []
        for i in range(args.singles):
            q = singles[i : i + 1]
            t0 = time.perf_counter()
            raw.search(q, args.k)
            raw_single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            db.search(q, args.k)
            db_single.append(time.perf_counter() - t0)

    ratios = [r / d for r, d in zip(raw_times, db_times)]
    out = {
        "n": n,
        "raw_qps": args.batch / statistics.median(raw_times),
        "db_qps": args.batch / statistics.median(db_times),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "cold_ratio": raw_cold / db_cold,
        "raw_p50": percentile(raw_single, 50),
        "raw_p99": percentile(raw_single, 99),
        "db_p50": percentile(db_single, 50),
        "db_p99": percentile(db_single, 99),
    }
    print(f"  batch of {args.batch}, k={args.k}, {args.repeats} batches each, alternating:")
    print(f"    raw FAISS        {out['raw_qps']:>10,.0f} queries/s")
    print(f"    Database.search  {out['db_qps']:>10,.0f} queries/s   ratio {out['ratio']:.3f} "
          f"(median of pairs; worst pair {out['ratio_min']:.3f})")
    print(f"    first batch after open (files just read): ratio {out['cold_ratio']:.3f}")
    print(f"  single query ({args.singles} each): raw p50 {out['raw_p50']:.2f} ms, p99 {out['raw_p99']:.2f} ms; "
          f"Database.search p50 {out['db_p50']:.2f} ms, p99 {out['db_p99']:.2f} ms", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="batches per side")
    p.add_argument("--singles", type=int, default=300, help="single queries per side for the latency")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: FAISS's own choice)")
    p.add_argument("--home", default=None, help="where the databases go (default: a temporary folder)")
    args = p.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, faiss {faiss.__version__}, "
          f"FAISS threads {faiss.omp_get_max_threads()}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(dir=args.home) as home:
        results = [bench(n, args, Path(home)) for n in args.sizes]
    print("\nsize        raw q/s    db q/s   ratio  cold   raw p50/p99 ms   db p50/p99 ms")
    for r in results:
        print(f"{r['n']:>9,} {r['raw_qps']:>9,.0f} {r['db_qps']:>9,.0f}  {r['ratio']:.3f}  {r['cold_ratio']:.2f}"
              f"   {r['raw_p50']:6.2f}/{r['raw_p99']:6.2f}   {r['db_p50']:6.2f}/{r['db_p99']:6.2f}")


if __name__ == "__main__":
    main()
