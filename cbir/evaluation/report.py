"""What one evaluation measured, as JSON (``to_dict``) and as text for people (``format``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cbir.errors import CbirError
from cbir.evaluation.scoring import KINDS, LEVELS


@dataclass
class EvalReport:
    """Everything one evaluation measured; ``to_dict`` for JSON, ``format`` for people."""

    measure: str
    n_queries: int
    scores: dict[str, float]
    std: dict[str, float] | None = None
    ci: dict[str, tuple[float, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    per_class: pd.DataFrame | None = None
    dropped_classes: list[str] = field(default_factory=list)
    per_query: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    k: int = 5
    n_searched: int = 0
    cluster_divergence: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        per_class = None
        if self.per_class is not None:
            per_class = {str(cls): {str(col): _plain(v) for col, v in row.items()}
                         for cls, row in self.per_class.to_dict(orient="index").items()}
        return {
            "measure": self.measure,
            "n_queries": int(self.n_queries),
            "n_searched": int(self.n_searched),
            "k": int(self.k),
            "scores": {key: _plain(v) for key, v in self.scores.items()},
            "std": None if self.std is None else {key: _plain(v) for key, v in self.std.items()},
            "ci": None if self.ci is None else {key: [_plain(lo), _plain(hi)] for key, (lo, hi) in self.ci.items()},
            "timings": {key: _plain(v) for key, v in self.timings.items()},
            "per_class": per_class,
            "dropped_classes": list(self.dropped_classes),
            "cluster_divergence": None if self.cluster_divergence is None
            else {str(c): _plain(v) for c, v in self.cluster_divergence.items()},
            "notes": list(self.notes),
            "settings": {key: _plain(v) for key, v in self.settings.items()},
            "per_query": [
                {"query_path": p, "query_class": c, "top1_class": t, "majority_class": m}
                for p, c, t, m in self.per_query
            ],
        }

    def _number(self, key: str) -> str:
        value = self.scores.get(key, math.nan)
        text = "  n/a" if value is None or math.isnan(value) else f"{value:.3f}"
        if self.std is not None and key in self.std:
            text += f" ± {self.std[key]:.3f}"
        return text

    def format(self) -> str:
        k = self.k
        lines = [f"measure {self.measure}: {self.n_queries} queries, first {k} results"
                 + (f" (mean ± std over {self.settings.get('repeats')} samples)" if self.std is not None else "")]
        columns = ("top-1", f"top-{k}", "maj")
        cells = [[self._number(f"{level}_{kind}") for kind in KINDS] for level in LEVELS]
        width = max(len(c) for row in cells for c in row + list(columns))
        lines.append(" " * 9 + "".join(f"{c:>{width + 2}}" for c in columns))
        for level, row in zip(LEVELS, cells):
            lines.append(f"{level:<9}" + "".join(f"{c:>{width + 2}}" for c in row))
        extras = [("mMV@5", "mmv5"), (f"precision@{k}", "precision_at_k"), (f"mAP@{k}", "map_at_k"),
                  ("MAP@R", "map_at_r")]
        lines.append("  ".join(f"{label} {self._number(key).strip()}" for label, key in extras if key in self.scores))
        if "cluster_top1" in self.scores:
            lines.append("cluster  " + "  ".join(f"{col} {self._number(f'cluster_{kind}').strip()}"
                                                 for col, kind in zip(columns, KINDS)))
        if self.ci:
            level = self.settings.get("ci_level", 0.95)
            lines.append(f"{level:.0%} bootstrap CI ({self.settings.get('bootstrap')} resamples): " + "  ".join(
                f"{key} [{lo:.3f}, {hi:.3f}]" for key, (lo, hi) in self.ci.items()))
        t = self.timings
        if t:
            lines.append(
                f"time: total {t.get('total', 0):.2f} s, model {t.get('model', 0):.2f} s, "
                f"transfer {t.get('transfer', 0):.2f} s, search {t.get('search', 0):.2f} s, "
                f"per query {1000 * t.get('per_query', 0):.2f} ms ({self.n_searched} searched)")
        if self.dropped_classes:
            rule = self.settings.get("removed_by")
            lines.append("removed classes" + (f" ({rule})" if rule else "") + ": " + ", ".join(self.dropped_classes))
        if self.per_class is not None:
            lines.append("per class:")
            lines.append(self.per_class.to_string(float_format=lambda v: f"{v:.3f}"))
        if self.cluster_divergence:
            lines.append("share of queries where class and cluster top-1 disagree: " + ", ".join(
                f"{c} {v:.3f}" for c, v in self.cluster_divergence.items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    __str__ = format


def _plain(value: Any) -> Any:
    """A JSON-able scalar: numpy numbers to Python, NaN to None."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value




def read_report(path: str | Path) -> dict:
    """A ``cbir-eval --output`` JSON file (:meth:`EvalReport.to_dict`) as a dict."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CbirError(f"evaluation file {path} does not exist (write it with cbir-eval --output)") from None
    except (IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CbirError(f"{path} is not a cbir-eval JSON file ({exc.__class__.__name__})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scores"), dict):
        raise CbirError(f"{path} is not a cbir-eval --output file: it has no 'scores'")
    return report
