"""Image folders → samples; one image loader; one transform builder; the training samplers and dataset.

A data set is ``root/<class>/<image>``. Every image, whatever its format or mode (RGBA, palette, grayscale,
16-bit TIFF), is loaded as 8-bit RGB by :func:`load_image`. A file that cannot be decoded is never fatal: the
datasets return ``None`` for it and :func:`collate_skipping` drops it, so long runs skip and report.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from cbir.errors import CbirError, ParameterError
# Re-exported: the torch-free part lives in cbir.images.
from cbir.images import (IMAGE_EXTENSIONS, Sample, UnreadableImage, is_image_file, list_images,  # noqa: F401
                         list_samples, load_image)

log = logging.getLogger(__name__)


def default_workers() -> int:
    """DataLoader worker processes beside a model: one core is left to the model; the workers only decode."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def decoding_threads() -> int:
    """Threads that only decode and resize (no model beside them): every core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomRightAngle:
    """Rotate by 0, 90, 180 or 270 degrees: tissue and cells have no up. With a flip, all eight orientations."""

    def __call__(self, image: Image.Image) -> Image.Image:
        turns = int(torch.randint(4, ()))
        return image.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                Image.Transpose.ROTATE_270)[turns]) if turns else image


# Haematoxylin, eosin and DAB optical densities of Ruifrok & Johnston (2001), the rows scikit-image's rgb2hed uses.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class RandomStain:
    """Stain augmentation in HED space (Tellez et al. 2018): each stain's amount scaled by 1 ± ``scale`` and shifted
    by ± ``shift`` optical density, as one lab's staining differs from another's. Takes and gives a [0, 1] tensor."""

    def __init__(self, scale: float = 0.1, shift: float = 0.02):
        self.scale, self.shift = scale, shift

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        # (3, pixels) throughout: the contiguous layout is some twenty times faster than (pixels, 3)
        density = _HED_FROM_RGB.T @ -torch.log(image.reshape(3, -1).clamp(min=1e-6))
        factor = 1 + (torch.rand(3, 1) * 2 - 1) * self.scale
        offset = (torch.rand(3, 1) * 2 - 1) * self.shift
        return torch.exp(-(_RGB_FROM_HED.T @ (density * factor + offset))).clamp(0, 1).reshape(image.shape)


def _crop_turn_jitter(input_size: int, turns: list, hue: float = 0.1) -> list:
    return [transforms.RandomResizedCrop(input_size, scale=(0.7, 1.0)), *turns,
            transforms.ColorJitter(saturation=0.2, hue=hue), transforms.ToTensor()]


def _basic_augmentation(input_size: int) -> list:
    """the thesis's crops, flips and colour jitter"""
    return _crop_turn_jitter(input_size, [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()])


def _rotations_augmentation(input_size: int) -> list:
    """basic in any of the eight right-angle orientations"""
    # basic's two flips reach four of the eight orientations; a right angle and a flip reach all eight, the ones
    # --tta averages over
    return _crop_turn_jitter(input_size, [RandomRightAngle(), transforms.RandomHorizontalFlip()])


def _crop_turn_stain(input_size: int, turns: list) -> list:
    return [transforms.RandomResizedCrop(input_size, scale=(0.7, 1.0)), *turns,
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),  # scanners differ; no hue: slow
            transforms.ToTensor(), RandomStain()]


def _histology_augmentation(input_size: int) -> list:
    """any orientation, HED stain and scanner-like colour changes"""
    return _crop_turn_stain(input_size, [RandomRightAngle(), transforms.RandomHorizontalFlip()])


def _stain_augmentation(input_size: int) -> list:
    """histology's colour changes on basic's flips"""
    # without histology's right angles: measured to see whether they were what cost unseen classes (README,
    # Training recipes)
    return _crop_turn_stain(input_size, [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()])


def _nohue_augmentation(input_size: int) -> list:
    """basic without its hue jitter"""
    # basic turns hues by up to ±36°, colours no stain or scanner gives, and hue tells cells apart (an eosinophil's
    # orange granules). Chosen as the default on the generalisation harness (README, Training recipes).
    return _crop_turn_jitter(input_size, [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()], hue=0)


# Training augmentations by name (``--augmentation``): each gives the steps from a PIL image to a [0, 1] tensor; its
# docstring is what ``--help`` says of it.
AUGMENTATIONS = {
    "basic": _basic_augmentation,
    "rotations": _rotations_augmentation,
    "histology": _histology_augmentation,
    "stain": _stain_augmentation,
    "nohue": _nohue_augmentation,
}
DEFAULT_AUGMENTATION = "nohue"


