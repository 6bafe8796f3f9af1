"""The training loop: sampling, the loss's own parameter groups, checkpoints, validation, a log, resume and DDP.

Three ways to train, chosen by the model and ``--loss``:

* group losses (margin, proxy_nca_pp, softmax, softtriple) on class-balanced batches;
* pair losses (triplet, BCE, contrastive, cosine, infonce) on anchor / positive / negative rows drawn inside the
  same class-balanced batches (``--augmented``: the positive is a second augmented view of the anchor image;
  ``--non_contrastive``: no negatives);
* models that train themselves (autoencoders, VAE, BYOL: ``extractor.trains_itself``) on plain shuffled batches
  with their own ``training_loss``.

Reproducibility: everything random in an epoch is derived from (``--seed``, epoch): the batches, the anchor /
positive / negative draws, the global RNGs (dropout, the margin loss's miner) and every image's augmentation (each
draw of an image carries its own seed, so the augmentation does not depend on the number of DataLoader workers or
processes). A run resumed from the checkpoint of epoch k therefore repeats exactly what the unbroken run did from
epoch k + 1, with no RNG state to save beyond the epoch number.

``--parallel``: one process per GPU (or CPU process with gloo) started by ``torchrun``; each rank trains on its own
share of the batches, and the extractor and the loss's learnable parameters (β, proxies) are wrapped in one module
for DistributedDataParallel, so their gradients are averaged together. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from cbir.data import AUGMENTATIONS, ClassBalancedBatches, ImageDataset, Sample, collate_skipping, list_samples
from cbir.embedding import default_workers, embed, pick_device
from cbir.errors import CbirError
from cbir.losses import LOSSES, PAIR_LOSSES, create_loss
from cbir.models import create_extractor, load_extractor, read_checkpoint, save_extractor
from cbir.plots import plot_loss_curve

log = logging.getLogger(__name__)

SCHEDULERS = (None, "step", "exponential", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LOSS = "margin"


@dataclass
class TrainConfig:
    training_data: str
    weights: str = "weights/extractor.pt"
    model: str = "densenet"
    loss: str | None = None  # None: margin, or the model's own objective for models that train themselves
    num_features: int = 128
    dr_model: bool = False
    num_epochs: int = 5
    batch_size: int = 32
    images_per_class: int = 4
    augmented: bool = False  # pair losses: positive = a second augmented view of the anchor (SimCLR-style)
    non_contrastive: bool = False  # pair losses: positive pairs only, no negative
    lr: float = 2e-4  # the backbone's; the new head learns head_lr_scale times faster
    head_lr_scale: float = 10.0
    decay: float = 4e-4
    beta_lr: float = 5e-4
    gamma: float = 0.3
    lr_proxies: float = 1e-5
    scheduler: str | None = "cosine"  # linear warm-up over the first tenth of the steps, then cosine decay to 0
    augmentation: str = "histology"  # cbir.data.AUGMENTATIONS
    freeze: bool = False
    pretrained: bool = True
    pretrained_weights: str | None = None
    input_size: int | None = None
    val_data: str | None = None
    val_fraction: float = 0.0
    num_workers: int | None = None
    seed: int = 0
    gpu_id: int | None = None
    parallel: bool = False  # DistributedDataParallel, one process per device, started by torchrun
    precision: str = "auto"  # auto: bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU
    resume: str | None = None  # a checkpoint written by train(): continue after its epoch
    generalise: int = 0  # 0 all classes; 1, 2 the training half of the classes; 3 k-means cluster labels
    split_file: str | None = None  # --generalise 1/2: the train classes as a file (cbir.splits)
    split_seed: int = 0  # --generalise 1/2: seed of the class halves, the same in cbir-index and cbir-eval
    cluster_labels: str | None = None  # --generalise 3: image -> cluster file written by cbir-kmeans
    max_batches: int | None = None  # per epoch; for quick trials and tests
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------------
# checks made before any work starts
# ----------------------------------------------------------------------------------------------------------------


def check_flags(config: TrainConfig) -> None:
    """Everything that can be refused from the flags alone, one line each."""
    if config.scheduler in ("None", "none"):
        config.scheduler = None
    if config.scheduler not in SCHEDULERS:
        raise CbirError(f"unknown --scheduler '{config.scheduler}'; choose step, exponential or cosine (or None)")
    if config.augmentation not in AUGMENTATIONS:
        raise CbirError(f"unknown --augmentation '{config.augmentation}'; choose one of: {', '.join(AUGMENTATIONS)}")
    if config.head_lr_scale <= 0:
        raise CbirError(f"--head_lr_scale must be positive, got {config.head_lr_scale}")
    if config.precision not in PRECISIONS:
        raise CbirError(f"unknown --precision '{config.precision}'; choose one of: {', '.join(PRECISIONS)}")
    if config.loss is not None and config.loss not in LOSSES:
        raise CbirError(f"unknown loss '{config.loss}'; choose one of: {', '.join(LOSSES)}")
    for flag, value in (("--num_epochs", config.num_epochs), ("--batch_size", config.batch_size),
                        ("--images_per_class", config.images_per_class)):
        if value < 1:
            raise CbirError(f"{flag} must be at least 1, got {value}")
    if config.max_batches is not None and config.max_batches < 1:
        raise CbirError(f"--max_batches must be at least 1, got {config.max_batches}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise CbirError(f"--val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.generalise not in (0, 1, 2, 3):
        raise CbirError(f"--generalise must be 0, 1, 2 or 3, got {config.generalise}")
    if config.generalise == 3 and not config.cluster_labels:
        raise CbirError("--generalise 3 trains on k-means cluster labels: give --cluster_labels FILE "
                        "(from cbir-kmeans)")
    if config.cluster_labels and config.generalise != 3:
        raise CbirError("--cluster_labels is used with --generalise 3 only")
    if config.split_file and config.generalise not in (1, 2):
        raise CbirError("--split_file is used with --generalise 1 or 2 only")
    if config.resume and not Path(config.resume).is_file():
        raise CbirError(f"--resume {config.resume} does not exist")


def check_objective(config: TrainConfig, trains_itself: bool) -> str | None:
    """The loss to train with (None: the model's own objective), or a one-line refusal."""
    pair_flags = [flag for flag, on in (("--augmented", config.augmented),
                                        ("--non_contrastive", config.non_contrastive)) if on]
    if trains_itself:
        # Refused rather than ignored: a user who names a metric loss for an autoencoder expects it to be used.
        if config.loss is not None:
            raise CbirError(f"'{config.model}' trains with its own objective; --loss {config.loss} does not apply to "
                            f"it (leave --loss out)")
        if pair_flags:
            raise CbirError(f"{' and '.join(pair_flags)} apply to the pair losses, not to '{config.model}', "
                            f"which trains with its own objective")
        return None
    loss = config.loss or DEFAULT_LOSS
    if pair_flags and loss not in PAIR_LOSSES:
        raise CbirError(f"{' and '.join(pair_flags)} apply to the pair losses ({', '.join(sorted(PAIR_LOSSES))}), "
                        f"not to --loss {loss}")
    if config.images_per_class < 2 and not config.augmented:
        raise CbirError(f"--images_per_class {config.images_per_class}: metric learning needs at least two images of "
                        f"a class in a batch (or --augmented with a pair loss)")
    return loss


def check_classes(samples: list[Sample], folder: str) -> None:
    """Metric learning needs two classes, and two images of each (a positive besides the anchor)."""
    counts = Counter(s.class_name for s in samples)
    if len(counts) < 2:
        raise CbirError(f"{folder} holds {len(counts)} class ({', '.join(counts)}); metric learning needs at least two "
                        f"class folders")
    single = sorted(name for name, count in counts.items() if count < 2)
    if single:
        names = ", ".join(single[:5]) + (", ..." if len(single) > 5 else "")
        raise CbirError(f"{len(single)} class(es) under {folder} hold a single image ({names}); metric learning needs "
                        f"at least two images per class: add images or remove those folders")


def resolve_precision(precision: str, device: torch.device):
    """The autocast dtype, or None for full precision. Mixed precision is a GPU feature here."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise CbirError(f"--precision {precision} needs a GPU; on CPU training runs in fp32 (--precision auto)")
        return None
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ----------------------------------------------------------------------------------------------------------------
# data: samples, splits, samplers, the training dataset
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


def split_validation(samples, fraction: float, seed: int):
    """Hold out ``fraction`` of each class (at least one image, never the last two) for validation."""
    if not fraction:
        return samples, []
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    for members in by_class.values():
        members = members[:]
        rng.shuffle(members)
        n_val = min(max(1, round(fraction * len(members))), len(members) - 2) if len(members) > 2 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val


def _relabel_by_cluster(samples: list[Sample], clusters: dict[str, int], folder: str) -> list[Sample]:
    by_path = {str(Path(path).resolve()): cluster for path, cluster in clusters.items()}
    kept = []
    for sample in samples:
        cluster = by_path.get(str(Path(sample.path).resolve()))
        if cluster is not None:
            kept.append(Sample(sample.path, f"cluster_{cluster}"))
    if not kept:
        raise CbirError(f"--cluster_labels gives no cluster to any image under {folder}; run cbir-kmeans on that "
                        f"folder")
    if len(kept) < len(samples):
        log.warning("%d of %d images under %s have no cluster label and are left out", len(samples) - len(kept),
                    len(samples), folder)
    return kept


def training_samples(config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples after the ``--generalise`` rule; classes become clusters in mode 3."""
    samples = list_samples(config.training_data)
    val_samples = list_samples(config.val_data) if config.val_data else None
    if config.generalise in (1, 2):
        from cbir.splits import classes_for  # imported here: only this mode needs it

        all_classes = sorted({s.class_name for s in samples})
        keep = set(classes_for("train", all_classes, config.generalise, seed=config.split_seed,
                                split_file=config.split_file))
        samples = [s for s in samples if s.class_name in keep]
        if val_samples is not None:
            val_samples = [s for s in val_samples if s.class_name in keep]
        if not samples:
            raise CbirError(f"--generalise {config.generalise} leaves no training class under {config.training_data}")
    elif config.generalise == 3:
        from cbir.kmeans import read_cluster_labels  # imported here: only this mode needs it

        clusters = read_cluster_labels(config.cluster_labels)
        samples = _relabel_by_cluster(samples, clusters, config.training_data)
        if val_samples is not None:
            val_samples = _relabel_by_cluster(val_samples, clusters, config.val_data)
    if val_samples is None:
        return split_validation(samples, config.val_fraction, config.seed)
    return samples, val_samples


class ShuffledBatches(Sampler):
    """Plain shuffled batches for models that train themselves; a new order per epoch from (seed, epoch).

    A last batch of a single image is dropped: batch normalisation cannot train on one image.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (rest > 1) if self.size > 1 else 1

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        for batch_no in range(len(self)):
            yield order[batch_no * self.batch_size: (batch_no + 1) * self.batch_size].tolist()


class EpochBatches(Sampler):
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
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch) + 1)
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


def pair_indices(labels: torch.Tensor, generator: torch.Generator, *, augmented: bool, non_contrastive: bool):
    """Rows of a balanced batch as (anchor, positive, negative) indices; negative None in the non-contrastive mode.

    Positive: another image of the anchor's class (with ``augmented``: the anchor's own second view, so the
    positive index is the anchor's). Negative: an image of another class. Anchors lacking either are left out.
    Drawn on the CPU from the labels, before the batch goes to the device: no device synchronisation.
    """
    same = labels[:, None] == labels[None, :]
    negative_mask = ~same
    positive_mask = same & ~torch.eye(len(labels), dtype=torch.bool)
    usable = torch.ones(len(labels), dtype=torch.bool) if augmented else positive_mask.any(1)
    if not non_contrastive:
        usable &= negative_mask.any(1)
    anchor = usable.nonzero().squeeze(1)
    if len(anchor) == 0:
        return anchor, anchor, None if non_contrastive else anchor
    if augmented:
        positive = anchor
    else:
        positive = torch.multinomial(positive_mask[anchor].float(), 1, generator=generator).squeeze(1)
    negative = None
    if not non_contrastive:
        negative = torch.multinomial(negative_mask[anchor].float(), 1, generator=generator).squeeze(1)
    return anchor, positive, negative


# ----------------------------------------------------------------------------------------------------------------
# the step: extractor and loss as one module (one DDP wrapper for both)
# ----------------------------------------------------------------------------------------------------------------


class TrainingStep(nn.Module):
    """images (and labels, pair indices) → the loss, through the extractor and the loss module.

    Under DDP this whole module is wrapped, so the loss's learnable parameters are averaged across ranks with the
    extractor's (they would drift apart otherwise, each rank seeing other classes).
    """

    def __init__(self, extractor: nn.Module, loss_fn: nn.Module | None, *, augmented: bool = False,
                 distributed: bool = False):
        super().__init__()
        self.extractor = extractor
        self.loss_fn = loss_fn
        self.augmented = augmented
        # DDP expects a gradient for every parameter it averages; a miner that finds no pair in a batch leaves β
        # out of the graph, so under DDP the loss's parameters always enter it (with weight 0).
        self.touch_loss_parameters = distributed and loss_fn is not None and any(True for _ in loss_fn.parameters())

    def forward(self, images, labels=None, anchor=None, positive=None, negative=None):
        if self.loss_fn is None:
            return self.extractor.training_loss(images)
        if self.augmented:
            embeddings = self.extractor(images.flatten(0, 1)).unflatten(0, images.shape[:2])
            first, second = embeddings[:, 0], embeddings[:, 1]
            loss = self._pairs(first, first[anchor], second[anchor], None if negative is None else first[negative])
        else:
            embeddings = self.extractor(images)
            if self.loss_fn.takes_triplets:
                loss = self._pairs(embeddings, embeddings[anchor], embeddings[positive],
                                   None if negative is None else embeddings[negative])
            else:
                loss = self.loss_fn(embeddings, labels)
        if self.touch_loss_parameters:
            loss = loss + 0.0 * sum(p.sum() for p in self.loss_fn.parameters())
        return loss

    def _pairs(self, embeddings, anchor, positive, negative):
        if len(anchor) == 0:  # no usable anchor in this batch: a step that changes nothing
            return embeddings.sum() * 0.0
        return self.loss_fn(anchor, positive, negative)


# ----------------------------------------------------------------------------------------------------------------
# schedulers, validation, distributed set-up
# ----------------------------------------------------------------------------------------------------------------


WARMUP_SHARE = 0.1


def build_scheduler(optimizer, name: str | None, num_epochs: int, gamma: float, steps_per_epoch: int = 1):
    """The learning-rate schedule; ``cosine`` is stepped after every batch (``.per_step``), the others per epoch."""
    if name in (None, "None", "none"):
        return None
    if name == "cosine":
        total = max(1, num_epochs * steps_per_epoch)
        warmup = max(1, round(WARMUP_SHARE * total))

        def factor(step: int) -> float:  # of each group's own rate: the head, backbone and loss keep their ratio
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        scheduler.per_step = True
        return scheduler
    if name == "step":
        milestones = [max(1, num_epochs // 2), num_epochs]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    raise CbirError(f"unknown --scheduler '{name}'; choose step or exponential (or leave it out)")


def _scheduler_state(scheduler) -> dict | None:
    if scheduler is None:
        return None
    state = scheduler.state_dict()
    if isinstance(state.get("milestones"), Counter):  # stored as a dict: older torch.load(weights_only) refuse Counter
        state["milestones"] = dict(state["milestones"])
    return state


def _load_scheduler_state(scheduler, state: dict) -> None:
    state = dict(state)
    if "milestones" in state:
        state["milestones"] = Counter(state["milestones"])
    scheduler.load_state_dict(state)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def distributed_from_env(parallel: bool) -> Distributed:
    if not parallel:
        return Distributed()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise CbirError("--parallel runs one process per GPU and needs torchrun to start them: torchrun "
                        "--nproc_per_node=NUM_GPUS -m cbir.cli.train --parallel ... (see scripts/train_ddp.sh)")
    dist = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available() and dist.local_rank >= torch.cuda.device_count():
        raise CbirError(f"--parallel: local rank {dist.local_rank} but only {torch.cuda.device_count()} GPU(s); "
                        f"give torchrun --nproc_per_node at most the number of GPUs")
    return dist


def check_ranks_agree(module: nn.Module) -> None:
    """Under DDP every rank must hold the same weights, the loss's own included: a cheap per-epoch guard."""
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        names = [name for (name, _), same in zip(module.named_parameters(), (low == high).tolist()) if not same]
        raise RuntimeError(f"DDP ranks hold different weights after an epoch: {', '.join(names[:5])}")


def retrieval_top1(extractor, samples, *, device, num_workers, dist: Distributed | None = None) -> float:
    """Leave-one-out nearest-neighbour class accuracy among the validation images (cosine on unit vectors).

    Under DDP each rank embeds its share and the vectors are gathered, so every rank gets the same score.
    """
    dist = dist or Distributed()
    result = embed(extractor, samples[dist.rank::dist.world], batch_size=64, num_workers=num_workers, device=device)
    vectors, classes = result.vectors, [s.class_name for s in result.samples]
    if dist.active:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, (vectors, classes))
        vectors = np.concatenate([v for v, _ in gathered])
        classes = [c for _, cs in gathered for c in cs]
    if len(classes) < 2:
        return float("nan")
    vectors = torch.from_numpy(vectors).to(device)
    index = {name: i for i, name in enumerate(sorted(set(classes)))}
    labels = torch.tensor([index[c] for c in classes], device=device)
    hits = 0
    for start in range(0, len(vectors), 4096):  # blocks of rows: a full N × N matrix would not fit for large sets
        block = vectors[start:start + 4096] @ vectors.T
        rows = torch.arange(len(block), device=device)
        block[rows, rows + start] = -float("inf")
        hits += int((labels[block.argmax(1)] == labels[start:start + 4096]).sum())
    return hits / len(classes)


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------


