"""cbir-train: train a feature extractor on a class-folder data set (thesis: train.py)."""

from __future__ import annotations

import argparse
import logging

from cbir.cli.common import entry_point
from cbir.training import SCHEDULERS, TrainConfig, train

log = logging.getLogger("cbir")


def parser() -> argparse.ArgumentParser:
    from cbir.losses import list_losses
    from cbir.models import list_models

    p = argparse.ArgumentParser(prog="cbir-train", description="Train a feature extractor (deep metric learning).")
    p.add_argument("--training_data", required=False, help="folder with one sub-folder per class")
    p.add_argument("--weights", default="weights/extractor.pt", help="where the checkpoint is written")
    p.add_argument("--model", default="densenet", choices=list_models(), help="backbone (default: densenet)")
    p.add_argument("--loss", default="margin", choices=list_losses(), help="loss (default: margin)")
    p.add_argument("--num_features", type=int, default=128, help="embedding size (default: 128)")
    p.add_argument("--dr_model", action="store_true", help="wrap the CNN in the Deep Ranking architecture")
    p.add_argument("--num_epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--images_per_class", type=int, default=4, help="images of one class in a batch (default: 4)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--decay", type=float, default=4e-4, help="weight decay")
    p.add_argument("--beta_lr", type=float, default=5e-4, help="learning rate of the margin loss's beta")
    p.add_argument("--gamma", type=float, default=0.3, help="scheduler factor")
    p.add_argument("--lr_proxies", type=float, default=1e-5, help="learning rate of proxies / class weights / centres")
    p.add_argument("--scheduler", default=None, choices=[s for s in SCHEDULERS if s])
    p.add_argument("--freeze", action="store_true", help="train the head only")
    p.add_argument("--scratch", action="store_true", help="no ImageNet weights: train from random initialisation")
    p.add_argument("--pretrained_weights", default=None, help="ImageNet weights file for the backbone (offline use)")
    p.add_argument("--input_size", type=int, default=None, help="override the backbone's input size (e.g. 128 for speed)")
    p.add_argument("--val_data", default=None, help="validation folder, scored by retrieval top-1 each epoch")
    p.add_argument("--val_fraction", type=float, default=0.0, help="or hold out this share of each training class")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu_id", type=int, default=None)
    p.add_argument("--max_batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--list_models", action="store_true", help="list the extractors and exit")
    return p


def list_models_table() -> str:
    from cbir.models import BACKBONES

    rows = [f"{'name':<10} {'input':>5}  {'backbone':<20} pretrained weights"]
    rows += [f"{s.name:<10} {s.input_size:>5}  {s.description:<20} {s.pretrained_source}" for s in BACKBONES.values()]
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.list_models:
        print(list_models_table())
        return
    if not args.training_data:
        parser().error("--training_data is required")
    options = {k: v for k, v in vars(args).items() if k not in ("scratch", "list_models")}
    config = TrainConfig(**options, pretrained=not args.scratch)
    summary = train(config)
    last = summary["history"][-1]
    print(f"trained {config.model} + {config.loss} on {summary['images']} images of {summary['classes']} classes "
          f"in {summary['seconds']:.0f} s; last epoch loss {last['loss']:.4f}"
          + (f", validation top-1 {last['val_top1']:.3f}" if last["val_top1"] is not None else ""))
    print(f"checkpoint: {summary['weights']}")
    if summary["best_weights"]:
        print(f"best epoch: {summary['best_weights']}")
    print(f"loss curve: {summary['loss_curve']}; log: {summary['log']}")


console_script = entry_point(main)
