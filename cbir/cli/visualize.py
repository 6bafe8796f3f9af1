"""cbir-visualize: the data-set figures of the thesis's visualization step, into data_visualization/<name>."""

from __future__ import annotations

import argparse
from pathlib import Path

from cbir.cli.common import at_least, command_parser, entry_point
from cbir.files import check_output_folder


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "cbir-visualize",
        "Figures of a data set: samples per class, images per class and split (counts and shares), "
        "image sizes, pixel mean and std per channel, a preview of the training augmentation; and "
        "stats.json / stats.csv. --path is a folder of split folders (train/index/query, or any "
        "sub-folders that are class-folder data sets) or a single class-folder data set.",
    )
    p.add_argument("--path", required=True, help="data set root")
    p.add_argument("--out", default=None, help="output folder (default: data_visualization/<name of --path>)")
    p.add_argument("--samples_per_class", type=at_least(1), default=6,
                   help="images per class in the sample grid (default 6)")
    p.add_argument("--max_per_class", type=at_least(0), default=200,
                   help="image sizes and pixel statistics: at most this many images per class and split, sampled "
                        "(default 200; 0 = all); counts always cover every image")
    p.add_argument("--thumbnail", type=at_least(1), default=64,
                   help="pixel statistics are computed on images resized to this square, for speed (default 64)")
    p.add_argument("--augment_images", type=at_least(1), default=4,
                   help="images in the augmentation preview (default 4)")
    p.add_argument("--augment_views", type=at_least(1), default=5, help="augmented views of each (default 5)")
    p.add_argument("--input_size", type=at_least(16), default=224,
                   help="input size of the augmentation preview (default 224)")
    p.add_argument("--seed", type=at_least(0), default=0)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    root = Path(args.path)
    out = check_output_folder(args.out or Path("data_visualization") / (root.resolve().name or "data"), "out")

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.visualize import visualize_dataset

    stats = visualize_dataset(root, out, samples_per_class=args.samples_per_class,
                              max_per_class=args.max_per_class or None, thumbnail=args.thumbnail,
                              augment_images=args.augment_images, augment_views=args.augment_views,
                              input_size=args.input_size, seed=args.seed)
    print(stats.format())
    print(f"numbers: {out / 'stats.json'}, {out / 'stats.csv'}")


console_script = entry_point(main)
