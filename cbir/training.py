"""The training loop: class-balanced batches, the loss's own parameter groups, checkpoints, validation, a log."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cbir.data import ClassBalancedBatches, ImageDataset, collate_skipping, list_samples
from cbir.embedding import default_workers, embed, pick_device
from cbir.errors import CbirError
from cbir.losses import create_loss
from cbir.models import create_extractor, load_extractor, read_checkpoint, save_extractor
from cbir.plots import plot_loss_curve

log = logging.getLogger(__name__)

SCHEDULERS = (None, "step", "exponential")


@dataclass
class TrainConfig:
    training_data: str
    weights: str = "weights/extractor.pt"
    model: str = "densenet"
    loss: str = "margin"
    num_features: int = 128
    dr_model: bool = False
    num_epochs: int = 5
    batch_size: int = 32
    images_per_class: int = 4
    lr: float = 1e-4
    decay: float = 4e-4
    beta_lr: float = 5e-4
    gamma: float = 0.3
    lr_proxies: float = 1e-5
    scheduler: str | None = None
    freeze: bool = False
    pretrained: bool = True
    pretrained_weights: str | None = None
    input_size: int | None = None
    val_data: str | None = None
    val_fraction: float = 0.0
    num_workers: int | None = None
    seed: int = 0
    gpu_id: int | None = None
    max_batches: int | None = None  # per epoch; for quick trials and tests
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
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


def retrieval_top1(extractor, samples, *, device, num_workers) -> float:
    """Leave-one-out nearest-neighbour class accuracy among the validation images (cosine on unit vectors)."""
    result = embed(extractor, samples, batch_size=64, num_workers=num_workers, device=device)
    if len(result.samples) < 2:
        return float("nan")
    vectors = torch.from_numpy(result.vectors)
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(1).tolist()
    classes = [s.class_name for s in result.samples]
    return sum(classes[i] == classes[j] for i, j in enumerate(nearest)) / len(classes)


def _triplets_in_batch(embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """Anchor, positive (same class, another image) and negative (another class) taken from one balanced batch."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive_mask, negative_mask = (same & ~eye).float(), (~same).float()
    keep = (positive_mask.sum(1) > 0) & (negative_mask.sum(1) > 0)
    positive = torch.multinomial(positive_mask[keep].cpu() + 1e-12, 1, generator=generator).squeeze(1)
    negative = torch.multinomial(negative_mask[keep].cpu() + 1e-12, 1, generator=generator).squeeze(1)
    return embeddings[keep], embeddings[positive.to(embeddings.device)], embeddings[negative.to(embeddings.device)]


def build_scheduler(optimizer, name: str | None, num_epochs: int, gamma: float):
    if name in (None, "None", "none"):
        return None
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[max(1, num_epochs // 2), num_epochs], gamma=gamma)
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    raise CbirError(f"unknown --scheduler '{name}'; choose step or exponential (or leave it out)")


def train(config: TrainConfig) -> dict:
    """Train an extractor and save it to ``config.weights``; returns a summary (paths, history, time)."""
    seed_everything(config.seed)
    samples = list_samples(config.training_data)
    if config.val_data:
        train_samples, val_samples = samples, list_samples(config.val_data)
    else:
        train_samples, val_samples = split_validation(samples, config.val_fraction, config.seed)
    class_names = sorted({s.class_name for s in train_samples})
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    labels = [class_to_idx[s.class_name] for s in train_samples]
    sampler = ClassBalancedBatches(labels, config.batch_size, config.images_per_class, seed=config.seed)
    build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), config.scheduler, 1, config.gamma)

    extractor = create_extractor(
        config.model, config.num_features, dr_model=config.dr_model, pretrained=config.pretrained,
        weights_file=config.pretrained_weights, input_size=config.input_size, class_names=class_names,
    )
    if config.freeze:
        extractor.freeze_backbone()
    loss_fn = create_loss(config.loss, num_classes=len(class_names), num_features=extractor.embedding_size)
    device = pick_device(config.gpu_id)
    extractor.to(device)
    loss_fn.to(device)
    optimizer = torch.optim.Adam(
        [{"params": [p for p in extractor.parameters() if p.requires_grad]},
         *loss_fn.param_groups(lr_proxies=config.lr_proxies, beta_lr=config.beta_lr)],
        lr=config.lr, weight_decay=config.decay,
    )
    scheduler = build_scheduler(optimizer, config.scheduler, config.num_epochs, config.gamma)

    workers = default_workers() if config.num_workers is None else config.num_workers
    loader = DataLoader(
        ImageDataset(train_samples, extractor.transform(train=True), class_to_idx),
        batch_sampler=sampler, num_workers=workers, collate_fn=collate_skipping,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    weights = Path(config.weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    best_path = weights.with_name(weights.stem + ".best" + weights.suffix)
    log_path = weights.with_name(weights.stem + ".log.jsonl")
    log_path.unlink(missing_ok=True)
    pair_generator = torch.Generator().manual_seed(config.seed)
    history, best_score, started = [], -1.0, time.perf_counter()

    for epoch in range(1, config.num_epochs + 1):
        sampler.set_epoch(epoch)
        extractor.train()
        epoch_start, total_loss, seen, steps = time.perf_counter(), 0.0, 0, 0
        batches = tqdm(loader, desc=f"epoch {epoch}/{config.num_epochs}", unit="batch", disable=not config.progress)
        for batch in batches:
            if batch is None:
                continue
            images, batch_labels, _ = batch
            images, batch_labels = images.to(device, non_blocking=True), batch_labels.to(device)
            embeddings = extractor(images)
            if loss_fn.takes_triplets:
                loss = loss_fn(*_triplets_in_batch(embeddings, batch_labels, pair_generator))
            else:
                loss = loss_fn(embeddings, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(images)
            seen += len(images)
            steps += 1
            batches.set_postfix(loss=f"{loss.item():.4f}")
            if config.max_batches and steps >= config.max_batches:
                break
        if scheduler is not None:
            scheduler.step()
        row = {
            "epoch": epoch,
            "loss": total_loss / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / (time.perf_counter() - epoch_start),
            "val_top1": retrieval_top1(extractor, val_samples, device=device, num_workers=workers) if val_samples else None,
        }
        history.append(row)
        with log_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        training_state = {"epoch": epoch, "history": history, "train_config": asdict(config)}
        save_extractor(weights, extractor, training=training_state)
        score = row["val_top1"] if row["val_top1"] is not None else -row["loss"]
        if val_samples and score > best_score:
            best_score = score
            save_extractor(best_path, extractor, training=training_state)
        log.info("epoch %d: loss %.4f, %.1f images/s%s", epoch, row["loss"], row["images_per_s"],
                 f", validation top-1 {row['val_top1']:.3f}" if row["val_top1"] is not None else "")

    curve = plot_loss_curve(history, weights.with_name(weights.stem + ".loss.png"))
    return {
        "weights": str(weights),
        "best_weights": str(best_path) if val_samples else None,
        "loss_curve": str(curve),
        "log": str(log_path),
        "history": history,
        "images": len(train_samples),
        "classes": len(class_names),
        "seconds": time.perf_counter() - started,
    }
