"""cbir.evaluation against numbers worked out by hand.

The fake database holds known 2-d vectors: query j sits at (100 j, 0) and its neighbours at (100 j, 1), (100 j, 2),
... so an exact nearest-neighbour search (numpy, below) returns them in that order, and each query's first five
result classes are the lists in TABLE. Every expected number in these tests is read off that table by hand.
"""

import json
import math

import numpy as np
import openpyxl
import pandas as pd
import pytest
from PIL import Image

from cbir.evaluation import (
    HEADLINE_KEYS,
    MEASURES,
    EvalReport,
    confusion_counts,
    dominant_classes,
    evaluate,
    plot_confusion_matrices,
    select_queries,
    write_excel_sheet,
)
from cbir.errors import CbirError
from cbir.labels import LevelMaps, project_of

A, B, C, D = "alpha_a", "alpha_b", "beta_0", "gamma_1"   # projects: alpha (A, B), beta (C), gamma (D)
MAPS = LevelMaps(similar={frozenset(("beta", "gamma"))})

# query class, then the classes of its neighbours, nearest first
TABLE = [
    (A, [A, A, A, B, C]),   # q0
    (A, [B, A, C, C, D]),   # q1
    (A, [C, D, C, D, B]),   # q2
    (B, [B, B, A, A, C]),   # q3
    (C, [D, D, C, D, A]),   # q4
    (C, [C, C, C, C, C]),   # q5
    (D, [C, A, A, B, D]),   # q6
]
# By hand, per query: class / project / similar x top1 / top5 / maj, then mMV@5.
#  q0: class hits at 1,2,3; A,A,A,B all alpha; mMV A.
#  q1: class hit at 2 only; project hits B,A (2 of 5); C, D not similar to alpha; mMV C (2 votes).
#  q2: no class hit; project hit B at rank 5; mMV tie C/D (2 each) -> C, ranked first.
#  q3: class hits B,B (2); project B,B,A,A (4); mMV tie B/A -> B, ranked first.
#  q4: class hit C at 3; project the same; similar D,D,C,D (gamma ~ beta, 4 of 5); mMV D.
#  q5: all hits.
#  q6: class hit D at 5; project the same; similar C (beta ~ gamma) at 1 and D at 5 (2 of 5); mMV A (2 votes).
HAND_ROWS = [
    # c1 c5 cm  p1 p5 pm  s1 s5 sm  mmv
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 0, 1, 1, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 1, 0, 0],
    [1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 0, 0, 1, 0, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 0, 0, 1, 0, 1, 1, 0, 0],
]
HAND = {key: [row[j] for row in HAND_ROWS] for j, key in enumerate(list(HEADLINE_KEYS) + ["mmv5"])}
HAND_PRECISION = [3 / 5, 1 / 5, 0, 2 / 5, 1 / 5, 5 / 5, 1 / 5]
HAND_AP = [1, 1 / 2, 0, 1, 1 / 3, 1, 1 / 5]        # mean of precision at each hit, over the hits in the first five
HAND_TOP1_CLASS = [A, B, C, B, D, C, C]
HAND_MAJORITY_CLASS = [A, C, C, B, D, C, A]


