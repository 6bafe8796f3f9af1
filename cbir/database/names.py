"""The id -> (path, class) table a search needs, kept in memory and in a file beside the FAISS index.

Mapping the ids FAISS finds to paths through Redis costs a round trip and the parsing of every reply; for a
batch of 1000 queries (10,000 ids) that is tens of milliseconds, as much as a fast FAISS search itself. Within
one database generation (``uid``) an id is never reused and its path and class never change, so a copy of the
mapping can never be wrong, only incomplete: an id it lacks is read from Redis and added. The file is therefore
written without any ordering against the FAISS file (any saved copy of the same generation is valid) and a
missing or broken one only makes the first searches slower.

Memory: an index by id (8 bytes per id ever given out) and the UTF-8 bytes of path and class with two offsets
(16 bytes) per entry -- about 80 bytes per image for typical paths, against 512 for a 128-value vector.
"""

from __future__ import annotations

import zipfile
from array import array
from pathlib import Path

import numpy as np

from cbir.files import PRIVATE_FILE, replacing

from .store import encode

# 2: paths stored in one normal form (cbir.database.paths); tables of version 1 may hold the paths as given.
FORMAT = "cbir-names-2"


class NameTable:
    """id -> (path, class) of one database generation; append-only (removed ids are simply never asked for)."""

    def __init__(self, uid: str | None = None):
        self.uid = uid
        self._row = np.full(0, -1, dtype=np.int64)  # id -> entry number, -1 when absent
        self._offsets = array("q", [0])  # entry e: path = blob[o[2e]:o[2e+1]], class = blob[o[2e+1]:o[2e+2]]
        self._blob = bytearray()
        self._count = 0
        self.dirty = False

    def __len__(self) -> int:
        return self._count

    def put(self, ids, paths, classes) -> None:
        """Record entries; ``paths`` and ``classes`` as ``str`` or encoded ``bytes``; known ids are skipped."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return
        top = int(ids.max()) + 1
        if top > len(self._row):
            grown = np.full(max(top, 2 * len(self._row), 1024), -1, dtype=np.int64)
            grown[: len(self._row)] = self._row
            self._row = grown
        for image_id, path, cls in zip(ids.tolist(), paths, classes):
            if self._row[image_id] >= 0:
                continue
            self._blob += path if isinstance(path, bytes) else encode(path)
            self._offsets.append(len(self._blob))
            self._blob += cls if isinstance(cls, bytes) else encode(cls)
            self._offsets.append(len(self._blob))
            self._row[image_id] = self._count
            self._count += 1
        self.dirty = True

    def get(self, ids: list[int]) -> dict[int, tuple[str, str]]:
        """The known entries among ``ids`` (distinct ids); the others are left out."""
        if not ids or not self._count:
            return {}
        wanted = np.asarray(ids, dtype=np.int64)
        rows = np.full(len(wanted), -1, dtype=np.int64)
        inside = (wanted >= 0) & (wanted < len(self._row))
        rows[inside] = self._row[wanted[inside]]
        known = rows >= 0
        if not known.any():
            return {}
        rows = rows[known]
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        starts, middles, ends = offsets[2 * rows], offsets[2 * rows + 1], offsets[2 * rows + 2]
        blob = self._blob
        return {
            image_id: (blob[a:b].decode("utf-8", "surrogateescape"), blob[b:c].decode("utf-8", "surrogateescape"))
            for image_id, a, b, c in zip(wanted[known].tolist(), starts.tolist(), middles.tolist(), ends.tolist())
        }

    # --- file ----------------------------------------------------------------------------------------------
    def save(self, path: Path, *, mode: int = PRIVATE_FILE) -> None:
        """Write atomically (a new file of ``mode``, then rename); any copy of this generation is valid to load."""
        with replacing(path, mode=mode) as handle:
            np.savez(
                handle,
                format=np.array(FORMAT),
                uid=np.array(self.uid or ""),
                row=self._row,
                offsets=np.frombuffer(self._offsets, dtype=np.int64).copy(),
                blob=np.frombuffer(bytes(self._blob), dtype=np.uint8),
            )
        self.dirty = False

    @staticmethod
    def saved_count(path: Path, uid: str) -> int:
        """Entries of the saved table of generation ``uid``; 0 when there is none."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT or str(data["uid"]) != uid:
                    return 0
                return (len(data["offsets"]) - 1) // 2
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return 0

    @classmethod
    def load(cls, path: Path, uid: str) -> "NameTable":
        """The saved table of generation ``uid``; an empty one when the file is missing, broken or of another."""
        table = cls(uid)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT or str(data["uid"]) != uid:
                    return table
                row, offsets, blob = data["row"], data["offsets"], data["blob"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return table
        count = (len(offsets) - 1) // 2
        if row.dtype != np.int64 or offsets.dtype != np.int64 or (len(row) and int(row.max()) >= count):
            return table
        table._row = row.copy()
        table._offsets = array("q", offsets.tobytes())
        table._blob = bytearray(blob.tobytes())
        table._count = count
        return table
