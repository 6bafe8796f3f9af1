"""Indexing across processes and machines with Ray (``cbir-index --ray [ADDRESS]``).

The driver lists the images not yet stored and cuts them into chunks; Ray actors — one per GPU of the cluster, else
one per node using that node's CPUs — each load the encoder once, then take chunks as they free up, embed them and
write them straight to the shared database (a Redis server or Redis Cluster every node reaches). Workers write to
Redis only; the driver catches the FAISS index up from Redis at the end, as any later command would.

A chunk is the unit of loss: a worker that dies loses at most the chunk it was embedding (its earlier chunks are
stored), the driver goes on with the other workers and says how many images are missing, and running the same
command again adds only those.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from cbir.errors import CbirError
from cbir.images import Sample
from cbir.indexing import IndexSummary

log = logging.getLogger(__name__)


@dataclass
class RayIndexSummary(IndexSummary):
    workers: int = 0
    lost: list[Sample] = field(default_factory=list)  # in chunks whose worker died

    def format(self, db_name: str, total_in_db: int) -> str:
        text = f"{super().format(db_name, total_in_db)}\n{self.workers} Ray workers"
        if self.lost:
            text += (f"\n{len(self.lost)} images were not stored: their worker died; run the same command again to "
                     "add them (only what is missing is embedded)")
        return text


def _import_ray(local: bool):
    if local:
        # Ray's single-machine mode: every process on loopback, none on the machine's network address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise CbirError("--ray needs Ray: pip install 'ray>=2.9' (or the package's [ray] extra)") from None
    return ray


class _ChunkIndexer:
    """A Ray actor's state: the encoder and the database, opened once, then one chunk per call."""

    def __init__(self, weights, backend, int8, db, cpus):
        from cbir.database import Database
        from cbir.inference import load_encoder

        self.encoder = load_encoder(weights, backend=backend, int8=int8, threads=cpus)
        self.db = Database.open(db["name"], home=db["home"], redis_url=db["redis_url"]).writes_only()
        self.decoders = max(0, cpus - 1)

    def index(self, paths: list[str], classes: list[str]) -> dict:
        from cbir.indexing import index_images

        from cbir.images import UnreadableImage, load_image

        try:
            summary = index_images(self.encoder, self.db, [Sample(p, c) for p, c in zip(paths, classes)],
                                   num_workers=self.decoders, progress=False, chunk=len(paths))
        except CbirError:
            # A chunk of nothing but unreadable files: skipped and reported like any other, never fatal to the run.
            unreadable = []
            for path in paths:
                try:
                    load_image(path)
                except UnreadableImage:
                    unreadable.append(path)
            if len(unreadable) < len(paths):
                raise
            return {"added": 0, "already": 0, "seconds_model": 0.0, "skipped": unreadable}
        return {"added": summary.added, "already": summary.already_stored, "seconds_model": summary.seconds_model,
                "skipped": [s.path for s in summary.skipped]}


def _cluster_workers(ray, wanted: int | None) -> tuple[int, dict]:
    """How many actors and what each asks for: one per GPU, else one per node with that node's CPUs."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    if gpus:
        return (wanted or gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    if not cpus:
        raise CbirError("the Ray cluster offers no CPU to run workers on")
    if wanted:
        return wanted, {"num_cpus": max(1, sum(cpus) // wanted)}
    return len(cpus), {"num_cpus": min(cpus)}


def ray_index(samples: list[Sample], *, weights: str, db_name: str, redis_url: str | None, home=None,
              address: str | None = None, backend: str | None = None, int8: bool = False, workers: int | None = None,
              chunk: int = 512, progress: bool = True) -> RayIndexSummary:
    """Add ``samples`` missing from database ``db_name`` with Ray workers (see the module's doc).

    ``address``: a running cluster (``ray start --head`` prints it; ``auto`` finds a local one); None starts Ray
    on this machine only. A cluster of several machines needs ``redis_url`` (an embedded Redis serves one machine).
    """
    from tqdm import tqdm

    from cbir.database import Database

    if address and not redis_url:
        raise CbirError("--ray ADDRESS spreads the work over machines: give --redis_url (or $CBIR_REDIS_URL) of a "
                        "Redis server every node reaches")
    ray = _import_ray(local=not address)
    start = time.perf_counter()
    summary = RayIndexSummary()
    with Database.open(db_name, home=home, redis_url=redis_url) as db:
        present = db.has_paths([s.path for s in samples])
    todo = [s for s, stored in zip(samples, present) if not stored]
    summary.already_stored = len(samples) - len(todo)
    started_here = not ray.is_initialized()
    if started_here:
        # A Ray started here serves this machine only: keep it on loopback.
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)
    try:
        if todo:
            summary.workers = _run(ray, todo, summary, weights=weights, backend=backend, int8=int8,
                                   db={"name": db_name, "home": str(home) if home else None, "redis_url": redis_url},
                                   workers=workers, chunk=chunk, bar=tqdm(total=len(todo), desc="indexing (Ray)",
                                                                          unit="img", disable=not progress))
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


def _run(ray, todo, summary, *, weights, backend, int8, db, workers, chunk, bar) -> int:
    count, resources = _cluster_workers(ray, workers)
    cpus = int(resources["num_cpus"])
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(_ChunkIndexer)
    actors = [actor_class.options(scheduling_strategy="SPREAD").remote(weights, backend, int8, db, cpus)
              for _ in range(count)]
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    waiting = list(range(len(chunks)))[::-1]
    running: dict = {}  # future -> (actor, chunk number)
    idle, alive, failures = list(actors), len(actors), []
    while waiting or running:
        while idle and waiting:
            actor, number = idle.pop(), waiting.pop()
            part = chunks[number]
            running[actor.index.remote([s.path for s in part], [s.class_name for s in part])] = (actor, number)
        if not running:  # every worker is dead: what is left waits for the next run
            summary.lost += [s for n in waiting for s in chunks[n]]
            break
        done, _ = ray.wait(list(running), num_returns=1)
        actor, number = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            # The worker is gone with this chunk; the others carry on. Re-running adds what is missing.
            summary.lost += chunks[number]
            alive -= 1
            failures.append(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__)
            continue
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise CbirError(f"a Ray worker failed: {str(cause).strip().splitlines()[0]}") from None
        summary.added += result["added"]
        summary.already_stored += result["already"]
        summary.seconds_model += result["seconds_model"]
        summary.skipped += [s for s in chunks[number] if s.path in set(result["skipped"])]
        bar.update(len(chunks[number]))
        idle.append(actor)
    bar.close()
    if failures:
        log.warning("%d of %d Ray workers died, each with its chunk (first: %s)", len(actors) - alive, len(actors),
                    failures[0])
    return count
