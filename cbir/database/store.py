"""The Redis side of a database: the truth (ids, paths, classes, vectors, metadata) under one key prefix.

Keys of database ``<name>`` (nothing else is ever touched, so databases and foreign keys share a server safely):

===========================  ======  ==============================================================
``cbir:{<name>}:meta``       hash    uid (changes when the database is emptied), extractor (JSON),
                                     dim, index (FAISS factory string), nprobe, created, paths
                                     ("resolved": every path is in the normal form of ``paths.py``)
``cbir:{<name>}:path``       hash    id -> image path
``cbir:{<name>}:id``         hash    image path -> id
``cbir:{<name>}:class``      hash    id -> class name
``cbir:{<name>}:vec``        hash    id -> float32 vector bytes
``cbir:{<name>}:extra``      hash    image path -> JSON of extra metadata (a slide tile: its slide, level-0 box,
                                     mosaic membership); written before the image, so never missing for one
``cbir:{<name>}:next_id``    string  id counter (ids are never reused: an id's path and class never change)
``cbir:{<name>}:version``    string  INCRed by every change of the id set or of the index type
``cbir:{<name>}:log``        stream  one entry per change, entry id ``<version>-1``: ids added, ids deleted,
                                     new index type; lets a FAISS copy catch up without a full comparison
``cbir:databases``           set     names of the databases on this server
===========================  ======  ==============================================================

Every change is one Lua script, atomic on the server: replacing a re-indexed path, bumping the version and
logging the change happen together or not at all, whatever process dies when.

``{<name>}`` is a Redis Cluster hash tag: every key of one database hashes to the same slot, so the scripts and
transactions above, which touch several keys of one database, are allowed on a cluster node too (a cluster
refuses a script or a transaction whose keys lie in two slots). ``cbir:databases`` is only ever used alone.
Databases written before the hash tags (``cbir:<name>:...``) are renamed to this layout when opened.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import redis

DATABASES_KEY = "cbir:databases"
LEGACY_PREFIX = "cbir:"
SUFFIXES = ("meta", "id", "path", "class", "vec", "next_id", "version", "log", "extra")
LOG_MAXLEN = 2000  # log entries kept (one per added chunk): a FAISS copy further behind compares all ids
CHUNK = 1000  # items per write script: keeps each script short, so the server never blocks long


def key_prefix(name: str) -> str:
    """``cbir:{<name>}:`` -- the braces make every key of one database hash to one Redis Cluster slot."""
    return f"cbir:{{{name}}}:"


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _ids_from_bytes(values) -> np.ndarray:
    values = [v for v in values if v]
    if not values:
        return np.empty(0, dtype=np.int64)
    return np.array(values, dtype="S").astype(np.int64)


def _glob_escape(text: bytes) -> bytes:
    out = bytearray()
    for byte in text:
        if byte in b"\\*?[]":
            out += b"\\"
        out.append(byte)
    return bytes(out)


_CHECK_UID = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if uid ~= ARGV[1] then
  return redis.error_reply('CBIRGONE the database was emptied or dropped by another command')
end
"""

# KEYS: meta id path class vec version log
# ARGV: uid, log maxlen, dim, n, then n times: id, path, class, vector
_ADD = _CHECK_UID + """
local dim = redis.call('HGET', KEYS[1], 'dim')
if not dim then
  redis.call('HSET', KEYS[1], 'dim', ARGV[3])
elseif dim ~= ARGV[3] then
  return redis.error_reply('CBIRDIM ' .. dim)
end
local n = tonumber(ARGV[4])
local added = {}
local replaced = {}
for i = 0, n - 1 do
  local base = 5 + 4 * i
  local id = ARGV[base]
  local path = ARGV[base + 1]
  local previous = redis.call('HGET', KEYS[2], path)
  if previous and previous ~= id then
    redis.call('HDEL', KEYS[3], previous)
    redis.call('HDEL', KEYS[4], previous)
    redis.call('HDEL', KEYS[5], previous)
    replaced[#replaced + 1] = previous
  end
  redis.call('HSET', KEYS[2], path, id)
  redis.call('HSET', KEYS[3], id, path)
  redis.call('HSET', KEYS[4], id, ARGV[base + 2])
  redis.call('HSET', KEYS[5], id, ARGV[base + 3])
  added[#added + 1] = id
end
local version = redis.call('INCR', KEYS[6])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], version .. '-1',
           'add', table.concat(added, ','), 'del', table.concat(replaced, ','), 'index', '')
return {version, replaced}
"""

