"""cbir-db: list, describe, shrink and delete databases.

    cbir-db list [--json]
    cbir-db info --db_name NAME [--json]
    cbir-db remove --db_name NAME --path FILE_OR_FOLDER [--path ...] [--dry_run | --yes]
    cbir-db drop --db_name NAME --yes

Every sub-command takes --home and --redis_url (or --redis_url_file) like the other commands. What deletes asks
first: ``remove`` says how many images it would remove and asks at a terminal (elsewhere it refuses), ``drop``
refuses; ``--yes`` confirms in advance (for scripts), ``remove --dry_run`` lists what would go.
"""

from __future__ import annotations

import argparse
import json
import sys

from cbir.cli.common import entry_point, redis_url_args
from cbir.errors import CbirError
from cbir.naming import printable


def _where_args(parser: argparse.ArgumentParser) -> None:
    redis_url_args(parser)
    parser.add_argument("--home", default=None, help="where databases live (default: $CBIR_HOME or ./cbir_data)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir-db", description="List, describe, shrink and delete image databases.")
    commands = p.add_subparsers(dest="command", required=True, metavar="{list,info,remove,drop}")

    listing = commands.add_parser("list", help="the names of the databases")
    listing.add_argument("--json", action="store_true", help="a JSON list instead of one name a line")
    _where_args(listing)

    info = commands.add_parser("info", help="what a database holds: images in Redis and FAISS, extractor, index, size")
    info.add_argument("--db_name", default="db", help="database name (default: db)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    _where_args(info)

    remove = commands.add_parser("remove", help="remove images by file or folder (from Redis and FAISS)")
    remove.add_argument("--db_name", default="db", help="database name (default: db)")
    remove.add_argument("--path", action="append", required=True,
                        help="a stored image, or a folder: every stored image under it (repeat for several); "
                             "matched as given, absolute and resolved; an empty path and / are refused")
    confirm = remove.add_mutually_exclusive_group()
    confirm.add_argument("--yes", action="store_true", help="remove without asking")
    confirm.add_argument("--dry_run", action="store_true", help="list the images it would remove; remove nothing")
    _where_args(remove)

    drop = commands.add_parser("drop", help="delete a database entirely (its Redis keys, FAISS index and folder)")
    drop.add_argument("--db_name", required=True, help="database name (no default: say which one)")
    drop.add_argument("--yes", action="store_true", help="confirm: the database is deleted for good")
    _where_args(drop)
    return p


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_info(info: dict) -> str:
    """The human-readable form of ``Database.info()``."""
    extractor = info.get("extractor") or {}
    if extractor:
        text = f"{extractor.get('name', '?')}, {extractor.get('num_features', '?')} values, fingerprint " \
               f"{str(extractor.get('fingerprint', ''))[:12]}"
        if extractor.get("weights"):
            text += f", weights {extractor['weights']}"
    else:
        text = "none recorded yet"
    index = info.get("index") or "Flat"
    index_text = "Flat (exact)" if index == "Flat" else index
    if info.get("nprobe"):
        index_text += f", searches probe {info['nprobe']} lists (--nprobe to change)"
    index_file = info.get("index_file")
    if index_file is None:
        file_text = "no saved index file yet (built from Redis on use)"
    elif index_file.get("up_to_date"):
        file_text = f"saved index file up to date ({index_file.get('vectors')} vectors)"
    else:
        file_text = (f"saved index file behind ({index_file.get('vectors')} vectors; caught up from Redis on use "
                     "and saved at the next close)")
    lines = [
        f"database '{info['name']}' ({info['redis']})",
        f"  images:        {info['images']} in Redis, {info['faiss_vectors']} in FAISS",
        f"  extractor:     {text}",
        f"  vector size:   {info['dim'] if info.get('dim') is not None else 'none yet'}",
        f"  index:         {index_text}",
        f"  index file:    {file_text}",
        f"  size on disk:  {_size(info.get('bytes_on_disk'))} in {info['folder']}",
        f"  Redis memory:  {_size(info.get('redis_memory_bytes'))}",
        f"  created:       {info.get('created') or 'unknown'}",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    from cbir.database import Database, list_databases

    args = parser().parse_args(argv)
    where = {"home": args.home, "redis_url": args.redis_url}

    if args.command == "list":
        names = list_databases(**where)
        if args.json:
            print(json.dumps(names))
        else:
            for name in names:
                print(name)
        return

    if args.command == "info":
        with Database.open(args.db_name, **where) as db:
            info = db.info()
        print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_info(info))
        return

    if args.command == "remove":
        with Database.open(args.db_name, **where) as db:
            found = {path: db.matching([path]) for path in args.path}  # refuses "" and / before anything goes
            targets = sorted({t for matched in found.values() for t in matched})
            nothing = [printable(path) for path, matched in found.items() if not matched]
            if args.dry_run:
                for target in targets:
                    print(printable(target))
                print(f"would remove {len(targets)} images from '{args.db_name}' (of {len(db)}); nothing removed")
            elif targets and not args.yes and not _confirmed(
                f"remove {len(targets)} of the {len(db)} images of '{args.db_name}'?",
                refusal=f"remove would remove {len(targets)} of the {len(db)} images of '{args.db_name}'; nothing "
                        "removed: add --yes to confirm, or --dry_run to list them",
            ):
                print("nothing removed")
                return
            else:
                removed = db.remove_stored(targets)
                print(f"removed {removed} images from '{args.db_name}'; {len(db)} images left")
        if nothing:
            raise CbirError(f"no stored image is, or is under, {', '.join(nothing)} in '{args.db_name}' "
                            "(paths are matched as given, absolute and resolved)")
        return

    if args.command == "drop":
        db = Database.open(args.db_name, **where)  # an unknown name is refused here, with the known ones
        try:
            count = len(db)
            if not args.yes:
                raise CbirError(f"drop deletes database '{args.db_name}' ({count} images) for good; "
                                "add --yes to confirm")
            db.drop()
        finally:
            db.close()  # a no-op after a drop
        print(f"dropped database '{args.db_name}' ({count} images)")


def _confirmed(question: str, *, refusal: str) -> bool:
    """The user's answer at a terminal; where no one can answer (a script, a pipe), the error ``refusal``."""
    if not sys.stdin.isatty():
        raise CbirError(refusal)
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


console_script = entry_point(main)
