"""The Excel workbooks: a per-class sheet of ``separated``, and the runs sheet with one row per experiment.

Sheet ``runs`` (``excel_results/results.xlsx``) holds, per run, its name and date, its hyper-parameters, its
timings (training, indexing), then for each evaluation protocol (random, all, weighted, ...) the nine numbers
(class / project / similar x top-1 / top-5 / maj), the number of queries and the timings of ``cbir-eval``. Row 1
names the group of each column (merged over the group), row 2 the column; data start on row 3. In memory the
sheet is a pandas frame whose columns are (group, name) pairs, read back with ``read_excel(header=[0, 1])``.
Columns are found by (group, name), never by position: a run with a new hyper-parameter or protocol adds its
columns (inside its group) and the rows already written keep their numbers under the right heading.

Every write goes through a temporary copy replaced in one step: a failure leaves the workbook as it was, and the
other sheets are kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cbir.errors import CbirError, ParameterError
from cbir.evaluation.scoring import HEADLINE_KEYS
from cbir.evaluation.searching import TIMED_PARTS
from cbir.files import atomic_path

SHEET = "runs"
RUN_GROUP = "run"
PARAM_GROUP = "hyper-parameters"
TIMING_GROUP = "timings (s)"
#: Protocol groups in the thesis's order (random first), whatever order the runs brought them in.
PROTOCOLS = ("random", "all", "weighted", "remove", "stat", "separated")
EVAL_TIMING_KEYS = ("total", *TIMED_PARTS, "per_query")
HEADER_ROWS = 2
_BAD_SHEET_CHARS = set("[]:*?/\\")


# ---------------------------------------------------------------------------------------------- files

def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".xlsx":
        raise CbirError(f"the workbook must end in .xlsx, got {path}")
    if path.exists() and not path.is_file():
        raise CbirError(f"the workbook {path} is a {'folder' if path.is_dir() else 'special file'}, not a file")
    return path


def check_sheet_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 31 or _BAD_SHEET_CHARS & set(name) \
            or name[0] == "'" or name[-1] == "'":
        raise ParameterError(f"an Excel sheet name ({{name}}) has 1 to 31 characters, none of []:*?/\\ and no "
                             f"quote at either end; got {name!r}", "name")
    return name


def sheet_names(path: str | Path) -> list[str]:
    """The sheets of an existing workbook; a one-line error when it is not one."""
    path = _check_path(path)
    try:
        with pd.ExcelFile(path, engine="openpyxl") as book:
            return list(book.sheet_names)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CbirError(f"{path} is not a readable .xlsx workbook ({exc.__class__.__name__}: {exc})") from None


def _write_sheet(path: Path, sheet: str, write: Callable[[pd.ExcelWriter], None], *, first: bool = False) -> None:
    """Run ``write(writer)`` on a copy of the workbook (or a new one), then put the copy in its place."""
    existing = path.is_file()
    if existing:
        sheet_names(path)  # a damaged file is refused before anything is written
    with atomic_path(path, suffix=".xlsx") as temporary:
        if existing:
            shutil.copyfile(path, temporary)
        with pd.ExcelWriter(temporary, engine="openpyxl", mode="a" if existing else "w",
                            **({"if_sheet_exists": "replace"} if existing else {})) as writer:
            write(writer)
            if first:  # the workbook opens on this sheet
                writer.book.move_sheet(sheet, offset=-writer.book.sheetnames.index(sheet))


def write_excel_sheet(df: pd.DataFrame, excel_path: str | Path, sheet_name: str) -> None:
    """Write ``df`` as sheet ``sheet_name`` of ``excel_path`` (created when missing; a sheet of that name is
    replaced in place, every other sheet kept)."""
    check_sheet_name(sheet_name)
    _write_sheet(_check_path(excel_path), sheet_name, lambda writer: df.to_excel(writer, sheet_name=sheet_name))


# ---------------------------------------------------------------------------------------------- the runs sheet

def _group_rank(group: str) -> tuple:
    """Where a group goes among the others: run, hyper-parameters, timings, the protocols in thesis order, the rest."""
    fixed = [RUN_GROUP, PARAM_GROUP, TIMING_GROUP, *PROTOCOLS]
    return (fixed.index(group), "") if group in fixed else (len(fixed), group)


def _cell_value(value: Any) -> Any:
    """What a cell can hold: numbers and text as they are; None and NaN empty; anything else as JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    return json.dumps(value, sort_keys=True)


