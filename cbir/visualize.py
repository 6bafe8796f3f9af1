"""Data-set figures (thesis: visualization): what a data set holds before anything is trained on it.

Into one folder: a grid of samples per class, images per class and per split (counts and shares), image sizes,
pixel mean and std per channel and class, a preview of the training augmentation, and the numbers behind them
(``stats.json``, ``stats.csv``). A data set is either split folders (``train/``, ``index/``, ``query/`` or any
sub-folders that are class-folder data sets) or a single class-folder data set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from cbir.data import (IMAGENET_MEAN, IMAGENET_STD, Sample, UnreadableImage, build_transform, decoding_threads,
                       is_image_file, list_samples, load_image)
from cbir.errors import CbirError
from cbir.files import make_folders, save_atomically, write_text_atomically
from cbir.labels import balanced_rounds, project_of
from cbir.plots import wrap_name

log = logging.getLogger("cbir")

#: Split folders are drawn in this order when present; others follow alphabetically.
SPLIT_ORDER = ("train", "training", "validation", "val", "index", "test", "query")
#: Classes per page of the sample grid: past that, one tall figure becomes unreadable.
GRID_CLASSES_PER_PAGE = 20
#: Figures made of photographs: a lower resolution keeps the PNGs small enough to commit.
PHOTO_DPI = 80
SPLIT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


@dataclass
class DatasetStats:
    root: Path
    layout: str  # "splits" or "single"
    splits: dict[str, list[Sample]]
    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> images
    sizes: list[tuple[str, str, int, int]] = field(default_factory=list)  # (split, class, width, height) sampled
    pixel_mean: dict[str, list[float]] = field(default_factory=dict)  # class -> RGB in [0, 1]
    pixel_std: dict[str, list[float]] = field(default_factory=dict)
    overall_mean: list[float] = field(default_factory=list)
    overall_std: list[float] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def format(self) -> str:
        total = sum(len(s) for s in self.splits.values())
        split_text = ", ".join(f"{name} {len(samples)}" for name, samples in self.splits.items())
        lines = [f"{self.root}: {total} images of {len(self.classes)} classes ({split_text})"]
        if self.overall_mean:
            lines.append("pixel mean (RGB) " + " ".join(f"{v:.3f}" for v in self.overall_mean)
                         + ", std " + " ".join(f"{v:.3f}" for v in self.overall_std)
                         + " (sampled thumbnails)")
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable images skipped, e.g. {self.unreadable[0]}")
        lines += [f"figure: {f}" for f in self.figures]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- discovery

def _has_images_directly(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.iterdir())


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_split(folder: Path) -> bool:
    """A split folder holds class folders, not images: no image directly inside, and a sub-folder with some."""
    if _has_images_directly(folder):
        return False
    return any(_has_images_directly(d) or any(is_image_file(p) for p in d.rglob("*")) for d in _subdirs(folder))


def _split_key(name: str) -> tuple:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def discover(root: str | Path) -> tuple[str, dict[str, list[Sample]]]:
    """("splits", {split: samples}) when every sub-folder of ``root`` is a class-folder data set; else
    ("single", {root name: samples}) for a class-folder data set."""
    root = Path(root)
    if not root.is_dir():
        raise CbirError(f"data folder {root} does not exist")
    subdirs = _subdirs(root)
    if not subdirs:
        raise CbirError(f"{root} has no sub-folders: expected split folders (train/index/query) or class folders")
    if all(_is_split(d) for d in subdirs):
        splits = {d.name: list_samples(d) for d in sorted(subdirs, key=lambda d: _split_key(d.name))}
        return "splits", splits
    return "single", {root.name or "data": list_samples(root)}


# --------------------------------------------------------------------------------------------- numbers

def _sample_per_class(samples: list[Sample], per_class: int | None, seed: int) -> list[Sample]:
    """At most ``per_class`` random images of each class (all with None), in class then file order."""
    chosen = balanced_rounds([s.class_name for s in samples], seed=seed, rounds=per_class or None)
    return [samples[i] for i in sorted(chosen)]


def _header_size(path: str) -> tuple[int, int] | None:
    """Width and height from the file header (no decoding: fast on large collections)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _thumbnail(path: str, size: int) -> np.ndarray | None:
    try:
        image = load_image(path)
    except UnreadableImage:
        return None
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def compute_stats(root: str | Path, *, max_per_class: int | None = 200, thumbnail: int = 64, seed: int = 0
                  ) -> DatasetStats:
    """Counts of every image; sizes and pixel statistics of up to ``max_per_class`` images per class and split."""
    layout, splits = discover(root)
    classes = sorted({s.class_name for samples in splits.values() for s in samples})
    stats = DatasetStats(root=Path(root), layout=layout, splits=splits, classes=classes)
    for split, samples in splits.items():
        counted = Counter(s.class_name for s in samples)
        for cls in classes:
            stats.counts.setdefault(cls, {})[split] = counted.get(cls, 0)

    sampled = [(split, s) for split, samples in splits.items() for s in _sample_per_class(samples, max_per_class, seed)]
    with ThreadPoolExecutor(decoding_threads()) as pool:
        sizes = list(pool.map(lambda item: _header_size(item[1].path), sampled))
        thumbs = list(pool.map(lambda item: _thumbnail(item[1].path, thumbnail), sampled))
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    pixels: Counter = Counter()
    for (split, sample), size, thumb in zip(sampled, sizes, thumbs):
        if size is None or thumb is None:
            stats.unreadable.append(sample.path)
            continue
        stats.sizes.append((split, sample.class_name, int(size[0]), int(size[1])))
        flat = thumb.reshape(-1, 3)
        sums[sample.class_name] = sums.get(sample.class_name, 0) + flat.sum(0)
        squares[sample.class_name] = squares.get(sample.class_name, 0) + (flat ** 2).sum(0)
        pixels[sample.class_name] += len(flat)
    for cls in classes:
        if pixels[cls]:
            mean = sums[cls] / pixels[cls]
            std = np.sqrt(np.maximum(squares[cls] / pixels[cls] - mean ** 2, 0.0))
            stats.pixel_mean[cls], stats.pixel_std[cls] = mean.tolist(), std.tolist()
    total = sum(pixels.values())
    if total:
        mean = sum(sums.values()) / total
        std = np.sqrt(np.maximum(sum(squares.values()) / total - mean ** 2, 0.0))
        stats.overall_mean, stats.overall_std = mean.tolist(), std.tolist()
    return stats


