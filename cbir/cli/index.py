"""cbir-index: embed every image under --path and add it to database --db_name (thesis: add_images.py)."""

from __future__ import annotations

import argparse

from cbir.cli.common import build_extractor, database_args, entry_point, extractor_args, generalise_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir-index", description="Add the images of a folder to a database.")
    p.add_argument("--path", required=True, help="a class-folder data set, a folder of images, or one image")
    p.add_argument("--rewrite", action="store_true", help="empty this database (and only this one) first")
    p.add_argument("--chunk", type=int, default=512,
                   help="images embedded before each database write (default: 512); a killed run loses at most "
                        "this many, and re-running adds only what is missing")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="embed on Ray workers (one per GPU, else one per node): alone, Ray on this machine; with the "
                        "ADDRESS of a running cluster, its nodes (then --redis_url must name a Redis they all reach)")
    p.add_argument("--ray_workers", type=int, default=None, help="with --ray: number of workers (default: as above)")
    generalise_args(p)
    database_args(p)
    extractor_args(p)
    return p


def main(argv=None) -> None:
    from cbir.database import Database
    from cbir.errors import CbirError
    from cbir.images import list_images
    from cbir.indexing import index_images

    args = parser().parse_args(argv)
    if args.chunk < 1:
        raise CbirError(f"--chunk must be at least 1, got {args.chunk}")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise CbirError(f"--ray_workers must be at least 1, got {args.ray_workers}")
    samples = list_images(args.path)  # checked before anything is opened or emptied
    if args.generalise in (1, 2):
        from cbir.labels import restrict_samples

        # Only the classes the extractor never saw (the "test" half of cbir.splits) go into the database.
        samples = restrict_samples(samples, "test", args.generalise, seed=args.split_seed, split_file=args.split_file)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url, create=True) as db:
        encoder = build_extractor(args, None if args.rewrite else db.extractor)
        if args.rewrite:
            db.clear()
        db.set_extractor(encoder.describe())
        if args.ray is None:
            summary = index_images(encoder, db, samples, batch_size=args.batch_size, num_workers=args.num_workers,
                                   chunk=args.chunk)
        else:
            summary = index_on_ray(args, encoder, samples)
            db.info()  # catches the FAISS index up with what the workers stored; saved on close
        print(summary.format(args.db_name, len(db)))
    if getattr(summary, "lost", None):
        raise CbirError(f"{len(summary.lost)} images were not stored; run the same command again to add them")


def index_on_ray(args, encoder, samples):
    from cbir.distributed import ray_index
    from cbir.errors import CbirError

    if not encoder.weights:
        raise CbirError("--ray workers load the extractor from its checkpoint: give --weights")
    return ray_index(samples, weights=encoder.weights, db_name=args.db_name, redis_url=args.redis_url,
                     home=args.home, address=None if args.ray == "local" else args.ray, backend=encoder.backend,
                     int8=encoder.precision == "int8", workers=args.ray_workers, chunk=args.chunk)


console_script = entry_point(main)
