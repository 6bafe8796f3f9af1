"""What asking PyTorch for huge pages (``THP_MEM_ALLOC_ENABLE=1`` in the environment) is worth on this machine:
a training step and an embedding batch of EfficientNet-Lite0 at 224 px, each in a fresh process with the setting off
(torch's default) and on, alternating for ``--rounds`` rounds so that a busy machine slows both alike.

    .venv/bin/python benchmarks/huge_pages.py --rounds 3

The kernel's mode decides what the setting can change: with transparent huge pages ``always`` every large buffer
gets them anyway (ratio about 1), with ``never`` none does; ``madvise`` is where it matters, and there it has
measured 1.53x faster and 0.51x on the same machine two hours apart (README), so cbir leaves it to the user.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

def child(steps: int) -> dict:
    """Seconds per training step (batch 32) and per embedding batch (32), this process's setting as it is."""
    import torch

    from step_cost import step_seconds  # this folder is on the path: the script's own
    from cbir.losses import create_loss
    from cbir.models import create_extractor

    torch.manual_seed(0)
    labels = torch.arange(32) // 4
    model = create_extractor("effnet", 128, input_size=224).train().to(memory_format=torch.channels_last)
    loss_fn = create_loss("margin", num_classes=8, num_features=128)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-4)
    images = torch.rand(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    step_seconds(model, loss_fn, optimizer, images, labels, 1)  # warm-up
    out = {"train_step": step_seconds(model, loss_fn, optimizer, images, labels, steps)}
    model.eval()
    with torch.inference_mode():
        model(images)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            model(images)
    return out | {"embed_batch": (time.perf_counter() - started) / steps}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"transparent huge pages: {mode.read_text().strip() if mode.exists() else 'unknown'}")
    times = {"0": [], "1": []}
    for _ in range(args.rounds):
        for setting in times:
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
            done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                                  capture_output=True, text=True, check=True)
            times[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| work (median of {args.rounds}) | off, s | on, s | off / on |")
    print("|---|--:|--:|--:|")
    for name in ("train_step", "embed_batch"):
        off, on = (statistics.median(r[name] for r in times[s]) for s in ("0", "1"))
        print(f"| {name.replace('_', ' ')} of 32 | {off:.2f} | {on:.2f} | {off / on:.2f} |")


if __name__ == "__main__":
    main()
