"""The real sample the demo runs on: shipped in the package, small, readable, and with no image in two splits."""

from __future__ import annotations

from pathlib import Path

from cbir.cli.demo import QUERY_CLASS, SAMPLE
from cbir.data import list_samples, load_image

CLASSES = ["pbc_basophil", "pbc_eosinophil", "pbc_erythroblast", "pbc_ig", "pbc_lymphocyte", "pbc_monocyte",
           "pbc_neutrophil", "pbc_platelet"]


def test_the_demo_sample_is_a_small_real_class_folder_set_with_disjoint_splits():
    splits = {split: list_samples(SAMPLE / split) for split in ("train", "index", "query")}
    for split, per_class in (("train", 8), ("index", 6), ("query", 3)):
        classes = [s.class_name for s in splits[split]]
        assert sorted(set(classes)) == CLASSES and all(classes.count(c) == per_class for c in CLASSES), split
    names = [{s.path.rsplit("/", 1)[-1] for s in samples} for samples in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    sizes = []
    for sample in (s for samples in splits.values() for s in samples):
        image = load_image(sample.path)
        assert max(image.size) == 128 and min(image.size) >= 100
        sizes.append(Path(sample.path).stat().st_size)
    assert sum(sizes) < 600_000  # "a few hundred KB"
    assert any(s.class_name == QUERY_CLASS for s in splits["query"])
    assert (SAMPLE.parent / "README.md").read_text().count("CC BY 4.0") >= 1
