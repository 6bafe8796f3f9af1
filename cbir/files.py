"""Files and folders the tool writes: atomically (readers see the old version or the new one, never half of one),
private to their owner unless a group was asked for, never through a link someone else planted, and to places
checked before any work starts.

Rules (see SECURITY.md):

* A folder the tool creates is ``0700``, its files ``0600``; a *group-shared* folder (asked for with
  ``--shared_group``) is ``2770`` -- the setgid bit marks the choice and makes new files inherit the group -- and
  its files ``0660``.
* A folder is used only when it belongs to the user, or is group-shared with a group of the user. A symbolic link
  in its place is followed only when the user made it (the link itself belongs to the user).
* Files are written to a new temporary file (``O_CREAT | O_EXCL | O_NOFOLLOW``) renamed into place: a link planted
  under the final name is replaced, never written through.
* A lock another process holds is waited for a bounded time, saying who holds it, never silently for ever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import secrets
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

from cbir.errors import CbirError, ParameterError
from cbir.naming import printable

PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600
GROUP_FOLDER, GROUP_FILE = 0o2770, 0o660

#: Seconds a lock held by another process is waited for (``CBIR_LOCK_WAIT`` overrides): more than the slowest
#: legitimate holder, an embedded Redis loading a large append-only file at start-up.
DEFAULT_LOCK_WAIT = 300.0
_NOTICE_AFTER = 3.0  # seconds of waiting before saying who holds the lock

log = logging.getLogger("cbir")


# ---------------------------------------------------------------------------------------------- writing

def _new_temporary(path: Path, *, mode: int, suffix: str = ".tmp", dir_fd: int | None = None) -> tuple[int, Path]:
    """A new file beside ``path`` (relative to ``dir_fd`` if given), created exclusively and without following a
    link (``O_CREAT | O_EXCL | O_NOFOLLOW``) with exactly ``mode``: (descriptor, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        # A unique name: two writers of one file never share it (the last replace wins). Cut, so that it fits
        # where the final name only just does.
        temporary = path.parent / f".{path.name[:100]}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(temporary, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        os.fchmod(fd, mode)  # the mode asked for, whatever the umask took away (a group's write bit)
        return fd, temporary


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, mode: int = PRIVATE_FILE, durable: bool = False, dir_fd: int | None = None):
    """A binary file to write that replaces ``path`` (relative to the open folder ``dir_fd`` if given) when the
    block ends without an error.

    Written to a new file (see :func:`_new_temporary`) renamed over ``path``: a link planted at ``path`` is
    replaced, not written through, and a reader never sees half a file. ``durable`` fsyncs the file and the rename.
    """
    path = Path(path)
    fd, temporary = _new_temporary(path, mode=mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
    if durable:
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


def write_file(path: str | os.PathLike, data: bytes, *, mode: int = PRIVATE_FILE, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` (see :func:`replacing`)."""
    with replacing(path, mode=mode, dir_fd=dir_fd) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; on success it replaces ``path`` in one step.

    For writers that want a path (matplotlib, Pillow, openpyxl, numpy, torch); :func:`replacing` gives a file. The
    temporary file is unique, private (``0600``, exclusively created: never an existing file or a link someone
    planted), and removed on every way out that is not success, an interrupt included. Its ``suffix`` is the
    extension writers check or go by (``.png`` for a figure, ``.xlsx`` for openpyxl): ``path``'s own by default.
    The folder is made private when missing (:func:`make_folders`) and refused when another user owns it.
    """
    path = Path(path)
    check_folder_owner(make_folders(path.parent), "output folder")
    handle, temporary = _new_temporary(path, mode=PRIVATE_FILE, suffix=suffix or path.suffix or ".tmp")
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def make_folders(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` where every folder made is private (``0700``; ``Path.mkdir`` gives the parents the umask's)."""
    folder = Path(folder)
    missing = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            os.mkdir(made, PRIVATE_FOLDER)
    return folder


def check_folder_owner(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder to write into that another user owns (the superuser, who can read anything, and a group
    folder shared with the user aside): its owner could read or replace what is written there."""
    st = os.stat(folder)
    if st.st_uid not in (os.geteuid(), 0) and not (is_group_shared(st.st_mode) and st.st_gid in _my_groups()):
        raise CbirError(f"{what} {folder} belongs to user {user_name(st.st_uid)}, not to you; refusing to write "
                        "into it (its owner could read or replace what is written there); choose another folder")


def save_atomically(path: str | os.PathLike, save: Callable[[Path], object]) -> Path:
    """``save(temporary path)`` (a figure's ``savefig``, an image's ``save``) put in place as ``path`` by
    :func:`atomic_path`: private, and never written through a link planted under the name. An open file (a
    ``BytesIO``) is simply written to."""
    if not isinstance(path, (str, os.PathLike)):
        save(path)
        return path
    with atomic_path(path) as temporary:
        save(temporary)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


# ---------------------------------------------------------------------------------------------- folders

def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _my_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def is_group_shared(mode: int) -> bool:
    """A folder in group-shared mode: setgid and group read/write/search (what ``--shared_group`` makes)."""
    return mode & 0o2070 == 0o2070


def file_mode(shared_group: bool) -> int:
    return GROUP_FILE if shared_group else PRIVATE_FILE


def _check_link(path: Path, what: str) -> os.stat_result:
    """``stat`` of ``path``, refusing a symbolic link the user did not make."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid != os.geteuid():
            raise CbirError(
                f"{what} {path} is a symbolic link made by user {user_name(st.st_uid)}; refusing to follow it "
                "(the tool never writes through a link someone else planted); remove it or choose another folder"
            )
        st = os.stat(path)
    return st


def prepare_folder(path: str | os.PathLike, *, shared_group: bool = False, what: str = "folder") -> bool:
    """Create ``path`` private (``0700``) or group-shared (``2770``), or check an existing one; return whether it is
    group-shared.

    An existing folder is used only when it belongs to the user, or is group-shared with one of the user's groups.
    One of the user's that is more open than its mode (a database folder made ``0755`` by an older version) is
    closed to ``0700`` with its files ``0600``; ``shared_group`` turns a private one of the user's into a shared one.
    """
    path = Path(path)
    try:
        st = _check_link(path, what)
    except FileNotFoundError:
        if not path.parent.exists():  # CBIR_HOME itself: as private (or shared) as what it will hold
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, GROUP_FOLDER if shared_group else PRIVATE_FOLDER)
        try:
            os.mkdir(path, PRIVATE_FOLDER)
        except FileExistsError:
            return prepare_folder(path, shared_group=shared_group, what=what)  # made by another process meanwhile
        if shared_group:
            os.chmod(path, GROUP_FOLDER)
        return shared_group
    if not stat.S_ISDIR(st.st_mode):
        raise CbirError(f"{what} {path} is not a folder")
    shared = is_group_shared(st.st_mode)
    mine = st.st_uid == os.geteuid()
    if not mine and not (shared and st.st_gid in _my_groups()):
        raise CbirError(
            f"{what} {path} belongs to user {user_name(st.st_uid)}, not to you; refusing to use it (whoever owns it "
            "can read or replace what the tool keeps there); remove it or choose another folder"
        )
    if not mine:
        if st.st_mode & 0o002:
            raise CbirError(f"{what} {path} is writable by every user (mode {st.st_mode & 0o7777:04o}); "
                            f"ask its owner, {user_name(st.st_uid)}, to make it 2770")
        return True
    shared = shared or shared_group
    wanted = GROUP_FOLDER if shared else PRIVATE_FOLDER
    if st.st_mode & 0o7777 != wanted:
        # Files first when opening to a group, the folder first when closing it: no one else can swap a file for
        # a link while its mode changes.
        if shared:
            _close_files(path, GROUP_FILE)
        os.chmod(path, wanted)
        if not shared:
            _close_files(path, PRIVATE_FILE)
    return shared


def _close_files(folder: Path, mode: int) -> None:
    """Give the user's regular files directly in ``folder`` ``mode`` (links and sockets are left as they are)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode:
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(entry.path, mode)  # in a folder only we can write into (see prepare_folder)


def check_private_folder(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` (``0700``) or check that it is a real folder (no link) of the user's that no one else can
    enter; refuse it otherwise. For folders whose name others can predict (in a shared temporary folder)."""
    path = Path(path)
    try:
        os.mkdir(path, PRIVATE_FOLDER)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "a file"
        raise CbirError(
            f"{what} {path} is {kind} of user {user_name(st.st_uid)} with mode {st.st_mode & 0o7777:04o}, not a "
            f"private folder of yours (0700); another user may have planted it: remove it, or set TMPDIR to a "
            "private folder"
        )
    return path


def open_folder(path: str | os.PathLike, what: str, *, dir_fd: int | None = None, own_link: bool = False) -> int:
    """An open descriptor of the folder ``path`` (relative to ``dir_fd`` if given), made ``0700`` when missing;
    refused when it is a link (``own_link``: unless the user made it), or belongs to someone else and is not
    group-shared with the user.

    Files written relative to the descriptor (``write_file(..., dir_fd=)``) land in that folder whatever is
    renamed or linked meanwhile: nothing of the path is looked up again.
    """
    try:
        os.mkdir(path, PRIVATE_FOLDER, dir_fd=dir_fd)
    except FileExistsError:
        pass
    follow = own_link and stat.S_ISLNK((st := os.lstat(path, dir_fd=dir_fd)).st_mode) and st.st_uid == os.geteuid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW),
                     dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CbirError(f"{what} {path} is a symbolic link or not a folder; the tool writes only into folders, "
                            "never through a link; remove it or choose another folder") from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() and not (is_group_shared(st.st_mode) and st.st_gid in _my_groups()):
        os.close(fd)
        raise CbirError(f"{what} {path} belongs to user {user_name(st.st_uid)}, not to you; refusing to write into "
                        "it (its owner could read or replace what is written there); choose another folder")
    return fd


def read_private_text(path: str | os.PathLike, what: str, *, shared_group: bool = False) -> str:
    """The text of a file that holds a secret: a regular file (no link) of the user's, closed to other users
    (and to the group unless ``shared_group``); refused with one line otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CbirError(f"{what} {path} does not exist") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CbirError(f"{what} {path} is a symbolic link; give the file itself") from None
        raise CbirError(f"cannot read {what} {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        closed_to = 0o007 if shared_group else 0o077
        if not stat.S_ISREG(st.st_mode):
            raise CbirError(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid() and not shared_group:
            raise CbirError(f"{what} {path} belongs to user {user_name(st.st_uid)}, not to you; refusing to use it")
        if st.st_mode & closed_to:
            raise CbirError(f"{what} {path} can be read by other users (mode {st.st_mode & 0o777:04o}); "
                            f"make it private with: chmod {0o660 if shared_group else 0o600:o} {path}")
        return handle.read().decode("utf-8", "replace")


def open_without_links(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, opened one folder at a time without following a symbolic link anywhere
    (``OSError`` with ``ELOOP`` or ``ENOTDIR`` where there is one).

    For paths a database stored resolved (``cbir.database.paths``): a link in one now is not the file that was
    indexed, and may be someone else's way to make the tool read a file of its user's. One descriptor, so what is
    checked (``fstat``) is what is read.
    """
    parts = Path(os.path.abspath(path)).parts
    folder = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[1:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            os.close(folder)
            folder = inner
        # O_NONBLOCK: a FIFO planted under the name must not hang the reader
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)


# ---------------------------------------------------------------------------------------------- locks

def lock_wait() -> float:
    try:
        return max(0.0, float(os.environ.get("CBIR_LOCK_WAIT", DEFAULT_LOCK_WAIT)))
    except ValueError:
        raise CbirError(f"CBIR_LOCK_WAIT must be a number of seconds, got {os.environ['CBIR_LOCK_WAIT']!r}") from None


def lock_holders(path: str | os.PathLike) -> list[int]:
    """Pids holding a lock on the file ``path`` (from ``/proc/locks``; empty where there is none)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as locks:
            lines = locks.readlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        for i, field in enumerate(fields[1:], 1):
            parts = field.split(":")
            if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) == inode:
                with contextlib.suppress(ValueError):
                    if int(fields[i - 1]) > 0:
                        pids.append(int(fields[i - 1]))
    return sorted(set(pids))


def describe_process(pid: int) -> str:
    """``pid 1234 (user alice: cbir-index --path ...)``, as much of it as can be read."""
    details = []
    try:
        with open(f"/proc/{pid}/status") as status:
            uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
        details.append(f"user {user_name(uid)}")
    except (OSError, StopIteration, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = [w.decode(errors="replace") for w in cmdline.read().split(b"\0") if w]
        if words:
            words[0] = os.path.basename(words[0])
            command = " ".join(words)
            details.append(printable(command[:80] + ("..." if len(command) > 80 else "")))
    except OSError:
        pass
    return f"pid {pid}" + (f" ({': '.join(details)})" if details else "")


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str, *, mode: int = PRIVATE_FILE, wait: float | None = None):
    """Hold an exclusive lock on the file ``path`` (created with ``mode``, never through a link).

    Another holder is waited for at most ``wait`` seconds (default :func:`lock_wait`); after a few seconds one
    line says who holds it, and at the end one error line names the holder.
    """
    wait = lock_wait() if wait is None else wait
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CbirError(f"lock file {path} is a symbolic link; refusing to follow it; remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        start = time.monotonic()
        noticed = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            waited = time.monotonic() - start
            if waited >= wait:
                raise CbirError(f"{what} is locked by {_holders(path)} and was still locked after {waited:.0f} s "
                                "of waiting; wait for it to finish, or stop it")
            if not noticed and waited >= _NOTICE_AFTER:
                log.warning("waiting for %s, locked by %s (at most %.0f s)", what, _holders(path), wait)
                noticed = True
            time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holders(path) -> str:
    pids = [pid for pid in lock_holders(path) if pid != os.getpid()]
    return ", ".join(describe_process(pid) for pid in pids) if pids else "another process"


# ---------------------------------------------------------------------------------------------- checks

def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_creatable(folder: Path, name: str, what: Path) -> None:
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise ParameterError(f"{{{name}}} {what}: {existing} is a file, so no folder can be made under it", name)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(f"{{{name}}} {what}: {existing} is not writable", name)
    if existing == folder.absolute():  # refused now rather than after the work (atomic_path checks it again)
        check_folder_owner(existing, f"{{{name}}} {what}: the folder")


def check_output_file(path: str | os.PathLike, name: str, *, suffix: str | None = None) -> Path:
    """Refuse, before any work, an output file that could not be written: a folder, a special file, an
    unwritable or impossible parent folder, or (with ``suffix``) another extension."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ParameterError(f"{{{name}}} must name a {suffix} file, got {path}", name)
    if path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a folder; give a file name (in it, or elsewhere)", name)
    if path.exists() and not path.is_file():
        raise ParameterError(f"{{{name}}} {path} is not a regular file", name)
    _check_creatable(path.parent, name, path)
    return path


def check_output_folder(path: str | os.PathLike, name: str) -> Path:
    """Refuse, before any work, an output folder that could not be made or written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a file, not a folder", name)
    _check_creatable(path, name, path)
    return path


def check_input_file(path: str | os.PathLike, name: str) -> Path:
    """Refuse an input file that is missing or is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ParameterError(f"{{{name}}} {path} is a folder, not a file", name)
    if not path.is_file():
        raise ParameterError(f"{{{name}}} {path} does not exist", name)
    return path
