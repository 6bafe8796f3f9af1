"""cbir-demo: the whole thesis workflow on a small synthetic data set, through the real commands.

make data → cbir-train → cbir-index → cbir-train-index → cbir-retrieve → cbir-eval (all, random).
Everything lands in --out (default ./demo_output); the embedded Redis and FAISS files in --out/cbir_data.
"""

from __future__ import annotations

import argparse
import shlex
import time

from cbir.cli import evaluate, index, retrieve, train, train_index
from cbir.cli.common import at_least, command_parser, entry_point
from cbir.files import check_output_folder
from cbir.errors import CbirError
from cbir.synthetic import make_dataset


def parser() -> argparse.ArgumentParser:
    p = command_parser("cbir-demo", __doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--model", default="effnet", help="extractor (default: effnet, whose weights ship offline)")
    p.add_argument("--num_epochs", type=at_least(1), default=3)
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
    if out.exists() and not (out / "data").is_dir() and any(out.iterdir()):
        raise CbirError(f"{out} exists and is not a demo folder; choose another --out")
    started = time.perf_counter()
    print(f"=== synthetic data set: 4 classes in 2 projects, train / index / query under {out / 'data'}")
    folders = make_dataset(out / "data", size=96)
    weights = str(out / "weights" / "extractor.pt")
    db = ["--db_name", "demo", "--home", str(out / "cbir_data")]
    step("train", train, ["--model", args.model, "--loss", "margin", "--training_data", str(folders["train"]),
                          "--weights", weights, "--num_epochs", str(args.num_epochs), "--batch_size", "16",
                          "--input_size", str(args.input_size), "--lr", "3e-4"])
    step("index", index, ["--path", str(folders["index"]), "--weights", weights, "--rewrite", *db])
    step("approximate index", train_index, db)
    query = sorted((folders["query"] / "shapes_ring").iterdir())[0]
    step("retrieve", retrieve, ["--path", str(query), "--nrt_neigh", "5", "--results_dir", str(out / "results"), *db])
    step("evaluate (all)", evaluate, ["--path", str(folders["query"]), "--measure", "all",
                                      "--output", str(out / "results_all.json"), *db])
    step("evaluate (random, seeded)", evaluate, ["--path", str(folders["query"]), "--measure", "random", "--seed", "0",
                                                 "--output", str(out / "results_random.json"), *db])
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s. Look at:\n"
          f"  {out / 'results' / 'retrieval.png'}   the query and its neighbours\n"
          f"  {out / 'weights' / 'extractor.loss.png'}   the loss curve\n"
          f"  {out / 'results_all.json'}   every number of the evaluation")


console_script = entry_point(main)
