"""cbir-eval: retrieval accuracy of a database on a query folder, by the thesis's protocols (test_accuracy.py)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from cbir.cli.common import (at_least, build_extractor, check_extractor_args, check_generalise_args,
                             check_protocol_args, command_parser, database_args, entry_point, extractor_args,
                             generalise_args, protocol_args)
from cbir.cli.slide_flags import slide_args, tiling_spec


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-eval", "Measure retrieval accuracy (nine numbers + timings).")
    protocol_args(p, default_measure="random")
    p.add_argument("--exclude_same", default=None,
                   help="regex with one group on the file name (slide/patient id): results sharing it are ignored")
    p.add_argument("--name", default=None, help="separated: sheet name (default: the database name)")
    p.add_argument("--nprobe", type=at_least(1), default=None, help="inverted lists searched (approximate index only)")
    p.add_argument("--map_at_r", action="store_true",
                   help="also MAP@R (asks the search for as many results as the largest class holds)")
    generalise_args(p, cluster_help="image -> cluster labels (cbir-kmeans --out: its cluster_labels.json) for the "
                                    "cluster-level scores; required by --generalise 3; label the query folder too "
                                    "(cbir-kmeans --load partial)")
    p.add_argument("--slides_depth", type=at_least(1), default=1000,
                   help="--slides: stored tiles each mosaic tile looks at to rank slides (default 1000)")
    slide_args(p)
    database_args(p)
    extractor_args(p)
    return p


def check(args):
    """Every flag, before the database is opened: (level maps, cluster labels or None)."""
    from cbir.evaluation.searching import GroupExclusion
    from cbir.labels import read_cluster_labels

    check_extractor_args(args)
    check_generalise_args(args)
    GroupExclusion(args.exclude_same)
    maps = check_protocol_args(args, sheet=args.name or args.db_name)
    return maps, read_cluster_labels(args.cluster_labels) if args.cluster_labels else None


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    maps, cluster_labels = check(args)

    # Heavy parts (torch, FAISS, pandas) load only now, after the flags are checked: bad flags answer at once.
    from cbir.images import list_samples
    from cbir.database import Database
    from cbir.evaluation import evaluate, plot_confusion_matrices, results_to_request, write_excel_sheet
    from cbir.files import write_text_atomically
    from cbir.labels import restrict_samples
    from cbir.retrieval import search_function
    from tqdm import tqdm

    if args.slides:
        return evaluate_slides(args, maps)
    queries = list_samples(args.path)
    if args.generalise in (1, 2):
        # The classes the extractor never saw: the "test" half, the same rule cbir-train and cbir-index use.
        queries = restrict_samples(queries, "test", args.generalise, seed=args.split_seed, split_file=args.split_file)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        extractor = build_extractor(args, db.extractor)
        db_class_counts = dict(Counter(cls for _, _, cls in db.items())) if args.map_at_r else None
        k_wanted = results_to_request(5, exclude_same=args.exclude_same, db_class_counts=db_class_counts)
        search = search_function(extractor, db, k_wanted, nprobe=args.nprobe, batch_size=args.batch_size,
                                 num_workers=args.num_workers)
        with tqdm(desc="queries", unit="query", leave=False) as bar:
            report = evaluate(
                [q.path for q in queries], [q.class_name for q in queries], search, measure=args.measure, k=5,
                seed=args.seed, repeats=args.repeats, maps=maps, max_queries=args.max_queries,
                remove_classes=args.remove_classes.split(",") if args.remove_classes else None,
                project_name=args.project_name, class_name=args.class_name, exclude_same=args.exclude_same,
                batch_size=512, bootstrap=args.bootstrap, cluster_labels=cluster_labels,
                db_class_counts=db_class_counts, progress=bar.update,
            )
    print(report.format())
    if args.measure == "separated" and report.per_class is not None:
        sheet = args.name or args.db_name
        write_excel_sheet(report.per_class, args.excel_path, sheet)
        print(f"per-class rows: sheet '{sheet}' of {args.excel_path}")
    if args.cms:
        for figure in plot_confusion_matrices(report.per_query, args.cms):
            print(f"confusion matrix: {figure}")
    if args.output:
        write_text_atomically(args.output, json.dumps(report.to_dict(), indent=2))
        print(f"numbers: {args.output}")


def evaluate_slides(args, maps) -> None:
    """--slides: --path lists query slides; tile-level and slide-level numbers, leave-one-slide(patient)-out."""
    from cbir.database import Database
    from cbir.files import write_text_atomically
    from cbir.slides.scoring import evaluate_slides as evaluate
    from cbir.slides.sources import list_slides

    sources = list_slides(args.path)
    with Database.open(args.db_name, home=args.home, redis_url=args.redis_url) as db:
        extractor = build_extractor(args, db.extractor)
        result = evaluate(extractor, db, sources, tiling_spec(args, db), mpp=args.mpp, measure=args.measure,
                          maps=maps, depth=args.slides_depth, nprobe=args.nprobe, batch_size=args.batch_size,
                          num_workers=args.num_workers, bootstrap=args.bootstrap, seed=args.seed)
    print(result.format())
    if args.output:
        write_text_atomically(args.output, json.dumps(result.to_dict(), indent=2))
        print(f"numbers: {args.output}")


console_script = entry_point(main)
