"""The figures a user looks at: t-SNE maps, data-set figures, retrieval and loss-curve plots.

Each figure is opened as an image and checked for a sensible size and real content (not one flat colour).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cbir.cli import tsne as tsne_cli
from cbir.cli import visualize as visualize_cli
from cbir.cli.common import run
from cbir.database import Database
from cbir.plots import HIT_COLOUR, MISS_COLOUR, UNJUDGED_COLOUR, plot_loss_curve, plot_retrieval, wrap_name
from cbir.synthetic import make_image

CLASSES = ("pbc_basophil", "pbc_eosinophil", "lc25000_lung_aca", "umcm_colorectal_01_TUMOR_with_a_long_name")


def assert_figure(path, min_width=300, min_height=200) -> np.ndarray:
    """A readable PNG at least this large, with content: many colours, not one flat fill."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= min_width and height >= min_height, f"{path.name} is only {width}x{height}"
    assert width <= 8000 and height <= 8000, f"{path.name} is {width}x{height}: too large to look at"
    assert pixels.std() > 5, f"{path.name} is a flat image"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path.name} holds almost no drawing"
    return pixels


def pixels_near(pixels: np.ndarray, hex_colour: str, tolerance: int = 40) -> int:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - target).max(axis=-1) < tolerance).sum())


# ------------------------------------------------------------------------------------------------- t-SNE

