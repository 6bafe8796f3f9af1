"""Retrieval evaluation: the thesis's protocols and scores, plus the measures retrieval papers report.

The parts, in the order data flows through them:

* :mod:`~cbir.evaluation.searching` asks the caller's search function for each query's results and drops those
  that must not count (the query itself, its slide with ``exclude_same``);
* :mod:`~cbir.evaluation.scoring` turns each query's results into numbers at the class, project and similar
  levels;
* :mod:`~cbir.evaluation.protocols` chooses the queries of each measure, aggregates their numbers and holds
  :func:`evaluate`, which runs the three;
* :mod:`~cbir.evaluation.report` is the result (JSON and text), :mod:`~cbir.evaluation.excel` and
  :mod:`~cbir.evaluation.figures` write it as workbooks and confusion matrices.

Nothing here knows of models, Redis or FAISS: the search is a function, so every part is tested with known
results.
"""

from cbir.evaluation.excel import append_run, markdown_table, read_rows, write_excel_sheet
from cbir.evaluation.figures import confusion_counts, plot_confusion_matrices
from cbir.evaluation.protocols import (MEASURES, dominant_classes, evaluate, resolve_removed_classes,
                                       select_queries)
from cbir.evaluation.report import EvalReport, read_report
from cbir.evaluation.scoring import HEADLINE_KEYS, LEVELS
from cbir.evaluation.searching import SearchFn, results_to_request

__all__ = [
    "MEASURES", "LEVELS", "HEADLINE_KEYS", "SearchFn", "EvalReport", "evaluate", "select_queries",
    "dominant_classes", "resolve_removed_classes", "results_to_request", "read_report", "write_excel_sheet",
    "append_run", "read_rows", "markdown_table", "plot_confusion_matrices", "confusion_counts",
]
