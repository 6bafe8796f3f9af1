"""The results workbook (cbir-results) and the experiment chain (scripts/run_experiments.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openpyxl
import pytest

from cbir.cli import results
from cbir.evaluation import read_rows
from cbir.cli.common import run
from cbir.evaluation import HEADLINE_KEYS, evaluate

REPO = Path(__file__).resolve().parents[1]


def eval_file(tmp_path: Path, name: str, measure: str, hits_per_class: dict[str, int]) -> tuple[Path, dict]:
    """A real cbir-eval --output file: evaluate() over a search that answers a known number of hits."""
    paths, classes = [], []
    for cls in hits_per_class:
        for i in range(4):
            paths.append(f"/q/{cls}/{i}.png")
            classes.append(cls)
    first_class = {p: (c if i < hits_per_class[c] else "other_x") for p, c, i in
                   zip(paths, classes, [i for _ in hits_per_class for i in range(4)])}

    def search(batch):
        answers = [[first_class[p]] + [classes[paths.index(p)]] * 4 for p in batch]
        return [[f"/db/{c}/{k}.png" for k, c in enumerate(a)] for a in answers], answers, {"model": 0.5, "search": 0.1}

    report = evaluate(paths, classes, search, measure=measure, seed=0).to_dict()
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path, report


def test_append_twice_gives_two_rows_with_the_right_numbers(tmp_path, capsys):
    random_1, r1 = eval_file(tmp_path, "r1.json", "random", {"pbc_a": 4, "pbc_b": 2})
    all_1, a1 = eval_file(tmp_path, "a1.json", "all", {"pbc_a": 3, "pbc_b": 1})
    all_2, a2 = eval_file(tmp_path, "a2.json", "all", {"pbc_a": 1, "pbc_b": 0})
    workbook = tmp_path / "excel_results" / "results.xlsx"
    assert run(results.main, ["append", "--workbook", str(workbook), "--run-name", "effnet_margin",
                              "--config-json", json.dumps({"model": "effnet", "loss": "margin", "epochs": 3}),
                              "--timing", "train_s=12.5", "--eval-json", f"random={random_1}", f"all={all_1}"]) == 0
    # The second run brings a hyper-parameter (lr) the first did not have, and only one protocol.
    assert run(results.main, ["append", "--workbook", str(workbook), "--run-name", "densenet_softmax",
                              "--param", "model=densenet", "--param", "loss=softmax", "--param", "lr=1e-4",
                              "--eval-json", str(all_2)]) == 0
    assert "row 4 of sheet 'runs'" in capsys.readouterr().out

    book = openpyxl.load_workbook(workbook)
    sheet = book["runs"]
    header = [c.value for c in sheet[2]]
    rows = [[c.value for c in row] for row in sheet.iter_rows(min_row=3)]
    assert len(rows) == 2
    first, second = (dict(zip(header, row)) for row in rows)  # names repeat per protocol: use read_rows for those
    assert first["run"] == "effnet_margin" and first["model"] == "effnet" and first["epochs"] == 3
    assert second["run"] == "densenet_softmax" and second["lr"] == pytest.approx(1e-4) and second["epochs"] is None
    # Group row: the hyper-parameters come before the protocols, random before all (thesis order).
    groups = [c.value for c in sheet[1] if c.value]
    assert groups == ["run", "hyper-parameters", "timings (s)", "random", "all"]

    columns, read = read_rows(workbook)
    assert read[0][("all", "class_top1")] == pytest.approx(a1["scores"]["class_top1"]) == pytest.approx(0.5)
    assert read[0][("random", "class_top1")] == pytest.approx(r1["scores"]["class_top1"]) == pytest.approx(0.75)
    assert read[1][("all", "class_top1")] == pytest.approx(0.125)
    for key in HEADLINE_KEYS:
        assert read[1][("all", key)] == pytest.approx(a2["scores"][key])
    assert read[1][("random", "class_top1")] is None
    assert read[0][("all", "time_per_query")] == pytest.approx(a1["timings"]["per_query"])
    assert read[0][("all", "n_queries")] == 8
    assert read[0][("timings (s)", "train_s")] == 12.5

    assert run(results.main, ["table", "--workbook", str(workbook), "--protocols", "all"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| run | model | loss | epochs | lr |") and "all: class top-1" in table[0]
    assert table[2].startswith("| effnet_margin | effnet | margin | 3 |") and "| 0.500 |" in table[2]
    assert table[3].startswith("| densenet_softmax | densenet | softmax |  | 0.0001 |") and "| 0.125 |" in table[3]


def test_append_replace_and_user_errors(tmp_path, capsys):
    all_1, _ = eval_file(tmp_path, "a1.json", "all", {"pbc_a": 3})
    workbook = tmp_path / "w.xlsx"
    for _ in range(2):
        assert run(results.main, ["append", "--workbook", str(workbook), "--run-name", "r", "--replace",
                                  "--eval-json", f"all={all_1}"]) == 0
    assert len(read_rows(workbook)[1]) == 1
    capsys.readouterr()
    for argv in (["append", "--workbook", str(workbook), "--run-name", "x", "--eval-json", "all=missing.json"],
                 ["append", "--workbook", str(tmp_path / "w.csv"), "--run-name", "x"],
                 ["append", "--workbook", str(workbook), "--run-name", "x", "--config-json", "{not json"],
                 ["table", "--workbook", str(tmp_path / "none.xlsx")]):
        assert run(results.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err


def script_env(**settings) -> dict:
    env = dict(os.environ)  # CBIR_HOME: the test's private database folder
    env.update({k: str(v) for k, v in settings.items()})
    env["OMP_NUM_THREADS"] = "1"  # two shared cores
    return env


def test_run_experiments_chain_writes_a_workbook_row(synthetic_data, tmp_path):
    data = synthetic_data["train"].parent
    env = script_env(DATA=data, MODELS="effnet", LOSSES="margin", EPOCHS=1, MAX_BATCHES=2, INPUT_SIZE=48,
                     BATCH_SIZE=16, NUM_WORKERS=0, PROTOCOLS="random separated")
    done = subprocess.run(["bash", str(REPO / "scripts" / "run_experiments.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workbook = tmp_path / "excel_results" / "results.xlsx"
    columns, rows = read_rows(workbook)
    assert len(rows) == 1
    row = rows[0]
    assert row[("run", "run")] == "effnet_margin_128f_1e"
    assert row[("hyper-parameters", "model")] == "effnet" and row[("hyper-parameters", "loss")] == "margin"
    assert row[("hyper-parameters", "epochs")] == 1 and row[("hyper-parameters", "input_size")] == 48
    report = json.loads((tmp_path / "experiments" / "effnet_margin_128f_1e" / "eval_random.json").read_text())
    for key in HEADLINE_KEYS:
        assert row[("random", key)] == pytest.approx(report["scores"][key])
        assert 0 <= row[("separated", key)] <= 1
    assert row[("random", "n_queries")] == 12 and row[("random", "time_total")] > 0
    assert row[("timings (s)", "train_s")] > 0 and row[("timings (s)", "index_s")] > 0
    # separated's per-class rows sit beside, in a sheet of the run's name; the runs sheet stays first.
    book = openpyxl.load_workbook(workbook)
    assert book.sheetnames[0] == "runs" and "effnet_margin_128f_1e" in book.sheetnames
    assert book["effnet_margin_128f_1e"].max_row == 5  # header + 4 classes
    assert "| effnet_margin_128f_1e | effnet | margin |" in done.stdout  # the closing Markdown table
    assert (tmp_path / "experiments" / "effnet_margin_128f_1e" / "extractor.loss.png").is_file()


def test_run_experiments_refuses_bad_settings(tmp_path):
    script = str(REPO / "scripts" / "run_experiments.sh")
    done = subprocess.run(["bash", script], cwd=tmp_path, env=script_env(DATA=""), capture_output=True, text=True)
    assert done.returncode == 2 and "set DATA=root" in done.stderr
    done = subprocess.run(["bash", script, f"DATA={tmp_path / 'nowhere'}"], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = subprocess.run(["bash", script, "--models"], cwd=tmp_path, env=script_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "VAR=value" in done.stderr
    done = subprocess.run(["bash", script, "--help"], cwd=tmp_path, env=script_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "MODELS" in done.stdout and "PROTOCOLS" in done.stdout


def test_results_module_runs_as_a_command(tmp_path):
    all_1, _ = eval_file(tmp_path, "a1.json", "all", {"pbc_a": 2})
    workbook = tmp_path / "w.xlsx"
    done = subprocess.run([sys.executable, "-m", "cbir.cli.results", "append", "--workbook", str(workbook),
                           "--run-name", "cli", "--eval-json", f"all={all_1}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "cbir.cli.results", "append", "--workbook", str(workbook),
                           "--run-name", "cli", "--eval-json", "all=nope.json"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
