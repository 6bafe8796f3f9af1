"""cbir-retrieve: the most similar stored images of a query image, or of one random image per class of a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbir.cli.common import (at_least, build_extractor, check_extractor_args, command_parser, database_args,
                             entry_point, extractor_args)
from cbir.cli.slide_flags import slide_args, tiling_spec, wants_slides
from cbir.errors import CbirError
from cbir.files import check_output_folder


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-retrieve", "Search a database with a query image.")
    p.add_argument("--path", required=True, help="a query image, or a folder of class folders (one query per class)")
    p.add_argument("--nrt_neigh", type=at_least(1), default=10, help="number of neighbours (default: 10)")
    p.add_argument("--results_dir", default="results", help="where the neighbours and the figure go")
    p.add_argument("--nprobe", type=at_least(1), default=None, help="inverted lists searched (approximate index only)")
    p.add_argument("--seed", type=at_least(0), default=0, help="picks the query of each class in the folder form")
    p.add_argument("--region", default=None,
                   help="x,y,w,h in full-resolution pixels: search with this region of the slide --path for similar "
                        "tiles (without it, a slide query returns similar slides)")
    slide_args(p)
    database_args(p)
    extractor_args(p)
    return p


def check(args) -> None:
    check_extractor_args(args)
    if not Path(args.path).exists():
        raise CbirError(f"query {args.path} does not exist")
    check_output_folder(args.results_dir, "results_dir")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.images import list_images
    from cbir.database import Database
    from cbir.naming import printable
    from cbir.retrieval import one_query_per_class, save_retrieval, search_samples

    if wants_slides(args):
        return retrieve_slide(args)
    path = Path(args.path)
    single = path.is_file()
    queries = list_images(path) if single else one_query_per_class(list_images(path), args.seed)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        extractor = build_extractor(args, db.extractor)
        retrievals, unreadable = search_samples(extractor, db, queries, args.nrt_neigh, nprobe=args.nprobe,
                                                batch_size=args.batch_size, num_workers=args.num_workers)
    if single and unreadable:
        raise CbirError(f"query {path} is not a readable image")
    missing = []
    for retrieval in retrievals:
        saved = save_retrieval(retrieval, args.results_dir, per_class=not single)
        missing += saved.missing
        # a lone file's class is its folder's name; one in the working folder has none to show
        label = f" ({printable(retrieval.query.class_name)})" if retrieval.query.class_name else ""
        print(f"query {printable(retrieval.query.path)}{label}:")
        for n in retrieval.neighbours:
            mark = "+" if n.class_name == retrieval.query.class_name else " "
            print(f"  {mark}{n.rank:>3}  {n.distance:.4f}  {printable(n.class_name):<24} {printable(n.path)}")
        print(f"  figure: {printable(saved.figure)}")
    for sample in unreadable:
        print(f"skipped unreadable query {printable(sample.path)}")
    if missing:
        files = len({n.path for n, _ in missing})
        print(f"{len(missing)} results ({files} files) could not be shown, marked in the figures: their files moved, "
              f"were removed or are no longer images since indexing, e.g. {printable(missing[0][1])}; remove them "
              f"with cbir-db remove, or index their new place", file=sys.stderr)


def retrieve_slide(args) -> None:
    from cbir.database import Database
    from cbir.slides.retrieval import search_slide
    from cbir.slides.sources import list_slides

    sources = list_slides(args.path)
    if len(sources) != 1:
        raise CbirError(f"--path names {len(sources)} slides; give one slide file to search with")
    region = None
    if args.region is not None:
        try:
            region = [int(float(v)) for v in args.region.split(",")]
        except ValueError:
            region = []
        if len(region) != 4:
            raise CbirError(f"--region must be x,y,w,h (full-resolution pixels), got {args.region!r}")
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        extractor = build_extractor(args, db.extractor)
        result = search_slide(extractor, db, sources[0], tiling_spec(args, db), args.nrt_neigh, region=region,
                              mpp=args.mpp, nprobe=args.nprobe, batch_size=args.batch_size,
                              num_workers=args.num_workers, results_dir=args.results_dir)
    print(result.format())


console_script = entry_point(main)
