"""The hot part of the service: encoders loaded once, databases kept open, requests embedded together.

Threads: every call here comes from a worker thread (FastAPI's for plain routes, the app's executor for the
searches, see ``api.off_loop``), many at once. A ``Database`` is meant for one thread, so each open
database has a lock, held only for its (millisecond) Redis and FAISS calls; the embedding, the slow part, runs
outside it. Requests that arrive while the model is busy are embedded together in its next forward pass
(``HotEncoder.embed``), which on a CPU serves many clients at once better than one pass each.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbir.database import Database, DatabaseError, list_databases
from cbir.errors import CbirError
from cbir.files import open_folder, prepare_folder, replacing
from cbir.images import prepare
from cbir.inference import recorded_encoder
from cbir.naming import safe_name

from .config import ServeConfig
from .errors import BadInput, Conflict, NotFound, status_of

log = logging.getLogger("cbir.serve")

MAX_FORWARD = 64  # images per forward pass: bounds the memory one pass takes however many requests wait
CYTOMINE_FOLDER = "_cytomine"  # uploads of the Cytomine-shaped routes, kept by the platform's file name
UNLABELLED = "_unlabelled"


@dataclass
class Hit:
    rank: int
    id: int
    distance: float
    path: str
    class_name: str


@dataclass
class Added:
    id: int
    path: str
    class_name: str
    new: bool  # False: the same file was stored already and is kept as it was


class _Job:
    __slots__ = ("batch", "vectors", "error", "done")

    def __init__(self, batch: np.ndarray):
        self.batch, self.vectors, self.error, self.done = batch, None, None, False


class HotEncoder:
    """An encoder of :mod:`cbir.inference` kept in memory with its description (whose fingerprint hashes every
    weight, so it is computed once, not per request); requests that arrive together share a forward pass."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.info = encoder.describe()
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()
        self._model_lock = threading.Lock()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised vectors of RGB images, exactly as ``cbir-index`` computes them from decoded images.

        The caller's batch joins the queue; whoever holds the model next runs everything queued in one pass, so a
        request that finds its vectors done when it gets the model returns at once.
        """
        job = _Job(np.stack([prepare(image, self.encoder.input_size) for image in images]))
        with self._pending_lock:
            self._pending.append(job)
        with self._model_lock:
            if not job.done:
                with self._pending_lock:
                    jobs, self._pending = self._pending, []
                self._run(jobs)
        if job.error is not None:
            raise job.error
        return job.vectors

    def _run(self, jobs: list[_Job]) -> None:
        try:
            inputs = jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs])
            vectors = np.concatenate([self.encoder(inputs[start:start + MAX_FORWARD])
                                      for start in range(0, len(inputs), MAX_FORWARD)])
            start = 0
            for job in jobs:
                job.vectors = vectors[start:start + len(job.batch)]
                start += len(job.batch)
        except Exception as error:  # noqa: BLE001 — handed to every waiting request, which raises it
            for job in jobs:
                job.error = error
        finally:
            for job in jobs:
                job.done = True


class Encoders:
    """Every encoder the service uses, each loaded once by :func:`cbir.inference.recorded_encoder` — ONNX Runtime
    wherever the model exports, the backend and precision each database was built with, the checks the commands
    make: the operator's ``--weights`` for every database, or the checkpoint each database records."""

    def __init__(self, weights: str | None):
        self.weights = weights
        self._loaded: dict[tuple, HotEncoder] = {}
        self._lock = threading.Lock()
        self.pinned = self.for_recorded(None) if weights else None

    def for_recorded(self, recorded: dict | None) -> HotEncoder:
        recorded = recorded or {}
        pinned = bool(self.weights)
        key = (self.weights or recorded.get("weights") or recorded.get("name"),
               None if pinned else recorded.get("fingerprint"), recorded.get("backend"), recorded.get("precision"))
        with self._lock:
            if key not in self._loaded:
                try:
                    encoder = recorded_encoder(recorded, weights=self.weights, spin=False)
                except CbirError as error:  # a checkpoint gone or unusable: this database cannot be searched now
                    raise Conflict(str(error)) from None
                info = encoder.describe()
                if not pinned and recorded and info["fingerprint"] != recorded.get("fingerprint"):
                    raise Conflict(f"the weights {recorded.get('weights') or recorded.get('name')} changed since the "
                                   "database was built with them; re-index it, or start cbir-serve with the right "
                                   "--weights")
                # Databases recorded as "onnx fp32" and the pinned default (auto) land on one encoder: one model in
                # memory, and their requests share its forward passes.
                same = [hot for hot in self._loaded.values() if hot.info == info]
                self._loaded[key] = same[0] if same else HotEncoder(encoder)
            return self._loaded[key]


