"""cbir-index: embed every image under --path and add it to database --db_name (thesis: add_images.py)."""

from __future__ import annotations

import argparse

from cbir.cli.common import (build_extractor, database_args, describe_extractor, entry_point, extractor_args,
                             generalise_args)
from cbir.cli.slide_flags import slide_args, tiling_spec, wants_slides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir-index", description="Add the images of a folder to a database.")
    p.add_argument("--path", required=True,
                   help="a class-folder data set, a folder of images, or one image; or slides (see below)")
    p.add_argument("--rewrite", action="store_true", help="empty this database (and only this one) first")
    p.add_argument("--chunk", type=int, default=512,
                   help="images embedded before each database write (default: 512); a killed run loses at most "
                        "this many, and re-running adds only what is missing")
    generalise_args(p)
    slide_args(p, indexing=True)
    database_args(p)
    extractor_args(p)
    return p


def main(argv=None) -> None:
    from cbir.data import list_images
    from cbir.database import Database
    from cbir.errors import CbirError
    from cbir.indexing import index_images

    args = parser().parse_args(argv)
    if args.chunk < 1:
        raise CbirError(f"--chunk must be at least 1, got {args.chunk}")
    slides = wants_slides(args)
    if slides:
        from cbir.slides.sources import list_slides

        sources = list_slides(args.path)  # checked before anything is opened or emptied
    else:
        samples = list_images(args.path)
        if args.generalise in (1, 2):
            from cbir.labels import restrict_samples

            # Only the classes the extractor never saw (the "test" half of cbir.splits) go into the database.
            samples = restrict_samples(samples, "test", args.generalise, seed=args.split_seed,
                                       split_file=args.split_file)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url, create=True) as db:
        extractor = build_extractor(args, None if args.rewrite else db.extractor)
        info = describe_extractor(extractor, args.weights or (db.extractor or {}).get("weights"))
        if args.rewrite:
            db.clear()
        db.set_extractor(info)
        if slides:
            from cbir.slides.indexing import index_slides

            summary = index_slides(extractor, db, sources, tiling_spec(args, db), mpp=args.mpp,
                                   mask_dir=args.mask_dir, batch_size=args.batch_size,
                                   num_workers=args.num_workers, chunk=args.chunk)
            if len(sources) == 1 and summary.skipped_slides:
                raise CbirError(summary.skipped_slides[0][1])
        else:
            summary = index_images(extractor, db, samples, batch_size=args.batch_size,
                                   num_workers=args.num_workers, chunk=args.chunk)
        print(summary.format(args.db_name, len(db)))


console_script = entry_point(main)
