"""cbir-db, and the real cbir-index console script killed part way, searched while it runs, and run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbir.cli import db as db_cli
from cbir.cli.common import run
from cbir.data import list_images
from cbir.database import Database
from cbir.database.server import redis_server_executable
from redis_processes import no_server_left_behind, wait_until_serving  # noqa: F401 — an autouse fixture

BIN = Path(sys.executable).parent  # the virtual environment's bin folder, holding the console scripts
DIM = 16
EXTRACTOR = {"name": "effnet", "num_features": DIM, "fingerprint": "0123456789abcdef"}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def redis_and_faiss_ids(db: Database) -> tuple[set[int], set[int]]:
    db._sync()  # what a search would use: the FAISS copy brought up to date with Redis
    in_faiss = set(db._index.ids().tolist()) if db._index is not None else set()
    return {image_id for image_id, _, _ in db.items()}, in_faiss


@pytest.fixture
def home(private_home) -> Path:
    """The test's own CBIR_HOME (conftest's private_home), under the name these tests use."""
    return private_home


# --- the real cbir-index, killed and re-run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory):
    """300 images of 32 px in 4 class folders, and an untrained effnet checkpoint with 16 values per vector."""
    import torch

    from cbir.models import create_extractor, save_extractor
    from cbir.synthetic import make_dataset

    root = tmp_path_factory.mktemp("collection")
    folder = make_dataset(root, splits={"index": 75}, size=32, seed=0)["index"]
    torch.manual_seed(0)
    weights = save_extractor(root / "effnet16.pt", create_extractor("effnet", DIM, pretrained=False, input_size=32))
    return folder, weights


def start_cbir_index(folder: Path, weights: Path, home: Path, log: Path) -> subprocess.Popen:
    command = [str(BIN / "cbir-index"), "--path", str(folder), "--weights", str(weights), "--db_name", "photos",
               "--home", str(home), "--batch_size", "8", "--num_workers", "1",
               "--chunk", "16"]  # a database write every 16 images, so a kill part way finds some stored
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one model thread: steadier on a small shared machine
    env.pop("CBIR_REDIS_URL", None)
    with open(log, "w") as out:
        # Its own session, so the kill reaches its image-decoding worker too, as a kill of the job would.
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def search_while_running(db: Database, process: subprocess.Popen, files: set[str], *, kill_at: int | None = None):
    """Search the database over and over while ``process`` indexes into it; SIGKILL it once ``kill_at`` images are
    stored. Every answer must hold stored images only, as many as were stored before it was asked for."""
    queries = unit(np.random.default_rng(0).normal(size=(3, DIM)))
    searched_at = []  # the number of images stored when each search was made
    deadline = time.monotonic() + 150
    while process.poll() is None:
        assert time.monotonic() < deadline, "cbir-index did not finish in time"
        stored = len(db)
        if kill_at is not None and stored >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            break
        if stored:
            result = db.search(queries, k=5)
            assert all(len(row) >= min(5, stored) for row in result.paths)
            assert all(path in files for row in result.paths for path in row)
            searched_at.append(stored)
        time.sleep(0.005)
    return searched_at


@pytest.mark.slow
def test_killed_cbir_index_leaves_a_consistent_database_and_the_rerun_completes_it_exactly(tiny_collection, home,
                                                                                          tmp_path):
    folder, weights = tiny_collection
    files = {sample.path for sample in list_images(folder)}
    assert len(files) == 300
    with Database.open("photos", home=home, create=True) as watcher:  # a user searching all along
        killed = start_cbir_index(folder, weights, home, tmp_path / "first.log")
        searched_at = search_while_running(watcher, killed, files, kill_at=48)
        log = (tmp_path / "first.log").read_text()
        assert killed.returncode == -signal.SIGKILL, log

        # What the kill left: whole chunks only, the same ids in Redis and FAISS, seen by another handle too.
        with Database.open("photos", home=home) as fresh:
            committed = len(fresh)
            assert 48 <= committed < 300 and committed % 16 == 0
            in_redis, in_faiss = redis_and_faiss_ids(fresh)
            assert in_redis == in_faiss and len(in_redis) == committed
            items = fresh.items()
            assert all(path in files and Path(path).parent.name == cls for _, path, cls in items)
            assert fresh.extractor["name"] == "effnet" and fresh.dim == DIM
        ids_before = {path: image_id for image_id, path, _ in items}

        # The same command again: only what is missing is added, while searches go on.
        rerun = start_cbir_index(folder, weights, home, tmp_path / "second.log")
        searched_at += search_while_running(watcher, rerun, files)
        log = (tmp_path / "second.log").read_text()
        assert rerun.returncode == 0, log
        # searches answered while images kept arriving (each with stored images only, checked as they ran)
        assert len(set(searched_at)) >= 2 and min(searched_at) < 300
        assert f"indexed {300 - committed} images" in log and f"{committed} images were already stored" in log
        assert len(watcher) == 300

    with Database.open("photos", home=home) as db:
        items = db.items()
        paths = [path for _, path, _ in items]
        assert len(paths) == 300 and set(paths) == files  # every image exactly once
        assert all(ids_before[path] == image_id for image_id, path, _ in items if path in ids_before)
        in_redis, in_faiss = redis_and_faiss_ids(db)
        assert in_redis == in_faiss and len(in_faiss) == 300
        info = db.info()
        assert info["images"] == info["faiss_vectors"] == 300


# --- cbir-db ---------------------------------------------------------------------------------------------------
def cbir_db(capsys, *argv) -> tuple[int, str, str]:
    code = run(db_cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fill(name: str, n_per_folder: int = 60, **where) -> np.ndarray:
    vectors = unit(np.random.default_rng(1).normal(size=(2 * n_per_folder, DIM)))
    paths = [f"/data/{part}/img{i:03d}.png" for part in "ab" for i in range(n_per_folder)]
    with Database.open(name, create=True, **where) as db:
        db.set_extractor(EXTRACTOR)
        db.add(paths, [p.split("/")[2] for p in paths], vectors)
    return vectors


def test_cbir_db_lists_describes_removes_and_drops(home, capsys):
    vectors = fill("photos")
    fill("other", 5)
    assert cbir_db(capsys, "list") == (0, "other\nphotos\n", "")
    code, out, _ = cbir_db(capsys, "list", "--json")
    assert json.loads(out) == ["other", "photos"]

    code, out, _ = cbir_db(capsys, "info", "--db_name", "photos", "--json")
    info = json.loads(out)
    assert code == 0 and info["images"] == info["faiss_vectors"] == 120
    assert info["extractor"]["name"] == "effnet" and info["dim"] == DIM and info["index"] == "Flat"
    assert info["nprobe"] is None and info["bytes_on_disk"] > 120 * DIM * 4
    assert info["index_file"] == {"vectors": 120, "up_to_date": True}
    code, out, _ = cbir_db(capsys, "info", "--db_name", "photos")
    assert "120 in Redis, 120 in FAISS" in out and "effnet, 16 values" in out and "Flat (exact)" in out

    with Database.open("photos") as db:
        db.train_index(nlist=3)
    info = json.loads(cbir_db(capsys, "info", "--db_name", "photos", "--json")[1])
    assert info["index"] == "IVF3,Flat" and info["nprobe"] == 3

    # a folder, then a file: gone from Redis and from the search index
    assert cbir_db(capsys, "remove", "--db_name", "photos", "--path", "/data/b", "--yes")[1] == \
        "removed 60 images from 'photos'; 60 images left\n"
    code, out, _ = cbir_db(capsys, "remove", "--db_name", "photos", "--path", "/data/a/img000.png", "--yes")
    assert code == 0 and "removed 1 images" in out
    with Database.open("photos") as db:
        found = db.search(vectors, k=59, nprobe=3).paths
        assert {p for row in found for p in row} == {f"/data/a/img{i:03d}.png" for i in range(1, 60)}
    code, out, err = cbir_db(capsys, "remove", "--db_name", "photos", "--path", "/data/nothing", "--yes")
    assert code == 2 and err.count("\n") == 1 and "no stored image is, or is under, /data/nothing" in err

    # drop asks nothing: without --yes it refuses and keeps everything
    code, _, err = cbir_db(capsys, "drop", "--db_name", "photos")
    assert code == 2 and "--yes" in err and "59 images" in err and err.count("\n") == 1
    assert cbir_db(capsys, "list")[1] == "other\nphotos\n"
    assert cbir_db(capsys, "drop", "--db_name", "photos", "--yes")[1] == "dropped database 'photos' (59 images)\n"
    assert cbir_db(capsys, "list")[1] == "other\n" and not (home / "photos").exists()

    code, _, err = cbir_db(capsys, "info", "--db_name", "photos")
    assert code == 2 and err == "error: database 'photos' does not exist (known: other); index images into it " \
        "first\n"


@pytest.mark.slow
def test_cbir_db_console_script_against_a_password_protected_server(tmp_path, home, free_port):
    folder = tmp_path / "external_redis"
    folder.mkdir()
    server = subprocess.Popen(
        [redis_server_executable(), "--port", str(free_port), "--bind", "127.0.0.1", "--requirepass", "pw-123",
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://:pw-123@127.0.0.1:{free_port}/0"
    try:
        client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))  # redis-py's default backs off for seconds
        wait_until_serving(server, client)
        fill("shared", 10, redis_url=url)
        script = str(BIN / "cbir-db")
        done = subprocess.run([script, "info", "--db_name", "shared", "--json", "--redis_url", url, "--home",
                               str(home)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["images"] == info["faiss_vectors"] == 20 and "pw-123" not in done.stdout
        assert info["redis"] == f"Redis at redis://127.0.0.1:{free_port}/0"
        done = subprocess.run([script, "list", "--redis_url", url], capture_output=True, text=True, timeout=60)
        assert done.stdout == "shared\n"
        done = subprocess.run([script, "drop", "--db_name", "nope", "--yes", "--redis_url", url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == "error: database 'nope' does not exist (known: shared); index images into it first\n"
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
