"""Shared fixtures: small synthetic images, a mixed bag of good and bad files, a private CBIR_HOME."""

from __future__ import annotations

import os

# Before torch starts OpenMP: idle threads sleep instead of spinning, which on a busy 2-core machine nearly
# tripled the suite's CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from PIL import Image

from cbir.synthetic import make_dataset

# Two cores: keep PyTorch from oversubscribing them when pytest runs beside DataLoader workers.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Every test gets its own database folder and never sees a user's external Redis URL."""
    monkeypatch.setenv("CBIR_HOME", str(tmp_path / "cbir_home"))
    monkeypatch.delenv("CBIR_REDIS_URL", raising=False)
    return tmp_path / "cbir_home"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """train / index / query splits of 4 classes in 2 projects, 48 px images."""
    return make_dataset(tmp_path_factory.mktemp("synthetic"), splits={"train": 12, "index": 6, "query": 3}, size=48)


@pytest.fixture
def mixed_folder(tmp_path):
    """One class folder holding every kind of file a user's collection can hold, readable or not."""
    folder = tmp_path / "mixed" / "mixed_class"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.jpg")
    jpeg = (folder / "good.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(folder / "sixteen.tif")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    return {
        "root": folder.parent,
        "readable": {"good.jpg", "sixteen.tif", "alpha.png", "gray.png", "palette.png"},
        "unreadable": {"corrupt.jpg", "empty.png", "text.png"},
    }
