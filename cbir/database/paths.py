"""One form for the image paths a database stores: absolute, symbolic links resolved (``os.path.realpath``).

The same file reached as ``index/a.png``, ``./index/a.png``, ``/abs/index/a.png`` or through a link is one key,
so indexing a folder again from elsewhere adds nothing. Databases written before stored paths as they were given;
:func:`migrate` rewrites them when such a database is opened: an absolute path is resolved; a relative one is
resolved when its file exists from the current folder (then it is almost surely the folder it was indexed from),
and is otherwise kept as stored and said so, at each open until a command run from that folder resolves it. Two
stored paths of one file keep the later one (the newer vector of the same image): nothing but a duplicate goes.
"""

from __future__ import annotations

import logging
import os

from cbir.naming import printable

from .store import RedisStore, encode

log = logging.getLogger("cbir")

#: ``meta`` field ``paths``: the stored paths are in the normal form.
RESOLVED = "resolved"


class PathResolver:
    """``os.path.realpath`` with the folders remembered: one ``lstat`` per file rather than one per folder level
    (a million paths resolve in seconds)."""

    def __init__(self):
        self._folders: dict[str, str] = {}

    def __call__(self, path) -> str:
        path = os.fspath(path)
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        folder, name = os.path.split(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder)
        full = os.path.join(real_folder, name)
        if name in ("", ".", "..") or os.path.islink(full):
            return os.path.realpath(full)
        return full


def resolve(paths) -> list[str]:
    """The normal form of each path."""
    resolver = PathResolver()
    return [resolver(p) for p in paths]


def migrate(store: RedisStore) -> None:
    """Rewrite the stored paths of a database written before paths were resolved (once; a no-op after)."""
    if store.meta_field("paths") == RESOLVED:
        return
    meta = store.snapshot()
    if meta.uid is None:
        return
    resolver = PathResolver()
    renames, kept_relative = [], []
    for image_id, path, _ in store.items():
        if not os.path.isabs(path) and not os.path.exists(path):
            kept_relative.append(path)
            continue
        normal = resolver(path)
        if normal != path:
            renames.append((image_id, encode(path), encode(normal)))
    duplicates = 0
    for start in range(0, len(renames), 1000):
        duplicates += len(store.rename_paths(meta.uid, renames[start : start + 1000])[1])
    if not kept_relative:
        store.set_meta_field("paths", RESOLVED)
    if renames:
        log.info("database '%s': %d stored paths rewritten in their resolved form%s", store.name, len(renames),
                 f" ({duplicates} duplicates of one file removed)" if duplicates else "")
    if kept_relative:
        log.warning(
            "database '%s': %d paths were stored relative to the folder they were indexed from and do not exist from "
            "here (e.g. %s); they are kept as stored: run any cbir command on it once from that folder (e.g. "
            "cbir-db info --db_name %s) to store them resolved", store.name, len(kept_relative),
            printable(kept_relative[0]), store.name,
        )
