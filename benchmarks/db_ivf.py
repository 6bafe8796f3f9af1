"""The inverted-file index against exact search, on clustered vectors shaped like trained embeddings.

    python benchmarks/db_ivf.py                         # 10^6 vectors, 1000 class centres, cosine to centre 0.75
    python benchmarks/db_ivf.py --n 100000 --threads 1

Uniform random vectors have no clusters and no index helps them, so the vectors here lie around --centres class
centres with cosine about --cos to their centre. Everything goes through the database: vectors stored in a fresh
embedded database, exact (Flat) search timed and taken as the truth, then ``Database.train_index()`` with its
default nlist (or --nlist), then a sweep of nprobe. Printed for each nprobe: recall@10 against exact, queries/s,
and the speed-up over exact (goal: recall >= 0.95 at >= 5x). The database's default nprobe is marked. Run by
hand; not part of the test suite.
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


def clustered(n: int, centres: np.ndarray, cos: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around the centres: centre + noise of norm sqrt(1/cos^2 - 1), normalised (cosine ~ cos)."""
    dim = centres.shape[1]
    scale = np.sqrt(1 / cos**2 - 1)
    out = np.empty((n, dim), np.float32)
    labels = rng.integers(0, len(centres), size=n)
    for start in range(0, n, 100_000):
        part = labels[start : start + 100_000]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32) * np.float32(scale / np.sqrt(dim))
        block = centres[part] + noise
        out[start : start + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, labels


def timed(call, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist())]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--cos", type=float, default=0.75, help="cosine of a vector to its class centre")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=None, help="default: the database's own choice")
    p.add_argument("--nprobes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: FAISS's own choice)")
    p.add_argument("--home", default=None)
    args = p.parse_args()

    import faiss

    from cbir.database import Database

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, faiss {faiss.__version__}, "
          f"FAISS threads {faiss.omp_get_max_threads()}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors, labels = clustered(args.n, centres, args.cos, rng)
    queries, _ = clustered(args.queries, centres, args.cos, rng)  # new images of the same classes
    measured_cos = float(np.mean(np.sum(vectors[:10000] * centres[labels[:10000]], axis=1)))
    print(f"{args.n:,} vectors of {args.dim} values around {args.centres} centres (mean cosine to centre "
          f"{measured_cos:.3f}); {args.queries} queries, k={args.k}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.home) as home, Database.open("ivf", home=home, create=True) as db:
        t0 = time.perf_counter()
        for start in range(0, args.n, 10_000):
            ids = range(start, min(start + 10_000, args.n))
            db.add([f"/data/c{labels[i]:04d}/{i:07d}.jpg" for i in ids], [f"c{labels[i]:04d}" for i in ids],
                   vectors[start : start + len(ids)])
        print(f"stored in {time.perf_counter() - t0:.0f} s", flush=True)

        exact_time, exact = timed(lambda: db.search(queries, args.k), args.repeats)
        exact_qps = args.queries / exact_time
        print(f"exact (Flat): {exact_qps:,.0f} queries/s", flush=True)

        t0 = time.perf_counter()
        message = db.train_index(nlist=args.nlist)
        print(f"{message} ({time.perf_counter() - t0:.0f} s)", flush=True)
        default_nprobe = db.info()["nprobe"]
        nlist = int(db.info()["index"].split(",")[0][3:])

        rows = []
        for nprobe in sorted(set(args.nprobes + [default_nprobe])):
            if nprobe > nlist:
                continue
            seconds, result = timed(lambda: db.search(queries, args.k, nprobe=nprobe), args.repeats)
            rows.append((nprobe, recall_at(result.ids, exact.ids), args.queries / seconds))
            print(f"  nprobe {nprobe:>4}: recall@{args.k} {rows[-1][1]:.3f}  {rows[-1][2]:>9,.0f} queries/s  "
                  f"{rows[-1][2] / exact_qps:5.1f}x exact" + ("   <- default" if nprobe == default_nprobe else ""),
                  flush=True)

    good = [r for r in rows if r[1] >= 0.95]
    best = max(good, key=lambda r: r[2]) if good else None
    print(f"\nnlist {nlist}, default nprobe {default_nprobe}; exact {exact_qps:,.0f} queries/s")
    if best:
        print(f"fastest with recall >= 0.95: nprobe {best[0]} (recall {best[1]:.3f}, {best[2] / exact_qps:.1f}x exact)")
    default = next(r for r in rows if r[0] == default_nprobe)
    print(f"default: recall {default[1]:.3f} at {default[2] / exact_qps:.1f}x exact "
          f"({'meets' if default[1] >= 0.95 and default[2] >= 5 * exact_qps else 'misses'} recall >= 0.95 at >= 5x)")


if __name__ == "__main__":
    main()
