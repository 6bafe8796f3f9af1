"""The figures of the main workflow: the training loss curve and the retrieval figure, and the name wrapping
every figure shares. The other analyses draw their own figures beside their numbers (k-means: elbow and silhouette;
t-SNE; the data-set figures; evaluation's confusion matrices).

matplotlib's object API throughout (``Figure``, never pyplot): no backend to choose, no screen needed, and no
global figure state between calls.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cbir.files import save_atomically

HIT_COLOUR = "#1a9641"
MISS_COLOUR = "#d7191c"
QUERY_COLOUR = "#2c7bb6"
UNJUDGED_COLOUR = "#808080"  # a query without a class: its results are neither right nor wrong


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def plot_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Training loss (and validation top-1 when there is one) per epoch; the best validation epoch is marked."""
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    losses = [_number(row.get("loss")) for row in history]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    lines = ax.plot(epochs, losses, marker="o", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    # Epochs are whole numbers: one tick each while they fit, else integer ticks only.
    if 0 < len(epochs) <= 20:
        ax.set_xticks(epochs)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if losses and not math.isnan(losses[-1]):
        ax.annotate(f"{losses[-1]:.4g}", (epochs[-1], losses[-1]), xytext=(4, 6), textcoords="offset points",
                    fontsize=8, color="tab:blue")
    title = f"training: {len(history)} epoch{'s' if len(history) != 1 else ''}"
    val = [_number(row.get("val_top1")) for row in history]
    if any(not math.isnan(v) for v in val):
        ax2 = ax.twinx()
        lines += ax2.plot(epochs, val, marker="s", color="tab:green", label="validation top-1")
        ax2.set_ylabel("validation top-1 (retrieval)", color="tab:green")
        ax2.set_ylim(0, 1.05)
        # The first epoch reaching the best score, as training keeps it (a later tie does not replace it).
        best_score, minus_index = max((v, -i) for i, v in enumerate(val) if not math.isnan(v))
        best = (best_score, epochs[-minus_index])
        ax2.scatter([best[1]], [best[0]], s=160, facecolors="none", edgecolors="tab:green", linewidths=2, zorder=5)
        lines.append(ax2.scatter([], [], s=80, facecolors="none", edgecolors="tab:green", linewidths=2,
                                 label=f"best epoch {best[1]}: {best[0]:.3f}"))
        title += f"; best validation top-1 {best[0]:.3f} (epoch {best[1]})"
    # One legend for both axes.
    ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=100))


def wrap_name(name: str, width: int, max_lines: int = 3) -> str:
    """A class name broken after underscores (inside a part only when it is longer than ``width``) into at most
    ``max_lines`` lines; the last one ends in an ellipsis when the name is cut."""
    parts = [part + "_" for part in name.split("_")]
    parts[-1] = parts[-1][:-1]
    lines: list[str] = []
    current = ""
    for part in parts:
        while len(part) > width:  # a part too long for any line: cut it
            if current:
                lines.append(current)
                current = ""
            lines.append(part[:width])
            part = part[width:]
        if len(current) + len(part) > width and current:
            lines.append(current)
            current = ""
        current += part
    if current or not lines:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, width - 1)] + "…"
    return "\n".join(lines)


def _frame(ax, colour: str, width: float = 4) -> None:
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def plot_retrieval(query_image, query_class: str, neighbours: list[tuple], path, *, title: str = ""):
    """The query beside its neighbours, each titled with rank, class and distance; correct classes framed green,
    others red, all grey when the query has no class (a lone file outside any class folder).

    ``neighbours`` holds (image, class, distance) tuples, best first; an image None (its file moved or was removed
    since indexing) gets a grey panel that says so, in its place among the ranks.
    """
    path = Path(path) if isinstance(path, (str, Path)) else path  # or a binary file
    columns = min(len(neighbours), 5) or 1
    rows = 1 + (len(neighbours) + columns - 1) // columns
    longest = max([len(query_class)] + [len(c) for _, c, _ in neighbours])
    # Long names get a smaller font and are wrapped, so that neighbouring titles never run into each other.
    fontsize = 10 if longest <= 24 else 9 if longest <= 40 else 8
    width_chars = int(2.3 * 72 / (fontsize * 0.6))  # characters that fit above one image
    fig = Figure(figsize=(2.7 * columns, 3.1 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(query_image)
    _frame(axes[0][0], QUERY_COLOUR)
    axes[0][0].set_title(f"query\n{wrap_name(query_class, width_chars)}", fontsize=fontsize, fontweight="bold",
                         color=QUERY_COLOUR)
    labelled = bool(query_class)
    hits = 0
    for rank, (image, class_name, distance) in enumerate(neighbours):
        ax = axes[1 + rank // columns][rank % columns]
        if image is None:
            ax.set_facecolor("0.9")
            ax.text(0.5, 0.5, "not shown:\nfile moved\nor removed", ha="center", va="center", fontsize=fontsize,
                    color="0.3", transform=ax.transAxes)
        else:
            ax.imshow(image)
        correct = labelled and class_name == query_class
        hits += correct
        colour = HIT_COLOUR if correct else MISS_COLOUR if labelled else UNJUDGED_COLOUR
        mark = ("✓ " if correct else "✗ ") if labelled else ""
        ax.set_title(f"{mark}{rank + 1}. {wrap_name(class_name, width_chars)}\ndistance {distance:.3f}",
                     fontsize=fontsize, color=colour)
        _frame(ax, colour)
    if columns > 1:
        # The key, in the free space of the query's row.
        missing = sum(image is None for image, _, _ in neighbours)
        judged = (f"{hits} of {len(neighbours)} results of the query's class\n" if labelled else
                  "the query has no class (no class folder):\nthe results are not judged\n")
        frames = "green frame ✓: same class\nred frame ✗: another class\n" if labelled else ""
        axes[0][1].text(0.02, 0.5, judged + (f"{missing} not shown: file moved or removed\n" if missing else "")
                                   + "\n" + frames +
                                   "distance: squared L2 of unit vectors\n(2 - 2 cos: 0 = identical, 4 = opposite)",
                        fontsize=9, va="center", ha="left", transform=axes[0][1].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=90, format="png"))
