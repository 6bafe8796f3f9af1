"""--generalise class halves, and k-means clustering (library and cbir-kmeans) on vectors whose clusters are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from cbir.cli import kmeans as kmeans_cli
from cbir.cli.common import run
from cbir.data import Sample
from cbir.database import Database
from cbir.errors import CbirError
from cbir.kmeans import CENTROIDS_FILE, META_FILE, ClusterInput, fit_kmeans, parse_range, run_kmeans
from cbir.labels import (LABELS_FILE, classes_for, clusters_for, project_of, read_cluster_labels,
                         restrict_samples)

HISTO_BENCH = ["lc25000_lung_aca", "lc25000_lung_n", "lc25000_lung_scc", "pbc_basophil", "pbc_eosinophil",
               "pbc_erythroblast", "pbc_ig", "pbc_lymphocyte", "pbc_monocyte", "pbc_neutrophil", "pbc_platelet"]


# ------------------------------------------------------------------------------------------------- splits

def test_halves_are_reproducible_disjoint_and_cover_every_class():
    train = classes_for("train", HISTO_BENCH, 1, seed=3)
    test = classes_for("test", HISTO_BENCH, 1, seed=3)
    assert set(train).isdisjoint(test) and sorted(train + test) == HISTO_BENCH
    assert abs(len(train) - len(test)) <= 1
    # The same names in another order, repeated, give the same halves: train, index and query folders agree.
    shuffled = HISTO_BENCH[::-1] + HISTO_BENCH[:3]
    assert classes_for("train", shuffled, 1, seed=3) == train
    assert classes_for("test", shuffled, 1, seed=3) == test
    # The seed changes the draw.
    assert any(classes_for("train", HISTO_BENCH, 1, seed=s) != train for s in range(5))


def test_every_project_with_two_classes_is_on_both_sides():
    for seed in range(10):
        train = classes_for("train", HISTO_BENCH, 1, seed=seed)
        test = classes_for("test", HISTO_BENCH, 1, seed=seed)
        for project in ("pbc", "lc25000_lung"):
            assert any(project_of(c) == project for c in train), (seed, project)
            assert any(project_of(c) == project for c in test), (seed, project)
        # 8 pbc classes: exactly 4 on each side.
        assert sum(project_of(c) == "pbc" for c in train) == 4


def test_mode_2_swaps_the_halves_and_modes_0_and_3_keep_every_class():
    assert classes_for("train", HISTO_BENCH, 2) == classes_for("test", HISTO_BENCH, 1)
    assert classes_for("test", HISTO_BENCH, 2) == classes_for("train", HISTO_BENCH, 1)
    for mode in (0, 3):
        assert classes_for("train", HISTO_BENCH, mode) == classes_for("test", HISTO_BENCH, mode) == HISTO_BENCH


def test_single_class_projects_are_shared_out_evenly():
    names = [f"proj{i}_only" for i in range(7)]
    train, test = classes_for("train", names, 1), classes_for("test", names, 1)
    assert sorted(train + test) == names and {len(train), len(test)} == {3, 4}


def test_split_file_lists_the_train_classes(tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("class,comment\n# the train half\npbc_basophil,blood\n\nlc25000_lung_aca\nnot_in_data\n")
    train = classes_for("train", HISTO_BENCH, 1, split_file=str(split))
    assert train == ["lc25000_lung_aca", "pbc_basophil"]
    assert classes_for("test", HISTO_BENCH, 1, split_file=str(split)) == [c for c in HISTO_BENCH if c not in train]
    assert classes_for("test", HISTO_BENCH, 2, split_file=str(split)) == train
    samples = [Sample(f"/d/{c}/{i}.png", c) for c in HISTO_BENCH for i in range(2)]
    kept = restrict_samples(samples, "test", 2, split_file=str(split))
    assert [s.class_name for s in kept] == ["lc25000_lung_aca"] * 2 + ["pbc_basophil"] * 2


@pytest.mark.parametrize("call, message", [
    (lambda tmp: classes_for("train", HISTO_BENCH, 4), "generalise must be"),
    (lambda tmp: classes_for("valid", HISTO_BENCH, 1), "split must be"),
    (lambda tmp: classes_for("train", ["pbc_a"], 1), "only one class"),
    (lambda tmp: classes_for("train", HISTO_BENCH, 1, split_file=str(tmp / "missing.txt")), "does not exist"),
    (lambda tmp: classes_for("test", HISTO_BENCH, 1, split_file=str(_write(tmp / "all.txt", "\n".join(HISTO_BENCH)))),
     "leaves no index/query class"),
    (lambda tmp: classes_for("train", HISTO_BENCH, 1, split_file=str(_write(tmp / "empty.txt", "# nothing\n"))),
     "names no class"),
])
def test_bad_modes_and_files_are_one_line_errors(tmp_path, call, message):
    with pytest.raises(CbirError, match=message) as error:
        call(tmp_path)
    assert "\n" not in str(error.value)


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------- k-means

def blobs(n_per: int = 30, centres: int = 3, dim: int = 16, seed: int = 0, spread: float = 0.05):
    """Tight, far-apart groups of vectors: the clusters any k-means must find."""
    rng = np.random.default_rng(seed)
    means = np.eye(centres, dim) * 4.0
    truth = np.repeat(np.arange(centres), n_per)
    data = means[truth] + rng.normal(0, spread, (len(truth), dim))
    return data.astype(np.float32), truth


def vector_input(data, truth, prefix="img", fingerprint="abc"):
    return ClusterInput(paths=[f"/data/{prefix}_{i:03d}.png" for i in range(len(data))],
                        classes=[f"proj_c{t}" for t in truth], data=data, kind="embeddings",
                        extractor={"name": "effnet", "fingerprint": fingerprint})


def test_kmeans_recovers_clear_clusters():
    data, truth = blobs()
    centroids, labels, inertia = fit_kmeans(data, 3, seed=1)
    assert centroids.shape == (3, 16)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    # Inertia of the true grouping: n * dim * spread^2 on average.
    assert inertia == pytest.approx(len(data) * 16 * 0.05 ** 2, rel=0.3)


def test_run_writes_model_labels_and_plots_that_read_back(tmp_path):
    data, truth = blobs()
    out = tmp_path / "km"
    done = run_kmeans(vector_input(data, truth), out, n_clusters=3, elbow_range="2:6", seed=0)
    labels = read_cluster_labels(out / LABELS_FILE)
    assert labels == done.labels and len(labels) == len(data)
    assert read_cluster_labels(out) == labels  # the folder names its labels file
    assert clusters_for(["/data/../data/img_000.png", "/data/img_001.png", "/elsewhere.png"], labels) == [
        labels["/data/img_000.png"], labels["/data/img_001.png"], None]
    assert adjusted_rand_score(truth, [labels[f"/data/img_{i:03d}.png"] for i in range(len(data))]) == pytest.approx(1)
    assert done.agreement["adjusted_rand"] == pytest.approx(1.0) and done.agreement["purity"] == 1.0
    # The sweep says what a user reads off the plots: the silhouette peaks at the true k.
    sweep = {row["k"]: row for row in done.sweep}
    assert sorted(sweep) == [2, 3, 4, 5, 6]
    assert max(sweep, key=lambda k: sweep[k]["silhouette"]) == 3
    assert sweep[2]["inertia"] > 10 * sweep[3]["inertia"]
    for name in ("elbow.png", "silhouette.png"):
        with Image.open(out / name) as figure:
            figure.verify()
            assert figure.format == "PNG" and figure.size[0] >= 300
    # The model is a plain array and a JSON file: loading executes nothing.
    centres = np.load(out / CENTROIDS_FILE, allow_pickle=False)
    meta = json.loads((out / META_FILE).read_text())
    assert centres.shape == (3, 16) and meta["n_clusters"] == 3 and meta["input"] == "embeddings"
    assert meta["extractor"]["fingerprint"] == "abc" and 0.9 < meta["silhouette"] <= 1
    assert "k=3" in done.format() and "adjusted Rand index 1.000" in done.format()


def test_load_partial_reuses_the_model_and_complete_reuses_everything(tmp_path):
    data, truth = blobs()
    out = tmp_path / "km"
    first = run_kmeans(vector_input(data, truth), out, n_clusters=3, elbow_range="none")
    assert not (out / "elbow.png").exists()
    model_bytes = (out / CENTROIDS_FILE).read_bytes()
    # New images of the same groups: labelled with the saved centres, not a new fit.
    new, new_truth = blobs(n_per=5, seed=7)
    partial = run_kmeans(vector_input(new, new_truth, prefix="query"), out, n_clusters=3, load="partial")
    assert (out / CENTROIDS_FILE).read_bytes() == model_bytes
    cluster_of_group = {t: first.labels[f"/data/img_{i:03d}.png"] for i, t in enumerate(truth)}
    saved = read_cluster_labels(out / LABELS_FILE)
    assert len(saved) == len(data) + len(new)  # merged: the earlier labels are kept
    assert all(saved[f"/data/query_{i:03d}.png"] == cluster_of_group[t] for i, t in enumerate(new_truth))
    assert partial.n_labelled == len(new)
    # complete: nothing is fitted or labelled anew.
    complete = run_kmeans(None, out, load="complete")
    assert complete.labels == saved and np.array_equal(complete.model.centroids, np.load(out / CENTROIDS_FILE))


def test_partial_refuses_data_the_model_was_not_made_for(tmp_path):
    data, truth = blobs()
    out = tmp_path / "km"
    run_kmeans(vector_input(data, truth), out, n_clusters=3, elbow_range=None)
    with pytest.raises(CbirError, match="another extractor"):
        run_kmeans(vector_input(data, truth, fingerprint="other"), out, load="partial")
    wider = vector_input(np.zeros((4, 32), np.float32), [0, 0, 1, 1])
    with pytest.raises(CbirError, match="16 values"):
        run_kmeans(wider, out, load="partial")
    pixels = vector_input(data, truth)
    pixels.kind, pixels.pixel_size = "pixels", 16
    with pytest.raises(CbirError, match="clusters embeddings"):
        run_kmeans(pixels, out, load="partial")
    with pytest.raises(CbirError, match="no saved k-means model"):
        run_kmeans(None, tmp_path / "nothing", load="complete")


def test_bad_label_files_and_ranges_are_one_line_errors(tmp_path):
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "float.json").write_text('{"a.png": 1.5}')
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, message in (("missing.json", "does not exist"), ("text.json", "not JSON"),
                          ("float.json", "not an integer"), ("list.json", "expected a JSON object")):
        with pytest.raises(CbirError, match=message):
            read_cluster_labels(tmp_path / name)
    assert parse_range("2:8:3", 100) == [2, 5, 8] and parse_range("3,2,50", 10) == [2, 3]
    assert parse_range("none", 10) == []
    for text in ("1:4", "a:b", "5:"):
        with pytest.raises(CbirError, match="elbow_range"):
            parse_range(text, 10)


def test_cli_clusters_a_database_then_labels_new_pixels(tmp_path, private_home, synthetic_data, capsys):
    data, truth = blobs(n_per=10)
    paths = [f"/data/db_{i:03d}.png" for i in range(len(data))]
    with Database.open("vecs", home=private_home, create=True) as db:
        db.set_extractor({"name": "effnet", "num_features": 16, "fingerprint": "f00"})
        db.add(paths, [f"proj_c{t}" for t in truth], data)
    out = tmp_path / "db_km"
    assert run(kmeans_cli.main, ["--db_name", "vecs", "--n_clusters", "3", "--elbow_range", "2:4",
                                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 clusters on embeddings" in printed and "adjusted Rand index 1.000" in printed
    labels = read_cluster_labels(out / LABELS_FILE)
    assert sorted(labels) == paths  # keyed by the database's paths, as a search returns them
    assert adjusted_rand_score(truth, [labels[p] for p in paths]) == pytest.approx(1.0)
    assert json.loads((out / META_FILE).read_text())["extractor"]["fingerprint"] == "f00"

    # Raw pixels, as the thesis did (small for speed), then the query folder labelled with the saved model.
    pix = tmp_path / "pix_km"
    assert run(kmeans_cli.main, ["--path", str(synthetic_data["index"]), "--pixels", "--pixel_size", "16",
                                 "--n_clusters", "4", "--elbow_range", "none", "--out", str(pix)]) == 0
    assert len(read_cluster_labels(pix)) == 24
    assert json.loads((pix / META_FILE).read_text())["pixel_size"] == 16
    assert run(kmeans_cli.main, ["--path", str(synthetic_data["query"]), "--pixels", "--pixel_size", "16",
                                 "--load", "partial", "--out", str(pix)]) == 0
    labels = read_cluster_labels(pix)
    assert len(labels) == 36 and set(labels.values()) <= {0, 1, 2, 3}
    capsys.readouterr()
    assert run(kmeans_cli.main, ["--path", str(synthetic_data["query"]), "--pixels", "--pixel_size", "8",
                                 "--load", "partial", "--out", str(pix)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "--pixel_size 16" in error and error.count("\n") == 1
    assert run(kmeans_cli.main, ["--load", "complete", "--out", str(pix)]) == 0
    assert "36 images" in capsys.readouterr().out


def test_split_rule_is_pinned_for_seed_0():
    # The default halves of a fixed name list never change between releases: scripts and reports cite them.
    assert classes_for("train", HISTO_BENCH, 1) == ["lc25000_lung_aca", "lc25000_lung_n", "pbc_eosinophil",
                                                    "pbc_monocyte", "pbc_neutrophil", "pbc_platelet"]
    assert classes_for("test", HISTO_BENCH, 1) == ["lc25000_lung_scc", "pbc_basophil", "pbc_erythroblast", "pbc_ig",
                                                   "pbc_lymphocyte"]