# --------------------------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    return Figure(figsize=(width, height))  # no pyplot: no global figure state


def _wrap(name: str, width: int = 22) -> str:
    return wrap_name(name, width)


def _save(fig, path: Path, dpi: int = 100) -> Path:
    return save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=dpi, bbox_inches="tight"))


def plot_sample_grid(stats: DatasetStats, out_dir: Path, *, per_class: int = 6, seed: int = 0) -> list[Path]:
    """Rows of ``per_class`` random images per class (from the training split when there is one)."""
    rng = np.random.default_rng(seed)
    pool: dict[str, list[Sample]] = {}
    for samples in stats.splits.values():  # the first split holding a class wins: train comes first
        for cls in {s.class_name for s in samples} - set(pool):
            pool[cls] = [s for s in samples if s.class_name == cls]
    written = []
    classes = stats.classes
    pages = [classes[i:i + GRID_CLASSES_PER_PAGE] for i in range(0, len(classes), GRID_CLASSES_PER_PAGE)]
    for page_number, page in enumerate(pages, 1):
        fig = _figure(1.6 * per_class + 2.2, 1.6 * len(page) + 0.6)
        axes = fig.subplots(len(page), per_class, squeeze=False)
        for row, cls in zip(axes, page):
            members = pool[cls]
            picks = [members[i] for i in sorted(rng.choice(len(members), min(per_class, len(members)), replace=False))]
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
            for ax, sample in zip(row, picks):
                try:
                    ax.imshow(load_image(sample.path))
                except UnreadableImage:
                    ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=8, color="red")
            total = sum(stats.counts[cls].values())
            row[0].set_ylabel(f"{_wrap(cls)}\n({total} images)", rotation=0, ha="right", va="center", fontsize=9,
                              labelpad=8)
        suffix = "" if len(pages) == 1 else f" (page {page_number} of {len(pages)})"
        fig.suptitle(f"samples per class{suffix}", fontsize=12)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the first row
        name = "samples_grid.png" if page_number == 1 else f"samples_grid_{page_number}.png"
        written.append(_save(fig, out_dir / name, dpi=PHOTO_DPI))
    return written


