"""cbir-serve through a real server: uvicorn on a loopback port, real embedded Redis and FAISS, an HTTP client."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cbir.cli import index as index_command
from cbir.cli import serve as serve_command
from cbir.cli.common import run
from cbir.database import Database
from cbir.serve import ServeConfig
from cbir.serve.engine import HotEncoder
from redis_processes import live_redis_servers_under
from serve_server import TOKEN, LiveServer, index_collection, png_bytes

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLASSES = ["shapes_disc", "shapes_ring", "texture_checker", "texture_stripes"]


@pytest.fixture(scope="module")
def collection(synthetic_data, tmp_path_factory):
    collection = index_collection(tmp_path_factory.mktemp("serve"), synthetic_data)
    yield collection
    assert live_redis_servers_under(collection["home"]) == [], "a server left its embedded Redis running"


@pytest.fixture(scope="module")
def server(collection):
    """The default server: reads open, writes with the token."""
    config = ServeConfig(db_name="cells", home=collection["home"], auth="write", token=TOKEN,
                         uploads=collection["root"] / "uploads")
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def query_file(collection, cls: str, split: str = "index", n: int = 0) -> Path:
    return sorted((collection["data"][split] / cls).iterdir())[n]


def upload(path: Path, field: str = "image"):
    return {field: (path.name, path.read_bytes(), "image/png")}


def new_database(client, name: str) -> None:
    assert client.post("/api/databases", json={"name": name}, headers=AUTH).status_code == 201


# --- searching -------------------------------------------------------------------------------------------------
def test_search_finds_an_indexed_image_first_with_its_class_and_working_image_urls(client, collection):
    path = query_file(collection, "shapes_ring", n=2)
    answer = client.post("/api/databases/cells/search", files=upload(path), data={"k": "5",
                                                                                  "query_class": "shapes_ring"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    hits = result["neighbours"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["name"] == path.name and hits[0]["class"] == "shapes_ring" and hits[0]["project"] == "shapes"
    assert hits[0]["distance"] < 1e-4 and hits[0]["same_class"] is True
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert all(h["same_class"] == (h["class"] == "shapes_ring") for h in hits)
    assert all("/" not in h["name"] for h in hits)  # the stored path never leaves the server

    full = client.get(hits[0]["image_url"])
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(full.content)) as served, Image.open(path) as original:
        assert served.size == original.size
        assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(original.convert("RGB")))
    thumb = client.get(hits[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as small:
        assert max(small.size) <= 256


def test_batch_search_answers_each_image_in_the_order_sent(client, collection):
    paths = [query_file(collection, cls, n=1) for cls in CLASSES]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answer = client.post("/api/databases/cells/search/batch", files=files, data={"k": "3"})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in paths]
    assert [r["neighbours"][0]["name"] for r in results] == [p.name for p in paths]
    assert all(len(r["neighbours"]) == 3 for r in results)


def test_concurrent_requests_are_embedded_exactly_as_one_at_a_time(collection):
    """The service embeds requests that arrive together in one pass: each must get its own vectors back."""
    from cbir.inference import load_encoder

    hot = HotEncoder(load_encoder(collection["weights"]))
    images = [Image.open(query_file(collection, cls, n=i)).convert("RGB") for cls in CLASSES for i in range(3)]
    alone = [hot.embed([image])[0] for image in images]
    together = [None] * len(images)

    def worker(i):
        together[i] = hot.embed([images[i]])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert np.allclose(np.stack(together), np.stack(alone), atol=1e-5)


# --- reading routes --------------------------------------------------------------------------------------------
def test_health_databases_info_and_listing(client):
    health = client.get("/health").json()
    assert health == {"status": "ok", "database": "cells", "extractor": "effnet", "writes": True, "auth": "write"}
    assert "cells" in client.get("/api/databases").json()["databases"]
    info = client.get("/api/databases/cells").json()
    assert info["images"] == 24 and info["dim"] == 16 and info["index"] == "Flat"
    assert info["classes"] == [{"name": c, "project": c.split("_")[0], "images": 6} for c in CLASSES]
    assert info["projects"] == {"shapes": 12, "texture": 12}
    assert info["extractor"]["name"] == "effnet" and "weights" not in info["extractor"]
    assert "folder" not in info and "redis" not in info  # no server paths in answers

    page = client.get("/api/databases/cells/images", params={"class": "texture_checker", "offset": 2, "limit": 3})
    listing = page.json()
    assert listing["total"] == 6 and listing["offset"] == 2 and len(listing["images"]) == 3
    assert {image["class"] for image in listing["images"]} == {"texture_checker"}
    everything = client.get("/api/databases/cells/images", params={"limit": 500}).json()
    assert everything["total"] == 24 and len({image["id"] for image in everything["images"]}) == 24


def test_unknown_ids_and_databases_are_404s(client):
    assert client.get("/api/databases/cells/images/999999").status_code == 404
    assert client.get("/api/databases/cells/images/999999/thumbnail").status_code == 404
    missing = client.get("/api/databases/nowhere")
    assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]
    assert client.get("/api/databases/..%2Fetc").status_code in (400, 404)


def test_the_page_its_files_and_the_api_docs_are_served_without_a_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>cbir" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "://" not in page.text  # nothing is loaded from elsewhere
    assert client.get("/db/cells").text == page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    spec = client.get("/openapi.json").json()
    for route in ("/api/databases/{name}/search", "/api/databases/{name}/search/batch", "/api/databases/{name}/images",
                  "/api/databases/{name}/images/{image_id}", "/api/search", "/api/images", "/api/storages",
                  "/health"):
        assert route in spec["paths"], route
    form = spec["paths"]["/api/databases/{name}/search"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"image", "k", "query_class", "nprobe"} <= set(form["schema"]["properties"])  # the form it reads itself
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200


# --- writing ---------------------------------------------------------------------------------------------------
def test_add_search_and_remove_through_the_api_keeps_files_private(client, collection):
    new_database(client, "added")
    image = query_file(collection, "shapes_disc", split="query")
    files = [("images", (image.name, image.read_bytes(), "image/png")),
             ("images", ("noise.png", png_bytes(1), "image/png"))]
    added = client.post("/api/databases/added/images", files=files, data={"label": "shapes_disc"}, headers=AUTH)
    assert added.status_code == 200, added.text
    body = added.json()
    assert body["images"] == 2 and all(a["new"] and a["class"] == "shapes_disc" for a in body["added"])

    found = client.post("/api/databases/added/search", files=upload(image), data={"k": "2"}).json()["neighbours"]
    assert found[0]["id"] == body["added"][0]["id"] and found[0]["distance"] < 1e-4

    stored_files = [p for p in (collection["root"] / "uploads" / "added").rglob("*") if p.is_file()]
    assert len(stored_files) == 2
    for path in stored_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for folder in path.relative_to(collection["root"] / "uploads").parents[:-1]:
            assert stat.S_IMODE((collection["root"] / "uploads" / folder).stat().st_mode) == 0o700

    again = client.post("/api/databases/added/images", files=files[:1], data={"label": "shapes_disc"}, headers=AUTH)
    assert again.json()["added"][0]["new"] is False and again.json()["images"] == 2  # nothing stored twice

    removed = client.delete(f"/api/databases/added/images/{body['added'][0]['id']}", headers=AUTH)
    assert removed.status_code == 200 and removed.json() == {"database": "added", "removed": [body["added"][0]["id"]],
                                                             "images": 1}
    assert len([p for p in (collection["root"] / "uploads" / "added").rglob("*") if p.is_file()]) == 1
    assert client.get(body["added"][0]["image_url"]).status_code == 404
    assert client.delete("/api/databases/added", headers=AUTH).status_code == 200
    assert "added" not in client.get("/api/databases").json()["databases"]
    assert not (collection["root"] / "uploads" / "added").exists()


def test_removing_an_indexed_image_keeps_the_users_file(client, collection, tmp_path):
    folder = tmp_path / "mine" / "shapes_ring"
    folder.mkdir(parents=True)
    original = folder / "ring.png"
    original.write_bytes(query_file(collection, "shapes_ring", split="query").read_bytes())
    assert run(index_command.main, ["--path", str(tmp_path / "mine"), "--weights", str(collection["weights"]),
                                    "--db_name", "mine", "--home", str(collection["home"]), "--num_workers", "0"]) == 0
    listing = client.get("/api/databases/mine/images").json()
    assert client.delete(f"/api/databases/mine/images/{listing['images'][0]['id']}", headers=AUTH).status_code == 200
    assert original.is_file()
    assert client.delete("/api/databases/mine", headers=AUTH).status_code == 200


def test_writes_need_the_right_token(client, collection):
    image = query_file(collection, "shapes_ring")
    without = client.post("/api/databases/cells/images", files=upload(image, "images"), data={"label": "x"})
    assert without.status_code == 401 and "Authorization: Bearer" in without.json()["detail"]
    wrong = client.post("/api/databases/cells/images", files=upload(image, "images"), data={"label": "x"},
                        headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong token"
    assert client.delete("/api/databases/cells/images/0").status_code == 401
    assert client.delete("/api/databases/cells").status_code == 401
    assert client.post("/api/databases", json={"name": "x"}).status_code == 401
    assert client.get("/api/databases/cells").json()["images"] == 24  # nothing was written


def test_a_server_without_a_token_refuses_every_write(collection):
    config = ServeConfig(db_name="cells", home=collection["home"], auth="write", token=None)
    with LiveServer(config) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        answer = http.post("/api/databases", json={"name": "x"}, headers=AUTH)
        assert answer.status_code == 403 and "started without a token" in answer.json()["detail"]
        assert http.get("/health").json()["writes"] is False
        assert http.post("/api/databases/cells/search", files=upload(query_file(collection, "shapes_disc")),
                         data={"k": "1"}).status_code == 200


def test_auth_read_protects_searches_and_accepts_the_cookie_for_reads_only(collection):
    config = ServeConfig(db_name="cells", home=collection["home"], auth="read", token=TOKEN)
    image = query_file(collection, "shapes_disc")
    with LiveServer(config) as live, httpx.Client(base_url=live.url, timeout=60) as http, \
            httpx.Client(base_url=live.url, timeout=60, cookies={"cbir_token": TOKEN}) as browser:
        assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
        assert http.post("/api/databases/cells/search", files=upload(image), data={"k": "1"}).status_code == 401
        assert http.get("/api/storages").status_code == 401  # the Cytomine-shaped routes too
        answer = http.post("/api/databases/cells/search", files=upload(image), data={"k": "1"}, headers=AUTH)
        assert answer.status_code == 200
        image_url = answer.json()["neighbours"][0]["image_url"]
        assert http.get(image_url).status_code == 401
        assert browser.get(image_url).status_code == 200
        # A cookie rides along on a foreign page's request: it never authorises a write.
        assert browser.post("/api/databases", json={"name": "x"}).status_code == 401


# --- bad input -------------------------------------------------------------------------------------------------
def _bad_uploads(collection) -> dict[str, tuple[bytes, int, str]]:
    good = query_file(collection, "shapes_ring").read_bytes()
    jpeg = io.BytesIO()
    Image.open(query_file(collection, "shapes_ring")).convert("RGB").save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, "PNG")  # 64 megapixels in a few KB
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    return {
        "text.png": (b"this is not an image\n", 400, "is not an image"),
        "empty.png": (b"", 400, "is empty"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], 400, "truncated"),
        "truncated.png": (good[:200], 400, "truncated"),
        "bomb.png": (bomb.getvalue(), 413, "pixels"),
        "dot.png": (tiny.getvalue(), 400, "1x1"),
    }


def test_bad_input_gets_one_clear_4xx_line_and_the_server_keeps_serving(client, collection):
    for name, (data, status, words) in _bad_uploads(collection).items():
        answer = client.post("/api/databases/cells/search", files={"image": (name, data, "image/png")},
                             data={"k": "3"})
        assert answer.status_code == status, (name, answer.text)
        detail = answer.json()["detail"]
        assert words in detail and "\n" not in detail, (name, detail)
        added = client.post("/api/databases/cells/images", files={"images": (name, data, "image/png")},
                            data={"label": "x"}, headers=AUTH)
        assert added.status_code == status, (name, added.text)
    image = query_file(collection, "shapes_ring")
    for k in ("0", "-3", "101", "1000000000"):
        answer = client.post("/api/databases/cells/search", files=upload(image), data={"k": k})
        assert answer.status_code == 400 and "k must be between 1 and 100" in answer.json()["detail"]
    for fields, files, words, status in (({"k": "ten"}, {}, "k: a whole number", 422),
                                         ({"nprobe": "0"}, {}, "nprobe: at least 1", 422),
                                         ({}, {"query_class": ("x.png", b"x")}, "Too many files", 400)):
        answer = client.post("/api/databases/cells/search", files={**upload(image), **files}, data=fields)
        assert answer.status_code == status and words in answer.json()["detail"], (fields, files, answer.text)
    no_image = client.post("/api/databases/cells/search", data={"k": "3"})
    assert no_image.status_code == 422 and "image" in no_image.json()["detail"]
    unknown = client.post("/api/databases/nowhere/search", files=upload(image), data={"k": "3"})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    invalid = client.post("/api/databases/bad%20name/search", files=upload(image), data={"k": "3"})
    assert invalid.status_code == 400 and "invalid database name" in invalid.json()["detail"]
    huge = client.post("/api/databases/cells/search", files={"image": ("big.png", b"\0" * (21 * 2**20), "image/png")})
    assert huge.status_code == 413 and "limit of 20.0 MB" in huge.json()["detail"]

    # Still serving, and nothing was stored or lost.
    assert client.get("/api/databases/cells").json()["images"] == 24
    answer = client.post("/api/databases/cells/search", files=upload(image), data={"k": "1"})
    assert answer.status_code == 200 and answer.json()["neighbours"][0]["name"] == image.name


# --- the Cytomine-shaped routes --------------------------------------------------------------------------------
def test_cytomine_routes_with_the_requests_that_platform_sends(collection):
    """Cytomine sends no token: it is served only when the operator says --auth none."""
    config = ServeConfig(db_name="cells", home=collection["home"], auth="none")
    ring, disc = query_file(collection, "shapes_ring", split="query"), query_file(collection, "shapes_disc", "query")
    with LiveServer(config) as live, httpx.Client(base_url=f"{live.url}/api", timeout=60) as http:
        assert http.post("/storages", json={"name": "cyto_a"}).json() == {"message": "Created storage with name: cyto_a"}
        again = http.post("/storages", json={"name": "cyto_a"})
        assert again.status_code == 409 and again.json() == {"detail": "Storage with name 'cyto_a' already exists."}
        assert http.post("/storages", params={"name": "cyto_b"}).status_code == 200  # the older request shape
        assert {"cyto_a", "cyto_b", "cells"} <= set(http.get("/storages").json())
        assert http.get("/storages/cyto_a").json() == {"name": "cyto_a"}
        assert http.get("/storages/nope").json() == {"detail": "Storage with name 'nope' not found."}

        one = http.post("/images", params={"storage": "cyto_a", "index": "index"},
                        files={"image": ("annotation-17.png", ring.read_bytes(), "image/png")})
        assert one.status_code == 200, one.text
        assert one.json()["storage"] == "cyto_a" and one.json()["index"] == "index" and len(one.json()["ids"]) == 1
        two = http.post("/images", params={"storage": "cyto_b"},
                        files={"image": ("annotation-18.png", disc.read_bytes(), "image/png")})
        assert two.status_code == 200
        duplicate = http.post("/images", params={"storage": "cyto_a"},
                              files={"image": ("annotation-17.png", ring.read_bytes(), "image/png")})
        assert duplicate.status_code == 409
        assert http.post("/images", params={"storage": "nope"},
                         files={"image": ("a.png", ring.read_bytes(), "image/png")}).status_code == 404

        found = http.post("/search", params=[("nrt_neigh", "2"), ("storage", "cyto_a"), ("storage", "cyto_b"),
                                             ("index", "index")],
                          files={"image": ("query.png", ring.read_bytes(), "image/png")})
        assert found.status_code == 200, found.text
        body = found.json()
        assert body["query"] == "query.png" and body["storage"] == ["cyto_a", "cyto_b"] and body["index"] == "index"
        assert [pair[0] for pair in body["similarities"]] == ["annotation-17.png", "annotation-18.png"]
        assert body["similarities"][0][1] < 1e-4 < body["similarities"][1][1]

        removed = http.delete("/images/annotation-17.png", params={"storage": "cyto_a", "index": "index"})
        assert removed.json() == {"id": one.json()["ids"][0], "storage": "cyto_a", "index": "index"}
        assert http.delete("/images/annotation-17.png", params={"storage": "cyto_a"}).status_code == 404
        assert http.delete("/storages/cyto_a").json() == {"message": "Deleted storage with name: cyto_a"}
        assert http.delete("/storages/cyto_b").status_code == 200
        assert "cyto_a" not in http.get("/storages").json()


def test_cytomine_routes_honour_the_token(client, collection):
    image = query_file(collection, "shapes_ring")
    refused = client.post("/api/images", params={"storage": "cells"}, files=upload(image))
    assert refused.status_code == 401
    assert client.delete("/api/storages/cells").status_code == 401
    assert client.post("/api/search", params={"nrt_neigh": "1", "storage": "cells"},
                       files=upload(image)).status_code == 200  # reads stay open under --auth write


# --- concurrency and the commands beside the server ------------------------------------------------------------
def test_search_while_adding_leaves_exact_counts(client, collection):
    new_database(client, "busy")
    errors: list[str] = []
    added_ids: dict[int, int] = {}
    ring = query_file(collection, "shapes_ring")

    def adder(first_seed: int):
        for seed in range(first_seed, first_seed + 6):
            answer = client.post("/api/databases/busy/images", headers=AUTH, data={"label": f"noise_{seed % 2}"},
                                 files={"images": (f"n{seed}.png", png_bytes(seed), "image/png")})
            if answer.status_code != 200:
                errors.append(answer.text)
            else:
                added_ids[seed] = answer.json()["added"][0]["id"]

    def searcher(database: str):
        for _ in range(6):
            answer = client.post(f"/api/databases/{database}/search", files=upload(ring), data={"k": "3"})
            if answer.status_code != 200:
                errors.append(answer.text)
            elif database == "cells" and answer.json()["neighbours"][0]["name"] != ring.name:
                errors.append("wrong first neighbour while adding")

    threads = [threading.Thread(target=adder, args=(100 * i,)) for i in range(2)]
    threads += [threading.Thread(target=searcher, args=(db,)) for db in ("cells", "busy", "cells", "busy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    info = client.get("/api/databases/busy").json()
    assert info["images"] == 12 and len(set(added_ids.values())) == 12
    assert info["classes"] == [{"name": "noise_0", "project": "noise", "images": 6},
                               {"name": "noise_1", "project": "noise", "images": 6}]
    for seed, image_id in added_ids.items():
        hit = client.post("/api/databases/busy/search", files={"image": ("q.png", png_bytes(seed), "image/png")},
                          data={"k": "1"}).json()["neighbours"][0]
        assert hit["id"] == image_id
    assert client.delete("/api/databases/busy", headers=AUTH).status_code == 200


def test_cbir_index_beside_the_server_is_seen_by_its_next_search(client, collection, tmp_path):
    new_database(client, "beside")
    with Database.open("beside", home=collection["home"]) as db:
        assert len(db) == 0
    folder = tmp_path / "more" / "shapes_disc"
    folder.mkdir(parents=True)
    disc = query_file(collection, "shapes_disc", split="query")
    (folder / "disc.png").write_bytes(disc.read_bytes())
    assert run(index_command.main, ["--path", str(tmp_path / "more"), "--weights", str(collection["weights"]),
                                    "--db_name", "beside", "--home", str(collection["home"]),
                                    "--num_workers", "0"]) == 0
    hit = client.post("/api/databases/beside/search", files=upload(disc), data={"k": "1"}).json()["neighbours"][0]
    assert hit["name"] == "disc.png" and hit["distance"] < 1e-4
    # ...and the server's writes are seen by the commands.
    client.post("/api/databases/beside/images", headers=AUTH, data={"label": "noise"},
                files={"images": ("n.png", png_bytes(7), "image/png")})
    with Database.open("beside", home=collection["home"]) as db:
        assert sorted(c for _, _, c in db.items()) == ["noise", "shapes_disc"]
    assert client.delete("/api/databases/beside", headers=AUTH).status_code == 200


def test_a_database_rebuilt_with_another_extractor_beside_the_server_is_searched_with_the_new_one(
        client, collection, tmp_path):
    """The server keeps each database's extractor per generation without asking Redis on every search; a database
    emptied and indexed again by a command, with another checkpoint (other vector size), must still be searched
    with the checkpoint that built it now."""
    import torch

    from cbir.models import create_extractor, save_extractor

    folder = tmp_path / "few" / "shapes_disc"
    folder.mkdir(parents=True)
    disc = query_file(collection, "shapes_disc", split="query")
    (folder / "disc.png").write_bytes(disc.read_bytes())
    other = tmp_path / "effnet8.pt"
    torch.manual_seed(1)
    save_extractor(other, create_extractor("effnet", 8, pretrained=True, input_size=48))

    def index_with(weights) -> None:
        assert run(index_command.main, ["--path", str(tmp_path / "few"), "--weights", str(weights),
                                        "--db_name", "rebuilt", "--home", str(collection["home"]),
                                        "--num_workers", "0"]) == 0

    index_with(collection["weights"])
    for _ in range(2):  # the second search finds the extractor kept
        first = client.post("/api/databases/rebuilt/search", files=upload(disc), data={"k": "1"})
        assert first.status_code == 200 and first.json()["neighbours"][0]["distance"] < 1e-4
    with Database.open("rebuilt", home=collection["home"]) as db:
        db.clear()  # as cbir-index --rewrite does: a new generation, free for another extractor
    index_with(other)
    again = client.post("/api/databases/rebuilt/search", files=upload(disc), data={"k": "1"})
    assert again.status_code == 200, again.text
    assert again.json()["neighbours"][0]["name"] == "disc.png" and again.json()["neighbours"][0]["distance"] < 1e-4
    assert client.get("/api/databases/rebuilt").json()["extractor"]["num_features"] == 8
    assert client.delete("/api/databases/rebuilt", headers=AUTH).status_code == 200


@pytest.mark.slow
def test_the_command_stops_gracefully_on_sigterm_and_loses_nothing(collection, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "CBIR_API_TOKEN": TOKEN}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("cbir-serve")), "--db_name", "fresh", "--home", str(home),
         "--weights", str(collection["weights"]), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = process.stdout.readline()
        assert "cbir-serve: database 'fresh' (0 images" in first, first + process.stdout.read()
        url = first.split(" at ", 1)[1].strip()
        with httpx.Client(base_url=url, timeout=120) as http:
            for seed in range(5):
                answer = http.post("/api/databases/fresh/images", headers=AUTH, data={"label": "noise"},
                                   files={"images": (f"{seed}.png", png_bytes(seed), "image/png")})
                assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGTERM)
        # uvicorn finishes the requests in flight, the app saves its indexes, then the process ends by the signal.
        assert process.wait(120) == -signal.SIGTERM
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert live_redis_servers_under(home) == []
    with Database.open("fresh", home=home) as db:
        info = db.info()
    # The FAISS file is saved only by a graceful close: up to date, it shows the stop was one.
    assert info["images"] == 5 and info["index_file"] == {"vectors": 5, "up_to_date": True}


def test_answers_leave_at_once_on_every_connection():
    """Nagle's algorithm is off on the connections cbir-serve accepts: with it on, every answer on a keep-alive
    connection waited 40 ms for the client's delayed ACK (the speed benchmark's search went from 67 to 34 ms)."""
    import socket

    with serve_command.bind("127.0.0.1", 0) as listening:
        with socket.create_connection(listening.getsockname()) as client:
            accepted, _ = listening.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"


# --- the command's own checks ----------------------------------------------------------------------------------
def test_the_command_refuses_unsafe_or_impossible_settings(collection, capsys):
    home = ["--home", str(collection["home"])]
    assert run(serve_command.main, ["--db_name", "cells", *home, "--auth", "none", "--host", "0.0.0.0"]) == 2
    assert "--trusted_network" in capsys.readouterr().err
    with serve_command.bind("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        assert run(serve_command.main, ["--db_name", "cells", *home, "--port", port]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    token_file = collection["root"] / "token"
    token_file.write_text("short\n")
    token_file.chmod(0o600)
    assert run(serve_command.main, ["--db_name", "cells", *home, "--token_file", str(token_file)]) == 2
    assert "at least 16" in capsys.readouterr().err
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    assert run(serve_command.main, ["--db_name", "cells", *home, "--token_file", str(token_file)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert run(serve_command.main, ["--db_name", "cells", *home, "--max_k", "0"]) == 2
    assert "--max_k must be at least 1, got 0" in capsys.readouterr().err
    assert run(serve_command.main, ["--db_name", "nowhere", *home, "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert live_redis_servers_under(collection["home"] / "nowhere") == []
