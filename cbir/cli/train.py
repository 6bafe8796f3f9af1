"""cbir-train: train a feature extractor on a class-folder data set (thesis: train.py)."""

from __future__ import annotations

import argparse
import logging

from cbir.cli.common import entry_point, generalise_args
from cbir.training import PRECISIONS, SCHEDULERS, TrainConfig, train

log = logging.getLogger("cbir")


def parser() -> argparse.ArgumentParser:
    from cbir.losses import list_losses
    from cbir.models import check_model_name

    p = argparse.ArgumentParser(prog="cbir-train", description="Train a feature extractor (deep metric learning).")
    p.add_argument("--training_data", required=False, help="folder with one sub-folder per class")
    p.add_argument("--weights", default="weights/extractor.pt", help="where the checkpoint is written")
    p.add_argument("--model", default="densenet", type=check_model_name,
                   help="extractor (default: densenet; --list_models shows them all, or timm:<name>)")
    p.add_argument("--loss", default=None, choices=list_losses(),
                   help="loss (default: margin; autoencoders, VAE and BYOL train with their own objective and take "
                        "none)")
    p.add_argument("--num_features", type=int, default=128, help="embedding size (default: 128)")
    p.add_argument("--dr_model", action="store_true", help="wrap the CNN in the Deep Ranking architecture")
    p.add_argument("--num_epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--images_per_class", type=int, default=4, help="images of one class in a batch (default: 4)")
    p.add_argument("--augmented", action="store_true",
                   help="pair losses: the positive is a second augmented view of the anchor image (SimCLR-style)")
    p.add_argument("--non_contrastive", action="store_true", help="pair losses: positive pairs only, no negatives")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--decay", type=float, default=4e-4, help="weight decay")
    p.add_argument("--beta_lr", type=float, default=5e-4, help="learning rate of the margin loss's beta")
    p.add_argument("--gamma", type=float, default=0.3, help="scheduler factor")
    p.add_argument("--lr_proxies", type=float, default=1e-5, help="learning rate of proxies / class weights / centres")
    p.add_argument("--scheduler", default=None, choices=["None", *[s for s in SCHEDULERS if s]],
                   help="None (default), step (×gamma at half and at the end), exponential (×gamma each epoch)")
    p.add_argument("--freeze", action="store_true", help="train the head only")
    p.add_argument("--scratch", action="store_true", help="no ImageNet weights: train from random initialisation")
    p.add_argument("--pretrained_weights", default=None, help="ImageNet weights file for the backbone (offline use)")
    p.add_argument("--input_size", type=int, default=None,
                   help="override the backbone's input size (e.g. 128 for speed)")
    p.add_argument("--val_data", default=None, help="validation folder, scored by retrieval top-1 each epoch")
    p.add_argument("--val_fraction", type=float, default=0.0, help="or hold out this share of each training class")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu_id", type=int, default=None)
    p.add_argument("--parallel", action="store_true",
                   help="DistributedDataParallel over the processes torchrun starts (one per GPU; gloo on CPU): "
                        "torchrun --nproc_per_node=N -m cbir.cli.train --parallel ...")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: mixed precision on GPU (bf16, else fp16 with loss scaling), fp32 on CPU")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue a run from the checkpoint it wrote (same flags; --num_epochs may grow)")
    generalise_args(p)
    p.add_argument("--cluster_labels", default=None,
                   help="--generalise 3: the image -> cluster labels cbir-kmeans wrote (train on clusters, not "
                        "classes)")
    p.add_argument("--max_batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--list_models", action="store_true", help="list the extractors and exit")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.list_models:
        from cbir.models import models_table

        print(models_table(args.num_features))
        return
    if not args.training_data:
        parser().error("--training_data is required")
    options = {k: v for k, v in vars(args).items() if k not in ("scratch", "list_models")}
    if options["scheduler"] == "None":
        options["scheduler"] = None
    config = TrainConfig(**options, pretrained=not args.scratch)
    summary = train(config)
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
