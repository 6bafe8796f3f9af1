"""The Redis + FAISS database, through a real embedded Redis (and a real redis-server on a loopback port)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbir.database import Database, DatabaseError, list_databases
from cbir.database.server import redis_server_executable
from redis_processes import (free_port, live_redis_servers_under, no_server_left_behind,  # noqa: F401 — fixtures
                             redis_url, wait_until_serving)

DIM = 16
EXTRACTOR_A = {"name": "densenet", "num_features": DIM, "fingerprint": "aaaa1111bbbb2222"}
EXTRACTOR_B = {"name": "resnet", "num_features": DIM, "fingerprint": "cccc3333dddd4444"}
REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int = DIM, centres: int = 10, seed: int = 0, spread: float = 0.35):
    """Unit vectors around a few class centres, like trained embeddings; returns (vectors, class names)."""
    rng = np.random.default_rng(seed)
    centre_vectors = unit(rng.normal(size=(centres, dim)))
    labels = rng.integers(0, centres, size=n)
    vectors = unit(centre_vectors[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim) * 3)
    return vectors, [f"class{label}" for label in labels]


def paths_for(n: int, folder: str = "/data/images", start: int = 0) -> list[str]:
    return [f"{folder}/img{i:05d}.png" for i in range(start, start + n)]


def exact_neighbours(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d2 = ((queries[:, None, :] - stored[None, :, :]) ** 2).sum(-1)
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


def faiss_ids(db: Database) -> set[int]:
    db._sync()
    return set(db._index.ids().tolist()) if db._index is not None else set()


def redis_ids(db: Database) -> set[int]:
    return {image_id for image_id, _, _ in db.items()}


def run_child(code: str, home: Path, *, expect_kill: bool = False) -> None:
    """Run Python code in another process against the same databases."""
    env = {**os.environ, "CBIR_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("CBIR_REDIS_URL", None)
    prelude = "import os, signal, numpy as np\nfrom cbir.database import Database\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    if expect_kill:
        assert done.returncode == -signal.SIGKILL, done.stderr
    else:
        assert done.returncode == 0, done.stderr


def start_child(code: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "CBIR_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("CBIR_REDIS_URL", None)
    prelude = "import os, signal, numpy as np\nfrom cbir.database import Database\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, stderr=subprocess.PIPE, text=True
    )


# --- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture
def home(private_home) -> Path:
    """The test's own CBIR_HOME (conftest's private_home), under the name these tests use."""
    return private_home


# --- tests -----------------------------------------------------------------------------------------------------
def test_add_then_exact_search_returns_the_nearest_images_with_paths_and_classes(home):
    vectors, classes = clustered(300)
    paths = paths_for(300)
    with Database.open("db", create=True) as db:
        db.set_extractor(EXTRACTOR_A)
        ids = db.add(paths, classes, vectors)
        assert len(ids) == len(set(ids)) == 300 and len(db) == 300
        assert db.dim == DIM and db.extractor["fingerprint"] == EXTRACTOR_A["fingerprint"]

        queries = unit(vectors[:25] + 0.01)
        result = db.search(queries, k=10)
        expected = exact_neighbours(vectors, queries, 10)
        id_to_row = {image_id: row for row, image_id in enumerate(ids)}
        assert [[id_to_row[i] for i in row] for row in result.ids.tolist()] == expected.tolist()
        assert result.paths == [[paths[j] for j in row] for row in expected]
        assert result.classes == [[classes[j] for j in row] for row in expected]
        # squared L2 on unit vectors: 2 - 2 cos
        cos = (unit(queries) * vectors[expected[:, 0]]).sum(1)
        np.testing.assert_allclose(result.distances[:, 0], 2 - 2 * cos, atol=1e-4)
        assert result.distances.dtype == np.float32 and result.ids.dtype == np.int64

        assert db.has_paths([paths[0], "/nowhere.png", paths[-1]]) == [True, False, True]
        stored_ids, stored = db.vectors()
        np.testing.assert_array_equal(stored[np.argsort(stored_ids)], vectors[np.argsort(ids)])
        assert db.items()[0] == (ids[0], paths[0], classes[0])


def test_fewer_images_than_k_returns_only_those_found(home):
    vectors, classes = clustered(3)
    with Database.open("small", create=True) as db:
        empty = db.search(vectors[:2], k=5)
        assert empty.paths == [[], []] and empty.ids.shape == (2, 0)
        db.add(paths_for(3), classes, vectors)
        result = db.search(vectors[:2], k=5)
        assert result.ids.shape == (2, 3) and (result.ids >= 0).all()
        assert all(len(row) == 3 for row in result.paths)


def test_database_persists_across_close_and_reopen(home):
    vectors, classes = clustered(200, seed=1)
    paths = paths_for(200)
    with Database.open("db", create=True) as db:
        db.set_extractor(EXTRACTOR_A)
        db.add(paths, classes, vectors)
        before = db.search(vectors[:5], k=5)
    assert live_redis_servers_under(home) == []  # the embedded server stopped with its last user
    assert list_databases() == ["db"]

    with Database.open("db") as db:  # a new object, a new server process, data read back from disk
        assert len(db) == 200
        assert db.extractor == EXTRACTOR_A and db.dim == DIM
        after = db.search(vectors[:5], k=5)
        assert after.paths == before.paths and after.classes == before.classes
        np.testing.assert_array_equal(after.ids, before.ids)
        assert db.info()["faiss_vectors"] == 200


def test_readding_a_path_replaces_it_instead_of_duplicating(home):
    vectors, classes = clustered(50, seed=2)
    paths = paths_for(50)
    with Database.open("db", create=True) as db:
        old_ids = db.add(paths, classes, vectors)
        changed = unit(np.random.default_rng(5).normal(size=(1, DIM)))
        (new_id,) = db.add([paths[7]], ["newclass"], changed)
        assert len(db) == 50 and new_id != old_ids[7]
        assert db.info()["faiss_vectors"] == 50
        hit = db.search(changed, k=1)
        assert hit.paths == [[paths[7]]] and hit.classes == [["newclass"]]
        assert hit.distances[0, 0] < 1e-5
        _, stored = db.vectors([new_id])
        np.testing.assert_array_equal(stored[0], changed[0])
        # re-running the same indexing: everything is already there
        assert all(db.has_paths(paths))
        db.add(paths, classes, vectors)
        assert len(db) == 50 and db.info()["faiss_vectors"] == 50
        assert redis_ids(db) == faiss_ids(db)


def test_remove_a_file_and_a_folder_from_redis_and_faiss(home):
    vectors, classes = clustered(120, seed=3)
    paths = paths_for(60, "/data/a") + paths_for(60, "/data/b")
    with Database.open("db", create=True) as db:
        db.add(paths, classes, vectors)
        assert db.remove([paths[0]]) == 1
        assert db.remove(["/data/b/"]) == 60
        assert db.remove(["/data/nothing"]) == 0
        assert len(db) == 59 and db.info()["faiss_vectors"] == 59
        result = db.search(vectors, k=59)
        found = {p for row in result.paths for p in row}
        assert paths[0] not in found and not any(p.startswith("/data/b/") for p in found)
        assert db.has_paths([paths[0], paths[1], paths[60]]) == [False, True, False]
    with Database.open("db") as db:
        assert len(db) == 59 and redis_ids(db) == faiss_ids(db)


def test_clear_on_one_database_leaves_other_databases_and_foreign_keys(redis_url, home, tmp_path):
    vectors, classes = clustered(40, seed=4)
    foreign = redis.Redis.from_url(redis_url)
    foreign.set("someone:else", "keep me")
    foreign.hset("cbir:dbx", "field", "not ours either")
    with Database.open("a", redis_url=redis_url, create=True) as a, Database.open(
        "b", redis_url=redis_url, create=True
    ) as b:
        a.add(paths_for(40), classes, vectors)
        b.add(paths_for(40, "/other"), classes, vectors)
        assert list_databases(redis_url=redis_url) == ["a", "b"]
        a.clear()
        assert len(a) == 0 and a.search(vectors[:1], k=3).paths == [[]]
        assert len(b) == 40 and b.search(vectors[:1], k=1).paths == [["/other/img00000.png"]]
        a.add(paths_for(5), classes[:5], vectors[:5])  # usable again after the clear
        assert len(a) == 5
    assert foreign.get("someone:else") == b"keep me"
    assert foreign.hget("cbir:dbx", "field") == b"not ours either"
    # the FAISS file lives under home even with an external Redis
    assert (home / "b" / "faiss.index").exists()

    with pytest.raises(DatabaseError, match=r"database 'zzz' does not exist \(known: a, b\)"):
        Database.open("zzz", redis_url=redis_url)
    with Database.open("a", redis_url=redis_url) as a:
        a.drop()
    assert list_databases(redis_url=redis_url) == ["b"]
    with Database.open("b", redis_url=redis_url) as b:
        assert len(b) == 40
    assert foreign.get("someone:else") == b"keep me"

    # a wrong password is one line and does not echo it
    wrong = redis_url.replace("s3cret-pw", "wrong-pw")
    with pytest.raises(DatabaseError) as refused:
        Database.open("b", redis_url=wrong)
    assert "wrong-pw" not in str(refused.value) and "\n" not in str(refused.value)
    foreign.close()


def test_unknown_database_and_bad_names_are_refused(home):
    with Database.open("known", create=True) as db:
        db.add(paths_for(2), ["x", "y"], clustered(2)[0])
    with pytest.raises(DatabaseError) as error:
        Database.open("missing")
    message = str(error.value)
    assert "database 'missing' does not exist (known: known)" in message and "index images into it" in message
    assert not (home / "missing").exists()
    for bad in ["../escape", "a/b", "..", "", "name with space"]:
        with pytest.raises(DatabaseError, match="invalid database name"):
            Database.open(bad, create=True)
    assert sorted(p.name for p in home.parent.iterdir()) == ["cbir_home"]


def test_unreachable_redis_url_is_one_line_without_the_password(home):
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(DatabaseError) as error:
        Database.open("db", redis_url=url, create=True)
    message = str(error.value)
    assert "\n" not in message and "hunter2" not in message
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in message
    assert time.monotonic() - started < 10
    with pytest.raises(DatabaseError):
        list_databases(redis_url=url)


def test_other_extractor_and_other_vector_size_are_refused(home):
    vectors, classes = clustered(30, seed=6)
    with Database.open("db", create=True) as db:
        db.set_extractor(EXTRACTOR_A)
        db.add(paths_for(30), classes, vectors)
        db.set_extractor(dict(EXTRACTOR_A))  # the same one again is fine
        db.check_extractor(EXTRACTOR_A)
        with pytest.raises(DatabaseError) as error:
            db.set_extractor(EXTRACTOR_B)
        message = str(error.value)
        assert "densenet" in message and "resnet" in message and "use rewrite" in message and "\n" not in message
        assert "use --rewrite" in error.value.worded()  # as a command words it
        with pytest.raises(DatabaseError, match="resnet"):
            db.check_extractor(EXTRACTOR_B)
        with pytest.raises(DatabaseError, match="16 values"):
            db.set_extractor({**EXTRACTOR_A, "num_features": 32})
        with pytest.raises(DatabaseError, match="16 values"):
            db.add(["/x.png"], ["c"], np.ones((1, 32), np.float32))
        with pytest.raises(DatabaseError, match="16 values"):
            db.search(np.ones((1, 32), np.float32), k=3)
        assert len(db) == 30 and db.extractor == EXTRACTOR_A


def test_train_index_gives_an_inverted_file_with_good_recall(home):
    vectors, classes = clustered(2000, dim=32, centres=20, seed=7)
    queries = unit(vectors[:200] + np.random.default_rng(8).normal(scale=0.05, size=(200, 32)))
    with Database.open("big", create=True) as db:
        ids = np.array(db.add(paths_for(2000), classes, vectors))
        exact = ids[exact_neighbours(vectors, queries, 10)]
        message = db.train_index()
        assert "IVF" in message
        info = db.info()
        assert info["index"].startswith("IVF") and info["nprobe"] >= 1 and info["faiss_vectors"] == 2000
        approx = db.search(queries, k=10).ids
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
        assert recall >= 0.9
        # probing every list is exact again
        everything = db.search(queries, k=10, nprobe=10_000).ids
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(everything.tolist(), exact.tolist())]) >= 0.99
        # more images after training go into the inverted file too
        extra, extra_classes = clustered(10, dim=32, centres=20, seed=7)
        db.add(paths_for(10, "/new"), extra_classes, extra)
        assert db.search(extra[:1], k=1).paths == [["/new/img00000.png"]]
    with Database.open("big") as db:  # the index type survives a reopen
        assert db.info()["index"] == info["index"] and len(db) == 2010
        assert redis_ids(db) == faiss_ids(db)


def test_train_index_on_a_tiny_database_stays_exact(home):
    vectors, classes = clustered(20, seed=9)
    with Database.open("tiny", create=True) as db:
        db.add(paths_for(20), classes, vectors)
        message = db.train_index()
        assert "stays exact" in message and "20" in message
        assert db.info()["index"] == "Flat"
        assert len(db.search(vectors[:1], k=5).paths[0]) == 5


def test_hnsw_index_handles_removal(home):
    vectors, classes = clustered(300, seed=10)
    paths = paths_for(300)
    with Database.open("graph", create=True) as db:
        db.add(paths, classes, vectors)
        assert "HNSW32" in db.train_index(factory="HNSW32")
        assert db.remove(paths[:10]) == 10  # HNSW cannot remove: rebuilt from Redis
        assert db.info()["index"] == "HNSW32" and redis_ids(db) == faiss_ids(db)
        with pytest.raises(DatabaseError, match="cannot build index"):
            db.train_index(factory="NoSuchIndex")


CRASHING_WRITER = """
db = Database.open("db")
rng = np.random.default_rng({seed})
v = rng.normal(size=(50, 16)).astype("float32")
db.add([f"/crash{seed}/{{i}}.png" for i in range(50)], ["c"] * 50, v / np.linalg.norm(v, axis=1, keepdims=True))
db.remove([{removed!r}])
os.kill(os.getpid(), signal.SIGKILL)  # dies before saving FAISS, without any clean-up
"""


def test_open_repairs_a_missing_or_stale_faiss_file_after_a_crash(home):
    vectors, classes = clustered(100, seed=11)
    paths = paths_for(100)
    with Database.open("db", create=True) as db:
        db.add(paths, classes, vectors)
    index_file = home / "db" / "faiss.index"
    assert index_file.exists()

    # another process writes to Redis, then is killed before saving FAISS: the file misses 50, has 1 too many
    run_child(CRASHING_WRITER.format(seed=1, removed=paths[0]), home, expect_kill=True)
    with Database.open("db") as db:  # caught up from the change log
        assert len(db) == 149
        assert redis_ids(db) == faiss_ids(db) and db.info()["faiss_vectors"] == 149

    # the same, but the change log no longer reaches back to the file: every id is compared
    run_child(CRASHING_WRITER.format(seed=2, removed=paths[1]), home, expect_kill=True)
    with Database.open("db") as db:
        db._client.delete("cbir:{db}:log")
        assert len(db) == 198
        assert redis_ids(db) == faiss_ids(db) and db.info()["faiss_vectors"] == 198

    index_file.unlink()  # the file lost altogether
    with Database.open("db") as db:
        assert redis_ids(db) == faiss_ids(db) and len(faiss_ids(db)) == 198

    index_file.write_bytes(b"garbage")  # a broken file
    with Database.open("db") as db:
        assert redis_ids(db) == faiss_ids(db)
        assert db.search(vectors[2:3], k=1).paths == [[paths[2]]]

    # re-running the interrupted indexing adds only what is missing
    with Database.open("db") as db:
        todo = [p for p, done in zip(paths, db.has_paths(paths)) if not done]
        assert todo == paths[:2]
        db.add(todo, classes[:2], vectors[:2])
        assert len(db) == 200 and redis_ids(db) == faiss_ids(db)


def test_search_sees_images_added_by_another_process(home):
    vectors, classes = clustered(100, seed=13)
    with Database.open("db", create=True) as db:
        db.add(paths_for(50), classes[:50], vectors[:50])
        assert db.search(vectors[60:61], k=1).paths != [["/data/images/img00060.png"]]
        np.save(home / "more.npy", vectors[50:])
        run_child(
            f"""
            v = np.load({str(home / "more.npy")!r})
            with Database.open("db") as db:
                db.add([f"/data/images/img{{i:05d}}.png" for i in range(50, 100)], ["more"] * 50, v)
            """,
            home,
        )
        # the other process shared our embedded server and left it running for us
        assert len(live_redis_servers_under(home)) == 1
        assert db.search(vectors[60:61], k=1).paths == [["/data/images/img00060.png"]]
        assert len(db) == 100 and redis_ids(db) == faiss_ids(db)

        # and while it indexes: every search answers, with stored paths only
        child = start_child(
            """
            rng = np.random.default_rng(3)
            with Database.open("db") as db:
                for part in range(20):
                    v = rng.normal(size=(50, 16)).astype("float32")
                    paths = [f"/live/{part}_{i}.png" for i in range(50)]
                    db.add(paths, ["live"] * 50, v / np.linalg.norm(v, axis=1, keepdims=True))
                db.remove(["/live"])
            """,
            home,
        )
        searches = 0
        while child.poll() is None or searches == 0:
            result = db.search(vectors[:4], k=20)
            # an image removed between our catch-up and the id -> path lookup is left out, never invented
            assert [len(row) for row in result.paths] == (result.ids >= 0).sum(1).tolist()
            assert all(p.startswith(("/data/images/", "/live/")) for row in result.paths for p in row)
            searches += 1
        assert child.returncode == 0, child.stderr.read()
        assert len(db) == 100 and redis_ids(db) == faiss_ids(db)
        assert db.search(vectors[:4], k=20).ids.shape == (4, 20)


def test_drop_forgets_the_database(home):
    with Database.open("gone", create=True) as db:
        db.add(paths_for(3), ["a", "b", "c"], clustered(3)[0])
    with Database.open("kept", create=True) as db:
        db.add(paths_for(3), ["a", "b", "c"], clustered(3)[0])
    assert list_databases() == ["gone", "kept"]
    with Database.open("gone") as first, Database.open("gone") as second:
        with pytest.raises(DatabaseError, match="in use"):
            first.drop()  # refused while another handle uses it; nothing lost
        assert len(second) == 3
    Database.open("gone").drop()
    assert list_databases() == ["kept"] and not (home / "gone").exists()
    with pytest.raises(DatabaseError, match="does not exist"):
        Database.open("gone")


def test_two_indexers_on_one_new_database_both_succeed(home):
    writer = """
    import time
    time.sleep({delay})
    rng = np.random.default_rng({seed})
    with Database.open("shared", create=True) as db:
        for part in range(4):
            v = rng.normal(size=(100, 16)).astype("float32")
            paths = [f"/w{seed}/{{part}}_{{i}}.png" for i in range(100)]
            db.add(paths, ["c{seed}"] * 100, v / np.linalg.norm(v, axis=1, keepdims=True))
    """
    # both start (and so start the embedded server) at the same moment: one server, no lost writes
    children = [start_child(writer.format(seed=seed, delay=0.0), home) for seed in (1, 2)]
    for child in children:
        assert child.wait(timeout=60) == 0, child.stderr.read()
    with Database.open("shared") as db:
        assert len(db) == 800
        assert {c for _, _, c in db.items()} == {"c1", "c2"}
        assert redis_ids(db) == faiss_ids(db)


def test_external_server_going_away_mid_run_is_one_clear_line(redis_url, home):
    vectors, classes = clustered(20, seed=14)
    db = Database.open("db", redis_url=redis_url, create=True)
    db.add(paths_for(10), classes[:10], vectors[:10])
    redis.Redis.from_url(redis_url).shutdown(nosave=True)
    with pytest.raises(DatabaseError) as error:
        db.add(paths_for(10, start=10), classes[10:], vectors[10:])
    message = str(error.value)
    assert "lost the connection" in message and "s3cret-pw" not in message and "\n" not in message
    with pytest.raises(DatabaseError, match="lost the connection"):
        db.search(vectors[:1], k=3)
    db.close()  # still saves what FAISS holds and lets go without a traceback


def test_a_database_written_before_the_hash_tags_is_renamed_on_open(home):
    vectors, classes = clustered(40, seed=15)
    with Database.open("old", create=True) as db:
        db.add(paths_for(40), classes, vectors)
        # the key layout of the first release: cbir:<name>:... without the Redis Cluster hash tag
        for key in db._client.scan_iter(match="cbir:{old}:*"):
            db._client.rename(key, key.decode().replace("cbir:{old}:", "cbir:old:"))
        assert not db._client.exists("cbir:{old}:meta")
    with Database.open("old") as db:
        assert len(db) == 40 and db.search(vectors[3:4], k=1).paths == [[paths_for(40)[3]]]
        assert {k.decode() for k in db._client.keys("cbir:*")} == {"cbir:databases"} | {
            f"cbir:{{old}}:{suffix}" for suffix in ("meta", "id", "path", "class", "vec", "next_id", "version", "log")
        }


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too and below 65536."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@pytest.fixture
def redis_cluster(tmp_path):
    """A real three-node Redis Cluster on loopback ports (each node holds a third of the 16384 hash slots)."""
    ports = [cluster_port() for _ in range(3)]
    servers, nodes = [], []
    try:
        for port in ports:
            folder = tmp_path / f"cluster_{port}"
            folder.mkdir()
            servers.append(subprocess.Popen(
                [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        # No retries: redis-py's default backs off for seconds on every refused connection.
        nodes = [redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0)) for port in ports]
        deadline = time.monotonic() + 30
        for server, node in zip(servers, nodes):
            while True:
                assert server.poll() is None, "a cluster node did not start"
                assert time.monotonic() < deadline, "a cluster node did not answer"
                try:
                    node.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
            if i:
                node.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        while not all(b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO") for node in nodes):
            assert time.monotonic() < deadline, "the test cluster did not form"
            time.sleep(0.05)
        yield [f"redis://127.0.0.1:{port}/0" for port in ports], nodes
    finally:
        for node in nodes:
            node.close()
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


def test_databases_spread_over_a_redis_cluster_each_on_one_node(redis_cluster, home):
    urls, nodes = redis_cluster
    vectors, classes = clustered(300, seed=16)
    paths = paths_for(300)
    # 'a', 'b' and 'c' hash to slots 15495, 3300 and 7365: one database on each node
    for name, url in zip("abc", urls):
        with Database.open(name, redis_url=url, create=True) as db:
            db.set_extractor(EXTRACTOR_A)
            db.add(paths, classes, vectors)
            assert db.remove(["/data/images/img00000.png"]) == 1
            assert "IVF" in db.train_index(nlist=4)
    for name, url in zip("abc", reversed(urls)):  # reached through any node: the client follows the slots
        with Database.open(name, redis_url=url) as db:
            assert len(db) == 299 and redis_ids(db) == faiss_ids(db)
            assert db.search(vectors[5:6], k=1, nprobe=4).paths == [[paths[5]]]
            assert db.info()["index"] == "IVF4,Flat"
    assert list_databases(redis_url=urls[1]) == ["a", "b", "c"]
    # every key of a database on one node (scripts and transactions touch several of them at once)
    owners = {}
    for node in nodes:
        for key in node.keys("cbir:{*"):
            owners.setdefault(key.decode().split("}")[0] + "}", set()).add(node.connection_pool.connection_kwargs["port"])
    assert sorted(owners) == ["cbir:{a}", "cbir:{b}", "cbir:{c}"]
    assert all(len(ports) == 1 for ports in owners.values()) and len(set.union(*owners.values())) == 3
    with Database.open("b", redis_url=urls[0]) as db:
        db.drop()
    assert list_databases(redis_url=urls[2]) == ["a", "c"]


@pytest.fixture
def tls_url(redis_url, tmp_path):
    """The password-protected server behind a TLS terminator (the bundled redis-server is built without TLS)."""
    import ssl
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    upstream_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    sockets = [listener]

    def pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def relay(connection):
        try:
            secure = context.wrap_socket(connection, server_side=True)
        except OSError:  # a client that refused our certificate
            connection.close()
            return
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        sockets.extend([secure, upstream])
        threading.Thread(target=pump, args=(upstream, secure), daemon=True).start()
        pump(secure, upstream)

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    port = listener.getsockname()[1]
    yield f"rediss://:s3cret-pw@127.0.0.1:{port}/0", cert
    for s in sockets:
        with contextlib.suppress(OSError):
            s.close()


def test_tls_url_works_and_an_untrusted_certificate_is_one_line(tls_url, home):
    url, cert = tls_url
    vectors, classes = clustered(30, seed=17)
    with Database.open("secure", redis_url=f"{url}?ssl_ca_certs={cert}", create=True) as db:
        db.add(paths_for(30), classes, vectors)
        assert db.search(vectors[4:5], k=1).paths == [[paths_for(30)[4]]]
    assert list_databases(redis_url=f"{url}?ssl_ca_certs={cert}") == ["secure"]
    with pytest.raises(DatabaseError) as error:  # the system CAs do not know our self-signed certificate
        Database.open("secure", redis_url=url)
    message = str(error.value)
    assert "certificate" in message.lower() and "\n" not in message and "s3cret-pw" not in message


def test_search_maps_ids_to_paths_from_the_saved_table_without_asking_redis(home):
    vectors, classes = clustered(500, seed=18)
    paths = paths_for(500)
    queries = unit(vectors[:50] + 0.01)
    expected = [[paths[j] for j in row] for row in exact_neighbours(vectors, queries, 10)]
    with Database.open("db", create=True) as db:
        db.add(paths, classes, vectors)
    names_file = home / "db" / "names.npz"
    assert names_file.exists()

    def hmget_calls(db) -> int:
        return int(db._client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    with Database.open("db") as db:
        db.search(queries[:1], k=1)  # opening: the FAISS and table files are read
        before = hmget_calls(db)
        result = db.search(queries, k=10)
        # one HMGET: the catch-up check on the meta hash; none for the 500 paths and classes
        assert hmget_calls(db) - before == 1
        assert result.paths == expected and result.classes == [[classes[paths.index(p)] for p in r] for r in expected]

    names_file.write_bytes(b"PK\x03\x04 a broken table")
    with Database.open("db") as db:  # only slower: the names are read from Redis, and the table saved again
        assert db.search(queries, k=10).paths == expected
    with Database.open("db") as db:
        before = hmget_calls(db)
        assert db.search(queries, k=10).paths == expected and hmget_calls(db) - before == 1


def test_two_machines_share_one_redis_each_with_its_own_faiss_copy(redis_url, tmp_path):
    """Each machine keeps its FAISS index in its own --home; Redis on the server is the one truth they follow."""
    vectors, classes = clustered(200, seed=19)
    paths = paths_for(200)
    home_a, home_b = tmp_path / "machine_a", tmp_path / "machine_b"
    with Database.open("shared", home=home_a, redis_url=redis_url, create=True) as a, Database.open(
        "shared", home=home_b, redis_url=redis_url
    ) as b:
        a.set_extractor(EXTRACTOR_A)
        a.add(paths[:100], classes[:100], vectors[:100])
        assert b.search(vectors[50:51], k=1).paths == [[paths[50]]]  # B builds its copy from Redis
        b.add(paths[100:], classes[100:], vectors[100:])
        assert a.remove([paths[0]]) == 1
        assert a.search(vectors[150:151], k=1).paths == [[paths[150]]]
        assert b.search(vectors[0:1], k=1).paths != [[paths[0]]]
        assert redis_ids(a) == faiss_ids(a) == faiss_ids(b) and len(a) == 199
    assert (home_a / "shared" / "faiss.index").exists() and (home_b / "shared" / "faiss.index").exists()
    with Database.open("shared", home=home_b, redis_url=redis_url) as b:
        assert b.info()["index_file"] == {"vectors": 199, "up_to_date": True}