# Scripts that remove ids (KEYS: meta id path class vec version log; ARGV: uid, log maxlen, ...) call forget(id)
# for each, after taking its path out of the id hash themselves; the end logs them as one change.
_FORGET = """
local removed = {}
local function forget(id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  removed[#removed + 1] = id
end
"""
_LOG_REMOVED = """
local version = 0
if #removed > 0 then
  version = redis.call('INCR', KEYS[6])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], version .. '-1',
             'add', '', 'del', table.concat(removed, ','), 'index', '')
end
return {version, removed}
"""

# ARGV: uid, log maxlen, then paths
_REMOVE = _CHECK_UID + _FORGET + """
for i = 3, #ARGV do
  local id = redis.call('HGET', KEYS[2], ARGV[i])
  if id then
    redis.call('HDEL', KEYS[2], ARGV[i])
    forget(id)
  end
end
""" + _LOG_REMOVED

# ARGV: uid, log maxlen, then triples: id, stored path, its normal form. Two paths of one file keep the later id.
_RENAME = _CHECK_UID + _FORGET + """
for i = 3, #ARGV, 3 do
  local id, old, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HGET', KEYS[2], old) == id then
    redis.call('HDEL', KEYS[2], old)
    local other = redis.call('HGET', KEYS[2], new)
    if other == id then
      other = nil
    end
    if other and tonumber(other) > tonumber(id) then
      forget(id)
    else
      if other then
        forget(other)
      end
      redis.call('HSET', KEYS[2], new, id)
      redis.call('HSET', KEYS[3], id, new)
    end
  end
end
""" + _LOG_REMOVED

# KEYS: meta version log ; ARGV: uid, log maxlen, factory, nprobe
_SET_INDEX = _CHECK_UID + """
redis.call('HSET', KEYS[1], 'index', ARGV[3], 'nprobe', ARGV[4])
local version = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], version .. '-1', 'add', '', 'del', '', 'index', ARGV[3])
return version
"""

# KEYS: the n legacy keys, then the n new ones; ARGV: n. Renames only when the new layout is absent (atomic).
_MIGRATE = """
local n = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[n + 1]) == 1 or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[n + i])
  end
end
return 1
"""


@dataclass
class Snapshot:
    """What a FAISS copy must agree with, read atomically."""

    uid: str | None
    version: int
    factory: str
    nprobe: int
    dim: int | None
    count: int  # images stored


@dataclass
class LogEntry:
    version: int
    added: np.ndarray
    deleted: np.ndarray
    index: str


