"""Image folders → samples; one image loader; one transform builder; the class-balanced sampler.

A data set is ``root/<class>/<image>``. Every image, whatever its format or mode (RGBA, palette, grayscale,
16-bit TIFF), is loaded as 8-bit RGB by :func:`load_image`. A file that cannot be decoded is never fatal: the
datasets return ``None`` for it and :func:`collate_skipping` drops it, so long runs skip and report.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from cbir.errors import CbirError
# Re-exported: the torch-free part lives in cbir.images.
from cbir.images import (IMAGE_EXTENSIONS, Sample, UnreadableImage, is_image_file, list_images,  # noqa: F401
                         list_samples, load_image)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, train: bool = False):
    """The one preprocessing pipeline: the extractor's own size and normalisation, plus augmentation in training.

    Autoencoders pass ``mean=(0,0,0), std=(1,1,1)`` so inputs and targets stay in [0, 1].
    """
    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if train:
        return transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=(0.7, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ColorJitter(saturation=0.2, hue=0.1),
            *normalise,
        ])
    return transforms.Compose([transforms.Resize((input_size, input_size)), *normalise])


class ImageDataset(Dataset):
    """(tensor, label, index) per sample; ``None`` for an unreadable file, which the collate function drops."""

    def __init__(self, samples: list[Sample], transform, class_to_idx: dict[str, int] | None = None):
        self.samples = samples
        self.transform = transform
        self.class_to_idx = class_to_idx or {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The image of sample ``index``, or ``None`` (warned, and later counted) when it cannot be read."""
        try:
            return load_image(self.samples[index].path)
        except UnreadableImage as exc:
            log.warning("skipping %s", exc)
            return None

    def label(self, index: int) -> int:
        return self.class_to_idx.get(self.samples[index].class_name, -1)

    def __getitem__(self, index: int):
        image = self.load(index)
        return None if image is None else (self.transform(image), self.label(index), index)


def collate_skipping(batch):
    """Stack the readable samples of a batch; report the indices of the others as a list."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    images, labels, indices = zip(*kept)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


class ClassBalancedBatches(torch.utils.data.Sampler):
    """Batches of ``batch_size // per_class`` classes with ``per_class`` images each, for metric learning.

    PML's MPerClassSampler does the same from numpy's global random state; this one draws from a generator seeded
    by (seed, epoch), so a resumed run sees exactly the batches an unbroken one would.
    """

    def __init__(self, labels: list[int], batch_size: int, per_class: int, seed: int = 0):
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise CbirError("metric learning needs at least two classes in the training data")
        if batch_size < 2 * per_class or batch_size % per_class:
            raise CbirError(f"--batch_size {batch_size} must be a multiple of the images per class ({per_class}) "
                            f"and hold at least two classes (>= {2 * per_class})")
        self.by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
        small = [c for c, members in self.by_class.items() if len(members) < 2]
        if small:
            raise CbirError(f"{len(small)} class(es) hold a single image; metric learning needs at least two per class")
        self.classes_per_batch = min(batch_size // per_class, len(classes))
        self.per_class = per_class
        self.num_batches = max(1, len(labels) // (self.classes_per_batch * per_class))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        classes = list(self.by_class)
        for _ in range(self.num_batches):
            batch = []
            for c in torch.randperm(len(classes), generator=generator)[: self.classes_per_batch].tolist():
                members = self.by_class[classes[c]]
                # With replacement only when a class is smaller than per_class.
                if len(members) >= self.per_class:
                    picks = torch.randperm(len(members), generator=generator)[: self.per_class]
                else:
                    picks = torch.randint(len(members), (self.per_class,), generator=generator)
                batch.extend(members[i] for i in picks.tolist())
            yield batch
