"""cbir-index: embed every image under --path and add it to database --db_name (thesis: add_images.py)."""

from __future__ import annotations

import argparse

from cbir.cli.common import (build_extractor, database_args, describe_extractor, entry_point, extractor_args,
                             generalise_args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir-index", description="Add the images of a folder to a database.")
    p.add_argument("--path", required=True, help="a class-folder data set, a folder of images, or one image")
    p.add_argument("--rewrite", action="store_true", help="empty this database (and only this one) first")
    p.add_argument("--chunk", type=int, default=512,
                   help="images embedded before each database write (default: 512); a killed run loses at most "
                        "this many, and re-running adds only what is missing")
    p.add_argument("--shared_group", action="store_true",
                   help="share the database folder with its group (2770, files 0660) instead of keeping it private "
                        "to you (0700, files 0600); see SECURITY.md")
    generalise_args(p)
    database_args(p)
    extractor_args(p)
    return p


def main(argv=None) -> None:
    from cbir.data import list_images
    from cbir.database import Database
    from cbir.indexing import index_images

    args = parser().parse_args(argv)
    if args.chunk < 1:
        from cbir.errors import CbirError

        raise CbirError(f"--chunk must be at least 1, got {args.chunk}")
    samples = list_images(args.path)  # checked before anything is opened or emptied
    if args.generalise in (1, 2):
        from cbir.labels import restrict_samples

        # Only the classes the extractor never saw (the "test" half of cbir.splits) go into the database.
        samples = restrict_samples(samples, "test", args.generalise, seed=args.split_seed, split_file=args.split_file)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url, create=True,
                       shared_group=args.shared_group) as db:
        extractor = build_extractor(args, None if args.rewrite else db.extractor)
        info = describe_extractor(extractor, args.weights or (db.extractor or {}).get("weights"))
        if args.rewrite:
            db.clear()
        db.set_extractor(info)
        summary = index_images(extractor, db, samples, batch_size=args.batch_size, num_workers=args.num_workers,
                               chunk=args.chunk)
        print(summary.format(args.db_name, len(db)))


console_script = entry_point(main)
