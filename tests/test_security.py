"""Issue #11 items 1-6: another local user, a careless command line, and names the file system or the terminal
would take otherwise.

Where the tests run as root, a second user (``cbir-attacker``) is created and plays the attacker from a
subprocess (``setpriv``): it plants socket folders, a redis-server of its own, symbolic links and held locks in
places it can reach. Elsewhere the same checks run against folders and servers of the test's own user with the
modes an attacker would leave, so every assertion runs either way.
"""

from __future__ import annotations

import io
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis
from PIL import Image
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbir.cli import db as db_cli
from cbir.cli import retrieve
from cbir.cli.common import run
from cbir.data import Sample
from cbir.database import Database, DatabaseError
from cbir.database.server import PROOF_KEY, EmbeddedServer, redis_server_executable
from cbir.errors import CbirError
from cbir.naming import printable, result_name, safe_name
from cbir.retrieval import Neighbour, Retrieval, save_retrieval
from redis_processes import no_server_left_behind, wait_until_serving  # noqa: F401 — an autouse fixture

BIN = Path(sys.executable).parent
DIM = 8
EXTRACTOR = {"name": "effnet", "num_features": DIM, "fingerprint": "5ec0000000000001"}
ROOT = os.geteuid() == 0


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tile(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 100, 200)).save(path)
    return path


