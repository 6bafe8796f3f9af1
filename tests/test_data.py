from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbir.cli import train as train_cli
from cbir.data import (AUGMENTATIONS, DEFAULT_AUGMENTATION, ClassBalancedBatches, RandomRightAngle, RandomStain, ImageDataset, UnreadableImage, build_transform, collate_skipping,
                       list_samples, load_image)
from cbir.errors import CbirError


def test_every_readable_format_loads_as_8bit_rgb_and_the_rest_is_refused(mixed_folder):
    folder = mixed_folder["root"] / "mixed_class"
    for name in mixed_folder["readable"]:
        image = load_image(folder / name)
        assert image.mode == "RGB" and image.size[0] > 0
    # A 16-bit TIFF keeps its contrast instead of clipping to white.
    sixteen = np.asarray(load_image(folder / "sixteen.tif"))
    assert sixteen.min() < 30 and sixteen.max() > 225
    # Transparent pixels become white, not black.
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    transparent.save(folder.parent / "transparent.png")
    assert np.asarray(load_image(folder.parent / "transparent.png")).min() == 255
    for name in mixed_folder["unreadable"]:
        with pytest.raises(UnreadableImage, match=name):
            load_image(folder / name)


def test_dataset_skips_unreadable_files_in_a_batch(mixed_folder):
    samples = list_samples(mixed_folder["root"])
    assert {Path(s.path).name for s in samples} == mixed_folder["readable"] | mixed_folder["unreadable"]
    dataset = ImageDataset(samples, build_transform(32))
    images, labels, indices = collate_skipping([dataset[i] for i in range(len(dataset))])
    assert images.shape == (len(mixed_folder["readable"]), 3, 32, 32)
    assert {Path(samples[i].path).name for i in indices.tolist()} == mixed_folder["readable"]


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CbirError, match="does not exist"):
        list_samples(tmp_path / "nowhere")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(CbirError, match="no images"):
        list_samples(tmp_path / "empty")


