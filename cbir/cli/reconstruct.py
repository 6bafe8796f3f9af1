"""cbir-reconstruct: each image beside its reconstruction by a trained autoencoder (thesis: rec_images.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cbir.cli.common import at_least, command_parser, entry_point
from cbir.errors import CbirError
from cbir.files import check_input_file, check_output_folder, make_folders, save_atomically

GAP = 4  # white pixels between the input and its reconstruction


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "cbir-reconstruct",
        "Write each image next to its reconstruction by an autoencoder checkpoint "
        "(vae, auto, vgg16, vgg11, resnet18, resnet50).")
    p.add_argument("--weights", required=True, help="autoencoder checkpoint written by cbir-train")
    p.add_argument("--path", required=True, help="an image, a folder of images, or a folder of class folders")
    p.add_argument("--out", default="reconstructions", help="where the PNGs go (default: reconstructions)")
    p.add_argument("--max_images", type=at_least(1), default=None, help="stop after this many images (default: all)")
    p.add_argument("--batch_size", type=at_least(1), default=16)
    p.add_argument("--gpu_id", type=at_least(0), default=None)
    return p


def _pixels(tensor, mean, std):
    """A (3, H, W) tensor as prepared by the extractor's transform → uint8 (H, W, 3), normalisation undone."""
    import torch

    image = tensor.cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def side_by_side(original, rebuilt):
    import numpy as np

    height = original.shape[0]
    gap = np.full((height, GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([original, gap, rebuilt], axis=1)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    check_input_file(args.weights, "weights")
    out = check_output_folder(args.out, "out")

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    import torch
    from PIL import Image

    from cbir.data import UnreadableImage, list_images, load_image
    from cbir.embedding import pick_device
    from cbir.models import read_checkpoint
    from cbir.models.extractor import extractor_from_checkpoint, reconstructing_models
    from cbir.models.registry import get_backbone

    payload = read_checkpoint(args.weights)
    config = payload["config"]
    # Refuse before building the model: a classifier checkpoint can be hundreds of megabytes of wasted work.
    if get_backbone(config["model"], config.get("backbone_config")).kind != "autoencoder":
        raise CbirError(f"{args.weights} holds a '{config['model']}' extractor, which does not reconstruct images; "
                        f"cbir-reconstruct needs an autoencoder checkpoint ({', '.join(reconstructing_models())})")
    samples = list_images(args.path)
    if args.max_images:
        samples = samples[: args.max_images]
    device = pick_device(args.gpu_id)
    extractor = extractor_from_checkpoint(payload).to(device)
    transform = extractor.transform(train=False)
    mean, std = extractor.config["mean"], extractor.config["std"]
    make_folders(out)

    written, skipped, squared_error = [], [], 0.0
    batch_size = args.batch_size or 32
    for start in range(0, len(samples), batch_size):
        batch, kept = [], []
        for sample in samples[start:start + batch_size]:
            try:
                batch.append(transform(load_image(sample.path)))
                kept.append(sample)
            except UnreadableImage:
                skipped.append(sample)
        if not batch:
            continue
        images = torch.stack(batch).to(device)
        with torch.inference_mode():
            rebuilt = extractor.reconstruct(images)
            # The error is measured on the images as the autoencoder sees them ([0, 1] after its transform).
            squared_error += torch.nn.functional.mse_loss(rebuilt, images, reduction="sum").item() / images[0].numel()
        for sample, image, reconstruction in zip(kept, images, rebuilt):
            name = f"{sample.class_name}_{Path(sample.path).stem}_reconstruction.png"
            target = out / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
            pair = side_by_side(_pixels(image, mean, std), _pixels(reconstruction, [0, 0, 0], [1, 1, 1]))
            save_atomically(target, Image.fromarray(pair).save)
            written.append(target)
    if not written:
        raise CbirError(f"no readable image under {args.path}")
    print(f"wrote {len(written)} input | reconstruction images to {out} "
          f"(mean squared error {squared_error / len(written):.4f})")
    for sample in skipped:
        print(f"skipped unreadable {sample.path}")


console_script = entry_point(main)