class _Handle:
    def __init__(self):
        self.lock = threading.Lock()
        self.db: Database | None = None


class DatabasePool:
    """One open ``Database`` per name, each behind its own lock."""

    def __init__(self, home, redis_url: str | None):
        self.home, self.redis_url = home, redis_url
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list_databases(home=self.home, redis_url=self.redis_url)

    @contextlib.contextmanager
    def use(self, name: str, *, create: bool = False):
        with self._lock:
            handle = self._handles.setdefault(name, _Handle())
        with handle.lock:
            if handle.db is None:
                handle.db = Database.open(name, home=self.home, redis_url=self.redis_url, create=create)
            try:
                yield handle.db
            except DatabaseError as error:
                if status_of(error) == 503:  # Redis went away: the next request opens (and restarts) it afresh
                    self._discard(handle)
                raise

    def forget(self, name: str) -> None:
        """After a drop, from inside ``use(name)`` (whose lock the caller holds)."""
        self._handles[name].db = None

    @staticmethod
    def _discard(handle: _Handle) -> None:
        db, handle.db = handle.db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    def close(self) -> None:
        """Save every FAISS index and let go of Redis (the embedded servers stop with their last user)."""
        with self._lock:
            handles = list(self._handles.items())
        for name, handle in handles:
            with handle.lock:
                db, handle.db = handle.db, None
                if db is not None:
                    try:
                        db.close()
                    except CbirError as error:
                        log.warning("closing database '%s': %s", name, error)


