"""cbir-index: embed every image under --path and add it to database --db_name (thesis: add_images.py)."""

from __future__ import annotations

import argparse

from cbir.cli.common import (at_least, build_extractor, check_extractor_args, check_generalise_args, command_parser,
                             database_args, describe_extractor, entry_point, extractor_args, generalise_args,
                             names_an_extractor)
from cbir.cli.slide_flags import slide_args, tiling_spec, wants_slides
from cbir.errors import CbirError


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-index", "Add the images of a folder to a database.")
    p.add_argument("--path", required=True,
                   help="a class-folder data set, a folder of images, or one image; or slides (see below)")
    p.add_argument("--rewrite", action="store_true",
                   help="replace this database's contents (and only this one's) by these images; it is emptied "
                        "only once the first of them are embedded")
    p.add_argument("--chunk", type=at_least(1), default=512,
                   help="images embedded before each database write (default: 512); a killed run loses at most "
                        "this many, and re-running adds only what is missing")
    p.add_argument("--shared_group", action="store_true",
                   help="share the database folder with its group (2770, files 0660) instead of keeping it private "
                        "to you (0700, files 0600); see SECURITY.md")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="embed on Ray workers (one per GPU, else one per node): alone, Ray on this machine; with the "
                        "ADDRESS of a running cluster, its nodes (then --redis_url must name a Redis they all reach)")
    p.add_argument("--ray_workers", type=at_least(1), default=None,
                   help="with --ray: number of workers (default: as above)")
    generalise_args(p)
    slide_args(p, indexing=True)
    database_args(p)
    extractor_args(p)
    return p


def check(args) -> bool:
    """Every flag, before a database is opened (or created); whether the database exists already."""
    from cbir.database import list_databases

    check_extractor_args(args)
    check_generalise_args(args)
    if args.ray is not None and wants_slides(args):
        raise CbirError("--ray spreads image files over workers; index slides without --ray")
    exists = args.db_name in list_databases(home=args.home, redis_url=args.redis_url)
    if not names_an_extractor(args) and (args.rewrite or not exists):
        state = "is rebuilt (--rewrite)" if args.rewrite else "does not exist yet"
        raise CbirError(f"database '{args.db_name}' {state}, so no extractor is recorded to index with: give "
                        f"--weights CHECKPOINT (from cbir-train), or --extractor NAME --num_features 0")
    return exists


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    existed = check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.images import list_images
    from cbir.database import Database
    from cbir.indexing import index_images
    from cbir.labels import restrict_samples

    slides = wants_slides(args)
    if slides:
        from cbir.slides.indexing import index_slides
        from cbir.slides.sources import list_slides

        sources = list_slides(args.path)
    else:
        samples = list_images(args.path)
        if args.generalise in (1, 2):
            # Only the classes the extractor never saw (the "test" half of cbir.labels) go into the database.
            samples = restrict_samples(samples, "test", args.generalise, seed=args.split_seed,
                                       split_file=args.split_file)
    extractor = build_extractor(args) if names_an_extractor(args) else None
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url, create=True,
                       shared_group=args.shared_group) as db:
        extractor = extractor or build_extractor(args, db.extractor)
        info = describe_extractor(extractor, args.weights or (db.extractor or {}).get("weights"))
        try:
            if slides:
                summary = index_slides(extractor, db, sources, tiling_spec(args, None if args.rewrite else db),
                                       mpp=args.mpp, mask_dir=args.mask_dir, batch_size=args.batch_size,
                                       num_workers=args.num_workers, chunk=args.chunk, rewrite=args.rewrite,
                                       extractor_info=info)
                if len(sources) == 1 and summary.skipped_slides:
                    raise CbirError(summary.skipped_slides[0][1])
            elif args.ray is not None:
                summary = index_on_ray(args, extractor, db, samples, info)
            else:
                summary = index_images(extractor, db, samples, batch_size=args.batch_size,
                                       num_workers=args.num_workers, chunk=args.chunk, rewrite=args.rewrite,
                                       extractor_info=info)
        except CbirError:
            if not existed and len(db) == 0:
                db.drop()  # made by this run, and nothing could go in: leave no empty database behind
            raise
        print(summary.format(args.db_name, len(db)))
    if getattr(summary, "lost", None):
        raise CbirError(f"{len(summary.lost)} images were not stored; run the same command again to add them")


def index_on_ray(args, encoder, db, samples, info):
    """The Ray workers write to the database; this process records the extractor first and catches FAISS up."""
    from cbir.distributed import ray_index

    if not encoder.weights:
        raise CbirError("--ray workers load the extractor from its checkpoint: give --weights")
    if args.rewrite:
        db.clear()
    db.set_extractor(info)
    summary = ray_index(samples, weights=encoder.weights, db_name=args.db_name, redis_url=args.redis_url,
                        home=args.home, address=None if args.ray == "local" else args.ray, backend=encoder.backend,
                        int8=encoder.precision == "int8", workers=args.ray_workers, chunk=args.chunk)
    db.info()  # catches the FAISS index up with what the workers stored; saved on close
    return summary


console_script = entry_point(main)