def _resume_state(config: TrainConfig, loss_name: str | None, class_names: list[str]) -> dict:
    payload = read_checkpoint(config.resume)
    training = payload.get("training") or {}
    if "optimizer" not in training:
        raise CbirError(f"{config.resume} holds no optimiser state (a best-epoch copy or a foreign checkpoint); "
                        f"resume from the last checkpoint cbir-train wrote")
    stored = training["train_config"]
    for key in ("model", "loss", "num_features", "dr_model", "freeze", "augmented", "non_contrastive", "scheduler"):
        ours = loss_name if key == "loss" else getattr(config, key)
        if stored.get(key) != ours:
            raise CbirError(f"{config.resume} was trained with --{key} {stored.get(key)}, not {ours}; resume with the "
                            f"same settings")
    if payload["config"].get("class_names") != class_names:
        raise CbirError(f"{config.resume} was trained on other classes than those under {config.training_data}")
    for key in ("seed", "batch_size", "images_per_class", "max_batches"):
        if stored.get(key) != getattr(config, key):
            log.warning("--%s %s differs from the checkpoint's %s: the run continues, but not as the unbroken one "
                        "would have", key, getattr(config, key), stored.get(key))
    if training["epoch"] >= config.num_epochs:
        raise CbirError(f"{config.resume} has already trained {training['epoch']} epochs; give --num_epochs larger "
                        f"than that to continue")
    return training