class FakeDatabase:
    """Known vectors and an exact L2 nearest-neighbour search, with the call shape evaluate expects."""

    def __init__(self, table, *, queries_in_db=False):
        vectors, self.paths, self.classes = [], [], []
        self.query_vectors, self.query_paths, self.query_classes = {}, [], []
        for j, entry in enumerate(table):
            query_class, neighbours = entry[0], entry[1]
            query_name = entry[2] if len(entry) > 2 else f"q{j}.png"
            centre = np.array([100.0 * j, 0.0])
            query_path = f"/data/query/{query_class}/{query_name}"
            self.query_vectors[query_path] = centre
            self.query_paths.append(query_path)
            self.query_classes.append(query_class)
            for rank, neighbour in enumerate(neighbours, start=1):
                cls, name = neighbour if isinstance(neighbour, tuple) else (neighbour, f"q{j}_n{rank}.png")
                vectors.append(centre + [0.0, float(rank)])
                self.paths.append(f"/data/index/{cls}/{name}")
                self.classes.append(cls)
            if queries_in_db:
                vectors.append(centre)
                self.paths.append(query_path)
                self.classes.append(query_class)
        self.vectors = np.array(vectors)
        self.batches = []

    def class_counts(self):
        return {c: self.classes.count(c) for c in set(self.classes)}

    def search_fn(self, n_results=6):
        def search(paths):
            self.batches.append(len(paths))
            queries = np.stack([self.query_vectors[p] for p in paths])
            distances = ((queries[:, None, :] - self.vectors[None, :, :]) ** 2).sum(axis=-1)
            order = np.argsort(distances, axis=1, kind="stable")[:, :n_results]
            timings = {"model": 0.1 * len(paths), "transfer": 0.01, "search": 0.02}
            return ([[self.paths[i] for i in row] for row in order],
                    [[self.classes[i] for i in row] for row in order], timings)
        return search


def run(table=TABLE, *, queries_in_db=False, n_results=6, **kwargs):
    database = FakeDatabase(table, queries_in_db=queries_in_db)
    kwargs.setdefault("maps", MAPS)
    report = evaluate(database.query_paths, database.query_classes, database.search_fn(n_results), **kwargs)
    return report, database


def hand_mean(key, indices=range(len(TABLE))):
    return float(np.mean([HAND[key][i] for i in indices]))


# ---------------------------------------------------------------------------------------------- levels

@pytest.mark.parametrize("name, project", [
    ("camelyon16_0", "camelyon16"),
    ("umcm_colorectal_01_TUMOR", "umcm_colorectal"),
    ("pbc_basophil", "pbc"),
    ("lc25000_lung_aca", "lc25000_lung"),
    ("janowczyk6_0", "janowczyk6"),
    ("mitos2014", "mitos2014"),
])
def test_project_of_follows_the_thesis_rule(name, project):
    assert project_of(name) == project


def test_level_maps_from_files(tmp_path):
    projects_csv = tmp_path / "projects.csv"
    projects_csv.write_text("class,project\nodd-name,lymph\n\n# comment\nother_x,lymph\n")
    similar = tmp_path / "similar.txt"
    similar.write_text("mitos2014,tupac_mitosis\n# janowczyk\njanowczyk1, janowczyk6\n")
    maps = LevelMaps.from_files(projects_csv, similar, similar_pairs=["cells_no_aug,patterns_no_aug"])
    assert maps.project("odd-name") == "lymph"
    assert maps.project("other_x") == "lymph"
    assert maps.project("camelyon16_0") == "camelyon16"        # not in the CSV: the naming rule
    assert maps.is_similar("tupac_mitosis", "mitos2014")
    assert maps.is_similar("janowczyk6", "janowczyk1")
    assert maps.is_similar("patterns_no_aug", "cells_no_aug")
    assert maps.is_similar("pbc", "pbc")
    assert not maps.is_similar("mitos2014", "janowczyk1")
    bad = tmp_path / "bad.txt"
    bad.write_text("lonely\n")
    with pytest.raises(CbirError, match="bad.txt:1"):
        LevelMaps.from_files(similar_file=bad)
    with pytest.raises(CbirError, match="not found"):
        LevelMaps.from_files(projects_csv=tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------- protocols

def test_all_scores_the_three_levels():
    report, _ = run(measure="all")
    assert report.n_queries == 7
    # class 3/7, 6/7, 2/7; project 4/7, 7/7, 3/7; similar 6/7, 7/7, 4/7
    expected = {"class_top1": 3 / 7, "class_top5": 6 / 7, "class_maj": 2 / 7,
                "project_top1": 4 / 7, "project_top5": 1.0, "project_maj": 3 / 7,
                "similar_top1": 6 / 7, "similar_top5": 1.0, "similar_maj": 4 / 7}
    for key, value in expected.items():
        assert report.scores[key] == pytest.approx(value), key
        assert report.scores[key] == pytest.approx(hand_mean(key)), key


def test_mmv5_precision_and_map_at_k():
    report, _ = run(measure="all")
    assert report.scores["mmv5"] == pytest.approx(3 / 7)
    assert report.scores["precision_at_k"] == pytest.approx(13 / 35)
    assert report.scores["map_at_k"] == pytest.approx((1 + 0.5 + 0 + 1 + 1 / 3 + 1 + 0.2) / 7)
    # ties in the majority class go to the best-ranked of the tied classes (q2: C before D, q3: B before A)
    assert [q[2] for q in report.per_query] == HAND_TOP1_CLASS
    assert [q[3] for q in report.per_query] == HAND_MAJORITY_CLASS


def test_weighted_is_the_macro_average_over_classes():
    report, _ = run(measure="weighted")
    # class top-1 per class: A (1+0+0)/3, B 1, C (0+1)/2, D 0
    assert report.scores["class_top1"] == pytest.approx((1 / 3 + 1 + 1 / 2 + 0) / 4)
    # class top-5 per class: A 2/3, B 1, C 1, D 1
    assert report.scores["class_top5"] == pytest.approx((2 / 3 + 1 + 1 + 1) / 4)
    # similar maj per class: A 1/3, B 1, C 1, D 0
    assert report.scores["similar_maj"] == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)
    assert report.n_queries == 7


