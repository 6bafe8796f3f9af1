"""What cbir-serve's application adds to the bare library, in-process: no network, no client, no other process.

    python benchmarks/serve_overhead.py                 # 300 searches a side, the demo's sample, 224 px

The app (``cbir.serve.create_app``, its real service, embedded Redis, FAISS) is called as uvicorn calls it, through
ASGI with a multipart search request, query by query alternating with the bare library doing the same work
(``benchmarks/serve.py``'s in-process side: decode, resize, forward pass, ``Database.search``). Printed: p50 of
each, the p50 of the paired difference, and where the app's time goes, stamped on one request in every two:
before the route's blocking part is handed to a worker thread (middleware, routing, token check, the multipart
form), the hand-off, the work, the way back, and the answer. Run by hand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/serve.py: threads sleep between queries
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402 — the same database, checkpoint and bare side as benchmarks/serve.py

BOUNDARY = "cbir-overhead-boundary"


async def asgi_search(app, body: bytes) -> None:
    """One POST of the search route through the whole ASGI stack, as uvicorn would make it."""
    path = "/api/databases/bench/search"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "app": app,
             "headers": [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:
            await asyncio.sleep(3600)  # no disconnect while the answer is made
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    answer = []

    async def send(message):
        answer.append(message)

    await app(scope, receive, send)
    if answer[0]["status"] != 200:
        raise SystemExit(f"search answered {answer[0]['status']}: {answer[-1].get('body', b'')[:200]!r}")


def stamping(api, stamps: dict):
    """``api.off_loop`` wrapped to note when the hand-off starts, when the worker starts and ends, and when the
    route has its result back."""
    hand_off = api.off_loop

    async def off_loop(request, work):
        stamps["handed"] = time.perf_counter()

        def timed():
            stamps["work"] = time.perf_counter()
            try:
                return work()
            finally:
                stamps["worked"] = time.perf_counter()

        result = await hand_off(request, timed)
        stamps["back"] = time.perf_counter()
        return result

    return off_loop


async def measure(args, app, bare, payloads) -> None:
    from cbir.serve import api

    bodies = [bench.search_form(name, data, args.k, BOUNDARY) for name, data in payloads]
    stamps: dict = {}
    async with app.router.lifespan_context(app):
        for i in range(10):  # warm both paths
            await asgi_search(app, bodies[i % len(bodies)])
            bare(payloads[i % len(payloads)][1], args.k)
        times = {"app": [], "bare": []}
        parts = []
        plain = api.off_loop
        for i in range(args.queries):
            stamped = i % 2 == 1
            api.off_loop = stamping(api, stamps) if stamped else plain
            order = ("app", "bare") if i % 4 < 2 else ("bare", "app")  # each side first as often
            for side in order:
                start = time.perf_counter()
                if side == "app":
                    await asgi_search(app, bodies[i % len(bodies)])
                else:
                    bare(payloads[i % len(payloads)][1], args.k)
                end = time.perf_counter()
                times[side].append(end - start)
                if side == "app" and stamped:
                    parts.append((stamps["handed"] - start, stamps["work"] - stamps["handed"],
                                  stamps["worked"] - stamps["work"], stamps["back"] - stamps["worked"],
                                  end - stamps["back"]))
        api.off_loop = plain

    def p50(values):
        return statistics.median(values) * 1000

    print(f"app {p50(times['app']):.2f} ms, bare library {p50(times['bare']):.2f} ms, paired difference "
          f"{p50([a - b for a, b in zip(times['app'], times['bare'])]):.2f} ms (p50 of {args.queries})")
    names = ("before the hand-off (middleware, routing, token, form)", "hand-off to a worker thread",
             "the work (decode, embed, search)", "back to the event loop", "the answer")
    for j, name in enumerate(names):
        print(f"  {name}: {p50([row[j] for row in parts]):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cbir" / "samples" / "pbc")
    parser.add_argument("--model", default="effnet")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    from cbir.serve import ServeConfig, create_app

    work = Path(tempfile.mkdtemp(prefix="cbir-bench-overhead-"))
    weights, home, queries = bench.build(args, work)
    payloads = [(p.name, p.read_bytes()) for p in queries]
    bare, db, encoder = bench.in_process_search(weights, home)
    app = create_app(ServeConfig(db_name="bench", home=home, weights=str(weights)))
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.model} at {args.input_size} px, "
          f"{encoder['backend']} {encoder['precision']}, k {args.k}", flush=True)
    try:
        asyncio.run(measure(args, app, bare, payloads))
    finally:
        db.close()


if __name__ == "__main__":
    main()