def train(config: TrainConfig) -> dict:
    """Train an extractor and save it to ``config.weights``; returns a summary (paths, history, time)."""
    config = replace(config)
    check_flags(config)
    dist = distributed_from_env(config.parallel)
    if dist.active and torch.cuda.is_available():
        device = torch.device(f"cuda:{dist.local_rank}")
    else:
        device = pick_device(config.gpu_id)
    amp_dtype = resolve_precision(config.precision, device)

    seed_everything(config.seed)
    train_samples, val_samples = training_samples(config)
    class_names = sorted({s.class_name for s in train_samples})
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    labels = [class_to_idx[s.class_name] for s in train_samples]

    if config.resume:
        extractor = load_extractor(config.resume)
    else:
        extractor = create_extractor(
            config.model, config.num_features, dr_model=config.dr_model, pretrained=config.pretrained,
            weights_file=config.pretrained_weights, input_size=config.input_size, class_names=class_names,
        )
    trains_itself = bool(getattr(extractor, "trains_itself", False))
    loss_name = check_objective(config, trains_itself)
    if trains_itself:
        if len(train_samples) < 2:
            raise CbirError(f"{config.training_data} holds a single image; training needs at least two")
        if config.batch_size < 2:
            raise CbirError("--batch_size must be at least 2 (batch normalisation cannot train on single images)")
        batches = ShuffledBatches(len(train_samples), config.batch_size, seed=config.seed)
    else:
        check_classes(train_samples, config.training_data)
        batches = ClassBalancedBatches(labels, config.batch_size, config.images_per_class, seed=config.seed)
    resumed = _resume_state(config, loss_name, class_names) if config.resume else None
    if config.freeze:
        extractor.freeze_backbone()
    loss_fn = None if trains_itself else create_loss(loss_name, num_classes=len(class_names),
                                                     num_features=extractor.embedding_size)
    pairs = loss_fn is not None and loss_fn.takes_triplets
    after_step = getattr(extractor, "after_step", None) if trains_itself else None

    # Checks are done: from here on, work.
    if dist.active:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    try:
        return _train_loop(config, dist, device, amp_dtype, extractor, loss_fn, loss_name, pairs, after_step,
                           batches, resumed, train_samples, val_samples, class_names, class_to_idx)
    finally:
        if dist.active:
            torch.distributed.destroy_process_group()


