"""How well does a training recipe hold on images it has never seen? Four regimes over histo-bench, mean ± spread.

The union of histo-bench's train / index / query folders is re-split per seed (class by class) into query, index,
validation and training parts. Per seed:

* ``folds``: ``cbir-train`` on the training part (at most ``--train_per_class`` images a class), index the index
  part, query the query part.
* ``small``: the same, from ``--small_per_class`` (10) training images a class.
* ``generalise1`` / ``generalise2``: ``cbir-train --generalise 1|2 --split_seed SEED``: train on one half of the
  classes, index and query the other half (the classes the extractor never saw).
* ``colour``: the ``folds`` model (or with ``--colour_of small`` the ``small`` one), its index unchanged, queried with colour-shifted copies of the queries: a stain
  (HED) shift and a scanner-like change (white balance, gamma, contrast, saturation). No extra training.

Training goes through ``cbir-train``'s own parser and ``main`` (its defaults plus ``--train_args``), embedding
through :func:`cbir.embedding.embed`, scoring through :func:`cbir.evaluation.evaluate` (``measure all``, MAP@R)
over an exact FAISS inner-product index, which ranks unit vectors as the database's flat index does (the Redis
half of the database adds nothing to a score). Each run also scores its validation part (leave-one-out among the
validation images, classes the extractor trained on, or for ``generalise`` the unseen half): recipes are compared
on that, never on the query scores this script reports.

Finished runs are kept in ``--work/<name>/runs.jsonl`` and skipped when the script is started again, so a long
campaign survives interruption. Output: a table (mean ± sample std over seeds) on stdout and in
``excel_results/generalisation.md``, every run in ``excel_results/generalisation.json`` and sheets ``<name>`` of
``excel_results/generalisation.xlsx``.

    python benchmarks/generalisation.py --name today --seeds 0 1 2
    python benchmarks/generalisation.py --name candidate --train_args "--lr 2e-4" --regimes small --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REGIMES = ("small", "generalise1", "generalise2", "folds", "colour")
KEYS = ("class_top1", "class_top5", "class_maj", "map_at_r")
COLOUR_SHIFTS = ("stain", "scanner")


# ----------------------------------------------------------------------------------------------------------------
# data: the re-split, and the colour-shifted queries
# ----------------------------------------------------------------------------------------------------------------


def resplit(root: Path, seed: int, *, query: int, index: int, val: int, train: int, small: int) -> dict:
    """{part: [(path, class)]} for one seed; each class is shuffled once and cut into consecutive parts."""
    from cbir.data import list_samples

    by_class: dict[str, list[str]] = {}
    for folder in ("train", "index", "query"):
        for sample in list_samples(root / folder):
            by_class.setdefault(sample.class_name, []).append(sample.path)
    rng = random.Random(seed)
    parts: dict[str, list] = {p: [] for p in ("query", "index", "val", "train", "small")}
    for name in sorted(by_class):
        paths = sorted(by_class[name])
        rng.shuffle(paths)
        cuts = {"query": paths[:query], "index": paths[query:query + index],
                "val": paths[query + index:query + index + val]}
        rest = paths[query + index + val:]
        cuts["train"], cuts["small"] = rest[:train], rest[:small]
        for part, chosen in cuts.items():
            parts[part].extend((p, name) for p in chosen)
    return parts


def materialise(parts: dict, folder: Path) -> None:
    """Copy each part into ``folder/<part>/<class>/`` (copies, not links: the tools read ordinary files)."""
    for part, items in parts.items():
        for path, name in items:
            target = folder / part / name / Path(path).name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)


# Ruifrok & Johnston's haematoxylin / eosin / DAB optical-density vectors (as scikit-image's rgb2hed uses).
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB)


def colour_shift(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A query as another lab's stain or another scanner would show it (one random draw per image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if kind == "stain":  # stain concentration and hue: scale and shift each stain's optical density
        density = -np.log(np.clip(rgb, 1e-6, 1.0)) @ _HED_FROM_RGB
        density = density * rng.uniform(0.7, 1.3, 3) + rng.uniform(-0.05, 0.05, 3)
        out = np.exp(-(density @ _RGB_FROM_HED))
    elif kind == "scanner":  # white balance, gamma, contrast and saturation of another camera
        out = rgb * rng.uniform(0.88, 1.12, 3)
        out = np.clip(out, 0, 1) ** rng.uniform(0.75, 1.33)
        out = (out - out.mean()) * rng.uniform(0.8, 1.2) + out.mean()
        grey = out.mean(axis=2, keepdims=True)
        out = grey + (out - grey) * rng.uniform(0.7, 1.3)
    else:
        raise ValueError(kind)
    return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def shifted_queries(query: list, folder: Path, kind: str, seed: int, part: str = "query") -> list:
    rng = np.random.default_rng([seed, COLOUR_SHIFTS.index(kind), *([1] if part != "query" else [])])
    shifted = []
    for path, name in query:
        target = folder / f"{part}_{kind}" / name / (Path(path).stem + ".png")
        draw = colour_shift(Image.open(path), kind, rng)  # drawn even when cached: the sequence stays the same
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            draw.save(target)
        shifted.append((str(target), name))
    return shifted


# ----------------------------------------------------------------------------------------------------------------
# train, embed, score
# ----------------------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """This process and its finished children (the data-loading workers): the CPU a run really cost."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(data: Path, weights: Path, extra: list[str], seed: int) -> dict:
    from cbir.cli.train import main as train_main

    argv = ["--model", "effnet", "--loss", "margin", "--training_data", str(data), "--weights", str(weights),
            "--seed", str(seed), *extra]
    wall, cpu = time.perf_counter(), cpu_seconds()
    train_main(argv)
    return {"argv": shlex.join(argv), "train_wall_s": time.perf_counter() - wall, "train_cpu_s": cpu_seconds() - cpu}


