"""Every extractor side by side: embedding size, input size, parameters, pretrained source, images/s on this CPU.

Throughput is inference only (eval mode, ``torch.inference_mode``), batches of ``--batch_size`` random images at
the model's own input size, the median of ``--repeats`` timed batches after one warm-up; image decoding and
resizing are not included. Weights are random (no ImageNet weights needed): speed does not depend on them.

Run by hand, on an otherwise idle machine (it builds every model, VGG19 and the autoencoders hold 100M+ weights):

    python benchmarks/extractors.py                      # all registered extractors
    python benchmarks/extractors.py --models densenet vae timm:vit_small_patch16_224
    python benchmarks/extractors.py --markdown           # the table for the README
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cbir.models import create_extractor, list_models
from cbir.models.registry import get_backbone


def measure(name: str, num_features: int, batch_size: int, repeats: int) -> dict:
    started = time.perf_counter()
    extractor = create_extractor(name, num_features, pretrained=False).eval()
    built = time.perf_counter() - started
    size = extractor.config["input_size"]
    images = torch.rand(batch_size, 3, size, size)
    times = []
    with torch.inference_mode():
        extractor(images)  # warm-up: allocator and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            extractor(images)
            times.append(time.perf_counter() - start)
    return {
        "name": name,
        "embedding": extractor.embedding_size,
        "input": size,
        "parameters": sum(p.numel() for p in extractor.parameters()),
        "pretrained": get_backbone(name, extractor.config.get("backbone_config")).pretrained_source,
        "images_per_s": batch_size / statistics.median(times),
        "build_s": built,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="names (default: every registered extractor)")
    p.add_argument("--num_features", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or list_models()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, batch {args.batch_size}, inference only, median of {args.repeats}")
    header = ("model", "embedding", "input", "parameters", "images/s", "pretrained weights")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---", "--:", "--:", "--:", "--:", "---"]) + "|")
    else:
        print(f"{header[0]:<28} {header[1]:>9} {header[2]:>5} {header[3]:>10} {header[4]:>9}  {header[5]}")
    for name in names:
        row = measure(name, args.num_features, args.batch_size, args.repeats)
        parameters = f"{row['parameters'] / 1e6:.1f}M"
        if args.markdown:
            print(f"| {name} | {row['embedding']} | {row['input']} | {parameters} | {row['images_per_s']:.1f} | "
                  f"{row['pretrained']} |", flush=True)
        else:
            print(f"{name:<28} {row['embedding']:>9} {row['input']:>5} {parameters:>10} {row['images_per_s']:>9.1f}  "
                  f"{row['pretrained']}", flush=True)


if __name__ == "__main__":
    main()