def build_transform(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, train: bool = False,
                    augmentation: str = DEFAULT_AUGMENTATION):
    """The one preprocessing pipeline: the extractor's own size and normalisation, plus augmentation in training.

    Autoencoders pass ``mean=(0,0,0), std=(1,1,1)`` so inputs and targets stay in [0, 1].
    """
    if not train:
        return transforms.Compose([transforms.Resize((input_size, input_size)), transforms.ToTensor(),
                                   transforms.Normalize(mean, std)])
    if augmentation not in AUGMENTATIONS:
        raise ParameterError(f"unknown {{augmentation}} '{augmentation}'; choose one of: {', '.join(AUGMENTATIONS)}",
                             "augmentation")
    return transforms.Compose([*AUGMENTATIONS[augmentation](input_size), transforms.Normalize(mean, std)])


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
            return self.samples[index].load()
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

    An epoch is as many batches as the images fill, and at least ``min_batches``: ten images a class are three
    batches of 32, too few optimiser steps for any recipe to move from the pretrained features.
    PML's MPerClassSampler does the same from numpy's global random state; this one draws from a generator seeded
    by (seed, epoch), so a resumed run sees exactly the batches an unbroken one would.
    """

    def __init__(self, labels: list, batch_size: int, per_class: int, seed: int = 0, min_batches: int = 0):
        counts = Counter(labels)
        if len(counts) < 2:
            raise CbirError(f"the training data holds {len(counts)} class ({', '.join(map(str, counts))}); metric "
                            f"learning needs at least two class folders")
        single = sorted(str(c) for c, n in counts.items() if n < 2)
        if single:
            names = ", ".join(single[:5]) + (", ..." if len(single) > 5 else "")
            raise CbirError(f"{len(single)} class(es) hold a single image ({names}); metric learning needs at least "
                            f"two images per class: add images or remove those folders")
        if batch_size < 2 * per_class or batch_size % per_class:
            raise ParameterError(f"{{batch_size}} {batch_size} must be a multiple of the images per class "
                                 f"({{images_per_class}} {per_class}) and hold at least two classes "
                                 f"(>= {2 * per_class})", "batch_size", "images_per_class")
        classes = sorted(counts)
        self.by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
        self.classes_per_batch = min(batch_size // per_class, len(classes))
        self.per_class = per_class
        self.filled = len(labels) // (self.classes_per_batch * per_class)  # the batches the images fill
        self.num_batches = self.epoch_length(min_batches)
        self.seed = seed
        self.epoch = 0

    def epoch_length(self, min_batches: int) -> int:
        """The batches of an epoch with this ``min_batches``."""
        return max(1, min_batches, self.filled)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        # Not epoch_seed(): this formula fixes the batches of every run recorded so far (the README's numbers
        # among them); moving it onto epoch_seed would change them all, a re-baselining of its own.
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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of everything random in one epoch of one process, from the run's seed."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


class ShuffledBatches(torch.utils.data.Sampler):
    """Plain shuffled batches for models that train themselves; a new order per epoch from (seed, epoch).

    A last batch of a single image is dropped: batch normalisation cannot train on one image.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_length(self, min_batches: int) -> int:
        """The batches of an epoch: every image once, whatever ``min_batches`` (a class-balanced setting)."""
        return len(self)

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (rest > 1) if self.size > 1 else 1

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        for batch_no in range(len(self)):
            yield order[batch_no * self.batch_size: (batch_no + 1) * self.batch_size].tolist()


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler's batches, each image drawn with a seed of its own, and this rank's share of them.

    The per-draw seeds make augmentation a function of (seed, epoch, batch, position) alone. With several ranks,
    batch i goes to rank i mod world (as DistributedSampler deals out indices), the list padded by wrapping around
    so that every rank takes the same number of steps: a rank with fewer would leave the others waiting forever.
    """

    def __init__(self, batches, *, seed: int, rank: int = 0, world: int = 1):
        self.batches, self.seed, self.rank, self.world, self.epoch = batches, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.world)

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) + 1)
        batches = list(self.batches)
        while batches and len(batches) < len(self) * self.world:
            batches += batches[: len(self) * self.world - len(batches)]
        for batch_no, batch in enumerate(batches):
            seeds = torch.randint(2**62, (len(batch),), generator=generator).tolist()
            if batch_no % self.world == self.rank:
                yield list(zip(batch, seeds))


class TrainingImages(ImageDataset):
    """(image, label, index) per (index, seed) draw; ``views=2`` gives two augmented views stacked (2, C, H, W)."""

    def __init__(self, samples, transform, class_to_idx, views: int = 1):
        super().__init__(samples, transform, class_to_idx)
        self.views = views

    def __getitem__(self, key):
        index, seed = key
        image = self.load(index)
        if image is None:
            return None
        # The transforms draw from torch's global CPU generator: seed it for this draw, and give it back unchanged
        # (with no workers this runs in the training process, whose generator drives dropout and the miner).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            views = [self.transform(image) for _ in range(self.views)]
        tensor = views[0] if self.views == 1 else torch.stack(views)
        return tensor, self.label(index), index
