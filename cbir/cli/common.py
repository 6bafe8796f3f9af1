"""What every command shares: its parser, the thesis's flags, the checks made before any work, the extractor, and
error handling (one line, exit 2).

Each command validates every flag in one place before any work starts: the parser checks each value's type and
range (``type=`` here below), and the command's ``check(args)`` what depends on several flags or on the file
system (inputs that exist, outputs that can be written). Commands import the package's heavy parts (torch, FAISS)
inside ``main``, after those checks: ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from cbir.errors import CbirError
from cbir.files import check_input_file, check_output_file, check_output_folder
from cbir.labels import GENERALISE_MODES, check_generalise

EXIT_USAGE = 2


# ---------------------------------------------------------------------------------------------- the parser

class CommandParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (``error: ...``) and exit 2, like every other user error."""

    def error(self, message: str):
        raise CbirError(f"{message} (see {self.prog} --help)")


def command_parser(prog: str, description: str) -> CommandParser:
    return CommandParser(prog=prog, description=description)


def at_least(least: int):
    """``type=`` for an integer flag of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


def number(*, low: float = 0.0, low_open: bool = True, high: float = math.inf, high_open: bool = True):
    """``type=`` for a finite real flag within (or at) the bounds; NaN and infinity are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must lie in {left}{low:g}, {high:g}{right}, got {text}")
        return value

    return parse


positive = number()
non_negative = number(low_open=False)


# ---------------------------------------------------------------------------------------------- shared flags

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
    group.add_argument("--num_features", type=at_least(0), default=None,
                       help="only to check the checkpoint (0: the frozen backbone's own features)")
    group.add_argument("--dr_model", action="store_true", default=None, help="only to check the checkpoint")
    group.add_argument("--batch_size", type=at_least(1), default=None,
                       help="images per forward pass (default: from the hardware, e.g. 16 on 2 CPU cores)")
    group.add_argument("--num_workers", type=at_least(0), default=None,
                       help="image-decoding workers (default: cores - 1)")
    group.add_argument("--gpu_id", type=at_least(0), default=None)
    group.add_argument("--backend", default=None, choices=["auto", "torch", "onnx"],
                       help="inference backend (default: the one the database was built with, else auto: ONNX "
                            "Runtime wherever the model exports, PyTorch otherwise)")
    group.add_argument("--int8", action="store_true", default=None,
                       help="the int8 ONNX model written by cbir-export --int8 (default: as the database was built)")


def check_extractor_args(args) -> None:
    if args.weights:
        check_input_file(args.weights, "weights")


def protocol_args(parser: argparse.ArgumentParser, *, default_measure: str) -> None:
    """The evaluation protocol's flags, shared by cbir-eval and cbir-classification-acc."""
    from cbir.evaluation.protocols import MEASURES

    parser.add_argument("--path", required=True, help="query folder, one sub-folder per class")
    parser.add_argument("--measure", default=default_measure, choices=MEASURES,
                        help=f"protocol (default: {default_measure})")
    parser.add_argument("--repeats", type=at_least(1), default=10, help="repetitions of stat (default: 10)")
    parser.add_argument("--max_queries", type=at_least(1), default=1000,
                        help="random: stop just over this many queries (default: 1000)")
    parser.add_argument("--remove_classes", default=None,
                        help="remove: comma-separated classes to leave out (default: the dominant classes, printed)")
    parser.add_argument("--project_name", default=None, help="only the queries of this project")
    parser.add_argument("--class_name", default=None, help="only the queries of this class")
    parser.add_argument("--projects_csv", default=None, help="class,project rows where names do not follow the rule")
    parser.add_argument("--similar", default=None, help="file of similar project pairs, one 'projA,projB' per line")
    parser.add_argument("--bootstrap", type=at_least(0), default=0,
                        help="bootstrap resamples for confidence intervals")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of random and stat (and of the head)")
    parser.add_argument("--excel_path", default="excel_results/results.xlsx", help="separated: workbook to write")
    parser.add_argument("--output", default=None, help="write every number to this JSON file")
    parser.add_argument("--cms", default=None, help="folder for the confusion matrices (top-1 and majority class)")


