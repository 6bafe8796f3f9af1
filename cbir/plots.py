"""Every figure the toolkit draws (matplotlib, Agg backend: no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Training loss (and validation top-1 when there is one) per epoch."""
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [row["loss"] for row in history], marker="o", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if any(row.get("val_top1") is not None for row in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [row.get("val_top1") for row in history], marker="s", color="tab:green", label="validation top-1")
        ax2.set_ylabel("validation top-1")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_retrieval(query_image, query_class: str, neighbours: list[tuple], path: str | Path, *, title: str = "") -> Path:
    """The query beside its neighbours, each titled with rank, class and distance; correct classes framed green.

    ``neighbours`` holds (image, class, distance) tuples, best first.
    """
    path = Path(path)
    columns = min(len(neighbours), 5) or 1
    rows = 1 + (len(neighbours) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(query_image)
    axes[0][0].set_title(f"query\n{query_class}", fontsize=9, fontweight="bold")
    for rank, (image, class_name, distance) in enumerate(neighbours):
        ax = axes[1 + rank // columns][rank % columns]
        ax.imshow(image)
        correct = class_name == query_class
        ax.set_title(f"{rank + 1}. {class_name}\nd={distance:.3f}", fontsize=8, color="green" if correct else "red")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if correct else "red")
            spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