@pytest.fixture
def clustered_db():
    """A database of 4 well-separated classes (12 vectors each) built directly, as cbir-index would store them."""
    rng = np.random.default_rng(0)
    paths, classes, vectors = [], [], []
    for cls in CLASSES:
        centre = rng.normal(size=16) * 4
        for i in range(12):
            paths.append(f"/data/{cls}/{i}.png")
            classes.append(cls)
            vectors.append(centre + rng.normal(size=16))
    vectors = np.array(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Database.open("tiny", create=True) as db:
        db.add(paths, classes, vectors)
    return {"name": "tiny", "paths": paths, "classes": classes}


@pytest.mark.slow
def test_tsne_map_keeps_classes_apart_and_draws_both_panels(clustered_db, tmp_path, capsys):
    from cbir.tsne import tsne_of_database

    with Database.open("tiny") as db:
        result = tsne_of_database(db, tmp_path / "direct.png", perplexity=30, seed=0)
    # On well-separated classes the map must show them apart: each point's nearest point is of its class.
    points = result.points
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.argmin(1)
    agreement = np.mean([result.classes[i] == result.classes[j] for i, j in enumerate(nearest)])
    assert agreement >= 0.95
    assert result.perplexity < 30  # lowered below the number of points, and said so
    assert any("perplexity lowered" in note for note in result.notes)

    one_panel = tmp_path / "classes.png"
    assert run(tsne_cli.main, ["--db_name", "tiny", "--out", str(one_panel)]) == 0
    single = assert_figure(one_panel, 600, 400)

    labels = tmp_path / "clusters.json"
    # Clusters for all but four images: those are drawn as "no label".
    labels.write_text(json.dumps({p: i % 3 for i, p in enumerate(clustered_db["paths"][:-4])}))
    two_panels = tmp_path / "both.png"
    assert run(tsne_cli.main, ["--db_name", "tiny", "--out", str(two_panels), "--cluster_labels", str(labels),
                               "--max_points", "40"]) == 0
    both = assert_figure(two_panels, 1000, 400)
    assert both.shape[1] > 1.6 * single.shape[1]  # a second panel, as wide as the first
    out = capsys.readouterr().out
    assert "t-SNE of 40 vectors (a class-balanced sample of 48)" in out
    assert "4 classes" in out


def test_tsne_balanced_sample_keeps_every_class():
    from cbir.tsne import balanced_sample

    classes = ["big"] * 1000 + ["small"] * 5
    keep = balanced_sample(classes, 50, seed=0)
    kept = [classes[i] for i in keep]
    assert len(keep) == 50 and kept.count("small") == 5


def test_tsne_user_errors_are_one_line(clustered_db, tmp_path, capsys):
    assert run(tsne_cli.main, ["--db_name", "missing_db", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "missing_db" in err
    assert run(tsne_cli.main, ["--db_name", "tiny", "--out", str(tmp_path / "x.png"),
                               "--cluster_labels", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"/elsewhere/a.png": 1}))
    assert run(tsne_cli.main, ["--db_name", "tiny", "--out", str(tmp_path / "x.png"),
                               "--cluster_labels", str(foreign)]) == 2
    assert "none of the database's images" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------- data set

FIGURES = ("samples_grid.png", "images_per_class.png", "images_per_split.png", "image_sizes.png",
           "pixel_stats.png", "augmentation_preview.png")


@pytest.mark.slow
def test_visualize_split_folders(synthetic_data, tmp_path, capsys):
    root = synthetic_data["train"].parent
    out = tmp_path / "data_visualization" / "synthetic"
    code = run(visualize_cli.main, ["--path", str(root), "--out", str(out), "--input_size", "64",
                                    "--augment_images", "2", "--augment_views", "3"])
    assert code == 0
    for name in FIGURES:
        assert_figure(out / name)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["layout"] == "splits"
    assert list(stats["splits"]) == ["train", "index", "query"]  # the thesis's order, not alphabetical
    assert {s: v["images"] for s, v in stats["splits"].items()} == {"train": 48, "index": 24, "query": 12}
    assert stats["images"] == 84
    assert set(stats["classes"]) == {"texture_stripes", "texture_checker", "shapes_disc", "shapes_ring"}
    disc = stats["classes"]["shapes_disc"]
    assert disc["images"] == {"train": 12, "index": 6, "query": 3} and disc["project"] == "shapes"
    assert disc["size_wh"]["median"] == [48, 48]
    assert all(0 < v < 1 for v in disc["pixel_mean"]) and all(0 < v < 0.5 for v in disc["pixel_std"])
    with (out / "stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[0]["images_train"] == "12" and rows[0]["images_total"] == "21"
    assert "84 images of 4 classes (train 48, index 24, query 12)" in capsys.readouterr().out


@pytest.mark.slow
def test_visualize_single_class_folder_set(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder is data_visualization/<name> here
    code = run(visualize_cli.main, ["--path", str(synthetic_data["query"]), "--samples_per_class", "2",
                                    "--input_size", "48", "--augment_images", "1", "--augment_views", "2"])
    assert code == 0
    out = tmp_path / "data_visualization" / "query"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["layout"] == "single" and stats["images"] == 12
    for name in FIGURES:
        assert_figure(out / name, 200, 150)


def test_visualize_missing_folder_is_one_line(tmp_path, capsys):
    assert run(visualize_cli.main, ["--path", str(tmp_path / "nowhere"), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


# ------------------------------------------------------------------------------------------------- plots

@pytest.mark.slow
def test_retrieval_figure_frames_hits_green_and_misses_red_and_an_unlabelled_query_s_results_grey(tmp_path):
    rng = np.random.default_rng(0)
    query = make_image("shapes_disc", 64, rng)
    long_name = "umcm_colorectal_01_TUMOR_a_class_name_far_too_long_for_one_line"
    neighbours = [(make_image("shapes_disc", 64, rng), "shapes_disc", 0.12),
                  (make_image("shapes_ring", 64, rng), long_name, 0.43),
                  (make_image("shapes_disc", 64, rng), "shapes_disc", 0.5),
                  (make_image("texture_checker", 64, rng), "texture_checker", 0.71)]
    path = plot_retrieval(query, "shapes_disc", neighbours, tmp_path / "retrieval.png", title="query.png: 2/4")
    pixels = assert_figure(path, 600, 400)
    # Two hits and two misses: frames (and titles) of both colours.
    assert pixels_near(pixels, HIT_COLOUR) > 500
    assert pixels_near(pixels, MISS_COLOUR) > 500

    # A query without a class (a lone file outside any class folder): nothing is judged, every frame is grey.
    pixels = assert_figure(plot_retrieval(query, "", neighbours, tmp_path / "unlabelled.png"), 600, 400)
    assert pixels_near(pixels, HIT_COLOUR) < 50 and pixels_near(pixels, MISS_COLOUR) < 50
    assert pixels_near(pixels, UNJUDGED_COLOUR) > 1000


def test_long_class_names_wrap_on_underscores():
    text = wrap_name("umcm_colorectal_01_TUMOR_a_class_name_far_too_long", 20)
    lines = text.split("\n")
    assert all(len(line) <= 20 for line in lines) and len(lines) <= 3
    assert lines[0] == "umcm_colorectal_01_"
    assert wrap_name("pbc_basophil", 20) == "pbc_basophil"


@pytest.mark.slow
def test_loss_curve_with_and_without_validation(tmp_path):
    history = [{"epoch": e, "loss": 1.0 / e, "val_top1": v} for e, v in ((1, 0.5), (2, 0.8), (3, 0.7))]
    assert_figure(plot_loss_curve(history, tmp_path / "curve.png"), 500, 300)
    single = [{"epoch": 1, "loss": 0.25, "val_top1": None}]
    assert_figure(plot_loss_curve(single, tmp_path / "one.png"), 500, 300)


@pytest.mark.slow
def test_visualize_skips_unreadable_images_and_says_so(mixed_folder, tmp_path, capsys):
    out = tmp_path / "mixed_figures"
    assert run(visualize_cli.main, ["--path", str(mixed_folder["root"]), "--out", str(out), "--input_size", "32",
                                    "--augment_images", "1", "--augment_views", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 8  # counts cover every image file, readable or not
    assert {p.rsplit("/", 1)[-1] for p in stats["unreadable"]} == mixed_folder["unreadable"]
    assert stats["sampled_images"] == len(mixed_folder["readable"])
    assert "3 unreadable images skipped" in capsys.readouterr().out
    assert_figure(out / "pixel_stats.png")
