"""The generalisation benchmark's data handling: re-splits that never leak an image, colour shifts that keep it."""

import importlib.util
from pathlib import Path

import numpy as np
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
