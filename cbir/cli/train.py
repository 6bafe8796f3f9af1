"""cbir-train: train a feature extractor on a class-folder data set (thesis: train.py).

The flags are :class:`cbir.training.TrainConfig`'s fields, with its defaults; :func:`cbir.training.check_config`
refuses a bad value before any work (the one check of this command), and its messages name these flags.
"""

from __future__ import annotations

import argparse

from cbir.cli.common import command_parser, entry_point, generalise_args
from cbir.training import DEFAULTS, PRECISIONS, SCHEDULERS, TrainConfig, train


def _scheduler(text: str) -> str | None:
    return None if text in ("None", "none") else text


def parser() -> argparse.ArgumentParser:
    from cbir.data import AUGMENTATIONS
    from cbir.losses import list_losses
    from cbir.models import POOLINGS, TTA_COUNTS, check_model_name

    d = DEFAULTS
    p = command_parser("cbir-train", "Train a feature extractor (deep metric learning).")
    p.add_argument("--training_data", required=False, help="folder with one sub-folder per class")
    p.add_argument("--weights", default=d["weights"], help=f"where the checkpoint is written (default: {d['weights']})")
    p.add_argument("--model", default=d["model"], type=check_model_name,
                   help=f"extractor (default: {d['model']}; --list_models shows them all, or timm:<name>)")
    p.add_argument("--loss", default=d["loss"], choices=list_losses(),
                   help="loss (default: margin; autoencoders, VAE and BYOL train with their own objective and take "
                        "none)")
    p.add_argument("--num_features", type=int, default=d["num_features"],
                   help=f"embedding size (default: {d['num_features']})")
    p.add_argument("--dr_model", action="store_true", help="wrap the CNN in the Deep Ranking architecture")
    p.add_argument("--num_epochs", type=int, default=d["num_epochs"], help=f"(default: {d['num_epochs']})")
    p.add_argument("--batch_size", type=int, default=d["batch_size"], help=f"(default: {d['batch_size']})")
    p.add_argument("--images_per_class", type=int, default=d["images_per_class"],
                   help="images of one class in a batch")
    p.add_argument("--augmented", action="store_true",
                   help="pair losses: the positive is a second augmented view of the anchor image (SimCLR-style)")
    p.add_argument("--non_contrastive", action="store_true", help="pair losses: positive pairs only, no negatives")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"learning rate of the backbone (default: {d['lr']:g})")
    p.add_argument("--head_lr_scale", type=float, default=d["head_lr_scale"],
                   help=f"the embedding head learns this many times faster than the backbone (default: "
                        f"{d['head_lr_scale']:g})")
    p.add_argument("--decay", type=float, default=d["decay"], help="weight decay")
    p.add_argument("--beta_lr", type=float, default=d["beta_lr"], help="learning rate of the margin loss's beta")
    p.add_argument("--gamma", type=float, default=d["gamma"], help="scheduler factor")
    p.add_argument("--lr_proxies", type=float, default=d["lr_proxies"],
                   help="learning rate of proxies / class weights / centres")
    p.add_argument("--scheduler", default=d["scheduler"], type=_scheduler, choices=[None, *SCHEDULERS],
                   help="None (default: constant), cosine (linear warm-up over the first tenth of the steps, then "
                        "cosine decay to 0), step (×gamma at half and at the end), exponential (×gamma each epoch)")
    p.add_argument("--ema", type=float, default=d["ema"],
                   help="keep an exponential moving average of the weights with this decay (with warm-up), and "
                        "validate and save it (default: 0, off)")
    p.add_argument("--augmentation", default=d["augmentation"], choices=list(AUGMENTATIONS),
                   help=", ".join(f"{name} ({'default: ' if name == d['augmentation'] else ''}{recipe.__doc__})"
                                  for name, recipe in AUGMENTATIONS.items()))
    p.add_argument("--freeze", action="store_true", help="train the head only")
    p.add_argument("--freeze_bn", action="store_true",
                   help="keep the backbone's BatchNorm statistics as pretrained (its weights still learn)")
    p.add_argument("--tta", type=int, nargs="?", const=8, default=d["tta"], choices=(0, *TTA_COUNTS),
                   help="the checkpoint embeds an image as the mean vector over its right-angle orientations "
                        "(test-time augmentation): 4 the rotations (default), --tta alone all eight, --tta 2 the "
                        "image and its mirror image, --tta 0 none; N times the cost of every vector")
    p.add_argument("--pooling", default=d["pooling"], choices=list(POOLINGS),
                   help="how the backbone pools its feature maps: avg (default), gem (generalised mean, p = 3)")
    p.add_argument("--scratch", action="store_true", help="no ImageNet weights: train from random initialisation")
    p.add_argument("--pretrained_weights", default=None, help="ImageNet weights file for the backbone (offline use)")
    p.add_argument("--input_size", type=int, default=None,
                   help="override the backbone's input size (e.g. 128 for speed)")
    p.add_argument("--val_data", default=None, help="validation folder, scored by retrieval top-1 each epoch")
    p.add_argument("--val_fraction", type=float, default=d["val_fraction"],
                   help="or hold out this share of each training class")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--gpu_id", type=int, default=None)
    p.add_argument("--parallel", action="store_true",
                   help="DistributedDataParallel over the processes torchrun starts (one per GPU; gloo on CPU): "
                        "torchrun --nproc_per_node=N -m cbir.cli.train --parallel ...")
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS,
                   help="auto: mixed precision on GPU (bf16, else fp16 with loss scaling), fp32 on CPU")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue a run from the checkpoint it wrote (same flags; --num_epochs may grow; its learning "
                        "rates go on)")
    generalise_args(p, cluster_help="--generalise 3: the image -> cluster labels cbir-kmeans wrote (train on "
                                    "clusters, not classes)")
    p.add_argument("--min_batches", type=int, default=d["min_batches"],
                   help=f"metric learning: each epoch draws at least this many batches, so a small data set still "
                        f"trains (default: {d['min_batches']})")
    p.add_argument("--max_batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--list_models", action="store_true", help="list the extractors (what each name is) and exit")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.list_models:
        from cbir.models import models_table

        print(models_table(args.num_features))
        return
    if not args.training_data:
        p.error("--training_data is required")
    options = {k: v for k, v in vars(args).items() if k not in ("scratch", "list_models")}
    config = TrainConfig(**options, pretrained=not args.scratch)
    summary = train(config)  # checks every value first (cbir.training.check_config)
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for all
        return
    last = summary["history"][-1]
    objective = summary["loss"] or "its own objective"
    print(f"trained {config.model} + {objective} on {summary['images']} images of {summary['classes']} classes "
          f"in {summary['seconds']:.0f} s; last epoch loss {last['loss']:.4f}"
          + (f", validation top-1 {last['val_top1']:.3f}" if last["val_top1"] is not None else ""))
    print(f"checkpoint: {summary['weights']}")
    if summary["world_size"] > 1:
        print(f"{summary['world_size']} processes (DistributedDataParallel)")
    if summary["best_weights"]:
        print(f"best epoch: {summary['best_weights']}")
    print(f"loss curve: {summary['loss_curve']}; log: {summary['log']}")


console_script = entry_point(main)


if __name__ == "__main__":  # torchrun -m cbir.cli.train ...
    console_script()