def check_protocol_args(args, sheet: str):
    """The protocol's outputs can be written, and its maps read; returns the level maps."""
    from cbir.evaluation.excel import check_sheet_name
    from cbir.labels import LevelMaps

    if args.measure == "separated":
        check_output_file(args.excel_path, "excel_path", suffix=".xlsx")
        check_sheet_name(sheet)
    if args.output:
        check_output_file(args.output, "output")
    if args.cms:
        check_output_folder(args.cms, "cms")
    return LevelMaps.from_files(args.projects_csv, args.similar)


def generalise_args(parser: argparse.ArgumentParser, *, cluster_help: str | None = None) -> None:
    """``--generalise``, ``--split_file``, ``--split_seed``: the same flags on every command that splits classes;
    with ``cluster_help``, ``--cluster_labels`` too."""
    group = parser.add_argument_group("generalisation")
    group.add_argument("--generalise", type=int, default=0, choices=list(GENERALISE_MODES),
                       help="0: all classes; 1 / 2: train on one half of the classes, index and query the other "
                            "(2 swaps the halves); 3: all classes, labels replaced by k-means clusters")
    group.add_argument("--split_file", default=None,
                       help="with --generalise 1/2: a file listing the train classes of --generalise 1, one per "
                            "line; every other class is index/query (default: a seeded split balanced per project)")
    group.add_argument("--split_seed", type=at_least(0), default=0, help="seed of the class halves (default 0)")
    if cluster_help:
        group.add_argument("--cluster_labels", default=None, help=cluster_help)


def check_generalise_args(args) -> None:
    check_generalise(args.generalise, cluster_labels=getattr(args, "cluster_labels", None),
                     split_file=args.split_file)
    if args.split_file:
        check_input_file(args.split_file, "split_file")


# ---------------------------------------------------------------------------------------------- the extractor

def names_an_extractor(args) -> bool:
    """Whether the flags name an extractor by themselves (else the database's recorded one is used)."""
    return bool(args.weights or (args.extractor and args.num_features == 0))


def build_extractor(args, recorded: dict | None = None):
    """The encoder (cbir.inference) of the extractor the user named: a checkpoint, the frozen backbone, or the
    one the database records; on the backend and precision asked for, else those the database was built with."""
    from cbir.inference import recorded_encoder

    frozen = args.extractor if args.extractor and args.num_features == 0 and not args.weights else None
    device = f"cuda:{args.gpu_id}" if args.gpu_id is not None else None
    return recorded_encoder(recorded, weights=args.weights, frozen=frozen, backend=args.backend, int8=args.int8,
                            device=device, model=args.extractor, num_features=args.num_features,
                            dr_model=args.dr_model if args.weights else None)


def describe_extractor(extractor, weights: str | None) -> dict:
    info = extractor.describe()
    info["weights"] = str(Path(weights).resolve()) if weights else None
    return info


# ---------------------------------------------------------------------------------------------- running

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream), not to the one
    that was there when the first command ran."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def run(main, argv=None) -> int:
    """Run a command: user errors become one line on stderr and exit 2 (a library error naming a parameter
    names its flag); what the system refuses (``OSError``) one line and exit 1; Ctrl-C exits 130; a reader that
    stops reading (``| head``) ends the command quietly."""
    # Our own progress and warnings only: the root logger stays quiet (FAISS logs its CPU-feature probing there).
    logger = logging.getLogger("cbir")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
    except CbirError as exc:
        print(f"error: {exc.worded()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; what was stored so far is kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python would print its own error while flushing stdout at exit: point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the system refused (a full disk, a place no file can be made): one line, no traceback
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    return 0


def entry_point(main):
    """Turn ``main(argv)`` into a console-script function."""

    def console_script(argv=None):
        sys.exit(run(main, argv))

    return console_script
