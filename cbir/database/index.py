"""The FAISS side of a database: a search structure derived from the vectors kept in Redis.

An index is described by a FAISS factory string, as FAISS does: ``"Flat"`` (exact), ``"IVF1024,Flat"``,
``"IVF4096,PQ32"``, ``"HNSW32"``... Inverted-file indexes hold our ids themselves; every other kind is
wrapped in ``IndexIDMap2`` so it does too. Ids are never positions.

With a GPU build of FAISS (``faiss.get_num_gpus() > 0``) flat and inverted-file indexes are searched on a copy
on every GPU (``index_cpu_to_all_gpus``); the CPU index stays the one that is changed and saved, and the GPU copy
is made again after a change. ``CBIR_FAISS_GPU=0`` turns this off. Untested here: the project runs faiss-cpu.

The index file holds a small JSON header (which database generation and which change of the log the index
reflects) followed by the FAISS index, and is replaced atomically (a new private file, fsync, ``os.replace``).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import faiss
import numpy as np

from cbir.files import PRIVATE_FILE, replacing

from .errors import DatabaseError

MAGIC = b"CBIRFAISS1\n"
EXACT = "Flat"
GPU_MAX_K = 2048  # FAISS GPU search returns at most this many neighbours; beyond it we search on the CPU
GPU_MAX_NPROBE = 2048

log = logging.getLogger("cbir.database")


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, or when ``CBIR_FAISS_GPU=0``."""
    if os.environ.get("CBIR_FAISS_GPU", "1").strip() == "0":
        return 0
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # FAISS errors read "Error in <signature> at <file>:<line>: <message>"
    return lines[0].rsplit(": ", 1)[-1] if lines[0].startswith("Error in") else lines[0]


def _uses_native_ids(factory: str) -> bool:
    return "IVF" in factory.upper()


class VectorIndex:
    """One FAISS index and the factory string it was built from."""

    def __init__(self, index: faiss.Index, factory: str):
        self.index = index
        self.factory = factory
        self._gpu = None  # the search copy on the GPUs; None when stale or not used
        self._gpu_failed = False

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def build(cls, dim: int, factory: str = EXACT) -> "VectorIndex":
        spec = factory if _uses_native_ids(factory) else f"IDMap2,{factory}"
        try:
            index = faiss.index_factory(int(dim), spec, faiss.METRIC_L2)
        except RuntimeError as error:
            raise DatabaseError(f"FAISS cannot build index '{factory}': {_first_line(error)}") from None
        if _uses_native_ids(factory) and faiss.try_extract_index_ivf(index) is None:
            raise DatabaseError(f"FAISS index '{factory}' is not an inverted file")
        return cls(index, factory)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def nlist(self) -> int | None:
        ivf = faiss.try_extract_index_ivf(self.index)
        return int(ivf.nlist) if ivf is not None else None

    def train(self, vectors: np.ndarray) -> None:
        self._gpu = None
        try:
            self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        except RuntimeError as error:
            raise DatabaseError(
                f"FAISS cannot train index '{self.factory}' on {len(vectors)} vectors: {_first_line(error)}"
            ) from None

    # --- contents ------------------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Every id the index holds (any order)."""
        if hasattr(self.index, "id_map"):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)
        ivf = faiss.extract_index_ivf(self.index)
        invlists = ivf.invlists
        parts = []
        for list_no in range(ivf.nlist):
            size = invlists.list_size(list_no)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._gpu = None
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids (absent ones are ignored); False when this kind of index cannot remove (HNSW)."""
        if not len(ids):
            return True
        self._gpu = None
        try:
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:
            return False
        return True

    def search_parameters(self, k: int, nprobe: int | None = None) -> str:
        """The FAISS parameter string a search of ``k`` results sets (``"nprobe=4"``, ``"efSearch=64"``), from the
        factory string: lists probed (at most all of them), and an HNSW beam wide enough for ``k``."""
        parameters = []
        if nprobe and self.nlist:
            parameters.append(f"nprobe={max(1, min(int(nprobe), self.nlist))}")
        if "HNSW" in self.factory.upper() and not _uses_native_ids(self.factory):
            parameters.append(f"efSearch={max(2 * int(k), 64)}")
        return ",".join(parameters)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        parameters = self.search_parameters(k, nprobe)
        if parameters:  # ParameterSpace reaches through the id map to the index each parameter belongs to
            faiss.ParameterSpace().set_index_parameters(self.index, parameters)
        ivf = faiss.try_extract_index_ivf(self.index)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        gpu = self._gpu_copy(int(k), ivf)
        if gpu is not None:
            return gpu.search(queries, int(k))
        return self.index.search(queries, int(k))

    def _gpu_copy(self, k: int, ivf):
        """The GPU copy to search on (made when missing), or None: no GPU, k too large, a kind FAISS has no GPU
        version of (HNSW...), or a copy that failed once (then the CPU serves, with one warning)."""
        if self._gpu_failed or k > GPU_MAX_K or self.ntotal == 0 or gpu_count() == 0:
            return None
        if ivf is not None and int(ivf.nprobe) > GPU_MAX_NPROBE:
            return None
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "id_map") else self.index
        if ivf is None and not isinstance(inner, faiss.IndexFlat):
            return None
        if self._gpu is None:
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except (RuntimeError, AttributeError) as error:
                self._gpu_failed = True
                log.warning("FAISS could not copy the %s index to the GPU (%s); searching on the CPU",
                            self.factory, _first_line(error))
                return None
        if ivf is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", int(ivf.nprobe))
        return self._gpu

    # --- files ---------------------------------------------------------------------------------------------
    def save(self, path: Path, state: dict, *, mode: int = PRIVATE_FILE) -> None:
        """Write header + index to a new file (``mode``), fsync it, and move it over ``path`` atomically."""
        header = json.dumps({**state, "factory": self.factory, "ntotal": self.ntotal}).encode()
        with replacing(path, mode=mode, durable=True) as handle:
            handle.write(MAGIC + struct.pack("<I", len(header)) + header)
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(handle.write))

    @staticmethod
    def read_state(path: Path) -> dict | None:
        """The header of an index file; None when the file is missing or not ours."""
        try:
            with open(path, "rb") as handle:
                return _read_header(handle)
        except (OSError, ValueError):
            return None

    @classmethod
    def load(cls, path: Path) -> tuple["VectorIndex", dict] | None:
        """The saved index and its header; None when missing or unreadable (it is rebuilt from Redis then)."""
        try:
            with open(path, "rb") as handle:
                state = _read_header(handle)
                index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
        except (OSError, ValueError, RuntimeError):
            return None
        return cls(index, state.get("factory", EXACT)), state


def _read_header(handle) -> dict:
    if handle.read(len(MAGIC)) != MAGIC:
        raise ValueError("not a cbir index file")
    (size,) = struct.unpack("<I", handle.read(4))
    return json.loads(handle.read(size))
