"""Training throughput of cbir.training.train against a bare PyTorch loop on the same batches.

Both sides build the same extractor and loss from the same seed, read the same class-balanced batches of the same
folder through a DataLoader with the same workers, and run the same forward, loss, backward and Adam step (under the
same autocast on GPU). The bare loop has nothing else: no per-image seeding, no logging, no DDP wrapper, no loss
bookkeeping. Images/s are taken per epoch, the first epoch left out (warm-up: worker start, cuDNN autotuning), and
the two sides alternate for --rounds rounds so that a busy machine slows both alike; the median ratio is printed.

    .venv/bin/python benchmarks/train_throughput.py                       # synthetic data, effnet, 64 px
    .venv/bin/python benchmarks/train_throughput.py --data ../shared/data/histo-bench/train --input_size 224 \\
        --batch_size 64 --batches 50 --num_workers 8                      # the real measurement (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbir.data import ClassBalancedBatches, ImageDataset, collate_skipping, list_samples  # noqa: E402
from cbir.embedding import pick_device  # noqa: E402
from cbir.losses import create_loss  # noqa: E402
from cbir.models import create_extractor, prefers_channels_last  # noqa: E402
from cbir.synthetic import make_dataset  # noqa: E402
from cbir.training import TrainConfig, resolve_precision, seed_everything, train  # noqa: E402


def bare_loop(args, data: Path, device: torch.device) -> list[float]:
    """images/s of each epoch of a plain loop: DataLoader → forward → loss → backward → step."""
    seed_everything(args.seed)
    samples = list_samples(data)
    class_names = sorted({s.class_name for s in samples})
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    extractor = create_extractor(args.model, args.num_features, pretrained=not args.scratch,
                                 input_size=args.input_size, class_names=class_names).to(device)
    loss_fn = create_loss(args.loss, num_classes=len(class_names), num_features=extractor.embedding_size).to(device)
    layout = torch.channels_last if prefers_channels_last(extractor) else torch.contiguous_format  # as cbir.training
    extractor.to(memory_format=layout)
    optimizer = torch.optim.Adam(
        [{"params": [p for p in extractor.parameters() if p.requires_grad]},
         *loss_fn.param_groups(lr_proxies=1e-5, beta_lr=5e-4)], lr=1e-4, weight_decay=4e-4)
    sampler = ClassBalancedBatches([class_to_idx[s.class_name] for s in samples], args.batch_size,
                                   args.images_per_class, seed=args.seed)
    loader = DataLoader(ImageDataset(samples, extractor.transform(train=True), class_to_idx), batch_sampler=sampler,
                        num_workers=args.num_workers, collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    amp_dtype = resolve_precision(args.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loss_fn.reseed(args.seed)
    extractor.train()
    rates = []
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for step, (images, labels, _) in enumerate(loader, 1):
            images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
            with autocast():
                loss = loss_fn(extractor(images), labels)  # the pair losses draw their rows from the CPU labels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(images)
            if step >= args.batches:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def cbir_loop(args, data: Path, out: Path) -> list[float]:
    config = TrainConfig(
        training_data=str(data), weights=str(out / "bench.pt"), model=args.model, loss=args.loss,
        num_features=args.num_features, num_epochs=args.epochs, batch_size=args.batch_size,
        images_per_class=args.images_per_class, pretrained=not args.scratch, input_size=args.input_size,
        num_workers=args.num_workers, seed=args.seed, max_batches=args.batches, precision=args.precision,
        progress=False,
    )
    return [row["images_per_s"] for row in train(config)["history"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="class-folder training data (default: a synthetic set)")
    p.add_argument("--model", default="effnet")
    p.add_argument("--loss", default="margin")
    p.add_argument("--num_features", type=int, default=128)
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--images_per_class", type=int, default=4)
    p.add_argument("--batches", type=int, default=10, help="batches per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    p.add_argument("--rounds", type=int, default=2, help="bare / cbir runs, alternated")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--precision", default="auto")
    p.add_argument("--scratch", action="store_true", help="no pretrained weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else make_dataset(tmp / "data", splits={"train": 40},
                                                              size=args.input_size)["train"]
        bare, ours = [], []
        for round_no in range(args.rounds):
            bare += bare_loop(args, data, device)[1:]
            ours += cbir_loop(args, data, tmp)[1:]
            print(f"after round {round_no + 1} (medians so far): bare {statistics.median(bare):.1f} images/s, "
                  f"cbir {statistics.median(ours):.1f} images/s", flush=True)
    bare_rate, our_rate = statistics.median(bare), statistics.median(ours)
    print(f"device {device}, {args.model} + {args.loss}, {args.input_size} px, batch {args.batch_size}, "
          f"{args.batches} batches x {args.epochs - 1} timed epochs x {args.rounds} rounds, {args.num_workers} workers")
    print(f"bare PyTorch loop   {bare_rate:8.1f} images/s")
    print(f"cbir.training.train {our_rate:8.1f} images/s")
    print(f"ratio {our_rate / bare_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
