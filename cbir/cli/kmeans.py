"""cbir-kmeans: k-means clusters of images, the elbow and silhouette plots, and the labels of --generalise 3."""

from __future__ import annotations

import argparse

from cbir.cli.common import (at_least, build_extractor, check_extractor_args, command_parser, database_args,
                             entry_point, extractor_args)
from cbir.errors import CbirError
from cbir.files import check_output_folder


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "cbir-kmeans",
        "MiniBatchKMeans (k-means++) on the embeddings of a database (default) or of a folder "
        "(--path with --weights), or on raw pixels (--pixels). Writes the centres (.npy), the image -> "
        "cluster labels (JSON), the elbow and silhouette plots into --out.",
    )
    p.add_argument("--path", default=None,
                   help="a folder of images (class folders or flat) to embed with --weights (default: the extractor "
                        "of database --db_name); without --path the database's stored vectors are clustered")
    p.add_argument("--pixels", action="store_true",
                   help="cluster raw pixels (as the thesis did) of --path's images, or of the database's images")
    p.add_argument("--pixel_size", type=at_least(1), default=224,
                   help="with --pixels: resize to this square (default 224)")
    p.add_argument("--n_clusters", type=at_least(2), default=10, help="number of clusters (default 10)")
    p.add_argument("--elbow_range", default="2:20",
                   help="k values of the elbow and silhouette plots: START:STOP[:STEP] (inclusive), 'k1,k2,...', "
                        "or none (default 2:20, capped below the number of images)")
    p.add_argument("--out", default="kmeans", help="folder for the model, labels and plots (default ./kmeans)")
    p.add_argument("--load", default=None, choices=["complete", "partial"],
                   help="complete: reuse the saved model and labels; partial: reuse the saved model and label the "
                        "given images with it (e.g. the query folder, for cbir-eval --generalise 3); "
                        "left out: fit anew")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--kmeans_batch_size", type=at_least(1), default=1024, help="MiniBatchKMeans batch size")
    database_args(p)
    extractor_args(p)
    return p


def check(args) -> None:
    check_extractor_args(args)
    if args.weights and not args.path:
        raise CbirError("--weights embeds a folder: give it with --path (without --path the database's stored "
                        "vectors are clustered)")
    check_output_folder(args.out, "out")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.images import Sample, list_images
    from cbir.database import Database
    from cbir.kmeans import embeddings_from_database, embeddings_from_folder, pixels_of, run_kmeans

    inputs = None
    if args.load != "complete":
        if args.path:
            samples = list_images(args.path)
            if args.pixels:
                inputs = pixels_of(samples, args.pixel_size, source=args.path)
            else:
                recorded = None
                if not args.weights and not (args.extractor and args.num_features == 0):
                    # No extractor named: the one the database was built with, so folder and database agree.
                    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
                        recorded = db.extractor
                extractor = build_extractor(args, recorded)
                inputs = embeddings_from_folder(extractor, samples, batch_size=args.batch_size,
                                                num_workers=args.num_workers, source=args.path)
        else:
            with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
                if args.pixels:
                    # Keyed by the database's own paths, as cbir-eval gets them back from a search.
                    samples = [Sample(path, cls) for _, path, cls in db.items()]
                    if not samples:
                        raise CbirError(f"database '{args.db_name}' is empty: index images first (cbir-index)")
                    inputs = pixels_of(samples, args.pixel_size, absolute=False, source=f"database '{args.db_name}'")
                else:
                    inputs = embeddings_from_database(db)
    run = run_kmeans(inputs, args.out, n_clusters=args.n_clusters, elbow_range=args.elbow_range, load=args.load,
                     seed=args.seed, batch_size=args.kmeans_batch_size)
    print(run.format())


console_script = entry_point(main)