class RedisStore:
    """All Redis reads and writes of one database."""

    def __init__(self, client: redis.Redis, name: str):
        self.client = client
        self.name = name
        self.prefix = key_prefix(name)
        self.k_meta = self.prefix + "meta"
        self.k_id = self.prefix + "id"
        self.k_path = self.prefix + "path"
        self.k_class = self.prefix + "class"
        self.k_vec = self.prefix + "vec"
        self.k_next = self.prefix + "next_id"
        self.k_version = self.prefix + "version"
        self.k_log = self.prefix + "log"
        self.k_extra = self.prefix + "extra"
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)
        self._set_index = client.register_script(_SET_INDEX)
        self._rename = client.register_script(_RENAME)
        self._migrate = client.register_script(_MIGRATE)

    # --- the database itself -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.client.hexists(self.k_meta, "uid"))

    def create(self) -> None:
        """Make the database exist (no-op when it does; safe when two processes create it at once)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self.k_meta, "uid", uuid.uuid4().hex)
        pipe.hsetnx(self.k_meta, "index", "Flat")
        pipe.hsetnx(self.k_meta, "nprobe", 0)
        pipe.hsetnx(self.k_meta, "created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        pipe.hsetnx(self.k_meta, "paths", "resolved")
        pipe.execute()
        # Not in the transaction above: the list of names lies in another hash slot. Listed after the database
        # exists, so a name in the list always has a database behind it (unless dropped meanwhile).
        self.client.sadd(DATABASES_KEY, self.name)

    def migrate_legacy(self) -> bool:
        """Rename the keys of a database written before the hash tags (``cbir:<name>:...``); True when done."""
        old = [f"{LEGACY_PREFIX}{self.name}:{suffix}" for suffix in SUFFIXES]
        new = [self.prefix + suffix for suffix in SUFFIXES]
        # One key at a time first: the script touches keys of several slots, which a cluster node refuses (and a
        # cluster never held the old layout, whose scripts it would have refused too).
        if not self.client.exists(old[0]) or self.client.exists(new[0]):
            return False
        return bool(self._migrate(keys=old + new, args=[len(SUFFIXES)]))

    def known_databases(self) -> list[str]:
        return sorted(decode(name) for name in self.client.smembers(DATABASES_KEY))

    def clear(self) -> None:
        """Delete every key of this database, and only those; the meta hash (its uid) goes first, so a
        command still writing into the old contents is refused rather than mixing old ids with new ones."""
        self.client.unlink(self.k_meta)
        pattern = _glob_escape(encode(self.prefix)) + b"*"
        batch = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def forget(self) -> None:
        self.client.srem(DATABASES_KEY, self.name)

    # --- metadata ------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {decode(k): decode(v) for k, v in self.client.hgetall(self.k_meta).items()}

    def meta_field(self, field: str) -> str | None:
        value = self.client.hget(self.k_meta, field)
        return decode(value) if value is not None else None

    def set_meta_field(self, field: str, value: str) -> None:
        self.client.hset(self.k_meta, field, value)

    def snapshot(self) -> Snapshot:
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(self.k_meta, ["uid", "index", "nprobe", "dim"])
        pipe.get(self.k_version)
        pipe.hlen(self.k_path)
        (uid, factory, nprobe, dim), version, count = pipe.execute()
        return Snapshot(
            uid=decode(uid) if uid else None,
            version=int(version or 0),
            factory=decode(factory) if factory else "Flat",
            nprobe=int(nprobe or 0),
            dim=int(dim) if dim else None,
            count=int(count),
        )

    def set_extractor_if_absent(self, info_json: str) -> str:
        """Record the extractor unless one is recorded; return the one recorded now."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self.k_meta, "extractor", info_json)
        pipe.hget(self.k_meta, "extractor")
        return decode(pipe.execute()[1])

    def extractor(self) -> dict | None:
        raw = self.client.hget(self.k_meta, "extractor")
        return json.loads(decode(raw)) if raw else None

    def set_index(self, uid: str, factory: str, nprobe: int) -> int:
        keys = [self.k_meta, self.k_version, self.k_log]
        return int(self._set_index(keys=keys, args=[uid, LOG_MAXLEN, factory, nprobe]))

    # --- writes --------------------------------------------------------------------------------------------
    def allocate_ids(self, n: int) -> np.ndarray:
        end = int(self.client.incrby(self.k_next, n))
        return np.arange(end - n, end, dtype=np.int64)

    def add_chunk(self, uid: str, ids: np.ndarray, paths: list[bytes], classes: list[bytes], vectors: np.ndarray):
        """Store one chunk (<= CHUNK items); returns (version, ids of replaced entries)."""
        args: list = [uid, LOG_MAXLEN, vectors.shape[1], len(ids)]
        for i, (image_id, path, cls) in enumerate(zip(ids.tolist(), paths, classes)):
            args += [image_id, path, cls, vectors[i].tobytes()]
        keys = [self.k_meta, self.k_id, self.k_path, self.k_class, self.k_vec, self.k_version, self.k_log]
        version, replaced = self._add(keys=keys, args=args)
        return int(version), _ids_from_bytes(replaced)

    def set_extra(self, paths: list[bytes], values: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(paths), CHUNK):
            pipe.hset(self.k_extra, mapping=dict(zip(paths[start : start + CHUNK], values[start : start + CHUNK])))
        pipe.execute()

    def forget_extra(self, paths: list[bytes]) -> None:
        if paths:
            self.client.hdel(self.k_extra, *paths)

    def remove_paths(self, uid: str, paths: list[bytes]):
        """Remove the given stored paths; returns (version or 0 when nothing changed, removed ids)."""
        keys = [self.k_meta, self.k_id, self.k_path, self.k_class, self.k_vec, self.k_version, self.k_log]
        version, removed = self._remove(keys=keys, args=[uid, LOG_MAXLEN, *paths])
        return int(version), _ids_from_bytes(removed)

    def rename_paths(self, uid: str, renames: list[tuple[int, bytes, bytes]]):
        """Store paths under new names (id, old, new); returns (version or 0, ids removed as duplicates)."""
        args: list = [uid, LOG_MAXLEN]
        for image_id, old, new in renames:
            args += [image_id, old, new]
        keys = [self.k_meta, self.k_id, self.k_path, self.k_class, self.k_vec, self.k_version, self.k_log]
        version, removed = self._rename(keys=keys, args=args)
        return int(version), _ids_from_bytes(removed)

    # --- reads ---------------------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.client.hlen(self.k_path))

    def all_ids(self) -> tuple[int, np.ndarray]:
        """(version, every stored id), read atomically."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.k_version)
        pipe.hkeys(self.k_path)
        version, keys = pipe.execute()
        return int(version or 0), np.sort(_ids_from_bytes(keys))

    def ids_of_paths(self, paths: list[bytes]) -> list[int | None]:
        if not paths:
            return []
        return [int(v) if v is not None else None for v in self.client.hmget(self.k_id, paths)]

    def extra_of(self, paths: list[bytes]) -> list[bytes | None]:
        return self.client.hmget(self.k_extra, paths) if paths else []

    def extra_items(self) -> dict[bytes, bytes]:
        return dict(self.client.hscan_iter(self.k_extra, count=1000))

    def any_extra(self) -> bytes | None:
        field = self.client.hrandfield(self.k_extra)
        return self.client.hget(self.k_extra, field) if field else None

    def paths_under(self, folder: bytes) -> list[bytes]:
        """Stored paths inside ``folder`` (which ends with a separator)."""
        pattern = _glob_escape(folder) + b"*"
        return [path for path, _ in self.client.hscan_iter(self.k_id, match=pattern, count=1000)]

    def lookup(self, ids: list[int]) -> list[tuple[str, str] | None]:
        """(path, class) of each id, in one round trip; None for ids no longer stored."""
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.k_path, ids)
        pipe.hmget(self.k_class, ids)
        paths, classes = pipe.execute()
        return [
            (decode(p), decode(c) if c is not None else "") if p is not None else None
            for p, c in zip(paths, classes)
        ]

    def fetch_vectors(self, ids: np.ndarray, dim: int, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, their vectors); ids no longer stored are left out."""
        found_ids, blocks = [], []
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            raw = self.client.hmget(self.k_vec, part.tolist())
            keep = np.array([r is not None for r in raw], dtype=bool)
            if keep.any():
                found_ids.append(part[keep])
                blocks.append(np.frombuffer(b"".join(r for r in raw if r is not None), dtype=np.float32))
        if not found_ids:
            return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
        return np.concatenate(found_ids), np.concatenate(blocks).reshape(-1, dim)

    def items(self) -> list[tuple[int, str, str]]:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.k_path)
        pipe.hgetall(self.k_class)
        paths, classes = pipe.execute()
        out = [(int(i), decode(p), decode(classes.get(i, b""))) for i, p in paths.items()]
        out.sort()
        return out

    def log_since(self, version: int) -> list[LogEntry] | None:
        """The changes after ``version``, or None when the log no longer reaches back that far."""
        entries = self.client.xrange(self.k_log, min=f"{version + 1}-0", max="+")
        out = []
        expected = version + 1
        for entry_id, fields in entries:
            number = int(entry_id.split(b"-")[0])
            if number != expected:
                return None
            expected += 1
            out.append(
                LogEntry(
                    version=number,
                    added=_ids_from_bytes(fields.get(b"add", b"").split(b",")),
                    deleted=_ids_from_bytes(fields.get(b"del", b"").split(b",")),
                    index=decode(fields.get(b"index", b"")),
                )
            )
        return out

    def memory_bytes(self) -> int | None:
        """Bytes Redis uses for this database's keys (sampled by Redis for large hashes)."""
        total = 0
        pipe = self.client.pipeline(transaction=False)
        for key in (self.k_meta, self.k_id, self.k_path, self.k_class, self.k_vec, self.k_log):
            pipe.memory_usage(key)
        try:
            for value in pipe.execute():
                total += int(value or 0)
        except redis.exceptions.ResponseError:
            return None
        return total
