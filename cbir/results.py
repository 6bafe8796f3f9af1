"""The results workbook: one row per experiment, in the thesis's shape.

Sheet ``runs`` of ``excel_results/results.xlsx``: the run's name and date, its hyper-parameters, its timings
(training, indexing), then for each evaluation protocol (random, all, weighted, ...) the nine numbers
(class / project / similar x top-1 / top-5 / maj), the number of queries and the timings of ``cbir-eval``.
Row 1 names the group of each column (merged over the group), row 2 the column; data start on row 3.

    python -m cbir.results append --workbook excel_results/results.xlsx --run-name effnet_margin \\
        --config-json '{"model": "effnet", "loss": "margin"}' --eval-json random=random.json all=all.json
    python -m cbir.results table --workbook excel_results/results.xlsx     # a Markdown table of the rows

Columns are found by (group, name), never by position: a run with a new hyper-parameter or protocol adds its
columns (inside its group) and the rows already written keep their numbers under the right heading.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from cbir.errors import CbirError

SHEET = "runs"
RUN_GROUP = "run"
PARAM_GROUP = "hyper-parameters"
TIMING_GROUP = "timings (s)"
PROTOCOLS = ("random", "all", "weighted", "remove", "stat", "separated")
SCORE_KEYS = tuple(f"{level}_{kind}" for level in ("class", "project", "similar") for kind in ("top1", "top5", "maj"))
EVAL_TIMING_KEYS = ("total", "model", "transfer", "search", "per_query")
HEADER_ROWS = 2

#: Readable column titles of the Markdown table.
_KIND_TITLE = {"top1": "top-1", "top5": "top-5", "maj": "maj"}


def _group_rank(group: str) -> tuple:
    """Where a group goes among the others: run, hyper-parameters, timings, the protocols in thesis order, the rest."""
    fixed = [RUN_GROUP, PARAM_GROUP, TIMING_GROUP, *PROTOCOLS]
    return (fixed.index(group), "") if group in fixed else (len(fixed), group)


def _cell_value(value: Any) -> Any:
    """What a cell can hold: numbers and text as they are; None and NaN empty; anything else as JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------------------------- reading inputs

