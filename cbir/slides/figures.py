"""The figure of a slide search: the query's tiles and slide, and each result slide with its matching regions boxed."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from cbir.files import save_atomically
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cbir.plots import HIT_COLOUR, MISS_COLOUR, QUERY_COLOUR, _frame


def _boxed_thumbnail(ax, thumbnail, boxes, colour: str) -> None:
    """A slide thumbnail with level-0 ``boxes`` (x, y, w, h) drawn; ``thumbnail`` = (image, level-0 px per pixel)."""
    image, downsample = thumbnail
    ax.imshow(image)
    for x, y, w, h in boxes:
        # At least 3 pixels wide, so a tile of a large slide stays visible on its thumbnail.
        side_w, side_h = max(w / downsample, 3), max(h / downsample, 3)
        ax.add_patch(Rectangle((x / downsample, y / downsample), side_w, side_h, fill=False, edgecolor=colour,
                               linewidth=1.6))
    _frame(ax, colour, 3)


def plot_slide_search(query_tiles: list, query_thumbnail, query_boxes, query_title: str, results: list[dict],
                      path: str | Path | BinaryIO, *, title: str = ""):
    """A slide search: the query (its tiles and its slide with them boxed), then each result slide's thumbnail
    with its matching regions boxed, green when of the query's class, red otherwise.

    ``results`` hold ``thumbnail`` ((image, downsample) or None when the slide file is gone), ``boxes``, ``title``,
    ``hit`` and optionally ``tile`` (the matching tile's image, shown above its slide for a region search).
    """
    path = Path(path) if isinstance(path, str) else path  # a path, or a file object to write the PNG into
    columns = min(max(len(results), 1), 5)
    with_tiles = any(r.get("tile") is not None for r in results)
    rows_per_result = 2 if with_tiles else 1
    result_rows = (len(results) + columns - 1) // columns
    rows = 1 + rows_per_result * result_rows
    fig = Figure(figsize=(2.9 * (columns + 1), 2.9 * rows))
    axes = fig.subplots(rows, columns + 1, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    # The query's tiles as one grid image, then its slide.
    shown = query_tiles[:16]
    if shown:
        side = int(np.ceil(np.sqrt(len(shown))))
        size = shown[0].size[0]
        grid = np.full((side * size, side * size, 3), 255, dtype=np.uint8)
        for i, tile in enumerate(shown):
            r, c = divmod(i, side)
            grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = np.asarray(tile.resize((size, size)))
        axes[0][0].imshow(grid)
        _frame(axes[0][0], QUERY_COLOUR)
        axes[0][0].set_title(f"query tiles ({len(query_tiles)})", fontsize=9, color=QUERY_COLOUR, fontweight="bold")
    if query_thumbnail is not None:
        _boxed_thumbnail(axes[0][1], query_thumbnail, query_boxes, QUERY_COLOUR)
        axes[0][1].set_title(query_title, fontsize=9, color=QUERY_COLOUR, fontweight="bold")
    if columns > 1:
        axes[0][2].text(0.02, 0.5, "boxes: the matching regions\ngreen: the query's class\nred: another class\n"
                                   "distance: squared L2 of unit vectors\n(0 = identical, 4 = opposite)",
                        fontsize=9, va="center", ha="left", transform=axes[0][2].transAxes)
    for i, result in enumerate(results):
        row = 1 + rows_per_result * (i // columns)
        col = i % columns
        colour = HIT_COLOUR if result.get("hit") else MISS_COLOUR
        if with_tiles and result.get("tile") is not None:
            axes[row][col].imshow(result["tile"])
            _frame(axes[row][col], colour)
            axes[row][col].set_title(result["title"], fontsize=8, color=colour)
            row += 1
        ax = axes[row][col]
        if result.get("thumbnail") is None:
            ax.text(0.5, 0.5, "slide file not found", ha="center", va="center", transform=ax.transAxes)
        else:
            _boxed_thumbnail(ax, result["thumbnail"], result["boxes"], colour)
        ax.set_title(result["slide_title"] if with_tiles else result["title"], fontsize=8, color=colour)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=90))
