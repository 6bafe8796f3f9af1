"""The generalisation benchmark: re-splits that never leak an image, colour shifts that keep it, reports of runs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("generalisation", ROOT / "benchmarks" / "generalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resplit_parts_are_disjoint_sized_per_class_and_follow_the_seed(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 9), ("index", 4), ("query", 3)):
        for name in ("proj_a", "proj_b"):
            for i in range(count):
                path = tmp_path / split / name / f"{split}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    bench = _benchmark()
    sizes = dict(query=3, index=5, val=2, train=4, small=2)
    parts = bench.resplit(tmp_path, 7, **sizes)
    for part, per_class in sizes.items():
        classes = [name for _, name in parts[part]]
        assert classes.count("proj_a") == classes.count("proj_b") == per_class, part
    held_out = [p for part in ("query", "index", "val") for p, _ in parts[part]]
    assert len(set(held_out)) == len(held_out) == 20  # no image in two of them
    assert not set(held_out) & {p for p, _ in parts["train"]}
    assert {p for p, _ in parts["small"]} <= {p for p, _ in parts["train"]}
    assert bench.resplit(tmp_path, 7, **sizes) == parts and bench.resplit(tmp_path, 8, **sizes) != parts


def test_colour_shifts_change_the_colours_not_the_picture():
    bench = _benchmark()
    tissue = Image.fromarray(np.random.default_rng(1).integers(60, 230, (24, 24, 3), dtype=np.uint8))
    original = np.asarray(tissue, dtype=float)
    for kind in bench.COLOUR_SHIFTS:
        shifted = np.asarray(bench.colour_shift(tissue, kind, np.random.default_rng(3)), dtype=float)
        assert shifted.shape == original.shape
        assert np.abs(shifted - original).mean() > 2  # visibly another stain or scanner
        # the structure stays: pixel intensities keep their order almost everywhere
        assert np.corrcoef(shifted.mean(axis=2).ravel(), original.mean(axis=2).ravel())[0, 1] > 0.8


def test_a_report_tabulates_the_kept_runs_with_their_own_flags_and_never_writes_an_empty_table(tmp_path):
    bench = _benchmark()
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "recipe").mkdir(parents=True)
    runs = [{"regime": "folds", "seed": seed, "class_top1": top1, "class_top5": 0.9, "class_maj": 0.6, "map_at_r": 0.3,
             "train_args": "--lr 2e-4", "parts": "20-20-20-20-10"} for seed, top1 in ((0, 0.6), (1, 0.7))]
    (work / "recipe" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    args = ["--name", "recipe", "--report", "--work", str(work), "--results", str(results)]
    # Without --train_args the report takes the runs' own flags: the table is theirs, not an empty one.
    bench.main(args)
    table = (results / "generalisation.md").read_text()
    assert "### recipe: `cbir-train --model effnet --loss margin --lr 2e-4 --input_size 128`" in table
    assert "| folds | 2 | 0.650 ± 0.071 |" in table
    # Flags no kept run was trained with: one line, and the table already written stays.
    with pytest.raises(SystemExit, match="no finished runs of recipe"):
        bench.main(args + ["--train_args", "--lr 1e-3"])
    assert (results / "generalisation.md").read_text() == table
