"""Redis servers in tests: a real one on a loopback port (``redis_url``), and finding those a test left running
(the embedded server must stop with its last user)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbir.database.server import redis_server_executable


def live_redis_servers_under(folder: Path) -> list[int]:
    """Running (not zombie) redis-server processes whose working folder is inside ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"redis-server" not in (entry / "cmdline").read_bytes():
                continue
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if state not in (b"Z", b"X") and (cwd == folder or folder in cwd.parents):
            found.append(int(entry.name))
    return found


def wait_until_serving(server, client, seconds: float = 30) -> None:
    """Ping a redis-server started by a test until it answers; fail at once if its process ends."""
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "the test redis-server did not start"
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_server_left_behind(tmp_path):
    """Every test of a module that imports this must leave no redis-server running under its folder."""
    yield
    deadline = time.monotonic() + 5
    while live_redis_servers_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_redis_servers_under(tmp_path) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    """A real password-protected redis-server on a loopback TCP port, started and stopped by the test."""
    folder = tmp_path / "external_redis"
    folder.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret-pw",
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # No retries: redis-py's default backs off for seconds on every refused connection.
    client = redis.Redis(host="127.0.0.1", port=port, password="s3cret-pw", retry=Retry(NoBackoff(), 0))
    wait_until_serving(server, client)
    yield f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    client.close()
    server.terminate()
    server.wait(timeout=10)
