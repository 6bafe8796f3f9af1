"""Finding the redis-server processes a test left running (the embedded server must stop with its last user)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis


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