class RetrievalService:
    """What the routes call: search, add, remove, describe — in terms of images, ids and class names."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.pool = DatabasePool(config.home, config.redis_url)
        self.encoders = Encoders(config.weights)
        self.default: HotEncoder | None = self.encoders.pinned
        self._listings: dict[str, tuple] = {}
        self._embedders: dict[str, tuple[str | None, HotEncoder]] = {}
        self.started = False

    # --- life ----------------------------------------------------------------------------------------------
    def start(self) -> dict:
        """Open the main database and load its extractor now, so the first request finds both hot."""
        name = self.config.db_name
        create = self.encoders.pinned is not None and name not in self.pool.names()
        with self.pool.use(name, create=create) as db:
            recorded = db.extractor
            if recorded is not None:
                self.default = self.encoders.for_recorded(recorded)
                db.check_extractor(self.default.info)
            elif self.default is None:
                raise CbirError(f"database '{name}' holds no images yet and records no extractor; give --weights")
            db.search(np.zeros((1, self.default.info["num_features"]), np.float32), 1)  # loads FAISS
            images = len(db)
        self.default.embed([Image.new("RGB", (64, 64), (128, 128, 128))])  # the first pass allocates; pay it now
        self.started = True
        return {"images": images, "extractor": self.default.info["name"]}

    def close(self) -> None:
        self.pool.close()

    # --- reading -------------------------------------------------------------------------------------------
    def _extractor_of(self, db: Database, *, writing: bool = False) -> HotEncoder:
        recorded = db.extractor
        if recorded is None:
            if self.default is None:
                raise Conflict(f"database '{db.name}' records no extractor; start cbir-serve with --weights")
            hot = self.default
        else:
            hot = self.encoders.for_recorded(recorded)
        (db.set_extractor if writing and recorded is None else db.check_extractor)(hot.info)
        return hot

    def embedder(self, name: str) -> tuple[str | None, HotEncoder]:
        """The extractor whose vectors database ``name`` holds, with the generation it was chosen for.

        A database records its extractor once per generation (emptying it starts a new one), so the answer is kept
        per generation; the current one is taken from the database's last read of Redis, without a round trip.
        That may be behind another process's change: ``_search`` checks the generation its search read and, when it
        moved, chooses again and embeds again.
        """
        with self.pool.use(name) as db:
            known = self._embedders.get(name)
            if known is not None and known[0] == db.seen_uid:
                return known
            uid, _ = db.generation
            hot = self._extractor_of(db)
            if db.extractor is not None:  # an empty database may still get another extractor's vectors
                self._embedders[name] = (uid, hot)
            return uid, hot

    def search(self, name: str, images: list[Image.Image], k: int, *, nprobe: int | None = None) -> list[list[Hit]]:
        """The ``k`` nearest stored images of each query image, nearest first."""
        return self._search(name, lambda hot: hot.embed(images), k, nprobe)

    def search_many(self, names: list[str], image: Image.Image, k: int) -> list[tuple[str, Hit]]:
        """One query over several databases, merged by distance (each embedded once per distinct extractor)."""
        embedded: dict[int, np.ndarray] = {}

        def vectors(hot: HotEncoder) -> np.ndarray:
            if id(hot) not in embedded:
                embedded[id(hot)] = hot.embed([image])
            return embedded[id(hot)]

        merged = []
        for name in dict.fromkeys(names):
            merged += [(name, hit) for hit in self._search(name, vectors, k, None)[0]]
        merged.sort(key=lambda pair: pair[1].distance)
        return merged[:k]

    def _search(self, name: str, embed, k: int, nprobe: int | None) -> list[list[Hit]]:
        """Search database ``name`` with the vectors ``embed(extractor)`` gives, the extractor being the one of the
        database's generation as the search itself reads it (see ``embedder``)."""
        for _ in range(3):
            uid, hot = self.embedder(name)
            vectors = embed(hot)
            with self.pool.use(name) as db:
                try:
                    found = db.search(vectors, k, nprobe=nprobe)
                except DatabaseError:
                    if db.seen_uid == uid:
                        raise
                    continue  # emptied and rebuilt meanwhile, maybe by another extractor: choose it again
                if db.seen_uid != uid:
                    continue
            results = []
            for ids, distances, paths, classes in zip(found.ids, found.distances, found.paths, found.classes):
                kept = ids >= 0
                results.append([Hit(rank + 1, int(i), float(d), p, c) for rank, (i, d, p, c)
                                in enumerate(zip(ids[kept], distances[kept], paths, classes))])
            return results
        raise Conflict(f"database '{name}' was emptied and rebuilt during the search, three times; try again")

    def entry(self, name: str, image_id: int) -> tuple[str, str]:
        """(path, class) of a stored image."""
        with self.pool.use(name) as db:
            found = db.lookup([image_id])[0]
        if found is None:
            raise NotFound(f"database '{name}' has no image with id {image_id}")
        return found

    def items(self, name: str) -> list[tuple[int, str, str]]:
        """Every (id, path, class), sorted by id; re-read only when the database changed."""
        with self.pool.use(name) as db:
            generation = db.generation
            cached = self._listings.get(name)
            if cached is None or cached[0] != generation:
                cached = (generation, db.items())
                self._listings[name] = cached
        return cached[1]

    def count(self, name: str) -> int:
        with self.pool.use(name) as db:
            return len(db)

    def info(self, name: str) -> dict:
        with self.pool.use(name) as db:
            info = db.info()
        info["classes"] = dict(sorted(Counter(c for _, _, c in self.items(name)).items()))
        return info

    # --- writing -------------------------------------------------------------------------------------------
    def uploads_folder(self, db: Database) -> Path:
        return (Path(self.config.uploads) / db.name) if self.config.uploads else db.folder / "uploads"

    def add(self, name: str, uploads: list[tuple[Image.Image, bytes, str]], label: str, *,
            cytomine: bool = False) -> list[Added]:
        """Store uploaded images with their class: the file (private to the server's user), then the database.

        Native uploads are kept as ``<class>/<content hash>_<file name>``, so sending the same file again stores
        nothing twice; the Cytomine-shaped route keeps the platform's file name, its key for removal.
        A failure on the way removes the files it wrote that the database did not take.
        """
        with self.pool.use(name) as db:
            hot = self._extractor_of(db, writing=True)
        vectors = hot.embed([image for image, _, _ in uploads])
        with self.pool.use(name) as db:
            folder = self.uploads_folder(db)
            if cytomine:
                paths = [folder / CYTOMINE_FOLDER / filename for _, _, filename in uploads]
            else:
                paths = [folder / (safe_name(label) if label else UNLABELLED) /
                         f"{hashlib.sha256(data).hexdigest()[:12]}_{safe_name(filename)}"
                         for _, data, filename in uploads]
            existing = db.ids_of_paths([str(p) for p in paths])
            if cytomine and existing[0] is not None:
                raise Conflict(f"'{uploads[0][2]}' is already in storage '{name}'; remove it first")
            new = [i for i, image_id in enumerate(existing) if image_id is None]
            written: list[Path] = []
            try:
                for i in new:
                    _write_private(paths[i], uploads[i][1], root=folder)
                    written.append(paths[i])
                ids = db.add([str(paths[i]) for i in new], [label] * len(new), vectors[new]) if new else []
            except BaseException:
                _keep_only_stored(db, written)
                raise
        fresh = dict(zip(new, ids))
        return [Added(fresh.get(i, existing[i]), str(p), label, i in fresh) for i, p in enumerate(paths)]

    def remove(self, name: str, image_ids: list[int]) -> list[int]:
        """Remove stored images by id; a file the server itself stored is deleted too, a user's indexed file never."""
        with self.pool.use(name) as db:
            entries = db.lookup(image_ids)
            missing = [i for i, entry in zip(image_ids, entries) if entry is None]
            if missing:
                raise NotFound(f"database '{name}' has no image with id {', '.join(map(str, missing))}")
            paths = [path for path, _ in entries]
            db.remove(paths)
            folder = self.uploads_folder(db)
            for path in paths:
                if _inside(path, folder):
                    Path(path).unlink(missing_ok=True)
        return image_ids

    def remove_cytomine(self, name: str, filename: str) -> int:
        with self.pool.use(name) as db:
            path = self.uploads_folder(db) / CYTOMINE_FOLDER / filename
            image_id = db.ids_of_paths([str(path)])[0]
        if image_id is None:
            raise NotFound(f"{filename} not found in storage '{name}'")
        self.remove(name, [image_id])
        return image_id

    def create(self, name: str) -> None:
        if name in self.pool.names():
            raise Conflict(f"database '{name}' already exists")
        with self.pool.use(name, create=True):
            pass

    def drop(self, name: str) -> None:
        """Delete a database: its images, its index, and the files the server stored for it."""
        with self.pool.use(name) as db:
            folder = self.uploads_folder(db)
            db.drop()
            self.pool.forget(name)
        self._listings.pop(name, None)
        if self.config.uploads and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def check_filename(filename: str | None) -> str:
    """A client's file name usable as one path component, or one clear error (never a path: no separators)."""
    if not filename or not filename.strip():
        raise BadInput("the upload has no file name")
    if "/" in filename or "\\" in filename or "\0" in filename or filename.startswith(".") or \
            len(filename.encode("utf-8", "surrogateescape")) > 200:
        raise BadInput(f"file name {filename!r} must be one name: no '/', '\\' or leading '.', at most 200 bytes")
    return filename


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def _write_private(path: Path, data: bytes, *, root: Path) -> None:
    """Write ``data`` to ``path`` under ``root`` atomically, mode 0600, in folders of the server's user only: each
    folder from ``root`` down is opened without following a link and refused when it is someone else's, and the file
    is written relative to that open folder (see :func:`cbir.files.open_folder`), so nothing planted in a shared
    uploads folder redirects it."""
    prepare_folder(root.parent, what="uploads folder")  # made private when missing, refused when someone else's
    folder = open_folder(root, "uploads folder", own_link=True)
    try:
        for part in path.parent.relative_to(root).parts:
            inner = open_folder(part, "uploads folder", dir_fd=folder)
            os.close(folder)
            folder = inner
        with replacing(path.name, durable=True, dir_fd=folder) as handle:
            handle.write(data)
    finally:
        os.close(folder)


def _keep_only_stored(db: Database, written: list[Path]) -> None:
    """After a failed add: delete the files the database did not take (when it cannot tell, keep them all: a stray
    file costs disk, a missing one would lose an image)."""
    if not written:
        return
    try:
        stored = db.has_paths([str(p) for p in written])
    except CbirError:
        return
    for path, kept in zip(written, stored):
        if not kept:
            path.unlink(missing_ok=True)
