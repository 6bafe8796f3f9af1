"""``Database``: the Redis store (the truth) and the FAISS index (derived from it), kept consistent.

Consistency rules:

* Every write goes to Redis first, in one atomic script per chunk, and only then to the in-memory FAISS
  index. A crash between the two leaves Redis ahead; the FAISS side catches up from the change log (or, when
  the log no longer reaches back, from a comparison of all ids) the next time anything needs it.
* The FAISS file records which database generation (``uid``) and which change (``version``) it reflects. It is
  written atomically on ``close`` and after ``train_index``; a stale, missing or broken file is repaired on use.
* Before each search, the version in Redis is compared with the one the in-memory index reflects (one round
  trip); changes made by other processes are applied, so a search while another process indexes works.
* Ids are never reused: replacing a path gives it a new id. So an id's path and class never change and the
  id -> (path, class) table of searches (``names``, kept in memory and in ``names.npz`` beside the FAISS
  file) never goes stale: a search maps ids to paths without asking Redis, which it asks only for ids the table
  lacks. A search answers as of its catch-up with Redis (one round trip): an image another process removes
  after that moment may still appear in that one answer.

A ``Database`` object is meant for one thread; open one per process (or thread).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from cbir.errors import CbirError
from cbir.files import file_mode, locked, prepare_folder

from . import paths as paths_module
from . import store as store_module
from .errors import DatabaseError
from .index import EXACT, VectorIndex
from .names import NameTable
from .server import CONNECTION_ERRORS, EmbeddedServer, connect_url, redact_url
from .store import CHUNK, RedisStore, Snapshot, decode, encode

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
INDEX_FILE = "faiss.index"
NAMES_FILE = "names.npz"
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
_REDIS_FILES = ("redis.db", "appendonly.aof")

log = logging.getLogger(__name__)


def default_home() -> Path:
    """Where databases live: ``$CBIR_HOME``, else ``./cbir_data``."""
    return Path(os.environ.get("CBIR_HOME") or "cbir_data").expanduser().absolute()


def _resolve_home(home) -> Path:
    return Path(home).expanduser().absolute() if home is not None else default_home()


def _resolve_url(redis_url: str | None) -> str | None:
    return redis_url or os.environ.get("CBIR_REDIS_URL") or None


def _check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", "..") or len(name) > 200:
        raise DatabaseError(
            f"invalid database name {name!r}: use letters, digits, '_', '.' and '-' only (it becomes a folder name)"
        )
    return name


def _prepare(folder: Path, shared_group: bool = False) -> bool:
    """Create or check a database folder (``cbir.files.prepare_folder``); True when group-shared."""
    try:
        return prepare_folder(folder, shared_group=shared_group, what="database folder")
    except DatabaseError:
        raise
    except CbirError as error:
        raise DatabaseError(str(error)) from None
    except OSError as error:
        raise DatabaseError(f"cannot use folder {folder}: {error.strerror or error}") from None


def _embedded_exists(folder: Path) -> bool:
    return any((folder / f).exists() for f in _REDIS_FILES)


def _embedded_names(home: Path) -> list[str]:
    if not home.is_dir():
        return []
    return sorted(
        d.name for d in home.iterdir() if d.is_dir() and NAME_PATTERN.fullmatch(d.name) and _embedded_exists(d)
    )


def list_databases(*, home=None, redis_url: str | None = None) -> list[str]:
    """Names of the databases: on the Redis server of ``redis_url`` (or ``$CBIR_REDIS_URL``), else the
    embedded ones in ``home``."""
    url = _resolve_url(redis_url)
    if url is None:
        return _embedded_names(_resolve_home(home))
    client = connect_url(url)
    try:
        return sorted(decode(n) for n in client.smembers(store_module.DATABASES_KEY))
    except CONNECTION_ERRORS as error:
        raise DatabaseError(f"lost the connection to Redis at {redact_url(url)}: {error}") from None
    finally:
        client.close()


def default_nprobe(nlist: int) -> int:
    """Inverted lists a search probes unless told otherwise: 1 in 128, at least 4.

    Measured with benchmarks/db_ivf.py (see benchmarks/DATABASE.md): exact search is one matrix product, so an
    inverted file pays only when a query scans a small share of the vectors. At 10^6 clustered vectors and nlist
    1000, 7 probes gave recall@10 1.000 at 17x exact, while the former default (nlist // 16 = 62) and the thesis's
    nlist // 10 were 1.2x; at 10^5 (nlist 316), 4 probes gave 0.994 at 6.7x and 19 (the former default) 1.3x.
    ``--nprobe`` trades speed for recall per search.
    """
    return min(int(nlist), max(4, int(nlist) // 128))


def _fingerprint(info: dict | None) -> str:
    return str((info or {}).get("fingerprint", ""))


def _describe_extractor(info: dict) -> str:
    fingerprint = _fingerprint(info)
    return f"{info.get('name', '?')} (fingerprint {fingerprint[:12]})"


def _precision(info: dict | None) -> str:
    """fp32 for databases built before the backend was recorded (PyTorch, fp32)."""
    return str((info or {}).get("precision") or "fp32")


def _check_precision(name: str, recorded: dict | None, info: dict, *, adding: bool) -> None:
    """int8 vectors are near, not equal, to float ones (cosine >= 0.99): never mixed in one database, and a
    query of the other kind is searched with a warning. fp16 and fp32 agree to cosine 0.9999 and mix freely."""
    if recorded is None or (_precision(recorded) == "int8") == (_precision(info) == "int8"):
        return
    built = f"{_precision(recorded)} vectors ({recorded.get('backend') or 'torch'} backend)"
    given = f"{_precision(info)} ({info.get('backend') or 'torch'})"
    if adding:
        raise DatabaseError(f"database '{name}' holds {built}; these are {given}; index with the precision it was "
                            "built with (leave --backend and --int8 out), --rewrite it, or use another --db_name")
    log.warning("database '%s' holds %s; these queries are %s: results may differ slightly", name, built, given)


def _check_extractor_info(info) -> dict:
    if not isinstance(info, dict):
        raise DatabaseError(f"extractor info must be a dict, got {type(info).__name__}")
    missing = [key for key in ("name", "num_features", "fingerprint") if key not in info]
    if missing:
        raise DatabaseError(f"extractor info lacks {', '.join(missing)}")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as error:
        raise DatabaseError(f"extractor info must be JSON-able: {error}") from None
    return info


def _redis_errors(method):
    """Turn Redis failures met inside a method into one-line ``DatabaseError``s."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except CONNECTION_ERRORS as error:
            raise DatabaseError(
                f"lost the connection to {self._where}: {str(error).strip() or type(error).__name__}; "
                "what was written before is kept"
            ) from None
        except redis.exceptions.ResponseError as error:
            text = str(error)
            if text.startswith("CBIRGONE"):
                raise DatabaseError(
                    f"database '{self.name}' was emptied or dropped by another command meanwhile; open it again"
                ) from None
            if text.startswith("CBIRDIM"):
                raise _size_mismatch(self.name, text.split()[1], "these have a different size") from None
            raise DatabaseError(f"{self._where} refused a command: {text}") from None
        except redis.exceptions.RedisError as error:
            raise DatabaseError(f"{self._where} failed: {str(error).strip() or type(error).__name__}") from None

    return wrapper


@dataclass
class SearchResult:
    """Neighbours of each query, nearest first.

    ``distances`` (n, k') float32 are squared L2 distances as FAISS returns them (on unit vectors 2 - 2 cos);
    ``ids`` (n, k') int64. ``k' = min(k, images stored)``; an approximate index that finds fewer than k' for a
    query leaves id -1 (distance inf) in those places. ``paths`` and ``classes`` hold one list per query with
    the found neighbours only (no -1).
    """

    distances: np.ndarray
    ids: np.ndarray
    paths: list[list[str]]
    classes: list[list[str]]


class Database:
    """A named image database: Redis (ids, paths, classes, vectors, extractor) + FAISS (the search index)."""

    def __init__(self, name: str, folder: Path, client: redis.Redis, server: EmbeddedServer | None, where: str,
                 *, shared_group: bool | None = None):
        self.name = name
        self.folder = folder
        # None: the folder is checked (or made private) when first written; it does not exist yet.
        self._shared_group = shared_group
        self.index_path = folder / INDEX_FILE
        self.names_path = folder / NAMES_FILE
        self._client = client
        self._server = server
        self._where = where
        self._store = RedisStore(client, name)
        self._index: VectorIndex | None = None
        self._loaded = False  # the FAISS side has been read or built
        self._uid: str | None = None
        self._factory = EXACT  # the index type Redis asks for
        self._version = 0  # the last change of the log the in-memory index reflects
        self._nprobe = 0
        self._dirty = False
        self._names = NameTable()  # id -> (path, class) of the current generation
        self._closed = False
        self._mirror = True  # keep an in-memory FAISS index in step with our writes (see writes_only)
        # A Database never closed still lets go of Redis when collected or at exit (its FAISS changes are then
        # not saved; they are rebuilt from Redis, which has them).
        self._release = weakref.finalize(self, server.release if server is not None else client.close)

    # --- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, *, home=None, redis_url: str | None = None, create: bool = False,
             shared_group: bool = False) -> "Database":
        """Open database ``name``; ``create=True`` makes it when missing.

        Without ``redis_url`` (nor ``$CBIR_REDIS_URL``), an embedded Redis keeps the data in
        ``<home>/<name>/``, started on first use and shared by every process that opens the database.
        The FAISS index file is in ``<home>/<name>/`` in every case. That folder and its files are private to
        the user (``0700``/``0600``); ``shared_group=True`` shares them with the folder's group (``2770``/``0660``)
        and a folder once shared stays so (see ``cbir.files``).
        """
        _check_name(name)
        home = _resolve_home(home)
        folder = home / name
        url = _resolve_url(redis_url)
        if url is not None:
            # The folder holds only the FAISS files here: checked now when it exists, else made on first save.
            shared = _prepare(folder, shared_group) if shared_group or os.path.lexists(folder) else None
            client = connect_url(url)
            where = f"Redis at {redact_url(url)}"
            try:
                store = RedisStore(client, name)
                store.migrate_legacy()
                if not store.exists():
                    if not create:
                        raise _unknown(name, store.known_databases())
                    store.create()
                paths_module.migrate(store)
            except CONNECTION_ERRORS as error:
                client.close()
                raise DatabaseError(f"lost the connection to {where}: {error}") from None
            except DatabaseError:
                client.close()
                raise
            return cls(name, folder, client, None, where, shared_group=shared)

        if not _embedded_exists(folder) and not create:
            raise _unknown(name, _embedded_names(home))
        shared = _prepare(folder, shared_group)
        server = EmbeddedServer(folder, name, shared_group=shared)
        client = server.connect()
        try:
            store = RedisStore(client, name)
            store.migrate_legacy()
            if not store.exists():
                store.create()
            paths_module.migrate(store)
        except (DatabaseError, *CONNECTION_ERRORS) as error:
            server.release()
            if isinstance(error, DatabaseError):
                raise
            raise DatabaseError(f"lost the connection to the embedded Redis of '{name}': {error}") from None
        return cls(name, folder, client, server, server.describe(), shared_group=shared)

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Database({self.name!r}, {self._where})"

    # --- metadata ------------------------------------------------------------------------------------------
    @property
    @_redis_errors
    def extractor(self) -> dict | None:
        """The extractor info stored with the database; None while it has none."""
        return self._store.extractor()

    @property
    @_redis_errors
    def dim(self) -> int | None:
        """Values per vector; None while the database is empty and has never held vectors."""
        return self._store.snapshot().dim

    @_redis_errors
    def __len__(self) -> int:
        return self._store.count()

    @_redis_errors
    def set_extractor(self, info: dict) -> None:
        """Record the extractor the vectors come from; refuse one that differs from the recorded one."""
        info = _check_extractor_info(info)
        self._check_dim_of(info, adding=True)
        recorded = json.loads(self._store.set_extractor_if_absent(json.dumps(info, sort_keys=True)))
        if _fingerprint(recorded) != _fingerprint(info):
            raise DatabaseError(
                f"database '{self.name}' was built with extractor {_describe_extractor(recorded)}; these vectors "
                f"come from {_describe_extractor(info)}; use {{rewrite}} to rebuild it or another {{db_name}}",
                "rewrite", "db_name",
            )
        _check_precision(self.name, recorded, info, adding=True)

    @_redis_errors
    def check_extractor(self, info: dict) -> None:
        """Refuse queries from an extractor other than the one the database was built with."""
        info = _check_extractor_info(info)
        self._check_dim_of(info, adding=False)
        recorded = self._store.extractor()
        if recorded is not None and _fingerprint(recorded) != _fingerprint(info):
            raise DatabaseError(
                f"database '{self.name}' was built with extractor {_describe_extractor(recorded)}; these queries "
                f"come from {_describe_extractor(info)}; query it with the extractor it was built with "
                "(its {weights}) or rebuild it with {rewrite}", "weights", "rewrite",
            )
        _check_precision(self.name, recorded, info, adding=False)

    def _check_dim_of(self, info: dict, *, adding: bool) -> None:
        dim = self._store.snapshot().dim
        try:
            wanted = int(info["num_features"])
        except (TypeError, ValueError):
            raise DatabaseError(f"extractor num_features must be an integer, got {info['num_features']!r}") from None
        if dim is not None and wanted != dim:
            what = "these vectors have" if adding else "the queries have"
            raise _size_mismatch(self.name, dim, f"{what} {wanted} (extractor {info.get('name', '?')})")

    # --- keeping FAISS in step with Redis ------------------------------------------------------------------
    def _sync(self) -> Snapshot:
        """Bring the in-memory index up to date with Redis (load, repair or catch up); one round trip when
        nothing changed."""
        self._check_open()
        snap = self._store.snapshot()
        if snap.uid is None:
            raise DatabaseError(f"database '{self.name}' was dropped by another command")
        if not self._mirror:
            self._uid = snap.uid
            return snap
        if not self._loaded or snap.uid != self._uid or snap.factory != self._factory:
            self._load(snap)
        if snap.version != self._version:
            self._catch_up()
        held = self._index.ntotal if self._index is not None else 0
        if self._version == snap.version and held != snap.count:
            self._reconcile()  # a file that claims more than it holds (or Redis restored from an older state)
        self._nprobe = snap.nprobe
        return snap

    def _load(self, snap: Snapshot) -> None:
        """Take the index file when it belongs to this database generation and index type, else rebuild."""
        if snap.uid != self._uid:
            self._names = NameTable.load(self.names_path, snap.uid)
        self._uid, self._factory = snap.uid, snap.factory
        loaded = VectorIndex.load(self.index_path) if self.index_path.exists() else None
        if loaded is not None:
            index, state = loaded
            if (
                state.get("uid") == snap.uid
                and index.factory == snap.factory
                and index.dim == snap.dim
                and int(state.get("version", -1)) <= snap.version
            ):
                self._index, self._version, self._dirty, self._loaded = index, int(state["version"]), False, True
                return
        # No usable file: build from the vectors in Redis.
        self._loaded = True
        self._rebuild()

    def _rebuild(self) -> None:
        """Build the index Redis asks for from every stored vector (training it when it needs it)."""
        version, ids = self._store.all_ids()
        dim = self._store.snapshot().dim
        self._version = version
        self._dirty = True
        if dim is None:
            self._index = None
            return
        index = VectorIndex.build(dim, self._factory)
        found, vectors = self._store.fetch_vectors(ids, dim)
        if not index.is_trained:
            try:
                index.train(vectors)
            except DatabaseError:
                # Too few vectors left to train the stored type: search exactly until it is trained again.
                index = VectorIndex.build(dim, EXACT)
        index.add(found, vectors)
        self._index = index

    def _catch_up(self) -> None:
        entries = self._store.log_since(self._version)
        if entries is None or not entries:
            self._reconcile()
            return
        added = np.concatenate([e.added for e in entries])
        deleted = np.concatenate([e.deleted for e in entries])
        self._apply(added, deleted)
        self._version = entries[-1].version

    def _reconcile(self) -> None:
        """Compare every id of Redis with every id of FAISS and fix the difference."""
        version, redis_ids = self._store.all_ids()
        faiss_ids = self._index.ids() if self._index is not None else np.empty(0, dtype=np.int64)
        missing = np.setdiff1d(redis_ids, faiss_ids, assume_unique=True)
        extra = np.setdiff1d(faiss_ids, redis_ids)
        self._remove_from_index(extra)
        self._add_from_redis(missing)
        self._version = version

    def _apply(self, added: np.ndarray, deleted: np.ndarray) -> None:
        """Apply logged changes; entries this index already reflects are harmless (ids are never reused)."""
        added = np.setdiff1d(added, deleted)
        present = self._index.ids() if self._index is not None else np.empty(0, dtype=np.int64)
        self._remove_from_index(np.intersect1d(deleted, present))
        self._add_from_redis(np.setdiff1d(added, present))

    def _add_from_redis(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        dim = self._store.snapshot().dim
        if dim is None:
            return
        if self._index is None:
            self._index = VectorIndex.build(dim, self._factory)
            if not self._index.is_trained:
                self._rebuild()
                return
        found, vectors = self._store.fetch_vectors(ids, dim)
        self._index.add(found, vectors)
        self._dirty = True

    def _remove_from_index(self, ids: np.ndarray) -> None:
        if self._index is None or not len(ids):
            return
        if not self._index.remove(ids):
            self._rebuild()  # an index that cannot remove (HNSW) is rebuilt from Redis
        self._dirty = True

    # --- writing -------------------------------------------------------------------------------------------
    @_redis_errors
    def add(self, paths: list[str], classes: list[str], vectors: np.ndarray) -> list[int]:
        """Store images with their classes and vectors; a path already stored is replaced. Returns the ids.

        Paths are stored resolved (absolute, links resolved: ``cbir.database.paths``), so one file is one image
        however it was named.
        """
        paths = paths_module.resolve(paths)
        classes = [str(c) for c in classes]
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise DatabaseError(f"vectors must be a 2-D array (images x values), got shape {vectors.shape}")
        if not (len(paths) == len(classes) == len(vectors)):
            raise DatabaseError(
                f"add needs as many paths, classes and vectors: got {len(paths)}, {len(classes)}, {len(vectors)}"
            )
        if not len(paths):
            return []
        if not np.isfinite(vectors).all():
            raise DatabaseError("vectors contain NaN or infinite values; the extractor output is broken")
        snap = self._sync()
        dim = vectors.shape[1]
        if snap.dim is not None and snap.dim != dim:
            raise _size_mismatch(self.name, snap.dim, f"these have {dim}")
        # A path given twice: the last one wins.
        last = {path: i for i, path in enumerate(paths)}
        keep = np.array(sorted(last.values()), dtype=np.int64)
        ids = self._store.allocate_ids(len(keep))
        id_of_path = {paths[i]: int(image_id) for i, image_id in zip(keep.tolist(), ids.tolist())}
        vectors = np.ascontiguousarray(vectors[keep])
        enc_paths = [encode(paths[i]) for i in keep.tolist()]
        enc_classes = [encode(classes[i]) for i in keep.tolist()]
        for start in range(0, len(keep), CHUNK):
            part = slice(start, start + CHUNK)
            version, replaced = self._store.add_chunk(
                self._uid, ids[part], enc_paths[part], enc_classes[part], vectors[part]
            )
            if self._mirror:
                self._names.put(ids[part], enc_paths[part], enc_classes[part])
            self._after_write(version, added=(ids[part], vectors[part]), removed=replaced)
        return [id_of_path[p] for p in paths]

    def _after_write(self, version: int, *, added=None, removed=None) -> None:
        """Mirror our own write in FAISS; writes of other processes in between are caught up by the log."""
        if not self._mirror:
            return
        if removed is not None and len(removed):
            self._remove_from_index(removed)
        if added is not None and len(added[0]):
            ids, vectors = added
            if self._index is None:
                self._index = VectorIndex.build(vectors.shape[1], self._factory)
                if not self._index.is_trained:
                    self._rebuild()  # includes what was just written
                    self._dirty = True
                    return
            self._index.add(ids, vectors)
            self._dirty = True
        if version == self._version + 1:
            self._version = version

    def writes_only(self) -> "Database":
        """From now on, write to Redis only and keep no FAISS index in this process: for the many workers of a
        distributed indexing run (cbir.distributed), each of which would otherwise load and follow the whole
        index. The next process that searches (or calls ``info``) catches the FAISS side up from Redis."""
        self._mirror = False
        self._index, self._loaded, self._dirty = None, False, False
        return self

    @_redis_errors
    def lookup(self, ids) -> list[tuple[str, str] | None]:
        """(path, class) of each id, None for an id not stored; read from Redis (one round trip)."""
        self._check_open()
        return self._store.lookup([int(i) for i in ids])

    @_redis_errors
    def ids_of_paths(self, paths) -> list[int | None]:
        """The id of each path, stored in its resolved form or as given; None for a path not stored (one round
        trip)."""
        self._check_open()
        given = [os.fspath(p) for p in paths]
        forms = [encode(p) for p in paths_module.resolve(given)] + [encode(p) for p in given]
        found = self._store.ids_of_paths(forms)
        return [resolved if resolved is not None else as_given
                for resolved, as_given in zip(found[: len(given)], found[len(given) :])]

    @property
    @_redis_errors
    def generation(self) -> tuple[str | None, int]:
        """Changes whenever the stored images change (emptied, added, removed): a key for caches of listings."""
        snap = self._store.snapshot()
        return snap.uid, snap.version

    @property
    def seen_uid(self) -> str | None:
        """The generation's uid (``generation[0]``: it changes when the database is emptied or dropped and made
        again) as of this object's last read of Redis: no round trip, so possibly behind another process's change."""
        return self._uid

    def has_paths(self, paths) -> list[bool]:
        """Whether each path is stored, in its resolved form or as given (one round trip)."""
        return [image_id is not None for image_id in self.ids_of_paths(paths)]

    @_redis_errors
    def set_extra(self, paths, extras: list[dict]) -> None:
        """Record extra metadata of images (JSON-able dicts: a slide tile's slide, box, mosaic membership).

        Written before the images themselves: a path is never stored without its metadata, and an interrupted
        run rewrites the same metadata when it adds what is missing.
        """
        self._check_open()
        paths = paths_module.resolve(paths)  # the form add() stores them in
        self._store.set_extra([encode(p) for p in paths], [encode(json.dumps(e)) for e in extras])

    @_redis_errors
    def extra(self, paths) -> list[dict | None]:
        """The extra metadata of each path (one round trip); None where it has none."""
        forms = [encode(p) for p in paths_module.resolve(paths)]
        return [json.loads(decode(v)) if v else None for v in self._store.extra_of(forms)]

    @_redis_errors
    def extras(self, *, one: bool = False) -> dict[str, dict]:
        """Every stored image's extra metadata by path (with ``one``: any one record, under the key "")."""
        self._check_open()
        if one:
            value = self._store.any_extra()
            return {"": json.loads(decode(value))} if value else {}
        raw = self._store.extra_items()
        # Metadata is written before its image: after a kill some may name images never stored.
        stored = self._store.ids_of_paths(list(raw))
        return {decode(p): json.loads(decode(v)) for (p, v), i in zip(raw.items(), stored) if i is not None}

    @_redis_errors
    def matching(self, paths) -> list[str]:
        """The stored paths that ``remove(paths)`` would remove, sorted.

        A path matches as given, absolute and resolved; a folder matches every stored path under it. An empty path
        and the root folder are refused: they would match everything (an unset shell variable must not empty a
        database).
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._check_open()
        forms: list[bytes] = []
        for path in paths:
            path = os.fspath(path)
            if not path.strip():
                raise DatabaseError("refusing an empty path: it would match every stored image; name a file or folder")
            candidates = [path.rstrip("/") or "/", os.path.abspath(path), paths_module.resolve([path])[0]]
            if any(c.strip("/") == "" for c in candidates):
                raise DatabaseError(f"refusing {path!r}: it is the root folder and would match every stored image "
                                    "with an absolute path; name the folder to remove")
            forms += [encode(c) for c in candidates]
        forms = list(dict.fromkeys(forms))
        targets = {form for form, i in zip(forms, self._store.ids_of_paths(forms)) if i is not None}
        for form in forms:
            targets.update(self._store.paths_under(form + b"/"))
        return sorted(decode(t) for t in targets)

    def remove(self, paths) -> int:
        """Remove images by path; a folder removes every stored path under it (see ``matching``). Returns how many
        were removed."""
        return self.remove_stored(self.matching(paths))

    @_redis_errors
    def remove_stored(self, stored_paths) -> int:
        """Remove the images stored under exactly these paths (as ``matching`` gives them); returns how many."""
        targets = [encode(t) for t in stored_paths]
        self._sync()
        removed_total = 0
        for start in range(0, len(targets), CHUNK):
            version, removed = self._store.remove_paths(self._uid, targets[start : start + CHUNK])
            self._store.forget_extra(targets[start : start + CHUNK])
            if len(removed):
                removed_total += len(removed)
                self._after_write(version, removed=removed)
        return removed_total

    # --- reading -------------------------------------------------------------------------------------------
    @_redis_errors
    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> SearchResult:
        """The k nearest stored images of each query (see ``SearchResult``)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise DatabaseError(f"queries must be a 2-D array (queries x values), got shape {queries.shape}")
        if int(k) < 1:
            raise DatabaseError(f"k must be at least 1, got {k}")
        if nprobe is not None and int(nprobe) < 1:
            raise DatabaseError(f"nprobe must be at least 1, got {nprobe}")
        n = len(queries)
        for attempt in range(3):
            snap = self._sync()
            if snap.dim is not None and queries.shape[1] != snap.dim:
                raise DatabaseError(
                    f"database '{self.name}' holds vectors of {snap.dim} values; the queries have "
                    f"{queries.shape[1]}; query it with the extractor it was built with"
                )
            if self._index is None or self._index.ntotal == 0 or n == 0:
                empty = [[] for _ in range(n)]
                return SearchResult(np.empty((n, 0), np.float32), np.empty((n, 0), np.int64), empty, [[] for _ in range(n)])
            k_found = min(int(k), self._index.ntotal)
            distances, ids = self._index.search(queries, k_found, nprobe or self._nprobe or None)
            names = self._names_of(ids)
            gone = [i for i, v in names.items() if v is None]
            if not gone:
                break
            # Removed by another process between our sync and the lookup: search again on the new state.
        if gone:
            mask = np.isin(ids, gone)
            ids = np.where(mask, -1, ids)
            distances = np.where(mask, np.inf, distances).astype(np.float32)
        rows = ids.tolist()
        paths = [[names[i][0] for i in row if i >= 0] for row in rows]
        classes = [[names[i][1] for i in row if i >= 0] for row in rows]
        return SearchResult(distances, ids, paths, classes)

    def _names_of(self, ids: np.ndarray) -> dict[int, tuple[str, str] | None]:
        """(path, class) of each found id: from the table, and from Redis (one round trip) for those it lacks
        (added by other processes, or a table file lost); None for ids Redis no longer has."""
        wanted = np.unique(ids[ids >= 0]).tolist()
        found: dict[int, tuple[str, str] | None] = self._names.get(wanted)
        if len(found) < len(wanted):
            unknown = [i for i in wanted if i not in found]
            looked_up = [(i, v) for i, v in zip(unknown, self._store.lookup(unknown)) if v is not None]
            if looked_up:
                self._names.put([i for i, _ in looked_up], [v[0] for _, v in looked_up], [v[1] for _, v in looked_up])
            found.update(looked_up)
            found.update((i, None) for i in unknown if i not in found)
        return found

    @_redis_errors
    def vectors(self, ids=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the given ids, or of every image sorted by id; read from Redis."""
        self._check_open()
        dim = self._store.snapshot().dim
        if ids is None:
            _, ids = self._store.all_ids()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if dim is None:
            if len(ids):
                raise DatabaseError(f"database '{self.name}' is empty: none of the {len(ids)} ids is stored")
            return ids, np.empty((0, 0), dtype=np.float32)
        found, vectors = self._store.fetch_vectors(ids, dim)
        if len(found) != len(ids):
            raise DatabaseError(
                f"{len(ids) - len(found)} of the {len(ids)} ids asked for are not in database '{self.name}'"
            )
        return found, vectors

    @_redis_errors
    def items(self) -> list[tuple[int, str, str]]:
        """Every image as (id, path, class), sorted by id."""
        self._check_open()
        return self._store.items()

    # --- index type ----------------------------------------------------------------------------------------
    @_redis_errors
    def train_index(self, nlist: int | None = None, factory: str | None = None) -> str:
        """Turn the exact index into an approximate one and say what was done (one sentence).

        Default: an inverted file ``IVF<nlist>,Flat`` with nlist about sqrt(N), at least 39 training vectors per
        list; or any FAISS factory string (``"IVF1024,PQ32"``, ``"HNSW32"``, ``"Flat"`` back to exact). A
        database too small for an inverted file stays exact and the sentence says so.
        """
        snap = self._sync()
        count = len(self)
        if snap.dim is None or count == 0:
            return f"database '{self.name}' is empty: nothing to train; it stays exact ({EXACT})"
        note = ""
        if factory is None or factory.strip() == "":
            most = count // MIN_POINTS_PER_LIST
            wanted = int(nlist) if nlist is not None else int(round(math.sqrt(count)))
            if wanted < 1:
                raise DatabaseError(f"nlist must be at least 1, got {nlist}")
            lists = min(wanted, most)
            if lists < 2:
                return (
                    f"database '{self.name}' holds {count} vectors: too few for an inverted file (it needs at least "
                    f"{2 * MIN_POINTS_PER_LIST}); it stays exact ({EXACT})"
                )
            if nlist is not None and lists < wanted:
                note = f" (nlist {wanted} lowered to {lists}: FAISS wants {MIN_POINTS_PER_LIST} vectors per list)"
            factory = f"IVF{lists},Flat"
        factory = factory.strip()
        version, ids = self._store.all_ids()
        index = VectorIndex.build(snap.dim, factory)
        found, vectors = self._store.fetch_vectors(ids, snap.dim)
        if not index.is_trained:
            index.train(vectors)
        index.add(found, vectors)
        lists = index.nlist
        nprobe = default_nprobe(lists) if lists else 0
        self._index, self._factory, self._version, self._dirty = index, factory, version, True
        self._save()  # before Redis announces the new type, so other processes find the file and need not train
        self._store.set_index(self._uid, factory, nprobe)
        self._sync()  # changes made by others while we trained, and our own index change
        self._dirty = True  # the file must also record the index change itself (one more version)
        self._save()
        if lists:
            return (
                f"database '{self.name}': {factory} index trained on {len(found)} vectors{note}; "
                f"searches probe {nprobe} of {lists} lists unless told otherwise (nprobe)"
            )
        return f"database '{self.name}': {factory} index built on {len(found)} vectors"

    # --- emptying ------------------------------------------------------------------------------------------
    @_redis_errors
    def clear(self) -> None:
        """Delete this database's contents (its keys only, and its index file); it stays, empty."""
        self._check_open()
        self._store.clear()
        self._store.create()
        self.index_path.unlink(missing_ok=True)
        self.names_path.unlink(missing_ok=True)
        self._reset()

    @_redis_errors
    def drop(self) -> None:
        """Delete this database entirely: its keys, its index file, its folder (and its embedded server)."""
        self._check_open()
        if self._server is not None:
            self._server.stop_for_drop()  # refuses while other commands use it
            self._closed = True
            self._release.detach()
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        self._store.clear()
        self._store.forget()
        self.index_path.unlink(missing_ok=True)
        if self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)
        self._reset()
        self._closed = True
        self._release()

    def _reset(self) -> None:
        self._index, self._loaded, self._uid, self._version = None, False, None, 0
        self._factory, self._dirty = EXACT, False
        self._names = NameTable()

    # --- information ---------------------------------------------------------------------------------------
    @_redis_errors
    def info(self) -> dict:
        """What the database holds and where: counts in Redis and in FAISS, extractor, index, size on disk."""
        snap = self._sync()
        files = [p for p in self.folder.rglob("*") if p.is_file()] if self.folder.is_dir() else []
        # The saved file may lag behind until the next close (a killed indexer never saved); it is caught up from
        # Redis on use, as was just done for "faiss_vectors".
        saved = VectorIndex.read_state(self.index_path)
        if saved is not None and saved.get("uid") == snap.uid:
            index_file = {"vectors": saved.get("ntotal"), "up_to_date": int(saved.get("version", -1)) == snap.version}
        else:
            index_file = None
        return {
            "name": self.name,
            "redis": self._where,
            "folder": str(self.folder),
            "images": len(self),
            "faiss_vectors": self._index.ntotal if self._index is not None else 0,
            "extractor": self._store.extractor(),
            "dim": snap.dim,
            "index": self._index.factory if self._index is not None else snap.factory,
            "nprobe": snap.nprobe or None,
            "index_file": index_file,
            "bytes_on_disk": sum(_file_size(p) for p in files),
            "redis_memory_bytes": self._store.memory_bytes(),
            "created": self._store.meta().get("created"),
        }

    # --- closing -------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the FAISS index to disk now (``close`` does it too), unless a newer one is there already."""
        self._check_open()
        self._save()

    def _own_folder(self) -> int:
        """The mode of the files to write in the database folder, making or checking the folder first."""
        if self._shared_group is None:
            self._shared_group = _prepare(self.folder)
        return file_mode(self._shared_group)

    def _save(self) -> None:
        self._save_names()
        if not self._dirty or self._index is None or self._uid is None:
            return
        mode = self._own_folder()
        try:
            with locked(self.folder / "faiss.lock", f"the FAISS index of '{self.name}'", mode=mode):
                on_disk = VectorIndex.read_state(self.index_path)
                if not (
                    on_disk
                    and on_disk.get("uid") == self._uid
                    and on_disk.get("factory") == self._index.factory
                    and int(on_disk.get("version", -1)) > self._version
                ):
                    state = {"uid": self._uid, "version": self._version, "database": self.name}
                    self._index.save(self.index_path, state, mode=mode)
        except DatabaseError:
            raise
        except CbirError as error:
            raise DatabaseError(f"could not save the FAISS index to {self.index_path}: {error}") from None
        except OSError as error:
            raise DatabaseError(
                f"could not save the FAISS index to {self.index_path}: {error.strerror or error}; "
                "Redis keeps every image and the index is rebuilt from it on the next open"
            ) from None
        self._dirty = False

    def _save_names(self) -> None:
        """Save the id -> (path, class) table when it grew, unless the saved one knows as many ids (a copy of the
        same generation is never wrong, only less complete)."""
        names = self._names
        if not names.dirty or names.uid is None or names.uid != self._uid:
            return
        try:
            mode = self._own_folder()
            with locked(self.folder / "names.lock", f"the name table of '{self.name}'", mode=mode):
                if NameTable.saved_count(self.names_path, names.uid) < len(names):
                    names.save(self.names_path, mode=mode)
                names.dirty = False
        except (OSError, CbirError):
            pass  # only a speed-up: the next process reads the missing names from Redis

    def close(self) -> None:
        """Save the FAISS index if it changed and let go of Redis (the embedded server stops with its last user)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._save()
        finally:
            self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseError(f"database '{self.name}' is closed")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a temporary file renamed meanwhile
        return 0


def _unknown(name: str, known: list[str]) -> DatabaseError:
    return DatabaseError(
        f"database '{name}' does not exist (known: {', '.join(known) if known else 'none'}); "
        "index images into it first"
    )


def _size_mismatch(name: str, held, given: str) -> DatabaseError:
    """The one message for vectors of the wrong size, whichever check meets them."""
    return DatabaseError(
        f"database '{name}' holds vectors of {held} values; {given}; use the extractor it was built with, "
        "{rewrite}, or another {db_name}", "rewrite", "db_name",
    )
