"""cbir-tsne: a t-SNE map of a database's stored vectors, coloured by class (and by k-means cluster)."""

from __future__ import annotations

import argparse

from cbir.cli.common import at_least, command_parser, database_args, entry_point, positive
from cbir.files import check_output_file
from cbir.labels import read_cluster_labels


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "cbir-tsne",
        "2-d t-SNE (scikit-learn) of the vectors stored in a database, coloured by class; with "
        "--cluster_labels a second panel coloured by k-means cluster. Writes a PNG.",
    )
    p.add_argument("--out", default=None, help="PNG to write (default: tsne_<db_name>.png)")
    p.add_argument("--cluster_labels", default=None,
                   help="image -> cluster labels JSON {path: cluster} (cbir-kmeans --out FOLDER writes "
                        "FOLDER/cluster_labels.json; the folder itself is accepted)")
    p.add_argument("--perplexity", type=positive, default=30.0, help="t-SNE perplexity (default 30)")
    p.add_argument("--max_points", type=at_least(0), default=5000,
                   help="draw at most this many images, sampled evenly over the classes (default 5000; 0 = all)")
    p.add_argument("--seed", type=at_least(0), default=0)
    database_args(p)
    return p


def check(args) -> tuple[str, dict | None]:
    """Every flag before any work: (the PNG to write, the cluster labels or None)."""
    out = args.out or f"tsne_{args.db_name}.png"
    check_output_file(out, "out", suffix=".png")
    return out, read_cluster_labels(args.cluster_labels) if args.cluster_labels else None


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    out, labels = check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.database import Database
    from cbir.tsne import tsne_of_database

    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        result = tsne_of_database(db, out, perplexity=args.perplexity, max_points=args.max_points or None,
                                  seed=args.seed, cluster_labels=labels)
    print(result.format())


console_script = entry_point(main)