def plot_images_per_class(stats: DatasetStats, out_dir: Path) -> Path:
    """Per class: images in each split (left) and the class's share of that split (right)."""
    classes = stats.classes
    splits = list(stats.splits)
    height = max(3.0, 0.32 * len(classes) * max(1, len(splits)) ** 0.5 + 1.2)
    fig = _figure(13, height)
    ax_count, ax_share = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(classes))
    bar = 0.8 / len(splits)
    for k, split in enumerate(splits):
        counts = np.array([stats.counts[c][split] for c in classes])
        total = counts.sum() or 1
        offset = y - 0.4 + bar * (k + 0.5)
        colour = SPLIT_COLOURS[k % len(SPLIT_COLOURS)]
        ax_count.barh(offset, counts, height=bar, color=colour, label=split)
        ax_share.barh(offset, 100.0 * counts / total, height=bar, color=colour, label=split)
        small = len(classes) * len(splits) <= 60  # past that, numbers on every bar are clutter
        if small:
            for yy, n in zip(offset, counts):
                ax_count.text(n, yy, f" {n}", va="center", fontsize=7)
            for yy, n in zip(offset, counts):
                ax_share.text(100.0 * n / total, yy, f" {100.0 * n / total:.1f}%", va="center", fontsize=7)
    ax_count.set_yticks(y, [_wrap(c, 30) for c in classes], fontsize=8)
    ax_count.invert_yaxis()
    ax_count.set_xlabel("images")
    ax_count.set_title("images per class and split")
    ax_share.set_xlabel("share of the split's images (%)")
    ax_share.set_title("class shares within each split")
    ax_count.margins(x=0.15)
    ax_share.margins(x=0.15)
    ax_count.legend(title="split", fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_dir / "images_per_class.png")


def plot_images_per_split(stats: DatasetStats, out_dir: Path) -> Path:
    """Images per split with its share of all images (left); each split's make-up by project (right)."""
    splits = list(stats.splits)
    counts = np.array([len(stats.splits[s]) for s in splits])
    grand = counts.sum() or 1
    fig = _figure(12, 4.2)
    ax_total, ax_projects = fig.subplots(1, 2)
    bars = ax_total.bar(splits, counts, color=[SPLIT_COLOURS[k % len(SPLIT_COLOURS)] for k in range(len(splits))])
    for rect, n in zip(bars, counts):
        ax_total.text(rect.get_x() + rect.get_width() / 2, n, f"{n}\n({100.0 * n / grand:.1f}%)", ha="center",
                      va="bottom", fontsize=9)
    ax_total.set_ylabel("images")
    ax_total.set_title(f"images per split ({grand} in all)")
    ax_total.margins(y=0.2)

    projects = sorted({project_of(c) for c in stats.classes})
    palette = matplotlib.colormaps["tab20"] if len(projects) > 10 else matplotlib.colormaps["tab10"]
    bottom = np.zeros(len(splits))
    for p_index, project in enumerate(projects):
        members = [c for c in stats.classes if project_of(c) == project]
        shares = np.array([100.0 * sum(stats.counts[c][s] for c in members) / max(1, len(stats.splits[s]))
                           for s in splits])
        ax_projects.bar(splits, shares, bottom=bottom, color=palette(p_index % palette.N), label=project)
        for x, (b, v) in enumerate(zip(bottom, shares)):
            if v >= 6:
                ax_projects.text(x, b + v / 2, f"{v:.0f}%", ha="center", va="center", fontsize=8)
        bottom += shares
    ax_projects.set_ylabel("share of the split (%)")
    ax_projects.set_ylim(0, 100)
    ax_projects.set_title("projects within each split")
    ax_projects.legend(title="project", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, out_dir / "images_per_split.png")


def plot_image_sizes(stats: DatasetStats, out_dir: Path) -> Path:
    """Width x height of the sampled images (bubble area: how many share a size) and their histograms."""
    fig = _figure(12, 4.8)
    ax_scatter, ax_hist = fig.subplots(1, 2)
    if not stats.sizes:
        for ax in (ax_scatter, ax_hist):
            ax.text(0.5, 0.5, "no readable image", ha="center", va="center")
        return _save(fig, out_dir / "image_sizes.png")
    projects = sorted({project_of(cls) for _, cls, _, _ in stats.sizes})
    palette = matplotlib.colormaps["tab20"] if len(projects) > 10 else matplotlib.colormaps["tab10"]
    for p_index, project in enumerate(projects):
        sizes = Counter((w, h) for _, cls, w, h in stats.sizes if project_of(cls) == project)
        wh = np.array(list(sizes))
        n = np.array(list(sizes.values()))
        ax_scatter.scatter(wh[:, 0], wh[:, 1], s=20 + 180 * np.sqrt(n / n.max()), alpha=0.6,
                           color=palette(p_index % palette.N), label=f"{project} ({n.sum()})", edgecolors="black",
                           linewidths=0.4)
    # The most common sizes by name, in a box: bubbles alone do not say 224 x 224, and labels beside
    # neighbouring bubbles would overprint each other.
    common = Counter((w, h) for _, _, w, h in stats.sizes).most_common(6)
    ax_scatter.text(0.98, 0.03, "most common (w×h: images)\n" + "\n".join(f"{w}×{h}: {n}" for (w, h), n in common),
                    transform=ax_scatter.transAxes, ha="right", va="bottom", fontsize=8,
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "lightgrey"})
    ax_scatter.set_xlabel("width (px)")
    ax_scatter.set_ylabel("height (px)")
    ax_scatter.set_title("image sizes (area: images of that size)")
    ax_scatter.margins(0.15)
    ax_scatter.legend(title="project (images)", fontsize=8)
    widths = np.array([w for _, _, w, _ in stats.sizes])
    heights = np.array([h for _, _, _, h in stats.sizes])
    low, high = min(widths.min(), heights.min()), max(widths.max(), heights.max())
    bins = np.linspace(low - 0.5, high + 0.5, 31) if high > low else np.array([low - 0.5, low + 0.5])
    ax_hist.hist([widths, heights], bins=bins, label=["width", "height"], color=["tab:blue", "tab:orange"])
    ax_hist.set_xlabel("pixels")
    ax_hist.set_ylabel("images")
    ax_hist.set_title(f"width: median {np.median(widths):.0f}, height: median {np.median(heights):.0f}")
    ax_hist.legend(fontsize=8)
    fig.suptitle(f"image sizes ({len(stats.sizes)} images sampled)", fontsize=12)
    fig.tight_layout()
    return _save(fig, out_dir / "image_sizes.png")