def test_balanced_batches_hold_several_images_of_several_classes_and_are_reproducible():
    labels = [c for c in range(5) for _ in range(10)]
    sampler = ClassBalancedBatches(labels, batch_size=12, per_class=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        counts = np.bincount([labels[i] for i in batch], minlength=5)
        assert sorted(counts[counts > 0]) == [4, 4, 4]
    assert batches == list(ClassBalancedBatches(labels, batch_size=12, per_class=4, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_a_small_data_set_still_gets_the_minimum_number_of_batches_an_epoch():
    labels = [c for c in range(4) for _ in range(3)]  # twelve images: one batch of 3 classes × 4 images
    assert len(list(ClassBalancedBatches(labels, batch_size=12, per_class=4))) == 1
    sampler = ClassBalancedBatches(labels, batch_size=12, per_class=4, min_batches=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert len({tuple(b) for b in batches}) > 1  # new draws, not one batch repeated
    # a data set that fills more batches than the minimum keeps its own count
    assert len(ClassBalancedBatches([c for c in range(5) for _ in range(10)], 12, 4, min_batches=2)) == 4


@pytest.mark.parametrize("labels, batch_size, message", [
    ([0] * 10, 8, "at least two class folders"),
    ([0, 0, 1], 8, "single image"),
    ([0, 0, 1, 1], 6, "multiple"),
])
def test_sampler_refuses_what_metric_learning_cannot_use(labels, batch_size, message):
    with pytest.raises(CbirError, match=message):
        ClassBalancedBatches(labels, batch_size=batch_size, per_class=4)


def test_training_transform_augments_and_evaluation_transform_does_not():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    evaluation = build_transform(32)
    assert torch.equal(evaluation(image), evaluation(image))
    torch.manual_seed(0)
    training = build_transform(32, train=True)
    assert training(image).shape == (3, 32, 32)
    assert not torch.equal(training(image), training(image))


def test_rotations_augmentation_trains_on_all_eight_orientations_that_basic_halves():
    # a grey 3 x 3 pattern with no symmetry: each of its eight orientations is told apart after cropping and jitter
    pattern = np.array([[0, 40, 80], [120, 160, 200], [240, 20, 220]], dtype=float)
    image = Image.fromarray(np.kron(pattern, np.ones((20, 20))).astype(np.uint8)).convert("RGB")
    orientations = [np.rot90(p, k) for p in (pattern, pattern.T) for k in range(4)]

    def seen(augmentation: str) -> set[int]:
        transform = build_transform(60, (0, 0, 0), (1, 1, 1), train=True, augmentation=augmentation)
        found = set()
        for seed in range(80):
            torch.manual_seed(seed)
            blocks = transform(image)[0].reshape(3, 20, 3, 20)[:, 5:15, :, 5:15].mean((1, 3)).numpy() * 255
            found.add(int(np.argmin([np.abs(blocks - o).mean() for o in orientations])))
        return found

    assert seen("rotations") == set(range(8))  # every orientation --tta averages over
    basic = seen("basic")
    assert len(basic) == 4  # horizontal and vertical flips: half of them
    assert seen("stain") == seen("nohue") == basic  # colour changes differ, flips the same


def test_the_default_augmentation_keeps_every_hue_that_basic_turns():
    import colorsys

    eosin = Image.new("RGB", (40, 40), (200, 60, 90))

    def hues(augmentation: str) -> list[float]:
        transform = build_transform(32, (0, 0, 0), (1, 1, 1), train=True, augmentation=augmentation)
        found = []
        for seed in range(20):
            torch.manual_seed(seed)
            found.append(colorsys.rgb_to_hsv(*transform(eosin).mean((1, 2)).tolist())[0])
        return found

    original = colorsys.rgb_to_hsv(200 / 255, 60 / 255, 90 / 255)[0]
    assert DEFAULT_AUGMENTATION == "nohue"
    assert max(abs(h - original) for h in hues("nohue")) < 0.01  # saturation changes, never the hue
    assert max(min(abs(h - original), 1 - abs(h - original)) for h in hues("basic")) > 0.05  # up to ±0.1 of the circle


def test_histology_augmentation_turns_tissue_every_way_and_shifts_stains_within_bounds(monkeypatch):
    pixels = np.random.default_rng(1).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        seen.add(np.asarray(RandomRightAngle()(image)).tobytes())
    assert seen == {np.rot90(pixels, k).tobytes() for k in range(4)}  # all four right angles, nothing else

    tissue = torch.rand(3, 16, 16) * 0.8 + 0.1
    assert torch.allclose(RandomStain(scale=0, shift=0)(tissue), tissue, atol=1e-5)  # HED round trip is exact
    torch.manual_seed(0)
    stained = RandomStain(scale=0.1, shift=0.02)(tissue)
    assert stained.shape == tissue.shape and not torch.allclose(stained, tissue, atol=1e-3)
    assert (stained - tissue).abs().max() < 0.25  # another lab's staining, not another image

    histology = build_transform(32, train=True, augmentation="histology")
    torch.manual_seed(0)
    first = histology(image)
    torch.manual_seed(0)
    assert first.shape == (3, 32, 32) and torch.equal(first, histology(image))  # seeded, as training needs
    assert set(AUGMENTATIONS) >= {"basic", "histology", "stain"}
    monkeypatch.setenv("COLUMNS", "1000")  # one line a flag: argparse would break "right-angle" at its hyphen
    helped = train_cli.parser().format_help()
    assert all(recipe.__doc__ and f"{name} ({'default: ' if name == DEFAULT_AUGMENTATION else ''}{recipe.__doc__})"
               in helped
               for name, recipe in AUGMENTATIONS.items())  # cbir-train --help says what each one does
    with pytest.raises(CbirError, match="unknown augmentation 'jpeg'"):
        build_transform(32, train=True, augmentation="jpeg")
