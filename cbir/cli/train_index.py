"""cbir-train-index: turn a database's exact index into an approximate one (thesis: db.py)."""

from __future__ import annotations

import argparse

from cbir.cli.common import at_least, command_parser, database_args, entry_point


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-train-index",
                       "Train an inverted-file (or any FAISS factory) index on the stored vectors.")
    p.add_argument("--nlist", type=at_least(1), default=None,
                   help="inverted lists (default: about sqrt of the image count)")
    p.add_argument("--factory", default=None, help='any FAISS factory string instead, e.g. "IVF1024,PQ32" or "HNSW32"')
    database_args(p)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.database import Database

    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        print(db.train_index(nlist=args.nlist, factory=args.factory))


console_script = entry_point(main)
