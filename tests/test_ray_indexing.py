"""cbir-index --ray: a real local Ray cluster (a head and two worker nodes on loopback) indexing into a real
redis-server over TCP; one worker node is killed part way, the run is repeated, and every image is in once."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import ImageOps

from cbir.database import Database
from cbir.images import Sample, list_images, load_image
from cbir.models import create_extractor, save_extractor
from cbir.synthetic import make_dataset
from redis_processes import no_server_left_behind, redis_url  # noqa: F401 — fixtures

# Every Ray process on loopback (Ray's single-machine mode): without it Ray binds to the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="Ray is a test dependency (pip install -e '.[test]')")
from ray.cluster_utils import Cluster  # noqa: E402

from cbir.distributed import ray_index  # noqa: E402


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Head (no CPU for work: it only schedules) + two one-CPU worker nodes, all on this machine; their processes
    inherit the test's private export cache."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    loopback = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **loopback})
    workers = [cluster.add_node(num_cpus=1, **loopback) for _ in range(2)]
    cluster.wait_for_nodes()
    # The driver (this test, then ray_index) joins on loopback too.
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, include_dashboard=False)
    yield cluster, workers
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def _reader_of(fifo: Path) -> int:
    """The pid of the process that has ``fifo`` open for reading (not this one)."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        if int(fd_dir.parent.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(fifo) for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # a process that ended, or one of another user
            continue
    raise AssertionError(f"no process has {fifo} open")


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        found.add(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
    return found


@pytest.mark.slow
def test_ray_workers_index_everything_once_even_when_one_dies(cluster, redis_url, tmp_path):
    cluster, workers = cluster
    folder = make_dataset(tmp_path / "data", splits={"index": 40}, size=64)["index"]
    # The first chunk holds a named pipe posing as an image: its worker blocks reading it until the test kills that
    # worker's node, so the kill lands mid-chunk however fast the machine embeds the rest.
    fifo = tmp_path / "data" / "slow.png"
    os.mkfifo(fifo)
    samples = [Sample(str(fifo), "slow")] + list_images(folder)
    torch.manual_seed(0)
    weights = tmp_path / "effnet.pt"
    save_extractor(weights, create_extractor("effnet", 16, pretrained=False, input_size=96))
    with Database.open("tiles", redis_url=redis_url, create=True) as db:
        from cbir.inference import load_encoder

        db.set_extractor(load_encoder(weights).describe())  # as cbir-index does before the workers start

    killed, writer = threading.Event(), []

    def kill_the_blocked_worker():
        deadline = time.monotonic() + 240
        while not writer and time.monotonic() < deadline:
            try:  # succeeds once a worker has the pipe open for reading; held open so its read never ends
                writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.05)
        try:
            lineage = _ancestors(_reader_of(fifo))
            node = next(n for n in workers if n.all_processes["raylet"][0].process.pid in lineage)
            cluster.remove_node(node, allow_graceful=False)
            killed.set()
        finally:
            if not killed.is_set():  # the blocked worker reads an empty file: the run ends and the test fails
                for fd in writer:
                    os.close(fd)
                writer.clear()

    killer = threading.Thread(target=kill_the_blocked_worker)
    killer.start()
    first = ray_index(samples, weights=str(weights), db_name="tiles", redis_url=redis_url, address=cluster.address,
                      chunk=4, progress=False)
    killer.join()
    assert killed.is_set() and first.workers == 2
    os.close(writer.pop())
    with Database.open("tiles", redis_url=redis_url) as db:
        stored_after_first = len(db)
    # The dead worker's chunk is reported; the survivor carried on with every other chunk.
    assert first.lost == samples[:4]
    assert first.added == len(samples) - 4 == stored_after_first

    # The pipe becomes a real image (another tile's mirror image) for the re-run.
    fifo.unlink()
    ImageOps.mirror(load_image(samples[1].path)).save(fifo, format="PNG")
    # As a user re-runs once the cluster has noticed the dead node (else Ray may still place a worker on it).
    deadline = time.monotonic() + 120
    while sum(n["Alive"] for n in ray.nodes()) > 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    again = ray_index(samples, weights=str(weights), db_name="tiles", redis_url=redis_url, address=cluster.address,
                      chunk=4, progress=False)
    assert again.lost == [] and again.added == len(samples) - stored_after_first
    assert again.already_stored == stored_after_first
    with Database.open("tiles", redis_url=redis_url) as db:
        paths = Counter(path for _, path, _ in db.items())
        assert set(paths) == {s.path for s in samples} and set(paths.values()) == {1}
        # The FAISS side caught up: each image finds itself.
        ids, vectors = db.vectors()
        found = db.search(vectors, 1)
        assert found.ids[:, 0].tolist() == ids.tolist()
