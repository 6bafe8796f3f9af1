"""What a training step costs per backbone and input size, against EfficientNet-Lite0 at 224 px in the same run.

Each configuration builds its extractor and the margin loss and times forward, loss, backward and Adam step on one
fixed batch (class-balanced labels; random pixels: the cost does not depend on them, and decoding runs in a worker
beside the model in real training). The configurations alternate for ``--rounds`` rounds, so a busy machine slows
them alike; the median seconds per step, the ratio to the first configuration, and the projected time of the
default run on histo-bench (5 epochs of its 1,560 training images, 48 batches an epoch) are printed.

    .venv/bin/python benchmarks/step_cost.py --configs effnet:224 effnet:288 effnet_lite2:224 effnet_lite2:260
    .venv/bin/python benchmarks/step_cost.py --configs effnet:224:nchw effnet:224   # the memory layout's share

A configuration is ``backbone:input px``, in channels_last as ``cbir-train`` runs it, or ``backbone:px:nchw`` in
PyTorch's default layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbir.losses import create_loss  # noqa: E402
from cbir.models import create_extractor  # noqa: E402


def step_seconds(model, loss_fn, optimizer, images, labels, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["effnet:224", "effnet:288", "effnet_lite2:224", "effnet_lite2:260"])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--run_steps", type=int, default=240, help="steps of the run to project (histo-bench, 5 epochs)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    labels = torch.arange(args.batch_size) // 4
    setups = {}
    for config in args.configs:
        name, size, *layout = config.split(":")
        layout = torch.contiguous_format if layout == ["nchw"] else torch.channels_last
        model = create_extractor(name, 128, input_size=int(size)).train().to(memory_format=layout)
        loss_fn = create_loss("margin", num_classes=int(labels.max()) + 1, num_features=128)
        optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-4)
        images = torch.rand(args.batch_size, 3, int(size), int(size)).contiguous(memory_format=layout)
        step_seconds(model, loss_fn, optimizer, images, labels, 1)  # warm-up
        setups[config] = (model, loss_fn, optimizer, images)
    times = {config: [] for config in args.configs}
    for _ in range(args.rounds):
        for config, setup in setups.items():
            times[config].append(step_seconds(*setup, labels, args.steps))
    base = statistics.median(times[args.configs[0]])
    print(f"| backbone:input px | s per step of {args.batch_size} (median of {args.rounds}) | × {args.configs[0]} | "
          f"{args.run_steps} steps |")
    print("|---|--:|--:|--:|")
    for config, values in times.items():
        median = statistics.median(values)
        print(f"| {config} | {median:.2f} | {median / base:.2f} | {median * args.run_steps / 60:.1f} min |")


if __name__ == "__main__":
    main()