def _train_loop(config, dist, device, amp_dtype, extractor, loss_fn, loss_name, pairs, after_step, batches, resumed,
                train_samples, val_samples, class_names, class_to_idx) -> dict:
    extractor.to(device)
    step = TrainingStep(extractor, loss_fn, augmented=config.augmented, distributed=dist.active).to(device)
    # The new head starts from random weights and learns faster than the pretrained backbone it sits on.
    head = getattr(extractor, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    trainable = [p for p in extractor.parameters() if p.requires_grad]
    loss_groups = [] if loss_fn is None else loss_fn.param_groups(lr_proxies=config.lr_proxies, beta_lr=config.beta_lr)
    groups = [{"params": [p for p in trainable if id(p) not in head_ids]},
              {"params": [p for p in trainable if id(p) in head_ids], "lr": config.lr * config.head_lr_scale},
              *loss_groups]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.decay)
    steps_per_epoch = min(math.ceil(len(batches) / dist.world), config.max_batches or len(batches))
    scheduler = build_scheduler(optimizer, config.scheduler, config.num_epochs, config.gamma, steps_per_epoch)
    per_step = getattr(scheduler, "per_step", False)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    start_epoch, history = 0, []
    if resumed is not None:
        try:
            optimizer.load_state_dict(resumed["optimizer"])
            if loss_fn is not None:
                loss_fn.load_state_dict(resumed["loss_state"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CbirError(f"{config.resume}: its optimiser or loss state does not fit this run ({exc})") from None
        if scheduler is not None:
            _load_scheduler_state(scheduler, resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, history = resumed["epoch"], list(resumed["history"])
    model = step
    if dist.active:
        model = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None,
            # static: the same parameters take part in every step, which lets DDP accept parameters a model never
            # uses (an autoencoder's own loss, a backbone's leftover layers) without searching the graph each step
            static_graph=True,
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    workers = default_workers() if config.num_workers is None else config.num_workers
    sampler = EpochBatches(batches, seed=config.seed, rank=dist.rank, world=dist.world)
    loader = DataLoader(
        TrainingImages(train_samples, extractor.transform(train=True, augmentation=config.augmentation), class_to_idx,
                       views=2 if config.augmented else 1),
        batch_sampler=sampler, num_workers=workers, collate_fn=collate_skipping,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    weights = Path(config.weights)
    best_path = weights.with_name(weights.stem + ".best" + weights.suffix)
    log_path = weights.with_name(weights.stem + ".log.jsonl")
    if dist.main:
        weights.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh log; a resumed one keeps the epochs it continues from (and only those).
        log_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    scores = [r["val_top1"] for r in history if r.get("val_top1") is not None and not math.isnan(r["val_top1"])]
    best_score = max(scores, default=-1.0)
    stored_config = {**asdict(config), "loss": loss_name}
    started = time.perf_counter()

    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        # Every random draw of the epoch follows from (seed, epoch): a resumed run repeats the unbroken one.
        seed_everything(_epoch_seed(config.seed, epoch, dist.rank))
        pair_generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, dist.rank) + 2)
        sampler.set_epoch(epoch)
        extractor.train()
        epoch_start, seen, steps, last_batch = time.perf_counter(), 0, 0, None
        loss_sum = torch.zeros((), device=device)
        batch_iter = tqdm(loader, desc=f"epoch {epoch}/{config.num_epochs}", unit="batch",
                          disable=not (config.progress and dist.main))
        for batch in batch_iter:
            weight = 1.0
            if batch is None:  # every image of this batch was unreadable
                if not dist.active or last_batch is None:
                    continue
                # Under DDP every rank must take part in every gradient exchange: repeat the last batch, weight 0.
                batch, weight = last_batch, 0.0
            last_batch = batch
            images, batch_labels, _ = batch
            indices = pair_indices(batch_labels, pair_generator, augmented=config.augmented,
                                   non_contrastive=config.non_contrastive) if pairs else (None, None, None)
            images = images.to(device, non_blocking=True)
            batch_labels = batch_labels.to(device, non_blocking=True)
            indices = [None if i is None else i.to(device, non_blocking=True) for i in indices]
            with autocast():
                loss = model(images, batch_labels, *indices)
            if weight != 1.0:
                loss = loss * weight
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if per_step:
                scheduler.step()
            if after_step is not None:
                after_step()
            if weight:
                # Summed on the device: a .item() per step would make the CPU wait for the GPU at every batch.
                loss_sum += loss.detach().float() * len(images)
                seen += len(images)
            steps += 1
            if steps % 20 == 1 and dist.main and config.progress:
                batch_iter.set_postfix(loss=f"{loss.item():.4f}")
            if config.max_batches and steps >= config.max_batches:
                break
        totals = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
        if dist.active:
            torch.distributed.all_reduce(totals)
            check_ranks_agree(step)
        epoch_loss, epoch_seen = (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
        seconds = time.perf_counter() - epoch_start
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None and not per_step:
            scheduler.step()
        val_top1 = (retrieval_top1(extractor, val_samples, device=device, num_workers=workers, dist=dist)
                    if val_samples else None)
        row = {"epoch": epoch, "loss": epoch_loss, "lr": lr, "images_per_s": epoch_seen / seconds, "val_top1": val_top1}
        history.append(row)
        if dist.main:
            with log_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            training_state = {"epoch": epoch, "history": history, "train_config": stored_config}
            resume_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": _scheduler_state(scheduler),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "loss_state": {k: v.detach().cpu() for k, v in (loss_fn.state_dict() if loss_fn else {}).items()},
            }
            save_extractor(weights, extractor, training={**training_state, **resume_state})
            if val_top1 is not None and not math.isnan(val_top1) and val_top1 > best_score:
                best_score = val_top1
                # the best epoch is for use, not for resuming: no optimiser state (half the size for Adam)
                save_extractor(best_path, extractor, training=training_state)
            log.info("epoch %d: loss %.4f, %.1f images/s%s", epoch, row["loss"], row["images_per_s"],
                     f", validation top-1 {val_top1:.3f}" if val_top1 is not None else "")

    curve = plot_loss_curve(history, weights.with_name(weights.stem + ".loss.png")) if dist.main else None
    return {
        "weights": str(weights),
        "best_weights": str(best_path) if val_samples and best_path.exists() else None,
        "loss": loss_name,
        "loss_curve": str(curve) if curve else None,
        "log": str(log_path),
        "history": history,
        "images": len(train_samples),
        "classes": len(class_names),
        "seconds": time.perf_counter() - started,
        "rank": dist.rank,
        "world_size": dist.world,
    }
