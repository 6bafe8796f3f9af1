"""cbir-results: the results workbook, one row per experiment (the thesis's excel_results).

    cbir-results append --workbook excel_results/results.xlsx --run-name effnet_margin \\
        --config-json '{"model": "effnet", "loss": "margin"}' --eval-json random=random.json all=all.json
    cbir-results table --workbook excel_results/results.xlsx     # a Markdown table of the rows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cbir.cli.common import command_parser, entry_point
from cbir.errors import CbirError
from cbir.evaluation.excel import DEFAULT_METRICS, SHEET, append_run, markdown_table
from cbir.evaluation.report import read_report


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-results", "The results workbook: one row per experiment.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("append", help="append one run as a row")
    a.add_argument("--workbook", default="excel_results/results.xlsx")
    a.add_argument("--sheet", default=SHEET)
    a.add_argument("--run-name", "--run_name", dest="run_name", required=True)
    a.add_argument("--config-json", "--config_json", dest="config_json", default=None,
                   help="hyper-parameters: a JSON object, or a JSON file")
    a.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="one hyper-parameter (repeatable; numbers are read as numbers)")
    a.add_argument("--timing", action="append", default=None, metavar="KEY=SECONDS",
                   help="a timing of the run, e.g. train_s=812 (repeatable)")
    a.add_argument("--eval-json", "--eval_json", dest="eval_json", nargs="+", default=[], metavar="PROTOCOL=FILE",
                   help="cbir-eval --output files, e.g. random=r.json all=a.json (FILE alone: its own measure)")
    a.add_argument("--replace", action="store_true", help="overwrite the row of the same run name if there is one")
    t = sub.add_parser("table", help="print the rows as a Markdown table")
    t.add_argument("--workbook", default="excel_results/results.xlsx")
    t.add_argument("--sheet", default=SHEET)
    t.add_argument("--protocols", default=None, help="comma-separated (default: every protocol in the sheet)")
    t.add_argument("--metrics", default=None,
                   help=f"comma-separated columns of each protocol (default: {','.join(DEFAULT_METRICS)})")
    t.add_argument("--params", default=None,
                   help="comma-separated hyper-parameters (default: model, loss, ... and any that vary)")
    t.add_argument("--timings", default=None, help="comma-separated run timings (default: train_s when present)")
    return p


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CbirError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def parse_scalar(text: str) -> Any:
    """``3`` -> 3, ``1e-4`` -> 0.0001, ``true`` -> True, empty -> None, anything else stays text."""
    if text == "":
        return None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_config(text: str | None) -> dict:
    """``--config-json``: JSON text, or the path of a JSON file."""
    if not text:
        return {}
    source = text
    if not text.lstrip().startswith("{") and Path(text).is_file():
        source = Path(text).read_text(encoding="utf-8")
    try:
        config = json.loads(source)
    except json.JSONDecodeError as exc:
        raise CbirError(f"--config-json is neither a JSON object nor a JSON file: {exc}") from None
    if not isinstance(config, dict):
        raise CbirError("--config-json must be a JSON object {name: value}")
    return config


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text is not None else None


def _evals(items: list[str]) -> dict[str, dict]:
    evals: dict[str, dict] = {}
    for item in items:
        protocol, sep, path = item.partition("=")
        if not sep:
            path, protocol = item, None
        report = read_report(path)
        protocol = protocol or report.get("measure")
        if not protocol:
            raise CbirError(f"{path}: name its protocol, as in random={path}")
        evals[protocol] = report
    return evals


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "table":
        print(markdown_table(args.workbook, sheet=args.sheet, protocols=_split(args.protocols),
                             metrics=_split(args.metrics), params=_split(args.params), timings=_split(args.timings)))
        return
    config = read_config(args.config_json)
    config.update({k: parse_scalar(v) for k, v in parse_pairs(args.param, "--param").items()})
    timings = {k: parse_scalar(v) for k, v in parse_pairs(args.timing, "--timing").items()}
    row = append_run(args.workbook, args.run_name, config=config, timings=timings, evals=_evals(args.eval_json),
                     sheet=args.sheet, replace=args.replace)
    print(f"run '{args.run_name}': row {row} of sheet '{args.sheet}' in {args.workbook}")


console_script = entry_point(main)

if __name__ == "__main__":
    console_script()
