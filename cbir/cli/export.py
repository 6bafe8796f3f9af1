"""cbir-export: a checkpoint as ONNX models beside it (m.onnx; with --int8 also m.int8.onnx), for --backend onnx."""

from __future__ import annotations

import argparse

from cbir.cli.common import entry_point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cbir-export",
        description="Export an extractor checkpoint to ONNX beside it: m.pt -> m.onnx (fp32; the other commands also "
                    "export it on first use into a private cache), and with --int8 m.int8.onnx, statically quantised "
                    "on a few hundred training images (commands use it with --int8).",
    )
    p.add_argument("--weights", required=True, help="extractor checkpoint written by cbir-train")
    p.add_argument("--int8", action="store_true", help="also write the int8 model (needs --calibration_data)")
    p.add_argument("--calibration_data", default=None,
                   help="with --int8: training images (a class-folder data set, or a folder of images)")
    p.add_argument("--calibration_images", type=int, default=300,
                   help="with --int8: images drawn evenly over the classes to calibrate on (default 300)")
    p.add_argument("--seed", type=int, default=0, help="which calibration images are drawn")
    p.add_argument("--num_workers", type=int, default=None, help="image-decoding workers (default: cores - 1)")
    return p


def main(argv=None) -> None:
    from cbir.errors import CbirError
    from cbir.export import calibration_samples, export_checkpoint
    from cbir.images import list_images

    args = parser().parse_args(argv)
    calibration = None
    if args.int8:
        if not args.calibration_data:
            raise CbirError("--int8 calibrates on training images: give --calibration_data FOLDER")
        if args.calibration_images < 1:
            raise CbirError(f"--calibration_images must be at least 1, got {args.calibration_images}")
        calibration = calibration_samples(list_images(args.calibration_data), args.calibration_images, args.seed)
    elif args.calibration_data:
        raise CbirError("--calibration_data is for --int8; the fp32 export needs no images")
    for path in export_checkpoint(args.weights, int8=args.int8, calibration=calibration, workers=args.num_workers):
        print(f"wrote {path}")


console_script = entry_point(main)