# --- the other user ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def public_root():
    """A folder under the system's temporary folder that every user can reach (the tests' own tmp_path is not:
    pytest makes it private), holding a copy of redis-server the other user can run."""
    root = Path(tempfile.mkdtemp(prefix="cbir-security-"))
    os.chmod(root, 0o755)
    shutil.copy(redis_server_executable(), root / "redis-server")
    os.chmod(root / "redis-server", 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def public(public_root, request):
    """A world-writable folder with the sticky bit, like /tmp: a shared place an attacker can write into."""
    folder = Path(tempfile.mkdtemp(dir=public_root, prefix="t"))  # short: socket paths must stay under 108 bytes
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _user(name: str, group: str | None = None) -> SimpleNamespace:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True)
        entry = pwd.getpwnam(name)  # created now (or by a test running beside this one)
    return SimpleNamespace(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


@pytest.fixture(scope="session")
def attacker():
    """Another local user, or None where the tests cannot make one (not root): then the test plays both parts
    and checks what the attacker would leave behind -- ownership and modes -- directly."""
    return _user("cbir-attacker") if ROOT else None


def as_attacker(attacker, argv: list[str], **kwargs):
    """Start ``argv`` as the attacker (or as ourselves where there is none)."""
    prefix = ["setpriv", f"--reuid={attacker.uid}", f"--regid={attacker.gid}", "--clear-groups"] if attacker else []
    return subprocess.Popen(prefix + argv, **kwargs)


def run_as_attacker(attacker, argv: list[str]) -> None:
    done = as_attacker(attacker, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = done.communicate(timeout=30)
    assert done.returncode == 0, out


@pytest.fixture
def fake_redis(public_root, attacker):
    """Start the attacker's own redis-server on a Unix socket (no password, anyone may connect)."""
    started = []

    def start(socket_path: Path) -> redis.Redis:
        folder = socket_path.parent
        server = as_attacker(attacker, [str(public_root / "redis-server"), "--port", "0", "--unixsocket",
                                        str(socket_path), "--unixsocketperm", "777", "--save", "", "--appendonly",
                                        "no", "--dir", str(folder)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
        client = redis.Redis(unix_socket_path=str(socket_path), retry=Retry(NoBackoff(), 0))
        started.append((server, client))
        wait_until_serving(server, client)
        return client

    yield start
    for server, client in started:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def victim_file(folder: Path, text: str = "the victim's private notes\n") -> Path:
    path = folder / "private.txt"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def the_attackers(attacker, path: Path) -> None:
    """Make ``path`` (and a link itself) the attacker's, as if the attacker had made it."""
    if attacker:
        os.chown(path, attacker.uid, attacker.gid, follow_symlinks=False)


# --- 1. nobody else's Redis ------------------------------------------------------------------------------------
@pytest.fixture
def deep_home(tmp_path, public, monkeypatch):
    """A CBIR_HOME too deep for a socket path, so the socket goes to $TMPDIR/cbir-redis-<uid>, and $TMPDIR a
    shared folder as /tmp is."""
    home = tmp_path / ("deep_" + "d" * 70) / "cbir_home"
    monkeypatch.setenv("CBIR_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(public))
    monkeypatch.setattr(tempfile, "tempdir", str(public))
    socket_path = EmbeddedServer(home / "db", "db").socket_path
    assert socket_path.parent == public / f"cbir-redis-{os.geteuid()}"
    return home, socket_path


def test_a_socket_folder_planted_by_another_user_is_refused(deep_home, attacker, fake_redis):
    home, socket_path = deep_home
    # The attacker makes the predictable socket folder first, open to all, and serves its own Redis there.
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(socket_path.parent)])
    os.chmod(socket_path.parent, 0o777)  # whatever the umask did
    fake = fake_redis(socket_path)

    with pytest.raises(DatabaseError) as error:
        Database.open("db", create=True)
    message = str(error.value)
    assert "socket folder" in message and "0777" in message and "\n" not in message
    if attacker:
        assert "cbir-attacker" in message
    # Nothing of the victim went into the attacker's server, and the victim has no database half made.
    assert fake.dbsize() == 0


def test_a_redis_that_cannot_prove_the_secret_of_the_database_is_refused(deep_home, attacker, fake_redis, public):
    home, socket_path = deep_home
    with Database.open("db", create=True) as db:  # a first, normal run: its server stops at the end
        db.set_extractor(EXTRACTOR)
        db.add([str(home / "a.png")], ["a"], unit(1))
    secret = home / "db" / "redis.secret"
    assert mode(secret) == 0o600 and mode(socket_path.parent) == 0o700 and not socket_path.exists()

    # A redis-server of someone else's is on the socket path (there by a rename: the folder is private).
    planted = public / "planted"
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(planted)])
    fake_redis(planted / "x.sock")
    os.rename(planted / "x.sock", socket_path)
    fake = redis.Redis(unix_socket_path=str(socket_path), retry=Retry(NoBackoff(), 0))

    with pytest.raises(DatabaseError) as error:
        Database.open("db")
    message = str(error.value)
    assert f"refusing the Redis server on {socket_path}" in message and "not the one database 'db' started" in message
    if attacker:
        assert "user cbir-attacker" in message  # named from the socket's peer credentials
    # It was asked a challenge only: no command that writes or authenticates reached it.
    stats = set(fake.info("commandstats"))
    assert "cmdstat_eval" in stats
    assert not stats & {f"cmdstat_{c}" for c in ("auth", "set", "hset", "hsetnx", "sadd", "evalsha",
                                                 "script", "incrby", "xadd", "multi")}
    assert fake.dbsize() == 0

    # Once it is gone, the database opens again with nothing lost.
    fake.shutdown(nosave=True)
    fake.close()
    socket_path.unlink(missing_ok=True)
    with Database.open("db") as db:
        assert len(db) == 1
        # Our own server that lost its secret (its starter killed before telling it): the kernel vouches for it
        # (same user, the pid of the database's pid file), so it is told again rather than refused.
        db._client.delete(PROOF_KEY)
        with Database.open("db") as again:
            assert len(again) == 1


def test_retrieval_copies_only_images_and_never_writes_through_a_planted_link(tmp_path, public, attacker):
    private = tmp_path / "victim"
    private.mkdir()
    secret = victim_file(private)
    query = tile(tmp_path / "query" / "q.png")
    shown = tile(tmp_path / "stored" / "a.png", 10)
    results = public / "results"  # a shared results folder the attacker can write into
    results.mkdir(mode=0o1777)
    os.chmod(results, 0o1777)
    # The attacker plants the figure's name and a neighbour's name as links to the victim's file.
    for name in ("retrieval.png", "1_cls_a.png"):
        (results / name).symlink_to(secret)
        the_attackers(attacker, results / name)

    neighbours = [Neighbour(1, str(shown), "cls", 0.1), Neighbour(2, str(secret), "cls", 0.2)]
    saved = save_retrieval(Retrieval(Sample(str(query), "cls"), neighbours), results)

    assert secret.read_text() == "the victim's private notes\n"  # nothing written through the links
    for name in ("retrieval.png", "1_cls_a.png", "query_q.png"):
        assert (results / name).is_file() and not (results / name).is_symlink() and mode(results / name) == 0o600
    assert (results / "1_cls_a.png").read_bytes() == shown.read_bytes()
    # A stored path that is not an image is not copied: it is named as not shown.
    assert sorted(p.name for p in results.iterdir()) == ["1_cls_a.png", "query_q.png", "retrieval.png"]
    assert [n.rank for n, _ in saved.missing] == [2] and "not an image" in saved.missing[0][1]

    # A class folder planted as a link out of the results folder: refused in one line, nothing written there.
    outside = tmp_path / "outside"
    outside.mkdir()
    (results / "cls").symlink_to(outside)
    the_attackers(attacker, results / "cls")
    with pytest.raises(CbirError, match="symbolic link"):
        save_retrieval(Retrieval(Sample(str(query), "cls"), neighbours[:1]), results, per_class=True)
    assert list(outside.iterdir()) == []


def test_a_results_folder_of_another_user_is_refused(public, attacker, tmp_path):
    results = public / "theirs"
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(results)])
    os.chmod(results, 0o777)
    query = tile(tmp_path / "q.png")
    retrieval = Retrieval(Sample(str(query), "cls"), [])
    if attacker:
        with pytest.raises(CbirError, match="belongs to user cbir-attacker"):
            save_retrieval(retrieval, results)
        assert list(results.iterdir()) == []
    else:
        assert os.stat(results).st_uid == os.geteuid()  # ours: used, and what is written is private
        save_retrieval(retrieval, results)
        assert mode(results / "query_q.png") == 0o600