def embed_items(extractor, items: list) -> tuple[list[str], list[str], np.ndarray]:
    from cbir.data import Sample
    from cbir.embedding import embed

    result = embed(extractor, [Sample(p, c) for p, c in items], batch_size=64)
    return [s.path for s in result.samples], [s.class_name for s in result.samples], result.vectors


def score(query: tuple, database: tuple, same: dict | None = None) -> dict:
    """``measure all`` of the queries against the database vectors (exact search), with MAP@R.

    ``same`` (query path -> database path): a database item that is the query under another colour, left out as
    the query itself is (leave-one-out).
    """
    import faiss

    from cbir.evaluation import evaluate, results_to_request

    q_paths, q_classes, q_vectors = query
    d_paths, d_classes, d_vectors = database
    index = faiss.IndexFlatIP(d_vectors.shape[1])
    index.add(d_vectors)
    counts = dict(Counter(d_classes))
    k = results_to_request(5, db_class_counts=counts)
    row_of = {p: i for i, p in enumerate(q_paths)}

    def search(paths):
        _, found = index.search(q_vectors[[row_of[p] for p in paths]], min(k, len(d_paths)))
        names = [[p if same and same.get(p) == d_paths[j] else d_paths[j] for j in row] for p, row in zip(paths, found)]
        return names, [[d_classes[j] for j in row] for row in found], {}

    report = evaluate(q_paths, q_classes, search, measure="all", k=5, db_class_counts=counts)
    return {key: report.scores.get(key) for key in KEYS} | {"n_queries": report.n_queries}


def run_regime(regime: str, seed: int, parts: dict, folder: Path, extra: list[str], colour_of: str,
               tta: int = 0, trained: dict | None = None) -> dict:
    from cbir.data import Sample
    from cbir.models import load_extractor
    from cbir.labels import restrict_samples

    row: dict = {"regime": regime, "seed": seed, **({"tta_count": tta} if tta else {})}
    if regime == "colour":  # a model this seed already trained, its index as it was, queries shifted
        extractor = load_extractor(folder / "weights" / f"{colour_of}.pt")
        for prefix in ("", *(["tta_"] if tta else [])):
            extractor.config["tta"] = tta if prefix else 0
            database, validation = embed_items(extractor, parts["index"]), embed_items(extractor, parts["val"])
            row[f"{prefix}class_top1_clean"] = score(embed_items(extractor, parts["query"]), database)["class_top1"]
            for kind in COLOUR_SHIFTS:
                shifted = embed_items(extractor, shifted_queries(parts["query"], folder, kind, seed))
                row.update({f"{prefix}{key}_{kind}": value for key, value in score(shifted, database).items()
                            if key in KEYS})
                # validation: each shifted validation image against the clean ones, its own clean copy left out
                shifted_val = shifted_queries(parts["val"], folder, kind, seed, part="val")
                same = {s: p for (s, _), (p, _) in zip(shifted_val, parts["val"])}
                val = score(embed_items(extractor, shifted_val), validation, same)
                row.update({f"{prefix}val_{key}_{kind}": val[key] for key in KEYS})
            # the headline of this regime: the two shifts pooled (the same images under each)
            row.update({f"{prefix}{key}": (row[f"{prefix}{key}_stain"] + row[f"{prefix}{key}_scanner"]) / 2
                        for key in (*KEYS, *(f"val_{k}" for k in KEYS))})
        return row | {"colour_of": colour_of}
    mode = int(regime[-1]) if regime.startswith("generalise") else 0
    weights = folder / "weights" / f"{regime}.pt"
    if trained and weights.exists():  # a kept run scored again (--tta): the same model, not trained again
        row |= {key: trained[key] for key in ("argv", "train_wall_s", "train_cpu_s") if key in trained}
    else:
        row |= train(folder / ("small" if regime == "small" else "train"), weights,
                     [*extra, *(["--generalise", str(mode), "--split_seed", str(seed)] if mode else [])], seed)
    extractor = load_extractor(weights)

    def unseen(items):  # generalise: only the half of the classes the extractor never trained on
        if not mode:
            return items
        kept = restrict_samples([Sample(p, c) for p, c in items], "test", mode, seed=seed)
        return [(s.path, s.class_name) for s in kept]

    wall = time.perf_counter()
    for prefix in ("", *(["tta_"] if tta else [])):  # tta_: the mean vector over tta orientations
        extractor.config["tta"] = tta if prefix else 0
        scores = score(embed_items(extractor, unseen(parts["query"])), embed_items(extractor, unseen(parts["index"])))
        row |= {prefix + key: value for key, value in scores.items() if key in KEYS or not prefix}
        validation = embed_items(extractor, unseen(parts["val"]))
        row |= {f"{prefix}val_{key}": value for key, value in score(validation, validation).items() if key in KEYS}
        row[f"{prefix}eval_wall_s"] = time.perf_counter() - wall
        wall = time.perf_counter()
    return row


