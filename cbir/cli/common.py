"""What every command shares: the flags of the thesis, error handling (one line, non-zero exit), the extractor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cbir.errors import CbirError, ParameterError
from cbir.labels import GENERALISE_MODES

EXIT_USAGE = 2


REDIS_URL_HELP = ("external Redis server: redis://[user@]host:6379/0, rediss:// (TLS) or unix:///path/redis.sock "
                  "(default: $CBIR_REDIS_URL, else an embedded Redis kept in $CBIR_HOME/<db_name>). A password "
                  "written here shows in 'ps' to every user of the machine: put the URL in $CBIR_REDIS_URL or in a "
                  "private file (--redis_url_file) instead")


class _UrlFromFile(argparse.Action):
    """``--redis_url_file FILE``: the URL is read (and the file's mode checked) as the flag is parsed."""

    def __call__(self, parser, namespace, value, option_string=None):
        from cbir.database.server import url_from_file

        namespace.redis_url = url_from_file(value)


def redis_url_args(parser) -> None:
    """``--redis_url`` and ``--redis_url_file`` (one or the other)."""
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--redis_url", default=None, help=REDIS_URL_HELP)
    choice.add_argument("--redis_url_file", action=_UrlFromFile, metavar="FILE",
                        help="read the Redis URL from FILE, which must be private to you (chmod 600)")


def database_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("database")
    group.add_argument("--db_name", default="db", help="database name (its own namespace; default: db)")
    redis_url_args(group)
    group.add_argument("--home", default=None, help="where databases live (default: $CBIR_HOME or ./cbir_data)")


def extractor_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    group = parser.add_argument_group("extractor")
    group.add_argument("--weights", default=None, required=required,
                       help="extractor checkpoint written by cbir-train (default: the one the database was built with)")
    group.add_argument("--extractor", "--model", dest="extractor", default=None,
                       help="only to check the checkpoint, or with --num_features 0 and no --weights: the frozen "
                            "ImageNet backbone's pooled features")
    group.add_argument("--num_features", type=int, default=None, help="only to check the checkpoint")
    group.add_argument("--dr_model", action="store_true", default=None, help="only to check the checkpoint")
    group.add_argument("--batch_size", type=int, default=32)
    group.add_argument("--num_workers", type=int, default=None, help="image-decoding workers (default: cores - 1)")
    group.add_argument("--gpu_id", type=int, default=None)


def protocol_args(parser: argparse.ArgumentParser, *, default_measure: str) -> None:
    """The evaluation protocol's flags, shared by cbir-eval and cbir-classification-acc."""
    from cbir.evaluation import MEASURES

    parser.add_argument("--path", required=True, help="query folder, one sub-folder per class")
    parser.add_argument("--measure", default=default_measure, choices=MEASURES,
                        help=f"protocol (default: {default_measure})")
    parser.add_argument("--repeats", type=int, default=10, help="repetitions of stat (default: 10)")
    parser.add_argument("--max_queries", type=int, default=1000, help="random: stop just over this many queries")
    parser.add_argument("--remove_classes", default=None,
                        help="remove: comma-separated classes to leave out (default: the dominant classes, printed)")
    parser.add_argument("--project_name", default=None, help="only the queries of this project")
    parser.add_argument("--class_name", default=None, help="only the queries of this class")
    parser.add_argument("--projects_csv", default=None, help="class,project rows where names do not follow the rule")
    parser.add_argument("--similar", default=None, help="file of similar project pairs, one 'projA,projB' per line")
    parser.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for confidence intervals")
    parser.add_argument("--excel_path", default="excel_results/results.xlsx", help="separated: workbook to write")
    parser.add_argument("--output", default=None, help="write every number to this JSON file")


def generalise_args(parser: argparse.ArgumentParser) -> None:
    """``--generalise``, ``--split_file``, ``--split_seed``: the same flags on every command that splits classes."""
    group = parser.add_argument_group("generalisation")
    group.add_argument("--generalise", type=int, default=0, choices=list(GENERALISE_MODES),
                       help="0: all classes; 1 / 2: train on one half of the classes, index and query the other "
                            "(2 swaps the halves); 3: all classes, labels replaced by k-means clusters")
    group.add_argument("--split_file", default=None,
                       help="with --generalise 1/2: a file listing the train classes of --generalise 1, one per "
                            "line; every other class is index/query (default: a seeded split balanced per project)")
    group.add_argument("--split_seed", type=int, default=0, help="seed of the class halves (default 0)")


def build_extractor(args, recorded: dict | None = None):
    """The extractor the user named: a checkpoint, the frozen backbone, or the one the database records."""
    from cbir.models import create_extractor, load_extractor

    if args.weights:
        return load_extractor(args.weights, model=args.extractor, num_features=args.num_features, dr_model=args.dr_model)
    if args.extractor and args.num_features == 0:
        return create_extractor(args.extractor, 0, pretrained=True).eval()
    if recorded:
        if recorded.get("weights"):
            return load_extractor(recorded["weights"], model=args.extractor, num_features=args.num_features)
        return create_extractor(recorded["name"], 0, pretrained=True).eval()
    raise CbirError("give --weights CHECKPOINT (from cbir-train), or --extractor NAME --num_features 0 for frozen "
                    "ImageNet features")


def describe_extractor(extractor, weights: str | None) -> dict:
    info = extractor.describe()
    info["weights"] = str(Path(weights).resolve()) if weights else None
    return info


def run(main, argv=None) -> int:
    """Run a command: user errors become one line on stderr and exit 2 (a library error naming a parameter
    names its flag); Ctrl-C exits 130; a reader that stops reading (``| head``) ends the command quietly."""
    # Our own progress and warnings only: the root logger stays quiet (FAISS logs its CPU-feature probing there).
    logger = logging.getLogger("cbir")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
    except ParameterError as exc:
        print(f"error: {exc.worded()}", file=sys.stderr)
        return EXIT_USAGE
    except CbirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; what was stored so far is kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python would print its own error while flushing stdout at exit: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def entry_point(main):
    """Turn ``main(argv)`` into a console-script function."""

    def console_script(argv=None):
        sys.exit(run(main, argv))

    return console_script