def test_remove_drops_the_dominant_class_by_default_and_says_so():
    # class sizes A 3, B 1, C 2, D 1: none above twice the median (1.5), so the largest, A, goes
    report, database = run(measure="remove")
    assert report.dropped_classes == [A]
    assert report.n_queries == 4 and sum(database.batches) == 4          # A's queries are not even searched
    assert report.scores["class_top1"] == pytest.approx(2 / 4)            # q3 1, q4 0, q5 1, q6 0
    assert report.scores["class_maj"] == pytest.approx(1 / 4)
    assert report.scores["similar_maj"] == pytest.approx(3 / 4)
    assert A in report.format()


def test_remove_takes_the_classes_to_drop():
    report, _ = run(measure="remove", remove_classes=[C])
    assert report.dropped_classes == [C]
    assert report.scores["class_top1"] == pytest.approx(2 / 5)            # q0 1, q1 0, q2 0, q3 1, q6 0
    assert report.scores["project_maj"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="none of the classes"):
        run(measure="remove", remove_classes=["no_such_class"])


def test_dominant_classes_rule():
    classes = ["big"] * 10 + ["a"] * 2 + ["b"] * 2 + ["c"] * 3       # median 2.5: only "big" holds more than 5
    assert dominant_classes(classes) == ["big"]
    assert dominant_classes(["x", "y", "y"]) == ["y"]                   # none above 2 x median: the largest
    assert dominant_classes(["a"] * 5 + ["b"] * 5 + ["c"] * 3) == ["a", "b"]   # ties at the largest size all go
    assert dominant_classes(["x", "y"]) == ["x"]                        # all equal: one, so remove != all


