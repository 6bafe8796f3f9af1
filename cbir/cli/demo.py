"""cbir-demo: the whole thesis workflow on real blood-cell images shipped with cbir, through the real commands.

train → cbir-index → cbir-train-index → cbir-retrieve → cbir-eval (all, random), on cbir/samples/pbc (136 images of
8 cell types from the PBC dataset, CC BY 4.0). Everything lands in --out (default ./demo_output); the embedded Redis
and FAISS files in --out/cbir_data. It ends with the command that opens the search page on the database it built.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

from cbir.cli import evaluate, index, retrieve, train, train_index
from cbir.cli.common import at_least, command_parser, entry_point
from cbir.files import check_output_folder
from cbir.errors import CbirError

SAMPLE = resources.files("cbir") / "samples" / "pbc"
QUERY_CLASS = "pbc_neutrophil"


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-demo", __doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--model", default="effnet", help="extractor (default: effnet, whose weights ship offline)")
    p.add_argument("--num_epochs", type=at_least(1), default=4)
    p.add_argument("--input_size", type=at_least(32), default=128)
    return p


def step(title: str, command, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ {command.parser().prog} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    command.main(argv)
    print(f"({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    out = check_output_folder(args.out, "out")
    if out.exists() and not (out / "cbir_data").is_dir() and any(out.iterdir()):
        raise CbirError(f"{out} exists and is not a demo folder; choose another --out")
    folders = {split: Path(str(SAMPLE / split)) for split in ("train", "index", "query")}
    if not all(folder.is_dir() for folder in folders.values()):
        raise CbirError(f"the demo's sample images are missing from {SAMPLE}; reinstall cbir")
    started = time.perf_counter()
    print(f"=== real sample: 8 blood-cell classes (PBC dataset, CC BY 4.0), train / index / query under {SAMPLE}")
    weights = str(out / "weights" / "extractor.pt")
    home = out / "cbir_data"
    db = ["--db_name", "demo", "--home", str(home)]
    step("train", train, ["--model", args.model, "--loss", "margin", "--training_data", str(folders["train"]),
                          "--weights", weights, "--num_epochs", str(args.num_epochs), "--batch_size", "16",
                          "--input_size", str(args.input_size), "--lr", "3e-4"])
    step("index", index, ["--path", str(folders["index"]), "--weights", weights, "--rewrite", *db])
    step("approximate index", train_index, db)
    query = sorted((folders["query"] / QUERY_CLASS).iterdir())[0]
    step("retrieve", retrieve, ["--path", str(query), "--nrt_neigh", "5", "--results_dir", str(out / "results"), *db])
    step("evaluate (all)", evaluate, ["--path", str(folders["query"]), "--measure", "all",
                                      "--output", str(out / "results_all.json"), *db])
    step("evaluate (random, seeded)", evaluate, ["--path", str(folders["query"]), "--measure", "random", "--seed", "0",
                                                 "--output", str(out / "results_random.json"), *db])
    serve = Path(sys.executable).with_name("cbir-serve")
    command = shlex.join([str(serve) if serve.exists() else "cbir-serve", "--db_name", "demo", "--home", str(home),
                          "--open"])
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s. Look at:\n"
          f"  {out / 'results' / 'retrieval.png'}   the query and its neighbours\n"
          f"  {out / 'weights' / 'extractor.loss.png'}   the loss curve\n"
          f"  {out / 'results_all.json'}   every number of the evaluation\n"
          f"\nSearch the demo database in your browser (http://127.0.0.1:8000/; Ctrl-C stops it):\n  {command}")


console_script = entry_point(main)