def read_eval(path: str | Path) -> dict:
    """A ``cbir-eval --output`` JSON file (EvalReport.to_dict)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CbirError(f"evaluation file {path} does not exist (write it with cbir-eval --output)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CbirError(f"{path} is not a cbir-eval JSON file ({exc.__class__.__name__})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scores"), dict):
        raise CbirError(f"{path} is not a cbir-eval --output file: it has no 'scores'")
    return report


def eval_columns(report: dict) -> dict[str, Any]:
    """The columns one protocol contributes: nine numbers, queries, timings (and the std of each number for stat)."""
    scores = report["scores"]
    columns: dict[str, Any] = {key: scores.get(key) for key in SCORE_KEYS}
    columns["n_queries"] = report.get("n_queries")
    timings = report.get("timings") or {}
    columns.update({f"time_{key}": timings.get(key) for key in EVAL_TIMING_KEYS})
    std = report.get("std")
    if std:
        columns.update({f"{key}_std": std.get(key) for key in SCORE_KEYS})
    return columns


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CbirError(f"{what} takes KEY=VALUE, got {pair!r}")
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


# ---------------------------------------------------------------------------------------------- the sheet

def _open(workbook: Path, sheet: str, *, create: bool):
    import openpyxl

    if workbook.suffix.lower() != ".xlsx":
        raise CbirError(f"the workbook must end in .xlsx, got {workbook}")
    if workbook.exists():
        try:
            book = openpyxl.load_workbook(workbook)
        except Exception as exc:  # openpyxl raises many kinds (zipfile, KeyError, InvalidFileException)
            raise CbirError(f"{workbook} is not a readable .xlsx workbook ({exc.__class__.__name__}: {exc})") from None
    elif create:
        book = openpyxl.Workbook()
        book.remove(book.active)
    else:
        raise CbirError(f"workbook {workbook} does not exist")
    if sheet in book.sheetnames:
        return book, book[sheet]
    if not create:
        raise CbirError(f"workbook {workbook} has no sheet '{sheet}' (it has: {', '.join(book.sheetnames)})")
    ws = book.create_sheet(sheet, 0)  # first, so that the workbook opens on the summary
    return book, ws


def _header(ws) -> list[tuple[str, str]]:
    """(group, name) of every column, reading the merged group cells of row 1."""
    width = ws.max_column if ws.max_row >= HEADER_ROWS else 0
    groups = [ws.cell(1, c).value for c in range(1, width + 1)]
    for merged in ws.merged_cells.ranges:
        if merged.min_row == 1:
            value = ws.cell(1, merged.min_col).value
            for c in range(merged.min_col, merged.max_col + 1):
                groups[c - 1] = value
    names = [ws.cell(2, c).value for c in range(1, width + 1)]
    columns = []
    for group, name in zip(groups, names):
        if name is None:
            break
        columns.append((str(group or ""), str(name)))
    return columns


def read_rows(workbook: str | Path, sheet: str = SHEET) -> tuple[list[tuple[str, str]], list[dict]]:
    """The columns and the rows of the sheet; each row maps (group, name) to its value."""
    book, ws = _open(Path(workbook), sheet, create=False)
    columns = _header(ws)
    rows = []
    for r in range(HEADER_ROWS + 1, ws.max_row + 1):
        values = [ws.cell(r, c).value for c in range(1, len(columns) + 1)]
        if all(v is None for v in values):
            continue
        rows.append(dict(zip(columns, values)))
    book.close()
    return columns, rows


def _insert_position(columns: list[tuple[str, str]], group: str) -> int:
    """0-based position for a new column of ``group``: after its group's last column, else before the first
    group that comes after it."""
    same = [i for i, (g, _) in enumerate(columns) if g == group]
    if same:
        return same[-1] + 1
    rank = _group_rank(group)
    for i, (g, _) in enumerate(columns):
        if _group_rank(g) > rank:
            return i
    return len(columns)


def _style(ws, columns: list[tuple[str, str]]) -> None:
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    for merged in list(ws.merged_cells.ranges):
        if merged.min_row == 1:
            ws.unmerge_cells(str(merged))
    fills = ("DDEBF7", "E2EFDA")
    start = 0
    block = 0
    while start < len(columns):
        end = start
        while end + 1 < len(columns) and columns[end + 1][0] == columns[start][0]:
            end += 1
        for c in range(start + 1, end + 2):
            ws.cell(1, c).value = None
        ws.cell(1, start + 1).value = columns[start][0]
        if end > start:
            ws.merge_cells(start_row=1, start_column=start + 1, end_row=1, end_column=end + 1)
        for c in range(start + 1, end + 2):
            for r in (1, 2):
                cell = ws.cell(r, c)
                cell.font = Font(bold=True)
                cell.fill = PatternFill("solid", fgColor=fills[block % 2])
                cell.alignment = Alignment(horizontal="center")
        block += 1
        start = end + 1
    for c, (group, name) in enumerate(columns, 1):
        letter = get_column_letter(c)
        ws.column_dimensions[letter].width = max(9, min(40, len(name) + 2)) if name != "run" else 28
        if group in PROTOCOLS and not name.startswith("time_") and name != "n_queries":
            for r in range(HEADER_ROWS + 1, ws.max_row + 1):
                ws.cell(r, c).number_format = "0.000"
    ws.freeze_panes = ws.cell(HEADER_ROWS + 1, 2)


def append_run(workbook: str | Path, run_name: str, *, config: dict | None = None, timings: dict | None = None,
               evals: dict[str, dict] | None = None, sheet: str = SHEET, replace: bool = False,
               date: str | None = None) -> int:
    """Write one run as a row (a new one, or the row of the same run name with ``replace``); returns its row
    number in the sheet. The workbook and sheet are created when missing; other sheets are kept."""
    if not run_name:
        raise CbirError("--run-name must not be empty")
    workbook = Path(workbook)
    values: dict[tuple[str, str], Any] = {
        (RUN_GROUP, "run"): run_name,
        (RUN_GROUP, "date"): date or _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    values.update({(PARAM_GROUP, str(k)): _cell_value(v) for k, v in (config or {}).items()})
    values.update({(TIMING_GROUP, str(k)): _cell_value(v) for k, v in (timings or {}).items()})
    ordered = sorted((evals or {}).items(), key=lambda item: _group_rank(item[0]))
    for protocol, report in ordered:
        values.update({(protocol, k): _cell_value(v) for k, v in eval_columns(report).items()})

    workbook.parent.mkdir(parents=True, exist_ok=True)
    book, ws = _open(workbook, sheet, create=True)
    columns = _header(ws)
    # Unmerged, with its group in every cell, row 1 shifts with inserted columns; _style merges it again.
    for merged in list(ws.merged_cells.ranges):
        if merged.min_row == 1:
            ws.unmerge_cells(str(merged))
    for c, (group, _) in enumerate(columns, 1):
        ws.cell(1, c).value = group
    for column in values:
        if column in columns:
            continue
        position = _insert_position(columns, column[0])
        if position < len(columns):
            ws.insert_cols(position + 1)
        columns.insert(position, column)
        ws.cell(1, position + 1).value = column[0]
        ws.cell(2, position + 1).value = column[1]

    row = None
    if replace:
        run_col = columns.index((RUN_GROUP, "run")) + 1
        for r in range(HEADER_ROWS + 1, ws.max_row + 1):
            if ws.cell(r, run_col).value == run_name:
                row = r
                for c in range(1, len(columns) + 1):
                    ws.cell(r, c).value = None
                break
    if row is None:
        row = max(ws.max_row, HEADER_ROWS) + 1
        # max_row counts styled but empty rows: step back over them so that rows stay contiguous.
        while row > HEADER_ROWS + 1 and all(ws.cell(row - 1, c).value is None for c in range(1, len(columns) + 1)):
            row -= 1
    for c, column in enumerate(columns, 1):
        if column in values:
            ws.cell(row, c).value = values[column]
    _style(ws, columns)

    # Through a temporary file: an interrupted save leaves the previous workbook whole.
    temporary = workbook.with_name(f".{workbook.stem}.{os.getpid()}.tmp.xlsx")
    try:
        book.save(temporary)
        os.replace(temporary, workbook)
    finally:
        if temporary.exists():
            temporary.unlink()
    return row


# ---------------------------------------------------------------------------------------------- Markdown

DEFAULT_PARAMS = ("model", "loss", "num_features", "epochs", "frozen")
DEFAULT_METRICS = ("class_top1", "class_top5", "class_maj", "project_top1")


def _metric_title(metric: str) -> str:
    level, _, kind = metric.rpartition("_")
    if kind in _KIND_TITLE and level:
        return f"{level} {_KIND_TITLE[kind]}"
    return metric.replace("_", " ")


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def _format_metric(value: Any) -> str:
    # A score of exactly 1 comes back from the workbook as the integer 1: still print it as 1.000.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):.3f}"
    return _format(value)


def _format_param(value: Any) -> str:
    # Hyper-parameters span magnitudes (lr 1e-4, epochs 20): significant digits, not decimals.
    return f"{value:.4g}" if isinstance(value, float) else _format(value)


def markdown_table(workbook: str | Path, *, sheet: str = SHEET, protocols: list[str] | None = None,
                   metrics: list[str] | None = None, params: list[str] | None = None,
                   timings: list[str] | None = None) -> str:
    """The rows as a Markdown table: run, chosen hyper-parameters and timings, then per protocol the metrics."""
    columns, rows = read_rows(workbook, sheet)
    if not rows:
        raise CbirError(f"sheet '{sheet}' of {workbook} holds no run yet")
    present_protocols = list(dict.fromkeys(g for g, _ in columns if g not in (RUN_GROUP, PARAM_GROUP, TIMING_GROUP)))
    protocols = protocols or present_protocols
    unknown = [p for p in protocols if p not in present_protocols]
    if unknown:
        raise CbirError(f"no protocol {', '.join(unknown)} in {workbook} (it has: {', '.join(present_protocols)})")
    metrics = metrics or list(DEFAULT_METRICS)
    present_params = [name for g, name in columns if g == PARAM_GROUP]
    if params is None:
        # The defaults that exist, plus any hyper-parameter that differs between runs.
        varying = [name for name in present_params
                   if len({json.dumps(r.get((PARAM_GROUP, name)), default=str) for r in rows}) > 1]
        params = [p for p in DEFAULT_PARAMS if p in present_params]
        params += [p for p in varying if p not in params and p not in ("data", "weights", "db_name")]
    if timings is None:
        timings = [name for g, name in columns if g == TIMING_GROUP and name == "train_s"]

    headers = ["run"] + params + [f"{t.removesuffix('_s')} (s)" for t in timings]
    headers += [f"{p}: {_metric_title(m)}" for p in protocols for m in metrics]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        cells = [_format(r.get((RUN_GROUP, "run")))]
        cells += [_format_param(r.get((PARAM_GROUP, p))) for p in params]
        cells += [_format(r.get((TIMING_GROUP, t)), 0) for t in timings]
        cells += [_format_metric(r.get((p, m))) for p in protocols for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbir.results", description=__doc__.split("\n\n")[0])
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


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text is not None else None


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.command == "append":
        config = read_config(args.config_json)
        config.update({k: parse_scalar(v) for k, v in parse_pairs(args.param, "--param").items()})
        timings = {k: parse_scalar(v) for k, v in parse_pairs(args.timing, "--timing").items()}
        evals: dict[str, dict] = {}
        for item in args.eval_json:
            protocol, sep, path = item.partition("=")
            if not sep:
                path = item
                protocol = None
            report = read_eval(path)
            protocol = protocol or report.get("measure")
            if not protocol:
                raise CbirError(f"{path}: name its protocol, as in random={path}")
            evals[protocol] = report
        row = append_run(args.workbook, args.run_name, config=config, timings=timings, evals=evals,
                         sheet=args.sheet, replace=args.replace)
        print(f"run '{args.run_name}': row {row} of sheet '{args.sheet}' in {args.workbook}")
    else:
        print(markdown_table(args.workbook, sheet=args.sheet, protocols=_split(args.protocols),
                             metrics=_split(args.metrics), params=_split(args.params), timings=_split(args.timings)))


if __name__ == "__main__":
    import sys

    from cbir.cli.common import run

    sys.exit(run(main))