def test_project_and_class_restriction():
    report, _ = run(measure="all", project_name="alpha")
    assert report.n_queries == 4
    assert report.scores["class_top1"] == pytest.approx(2 / 4)           # q0..q3
    report, _ = run(measure="all", class_name=C)
    assert report.n_queries == 2
    assert report.scores["class_top1"] == pytest.approx(1 / 2)           # q4 0, q5 1
    assert report.scores["similar_maj"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query of class"):
        run(measure="all", class_name="nope_0")


def test_random_is_class_balanced_and_reproducible():
    classes = ["x_0"] * 5 + ["y_0"] * 3 + ["z_0"]
    # whole rounds of one per class until more than 4: round 1 gives 3, round 2 gives x and y -> 5
    picked = select_queries(classes, "random", seed=3, max_queries=4)
    assert len(picked) == 5 and len(set(picked)) == 5
    per_class = {c: sum(classes[i] == c for i in picked) for c in set(classes)}
    assert per_class == {"x_0": 2, "y_0": 2, "z_0": 1}
    assert select_queries(classes, "random", seed=3, max_queries=4) == picked
    assert len({tuple(select_queries(classes, "random", seed=s, max_queries=4)) for s in range(10)}) > 1
    # classes run out before the limit: every query
    assert select_queries(classes, "random", seed=0, max_queries=100) == list(range(9))


def test_random_report_and_per_query_timing_divisor():
    report, database = run(measure="random", max_queries=4, seed=1, batch_size=2)
    # A 3, B 1, C 2, D 1: round 1 gives 4 (not more than 4), round 2 gives one A and one C -> 6 of 7
    assert report.n_queries == 6 and report.n_searched == 6
    assert sum(database.batches) == 6 and database.batches == [2, 2, 2]
    chosen = select_queries(database.query_classes, "random", seed=1, max_queries=4, maps=MAPS)
    assert report.scores["class_top1"] == pytest.approx(hand_mean("class_top1", chosen))
    assert report.timings["model"] == pytest.approx(0.1 * 6)
    assert report.timings["transfer"] == pytest.approx(0.01 * 3)
    assert report.timings["search"] == pytest.approx(0.02 * 3)
    assert report.timings["per_query"] == pytest.approx(report.timings["total"] / 6)
    again, _ = run(measure="random", max_queries=4, seed=1)
    assert again.scores == report.scores


def test_all_timings_sum_over_batches():
    report, database = run(measure="all", batch_size=2)
    assert database.batches == [2, 2, 2, 1]
    assert report.timings["model"] == pytest.approx(0.7)
    assert report.timings["transfer"] == pytest.approx(0.04)
    assert report.timings["search"] == pytest.approx(0.08)
    assert report.timings["per_query"] == pytest.approx(report.timings["total"] / 7)
    assert report.timings["total"] > 0


def test_stat_reports_mean_and_std_over_seeded_samples():
    report, database = run(measure="stat", repeats=5, seed=10, max_queries=4)
    samples = [select_queries(database.query_classes, "random", seed=10 + r, max_queries=4, maps=MAPS)
               for r in range(5)]
    assert report.n_queries == 6
    for key in HEADLINE_KEYS:
        values = [hand_mean(key, sample) for sample in samples]
        assert report.scores[key] == pytest.approx(np.mean(values)), key
        assert report.std[key] == pytest.approx(np.std(values, ddof=1)), key
    # each query is searched once however many samples hold it
    assert sum(database.batches) == len(set().union(*samples))
    assert "±" in report.format()


def test_separated_gives_one_row_per_class():
    report, database = run(measure="separated")
    table = report.per_class
    assert list(table.index) == [A, B, C, D]
    assert database.batches == [3, 1, 2, 1]              # searched class by class
    assert table.loc[A, "class_top1"] == pytest.approx(1 / 3)
    assert table.loc[A, "class_top5"] == pytest.approx(2 / 3)
    assert table.loc[A, "project_top1"] == pytest.approx(2 / 3)
    assert table.loc[C, "similar_maj"] == pytest.approx(1.0)
    assert table.loc[D, "similar_top1"] == pytest.approx(1.0)
    assert table.loc[D, "class_top1"] == pytest.approx(0.0)
    assert list(table["n_queries"]) == [3, 1, 2, 1]
    for cls in table.index:
        assert table.loc[cls, "time_model"] == pytest.approx(0.1 * table.loc[cls, "n_queries"])
        assert table.loc[cls, "time_per_query"] == pytest.approx(
            table.loc[cls, "time_total"] / table.loc[cls, "n_queries"])
    for key in HEADLINE_KEYS:
        assert key in table.columns
    assert report.scores["class_top1"] == pytest.approx(3 / 7)


# ------------------------------------------------------------------------------------------ exclusions

def test_a_query_in_the_database_is_never_its_own_hit():
    report, database = run(measure="all", queries_in_db=True, n_results=6)
    top = database.search_fn(1)([database.query_paths[0]])[0][0][0]
    assert top == database.query_paths[0]                 # the search does return the query itself first
    for key in HEADLINE_KEYS:
        assert report.scores[key] == pytest.approx(hand_mean(key)), key
    assert report.scores["mmv5"] == pytest.approx(3 / 7)


SLIDE_TABLE = [(C, [(C, "s9_a.png"), (C, "s9_b.png"), (C, "s9_c.png"), (D, "s1_a.png"),
                    (C, "s2_a.png"), (D, "s3_a.png"), (A, "s4_a.png"), (B, "s5_a.png")], "s9_query.png")]


def test_exclude_same_ignores_results_of_the_query_slide():
    plain, _ = run(SLIDE_TABLE, n_results=8)
    # first five C C C D C: every class number is 1
    assert [plain.scores[k] for k in ("class_top1", "class_top5", "class_maj")] == [1.0, 1.0, 1.0]
    report, _ = run(SLIDE_TABLE, n_results=8, exclude_same=r"^(s\d+)_")
    # the three s9 tiles go; first five left: D C D A B
    assert [report.scores[k] for k in ("class_top1", "class_top5", "class_maj")] == [0.0, 1.0, 0.0]
    assert [report.scores[k] for k in ("similar_top1", "similar_top5", "similar_maj")] == [1.0, 1.0, 1.0]
    assert report.per_query[0][2] == D
    with pytest.raises(ValueError, match="group"):
        run(SLIDE_TABLE, exclude_same=r"^s\d+_")


def test_too_few_results_after_exclusion_is_noted():
    report, _ = run(SLIDE_TABLE, n_results=6, exclude_same=r"^(s\d+)_")
    # 6 asked, 3 excluded: D C D left; missing ranks are misses
    assert report.scores["class_maj"] == 0.0 and report.scores["similar_maj"] == 1.0
    assert any("fewer than 5" in note for note in report.notes)


# ------------------------------------------------------------------------------------------ beyond

MAPR_TABLE = [(A, [A, B, A, B, B, A])]


def test_map_at_r():
    # R = 3 items of A: first three A B A -> (1/1 + 2/3) / 3
    report, _ = run(MAPR_TABLE, n_results=7, db_class_counts={A: 3, B: 3})
    assert report.scores["map_at_r"] == pytest.approx(5 / 9)
    # the query itself in the database is one of its class's 4 items but not one of R
    report, _ = run(MAPR_TABLE, queries_in_db=True, n_results=7, db_class_counts={A: 4, B: 3})
    assert report.scores["map_at_r"] == pytest.approx(5 / 9)
    # not enough results returned for R = 10: skipped and said
    report, _ = run(MAPR_TABLE, n_results=7, db_class_counts={A: 10, B: 3})
    assert "map_at_r" not in report.scores
    assert any("MAP@R skipped" in note for note in report.notes)
    report, _ = run(MAPR_TABLE, n_results=7)
    assert "map_at_r" not in report.scores


def test_cluster_labels_score_and_divergence():
    database = FakeDatabase(TABLE)
    # cluster = project, so the cluster numbers equal the project ones
    labels = {p: project_of(c) for p, c in zip(database.paths + database.query_paths,
                                               database.classes + database.query_classes)}
    report = evaluate(database.query_paths, database.query_classes, database.search_fn(), maps=MAPS,
                      cluster_labels=labels)
    assert report.scores["cluster_top1"] == pytest.approx(4 / 7)
    assert report.scores["cluster_top5"] == pytest.approx(1.0)
    assert report.scores["cluster_maj"] == pytest.approx(3 / 7)
    # class top-1 and cluster top-1 differ only for q1 (class miss, project hit): one of A's three
    assert report.cluster_divergence == pytest.approx({A: 1 / 3, B: 0.0, C: 0.0, D: 0.0})


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    report, _ = run(measure="all", bootstrap=200, seed=4)
    again, _ = run(measure="all", bootstrap=200, seed=4)
    assert report.ci == again.ci
    for key in ("class_top1", "class_top5", "class_maj"):
        low, high = report.ci[key]
        assert 0.0 <= low <= report.scores[key] <= high <= 1.0
    low, high = report.ci["class_top1"]
    assert low < high
    weighted, _ = run(measure="weighted", bootstrap=50)
    assert weighted.ci["class_top5"][0] <= weighted.scores["class_top5"] <= weighted.ci["class_top5"][1]


def test_report_to_dict_and_format():
    report, _ = run(measure="separated", bootstrap=20)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["measure"] == "separated" and data["n_queries"] == 7
    assert set(HEADLINE_KEYS) <= set(data["scores"])
    assert data["per_class"][A]["n_queries"] == 3
    assert data["per_query"][2] == {"query_path": "/data/query/alpha_a/q2.png", "query_class": A,
                                    "top1_class": C, "majority_class": C}
    text = report.format()
    for word in ("class", "project", "similar", "top-1", "top-5", "maj", "per query", "0.429"):
        assert word in text
    assert isinstance(report, EvalReport)


def test_bad_measure_is_refused():
    assert "separated" in MEASURES
    with pytest.raises(ValueError, match="measure must be one of"):
        run(measure="best")


# -------------------------------------------------------------------------------------------- outputs

def test_write_excel_sheet_creates_then_appends(tmp_path):
    path = tmp_path / "excel_results" / "results.xlsx"
    first = pd.DataFrame({"class_top1": [0.5, 1.0]}, index=pd.Index([A, B], name="class"))
    write_excel_sheet(first, path, "resnet")
    write_excel_sheet(pd.DataFrame({"class_top1": [0.25]}, index=[C]), path, "densenet")
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["resnet", "densenet"]
    assert [c.value for c in book["resnet"]["A"]] == ["class", A, B]
    assert book["resnet"]["B2"].value == 0.5
    assert book["densenet"]["B2"].value == 0.25
    # the same name again replaces that sheet and keeps the other
    write_excel_sheet(pd.DataFrame({"class_top1": [0.75]}, index=[D]), path, "resnet")
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["resnet", "densenet"]
    assert book["resnet"]["A2"].value == D and book["resnet"]["B2"].value == 0.75
    assert book["densenet"]["B2"].value == 0.25
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.xlsx"]   # no temporary left
    with pytest.raises(ValueError, match="sheet name"):
        write_excel_sheet(first, path, "Sheet ?")


def test_separated_report_goes_to_excel(tmp_path):
    report, _ = run(measure="separated")
    path = tmp_path / "out.xlsx"
    write_excel_sheet(report.per_class, path, "fake")
    read = pd.read_excel(path, sheet_name="fake", index_col=0)
    assert list(read.index) == [A, B, C, D]
    assert read.loc[A, "class_top1"] == pytest.approx(1 / 3)


def test_confusion_counts_are_read_off_the_table():
    report, _ = run(measure="all")
    labels, counts = confusion_counts(report.per_query, column=2)
    assert labels == [A, B, C, D]
    expected = np.zeros((4, 4), dtype=int)
    for (query_class, _), first in zip(TABLE, HAND_TOP1_CLASS):
        expected[labels.index(query_class), labels.index(first)] += 1
    # by hand: alpha_a queries got A, B, C first; alpha_b got B; beta_0 got D and C; gamma_1 got C
    assert expected.tolist() == [[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]
    assert counts.tolist() == expected.tolist()
    labels, counts = confusion_counts(report.per_query, column=3)
    assert counts[labels.index(A)].tolist() == [1, 0, 2, 0]  # majority classes of q0, q1, q2: A, C, C
    # a query with no result counts under "(none)", the last column
    labels, counts = confusion_counts([("q.png", A, None, None), ("r.png", B, B, B)], column=2)
    assert labels == [A, B, "(none)"] and counts.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_confusion_matrices_are_drawn(tmp_path):
    report, _ = run(measure="all")
    written = plot_confusion_matrices(report.per_query, tmp_path / "cms")
    assert [p.name for p in written] == ["top1.png", "majority.png"]
    for path in written:
        with Image.open(path) as image:
            width, height = image.size
            assert width > 300 and height > 300
            image.verify()


def test_no_nan_leaks_into_scores():
    report, _ = run(measure="weighted")
    assert all(not math.isnan(v) for v in report.scores.values())