def plot_pixel_stats(stats: DatasetStats, out_dir: Path) -> Path:
    """Mean and standard deviation of each channel per class, beside the data set's and ImageNet's."""
    classes = [c for c in stats.classes if c in stats.pixel_mean]
    rows = classes + ["(all images)", "(ImageNet)"]
    means = [stats.pixel_mean[c] for c in classes] + [stats.overall_mean or [0, 0, 0], list(IMAGENET_MEAN)]
    stds = [stats.pixel_std[c] for c in classes] + [stats.overall_std or [0, 0, 0], list(IMAGENET_STD)]
    fig = _figure(12, max(3.0, 0.42 * len(rows) + 1.2))
    ax_mean, ax_std = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    for k, (channel, colour) in enumerate(zip("RGB", ("tab:red", "tab:green", "tab:blue"))):
        offset = y - 0.4 + 0.8 / 3 * (k + 0.5)
        ax_mean.barh(offset, [m[k] for m in means], height=0.8 / 3, color=colour, label=channel)
        ax_std.barh(offset, [s[k] for s in stds], height=0.8 / 3, color=colour, label=channel)
    ax_mean.set_yticks(y, [_wrap(r, 30) for r in rows], fontsize=8)
    ax_mean.invert_yaxis()
    ax_mean.set_xlim(0, 1)
    ax_std.set_xlim(0, max(0.35, max(max(s) for s in stds) * 1.1))
    ax_mean.set_xlabel("mean (pixel values in [0, 1])")
    ax_std.set_xlabel("standard deviation")
    ax_mean.set_title("pixel mean per channel")
    ax_std.set_title("pixel std per channel")
    ax_mean.legend(title="channel", fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_dir / "pixel_stats.png")