# --- 2. cbir-db remove -----------------------------------------------------------------------------------------
def fill(n: int = 6) -> list[str]:
    paths = [f"/data/{part}/img{i}.png" for part in "ab" for i in range(n // 2)]
    with Database.open("db", create=True) as db:
        db.set_extractor(EXTRACTOR)
        db.add(paths, [p.split("/")[2] for p in paths], unit(len(paths)))
    return paths


def cbir_db(capsys, *argv) -> tuple[int, str, str]:
    code = run(db_cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stored() -> int:
    with Database.open("db") as db:
        return len(db)


def test_remove_refuses_an_empty_or_root_path_and_asks_before_removing(capsys, monkeypatch):
    paths = fill()
    for path in ("", "  ", "/", "//"):  # an unset shell variable, or a root folder
        code, out, err = cbir_db(capsys, "remove", "--path", path, "--yes")
        assert code == 2 and err.count("\n") == 1 and "refusing" in err and out == ""
    assert stored() == 6

    # Without --yes and no one at a terminal: it says how many and removes nothing.
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal: never read
    code, out, err = cbir_db(capsys, "remove", "--path", "/data/a")
    assert code == 2 and "would remove 3 of the 6 images" in err and "--yes" in err and err.count("\n") == 1
    assert stored() == 6

    code, out, err = cbir_db(capsys, "remove", "--path", "/data/a", "--dry_run")
    assert code == 0 and out.splitlines() == sorted(paths[:3]) + ["would remove 3 images from 'db' (of 6); "
                                                                    "nothing removed"]
    assert stored() == 6

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert cbir_db(capsys, "remove", "--path", "/data/a")[:2] == (0, "nothing removed\n")
    assert stored() == 6
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, err = cbir_db(capsys, "remove", "--path", "/data/a")
    assert code == 0 and out == "removed 3 images from 'db'; 3 images left\n" and "remove 3 of the 6" in err
    assert stored() == 3


# --- 3. one file, one image ------------------------------------------------------------------------------------
def test_the_same_file_reached_three_ways_is_stored_once(tmp_path, monkeypatch):
    folder = tmp_path / "index" / "cls"
    files = [tile(folder / f"{i}.png", i) for i in range(3)]
    (tmp_path / "link").symlink_to(tmp_path / "index")
    monkeypatch.chdir(tmp_path)
    with Database.open("db", create=True) as db:
        db.add([f"index/cls/{f.name}" for f in files], ["cls"] * 3, unit(3))
        db.add([str(f) for f in files], ["cls"] * 3, unit(3, seed=1))
        db.add([f"link/cls/{f.name}" for f in files], ["cls"] * 3, unit(3, seed=2))
        assert len(db) == 3
        assert sorted(p for _, p, _ in db.items()) == sorted(os.path.realpath(f) for f in files)
        assert db.has_paths(["index/cls/0.png", "./link/cls/1.png", str(files[2]), "index/cls/9.png"]) == \
            [True, True, True, False]
        assert db.remove(["link/cls"]) == 3 and len(db) == 0


def test_a_database_of_paths_as_given_is_migrated_once_with_nothing_lost(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    files = [tile(data / "cls" / f"{i}.png", i) for i in range(4)]
    (tmp_path / "alias").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    vectors = unit(6)
    # How the first releases stored paths: as given on the command line.
    given = ["data/cls/0.png", str(tmp_path / "alias" / "cls" / "1.png"), str(files[2]), "data/cls/3.png",
             str(files[3]), "elsewhere/gone.png"]
    with Database.open("old", create=True) as db:
        ids = db.add([str(files[0])], ["cls"], vectors[:1])  # an id to reuse as a pre-change entry
        client = db._client
        client.delete("cbir:{old}:id", "cbir:{old}:path", "cbir:{old}:class", "cbir:{old}:vec")
        client.hdel("cbir:{old}:meta", "paths")
        for image_id, path, vector in zip(range(ids[0], ids[0] + 6), given, vectors):
            client.hset("cbir:{old}:id", path, image_id)
            client.hset("cbir:{old}:path", image_id, path)
            client.hset("cbir:{old}:class", image_id, "cls")
            client.hset("cbir:{old}:vec", image_id, vector.tobytes())
        client.set("cbir:{old}:next_id", ids[0] + 6)
        client.incr("cbir:{old}:version")  # the FAISS file is behind: rebuilt on the next open
    (tmp_path / "cbir_home" / "old" / "names.npz").unlink(missing_ok=True)

    logger = logging.getLogger("cbir")
    logger.addHandler(caplog.handler)  # the commands' logger does not propagate to pytest's
    with caplog.at_level(logging.INFO, logger="cbir"), Database.open("old") as db:
        items = {path: image_id for image_id, path, _ in db.items()}
        # Resolved: absolute, through the link; file 3 stored twice (two forms) keeps its later entry.
        assert items == {
            str(files[0]): ids[0], str(files[1]): ids[0] + 1, str(files[2]): ids[0] + 2,
            str(files[3]): ids[0] + 4, "elsewhere/gone.png": ids[0] + 5,
        }
        assert db.search(vectors[1:2], k=1).paths == [[str(files[1])]]
        db._sync()
        assert set(db._index.ids().tolist()) == set(items.values())  # FAISS dropped the duplicate too
        # Re-indexing the folder from here, or by its absolute path, adds nothing.
        assert all(db.has_paths([f"data/cls/{i}.png" for i in range(4)] + [str(f) for f in files]))
    logger.removeHandler(caplog.handler)
    assert "3 stored paths rewritten" in caplog.text and "1 duplicates" in caplog.text
    assert "1 paths were stored relative" in caplog.text and "elsewhere/gone.png" in caplog.text


def test_a_query_through_a_linked_folder_is_still_itself_in_evaluation(tmp_path, monkeypatch):
    from cbir.evaluation.searching import GroupExclusion, filter_results

    files = [tile(tmp_path / "data" / "cls" / f"{i}.png", i) for i in range(2)]
    (tmp_path / "linked").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with Database.open("db", create=True) as db:
        db.add([str(f) for f in files], ["cls"] * 2, unit(2))
        found = db.search(unit(2)[:1], k=2).paths[0]
    # The query named through the link and relative: the stored (resolved) path of the same file is dropped.
    outcome = filter_results("linked/cls/0.png", found, ["cls"] * 2, GroupExclusion(None))
    assert outcome.self_found and outcome.results == [(str(files[1]), "cls")]


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory):
    import torch

    from cbir.models import create_extractor, save_extractor

    torch.manual_seed(0)
    return save_extractor(tmp_path_factory.mktemp("extractor") / "effnet8.pt",
                          create_extractor("effnet", DIM, pretrained=False, input_size=32))


def test_vanished_neighbours_are_reported_once_and_marked_in_the_figure(tmp_path, tiny_extractor, capsys):
    from cbir.cli import index

    collection = tmp_path / "collection"
    for c, cls in enumerate(("a b", "a_b")):  # two classes whose safe names would once have been one
        for i in range(4):
            tile(collection / cls / f"{i}.png", 40 * c + 10 * i)
    assert run(index.main, ["--path", str(collection), "--weights", str(tiny_extractor), "--num_workers", "0"]) == 0
    for name in ("0.png", "1.png"):
        (collection / "a b" / name).unlink()  # moved away since indexing
    odd = tile(tmp_path / "queries" / "odd\nname.png")
    capsys.readouterr()

    results = tmp_path / "results"
    assert run(retrieve.main, ["--path", str(odd), "--nrt_neigh", "8", "--results_dir", str(results),
                               "--num_workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "2 results (2 files) could not be shown" in err and "no such file" in err
    assert "odd\\nname.png" in out and "\nname.png" not in out  # a name never fakes a line
    copied = [p.name for p in results.iterdir() if p.name[0].isdigit()]
    assert len(copied) == 6 and (results / "retrieval.png").is_file()

    per_class = tmp_path / "per_class"
    assert run(retrieve.main, ["--path", str(collection), "--nrt_neigh", "8", "--results_dir", str(per_class),
                               "--num_workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "could not be shown" in err  # one line per run, not per query
    assert sorted(p.name for p in per_class.iterdir()) == sorted([safe_name("a b"), "a_b"])
    assert safe_name("a b") != "a_b"


def test_the_figure_says_which_results_could_not_be_shown(tmp_path):
    from cbir.plots import plot_retrieval

    image = Image.new("RGB", (16, 16), (200, 10, 10))
    path = plot_retrieval(image, "a", [(image, "a", 0.1), (None, "b", 0.2)], tmp_path / "f.png")
    with Image.open(path) as figure:
        pixels = np.asarray(figure.convert("RGB"))
    grey = (np.abs(pixels.astype(int) - 230).max(axis=2) <= 2).sum()  # the 0.9 grey panel of the missing one
    assert grey > 2000


# --- 4. private files, locks -----------------------------------------------------------------------------------
def test_database_folders_are_private_and_an_older_open_one_is_closed(private_home):
    with Database.open("db", create=True) as db:
        db.set_extractor(EXTRACTOR)
        db.add(["/data/a.png", "/data/b.png"], ["a", "b"], unit(2))
        folder = db.folder
        socket_path = db._server.socket_path
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o700
    files = [p for p in folder.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"appendonly.aof", "faiss.index", "names.npz", "redis.conf", "redis.secret",
                                       "redis.lock"}
    assert mode(folder) == 0o700 and {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}

    # A database as older versions left it: open to everyone. Opening it closes it.
    os.chmod(folder, 0o755)
    for p in files:
        os.chmod(p, 0o644)
    with Database.open("db") as db:
        assert len(db) == 2
    assert mode(folder) == 0o700 and all(mode(p) == 0o600 for p in folder.iterdir() if p.is_file())


def test_a_lock_held_by_someone_else_is_one_line_naming_the_holder(public, attacker, monkeypatch):
    home = public / "home"  # where the other user can reach (pytest's own folders are closed to others)
    monkeypatch.setenv("CBIR_HOME", str(home))
    with Database.open("db", create=True) as db:
        db.add(["/data/a.png"], ["a"], unit(1))
    folder = home / "db"
    # As an older version left it: anyone could open the lock file, and flock needs no write access.
    os.chmod(home, 0o755)
    os.chmod(folder, 0o755)
    os.chmod(folder / "redis.lock", 0o644)
    holder = as_attacker(attacker, ["/usr/bin/python3", "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(folder / 'redis.lock')!r}, 'rb'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        env = {**os.environ, "CBIR_LOCK_WAIT": "2"}
        # Before the change, this hung for as long as the lock was held (here: until killed by the timeout).
        done = subprocess.run([str(BIN / "cbir-db"), "info", "--db_name", "db"], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert f"locked by pid {holder.pid}" in done.stderr and "still locked after 2 s" in done.stderr
    if attacker:
        assert "user cbir-attacker" in done.stderr
    with Database.open("db") as db:  # free again: nothing lost
        assert len(db) == 1


@pytest.fixture
def team(public, monkeypatch):
    """A CBIR_HOME of a group (setgid, ``2770``) the user shares with another member (where root), else one of the
    user's own group."""
    home = public / "home"
    monkeypatch.setenv("CBIR_HOME", str(home))
    home.mkdir()
    os.chmod(home, 0o2770)
    if not ROOT:
        return None
    subprocess.run(["groupadd", "--system", "cbir-team"], capture_output=True)
    member = _user("cbir-member")
    subprocess.run(["usermod", "-a", "-G", "cbir-team", "cbir-member"], check=True, capture_output=True)
    import grp

    gid = grp.getgrnam("cbir-team").gr_gid
    os.chown(home, -1, gid)
    os.chmod(home, 0o2770)  # chown clears the setgid bit
    return SimpleNamespace(gid=gid, member=member)


def test_a_shared_group_database_is_open_to_its_group_only(team, attacker):
    with Database.open("db", create=True, shared_group=True) as db:
        db.add(["/data/a.png"], ["a"], unit(1))
        folder, socket_path = db.folder, db._server.socket_path
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o770
        if team:
            # A member of the group reaches the server and its secret; another user reaches nothing.
            member = ["setpriv", f"--reuid={team.member.uid}", f"--regid={team.gid}", f"--groups={team.gid}"]
            probe = ("import socket, sys\n"
                     f"print(len(open({str(folder / 'redis.secret')!r}).read()))\n"
                     f"s = socket.socket(socket.AF_UNIX); s.connect({str(socket_path)!r}); s.sendall(b'PING\\r\\n')\n"
                     "print(s.recv(100))")
            done = subprocess.run(member + ["/usr/bin/python3", "-c", probe], capture_output=True, text=True)
            assert done.returncode == 0 and done.stdout.split() == ["64", "b'+PONG\\r\\n'"], done.stderr
            outsider = ["setpriv", f"--reuid={attacker.uid}", f"--regid={attacker.gid}", "--clear-groups"]
            done = subprocess.run(outsider + ["/usr/bin/python3", "-c", probe], capture_output=True, text=True)
            assert done.returncode != 0 and "Permission denied" in done.stderr
    assert mode(folder) == 0o2770
    written = {p.name: mode(p) for p in folder.iterdir() if p.is_file()}
    # What the tool writes is 0660; redis-server makes its own files 0640 (the group reads them; a member whose
    # server takes over the database copies them, see below).
    assert {n: m for n, m in written.items() if n not in ("appendonly.aof", "redis.log")} == \
        {n: 0o660 for n in written if n not in ("appendonly.aof", "redis.log")}
    assert written["appendonly.aof"] & 0o060 == 0o040 and written["appendonly.aof"] & 0o007 == 0

    # The append-only file as another member's server left it: the next server works on a copy of its own.
    aof = folder / "appendonly.aof"
    os.chown(aof, team.member.uid if team else -1, -1)
    os.chmod(aof, 0o640)
    with Database.open("db") as db:  # stays shared without being asked again
        assert len(db) == 1
        db.add(["/data/b.png"], ["b"], unit(1, seed=1))
    assert mode(folder) == 0o2770 and os.stat(aof).st_uid == os.geteuid()
    with Database.open("db") as db:
        assert len(db) == 2


# --- 5. planted links, folders of others -----------------------------------------------------------------------
def test_a_database_folder_made_by_another_user_in_a_shared_home_is_refused(public, attacker, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("CBIR_HOME", str(public))  # a shared CBIR_HOME, writable by all as /tmp is
    secret = victim_file(tmp_path)
    planted = public / "db"
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(planted)])
    os.chmod(planted, 0o777)
    (planted / "redis.conf").symlink_to(secret)
    the_attackers(attacker, planted / "redis.conf")
    if attacker:
        with pytest.raises(DatabaseError) as error:
            Database.open("db", create=True)
        assert "belongs to user cbir-attacker" in str(error.value) and "\n" not in str(error.value)
    else:  # the folder is ours: closed to others, and the link in it replaced, not written through
        Database.open("db", create=True).close()
        assert mode(planted) == 0o700 and not (planted / "redis.conf").is_symlink()
    assert secret.read_text() == "the victim's private notes\n"

    # The database folder itself a link the attacker planted, to a folder of the victim's: not followed.
    planted_link = public / "other"
    planted_link.symlink_to(tmp_path)
    the_attackers(attacker, planted_link)
    if attacker:
        with pytest.raises(DatabaseError, match="symbolic link made by user cbir-attacker"):
            Database.open("other", create=True)
        assert not (tmp_path / "redis.conf").exists()


def test_links_planted_in_a_database_folder_are_replaced_never_written_through(private_home, tmp_path, attacker):
    with Database.open("db", create=True) as db:
        db.add(["/data/a.png"], ["a"], unit(1))
    folder = private_home / "db"
    targets = {}
    for name in ("redis.conf", "redis.secret", "faiss.index", "names.npz"):
        (folder / name).unlink()
        (tmp_path / name.replace(".", "_")).mkdir()
        targets[name] = victim_file(tmp_path / name.replace(".", "_"))
        (folder / name).symlink_to(targets[name])
        the_attackers(attacker, folder / name)
    with Database.open("db") as db:
        db.add(["/data/b.png"], ["b"], unit(1, seed=1))
    for name, target in targets.items():
        assert target.read_text() == "the victim's private notes\n", name
        assert (folder / name).is_file() and not (folder / name).is_symlink(), name

    # A name the embedded Redis writes itself, linked by another user: refused before it starts.
    (folder / "appendonly.aof").rename(tmp_path / "aof")
    (folder / "appendonly.aof").symlink_to(targets["redis.conf"])
    the_attackers(attacker, folder / "appendonly.aof")
    if attacker:
        with pytest.raises(DatabaseError, match="symbolic link made by user cbir-attacker"):
            Database.open("db")
        assert targets["redis.conf"].read_text() == "the victim's private notes\n"
    (folder / "appendonly.aof").unlink()
    (tmp_path / "aof").rename(folder / "appendonly.aof")
    with Database.open("db") as db:
        assert len(db) == 2


# --- 6. passwords, unix:// -------------------------------------------------------------------------------------
@pytest.fixture
def socket_redis(tmp_path):
    """A real password-protected redis-server listening on a Unix socket only."""
    folder = tmp_path / "external"
    folder.mkdir()
    path = folder / "redis.sock"
    server = subprocess.Popen(
        [redis_server_executable(), "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
         "--requirepass", "sock-pw-9", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(unix_socket_path=str(path), password="sock-pw-9", retry=Retry(NoBackoff(), 0))
    wait_until_serving(server, client)
    yield f"unix://:sock-pw-9@{path}?db=0"
    client.close()
    server.terminate()
    server.wait(timeout=10)


def test_a_unix_socket_url_works(socket_redis, capsys):
    with Database.open("db", redis_url=socket_redis, create=True) as db:
        db.set_extractor(EXTRACTOR)
        db.add(["/data/a.png", "/data/b.png"], ["a", "b"], unit(2))
        assert db.search(unit(2)[1:], k=1).paths == [["/data/b.png"]]
    code, out, err = cbir_db(capsys, "list", "--redis_url", socket_redis)
    assert (code, out) == (0, "db\n")
    code, out, err = cbir_db(capsys, "info", "--redis_url", socket_redis.replace("sock-pw-9", "wrong"))
    assert code == 2 and "refused the credentials" in err and "wrong" not in err and "sock-pw" not in err


def test_the_url_can_come_from_a_private_file_and_help_says_so(socket_redis, tmp_path, capsys):
    url_file = tmp_path / "redis.url"
    url_file.write_text(f"\n{socket_redis}\n")
    os.chmod(url_file, 0o644)
    code, out, err = cbir_db(capsys, "list", "--redis_url_file", str(url_file))
    assert code == 2 and err.count("\n") == 1 and f"chmod 600 {url_file}" in err and "sock-pw" not in err
    os.chmod(url_file, 0o600)
    fill_url = Database.open("db", redis_url=socket_redis, create=True)
    fill_url.close()
    assert cbir_db(capsys, "list", "--redis_url_file", str(url_file))[:2] == (0, "db\n")

    from cbir.cli import evaluate, index

    for main, argv in ((index.main, []), (retrieve.main, []), (evaluate.main, []), (db_cli.main, ["info"])):
        with pytest.raises(SystemExit):
            main(argv + ["--help"])
        flat = " ".join(capsys.readouterr().out.split())
        assert "CBIR_REDIS_URL" in flat and "--redis_url_file" in flat and "'ps'" in flat, main.__module__


# --- 7. the server: images sent, uploads kept, its token ------------------------------------------------------
def victim_image(folder: Path) -> Path:
    path = tile(folder / "a.png", 77)  # the name of the stored image, in a folder only the victim can read
    os.chmod(path, 0o600)
    return path


def test_the_server_sends_no_file_of_its_user_through_a_link_planted_after_indexing(tmp_path, public, attacker):
    from cbir.serve.errors import NotFound
    from cbir.serve.images import stored_image, thumbnail

    shared = public / "shared"  # a shared data set: its folder is the attacker's to write into
    run_as_attacker(attacker, ["mkdir", "-m", "755", str(shared)])
    the_attackers(attacker, tile(shared / "a.png", 10))
    stored = str(shared / "a.png")  # as a database stores it: resolved
    assert stored_image(stored)[1] == "image/png" and thumbnail(stored)[:2] == b"\xff\xd8"
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    secret = victim_image(victim)
    # the stored file swapped for a link to the victim's image, then the folder swapped for a link to the victim's
    for swap in (["ln", "-sf", str(secret), stored],
                 ["sh", "-c", f"mv {shared} {shared}.old && ln -s {victim} {shared}"]):
        run_as_attacker(attacker, swap)
        for send in (stored_image, thumbnail):
            with pytest.raises(NotFound, match="no longer on disk"):
                send(stored)


def test_uploads_are_never_written_into_folders_another_user_planted(tmp_path, public, attacker, capsys):
    from cbir.cli import serve as serve_cli
    from cbir.serve.engine import _write_private

    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    uploads = public / "uploads"
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(uploads), str(uploads / "db")])
    run_as_attacker(attacker, ["ln", "-s", str(victim), str(uploads / "db" / "cls")])
    if attacker:
        # the attacker's uploads folder: refused whole, nothing written, the victim's folder's mode untouched
        with pytest.raises(CbirError, match="belongs to user cbir-attacker"):
            _write_private(uploads / "db" / "cls" / "x.png", b"data", root=uploads / "db")
        assert run(serve_cli.main, ["--db_name", "db", "--uploads", str(uploads)]) == 2
        assert "uploads folder" in capsys.readouterr().err
    else:
        os.chmod(uploads, 0o700)
    # a folder of the server's user, with a class folder planted as a link in it: refused, nothing written
    mine = tmp_path / "mine"
    (mine / "db").mkdir(parents=True)
    (mine / "db" / "cls").symlink_to(victim)
    the_attackers(attacker, mine / "db" / "cls")
    with pytest.raises(CbirError, match="symbolic link"):
        _write_private(mine / "db" / "cls" / "x.png", b"data", root=mine / "db")
    assert list(victim.iterdir()) == [] and mode(victim) == 0o755
    _write_private(mine / "db" / "new" / "x.png", b"data", root=mine / "db")
    assert mode(mine / "db" / "new") == 0o700 and mode(mine / "db" / "new" / "x.png") == 0o600


def test_a_token_file_another_user_made_or_linked_is_refused(tmp_path, public, attacker):
    from cbir.serve.auth import read_token

    theirs = public / "api.token"
    run_as_attacker(attacker, ["sh", "-c", f"umask 077; echo the-token-they-also-know-123 > {theirs}"])
    mine = tmp_path / "api.token"
    mine.write_text("a-token-of-my-own-12345\n")
    mine.chmod(0o600)
    (tmp_path / "link.token").symlink_to(mine)
    if attacker:
        with pytest.raises(CbirError, match="belongs to user cbir-attacker"):
            read_token(str(theirs))
    with pytest.raises(CbirError, match="symbolic link"):
        read_token(str(tmp_path / "link.token"))
    assert read_token(str(mine)) == "a-token-of-my-own-12345"


# --- 8. what the other commands write -----------------------------------------------------------------------
def test_training_outputs_replace_links_planted_beside_them_and_stay_private(synthetic_data, tmp_path, public,
                                                                            attacker, capsys):
    from cbir.cli import train as train_cli
    from cbir.cli import visualize as visualize_cli

    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    secret = victim_file(victim)
    # In a shared folder (as /tmp): the log planted as a link to the victim's file, the loss curve as a link to a
    # new file in the victim's folder.
    for name, target in (("m.log.jsonl", secret), ("m.loss.png", victim / "new.png")):
        (public / name).symlink_to(target)
        the_attackers(attacker, public / name)
    argv = ["--model", "effnet", "--scratch", "--input_size", "32", "--num_features", "8", "--num_epochs", "1",
            "--max_batches", "1", "--num_workers", "0", "--tta", "0", "--training_data", str(synthetic_data["train"])]
    assert run(train_cli.main, argv + ["--weights", str(public / "m.pt")]) == 0
    assert secret.read_text() == "the victim's private notes\n" and [p.name for p in victim.iterdir()] == ["private.txt"]
    for name in ("m.pt", "m.log.jsonl", "m.loss.png"):
        assert not (public / name).is_symlink() and mode(public / name) == 0o600, name
    made = public / "made" / "deeper"  # folders the tool makes are private
    assert run(train_cli.main, argv + ["--weights", str(made / "m.pt")]) == 0
    assert mode(made) == mode(made.parent) == 0o700

    theirs = public / "theirs"  # a folder of another user's: refused before any work, in one line
    run_as_attacker(attacker, ["mkdir", "-m", "777", str(theirs)])
    capsys.readouterr()
    if attacker:
        assert run(train_cli.main, argv + ["--weights", str(theirs / "m.pt")]) == 2
        assert run(visualize_cli.main, ["--path", str(synthetic_data["train"]), "--out", str(theirs)]) == 2
        err = capsys.readouterr().err
        assert err.count("belongs to user cbir-attacker") == 2 and "Traceback" not in err
        assert list(theirs.iterdir()) == []


# --- retrieval's names -----------------------------------------------------------------------------------------
def test_result_names_too_long_are_shortened_never_dropped(tmp_path):
    long_names = ["x" * 240 + "_one.png", "x" * 240 + "_two.png"]
    stored_files = [tile(tmp_path / "stored" / name, i) for i, name in enumerate(long_names)]
    query = tile(tmp_path / "q.png")
    neighbours = [Neighbour(i + 1, str(p), "tumour", 0.1) for i, p in enumerate(stored_files)]
    saved = save_retrieval(Retrieval(Sample(str(query), "tumour"), neighbours), tmp_path / "results")
    names = sorted(p.name for p in (tmp_path / "results").iterdir() if p.name[0].isdigit())
    assert saved.missing == [] and len(names) == 2
    assert [n[:9] for n in names] == ["1_tumour_", "2_tumour_"]
    assert all(len(n.encode()) <= 255 and n.endswith(".png") for n in names)
    assert result_name("3_tumour", long_names[0]) != result_name("3_tumour", long_names[1])


def test_names_stay_distinct_and_print_escaped():
    assert safe_name("a_b") == "a_b" and safe_name("a b") != safe_name("a_b") and safe_name("a/b") != "a_b"
    assert safe_name("a b.png").endswith(".png") and safe_name("a b.png") != safe_name("a_b.png")
    assert "/" not in safe_name("../../etc") and len(safe_name("é" * 300)) <= 255
    assert printable("a\nb\x1b[2J") == "a\\nb\\x1b[2J" and printable("tumeur_é") == "tumeur_é"
