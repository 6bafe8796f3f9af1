"""The folders and files the tool keeps data in: private to their owner unless a group was asked for, and never
written through a link that someone else planted.

Rules (see SECURITY.md):

* A folder the tool creates is ``0700``, its files ``0600``; a *group-shared* folder (asked for with
  ``--shared_group``) is ``2770`` -- the setgid bit marks the choice and makes new files inherit the group -- and
  its files ``0660``.
* A folder is used only when it belongs to the user, or is group-shared with a group of the user. A symbolic link
  in its place is followed only when the user made it (the link itself belongs to the user).
* Files are written under a fresh temporary name (``O_CREAT | O_EXCL | O_NOFOLLOW``) and renamed into place: a link
  planted under the final name is replaced, never written through, and readers never see half a file.
* A lock another process holds is waited for a bounded time, saying who holds it, never silently for ever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import pwd
import secrets
import stat
import time
from pathlib import Path

from cbir.errors import CbirError
from cbir.naming import printable

PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600
GROUP_FOLDER, GROUP_FILE = 0o2770, 0o660

#: Seconds a lock held by another process is waited for (``CBIR_LOCK_WAIT`` overrides): more than the slowest
#: legitimate holder, an embedded Redis loading a large append-only file at start-up.
DEFAULT_LOCK_WAIT = 300.0
_NOTICE_AFTER = 3.0  # seconds of waiting before saying who holds the lock

log = logging.getLogger("cbir")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


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


# --- writing files ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, mode: int = PRIVATE_FILE, durable: bool = False, dir_fd: int | None = None):
    """A binary file to write that replaces ``path`` (relative to the open folder ``dir_fd`` if given) when the
    block ends without an error.

    Written under a fresh name (``O_EXCL | O_NOFOLLOW``, ``mode``) and renamed over ``path``: a link planted at
    ``path`` is replaced, not written through, and a reader never sees half a file. ``durable`` fsyncs the file
    and the rename.
    """
    path = Path(path)
    tmp = path.parent / f".cbir-{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the mode asked for, whatever the umask took away (a group's write bit)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
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


# --- locks -----------------------------------------------------------------------------------------------------
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
