"""The scorer against independent implementations on the same results: pytorch-metric-learning's
AccuracyCalculator (precision@1, MAP@R) and scikit-learn (average precision, confusion matrix).

Random vectors in a few clusters make a database and a query set; an exact search (numpy) answers evaluate(), and
the reference implementations see the same vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import average_precision_score, confusion_matrix

from cbir.evaluation import confusion_counts, evaluate

CLASSES = ["alpha_a", "alpha_b", "beta_c", "beta_d"]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(len(CLASSES), 16))
    # Overlapping clusters: neither perfect nor random retrieval, so every number is somewhere in between.
    db_labels = rng.integers(0, len(CLASSES), 120)
    query_labels = rng.integers(0, len(CLASSES), 40)
    db = (centres[db_labels] + 1.2 * rng.normal(size=(120, 16))).astype(np.float32)
    queries = (centres[query_labels] + 1.2 * rng.normal(size=(40, 16))).astype(np.float32)
    db_paths = [f"/db/{CLASSES[c]}/{i}.png" for i, c in enumerate(db_labels)]
    query_paths = [f"/q/{CLASSES[c]}/{i}.png" for i, c in enumerate(query_labels)]
    return db, db_labels, db_paths, queries, query_labels, query_paths


def exact_search(db, db_labels, db_paths, queries, query_paths, n_results):
    by_path = dict(zip(query_paths, queries))

    def search(paths):
        vectors = np.stack([by_path[p] for p in paths])
        distances = ((vectors[:, None, :] - db[None, :, :]) ** 2).sum(-1)
        order = np.argsort(distances, axis=1, kind="stable")[:, :n_results]
        paths = [[db_paths[i] for i in row] for row in order]
        return paths, [[CLASSES[db_labels[i]] for i in row] for row in order], {}

    return search


def test_precision_at_1_and_map_at_r_match_pytorch_metric_learning(problem):
    db, db_labels, db_paths, queries, query_labels, query_paths = problem
    counts = {CLASSES[c]: int(n) for c, n in zip(*np.unique(db_labels, return_counts=True))}
    search = exact_search(db, db_labels, db_paths, queries, query_paths, n_results=max(counts.values()) + 1)
    report = evaluate(query_paths, [CLASSES[c] for c in query_labels], search, measure="all", db_class_counts=counts)

    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    reference = calculator.get_accuracy(torch.from_numpy(queries), torch.from_numpy(query_labels),
                                        torch.from_numpy(db), torch.from_numpy(db_labels),
                                        ref_includes_query=False)
    assert 0.2 < report.scores["class_top1"] < 0.95  # a problem that discriminates
    assert report.scores["class_top1"] == pytest.approx(reference["precision_at_1"], abs=1e-6)
    assert report.scores["map_at_r"] == pytest.approx(reference["mean_average_precision_at_r"], abs=1e-6)


def test_map_at_k_and_confusion_matrix_match_scikit_learn(problem):
    db, db_labels, db_paths, queries, query_labels, query_paths = problem
    k = 5
    search = exact_search(db, db_labels, db_paths, queries, query_paths, n_results=k)
    query_classes = [CLASSES[c] for c in query_labels]
    report = evaluate(query_paths, query_classes, search, measure="all", k=k)

    _, result_classes, _ = search(query_paths)
    per_query = []
    for query_class, classes in zip(query_classes, result_classes):
        hits = np.array([c == query_class for c in classes])
        # Average precision over the first k results, ranked by a score falling with the rank; no hit scores 0.
        per_query.append(average_precision_score(hits, -np.arange(k)) if hits.any() else 0.0)
    assert report.scores["map_at_k"] == pytest.approx(float(np.mean(per_query)), abs=1e-9)

    labels, counts = confusion_counts(report.per_query, column=2)
    first = [classes[0] for classes in result_classes]
    assert counts.tolist() == confusion_matrix(query_classes, first, labels=labels).tolist()
    assert counts.sum() == len(query_paths) and np.trace(counts) / len(query_paths) == pytest.approx(
        report.scores["class_top1"])
