"""The training loop: sampling, the loss's own parameter groups, checkpoints, validation, a log, resume and DDP.

Two ways to train, chosen by the model:

* metric learning: any loss of :mod:`cbir.losses` on class-balanced batches, ``loss(embeddings, labels)`` (the
  pair losses draw their anchor / positive / negative rows themselves; with ``--augmented`` each image comes as two
  augmented views);
* models that train themselves (autoencoders, VAE, BYOL: ``extractor.trains_itself``) on plain shuffled batches
  with their own ``training_loss``.

Everything a run holds while it trains (model, loss, optimiser, scheduler, loader, history, best score, files) is
one :class:`TrainingRun`; the loop is its methods, one job each.

Reproducibility: everything random in an epoch is derived from (``--seed``, epoch): the batches, the pair losses'
rows, the global RNGs (dropout, the margin loss's miner) and every image's augmentation (each draw of an image
carries its own seed, so the augmentation does not depend on the number of DataLoader workers or processes). A
run resumed from the checkpoint of epoch k therefore repeats exactly what the unbroken run did from epoch k + 1,
with no RNG state to save beyond the epoch number.

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
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cbir.data import (AUGMENTATIONS, DEFAULT_AUGMENTATION, ClassBalancedBatches, EpochBatches, Sample,
                       ShuffledBatches, TrainingImages, collate_skipping, default_workers, epoch_seed, list_samples)
from cbir.embedding import embed, pick_device
from cbir.errors import CbirError, ParameterError, check_at_least
from cbir.files import check_input_file, check_output_file, make_folders, write_text_atomically
from cbir.labels import PathLookup, check_generalise, classes_for, read_cluster_labels
from cbir.losses import MetricLoss, check_row_options, create_loss, list_losses
from cbir.models import (DEFAULT_FEATURES, MAX_FEATURES, POOLINGS, TTA_COUNTS, create_extractor, load_extractor,
                         prefers_channels_last, read_checkpoint, save_extractor, stored_state, tta_count)
from cbir.plots import plot_loss_curve

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "step", "exponential")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_LOSS = "margin"


@dataclass
class TrainConfig:
    training_data: str
    weights: str = "weights/extractor.pt"
    model: str = "densenet"
    loss: str | None = None  # None: margin, or the model's own objective for models that train themselves
    num_features: int = DEFAULT_FEATURES  # the embedding head's size (512 since 2026-12-03; 128 before)
    dr_model: bool = False
    num_epochs: int = 5
    batch_size: int = 32
    images_per_class: int = 4
    augmented: bool = False  # pair losses: positive = a second augmented view of the anchor (SimCLR-style)
    non_contrastive: bool = False  # pair losses: positive pairs only, no negative
    lr: float = 1e-4  # the backbone's; the embedding head learns head_lr_scale times faster
    head_lr_scale: float = 1.0
    decay: float = 4e-4
    beta_lr: float = 5e-4
    gamma: float = 0.3
    lr_proxies: float = 1e-5
    scheduler: str | None = None  # None, "cosine" (warm-up, then cosine decay, per step), "step", "exponential"
    # 0: off. Else the decay of an exponential moving average of the weights, updated after every step; the
    # average is what is validated and saved (the checkpoint keeps the raw weights too, to resume from).
    ema: float = 0.0
    augmentation: str = DEFAULT_AUGMENTATION  # cbir.data.AUGMENTATIONS
    freeze: bool = False
    freeze_bn: bool = False  # the backbone's BatchNorm layers keep their pretrained statistics
    # 0, 2, 4 or 8: the checkpoint embeds each image as the mean vector over that many orientations. The four
    # rotations were chosen on validation data (README, Training recipes): ahead in every seed of every regime,
    # classes never trained on included, at four forward passes a vector. Checkpoints without the key: none.
    tta: int = 4
    pooling: str = "avg"  # the backbone's global pooling of its feature maps: avg, or gem (generalised mean, p = 3)
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
    split_file: str | None = None  # generalise 1/2: the train classes as a file (cbir.labels)
    split_seed: int = 0  # generalise 1/2: seed of the class halves, the same in cbir-index and cbir-eval
    cluster_labels: str | None = None  # generalise 3: image -> cluster file written by cbir-kmeans
    # per epoch, metric learning: small data sets still get optimiser steps. 32 was chosen over 16 and 22 on
    # validation data (README, Training recipes); a set of 1,024 images or more (histo-bench: 48 batches) trains
    # as it did without.
    min_batches: int = 32
    max_batches: int | None = None  # per epoch; for quick trials and tests
    progress: bool = True


#: Every field's default, for fronts that expose the fields as flags (they must not restate them).
DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name != "training_data"}
#: What a checkpoint written before a field existed trained with, where that is not today's default.
BEFORE_THE_KEY = {"min_batches": 0, "ema": 0.0, "augmentation": "basic"}


# ----------------------------------------------------------------------------------------------------------------
# checks made before any work starts
# ----------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ParameterError(f"unknown {{{name}}} {value!r}; choose one of: {', '.join(map(str, choices))}", name)


def check_config(config: TrainConfig) -> None:
    """Everything that can be refused from the configuration alone, one line each, naming the field."""
    _check_choice("scheduler", config.scheduler, (None, *SCHEDULERS))
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("augmentation", config.augmentation, list(AUGMENTATIONS))
    _check_choice("pooling", config.pooling, POOLINGS)
    _check_choice("tta", config.tta, (0, *TTA_COUNTS))
    if config.loss is not None:
        _check_choice("loss", config.loss, list_losses())
    for name in ("num_epochs", "batch_size", "images_per_class", "min_batches", "max_batches", "num_workers", "gpu_id",
                 "seed", "split_seed", "input_size"):
        value = getattr(config, name)
        if value is not None:
            check_at_least(name, value, 0 if name in ("min_batches", "num_workers", "gpu_id", "seed", "split_seed")
                           else 1)
    for name in ("lr", "gamma", "head_lr_scale"):
        if not 0 < getattr(config, name) < math.inf:
            raise ParameterError(f"{{{name}}} must be a positive number, got {getattr(config, name)!r}", name)
    for name in ("decay", "beta_lr", "lr_proxies"):
        if not 0 <= getattr(config, name) < math.inf:
            raise ParameterError(f"{{{name}}} must be a number of at least 0, got {getattr(config, name)!r}", name)
    if not 1 <= config.num_features <= MAX_FEATURES:
        raise ParameterError(f"{{num_features}} must lie between 1 and {MAX_FEATURES}, got {config.num_features}",
                             "num_features")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ParameterError(f"{{val_fraction}} must be in [0, 1), got {config.val_fraction}", "val_fraction")
    if not 0.0 <= config.ema < 1.0:
        raise ParameterError(f"{{ema}} must be in [0, 1) (0: off, e.g. 0.99), got {config.ema}", "ema")
    check_generalise(config.generalise, cluster_labels=config.cluster_labels, split_file=config.split_file)
    for name in ("resume", "pretrained_weights", "cluster_labels", "split_file"):
        if getattr(config, name):
            check_input_file(getattr(config, name), name)
    check_output_file(config.weights, "weights")


def check_objective(config: TrainConfig, trains_itself: bool) -> str | None:
    """The loss to train with (None: the model's own objective), or a one-line refusal."""
    rows = {"augmented": config.augmented, "non_contrastive": config.non_contrastive}
    if not trains_itself:
        loss = config.loss or DEFAULT_LOSS
        check_row_options(loss, **rows)
        if config.images_per_class < 2 and not config.augmented:
            raise ParameterError(f"{{images_per_class}} {config.images_per_class}: metric learning needs at least "
                                 f"two images of a class in a batch (or {{augmented}} with a pair loss)",
                                 "images_per_class", "augmented")
        return loss
    # Refused rather than ignored: a user who names a metric loss for an autoencoder expects it to be used.
    if config.loss is not None:
        raise ParameterError(f"'{config.model}' trains with its own objective; {{loss}} {config.loss} does not apply "
                             f"to it (leave {{loss}} out)", "loss")
    given = [name for name, on in rows.items() if on]
    if given:
        raise ParameterError(" and ".join("{" + name + "}" for name in given) + f" apply to the pair losses, not "
                             f"to '{config.model}', which trains with its own objective", *given)
    return None


def resolve_precision(precision: str, device: torch.device):
    """The autocast dtype, or None for full precision. Mixed precision is a GPU feature here."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ParameterError(f"{{precision}} {precision} needs a GPU; on CPU training runs in fp32 "
                                 f"({{precision}} auto)", "precision")
        return None
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ----------------------------------------------------------------------------------------------------------------
# data: samples, splits, the validation share
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def relabel_by_cluster(samples: list[Sample], clusters: dict[str, int], folder: str) -> list[Sample]:
    """The samples that have a cluster label, their class replaced by ``cluster_<label>``."""
    lookup = PathLookup(clusters)
    kept = []
    for sample in samples:
        cluster = lookup.get(sample.path)
        if cluster is not None:
            kept.append(Sample(sample.path, f"cluster_{cluster}"))
    if not kept:
        raise ParameterError(f"{{cluster_labels}} gives no cluster to any image under {folder}; run cbir-kmeans on "
                             f"that folder", "cluster_labels")
    if len(kept) < len(samples):
        log.warning("%d of %d images under %s have no cluster label and are left out", len(samples) - len(kept),
                    len(samples), folder)
    return kept


def training_samples(config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples after the ``generalise`` rule; classes become clusters in mode 3."""
    samples = list_samples(config.training_data)
    val_samples = list_samples(config.val_data) if config.val_data else None
    if config.generalise in (1, 2):
        all_classes = sorted({s.class_name for s in samples})
        keep = set(classes_for("train", all_classes, config.generalise, seed=config.split_seed,
                               split_file=config.split_file))
        samples = [s for s in samples if s.class_name in keep]
        if val_samples is not None:
            val_samples = [s for s in val_samples if s.class_name in keep]
        if not samples:
            raise ParameterError(f"{{generalise}} {config.generalise} leaves no training class under "
                                 f"{config.training_data}", "generalise")
    elif config.generalise == 3:
        clusters = read_cluster_labels(config.cluster_labels)
        samples = relabel_by_cluster(samples, clusters, config.training_data)
        if val_samples is not None:
            val_samples = relabel_by_cluster(val_samples, clusters, config.val_data)
    if val_samples is None:
        return split_validation(samples, config.val_fraction, config.seed)
    return samples, val_samples


# ----------------------------------------------------------------------------------------------------------------
# the step: extractor and loss as one module (one DDP wrapper for both)
# ----------------------------------------------------------------------------------------------------------------


class TrainingStep(nn.Module):
    """images (and labels) → the loss, through the extractor and the loss module.

    Under DDP this whole module is wrapped, so the loss's learnable parameters are averaged across ranks with the
    extractor's (they would drift apart otherwise, each rank seeing other classes).
    """

    def __init__(self, extractor: nn.Module, loss_fn: MetricLoss | None, *, distributed: bool = False):
        super().__init__()
        self.extractor = extractor
        self.loss_fn = loss_fn
        # DDP expects a gradient for every parameter it averages; a miner that finds no pair in a batch leaves β
        # out of the graph, so under DDP the loss's parameters always enter it (with weight 0).
        self.touch_loss_parameters = distributed and loss_fn is not None and any(True for _ in loss_fn.parameters())

    def forward(self, images, labels=None):
        if self.loss_fn is None:
            return self.extractor.training_loss(images)
        if images.dim() == 5:  # (B, 2, C, H, W): two augmented views of each image, embedded in one pass
            views = self.extractor(images.flatten(0, 1)).unflatten(0, images.shape[:2])
            embeddings, labels = torch.cat([views[:, 0], views[:, 1]]), labels.repeat(2)
        else:
            embeddings = self.extractor(images)
        loss = self.loss_fn(embeddings, labels)
        if self.touch_loss_parameters:
            loss = loss + 0.0 * sum(p.sum() for p in self.loss_fn.parameters())
        return loss


# ----------------------------------------------------------------------------------------------------------------
# schedulers, validation, distributed set-up
# ----------------------------------------------------------------------------------------------------------------


WARMUP_SHARE = 0.1


def ema_average(decay: float):
    """The update of ``AveragedModel`` for an exponential moving average with warm-up: step t uses
    min(decay, 1 - (1 + t) ** -0.75), the warm-up timm's ModelEmaV3 and ema-pytorch offer for short runs (it averages
    about the last (1 + t) ** 0.75 steps: 61 of 240). Without it a run of a few hundred steps would keep a large share
    of the pretrained weights it started from."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], steps: torch.Tensor) -> None:
        # called once per device and dtype, on lists of tensors: one multi-tensor kernel, one read of ``steps``
        if not averaged[0].is_floating_point():  # BatchNorm's step counters: the training model's
            torch._foreach_copy_(averaged, current)
            return
        rate = min(decay, 1 - (1 + float(steps)) ** -0.75)
        torch._foreach_lerp_(averaged, current, 1 - rate)

    return update


def build_scheduler(optimizer, name: str | None, num_epochs: int, gamma: float, steps_per_epoch: int = 1):
    """``cosine``: a linear warm-up over the first tenth of the steps, then a cosine decay to 0, stepped after every
    batch (``.per_step``); ``step``: ×gamma at half and at the end; ``exponential``: ×gamma each epoch; None: a
    constant rate."""
    _check_choice("scheduler", name, (None, *SCHEDULERS))
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
    return None


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
        raise ParameterError("{parallel} runs one process per GPU and needs torchrun to start them: torchrun "
                             "--nproc_per_node=NUM_GPUS -m cbir.cli.train --parallel ... (see scripts/train_ddp.sh)",
                             "parallel")
    dist = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available() and dist.local_rank >= torch.cuda.device_count():
        raise ParameterError(f"{{parallel}}: local rank {dist.local_rank} but only {torch.cuda.device_count()} "
                             f"GPU(s); give torchrun --nproc_per_node at most the number of GPUs", "parallel")
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
# the run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """Everything one training run holds: what it trains, with what, on which batches, and what it has done."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    extractor: nn.Module
    loss_fn: MetricLoss | None
    loss_name: str | None
    train_samples: list[Sample]
    val_samples: list[Sample]
    class_names: list[str]
    batches: torch.utils.data.Sampler
    resumed: dict | None = None
    amp_dtype: torch.dtype | None = None
    # built by start(): the step (DDP-wrapped when distributed), optimisation and data loading
    step: nn.Module | None = None
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: object = None
    sampler: EpochBatches | None = None
    loader: DataLoader | None = None
    workers: int = 0
    channels_last: bool = False
    averaged: nn.Module | None = None  # --ema: the moving average of the extractor (what is validated and saved)
    # what it has done
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float = -1.0

    @property
    def weights(self) -> Path:
        return Path(self.config.weights)

    @property
    def best_path(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".best" + self.weights.suffix)

    @property
    def log_path(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".log.jsonl")

    @classmethod
    def prepare(cls, config: TrainConfig) -> "TrainingRun":
        """Read the data, build the extractor and loss, and refuse what cannot train; no file is written yet."""
        check_config(config)
        dist = distributed_from_env(config.parallel)
        device = torch.device(f"cuda:{dist.local_rank}") if dist.active and torch.cuda.is_available() \
            else pick_device(config.gpu_id)
        amp_dtype = resolve_precision(config.precision, device)
        seed_everything(config.seed)
        train_samples, val_samples = training_samples(config)
        class_names = sorted({s.class_name for s in train_samples})
        extractor = load_extractor(config.resume) if config.resume else create_extractor(
            config.model, config.num_features, dr_model=config.dr_model, pretrained=config.pretrained,
            weights_file=config.pretrained_weights, input_size=config.input_size, class_names=class_names,
            pooling=config.pooling)
        trains_itself = bool(getattr(extractor, "trains_itself", False))
        loss_name = check_objective(config, trains_itself)
        if trains_itself:
            if len(train_samples) < 2:
                raise CbirError(f"{config.training_data} holds a single image; training needs at least two")
            if config.batch_size < 2:
                raise ParameterError("{batch_size} must be at least 2 (batch normalisation cannot train on single "
                                     "images)", "batch_size")
            batches = ShuffledBatches(len(train_samples), config.batch_size, seed=config.seed)
        else:
            batches = ClassBalancedBatches([s.class_name for s in train_samples], config.batch_size,
                                           config.images_per_class, seed=config.seed, min_batches=config.min_batches)
        resumed = _resume_state(config, loss_name, class_names, batches) if config.resume else None
        if config.freeze:
            extractor.freeze_backbone()
        elif config.freeze_bn:
            extractor.freeze_batchnorm()
        # Training never sees it (train mode embeds one orientation); validation and the checkpoint do. Set even
        # when 0: a resumed checkpoint's own count must not outlive a --tta 0 asked here.
        extractor.config["tta"] = config.tta
        loss_fn = None if trains_itself else create_loss(
            loss_name, num_classes=len(class_names), num_features=extractor.embedding_size,
            augmented=config.augmented, non_contrastive=config.non_contrastive)
        return cls(config, dist, device, extractor, loss_fn, loss_name, train_samples, val_samples or [],
                   class_names, batches, resumed, amp_dtype)

    def start(self) -> None:
        """Build the optimisation (or restore it from the checkpoint resumed) and the data loading."""
        config, device = self.config, self.device
        self.extractor.to(device)
        # EfficientNet-Lite0 on 2 CPU cores: 4.27 instead of 6.24 s a step of 32 (benchmarks/step_cost.py --configs
        # effnet:224:nchw effnet:224)
        self.channels_last = prefers_channels_last(self.extractor)
        if self.channels_last:
            self.extractor.to(memory_format=torch.channels_last)
        self.step = TrainingStep(self.extractor, self.loss_fn, distributed=self.dist.active).to(device)
        if config.ema:
            # A resumed run's extractor holds the checkpoint's average: the copy starts from it, and _restore puts
            # the raw weights back into the extractor that trains.
            self.averaged = torch.optim.swa_utils.AveragedModel(self.extractor, multi_avg_fn=ema_average(config.ema),
                                                                use_buffers=True)
        loss_groups = self.loss_fn.param_groups(lr_proxies=config.lr_proxies, beta_lr=config.beta_lr) \
            if self.loss_fn is not None else []
        # The new head starts from random weights and learns faster than the pretrained backbone it sits on.
        head = getattr(self.extractor, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        trainable = [p for p in self.extractor.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in head_ids]},
                  {"params": [p for p in trainable if id(p) in head_ids], "lr": config.lr * config.head_lr_scale},
                  *loss_groups]
        self.optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.decay)
        steps_per_epoch = min(math.ceil(len(self.batches) / self.dist.world), config.max_batches or len(self.batches))
        self.scheduler = build_scheduler(self.optimizer, config.scheduler, config.num_epochs, config.gamma,
                                         steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        if self.resumed is not None:
            self._restore(self.resumed)
        scores = [r["val_top1"] for r in self.history if r.get("val_top1") is not None
                  and not math.isnan(r["val_top1"])]
        self.best_score = max(scores, default=-1.0)
        self.model = self.step
        if self.dist.active:
            # static: the same parameters take part in every step, which lets DDP accept parameters a model never
            # uses (an autoencoder's own loss, a backbone's leftover layers) without searching the graph each step
            self.model = nn.parallel.DistributedDataParallel(
                self.step, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.workers = default_workers() if config.num_workers is None else config.num_workers
        self.sampler = EpochBatches(self.batches, seed=config.seed, rank=self.dist.rank, world=self.dist.world)
        images = TrainingImages(self.train_samples, self.extractor.transform(train=True,
                                                                             augmentation=config.augmentation),
                                {name: i for i, name in enumerate(self.class_names)},
                                views=2 if config.augmented else 1)
        self.loader = DataLoader(images, batch_sampler=self.sampler, num_workers=self.workers,
                                 collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                                 persistent_workers=self.workers > 0)
        if self.dist.main:
            make_folders(self.weights.parent)
            # A fresh run starts a fresh log; a resumed one keeps the epochs it continues from (and only those).
            self._write_log()

    def _write_log(self) -> None:
        """The log of every epoch so far, replaced whole (a few hundred bytes an epoch): never appended through a
        link planted under its name."""
        write_text_atomically(self.log_path, "".join(json.dumps(row) + "\n" for row in self.history))

    def _rates(self) -> tuple:
        """Each optimiser group's base rate and decay, and the scheduler's factor: what its state carries."""
        return [(g.get("initial_lr", g["lr"]), g["weight_decay"]) for g in self.optimizer.param_groups], \
            getattr(self.scheduler, "gamma", None)

    def _restore(self, resumed: dict) -> None:
        asked = self._rates()
        try:
            self.optimizer.load_state_dict(resumed["optimizer"])
            if self.loss_fn is not None:
                self.loss_fn.load_state_dict(resumed["loss_state"])
            if self.averaged is not None:
                self.extractor.load_state_dict(resumed["raw_state"])
                self.averaged.n_averaged.fill_(resumed["ema_steps"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CbirError(f"{self.config.resume}: its optimiser, loss or averaged state does not fit this run "
                            f"({exc})") from None
        if self.scheduler is not None:
            planned = getattr(self.scheduler, "milestones", None)
            _load_scheduler_state(self.scheduler, resumed["scheduler"])
            if planned is not None:  # step: fitted to this run's num_epochs, as cosine's length is
                self.scheduler.milestones = planned
        if self.scaler is not None and resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        if self._rates() != asked:
            # Loading the optimiser's and scheduler's states puts the checkpoint's rates back, whatever was asked.
            log.warning("%s goes on with the learning rates, weight decay and scheduler factor it trained with, not "
                        "those asked here; start a new run to train with others", self.config.resume)
        self.start_epoch, self.history = resumed["epoch"], list(resumed["history"])

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's batches; the epoch's row of the log."""
        config, dist = self.config, self.dist
        # Every random draw of the epoch follows from (seed, epoch): a resumed run repeats the unbroken one.
        seed = epoch_seed(config.seed, epoch, dist.rank)
        seed_everything(seed)
        if self.loss_fn is not None:
            self.loss_fn.reseed(seed + 2)
        self.sampler.set_epoch(epoch)
        # A new loader iterator takes its workers' base seed from the global generator just seeded; reused persistent
        # workers take none. New ones are made every epoch without workers and in a resumed run's first epoch, reused
        # ones from epoch 2 of an unbroken run with workers, so from epoch 2 on the generator is seeded again after
        # the iterator: dropout then follows (seed, epoch) whatever the loader did. Epoch 1 keeps its draw, so runs
        # made before this line train as they did.
        loader = iter(self.loader)
        if epoch > 1:
            seed_everything(seed)
        self.extractor.train()
        started, seen, steps, last_batch = time.perf_counter(), 0, 0, None
        loss_sum = torch.zeros((), device=self.device)
        batches = tqdm(loader, total=len(self.loader), desc=f"epoch {epoch}/{config.num_epochs}", unit="batch",
                       disable=not (config.progress and dist.main))
        for batch in batches:
            weight = 1.0
            if batch is None:  # every image of this batch was unreadable
                if not dist.active or last_batch is None:
                    continue
                # Under DDP every rank must take part in every gradient exchange: repeat the last batch, weight 0.
                batch, weight = last_batch, 0.0
            last_batch = batch
            loss, count = self._optimise(batch, weight)
            if weight:
                # Summed on the device: a .item() per step would make the CPU wait for the GPU at every batch.
                loss_sum += loss.detach().float() * count
                seen += count
            steps += 1
            if steps % 20 == 1 and dist.main and config.progress:
                batches.set_postfix(loss=f"{loss.item():.4f}")
            if config.max_batches and steps >= config.max_batches:
                break
        totals = torch.stack([loss_sum, torch.tensor(float(seen), device=self.device)])
        if dist.active:
            torch.distributed.all_reduce(totals)
            check_ranks_agree(self.step)
        seconds = time.perf_counter() - started
        return {"epoch": epoch, "loss": (totals[0] / totals[1].clamp(min=1)).item(),
                "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": int(totals[1].item()) / seconds}

    def _optimise(self, batch, weight: float) -> tuple[torch.Tensor, int]:
        """One optimiser step on one batch; the loss and the number of images."""
        images, labels, _ = batch
        # Labels stay on the CPU: the pair losses draw their rows there (no device synchronisation), the others
        # move them to the embeddings' device.
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:  # (two augmented views come as 5-D: left as they are)
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            loss = self.model(images, labels)
        if weight != 1.0:
            loss = loss * weight
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if getattr(self.scheduler, "per_step", False):
            self.scheduler.step()
        if self.loss_fn is None:
            self.extractor.after_step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.extractor)
        return loss, len(images)

    def end_epoch(self, row: dict) -> None:
        """Step the scheduler, validate, log, and write the checkpoints (the best epoch's too)."""
        if self.scheduler is not None and not getattr(self.scheduler, "per_step", False):
            self.scheduler.step()
        kept = self.extractor if self.averaged is None else self.averaged.module  # what the checkpoint holds
        row["val_top1"] = retrieval_top1(kept, self.val_samples, device=self.device,
                                         num_workers=self.workers, dist=self.dist) if self.val_samples else None
        self.history.append(row)
        if not self.dist.main:
            return
        self._write_log()
        training_state = {"epoch": row["epoch"], "history": self.history,
                          "train_config": {**asdict(self.config), "loss": self.loss_name}}
        resume_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": _scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loss_state": stored_state(self.loss_fn) if self.loss_fn else {},
        }
        if self.averaged is not None:
            resume_state["raw_state"] = stored_state(self.extractor)
            resume_state["ema_steps"] = int(self.averaged.n_averaged)
        save_extractor(self.weights, kept, training={**training_state, **resume_state})
        val_top1 = row["val_top1"]
        if val_top1 is not None and not math.isnan(val_top1) and val_top1 > self.best_score:
            self.best_score = val_top1
            # the best epoch is for use, not for resuming: no optimiser state (half the size for Adam)
            save_extractor(self.best_path, kept, training=training_state)
        log.info("epoch %d: loss %.4f, %.1f images/s%s", row["epoch"], row["loss"], row["images_per_s"],
                 f", validation top-1 {val_top1:.3f}" if val_top1 is not None else "")

    def summary(self, seconds: float) -> dict:
        curve = plot_loss_curve(self.history, self.weights.with_name(self.weights.stem + ".loss.png")) \
            if self.dist.main else None
        return {
            "weights": str(self.weights),
            "best_weights": str(self.best_path) if self.val_samples and self.best_path.exists() else None,
            "loss": self.loss_name,
            "loss_curve": str(curve) if curve else None,
            "log": str(self.log_path),
            "history": self.history,
            "images": len(self.train_samples),
            "classes": len(self.class_names),
            "seconds": seconds,
            "rank": self.dist.rank,
            "world_size": self.dist.world,
        }


def _resume_state(config: TrainConfig, loss_name: str | None, class_names: list[str], batches) -> dict:
    payload = read_checkpoint(config.resume)
    training = payload.get("training") or {}
    if "optimizer" not in training:
        raise CbirError(f"{config.resume} holds no optimiser state (a best-epoch copy or a foreign checkpoint); "
                        f"resume from the last checkpoint cbir-train wrote")
    stored = training["train_config"]

    def trained_with(key: str):
        # A key the checkpoint lacks was written before it existed: what it meant then, else today's default.
        return stored.get(key, BEFORE_THE_KEY.get(key, DEFAULTS.get(key)))

    for key in ("model", "loss", "num_features", "dr_model", "freeze", "freeze_bn", "augmented", "non_contrastive",
                "scheduler", "ema", "pooling"):
        theirs, ours = trained_with(key), loss_name if key == "loss" else getattr(config, key)
        if theirs != ours:
            raise ParameterError(f"{config.resume} was trained with {{{key}}} {theirs}, not {ours}; resume with the "
                                 f"same settings", key)
    if payload["config"].get("class_names") != class_names:
        raise CbirError(f"{config.resume} was trained on other classes than those under {config.training_data}")
    for key in ("seed", "batch_size", "images_per_class", "min_batches", "max_batches", "augmentation"):
        theirs, ours = trained_with(key), getattr(config, key)
        same = theirs == ours
        if key == "min_batches":  # a set that fills more batches than either minimum trains the same under both
            same = batches.epoch_length(theirs) == batches.epoch_length(ours)
        if not same:
            log.warning("%s %s differs from the checkpoint's %s: the run continues, but not as the unbroken one "
                        "would have", key, ours, theirs)
    if config.scheduler in ("cosine", "step") and trained_with("num_epochs") != config.num_epochs:
        log.warning("num_epochs %s differs from the checkpoint's %s: its %s schedule is fitted to %s epochs from here",
                    config.num_epochs, trained_with("num_epochs"), config.scheduler, config.num_epochs)
    theirs = tta_count(payload["config"])
    if theirs != config.tta:
        log.warning("tta %s differs from the checkpoint's %s: the checkpoint this run writes embeds with %s "
                    "orientations, and databases built with the old one refuse its vectors", config.tta, theirs,
                    config.tta)
    if training["epoch"] >= config.num_epochs:
        raise ParameterError(f"{config.resume} has already trained {training['epoch']} epochs; give {{num_epochs}} "
                             f"larger than that to continue", "num_epochs")
    return training


def train(config: TrainConfig) -> dict:
    """Train an extractor and save it to ``config.weights``; returns a summary (paths, history, time)."""
    run = TrainingRun.prepare(config)
    # Checks are done: from here on, work.
    if run.dist.active:
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        torch.distributed.init_process_group("nccl" if run.device.type == "cuda" else "gloo",
                                             timeout=timedelta(hours=1))
    try:
        run.start()
        started = time.perf_counter()
        for epoch in range(run.start_epoch + 1, config.num_epochs + 1):
            run.end_epoch(run.train_epoch(epoch))
        return run.summary(time.perf_counter() - started)
    finally:
        if run.dist.active:
            torch.distributed.destroy_process_group()