def _plain(value: Any) -> Any:
    """A value read from a sheet as Python: numpy scalars unwrapped, blanks None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def read_runs(workbook: str | Path, sheet: str = SHEET) -> pd.DataFrame:
    """The runs sheet as a frame with (group, name) columns, one row per run."""
    path = _check_path(workbook)
    if not path.is_file():
        raise CbirError(f"workbook {path} does not exist")
    names = sheet_names(path)
    if sheet not in names:
        raise CbirError(f"workbook {path} has no sheet '{sheet}' (it has: {', '.join(names)})")
    frame = pd.read_excel(path, sheet_name=sheet, header=list(range(HEADER_ROWS)), engine="openpyxl")
    return frame.dropna(how="all").reset_index(drop=True)


def read_rows(workbook: str | Path, sheet: str = SHEET) -> tuple[list[tuple[str, str]], list[dict]]:
    """The columns and the rows of the sheet; each row maps (group, name) to its value (None when blank)."""
    frame = read_runs(workbook, sheet)
    columns = [(str(group), str(name)) for group, name in frame.columns]
    rows = [{column: _plain(value) for column, value in zip(columns, values)}
            for values in frame.itertuples(index=False, name=None)]
    return columns, rows


def eval_columns(report: dict) -> dict[str, Any]:
    """The columns one protocol contributes: nine numbers, queries, timings (and the std of each number for stat)."""
    scores = report["scores"]
    columns: dict[str, Any] = {key: scores.get(key) for key in HEADLINE_KEYS}
    columns["n_queries"] = report.get("n_queries")
    timings = report.get("timings") or {}
    columns.update({f"time_{key}": timings.get(key) for key in EVAL_TIMING_KEYS})
    std = report.get("std")
    if std:
        columns.update({f"{key}_std": std.get(key) for key in HEADLINE_KEYS})
    return columns


def _style(sheet, columns: list[tuple[str, str]], n_rows: int) -> None:
    # openpyxl is loaded here, as pandas loads it: only when a workbook is written (not by every cbir-eval).
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    fills = ("DDEBF7", "E2EFDA")
    start = 0
    for block, group in enumerate(dict.fromkeys(g for g, _ in columns)):
        width = sum(1 for g, _ in columns if g == group)
        if width > 1:
            sheet.merge_cells(start_row=1, start_column=start + 1, end_row=1, end_column=start + width)
        for c in range(start + 1, start + width + 1):
            for r in range(1, HEADER_ROWS + 1):
                cell = sheet.cell(r, c)
                cell.font = Font(bold=True)
                cell.fill = PatternFill("solid", fgColor=fills[block % 2])
                cell.alignment = Alignment(horizontal="center")
        start += width
    for c, (group, name) in enumerate(columns, 1):
        sheet.column_dimensions[get_column_letter(c)].width = max(9, min(40, len(name) + 2)) if name != "run" else 28
        if group in PROTOCOLS and not name.startswith("time_") and name != "n_queries":
            for r in range(HEADER_ROWS + 1, HEADER_ROWS + n_rows + 1):
                sheet.cell(r, c).number_format = "0.000"
    sheet.freeze_panes = sheet.cell(HEADER_ROWS + 1, 2)


def _write_runs(writer: pd.ExcelWriter, sheet: str, columns: list[tuple[str, str]], records: list[dict]) -> None:
    # pandas writes (group, name) columns only beside an index, in a layout with a third header row; the thesis's
    # sheet has none, so the two header rows go in as the first two rows of one object frame.
    rows = [[g for g, _ in columns], [n for _, n in columns]]
    rows += [[_cell_value(record.get(column)) for column in columns] for record in records]
    pd.DataFrame(rows, dtype=object).to_excel(writer, sheet_name=sheet, header=False, index=False)
    _style(writer.sheets[sheet], columns, len(records))


def append_run(workbook: str | Path, run_name: str, *, config: dict | None = None, timings: dict | None = None,
               evals: dict[str, dict] | None = None, sheet: str = SHEET, replace: bool = False,
               date: str | None = None) -> int:
    """Write one run as a row (a new one, or the row of the same run name with ``replace``); returns its row
    number in the sheet. The workbook and sheet are created when missing; other sheets are kept."""
    if not run_name:
        raise ParameterError("{run_name} must not be empty", "run_name")
    path = _check_path(workbook)
    values: dict[tuple[str, str], Any] = {
        (RUN_GROUP, "run"): run_name,
        (RUN_GROUP, "date"): date or _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    values.update({(PARAM_GROUP, str(k)): v for k, v in (config or {}).items()})
    values.update({(TIMING_GROUP, str(k)): v for k, v in (timings or {}).items()})
    for protocol, report in sorted((evals or {}).items(), key=lambda item: _group_rank(item[0])):
        values.update({(protocol, k): v for k, v in eval_columns(report).items()})

    columns, records = read_rows(path, sheet) if path.is_file() and sheet in sheet_names(path) else ([], [])
    # A stable sort: the columns of a group keep their order, and a new one goes after its group's last.
    columns = sorted(columns + [c for c in values if c not in columns], key=lambda c: _group_rank(c[0]))
    position = next((i for i, r in enumerate(records) if str(r.get((RUN_GROUP, "run"))) == run_name), None) \
        if replace else None
    if position is None:
        position = len(records)
        records.append(values)
    else:
        records[position] = values
    _write_sheet(path, sheet, lambda writer: _write_runs(writer, sheet, columns, records), first=True)
    return HEADER_ROWS + 1 + position


# ---------------------------------------------------------------------------------------------- Markdown

DEFAULT_PARAMS = ("model", "loss", "num_features", "epochs", "frozen")
DEFAULT_METRICS = ("class_top1", "class_top5", "class_maj", "project_top1")
_KIND_TITLE = {"top1": "top-1", "top5": "top-5", "maj": "maj"}


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
    # Hyper-parameters span magnitudes (lr 1e-4, epochs 20): significant digits, not decimals; a whole number
    # read back from a column with blanks is a float, and still prints as a whole number.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
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