def plot_augmentation_preview(stats: DatasetStats, out_dir: Path, *, images: int = 4, views: int = 5,
                              input_size: int = 224, seed: int = 0) -> Path:
    """A few training images: the plain resized input, then ``views`` random training augmentations of it
    (cbir.data.build_transform(train=True)), un-normalised for display."""
    rng = np.random.default_rng(seed)
    first_split = next(iter(stats.splits.values()))
    by_class: dict[str, list[Sample]] = {}
    for s in first_split:
        by_class.setdefault(s.class_name, []).append(s)
    # One image from each of several classes, spread over the class list.
    picked_classes = [sorted(by_class)[int(i)] for i in np.linspace(0, len(by_class) - 1, min(images, len(by_class)))]
    picks = [by_class[c][int(rng.integers(len(by_class[c])))] for c in dict.fromkeys(picked_classes)]
    augment = build_transform(input_size, train=True)
    plain = build_transform(input_size, train=False)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def shown(tensor):
        return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    torch.manual_seed(seed)  # torchvision's random transforms draw from torch's generator
    fig = _figure(1.9 * (views + 1) + 1.6, 1.9 * len(picks) + 0.7)
    axes = fig.subplots(len(picks), views + 1, squeeze=False)
    for row, sample in zip(axes, picks):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        try:
            image = load_image(sample.path)
        except UnreadableImage:
            row[0].text(0.5, 0.5, "unreadable", ha="center", va="center", color="red")
            continue
        row[0].imshow(shown(plain(image)))
        for ax in row[1:]:
            ax.imshow(shown(augment(image)))
        row[0].set_ylabel(_wrap(sample.class_name), rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
    axes[0][0].set_title("input (resized)", fontsize=9)
    for k, ax in enumerate(axes[0][1:], 1):
        ax.set_title(f"augmented {k}", fontsize=9)
    steps = ", ".join(type(t).__name__ for t in getattr(augment, "transforms", [])
                      if type(t).__name__ not in ("ToTensor", "Normalize"))
    fig.suptitle(f"training augmentation at {input_size} px: {steps}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir / "augmentation_preview.png", dpi=PHOTO_DPI)


# --------------------------------------------------------------------------------------------- files

def write_tables(stats: DatasetStats, out_dir: Path) -> tuple[Path, Path]:
    """``stats.json`` (everything) and ``stats.csv`` (one row per class)."""
    splits = list(stats.splits)
    grand = sum(len(s) for s in stats.splits.values()) or 1
    size_by_class: dict[str, list[tuple[int, int]]] = {}
    for _, cls, w, h in stats.sizes:
        size_by_class.setdefault(cls, []).append((w, h))

    def size_summary(pairs):
        if not pairs:
            return None
        arr = np.array(pairs)
        return {"min": arr.min(0).tolist(), "median": np.median(arr, 0).tolist(), "max": arr.max(0).tolist()}

    classes = {}
    rows = []
    for cls in stats.classes:
        total = sum(stats.counts[cls].values())
        info = {
            "project": project_of(cls),
            "images": stats.counts[cls],
            "total": total,
            "share": total / grand,
            "share_of_split": {s: stats.counts[cls][s] / max(1, len(stats.splits[s])) for s in splits},
            "pixel_mean": stats.pixel_mean.get(cls),
            "pixel_std": stats.pixel_std.get(cls),
            "size_wh": size_summary(size_by_class.get(cls, [])),
        }
        classes[cls] = info
        row = {"class": cls, "project": info["project"]}
        row.update({f"images_{s}": stats.counts[cls][s] for s in splits})
        row["images_total"] = total
        row["share_total"] = round(total / grand, 6)
        mean = info["pixel_mean"] or [None] * 3
        std = info["pixel_std"] or [None] * 3
        row.update({f"mean_{ch}": None if v is None else round(v, 6) for ch, v in zip("rgb", mean)})
        row.update({f"std_{ch}": None if v is None else round(v, 6) for ch, v in zip("rgb", std)})
        summary = info["size_wh"]
        row["median_width"] = summary["median"][0] if summary else None
        row["median_height"] = summary["median"][1] if summary else None
        rows.append(row)
    document = {
        "root": str(stats.root),
        "layout": stats.layout,
        "splits": {s: {"images": len(stats.splits[s]), "classes": len({x.class_name for x in stats.splits[s]}),
                       "share": len(stats.splits[s]) / grand} for s in splits},
        "images": grand,
        "classes": classes,
        "sampled_images": len(stats.sizes),
        "pixel_mean": stats.overall_mean,
        "pixel_std": stats.overall_std,
        "size_wh": size_summary([(w, h) for _, _, w, h in stats.sizes]),
        "unreadable": stats.unreadable,
        "figures": [p.name for p in stats.figures],
    }
    json_path = out_dir / "stats.json"
    write_text_atomically(json_path, json.dumps(document, indent=2))
    csv_path = out_dir / "stats.csv"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(csv_path, table.getvalue())
    return json_path, csv_path


def visualize_dataset(root: str | Path, out_dir: str | Path, *, samples_per_class: int = 6,
                      max_per_class: int | None = 200, thumbnail: int = 64, augment_images: int = 4,
                      augment_views: int = 5, input_size: int = 224, seed: int = 0) -> DatasetStats:
    """Every figure and table of a data set into ``out_dir``."""
    out_dir = Path(out_dir)
    make_folders(out_dir)
    stats = compute_stats(root, max_per_class=max_per_class, thumbnail=thumbnail, seed=seed)
    log.info("%s: %d classes; drawing figures into %s", root, len(stats.classes), out_dir)
    stats.figures += plot_sample_grid(stats, out_dir, per_class=samples_per_class, seed=seed)
    stats.figures.append(plot_images_per_class(stats, out_dir))
    stats.figures.append(plot_images_per_split(stats, out_dir))
    stats.figures.append(plot_image_sizes(stats, out_dir))
    stats.figures.append(plot_pixel_stats(stats, out_dir))
    stats.figures.append(plot_augmentation_preview(stats, out_dir, images=augment_images, views=augment_views,
                                                   input_size=input_size, seed=seed))
    write_tables(stats, out_dir)
    return stats