# ----------------------------------------------------------------------------------------------------------------
# the campaign and its table
# ----------------------------------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for regime in REGIMES:
        runs = [r for r in rows if r["regime"] == regime]
        if not runs:
            continue
        line = {"regime": regime, "seeds": len(runs)}
        numbers = sorted({key for r in runs for key, value in r.items() if isinstance(value, (int, float))
                          and not isinstance(value, bool) and key not in ("seed", "n_queries")})
        for key in numbers:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                line[key] = float(np.mean(values))
                line[key + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        table.append(line)
    return table


def markdown(name: str, extra: str, table: list[dict]) -> str:
    cells = lambda line, key, f="{:.3f}": (f"{f.format(line[key])} ± {f.format(line[key + '_std'])}"
                                           if key in line else "")
    out = [f"### {name}: `cbir-train --model effnet --loss margin {extra}`".rstrip() + "\n",
           "| regime | seeds | class top-1 | top-5 | maj | MAP@R | val top-1 | val MAP@R | train wall s | train CPU s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for line in table:
        out.append(f"| {line['regime']} | {line['seeds']} | " + " | ".join(
            [cells(line, k) for k in (*KEYS, "val_class_top1", "val_map_at_r")]
            + [cells(line, k, "{:.0f}") for k in ("train_wall_s", "train_cpu_s")]) + " |")
    if any("tta_class_top1" in line for line in table):
        # the table holds the mean over the runs' counts, all one count: 4.0 is printed as 4
        count = int(next(line.get("tta_count", 8) for line in table if "tta_class_top1" in line))
        out += [f"\nThe same models, each vector the mean over {count} orientations (test-time augmentation):\n",
                "| regime | seeds | class top-1 | top-5 | maj | MAP@R | val top-1 | val MAP@R |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {line['regime']} | {line['seeds']} | " + " | ".join(
            cells(line, "tta_" + k) for k in (*KEYS, "val_class_top1", "val_map_at_r")) + " |"
            for line in table if "tta_class_top1" in line]
    colour = next((line for line in table if line["regime"] == "colour"), None)
    if colour:
        out.append("\ncolour regime, class top-1: " + ", ".join(
            f"{k} {cells(colour, 'class_top1_' + k)}" for k in ("clean", *COLOUR_SHIFTS)))
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    from cbir.models import TTA_COUNTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/histo-bench", help="histo-bench (train/index/query folders)")
    p.add_argument("--name", required=True, help="the recipe's name: work folder, sheet and table heading")
    p.add_argument("--train_args", default=None,
                   help="cbir-train flags beyond --model effnet --loss margin (with --report: those of the runs kept)")
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, of {', '.join(REGIMES)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # Parts large enough that the scoring's own sampling error (about 0.02 on 220 queries) stays under the spread
    # between seeds; the images are there (at least 210 a class).
    p.add_argument("--query_per_class", type=int, default=20)
    p.add_argument("--index_per_class", type=int, default=20)
    p.add_argument("--val_per_class", type=int, default=20)
    p.add_argument("--train_per_class", type=int, default=20)
    p.add_argument("--small_per_class", type=int, default=10)
    p.add_argument("--colour_of", default="folds", choices=("folds", "small"),
                   help="the regime whose models the colour regime queries (default: folds; small is cheaper)")
    p.add_argument("--input_size", type=int, default=128,
                   help="input size every run trains and embeds at (the campaign's budget; 0: the model's own, 224)")
    p.add_argument("--tta", type=int, nargs="?", const=8, default=0, choices=(0, *TTA_COUNTS),
                   help="also score every model with test-time augmentation: the mean over this many orientations "
                        "(alone: eight)")
    p.add_argument("--report", action="store_true", help="run nothing: tabulate the runs already finished")
    p.add_argument("--work", default="experiments/generalisation", help="copies, checkpoints and finished runs")
    p.add_argument("--results", default="excel_results", help="where the table, JSON and workbook go")
    args = p.parse_args(argv)
    regimes = args.regimes.split(",")
    if unknown := set(regimes) - set(REGIMES):
        sys.exit(f"unknown regime(s) {', '.join(sorted(unknown))}; choose from {', '.join(REGIMES)}")
    work = Path(args.work) / args.name
    done_file = work / "runs.jsonl"
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    if args.train_args is None:
        # A report tabulates the recipe as it was run: its flags are in its runs, not to be typed again.
        flags = {r.get("train_args", "") for r in done} if args.report else {""}
        if len(flags) > 1:
            sys.exit(f"the runs of {args.name} were trained with several flag sets ({'; '.join(sorted(flags))}); "
                     f"give --train_args")
        args.train_args = flags.pop() if flags else ""
    extra = shlex.split(args.train_args) + (["--input_size", str(args.input_size)] if args.input_size else [])
    # Import the package now: a campaign that runs for an hour measures the code as it was when it started.
    import cbir.cli.train, cbir.embedding, cbir.evaluation, cbir.labels, cbir.models  # noqa: E401,F401
    work.mkdir(parents=True, exist_ok=True)
    if "colour" in regimes and args.colour_of not in regimes and not all(
            (work / f"seed{seed}" / "weights" / f"{args.colour_of}.pt").exists() for seed in args.seeds):
        regimes.insert(regimes.index("colour"), args.colour_of)  # the colour regime scores models trained here
    # A run counts for this campaign when it was trained with these flags and scored on parts of these sizes.
    parts_key = "-".join(str(getattr(args, f"{part}_per_class")) for part in ("query", "index", "val", "train", "small"))
    kept = [r for r in done if r.get("train_args", "") == args.train_args and r.get("parts", "10-15-6-20-10") == parts_key]
    kept = list({(r["regime"], r["seed"]): r for r in kept}.values())  # a run scored again replaces its first row
    rows = [r for r in kept if not args.tta or args.report or tta_count(r) == args.tta]
    if args.report and not rows:  # an empty table would replace the recipe's results
        sys.exit(f"no finished runs of {args.name} with --train_args '{args.train_args}' and these part sizes in "
                 f"{done_file}; nothing written")

    # Regime by regime, seed by seed: a campaign cut short still has a spread for the regimes it finished.
    for regime in regimes:
        for seed in args.seeds:
            if args.report or any(r["regime"] == regime and r["seed"] == seed for r in rows):
                continue
            parts = resplit(Path(args.data), seed, query=args.query_per_class, index=args.index_per_class,
                            val=args.val_per_class, train=args.train_per_class, small=args.small_per_class)
            folder = work / f"seed{seed}"
            materialise(parts, folder)
            # With --tta, a kept run without scores at that count is scored again on its own model (weights kept).
            trained = next((r for r in kept if r["regime"] == regime and r["seed"] == seed), None)
            row = run_regime(regime, seed, parts, folder, extra, args.colour_of, args.tta, trained) | {
                "name": args.name, "train_args": args.train_args, "parts": parts_key}
            rows.append(row)
            with done_file.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    table = summarise(rows)
    text = markdown(args.name, shlex.join(extra), table)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    _merge_json(results / "generalisation.json", args.name, {"train_args": args.train_args, "summary": table,
                                                             "runs": rows, "settings": vars(args)})
    _merge_markdown(results / "generalisation.md", args.name, text)
    import pandas as pd

    from cbir.evaluation import write_excel_sheet

    write_excel_sheet(pd.DataFrame(table).set_index("regime"), results / "generalisation.xlsx", args.name[:31])
    write_excel_sheet(pd.DataFrame(rows), results / "generalisation.xlsx", (args.name + " runs")[:31])


def tta_count(row: dict) -> int:
    """The orientations a run's tta_ scores averaged (runs from before the count: eight), 0 for none."""
    return row.get("tta_count", 8) if "tta_class_top1" in row else 0


def _merge_json(path: Path, name: str, entry: dict) -> None:
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[name] = entry
    path.write_text(json.dumps(everything, indent=1, default=str))


def _merge_markdown(path: Path, name: str, text: str) -> None:
    """One section per recipe name, replaced in place when the recipe is run again."""
    sections = {}
    if path.exists():
        for chunk in path.read_text().split("\n### ")[0:]:
            chunk = chunk.removeprefix("### ")
            if chunk.strip():
                sections[chunk.split(":", 1)[0]] = "### " + chunk.rstrip() + "\n"
    sections[name] = text
    path.write_text("\n".join(sections.values()))


if __name__ == "__main__":
    main()
